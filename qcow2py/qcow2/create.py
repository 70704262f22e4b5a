"""Creating images with the layout and the option rules of ``qemu-img create``.

A new qcow2 image is laid out as QEMU lays it out: the header in cluster 0,
the refcount table in cluster 1, one refcount block in cluster 2, then the
L1 table.  Preallocation then allocates L2 tables and data clusters through
the normal allocator.

The writes that lay out the new file are not overlap-checked (:mod:`.overlap`):
the file holds nothing but what is being written, at fixed places.  Once the
image is open "r+" (preallocation), every metadata write goes through the
writer's checks like any other.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

from ..lazyimport import numpy as np

from ..errors import Qcow2Error
from ..format import refcount as rc
from ..format.header import (AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS,
                            INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2,
                            MAX_L1_BYTES, QEMU_FEATURE_TABLE, Header)
from ..io import locking
from ..io.storage import FileStorage
from .journal import Journal
from .refcounts import RefcountManager

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


class CreateError(Qcow2Error, ValueError):
    """Options that qemu-img create would refuse, with its reason."""


def _cluster_bits(cluster_size: int) -> int:
    if cluster_size < 512 or cluster_size > (2 << 20) or cluster_size & (cluster_size - 1):
        raise CreateError("Cluster size must be a power of two between 512 and 2048k")
    return cluster_size.bit_length() - 1


_QCOW2_ONLY = {"cluster_size": 65536, "compat": "1.1", "refcount_bits": 16,
               "extended_l2": False, "lazy_refcounts": False, "compression_type": "zlib",
               "data_file": None, "data_file_raw": False}


def refuse_raw_options(backing_file, backing_format, preallocation, **qcow2_options) -> None:
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


def claim(path: str) -> None:
    """Refuse to overwrite a file another process has open for writing, or does not
    let others write (a running VM, qemu-nbd, a qcow2py writer), as qemu-img create
    refuses: it would truncate the image under them."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        locking.lock_for_write(fd, path)
        locking.release(fd)
    finally:
        os.close(fd)


def qcow2_header(path, size, cluster_size, compat, refcount_bits, extended_l2,
                 lazy_refcounts, compression_type, backing_file, backing_format,
                 data_file, data_file_raw, preallocation,
                 probe_backing: Callable[[str, Optional[str]], Tuple[str, int]],
                 check_backing: bool = False) -> Header:
    """The header of a new image, with qemu-img create's checks in its order.
    ``probe_backing(path, format)`` gives the backing file's (format, size) when
    they are needed and not given (the opener's policy: the driver opens no file)."""
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
            probed_format, probed_size = probe_backing(bpath, backing_format)
            backing_format = backing_format or probed_format
            if size is None:
                size = probed_size
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


def write_fresh_qcow2(path: str, h: Header) -> None:
    """Header, refcount table, one refcount block and the L1 table, as QEMU lays them out."""
    cs = h.cluster_size
    st = FileStorage(path, writable=True, create=True)
    try:
        l1_bytes = h.l1_size * 8
        l1_clusters = -(-l1_bytes // cs)
        per_block = rc.entries_per_block(cs, h.refcount_order)
        used = 3 + l1_clusters
        journal = Journal(st, h)
        if used > per_block:
            # more than one refcount block: let the allocator lay out the rest
            return _write_large_fresh(journal, l1_clusters)
        h.l1_table_offset = 3 * cs if h.l1_size else 0
        _write_first_clusters(st, h, used)
        if l1_bytes:
            st.pwrite(bytes(l1_bytes), 3 * cs)
        journal.barrier()
    finally:
        st.close()


def _write_first_clusters(st: FileStorage, h: Header, used: int) -> None:
    """Header (cluster 0), refcount table (1) and its first block (2) counting
    the first ``used`` clusters."""
    cs = h.cluster_size
    counts = np.zeros(rc.entries_per_block(cs, h.refcount_order), dtype=np.uint64)
    counts[:used] = 1
    st.pwrite(h.encode(), 0)
    table = np.zeros(cs // 8, dtype=">u8")
    table[0] = 2 * cs
    st.pwrite(table.tobytes(), cs)
    st.pwrite(rc.encode_block(counts, h.refcount_order), 2 * cs)


def _write_large_fresh(journal: Journal, l1_clusters: int) -> None:
    st, h = journal.storage, journal.header
    h.l1_table_offset, l1_size = 0, h.l1_size
    h.l1_size = 0
    _write_first_clusters(st, h, 3)
    mgr = RefcountManager(journal)
    l1_off = mgr.allocate(l1_clusters)
    st.pwrite(bytes(l1_size * 8), l1_off)
    mgr.write_dirty_blocks()
    journal.barrier()
    mgr.write_reftable()
    journal.barrier()
    h.l1_size, h.l1_table_offset = l1_size, l1_off
    journal.write_header()


def create_data_file(path: str, size: int, preallocation: str) -> None:
    """The external data file of a new image: truncated to the guest size, like QEMU's
    (qemu-img create overwrites it), reserved with falloc/full preallocation."""
    st = FileStorage(path, writable=True, create=True)
    try:
        st.truncate(0)
        st.truncate(size)
        if preallocation in ("falloc", "full"):
            st.fallocate(0, size)
    finally:
        st.close()


def create_raw(path: str, size: Optional[int], preallocation: str) -> None:
    """A raw image of ``size`` bytes (whole sectors), preallocated as asked."""
    if size is None:
        raise CreateError("Image creation needs a size parameter")
    size = -(-int(size) // 512) * 512            # whole sectors, as qemu-img rounds
    st = FileStorage(path, writable=True, create=True)
    try:
        st.truncate(int(size))
        st.preallocate(0, int(size), preallocation)
        st.fsync()
    finally:
        st.close()
