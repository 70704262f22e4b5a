"""The native hot path and its pure-Python twins.

Each public function here has two implementations with one contract: a C
function in ``csrc/`` (through the cffi module ``qcow2py._native``, which
releases the GIL) and a numpy/Python twin that documents the contract, is
compared with the C one in tests, and runs where no compiler was available.
``QCOW2PY_PURE=1`` forces the twins.
"""

from __future__ import annotations

import os
from typing import Tuple

import numpy as np

from .errors import CorruptImageError

# Unit kinds (one unit = a guest cluster, or a subcluster with extended L2).
UNALLOCATED = 0        # read through to the backing file
ZERO = 1               # reads as zeros, no host cluster
ZERO_ALLOC = 2         # reads as zeros, host cluster preallocated
DATA = 3               # data at the host offset
COMPRESSED = 4         # compressed cluster; host offset is a byte offset
UNALLOCATED_ALLOC = 5  # extended L2: unallocated subcluster of an allocated cluster

_L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_L2E_STD_RESERVED_MASK = 0x3F000000000001FE
_COPIED = 1 << 63
_COMPRESSED = 1 << 62

_ERRORS = {
    -2: "reserved bits set",
    -3: "host offset not cluster aligned",
    -4: "invalid subcluster allocation bitmap",
}

_ffi = _lib = None
if not os.environ.get("QCOW2PY_PURE"):
    try:  # pragma: no cover - depends on the build
        from ._native import ffi as _ffi, lib as _lib
    except ImportError:
        _ffi = _lib = None

#: True when the C module is loaded and in use.
HAVE_NATIVE = _lib is not None


# ---------------------------------------------------------------- is_zero
def is_zero_pure(buf) -> bool:
    """True if every byte of ``buf`` is zero."""
    mv = memoryview(buf).cast("B")
    return not np.frombuffer(mv, dtype=np.uint8).any()


def is_zero_native(buf) -> bool:
    mv = memoryview(buf).cast("B")
    if len(mv) == 0:
        return True
    return bool(_lib.qp_is_zero(_ffi.from_buffer(mv), len(mv)))


# ---------------------------------------------------------------- decode_l2
def _l2_error(code: int, index: int, table: bytes, extended: bool) -> CorruptImageError:
    size = 16 if extended else 8
    raw = table[index * size:(index + 1) * size].hex() if index >= 0 else ""
    what = _ERRORS.get(code, "invalid arguments")
    return CorruptImageError(f"L2 entry {index} ({raw}): {what}")


def decode_l2_pure(table, cluster_bits: int, extended: bool = False,
                   external_data: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Decode one L2 table into per-unit ``(kinds uint8, hosts int64)``.

    A unit is a cluster, or one of the 32 subclusters of a cluster with
    extended L2.  ``hosts`` is the host offset of the unit's data (for
    compressed units, the byte offset of the compressed stream; 0 where there
    is no host cluster).  Raises :class:`CorruptImageError` naming the first
    bad entry (reserved bits, unaligned offset, invalid subcluster bitmap).
    """
    if not 9 <= cluster_bits <= 21:
        raise ValueError("cluster_bits out of range")
    raw = np.frombuffer(memoryview(table).cast("B"), dtype=">u8").astype(np.uint64)
    if extended:
        if raw.size % 2:
            raise ValueError("extended L2 table length must be a multiple of 16")
        entries, bitmaps = raw[0::2], raw[1::2]
    else:
        entries, bitmaps = raw, None
    n = entries.size
    compressed = (entries & np.uint64(_COMPRESSED)) != 0
    copied = (entries & np.uint64(_COPIED)) != 0
    off = entries & np.uint64(_L2E_OFFSET_MASK)
    allocated = (off != 0) | (copied & bool(external_data))

    bad = [(-2, compressed & copied)]
    if extended:
        bad.append((-4, compressed & (bitmaps != 0)))
    std = ~compressed
    bad.append((-2, std & ((entries & np.uint64(_L2E_STD_RESERVED_MASK)) != 0)))
    bad.append((-3, std & ((off & np.uint64((1 << cluster_bits) - 1)) != 0)))
    if extended:
        alloc = bitmaps & np.uint64(0xFFFFFFFF)
        zero = bitmaps >> np.uint64(32)
        bad.append((-4, std & (((alloc & zero) != 0) | (~allocated & (alloc != 0)))))
    first = None
    for code, mask in bad:
        idx = np.flatnonzero(mask)
        if idx.size and (first is None or idx[0] < first[1]):
            first = (code, int(idx[0]))
    if first is not None:
        raise _l2_error(first[0], first[1], bytes(memoryview(table).cast("B")), extended)

    csize_shift = 62 - (cluster_bits - 8)
    coff = (entries & np.uint64((1 << csize_shift) - 1)).astype(np.int64)
    off = off.astype(np.int64)
    if not extended:
        zero_flag = (entries & np.uint64(1)) != 0
        kinds = np.full(n, UNALLOCATED, dtype=np.uint8)
        kinds[allocated] = DATA
        kinds[zero_flag & allocated] = ZERO_ALLOC
        kinds[zero_flag & ~allocated] = ZERO
        kinds[compressed] = COMPRESSED
        hosts = np.where(allocated, off, 0)
        hosts = np.where(compressed, coff, np.where(kinds == ZERO, 0, hosts))
        return kinds, hosts.astype(np.int64)

    shifts = np.arange(32, dtype=np.uint64)
    alloc_bits = ((bitmaps[:, None] >> shifts) & np.uint64(1)) != 0
    zero_bits = ((bitmaps[:, None] >> (shifts + np.uint64(32))) & np.uint64(1)) != 0
    a = allocated[:, None]
    kinds = np.where(a, UNALLOCATED_ALLOC, UNALLOCATED).astype(np.uint8)
    kinds = np.where(alloc_bits, DATA, kinds)
    kinds = np.where(zero_bits, np.where(a, ZERO_ALLOC, ZERO), kinds).astype(np.uint8)
    kinds[compressed] = COMPRESSED
    sub = np.int64(1 << (cluster_bits - 5))
    hosts = np.where(a, off[:, None] + np.arange(32, dtype=np.int64) * sub, 0)
    hosts = np.where((kinds == ZERO) | (kinds == UNALLOCATED), 0, hosts)
    hosts[compressed] = coff[compressed][:, None]
    return kinds.reshape(-1), hosts.reshape(-1).astype(np.int64)


def decode_l2_native(table, cluster_bits: int, extended: bool = False,
                     external_data: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    mv = memoryview(table).cast("B")
    entry = 16 if extended else 8
    n_units = (len(mv) // entry) * (32 if extended else 1)
    kinds = np.empty(n_units, dtype=np.uint8)
    hosts = np.empty(n_units, dtype=np.int64)
    bad = _ffi.new("int64_t *")
    rc = _lib.qp_decode_l2(_ffi.from_buffer(mv), len(mv), cluster_bits, int(extended),
                           int(external_data), _ffi.from_buffer(kinds),
                           _ffi.from_buffer("int64_t[]", hosts), n_units, bad)
    if rc == -1:
        raise ValueError("invalid arguments to decode_l2")
    if rc != 0:
        raise _l2_error(rc, int(bad[0]), bytes(mv), extended)
    return kinds, hosts


# ---------------------------------------------------------------- pread_runs
def _runs_args(buf, buf_offsets, host_offsets, lengths):
    arrs = [np.ascontiguousarray(a, dtype=np.int64) for a in (buf_offsets, host_offsets, lengths)]
    if not (arrs[0].shape == arrs[1].shape == arrs[2].shape) or arrs[0].ndim != 1:
        raise ValueError("run arrays must be 1-D and the same length")
    return arrs


def pread_runs_pure(fd: int, buf, buf_offsets, host_offsets, lengths) -> None:
    """Scatter-read runs of ``fd`` into ``buf`` (see ``Storage.read_runs``)."""
    b, h, n = _runs_args(buf, buf_offsets, host_offsets, lengths)
    mv = memoryview(buf).cast("B")
    if ((b < 0) | (h < 0) | (n < 0) | (b + n > len(mv))).any():
        raise ValueError("run does not fit the buffer")
    for bo, ho, ln in zip(b.tolist(), h.tolist(), n.tolist()):
        done = 0
        while done < ln:
            got = os.preadv(fd, [mv[bo + done:bo + ln]], ho + done)
            if got == 0:
                mv[bo + done:bo + ln] = bytes(ln - done)
                break
            done += got


def pread_runs_native(fd: int, buf, buf_offsets, host_offsets, lengths) -> None:
    b, h, n = _runs_args(buf, buf_offsets, host_offsets, lengths)
    mv = memoryview(buf).cast("B")
    rc = _lib.qp_pread_runs(fd, _ffi.from_buffer(mv, require_writable=True), len(mv),
                            _ffi.from_buffer("int64_t[]", b), _ffi.from_buffer("int64_t[]", h),
                            _ffi.from_buffer("int64_t[]", n), len(b))
    if rc == -22:
        raise ValueError("run does not fit the buffer")
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))


# ---------------------------------------------------------------- copy_extents
def copy_extents_generic(n, read_into, write, src_off, dst_off, lengths, buf_len: int,
                         zero_chunk: int, write_zeroes: bool, mark_base: int = 0,
                         mark_shift: int = 0, mark=None, stats=None):
    """The contract of ``qp_copy_extents`` over any reader/writer callables.

    ``read_into(i, view, offset)`` fills ``view`` from the source of extent
    ``i`` (zeros past its end); ``write(data, offset)`` writes the target.
    Returns ``stats`` = [bytes read, bytes written, zero bytes, read requests].
    """
    stats = stats if stats is not None else [0, 0, 0, 0]
    buf = bytearray(buf_len)
    mv = memoryview(buf)
    zeros = bytes(min(zero_chunk, 1 << 16)) if zero_chunk > 0 else b""

    def mark_range(a: int, b: int) -> None:
        if mark is None or b <= a or a < mark_base:
            return
        for u in range((a - mark_base) >> mark_shift, ((b - 1 - mark_base) >> mark_shift) + 1):
            if u // 8 < len(mark):
                mark[u // 8] |= 1 << (u % 8)

    for i in range(n):
        total, so, do = int(lengths[i]), int(src_off[i]), int(dst_off[i])
        done = 0
        while done < total:
            piece = min(total - done, buf_len)
            view = mv[:piece]
            read_into(i, view, so + done)
            stats[0] += piece
            stats[3] += 1
            dst = do + done
            if zero_chunk <= 0:
                write(view, dst)
                stats[1] += piece
                mark_range(dst, dst + piece)
            else:
                pos, run = 0, None
                while pos < piece:
                    clen = min(zero_chunk - (dst + pos) % zero_chunk, piece - pos)
                    z = is_zero(view[pos:pos + clen])
                    if not z and run is None:
                        run = pos
                    elif z and run is not None:
                        write(view[run:pos], dst + run)
                        stats[1] += pos - run
                        mark_range(dst + run, dst + pos)
                        run = None
                    if z:
                        if write_zeroes:
                            for off in range(0, clen, len(zeros)):
                                write(zeros[:min(len(zeros), clen - off)], dst + pos + off)
                        stats[2] += clen
                    pos += clen
                if run is not None:
                    write(view[run:piece], dst + run)
                    stats[1] += piece - run
                    mark_range(dst + run, dst + piece)
            done += piece
    return stats


def copy_extents_pure(src_fds, src_off, dst_off, lengths, dst_fd: int, buf_len: int,
                      zero_chunk: int = 0, write_zeroes: bool = False, mark_base: int = 0,
                      mark_shift: int = 0, mark=None):
    """fd-based twin of :func:`copy_extents_native` (same contract)."""
    def read_into(i, view, off):
        done = 0
        while done < len(view):
            got = os.preadv(int(src_fds[i]), [view[done:]], off + done)
            if got == 0:
                view[done:] = bytes(len(view) - done)
                break
            done += got

    def write(data, off):
        data = memoryview(data)
        done = 0
        while done < len(data):
            done += os.pwrite(dst_fd, data[done:], off + done)

    return copy_extents_generic(len(lengths), read_into, write, src_off, dst_off, lengths,
                                buf_len, zero_chunk, write_zeroes, mark_base, mark_shift, mark)


def copy_extents_native(src_fds, src_off, dst_off, lengths, dst_fd: int, buf_len: int,
                        zero_chunk: int = 0, write_zeroes: bool = False, mark_base: int = 0,
                        mark_shift: int = 0, mark=None):
    """Copy extents in C with the GIL released; returns [read, written, zero, requests]."""
    fds = np.ascontiguousarray(src_fds, dtype=np.int32)
    so, do, ln = (np.ascontiguousarray(a, dtype=np.int64) for a in (src_off, dst_off, lengths))
    if not (fds.size == so.size == do.size == ln.size):
        raise ValueError("extent arrays must have the same length")
    buf = np.empty(buf_len, dtype=np.uint8)
    stats = np.zeros(4, dtype=np.int64)
    mark_ptr = _ffi.from_buffer(mark) if mark is not None else _ffi.NULL
    rc = _lib.qp_copy_extents(fds.size, _ffi.from_buffer("int32_t[]", fds),
                              _ffi.from_buffer("int64_t[]", so), _ffi.from_buffer("int64_t[]", do),
                              _ffi.from_buffer("int64_t[]", ln), dst_fd, _ffi.from_buffer(buf),
                              buf_len, zero_chunk, int(write_zeroes), mark_base, mark_shift,
                              mark_ptr, len(mark) if mark is not None else 0,
                              _ffi.from_buffer("int64_t[]", stats))
    if rc == -22:
        raise ValueError("invalid arguments to copy_extents")
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return stats.tolist()


if HAVE_NATIVE:
    is_zero = is_zero_native
    decode_l2 = decode_l2_native
    pread_runs = pread_runs_native
    copy_extents = copy_extents_native
else:
    is_zero = is_zero_pure
    decode_l2 = decode_l2_pure
    pread_runs = pread_runs_pure
    copy_extents = copy_extents_pure
