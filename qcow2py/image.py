"""The Image base class: one layer of a chain, a :class:`~qcow2py.node.Node`.

An :class:`Image` is one layer of a chain (qcow2 or raw) with its backing
image, if any.  Reads go through the chain; ``layer_runs`` describes how one
layer maps a guest range, which is what ``map()``, ``info()`` and the copy
planner build on.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

from .buffers import finish, zero_fill, zeroed_bytes
from .errors import (AmendError, BackingChainError, ImageClosedError, ResizeError,
                     UnsupportedFeatureError)
from .fileobj import ImageFile, as_file
from .io.inflight import RequestGate, gated
from .lazyimport import numpy as np
from .node import BlockKind, Extent, Node, merge_extents
from .io.storage import Storage

@dataclass(frozen=True)
class Run:
    """One extent of a single layer's mapping (``qemu-img map`` terms).

    ``allocated`` means this layer decides the content (data or zeros);
    otherwise reads fall through to the backing image.
    """

    start: int
    length: int
    data: bool
    zero: bool
    offset: Optional[int] = None      # host offset in the layer's data file
    compressed: bool = False

    @property
    def allocated(self) -> bool:
        return self.data or self.zero


class Image(Node):
    """Base class of every image format (a :class:`~qcow2py.node.Node`).
    Subclasses set the attributes below."""

    format: str = "?"
    filename: str = ""
    size: int = 0
    cluster_size: Optional[int] = None
    backing: Optional["Image"] = None
    storage: Storage
    #: opened with ``chain=False`` while naming a backing or external data file that
    #: was therefore not opened: metadata (``info``) only, reads and ``map`` refuse
    detached: bool = False

    #: the public requests ``close()`` waits for (see :mod:`qcow2py.io.inflight`)
    _REQUESTS = ("read", "read_into", "block_status", "write", "write_zeroes", "discard",
                 "flush", "write_compressed")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name in cls._REQUESTS:
            if name in cls.__dict__:
                setattr(cls, name, gated(cls.__dict__[name]))

    def __init__(self) -> None:
        self._closed = False
        self._gate = RequestGate()

    # -- lifecycle ----------------------------------------------------------
    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close this image and its backing chain, once the requests other threads
        have in flight are done (new ones raise :class:`ImageClosedError`)."""
        if self._closed:
            return
        gate = self.__dict__.get("_gate")
        if gate is not None and not gate.shut_and_drain():
            return                        # another thread is closing it
        self._closed = True
        try:
            if self.backing is not None:
                self.backing.close()
        finally:
            self._close_layer()         # this layer's files close even if the chain's fail

    def _close_layer(self) -> None:
        self.storage.close()

    @property
    def read_only(self) -> bool:
        return not self.storage.writable

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ImageClosedError(f"image {self.filename!r} is closed")

    # -- reading ------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset+length)``; reads past the end raise ValueError."""
        result, view = zeroed_bytes(self._checked_length(offset, length))
        if length:
            self._read_zeroed(view, offset)     # fills the result in place (no copy)
        return finish(result)

    def read_into(self, buf, offset: int) -> None:
        """Fill the writable buffer ``buf`` with guest bytes starting at ``offset``."""
        mv = memoryview(buf).cast("B")
        self._checked_length(offset, len(mv))
        zero_fill(mv, np)
        if len(mv):
            self._read_zeroed(mv, offset)

    def _check_attached(self) -> None:
        if self.detached:
            raise BackingChainError(f"image {self.filename!r} was opened without its backing "
                                    f"or data file (chain=False): it cannot be read or mapped")

    def _checked_length(self, offset: int, length: int) -> int:
        self._check_open()
        self._check_attached()
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        if offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {offset} goes past the end of "
                             f"the image ({self.size} bytes)")
        return length

    @abstractmethod
    def _read_zeroed(self, mv: memoryview, offset: int) -> None:
        """Read into ``mv``, which is already zero-filled: zero ranges can be skipped."""

    def _read_backing(self, mv: memoryview, offset: int) -> None:
        """Read a range this layer leaves unallocated; zeros past the backing's end."""
        b = self.backing
        if b is None or offset >= b.size:
            return
        n = min(len(mv), b.size - offset)
        b._read_zeroed(mv[:n], offset)

    # -- writing (formats opened "r+" override these) -------------------------
    def _read_only(self, *args, **kwargs):
        raise ValueError(f"image {self.filename!r} is open read-only (use mode 'r+')")

    write = write_zeroes = discard = _read_only

    def flush(self) -> None:
        """Nothing to make durable on a read-only image."""
        self._check_open()

    # -- mapping ------------------------------------------------------------
    @abstractmethod
    def layer_runs(self, offset: int, length: int) -> Iterator[Run]:
        """This layer's mapping of a guest range, as coalesced runs in guest order."""

    def chain(self) -> List["Image"]:
        """This image followed by its backing images, top first."""
        out, img = [], self
        while img is not None:
            out.append(img)
            img = img.backing
        return out

    def block_status(self, offset: int, length: int) -> List[Extent]:
        """The node protocol's map of ``[offset, offset+length)`` through the chain,
        walked as QEMU's block-status walks it (see :mod:`qcow2py.node`)."""
        self._check_open()
        self._check_attached()
        end = min(self.size, offset + length)
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        if offset >= end:
            return []
        return merge_extents(self._chain_status(offset, end - offset, 0))

    def _host_file(self) -> str:
        """The file this layer's data clusters live in."""
        return self.filename

    def _host_holes(self, host_offset: int, length: int):
        """``(host_start, length, is_data)`` of a data run's host range, or None when
        this layer's data runs need no look at the host file (see qcow2)."""
        return None

    def _chain_status(self, offset: int, length: int, depth: int) -> Iterator[Extent]:
        host_file = self._host_file()
        for r in self.layer_runs(offset, length):
            if r.data and r.offset is not None:
                holes = self._host_holes(r.offset, r.length)
                if holes is not None:
                    # metadata-preallocated: QEMU asks the file, holes read as zeros
                    for start, n, is_data in holes:
                        yield Extent(r.start + (start - r.offset), n, BlockKind.DATA, depth,
                                     start, host_file, known_zero=not is_data)
                    continue
            if r.allocated:
                kind = (BlockKind.COMPRESSED if r.compressed else
                        BlockKind.DATA if r.data else BlockKind.ZERO)
                yield Extent(r.start, r.length, kind, depth, r.offset,
                             host_file if r.offset is not None else None)
                continue
            b = self.backing
            s, e = r.start, r.start + r.length
            if b is not None and s < b.size:
                yield from b._chain_status(s, min(e, b.size) - s, depth + 1)
                s = min(e, b.size)
            if s < e:
                # unallocated at the bottom of the chain, or past a shorter backing
                off = None if r.offset is None else r.offset + (s - r.start)
                yield Extent(s, e - s, BlockKind.UNALLOCATED, depth, off,
                             host_file if off is not None else None)

    def map(self, start: int = 0, length: Optional[int] = None) -> List[dict]:
        """The allocation map as ``qemu-img map --output=json`` reports it (entries
        merged as qemu-img merges them)."""
        self._check_attached()
        end = self.size if length is None else min(self.size, start + length)
        return [_map_entry(e) for e in self.block_status(start, end - start)]

    def info(self, backing_chain: bool = False):
        """``qemu-img info --output=json`` of this image (a list with the chain)."""
        self._check_open()
        if backing_chain:
            return [img.info() for img in self.chain()]
        info: Dict[str, object] = {
            "virtual-size": self.size,
            "filename": self.filename,
            "format": self.format,
            # QEMU 7.2 counts the image's own file only: an external data file is left out
            "actual-size": self.storage.allocated_size(),
            "dirty-flag": bool(getattr(self, "dirty", False)),
        }
        info.update(self.format_info())
        return info

    def format_info(self) -> Dict[str, object]:
        """The format's own fields of :meth:`info` (QEMU 7.2 ImageInfo); none for raw."""
        return {}

    # -- lifecycle (qemu-img resize / snapshot / amend); the drivers implement them
    def resize(self, new_size: int, *, shrink: bool = False, preallocation: str = "off") -> None:
        """Change the virtual size, as ``qemu-img resize [--shrink] [--preallocation]``
        (image opened "r+").

        The driver changes its own layer (:meth:`set_size`); when a longer backing
        file would show through the new area, that area is zero-filled (as QEMU's
        block layer also does).  ``preallocation`` ("off", "metadata", "falloc",
        "full") allocates the grown area as ``qemu-img resize --preallocation`` does."""
        self._check_open()
        if self.read_only:
            raise ValueError(f"image {self.filename!r} is open read-only (use mode 'r+')")
        if preallocation not in PREALLOCATION_MODES:
            raise ResizeError(f"Invalid preallocation mode '{preallocation}'")
        if preallocation != "off" and int(new_size) <= self.size:
            raise ResizeError("Preallocation can only be used for growing images")
        old = self.size
        self.set_size(new_size, shrink=shrink, preallocation=preallocation)
        b = self.backing
        if b is not None and self.size > old and b.size > old:
            end = min(self.size, b.size)
            if preallocation in ("falloc", "full") and self.cluster_size:
                # the new clusters hold zeros already: only the old last one's tail
                end = min(end, -(-old // self.cluster_size) * self.cluster_size)
            if end > old:
                self.write_zeroes(old, end - old)
            self.flush()

    def check_resize(self, new_size: int, shrink: bool) -> int:
        """The size the image will have, or the refusal qemu-img gives."""
        new_size = int(new_size)
        if new_size < self.size and not shrink:
            raise ResizeError("Use the --shrink option to perform a shrink operation.")
        if self.format == "qcow2" and new_size % 512:
            raise ResizeError("The new size must be a multiple of 512")
        if new_size < self.size and getattr(self, "snapshots", None):
            raise ResizeError("Can't shrink an image which has snapshots")
        return new_size

    def set_size(self, new_size: int, *, shrink: bool = False,
                 preallocation: str = "off") -> None:
        """This layer's part of :meth:`resize` (drivers that can resize override it)."""
        raise UnsupportedFeatureError(f"{self.filename}: format {self.format} cannot be "
                                      f"resized")

    def create_snapshot(self, name: str):
        """``qemu-img snapshot -c`` (qcow2 images opened "r+")."""
        raise self._no_snapshots()

    def apply_snapshot(self, name: str) -> None:
        """``qemu-img snapshot -a`` (qcow2 images opened "r+")."""
        raise self._no_snapshots()

    def delete_snapshot(self, name: str) -> None:
        """``qemu-img snapshot -d`` (qcow2 images opened "r+")."""
        raise self._no_snapshots()

    def _no_snapshots(self) -> Exception:
        return ValueError(f"image {self.filename!r} must be a qcow2 image opened 'r+'")

    def amend(self, **options) -> None:
        """``qemu-img amend -o``: compat, lazy_refcounts, refcount_bits (qcow2 images
        opened "r+"; see :func:`qcow2py.amend`)."""
        raise AmendError(f"Format driver '{self.format}' does not support option amendment"
                         if self.format != "qcow2" else
                         f"image {self.filename!r} is open read-only (use mode 'r+')")

    def as_file(self, *, writable: Optional[bool] = None) -> ImageFile:
        """This image's guest disk as an :class:`io.RawIOBase` (see :mod:`qcow2py.fileobj`)."""
        return as_file(self, writable=writable)

    def actual_size(self) -> int:
        return self.storage.allocated_size()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.filename!r} size={self.size}>"


for _name in Image._REQUESTS:
    if _name in Image.__dict__:
        setattr(Image, _name, gated(Image.__dict__[_name]))
del _name

#: ``qemu-img resize --preallocation`` modes
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


def _map_entry(e: Extent) -> dict:
    out = {"start": e.offset, "length": e.length, "depth": e.depth, "present": e.present,
           "zero": e.zero, "data": e.data}
    if e.host_offset is not None:
        out["offset"] = e.host_offset
    return out


def backing_display_name(parent_name: str, name: str) -> str:
    """How qemu-img names the backing file ``name`` of the image it calls
    ``parent_name``: protocol and absolute names as they are, a relative one
    appended to everything up to the parent's last ``/`` (or protocol ``:``),
    without normalising (``t//top`` + ``b`` is ``t//b``)."""
    if os.path.isabs(name) or ":" in name.split("/", 1)[0]:
        return name
    cut = max(parent_name.rfind("/"), parent_name.find(":"))
    return parent_name[:cut + 1] + name
