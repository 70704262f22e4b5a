"""The Image protocol and :func:`open`.

An :class:`Image` is one layer of a chain (qcow2 or raw) with its backing
image, if any.  Reads go through the chain; ``layer_runs`` describes how one
layer maps a guest range, which is what ``map()``, ``info()`` and the copy
planner build on.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Set, Tuple

from .backing import DEFAULT_POLICY, BackingPolicy
from .buffers import finish, zero_fill, zeroed_bytes
from .errors import BackingChainError, FormatError, ImageClosedError
from .lazyimport import numpy as np
from .node import BlockKind, Extent, Node, merge_extents
from .storage import FileStorage, Storage

QCOW2_MAGIC = b"QFI\xfb"


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

    def __init__(self) -> None:
        self._closed = False

    # -- lifecycle ----------------------------------------------------------
    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close this image and its backing chain."""
        if self._closed:
            return
        self._closed = True
        if self.backing is not None:
            self.backing.close()
        self._close_layer()

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
        """The allocation map as ``qemu-img map --output=json`` reports it."""
        from .report import image_map
        self._check_attached()
        return image_map(self, start, length)

    def info(self, backing_chain: bool = False):
        """``qemu-img info --output=json`` of this image (a list with the chain)."""
        from .report import image_info
        self._check_open()
        if backing_chain:
            return [image_info(img) for img in self.chain()]
        return image_info(self)

    def resize(self, new_size: int, *, shrink: bool = False) -> None:
        """Change the virtual size, as ``qemu-img resize [--shrink]`` (image opened "r+")."""
        from .resize import resize
        resize(self, new_size, shrink=shrink)

    # -- internal snapshots (qemu-img snapshot -c/-a/-d; see qcow2py.snapshots) ----
    def create_snapshot(self, name: str):
        from .snapshots import create_snapshot
        return create_snapshot(self, name)

    def apply_snapshot(self, name: str) -> None:
        from .snapshots import apply_snapshot
        apply_snapshot(self, name)

    def delete_snapshot(self, name: str) -> None:
        from .snapshots import delete_snapshot
        delete_snapshot(self, name)

    def amend(self, **options) -> None:
        """``qemu-img amend -o``: compat, lazy_refcounts, refcount_bits (see qcow2py.amend)."""
        from .amend import amend
        amend(self, **options)

    def as_file(self, *, writable: Optional[bool] = None):
        """This image's guest disk as an :class:`io.RawIOBase` (see :mod:`qcow2py.fileobj`)."""
        from .fileobj import as_file
        return as_file(self, writable=writable)

    def actual_size(self) -> int:
        return self.storage.allocated_size()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.filename!r} size={self.size}>"


def probe_format(storage: Storage) -> str:
    """``"qcow2"`` if the storage starts with the qcow2 magic, else ``"raw"``."""
    return "qcow2" if storage.pread(0, 4) == QCOW2_MAGIC else "raw"


class _OpenContext:
    """State shared while opening one chain: policy, depth and loop detection."""

    def __init__(self, policy: BackingPolicy, l2_cache_bytes: Optional[int],
                 writable: bool = False, lock: bool = True, storage_wrapper=None,
                 repair: bool = False, wrap_chain: bool = False, cache: str = "writeback"):
        self.policy = policy
        self.cache = cache                       # qemu-img's cache mode, for every file
        self.l2_cache_bytes = l2_cache_bytes
        self.writable = writable          # applies to the top image only
        self.lock = lock
        self.storage_wrapper = storage_wrapper   # applies to the top image only...
        self.wrap_chain = wrap_chain             # ...or, if set, to every file of the chain
        self.repair = repair                     # opening for check -r: corrupt/dirty allowed
        self.chain = True                        # open backing and data files
        self.seen: Set[Tuple[int, int]] = set()
        self.depth = 0


def open(path: str, mode: str = "r", *, format: Optional[str] = None,
         backing_policy: BackingPolicy = DEFAULT_POLICY,
         l2_cache_bytes: Optional[int] = None, lock: bool = True,
         storage_wrapper: Optional[Callable[[Storage], Storage]] = None,
         repair: bool = False, chain: bool = True, wrap_chain: bool = False,
         snapshot: Optional[str] = None, cache: str = "writeback") -> Image:
    """Open an image file; the format is probed unless given.

    ``mode`` is "r" (read-only; the default) or "r+" (read-write; the image
    takes QEMU's write locks unless ``lock`` is False).  Backing and data
    files named inside the image are opened read-only through
    ``backing_policy``.  ``l2_cache_bytes`` bounds the memory of decoded L2
    tables (per image).  ``storage_wrapper`` wraps the top image's
    :class:`~qcow2py.storage.Storage` (to trace requests, journal writes for
    crash tests, or feed a disk model); with ``wrap_chain=True`` it wraps every
    file of the chain too (backing and external data files), e.g. with
    :meth:`TraceLog.wrap <qcow2py.storage.TraceLog.wrap>` to trace a whole
    chain in one log.  ``repair=True`` (with "r+") opens a corrupt or dirty
    image so that ``check(repair=...)`` can fix it.
    ``snapshot`` (id or name) reads that internal snapshot instead of the
    active state, read-only (``qemu-img convert -l snapshot.name=...``).
    ``cache`` is qemu-img's cache mode for every file of the chain:
    "writeback" (page cache; flush() is fsync), "none" (O_DIRECT, see
    :mod:`qcow2py.directio`), "directsync" (O_DIRECT + O_DSYNC),
    "writethrough" (O_DSYNC), "unsafe" (flush() does nothing).
    ``chain=False`` opens the image alone, as ``qemu-img info``
    does: a backing or external data file it names is neither opened nor
    needed, and the image is :attr:`~Image.detached` (``info()`` works; reads
    and ``map()`` raise :class:`BackingChainError`); with "r+" it is for header
    changes (``set_backing``: ``qemu-img rebase -u`` on a moved backing file).
    """
    if mode not in ("r", "r+"):
        raise ValueError(f"unsupported mode {mode!r} (use 'r' or 'r+')")
    if snapshot is not None and mode != "r":
        raise ValueError("snapshot= reads an internal snapshot: mode 'r' only")
    ctx = _OpenContext(backing_policy, l2_cache_bytes, writable=mode == "r+", lock=lock,
                       storage_wrapper=storage_wrapper, repair=repair, wrap_chain=wrap_chain,
                       cache=cache)
    ctx.chain = chain
    img = _open_layer(os.fspath(path), format, ctx, display_name=os.fspath(path))
    if snapshot is not None:
        try:
            if not hasattr(img, "select_snapshot"):
                raise ValueError("snapshot= needs a qcow2 image (internal snapshots)")
            img.select_snapshot(snapshot)
        except BaseException:
            img.close()
            raise
    return img


def _open_layer(path: str, fmt: Optional[str], ctx: _OpenContext,
                display_name: str) -> Image:
    if ctx.depth > ctx.policy.max_depth:
        raise BackingChainError(f"backing chain deeper than {ctx.policy.max_depth} images "
                                f"at {display_name!r}")
    writable = ctx.writable and ctx.depth == 0
    try:
        storage = open_file_storage(path, writable, ctx.cache)
    except FileNotFoundError as e:
        if ctx.depth:
            raise BackingChainError(f"backing file {display_name!r} not found") from e
        raise
    try:
        st = os.fstat(storage.fileno())
        key = (st.st_dev, st.st_ino)
        if key in ctx.seen:
            raise BackingChainError(f"backing chain loops back to {display_name!r}")
        ctx.seen.add(key)
        if ctx.storage_wrapper is not None and (ctx.depth == 0 or ctx.wrap_chain):
            storage = ctx.storage_wrapper(storage)
        if fmt is None:
            fmt = probe_format(storage)
        if fmt == "qcow2" and writable:
            from .writer import WritableQcow2Image
            img: Image = WritableQcow2Image(storage, display_name, ctx)
        elif fmt == "qcow2":
            from .qcow2 import Qcow2Image
            img = Qcow2Image(storage, display_name, ctx)
        elif fmt == "raw":
            from .raw import RawImage
            img = RawImage(storage, display_name)
        else:
            raise FormatError(f"unknown image format {fmt!r} (qcow2 or raw)")
    except BaseException:
        storage.close()
        raise
    return img


def open_file_storage(path: str, writable: bool = False, cache: str = "writeback") -> Storage:
    """The storage of one file of a chain in a cache mode (direct I/O imported only
    when asked for, so plain opens stay light)."""
    if cache == "writeback":
        return FileStorage(path, writable=writable)
    from .directio import open_storage
    return open_storage(path, writable, cache)


def backing_display_name(parent_name: str, name: str) -> str:
    """How qemu-img names the backing file ``name`` of the image it calls
    ``parent_name``: protocol and absolute names as they are, a relative one
    appended to everything up to the parent's last ``/`` (or protocol ``:``),
    without normalising (``t//top`` + ``b`` is ``t//b``)."""
    if os.path.isabs(name) or ":" in name.split("/", 1)[0]:
        return name
    cut = max(parent_name.rfind("/"), parent_name.find(":"))
    return parent_name[:cut + 1] + name


def open_backing(parent: Image, name: str, fmt: Optional[str], ctx: _OpenContext) -> Image:
    """Open the backing file ``name`` of ``parent`` through the context's policy."""
    path = ctx.policy.resolve(name, parent.storage.name)
    if fmt is not None and fmt not in ("qcow2", "raw"):
        raise BackingChainError(f"backing file {name!r} has unsupported format {fmt!r}")
    shown = path if name.startswith("file:") else backing_display_name(parent.filename, name)
    ctx.depth += 1
    try:
        return _open_layer(path, fmt, ctx, display_name=shown)
    finally:
        ctx.depth -= 1
