"""The pure numpy/Python back-end: the twin of :mod:`backend_c`, one contract per
function (documented here), compared with C in tests/test_native.py, and used
where no compiler was available or with ``QCOW2PY_PURE=1``.

Bitmaps: bit i of a bitmap is bit (i % 8) of byte i // 8 (LSB-first, as qcow2
stores bitmaps and as ``bitarray(endian="little")`` keeps them).  Every function
takes the bitmap as a bitarray (little-endian; its length is the number of bits)
or as any bytes-like object with ``nbits`` (default: 8 bits a byte).
"""

from __future__ import annotations

import os
from typing import Tuple

from ..lazyimport import numpy as np

from ..format.l2 import (L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
                         OFLAG_ZERO, ClusterKind, csize_shift)
from .common import (FD_MAX, batch_args, bytes_of, clip, int_arg, l2_args, l2_error,
                     mask_args, op_args, runs_args, set_bits, unpacked)

UNALLOCATED, ZERO, ZERO_ALLOC, DATA, COMPRESSED, UNALLOCATED_ALLOC = (int(k) for k in ClusterKind)


def is_zero(buf) -> bool:
    """True if every byte of ``buf`` is zero."""
    return not np.frombuffer(bytes_of(buf), dtype=np.uint8).any()


def decode_l2(table, cluster_bits: int, extended: bool = False,
                   external_data: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Decode one L2 table into per-unit ``(kinds uint8, hosts int64)``.

    A unit is a cluster, or one of the 32 subclusters of a cluster with
    extended L2.  ``hosts`` is the host offset of the unit's data (for
    compressed units, the byte offset of the compressed stream; 0 where there
    is no host cluster).  Raises :class:`CorruptImageError` naming the first
    bad entry (reserved bits, unaligned offset, invalid subcluster bitmap).
    """
    mv, cluster_bits = l2_args(table, cluster_bits, extended)
    raw = np.frombuffer(mv, dtype=">u8").astype(np.uint64)
    if extended:
        entries, bitmaps = raw[0::2], raw[1::2]
    else:
        entries, bitmaps = raw, None
    n = entries.size
    compressed = (entries & np.uint64(OFLAG_COMPRESSED)) != 0
    copied = (entries & np.uint64(OFLAG_COPIED)) != 0
    off = entries & np.uint64(L2E_OFFSET_MASK)
    allocated = (off != 0) | (copied & bool(external_data))

    bad = [(-2, compressed & copied)]
    if extended:
        bad.append((-4, compressed & (bitmaps != 0)))
    std = ~compressed
    bad.append((-2, std & ((entries & np.uint64(L2E_STD_RESERVED_MASK)) != 0)))
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
        raise l2_error(first[0], first[1], bytes(mv), extended)

    coff = (entries & np.uint64((1 << csize_shift(cluster_bits)) - 1)).astype(np.int64)
    off = off.astype(np.int64)
    if not extended:
        zero_flag = (entries & np.uint64(OFLAG_ZERO)) != 0
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


def pread_runs(fd: int, buf, buf_offsets, host_offsets, lengths) -> None:
    """Scatter-read runs of ``fd`` into ``buf`` (see ``Storage.read_runs``)."""
    mv, b, h, n = runs_args(fd, buf, buf_offsets, host_offsets, lengths)
    for bo, ho, ln in zip(b.tolist(), h.tolist(), n.tolist()):
        done = 0
        while done < ln:
            got = os.preadv(fd, [mv[bo + done:bo + ln]], ho + done)
            if got == 0:
                mv[bo + done:bo + ln] = bytes(ln - done)
                break
            done += got


def write_batch_generic(writev, buf_off, dst_off, lengths, write_order, buf, zero_chunk: int,
                        write_zeroes: bool, mark_base: int = 0, mark_shift: int = 0, mark=None,
                        stats=None):
    """The contract of ``qp_write_batch`` over a ``writev(views, offset)`` callable
    (for targets without a file descriptor, and as the pure twin)."""
    stats = stats if stats is not None else [0, 0, 0, 0]
    a = batch_args(buf, buf_off, dst_off, lengths, write_order, zero_chunk, mark_base,
                   mark_shift, mark)
    mv = a.buf
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

    def mark_range(lo, hi):
        if a.mark is None or hi <= lo or lo < a.mark_base:
            return
        first = (lo - a.mark_base) >> a.mark_shift
        last = (hi - 1 - a.mark_base) >> a.mark_shift
        set_bits(a.mark, a.mark_nbits, first, last + 1)

    zero_chunk = a.zero_chunk
    zeros = bytes(min(max(zero_chunk, 1), 1 << 16))
    pos_of, lengths, dst_off = a.buf_off.tolist(), a.lengths.tolist(), a.dst_off.tolist()
    for e in a.write_order.tolist():
        p, L, dst = pos_of[e], lengths[e], dst_off[e]
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


def write_batch(buf_off, dst_off, lengths, write_order, dst_fd: int, buf,
                     zero_chunk: int = 0, write_zeroes: bool = False, mark_base: int = 0,
                     mark_shift: int = 0, mark=None):
    """fd-based twin of :func:`write_batch`."""
    dst_fd = int_arg(dst_fd, "dst_fd", 0, FD_MAX)
    return write_batch_generic(_fd_writev(dst_fd), buf_off, dst_off, lengths, write_order, buf,
                               zero_chunk, write_zeroes, mark_base, mark_shift, mark)


def bitmap_count(bits, start: int = 0, end=None, nbits=None) -> int:
    """Number of set bits in ``[start, end)``."""
    u = unpacked(bits, nbits)
    a, b = clip(u.size, start, end)
    return int(np.count_nonzero(u[a:b])) if a < b else 0


def bitmap_next(bits, start: int = 0, value: bool = True, end=None, nbits=None) -> int:
    """First bit index in ``[start, end)`` equal to ``value``, or -1."""
    u = unpacked(bits, nbits)
    a, b = clip(u.size, start, end)
    if a >= b:
        return -1
    hit = np.flatnonzero(u[a:b] == (1 if value else 0))
    return a + int(hit[0]) if hit.size else -1


def bitmap_runs(bits, start: int = 0, end=None, nbits=None) -> Tuple[np.ndarray, np.ndarray]:
    """Merged runs of set bits in ``[start, end)``: int64 arrays ``(starts, lengths)``
    in bits (runs cut by the range are clipped to it)."""
    u = unpacked(bits, nbits)
    a, b = clip(u.size, start, end)
    if a >= b:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy()
    edges = np.flatnonzero(np.diff(np.concatenate(([0], u[a:b].astype(np.int8), [0]))))
    return (edges[0::2] + a).astype(np.int64), (edges[1::2] - edges[0::2]).astype(np.int64)


def bitmap_op(a, b, op: str, out=None):
    """Byte-wise ``a OP b`` (op "and", "or" or "andnot" = a & ~b) over equal-length
    buffers; the result goes to ``out`` (may be ``a``) or a new bytearray."""
    ma, mb, mo, out = op_args(a, b, op, out)
    x = np.frombuffer(ma, dtype=np.uint8)
    y = np.frombuffer(mb, dtype=np.uint8)
    r = x & y if op == "and" else (x | y if op == "or" else x & ~y)
    mo[:] = r.tobytes()
    return out


def bitmap_mask_extents(guest, length, bits, granularity: int, nbits=None):
    """The parts of extents (guest offsets, lengths in bytes) under set bits of a
    bitmap of ``granularity``-byte units: arrays ``(guest, length, index)``, in
    order, ``index`` naming the extent each piece comes from."""
    g, n, granularity = mask_args(guest, length, granularity)
    u = unpacked(bits, nbits)
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


def start_writeback(fd: int, offset: int, length: int) -> None:
    """The twin of the C hint: Python has no ``sync_file_range``, so nothing is
    started early and the kernel writes the pages back on its own schedule (the
    next fdatasync waits for whatever is left).  Nothing observable differs."""
    return None
