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

from .lazyimport import numpy as np

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
if True:
    try:  # pragma: no cover - depends on the build
        from ._native import ffi as _ffi, lib as _lib
    except ImportError:
        _ffi = _lib = None

#: True when the C module is loaded and in use.
#: True when the C module is built (the twin tests compare it with the pure code).
HAVE_NATIVE = _lib is not None
#: True when the package uses it (``QCOW2PY_PURE=1`` forces the pure twins).
USE_NATIVE = HAVE_NATIVE and not os.environ.get("QCOW2PY_PURE")


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


# ---------------------------------------------------------------- write_batch
def write_batch_generic(writev, buf_off, dst_off, lengths, write_order, buf, zero_chunk: int,
                        write_zeroes: bool, mark_base: int = 0, mark_shift: int = 0, mark=None,
                        stats=None):
    """The contract of ``qp_write_batch`` over a ``writev(views, offset)`` callable
    (for targets without a file descriptor, and as the pure twin)."""
    stats = stats if stats is not None else [0, 0, 0, 0]
    mv = memoryview(buf).cast("B")
    pos_of = np.asarray(buf_off, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if pos_of.size and (((pos_of < 0) | (lengths < 0)).any()
                        or int((pos_of + lengths).max()) > len(mv)):
        raise ValueError("piece does not fit the buffer")
    pending, p_start, p_end = [], 0, 0

    def add(view, dst):
        nonlocal pending, p_start, p_end
        if not len(view):
            return
        if pending and dst != p_end:
            writev(pending, p_start)
            pending = []
        if not pending:
            p_start = dst
        pending.append(view)
        p_end = dst + len(view)

    def mark_range(a, b):
        if mark is None or b <= a or a < mark_base:
            return
        for u in range((a - mark_base) >> mark_shift, ((b - 1 - mark_base) >> mark_shift) + 1):
            if u // 8 < len(mark):
                mark[u // 8] |= 1 << (u % 8)

    zeros = bytes(min(max(zero_chunk, 1), 1 << 16))
    for e in np.asarray(write_order, dtype=np.int64).tolist():
        p, L, dst = int(pos_of[e]), int(lengths[e]), int(dst_off[e])
        data = mv[p:p + L]
        if zero_chunk <= 0:
            add(data, dst)
            stats[1] += L
            mark_range(dst, dst + L)
            continue
        q = 0
        while q < L:
            clen = min(zero_chunk - (dst + q) % zero_chunk, L - q)
            chunk = data[q:q + clen]
            if is_zero(chunk):
                if write_zeroes:
                    for o in range(0, clen, len(zeros)):
                        add(memoryview(zeros)[:min(len(zeros), clen - o)], dst + q + o)
                stats[2] += clen
            else:
                add(chunk, dst + q)
                stats[1] += clen
                mark_range(dst + q, dst + q + clen)
            q += clen
    if pending:
        writev(pending, p_start)
    return stats


def _fd_writev(fd: int):
    def writev(views, off):
        data = b"".join(bytes(v) for v in views)
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], off + done)
    return writev


def write_batch_pure(buf_off, dst_off, lengths, write_order, dst_fd: int, buf,
                     zero_chunk: int = 0, write_zeroes: bool = False, mark_base: int = 0,
                     mark_shift: int = 0, mark=None):
    """fd-based twin of :func:`write_batch_native`."""
    return write_batch_generic(_fd_writev(dst_fd), buf_off, dst_off, lengths, write_order, buf,
                               zero_chunk, write_zeroes, mark_base, mark_shift, mark)


def write_batch_native(buf_off, dst_off, lengths, write_order, dst_fd: int, buf,
                       zero_chunk: int = 0, write_zeroes: bool = False, mark_base: int = 0,
                       mark_shift: int = 0, mark=None):
    """Write pieces of ``buf`` in C (GIL released); returns [0, written, zero, 0]."""
    bo, do, ln, wo = (np.ascontiguousarray(a, dtype=np.int64)
                      for a in (buf_off, dst_off, lengths, write_order))
    if not (bo.size == do.size == ln.size == wo.size):
        raise ValueError("piece arrays must have the same length")
    stats = np.zeros(4, dtype=np.int64)
    mv = memoryview(buf).cast("B")
    mark_ptr = _ffi.from_buffer(mark) if mark is not None else _ffi.NULL
    rc = _lib.qp_write_batch(bo.size, _ffi.from_buffer("int64_t[]", bo),
                             _ffi.from_buffer("int64_t[]", do), _ffi.from_buffer("int64_t[]", ln),
                             _ffi.from_buffer("int64_t[]", wo), dst_fd, _ffi.from_buffer(mv),
                             len(mv), zero_chunk, int(write_zeroes), mark_base, mark_shift,
                             mark_ptr, len(mark) if mark is not None else 0,
                             _ffi.from_buffer("int64_t[]", stats))
    if rc == -22:
        raise ValueError("invalid arguments to write_batch")
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return stats.tolist()


if USE_NATIVE:
    is_zero = is_zero_native
    decode_l2 = decode_l2_native
    pread_runs = pread_runs_native
    write_batch = write_batch_native
else:
    is_zero = is_zero_pure
    decode_l2 = decode_l2_pure
    pread_runs = pread_runs_pure
    write_batch = write_batch_pure


# ---------------------------------------------------------------- bitmaps
# Bit i of a bitmap is bit (i % 8) of byte i // 8 (LSB-first, as qcow2 stores
# bitmaps and as ``bitarray(endian="little")`` keeps them).  Every function
# takes the bitmap as a bitarray (little-endian; its length is the number of
# bits) or as any bytes-like object with ``nbits`` (default: 8 bits a byte).

BITMAP_OPS = {"and": 0, "or": 1, "andnot": 2}


def _bitbuf(bits, nbits=None):
    """(memoryview of the bytes, number of bits) of a bitmap argument."""
    endian = getattr(bits, "endian", None)
    if endian is not None:
        e = endian() if callable(endian) else endian
        if e != "little":
            raise ValueError("bitmaps must be bitarrays with endian='little'")
        n = len(bits)
        mv = memoryview(bits).cast("B") if n else memoryview(b"")
    else:
        mv = memoryview(bits).cast("B")
        n = len(mv) * 8
    if nbits is not None:
        if nbits < 0 or (nbits + 7) // 8 > len(mv):
            raise ValueError(f"{nbits} bits do not fit a bitmap of {len(mv)} bytes")
        n = nbits
    return mv, n


def _unpacked(bits, nbits=None) -> np.ndarray:
    mv, n = _bitbuf(bits, nbits)
    return np.unpackbits(np.frombuffer(mv, dtype=np.uint8), bitorder="little")[:n]


def _clip(n: int, start: int, end) -> Tuple[int, int]:
    end = n if end is None else min(end, n)
    return max(start, 0), end


def bitmap_count_pure(bits, start: int = 0, end=None, nbits=None) -> int:
    """Number of set bits in ``[start, end)``."""
    u = _unpacked(bits, nbits)
    a, b = _clip(u.size, start, end)
    return int(np.count_nonzero(u[a:b])) if a < b else 0


def bitmap_count_native(bits, start: int = 0, end=None, nbits=None) -> int:
    mv, n = _bitbuf(bits, nbits)
    a, b = _clip(n, start, end)
    if a >= b:
        return 0
    return int(_lib.qp_bitmap_count(_ffi.from_buffer(mv), n, a, b))


def bitmap_next_pure(bits, start: int = 0, value: bool = True, end=None, nbits=None) -> int:
    """First bit index in ``[start, end)`` equal to ``value``, or -1."""
    u = _unpacked(bits, nbits)
    a, b = _clip(u.size, start, end)
    if a >= b:
        return -1
    hit = np.flatnonzero(u[a:b] == (1 if value else 0))
    return a + int(hit[0]) if hit.size else -1


def bitmap_next_native(bits, start: int = 0, value: bool = True, end=None, nbits=None) -> int:
    mv, n = _bitbuf(bits, nbits)
    a, b = _clip(n, start, end)
    if a >= b:
        return -1
    return int(_lib.qp_bitmap_next(_ffi.from_buffer(mv), n, a, b, 1 if value else 0))


def bitmap_runs_pure(bits, start: int = 0, end=None, nbits=None) -> Tuple[np.ndarray, np.ndarray]:
    """Merged runs of set bits in ``[start, end)``: int64 arrays ``(starts, lengths)``
    in bits (runs cut by the range are clipped to it)."""
    u = _unpacked(bits, nbits)
    a, b = _clip(u.size, start, end)
    if a >= b:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy()
    edges = np.flatnonzero(np.diff(np.concatenate(([0], u[a:b].astype(np.int8), [0]))))
    return (edges[0::2] + a).astype(np.int64), (edges[1::2] - edges[0::2]).astype(np.int64)


def bitmap_runs_native(bits, start: int = 0, end=None,
                       nbits=None) -> Tuple[np.ndarray, np.ndarray]:
    mv, n = _bitbuf(bits, nbits)
    a, b = _clip(n, start, end)
    if a >= b:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy()
    shift = 0
    if not mv.readonly:
        # the count and fill passes must see the same bits, even if another thread
        # sets some meanwhile: scan a private copy of the bytes of the range
        first, last = a // 8, -(-b // 8)
        mv = memoryview(bytes(mv[first:last]))
        shift = first * 8
        n, a, b = min(n, last * 8) - shift, a - shift, b - shift
    buf = _ffi.from_buffer(mv)
    count = int(_lib.qp_bitmap_runs(buf, n, a, b, _ffi.NULL, _ffi.NULL, 0))
    starts = np.empty(count, dtype=np.int64)
    lens = np.empty(count, dtype=np.int64)
    if count:
        got = _lib.qp_bitmap_runs(buf, n, a, b, _ffi.from_buffer("int64_t[]", starts),
                                  _ffi.from_buffer("int64_t[]", lens), count)
        if got != count:
            raise RuntimeError("bitmap changed during a scan of a private copy")
        if shift:
            starts += shift
    return starts, lens


def bitmap_op_pure(a, b, op: str, out=None):
    """Byte-wise ``a OP b`` (op "and", "or" or "andnot" = a & ~b) over equal-length
    buffers; the result goes to ``out`` (may be ``a``) or a new bytearray."""
    if op not in BITMAP_OPS:
        raise ValueError(f"unknown bitmap op {op!r}")
    x = np.frombuffer(memoryview(a).cast("B"), dtype=np.uint8)
    y = np.frombuffer(memoryview(b).cast("B"), dtype=np.uint8)
    if x.size != y.size:
        raise ValueError("bitmaps differ in size")
    r = x & y if op == "and" else (x | y if op == "or" else x & ~y)
    if out is None:
        out = bytearray(x.size)
    mv = memoryview(out).cast("B")
    if len(mv) != x.size:
        raise ValueError("output differs in size")
    mv[:] = r.tobytes()
    return out


def bitmap_op_native(a, b, op: str, out=None):
    if op not in BITMAP_OPS:
        raise ValueError(f"unknown bitmap op {op!r}")
    ma, mb = memoryview(a).cast("B"), memoryview(b).cast("B")
    if len(ma) != len(mb):
        raise ValueError("bitmaps differ in size")
    if out is None:
        out = bytearray(len(ma))
    mo = memoryview(out).cast("B")
    if len(mo) != len(ma):
        raise ValueError("output differs in size")
    if len(ma):
        _lib.qp_bitmap_op(_ffi.from_buffer(ma), _ffi.from_buffer(mb),
                          _ffi.from_buffer(mo, require_writable=True), len(ma), BITMAP_OPS[op])
    return out


def _mask_args(guest, length, granularity):
    g = np.ascontiguousarray(guest, dtype=np.int64)
    n = np.ascontiguousarray(length, dtype=np.int64)
    if g.shape != n.shape or g.ndim != 1:
        raise ValueError("extent arrays must be 1-D and the same length")
    if granularity < 1 or (g < 0).any() or (n < 0).any():
        raise ValueError("invalid arguments to bitmap_mask_extents")
    return g, n


def bitmap_mask_extents_pure(guest, length, bits, granularity: int, nbits=None):
    """The parts of extents (guest offsets, lengths in bytes) under set bits of a
    bitmap of ``granularity``-byte units: arrays ``(guest, length, index)``, in
    order, ``index`` naming the extent each piece comes from."""
    g, n = _mask_args(guest, length, granularity)
    u = _unpacked(bits, nbits)
    og, ol, oi = [], [], []
    for i, (a, ln) in enumerate(zip(g.tolist(), n.tolist())):
        if ln == 0:
            continue
        b0, b1 = a // granularity, min((a + ln - 1) // granularity + 1, u.size)
        if b0 >= b1:
            continue
        edges = np.flatnonzero(np.diff(np.concatenate(([0], u[b0:b1].astype(np.int8), [0]))))
        for s, e in zip((edges[0::2] + b0).tolist(), (edges[1::2] + b0).tolist()):
            lo, hi = max(a, s * granularity), min(a + ln, e * granularity)
            og.append(lo)
            ol.append(hi - lo)
            oi.append(i)
    return (np.array(og, dtype=np.int64), np.array(ol, dtype=np.int64),
            np.array(oi, dtype=np.int64))


def bitmap_mask_extents_native(guest, length, bits, granularity: int, nbits=None):
    g, n = _mask_args(guest, length, granularity)
    mv, nb = _bitbuf(bits, nbits)
    buf = _ffi.from_buffer(mv) if len(mv) else _ffi.new("uint8_t[1]")
    gp, np_ = _ffi.from_buffer("int64_t[]", g), _ffi.from_buffer("int64_t[]", n)
    count = int(_lib.qp_bitmap_mask_extents(gp, np_, g.size, buf, nb, granularity,
                                            _ffi.NULL, _ffi.NULL, _ffi.NULL, 0))
    if count < 0:
        raise ValueError("invalid arguments to bitmap_mask_extents")
    out = [np.empty(count, dtype=np.int64) for _ in range(3)]
    if count:
        _lib.qp_bitmap_mask_extents(gp, np_, g.size, buf, nb, granularity,
                                    *(_ffi.from_buffer("int64_t[]", o) for o in out), count)
    return tuple(out)


if USE_NATIVE:
    bitmap_count = bitmap_count_native
    bitmap_next = bitmap_next_native
    bitmap_runs = bitmap_runs_native
    bitmap_op = bitmap_op_native
    bitmap_mask_extents = bitmap_mask_extents_native
else:
    bitmap_count = bitmap_count_pure
    bitmap_next = bitmap_next_pure
    bitmap_runs = bitmap_runs_pure
    bitmap_op = bitmap_op_pure
    bitmap_mask_extents = bitmap_mask_extents_pure
