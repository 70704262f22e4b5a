"""Creating images with the layout and the option rules of ``qemu-img create``.

A new qcow2 image is laid out as QEMU lays it out: the header in cluster 0,
the refcount table in cluster 1, one refcount block in cluster 2, then the
L1 table.  Preallocation then allocates L2 tables and data clusters through
the normal allocator.
"""

from __future__ import annotations

import os
from typing import Optional

from .lazyimport import numpy as np

from . import locking
from .errors import BackingChainError, FormatError, Qcow2Error
from .format import refcount as rc
from .format.header import (AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS,
                            INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2,
                            MAX_L1_BYTES, QEMU_FEATURE_TABLE, Header)
from .image import Image, open as open_image, probe_format
from .storage import FileStorage

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


class CreateError(Qcow2Error, ValueError):
    """Options that qemu-img create would refuse, with its reason."""


def _cluster_bits(cluster_size: int) -> int:
    if cluster_size < 512 or cluster_size > (2 << 20) or cluster_size & (cluster_size - 1):
        raise CreateError("Cluster size must be a power of two between 512 and 2048k")
    return cluster_size.bit_length() - 1


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
            data_file_raw, preallocation, lock, storage_wrapper, keep_open, cache="writeback"):
    if preallocation not in PREALLOCATION_MODES and format == "raw":
        raise CreateError(f"invalid parameter value: {preallocation}")
    if preallocation not in PREALLOCATION_MODES:
        raise CreateError(f"Parameter 'preallocation' does not accept value '{preallocation}'")
    if format == "raw":
        _refuse_raw_options(backing_file, backing_format, preallocation, cluster_size=cluster_size,
                            compat=compat, refcount_bits=refcount_bits, extended_l2=extended_l2,
                            lazy_refcounts=lazy_refcounts, compression_type=compression_type,
                            data_file=data_file, data_file_raw=data_file_raw)
        if lock:
            _claim(path)
        img = _create_raw(path, size, preallocation, storage_wrapper, cache)
        if not keep_open:
            img.close()
        return img
    if format != "qcow2":
        raise CreateError(f"Unknown format '{format}' (qcow2 or raw)")
    header = _qcow2_header(path, size, cluster_size, compat, refcount_bits, extended_l2,
                           lazy_refcounts, compression_type, backing_file, backing_format,
                           data_file, data_file_raw, preallocation, check_backing=keep_open)
    data_path = None
    if data_file is not None:
        data_path = data_file if os.path.isabs(data_file) else \
            os.path.join(os.path.dirname(path), data_file)
    if lock:
        _claim(path)
        if data_path is not None:
            _claim(data_path)
    _write_fresh_qcow2(path, header)
    if data_path is not None:
        with open(data_path, "wb") as f:          # qemu-img create overwrites it
            f.truncate(header.size)               # as long as the guest disk, like QEMU's
            if preallocation in ("falloc", "full"):
                os.posix_fallocate(f.fileno(), 0, header.size)
    if data_file_raw and preallocation == "off":
        preallocation = "metadata"        # a raw data file must stay a valid raw image
    if not keep_open and preallocation == "off":
        return None
    img = open_image(path, "r+", format="qcow2", lock=lock, storage_wrapper=storage_wrapper,
                     cache=cache)
    if preallocation != "off":
        try:
            _preallocate(img, preallocation)
        except BaseException:
            img.close()
            raise
    if not keep_open:
        img.close()
    return img


_QCOW2_ONLY = {"cluster_size": 65536, "compat": "1.1", "refcount_bits": 16,
               "extended_l2": False, "lazy_refcounts": False, "compression_type": "zlib",
               "data_file": None, "data_file_raw": False}


def _refuse_raw_options(backing_file, backing_format, preallocation, **qcow2_options) -> None:
    """A raw image has no backing file and no qcow2 options: refuse them as qemu-img
    create does, instead of writing a raw image without the layers under it."""
    if backing_file is not None:
        raise CreateError("Backing file not supported for file format 'raw'")
    if backing_format is not None:
        raise CreateError("Invalid parameter 'backing_fmt'")
    for key, value in qcow2_options.items():
        if value != _QCOW2_ONLY[key]:
            raise CreateError(f"Invalid parameter '{key}'")
    if preallocation == "metadata":
        raise CreateError("Unsupported preallocation mode: metadata")


def _claim(path: str) -> None:
    """Refuse to overwrite a file another process has open for writing, or does not
    let others write (a running VM, qemu-nbd, a qcow2py writer), as qemu-img create
    refuses: it would truncate the image under them."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        locking.lock_for_write(fd, path)
        locking.unlock(fd)
    finally:
        os.close(fd)


def _qcow2_header(path, size, cluster_size, compat, refcount_bits, extended_l2,
                  lazy_refcounts, compression_type, backing_file, backing_format,
                  data_file, data_file_raw, preallocation, check_backing=False) -> Header:
    bits = _cluster_bits(int(cluster_size))
    if compat in ("0.10", "v2"):
        version = 2
    elif compat in ("1.1", "v3"):
        version = 3
    else:
        raise CreateError(f"Parameter 'version' does not accept value '{compat}'")
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise CreateError("Refcount width must be a power of two and may not exceed 64 bits")
    if version == 2 and refcount_bits != 16:
        raise CreateError("Different refcount widths than 16 bits require compatibility "
                          "level 1.1 or above (use version=v3 or greater)")
    if lazy_refcounts and version == 2:
        raise CreateError("Lazy refcounts only supported with compatibility level 1.1 and above "
                          "(use version=v3 or greater)")
    if compression_type not in ("zlib", "zstd"):
        raise CreateError(f"Parameter 'compression-type' does not accept value "
                          f"'{compression_type}'")
    if compression_type == "zstd" and version == 2:
        raise CreateError("Non-zlib compression type is only supported with compatibility "
                          "level 1.1 and above (use version=v3 or greater)")
    if extended_l2:
        if version == 2:
            raise CreateError("Extended L2 entries are only supported with compatibility "
                              "level 1.1 and above (use version=v3 or greater)")
        if bits < 14:
            raise CreateError("Extended L2 entries are only supported with cluster sizes of "
                              "at least 16384 bytes")
    if data_file_raw and data_file is None:
        raise CreateError("data-file-raw requires data-file")
    if data_file is not None and version == 2:
        raise CreateError("External data files are only supported with compatibility level "
                          "1.1 and above (use version=v3 or greater)")
    if backing_format is not None and backing_file is None:
        raise CreateError("Backing format cannot be used without backing file")
    if backing_file is not None and data_file_raw:
        raise CreateError("Backing file and data-file-raw cannot be used at the same time")
    if backing_file is not None and preallocation != "off" and not extended_l2:
        raise CreateError("Backing file and preallocation can only be used at the same time "
                          "if extended_l2 is on")
    if backing_file is not None:
        if len(backing_file.encode()) > 1023:
            raise CreateError("Backing file name too long")
        bpath = backing_file if os.path.isabs(backing_file) else \
            os.path.join(os.path.dirname(path), backing_file)
        if backing_format is None or size is None or check_backing:
            try:
                with open_image(bpath, format=backing_format) as b:
                    backing_format = backing_format or b.format
                    if size is None:
                        size = b.size
            except FileNotFoundError:     # as from open(): the chain is incomplete
                raise BackingChainError(f"Could not open '{bpath}': No such file or "
                                        f"directory") from None
        if backing_format not in ("qcow2", "raw"):
            raise CreateError(f"Unknown backing file format '{backing_format}'")
    if size is None:
        raise CreateError("Image creation needs a size parameter")
    size = int(size)
    if size < 0:
        raise CreateError("Image size must be non-negative")
    if size % 512:
        size += 512 - size % 512          # qemu-img rounds up to whole sectors
    cs = 1 << bits
    l2_entries = cs // (16 if extended_l2 else 8)
    l1_size = -(-size // (cs * l2_entries))
    if l1_size * 8 > MAX_L1_BYTES:
        raise CreateError("The image size is too large for file format 'qcow2' (try using a "
                          "larger cluster size)")
    h = Header(version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=bits,
               size=size, crypt_method=0, l1_size=0, l1_table_offset=0,
               refcount_table_offset=cs, refcount_table_clusters=1, nb_snapshots=0,
               snapshots_offset=0, refcount_order=refcount_bits.bit_length() - 1)
    if version == 3:
        h.header_length = 112
        if extended_l2:
            h.incompatible_features |= INCOMPAT_EXTL2
        if compression_type == "zstd":
            h.incompatible_features |= INCOMPAT_COMPRESSION
            h.compression_type = 1
        if lazy_refcounts:
            h.compatible_features |= COMPAT_LAZY_REFCOUNTS
        if data_file is not None:
            h.incompatible_features |= INCOMPAT_DATA_FILE
            h.data_file = data_file
            if data_file_raw:
                h.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW
        if cs > 4096:
            h.feature_table = list(QEMU_FEATURE_TABLE)
            h.has_feature_table = True
    h.backing_file = backing_file
    h.backing_format = backing_format if backing_file is not None else None
    h.l1_size = l1_size
    return h


def _write_fresh_qcow2(path: str, h: Header) -> None:
    """Header, refcount table, one refcount block and the L1 table, as QEMU lays them out."""
    cs = h.cluster_size
    st = FileStorage(path, writable=True, create=True)
    try:
        l1_bytes = h.l1_size * 8
        l1_clusters = -(-l1_bytes // cs)
        per_block = rc.entries_per_block(cs, h.refcount_order)
        used = 3 + l1_clusters
        if used > per_block:
            # more than one refcount block: let the allocator lay out the rest
            return _write_large_fresh(st, h, l1_clusters)
        h.l1_table_offset = 3 * cs if h.l1_size else 0
        counts = np.zeros(per_block, dtype=np.uint64)
        counts[:used] = 1
        st.pwrite(h.encode(), 0)
        table = np.zeros(cs // 8, dtype=">u8")
        table[0] = 2 * cs
        st.pwrite(table.tobytes(), cs)
        st.pwrite(rc.encode_block(counts, h.refcount_order), 2 * cs)
        if l1_bytes:
            st.pwrite(bytes(l1_bytes), 3 * cs)
        st.fsync()
    finally:
        st.close()


def _write_large_fresh(st: FileStorage, h: Header, l1_clusters: int) -> None:
    from .refcounts import RefcountManager
    cs = h.cluster_size
    per_block = rc.entries_per_block(cs, h.refcount_order)
    counts = np.zeros(per_block, dtype=np.uint64)
    counts[:3] = 1
    h.l1_table_offset, l1_size = 0, h.l1_size
    h.l1_size = 0
    st.pwrite(h.encode(), 0)
    table = np.zeros(cs // 8, dtype=">u8")
    table[0] = 2 * cs
    st.pwrite(table.tobytes(), cs)
    st.pwrite(rc.encode_block(counts, h.refcount_order), 2 * cs)
    mgr = RefcountManager(st, h)
    l1_off = mgr.allocate(l1_clusters)
    st.pwrite(bytes(l1_size * 8), l1_off)
    mgr.write_dirty_blocks()
    st.fsync()
    mgr.write_reftable()
    st.fsync()
    h.l1_size, h.l1_table_offset = l1_size, l1_off
    st.pwrite(h.encode(), 0)
    st.fsync()


def _preallocate(img, mode: str) -> None:
    """Allocate every L2 table and data cluster, as QEMU's preallocation does.

    "metadata" allocates each L2 table followed by its data clusters; "falloc"
    and "full" allocate the L2 tables first and then one contiguous data area
    (which they also reserve or zero-fill).  With a raw external data file the
    guest offset *is* the host offset, and nothing is refcounted.
    """
    cs = img.cluster_size
    size = img.size
    # extended L2 entries are (entry, subcluster bitmap) pairs: preallocated clusters
    # get bitmap 0, as QEMU leaves them
    step = 2 if img.extended_l2 else 1
    span = cs * (cs // (8 * step))
    copied = np.uint64(1) << np.uint64(63)
    raw_data = img.header.has_data_file
    with img._lock:
        tables = []
        for l1i in range(img.header.l1_size):
            start = l1i * span
            n = -(-min(span, size - start) // cs)
            l2 = img._writable_l2(l1i)
            if raw_data:
                hosts = np.uint64(start) + np.arange(n, dtype=np.uint64) * np.uint64(cs)
                l2[:n * step:step] = hosts | copied
                img._touch_l2(l1i)
            elif mode == "metadata":
                host = img._allocate(n)
                l2[:n * step:step] = (np.uint64(host) + np.arange(n, dtype=np.uint64) *
                                      np.uint64(cs)) | copied
                img._touch_l2(l1i)
            else:
                tables.append((l1i, l2, n))
        if tables:
            total = sum(n for _, _, n in tables)
            host = img._allocate(total)
            end = host + total * cs
            pos = host
            for l1i, l2, n in tables:
                l2[:n * step:step] = (np.uint64(pos) + np.arange(n, dtype=np.uint64) *
                                      np.uint64(cs)) | copied
                img._touch_l2(l1i)
                pos += n * cs
            if mode == "full":
                zero = bytes(min(total * cs, 1 << 20))
                for p in range(host, end, len(zero)):
                    img.storage.pwrite(zero[:min(len(zero), end - p)], p)
            else:
                os.posix_fallocate(img.storage.fileno(), host, end - host)
        elif not raw_data:
            # metadata preallocation: the file covers the data area (sparse)
            end = img._file_size
            if img.storage.size() < end:
                img.storage.truncate(end)
        img._flush_metadata()


def _create_raw(path: str, size: Optional[int], preallocation: str,
                storage_wrapper=None, cache: str = "writeback") -> Image:
    if size is None:
        raise CreateError("Image creation needs a size parameter")
    size = -(-int(size) // 512) * 512            # whole sectors, as qemu-img rounds
    st = FileStorage(path, writable=True, create=True)
    try:
        st.truncate(int(size))
        if preallocation == "falloc":
            os.posix_fallocate(st.fileno(), 0, int(size))
        elif preallocation == "full":
            zero = bytes(1 << 20)
            for pos in range(0, int(size), len(zero)):
                st.pwrite(zero[:min(len(zero), int(size) - pos)], pos)
        st.fsync()
    finally:
        st.close()
    return open_image(path, "r+", format="raw", storage_wrapper=storage_wrapper, cache=cache)
