"""Consistency check of a qcow2 image, with ``qemu-img check``'s semantics.

The check rebuilds every cluster's reference count from the metadata that
points at it (header, L1/L2 of the active state and of every snapshot, the
snapshot table, the refcount structures, persistent bitmaps) and compares the
result with the refcounts stored in the image:

* stored > computed: a *leak* (harmless, wasted space);
* stored < computed: a *corruption* (a later allocation could overwrite live data);
* the COPIED flag of L1/L2 entries must say exactly "refcount == 1".

The walk itself (lenient open, counting, comparing) is in
:mod:`qcow2py.checkwalk`; repairs are in :mod:`qcow2py.repair`.  Both work
on the file through its Storage, so a check opens what ``qemu-img check``
opens, whatever the L1/L2/refcount entries hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .checkwalk import CheckFailed
from .errors import FormatError, Qcow2Error
from .repair import check_storage, repair_storage
from .storage import FileStorage

MAX_MESSAGES = 1000


@dataclass
class CheckResult:
    """What ``qemu-img check`` reports (its JSON keys via :meth:`to_json_dict`)."""

    filename: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    messages: List[str] = field(default_factory=list)
    leaks_fixed: int = 0
    corruptions_fixed: int = 0
    #: per-cluster (index, stored, computed) for every mismatch
    mismatches: List[tuple] = field(default_factory=list)
    #: messages left out past MAX_MESSAGES
    messages_dropped: int = 0

    def note(self, msg: str) -> None:
        """Record one ERROR/Leaked/Repairing line (bounded: hostile images have many)."""
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(msg)
        else:
            self.messages_dropped += 1

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit status: 0 clean, 1 check errors, 2 corruptions, 3 leaks."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json_dict(self, fmt: str = "qcow2") -> Dict[str, object]:
        d: Dict[str, object] = {"filename": self.filename, "format": fmt,
                                "check-errors": self.check_errors,
                                "image-end-offset": self.image_end_offset}
        for key, val in (("corruptions", self.corruptions), ("leaks", self.leaks),
                         ("corruptions-fixed", self.corruptions_fixed),
                         ("leaks-fixed", self.leaks_fixed),
                         ("total-clusters", self.total_clusters),
                         ("allocated-clusters", self.allocated_clusters),
                         ("fragmented-clusters", self.fragmented_clusters),
                         ("compressed-clusters", self.compressed_clusters)):
            if val:
                d[key] = val
        return d


def check_image(img) -> CheckResult:
    """Check an open qcow2 image (a writable one is flushed first)."""
    flush = getattr(img, "flush", None)
    if flush is not None and not img.read_only:
        flush()
    return check_storage(img.storage, img.filename)


class NotQcow2(FormatError):
    """The file is not a qcow2 image (qemu-img: "This image format does not support checks")."""


def check_path(path: str, fmt: Optional[str] = None, repair: Optional[str] = None,
               lock: bool = True) -> CheckResult:
    """``qemu-img check [-r repair] path``: opens the file itself, leniently."""
    from .locking import lock_for_write, unlock
    st = FileStorage(path, writable=bool(repair))
    locked = None
    try:
        head = st.pread(0, 8)
        # QEMU probes qcow2 by the magic and a version >= 2, qcow by version 1
        if fmt not in (None, "qcow2") or head[:4] != b"QFI\xfb" or \
                (fmt is None and int.from_bytes(head[4:8], "big") == 0):
            if fmt in (None, "qcow2", "raw"):
                raise NotQcow2(f"{path}: This image format does not support checks")
            raise FormatError(f"unknown image format {fmt!r} (qcow2 or raw)")
        if repair:
            if lock and st.fileno() is not None:
                lock_for_write(st.fileno(), path)
                locked = st.fileno()
            return repair_storage(st, path, repair)
        return check_storage(st, path)
    finally:
        if locked is not None:
            unlock(locked)
        st.close()


__all__ = ["CheckResult", "CheckFailed", "NotQcow2", "check_image", "check_path",
           "check_storage", "repair_storage", "Qcow2Error"]
