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
from .errors import BackingChainError, ForceShareError, FormatError
from .format.header import has_magic
from .image import Image, backing_display_name
from .io import locking
from .io.storage import FileStorage, Storage
from .lazyimport import lazy_module
from .qcow2.create import (CreateError, PREALLOCATION_MODES, claim, create_data_file,
                           create_raw, qcow2_header, refuse_raw_options, write_fresh_qcow2)
from .qcow2.checkresult import CheckResult
from .qcow2.read import Qcow2Image
from .raw import RawImage

#: the writable driver (imported when an image is opened "r+")
writable_qcow2 = lazy_module("qcow2py.qcow2.image")
#: qemu-img check on a path (imported by the check command)
checking = lazy_module("qcow2py.qcow2.check")
#: cache modes other than the default (O_DIRECT, O_DSYNC, unsafe), imported when asked for
directio = lazy_module("qcow2py.io.directio")


def open_file_storage(path: str, writable: bool = False, cache: str = "writeback") -> Storage:
    """The storage of one file of a chain in qemu-img's cache mode ``cache``
    (the direct-I/O module is imported only when asked for: plain opens stay light)."""
    if cache == "writeback":
        return FileStorage(path, writable=writable)
    return directio.open_storage(path, writable, cache)


def probe_format(storage: Storage) -> str:
    """``"qcow2"`` if the storage starts with the qcow2 magic and a version other than
    0, else ``"raw"``.  QEMU probes qcow2 by the magic and a version >= 2 (version 1
    is its qcow driver, refused here as an unsupported version); bytes past the end
    of the file are zeros, so a file cut inside the version field is raw."""
    head = storage.pread(0, 8)
    return "qcow2" if has_magic(head) and int.from_bytes(head[4:8], "big") else "raw"


class OpenContext:
    """State shared while opening one chain: policy, depth and loop detection."""

    def __init__(self, policy: BackingPolicy, l2_cache_bytes: Optional[int],
                 writable: bool = False, lock: bool = True, storage_wrapper=None,
                 repair: bool = False, wrap_chain: bool = False, force_share: bool = False,
                 share_backing_write: bool = False, cache: str = "writeback"):
        self.policy = policy
        self.force_share = force_share          # QEMU's force-share: lock nothing out
        self.share_backing_write = share_backing_write   # backing files may change under us
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

    # the drivers call these two: the backing and data-file policy lives here
    def open_backing(self, parent: Image, name: str, fmt: Optional[str]) -> Image:
        """Open the backing file ``name`` of ``parent`` (read-only, through the policy)."""
        return open_backing(parent, name, fmt, self)

    def open_data_file(self, parent: Image, name: str) -> Tuple[Storage, str]:
        """Open the external data file ``name`` of ``parent``: (storage, resolved path).

        It is opened read-write when ``parent`` is the writable top image (guest
        data lives there, at host offset == guest offset), takes QEMU's data-file
        locks, and is refused when it is the image itself or a file already in
        the chain (guest writes would overwrite metadata)."""
        path = self.policy.resolve(name, parent.storage.name, what="data file")
        writable = self.writable and self.depth == 0
        try:
            storage: Storage = open_file_storage(path, writable, self.cache)
        except FileNotFoundError:
            raise BackingChainError(f"external data file {path!r} not found") from None
        try:
            self.add_to_chain(storage.fileno(), f"external data file {path!r} is the image "
                                                f"itself or a file already in its backing chain")
            if self.lock:
                locking.acquire(storage.fileno(), path,
                                self.perms("raw", writable, role=locking.DATA))
        except BaseException:
            storage.close()
            raise
        if self.wrap_chain and self.storage_wrapper is not None:
            storage = self.storage_wrapper(storage)
        return storage, path

    def perms(self, fmt: str, writable: bool, role: Optional[str] = None) -> locking.Perms:
        """The permissions one file of the chain being opened takes (see io.locking)."""
        if role is None:
            role = locking.TOP if self.depth == 0 else locking.BACKING
        return locking.file_perms(fmt, role, writable=writable, force_share=self.force_share,
                                  no_io=not self.chain and not writable,
                                  share_backing_write=self.share_backing_write)

    def add_to_chain(self, fd: int, loop_message: str) -> None:
        """Record the file ``fd`` as part of this chain; a file seen twice is a loop."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in self.seen:
            raise BackingChainError(loop_message)
        self.seen.add(key)


def open(path: str, mode: str = "r", *, format: Optional[str] = None,
         backing_policy: BackingPolicy = DEFAULT_POLICY,
         l2_cache_bytes: Optional[int] = None, lock: bool = True,
         storage_wrapper: Optional[Callable[[Storage], Storage]] = None,
         repair: bool = False, chain: bool = True, wrap_chain: bool = False,
         snapshot: Optional[str] = None, force_share: bool = False,
         share_backing_write: bool = False, cache: str = "writeback") -> Image:
    """Open an image file; the format is probed unless given.

    ``mode`` is "r" (read-only; the default) or "r+" (read-write).  Every file
    of the chain takes QEMU's permission locks as qemu-img/qemu-io take them
    (see :mod:`qcow2py.io.locking`), so an image a VM or qemu-nbd writes is
    refused with :class:`~qcow2py.errors.ImageLockedError`, and QEMU refuses
    what qcow2py uses; ``lock=False`` takes none.  ``force_share=True``
    (qemu-img ``-U``) opens read-only without keeping anybody from writing;
    with "r+" it raises :class:`~qcow2py.errors.ForceShareError`.
    ``share_backing_write`` lets the backing files change under this reader (a
    commit into them).  Backing and data files named inside the image are
    opened through ``backing_policy`` (backing files read-only; the data file
    read-write with "r+"); one that is the image itself or already in the
    chain is refused.  ``l2_cache_bytes`` bounds the memory of decoded L2
    tables (per image).  ``storage_wrapper`` wraps the top image's
    :class:`~qcow2py.io.storage.Storage` (to trace requests, journal writes for
    crash tests, or feed a disk model); with ``wrap_chain=True`` it wraps every
    file of the chain too (backing and external data files), e.g. with
    :meth:`TraceLog.wrap <qcow2py.io.wrappers.TraceLog.wrap>` to trace a whole
    chain in one log.  ``repair=True`` (with "r+") opens a corrupt or dirty
    image so that ``check(repair=...)`` can fix it.
    ``snapshot`` (id or name) reads that internal snapshot instead of the
    active state, read-only (``qemu-img convert -l snapshot.name=...``).
    ``cache`` is qemu-img's cache mode for every file of the chain:
    "writeback" (page cache; flush() is fsync), "none" (O_DIRECT, see
    :mod:`qcow2py.io.directio`), "directsync" (O_DIRECT + O_DSYNC),
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
    if force_share and mode != "r":
        raise ForceShareError()
    ctx = OpenContext(backing_policy, l2_cache_bytes, writable=mode == "r+", lock=lock,
                      storage_wrapper=storage_wrapper, repair=repair, wrap_chain=wrap_chain,
                      force_share=force_share, share_backing_write=share_backing_write,
                      cache=cache)
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
        storage = open_file_storage(path, writable, ctx.cache)
    except FileNotFoundError as e:
        if ctx.depth:
            raise BackingChainError(f"backing file {display_name!r} not found") from e
        raise
    try:
        fd = storage.fileno()
        ctx.add_to_chain(fd, f"backing chain loops back to {display_name!r}")
        if ctx.storage_wrapper is not None and (ctx.depth == 0 or ctx.wrap_chain):
            storage = ctx.storage_wrapper(storage)
        if fmt is None:
            fmt = probe_format(storage)
        if ctx.lock and fmt in ("qcow2", "raw"):
            # after the probe, as QEMU: the format decides which bytes are taken
            locking.acquire(fd, display_name, ctx.perms(fmt, writable))
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
           lock: bool = True, storage_wrapper=None, cache: str = "writeback") -> Image:
    """Create an image and return it opened "r+".

    Options and their checks follow ``qemu-img create -f qcow2 -o ...``.
    ``size`` may be omitted when a backing file gives it.  ``storage_wrapper``
    and ``cache`` (qemu-img's cache mode of the opened image, e.g. "none" for
    O_DIRECT) are passed to :func:`qcow2py.open`.
    """
    return _create(os.fspath(path), size, format, cluster_size, compat, refcount_bits,
                   extended_l2, lazy_refcounts, compression_type, backing_file,
                   backing_format, data_file, data_file_raw, preallocation, lock,
                   storage_wrapper, keep_open=True, cache=cache)


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
            data_file_raw, preallocation, lock, storage_wrapper, keep_open,
            cache="writeback"):
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
        img = open(path, "r+", format="raw", storage_wrapper=storage_wrapper, cache=cache)
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
    img = open(path, "r+", format="qcow2", lock=lock, storage_wrapper=storage_wrapper,
               cache=cache)
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
        # as qemu-img create: a backing file in use (a running VM) may be probed
        with open(path, format=fmt, force_share=True) as b:
            return b.format, b.size
    except FileNotFoundError:     # as from open(): the chain is incomplete
        raise BackingChainError(f"Could not open '{path}': No such file or "
                                f"directory") from None


def check_path(path: str, fmt: Optional[str] = None, repair: Optional[str] = None,
               lock: bool = True,
               backing_policy: BackingPolicy = DEFAULT_POLICY,
               force_share: bool = False) -> CheckResult:
    """``qemu-img check [-r leaks|all] path``: the file is opened leniently by
    :func:`qcow2py.qcow2.check.check_path`, and its backing chain through
    ``backing_policy``, since qemu-img check fails (exit 1) when it cannot open it."""

    def open_backing(name: str, backing_fmt: Optional[str], parent_path: str) -> None:
        resolved = backing_policy.resolve(name, parent_path)
        try:
            open(resolved, format=backing_fmt, backing_policy=backing_policy, lock=lock,
                 force_share=force_share).close()
        except FileNotFoundError:
            raise BackingChainError(f"Could not open backing file {resolved!r}") from None

    return checking.check_path(os.fspath(path), fmt, repair, lock, open_backing, force_share)
