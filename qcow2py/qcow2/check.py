"""Consistency check of a qcow2 image, with ``qemu-img check``'s semantics.

The check rebuilds every cluster's reference count from the metadata that
points at it (header, L1/L2 of the active state and of every snapshot, the
snapshot table, the refcount structures, persistent bitmaps) and compares the
result with the refcounts stored in the image:

* stored > computed: a *leak* (harmless, wasted space);
* stored < computed: a *corruption* (a later allocation could overwrite live data);
* the COPIED flag of L1/L2 entries must say exactly "refcount == 1".

The lenient open is :mod:`qcow2py.qcow2.checkview`, the walk (counting,
comparing) :mod:`qcow2py.qcow2.checkwalk`, repairs :mod:`qcow2py.qcow2.repair`.
All work on the file through its Storage, never through the driver's private
state, so a check opens what ``qemu-img check`` opens, whatever the L1/L2/refcount
entries hold.  This module is the front: a check of an open image, or of a path.
"""

from __future__ import annotations

from typing import Optional

from ..errors import FormatError, Qcow2Error
from ..image import Image
from ..io import locking
from ..io.storage import FileStorage
from .checkresult import CheckResult
from .checkview import CheckFailed, OpenBacking
from .repair import check_storage, repair_storage


def check_image(img: Image) -> CheckResult:
    """Check an open qcow2 image (a writable one is flushed first); its backing chain
    is already open, so it is not opened again."""
    if not img.read_only:
        img.flush()
    return check_storage(img.storage, img.filename)


class NotQcow2(FormatError):
    """The file is not a qcow2 image (qemu-img: "This image format does not support checks")."""


def check_path(path: str, fmt: Optional[str] = None, repair: Optional[str] = None,
               lock: bool = True, open_backing: Optional[OpenBacking] = None,
               force_share: bool = False) -> CheckResult:
    """``qemu-img check [-r repair] path``: opens the file itself, leniently.

    ``open_backing`` opens the backing file as qemu-img check does (it fails when the
    chain cannot be opened); the opener's policy lives above the drivers, so
    :func:`qcow2py.opener.check_path` passes it.  None: the chain is not opened.
    """
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
        if lock and st.fileno() is not None:
            # QEMU's permissions, as qemu-img check takes them (read-only unless -r)
            locking.acquire(st.fileno(), path, locking.file_perms(
                "qcow2", locking.TOP, writable=bool(repair), force_share=force_share))
            locked = st.fileno()
        if repair:
            return repair_storage(st, path, repair, open_backing)
        return check_storage(st, path, open_backing)
    finally:
        if locked is not None:
            locking.release(locked)
        st.close()


__all__ = ["CheckResult", "CheckFailed", "NotQcow2", "check_image", "check_path",
           "check_storage", "repair_storage", "Qcow2Error"]
