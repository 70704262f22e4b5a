"""Opening and creating images: the only module that names the drivers.

:func:`open` probes the format, opens the file (with its locks) and hands the
driver an :class:`OpenContext` through which the driver opens its backing and
external data files, so the backing and data-file policy (name resolution,
depth, loops, wrappers) lives here and nowhere in the drivers.  :func:`create`
resolves what ``qemu-img create`` takes from the backing file (size, format),
lets the driver lay the new file out, and opens the result.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Set, Tuple

from .backing import DEFAULT_POLICY, BackingPolicy
from .errors import BackingChainError, FormatError
from .format.header import has_magic
from .image import Image, backing_display_name
from .io.storage import FileStorage, Storage
from .lazyimport import lazy_module
from .qcow2.create import (CreateError, PREALLOCATION_MODES, claim, create_data_file,
                           create_raw, qcow2_header, refuse_raw_options, write_fresh_qcow2)
from .qcow2.read import Qcow2Image
from .raw import RawImage

#: the writable driver (imported when an image is opened "r+")
writable_qcow2 = lazy_module("qcow2py.qcow2.image")


def probe_format(storage: Storage) -> str:
    """``"qcow2"`` if the storage starts with the qcow2 magic, else ``"raw"``."""
    return "qcow2" if has_magic(storage.pread(0, 4)) else "raw"


class OpenContext:
    """State shared while opening one chain: policy, depth and loop detection."""

    def __init__(self, policy: BackingPolicy, l2_cache_bytes: Optional[int],
                 writable: bool = False, lock: bool = True, storage_wrapper=None,
                 repair: bool = False, wrap_chain: bool = False):
        self.policy = policy
        self.l2_cache_bytes = l2_cache_bytes
        self.writable = writable          # applies to the top image only
        self.lock = lock
        self.storage_wrapper = storage_wrapper   # applies to the top image only...
        self.wrap_chain = wrap_chain             # ...or, if set, to every file of the chain
        self.repair = repair                     # opening for check -r: corrupt/dirty allowed
        self.chain = True                        # open backing and data files
        self.seen: Set[Tuple[int, int]] = set()
        self.depth = 0

    # the drivers call these two: the backing and data-file policy lives here
    def open_backing(self, parent: Image, name: str, fmt: Optional[str]) -> Image:
        """Open the backing file ``name`` of ``parent`` (read-only, through the policy)."""
        return open_backing(parent, name, fmt, self)

    def open_data_file(self, parent: Image, name: str) -> Tuple[Storage, str]:
        """Open the external data file ``name`` of ``parent``: (storage, resolved path)."""
        path = self.policy.resolve(name, parent.storage.name, what="data file")
        try:
            storage: Storage = FileStorage(path)
        except FileNotFoundError:
            raise BackingChainError(f"external data file {path!r} not found") from None
        if self.wrap_chain and self.storage_wrapper is not None:
            storage = self.storage_wrapper(storage)
        return storage, path


def open(path: str, mode: str = "r", *, format: Optional[str] = None,
         backing_policy: BackingPolicy = DEFAULT_POLICY,
         l2_cache_bytes: Optional[int] = None, lock: bool = True,
         storage_wrapper: Optional[Callable[[Storage], Storage]] = None,
         repair: bool = False, chain: bool = True, wrap_chain: bool = False,
         snapshot: Optional[str] = None) -> Image:
    """Open an image file; the format is probed unless given.

    ``mode`` is "r" (read-only; the default) or "r+" (read-write; the image
    takes QEMU's write locks unless ``lock`` is False).  Backing and data
    files named inside the image are opened read-only through
    ``backing_policy``.  ``l2_cache_bytes`` bounds the memory of decoded L2
    tables (per image).  ``storage_wrapper`` wraps the top image's
    :class:`~qcow2py.io.storage.Storage` (to trace requests, journal writes for
    crash tests, or feed a disk model); with ``wrap_chain=True`` it wraps every
    file of the chain too (backing and external data files), e.g. with
    :meth:`TraceLog.wrap <qcow2py.io.wrappers.TraceLog.wrap>` to trace a whole
    chain in one log.  ``repair=True`` (with "r+") opens a corrupt or dirty
    image so that ``check(repair=...)`` can fix it.
    ``snapshot`` (id or name) reads that internal snapshot instead of the
    active state, read-only (``qemu-img convert -l snapshot.name=...``).
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
    ctx = OpenContext(backing_policy, l2_cache_bytes, writable=mode == "r+", lock=lock,
                       storage_wrapper=storage_wrapper, repair=repair, wrap_chain=wrap_chain)
    ctx.chain = chain
    img = _open_layer(os.fspath(path), format, ctx, display_name=os.fspath(path))
    if snapshot is not None:
        try:
            if not isinstance(img, Qcow2Image):
                raise ValueError("snapshot= needs a qcow2 image (internal snapshots)")
            img.select_snapshot(snapshot)
        except BaseException:
            img.close()
            raise
    return img


def _open_layer(path: str, fmt: Optional[str], ctx: OpenContext,
                display_name: str) -> Image:
    if ctx.depth > ctx.policy.max_depth:
        raise BackingChainError(f"backing chain deeper than {ctx.policy.max_depth} images "
                                f"at {display_name!r}")
    writable = ctx.writable and ctx.depth == 0
    try:
        storage = FileStorage(path, writable=writable)
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
            img: Image = writable_qcow2.WritableQcow2Image(storage, display_name, ctx)
        elif fmt == "qcow2":
            img = Qcow2Image(storage, display_name, ctx)
        elif fmt == "raw":
            img = RawImage(storage, display_name)
        else:
            raise FormatError(f"unknown image format {fmt!r} (qcow2 or raw)")
    except BaseException:
        storage.close()
        raise
    return img


def open_backing(parent: Image, name: str, fmt: Optional[str], ctx: OpenContext) -> Image:
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


def create(path: str, size: Optional[int] = None, *, format: str = "qcow2",
           cluster_size: int = 65536, compat: str = "1.1", refcount_bits: int = 16,
           extended_l2: bool = False, lazy_refcounts: bool = False,
           compression_type: str = "zlib", backing_file: Optional[str] = None,
           backing_format: Optional[str] = None, data_file: Optional[str] = None,
           data_file_raw: bool = False, preallocation: str = "off",
           lock: bool = True, storage_wrapper=None) -> Image:
    """Create an image and return it opened "r+".

    Options and their checks follow ``qemu-img create -f qcow2 -o ...``.
    ``size`` may be omitted when a backing file gives it.  ``storage_wrapper``
    is passed to :func:`qcow2py.open` (to trace or journal the new image).
    """
    return _create(os.fspath(path), size, format, cluster_size, compat, refcount_bits,
                   extended_l2, lazy_refcounts, compression_type, backing_file,
                   backing_format, data_file, data_file_raw, preallocation, lock,
                   storage_wrapper, keep_open=True)


def create_file(path: str, size: Optional[int] = None, *, format: str = "qcow2",
                cluster_size: int = 65536, compat: str = "1.1", refcount_bits: int = 16,
                extended_l2: bool = False, lazy_refcounts: bool = False,
                compression_type: str = "zlib", backing_file: Optional[str] = None,
                backing_format: Optional[str] = None, data_file: Optional[str] = None,
                data_file_raw: bool = False, preallocation: str = "off",
                lock: bool = True) -> None:
    """Create an image as :func:`create` does, but leave it closed (``qemu-img create``).

    The backing file is opened only when it must give the size or its format
    is to be probed, so with both given it need not exist yet
    (``qemu-img create -u``).
    """
    _create(os.fspath(path), size, format, cluster_size, compat, refcount_bits,
            extended_l2, lazy_refcounts, compression_type, backing_file, backing_format,
            data_file, data_file_raw, preallocation, lock, None, keep_open=False)


def _create(path, size, format, cluster_size, compat, refcount_bits, extended_l2,
            lazy_refcounts, compression_type, backing_file, backing_format, data_file,
            data_file_raw, preallocation, lock, storage_wrapper, keep_open):
    if preallocation not in PREALLOCATION_MODES and format == "raw":
        raise CreateError(f"invalid parameter value: {preallocation}")
    if preallocation not in PREALLOCATION_MODES:
        raise CreateError(f"Parameter 'preallocation' does not accept value '{preallocation}'")
    if format == "raw":
        refuse_raw_options(backing_file, backing_format, preallocation,
                           cluster_size=cluster_size, compat=compat,
                           refcount_bits=refcount_bits, extended_l2=extended_l2,
                           lazy_refcounts=lazy_refcounts, compression_type=compression_type,
                           data_file=data_file, data_file_raw=data_file_raw)
        if lock:
            claim(path)
        create_raw(path, size, preallocation)
        img = open(path, "r+", format="raw", storage_wrapper=storage_wrapper)
        if not keep_open:
            img.close()
        return img
    if format != "qcow2":
        raise CreateError(f"Unknown format '{format}' (qcow2 or raw)")
    header = qcow2_header(path, size, cluster_size, compat, refcount_bits, extended_l2,
                          lazy_refcounts, compression_type, backing_file, backing_format,
                          data_file, data_file_raw, preallocation, _probe_backing,
                          check_backing=keep_open)
    data_path = None
    if data_file is not None:
        data_path = data_file if os.path.isabs(data_file) else \
            os.path.join(os.path.dirname(path), data_file)
    if lock:
        claim(path)
        if data_path is not None:
            claim(data_path)
    write_fresh_qcow2(path, header)
    if data_path is not None:
        create_data_file(data_path, header.size, preallocation)
    if data_file_raw and preallocation == "off":
        preallocation = "metadata"        # a raw data file must stay a valid raw image
    if not keep_open and preallocation == "off":
        return None
    img = open(path, "r+", format="qcow2", lock=lock, storage_wrapper=storage_wrapper)
    if preallocation != "off":
        try:
            img.preallocate(preallocation)
        except BaseException:
            img.close()
            raise
    if not keep_open:
        img.close()
    return img




def _probe_backing(path: str, fmt: Optional[str]) -> Tuple[str, int]:
    """(format, size) of a new image's backing file, opened alone and read-only."""
    try:
        with open(path, format=fmt) as b:
            return b.format, b.size
    except FileNotFoundError:     # as from open(): the chain is incomplete
        raise BackingChainError(f"Could not open '{path}': No such file or "
                                f"directory") from None
