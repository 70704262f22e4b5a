"""Argument checks and error texts shared by the two back-ends (C and pure).

Every entry point of both back-ends validates its arguments here, before any
work, so the twins refuse the same calls with the same ``ValueError``: the C
code must never see a length that does not match its buffer (it cannot check
that itself), nor an integer that does not fit its C type.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Optional, Tuple

from ..lazyimport import numpy as np

from ..errors import CorruptImageError

INT64_MAX = (1 << 63) - 1
#: file descriptors are C ints
FD_MAX = (1 << 31) - 1
#: ``qp_write_batch``'s bound on ``mark_shift``
MARK_SHIFT_MAX = 40

#: what ``qp_decode_l2`` (and its twin) report for a bad entry
ERRORS = {
    -2: "reserved bits set",
    -3: "host offset not cluster aligned",
    -4: "invalid subcluster allocation bitmap",
}

#: ``bitmap_op`` operations and their codes in C
BITMAP_OPS = {"and": 0, "or": 1, "andnot": 2}


def l2_error(code: int, index: int, table: bytes, extended: bool) -> CorruptImageError:
    size = 16 if extended else 8
    raw = table[index * size:(index + 1) * size].hex() if index >= 0 else ""
    what = ERRORS.get(code, "invalid arguments")
    return CorruptImageError(f"L2 entry {index} ({raw}): {what}")


# ------------------------------------------------------------ scalars, arrays
def int_arg(value, name: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (the range its C parameter holds;
    None: unbounded)."""
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, not {type(value).__name__}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} {v} is out of range [{lo}, {hi}]")
    return v


def offsets(values, name: str) -> np.ndarray:
    """A 1-D contiguous int64 array of non-negative integers (offsets, lengths,
    indexes: every array argument of the native functions is one)."""
    arr = np.asarray(values)
    if arr.size and arr.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integers that fit int64, not {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D")
    if arr.size and arr.dtype.kind == "u" and int(arr.max()) > INT64_MAX:
        raise ValueError(f"{name} holds a value past INT64_MAX")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size and int(arr.min()) < 0:
        raise ValueError(f"{name} holds a negative value")
    return arr


def same_size(*arrays: np.ndarray, what: str) -> None:
    if len({a.size for a in arrays}) > 1:
        raise ValueError(f"{what} arrays must have the same length")


def bytes_of(buf, writable: bool = False, name: str = "buffer") -> memoryview:
    mv = memoryview(buf).cast("B")
    if writable and mv.readonly:
        raise ValueError(f"{name} must be writable")
    return mv


# --------------------------------------------------------------------- L2, I/O
def l2_args(table, cluster_bits, extended: bool) -> Tuple[memoryview, int]:
    """(bytes of the table, cluster_bits) of ``decode_l2``."""
    cluster_bits = int_arg(cluster_bits, "cluster_bits", 9, 21)
    mv = bytes_of(table)
    entry = 16 if extended else 8
    if len(mv) % entry:
        raise ValueError(f"L2 table length {len(mv)} is not a multiple of {entry}")
    return mv, cluster_bits


def runs_args(fd, buf, buf_offsets, host_offsets, lengths):
    """(buffer, buf_off, host_off, len) of ``pread_runs``: every run fits the
    buffer and ends in the file at or before INT64_MAX."""
    int_arg(fd, "fd", 0, FD_MAX)
    mv = bytes_of(buf, writable=True)
    b, h, n = (offsets(a, name) for a, name in ((buf_offsets, "buffer offsets"),
                                                 (host_offsets, "host offsets"),
                                                 (lengths, "lengths")))
    same_size(b, h, n, what="run")
    if b.size and ((n > len(mv) - b).any() or (h > INT64_MAX - n).any()):
        raise ValueError("run does not fit the buffer")
    return mv, b, h, n


def writeback_range(fd, offset, length) -> bool:
    """Whether ``start_writeback``'s arguments fit its C call (a hint never
    raises: a call that cannot be made is skipped, as the pure twin skips all)."""
    try:
        fd, offset, length = (operator.index(v) for v in (fd, offset, length))
    except TypeError:
        return False
    return 0 <= fd <= FD_MAX and 0 <= offset <= INT64_MAX and 0 <= length <= INT64_MAX - offset


class Batch(NamedTuple):
    """The checked arguments of ``write_batch`` (see ``qp_write_batch``)."""
    buf: memoryview
    buf_off: np.ndarray
    dst_off: np.ndarray
    lengths: np.ndarray
    write_order: np.ndarray
    zero_chunk: int
    mark_base: int
    mark_shift: int
    mark: Optional[memoryview]     # the mark's bytes (None: no mark)
    mark_nbits: int                # units it holds: a length in bits


def batch_args(buf, buf_off, dst_off, lengths, write_order, zero_chunk, mark_base,
               mark_shift, mark) -> Batch:
    mv = bytes_of(buf)
    bo, do, ln, wo = (offsets(a, name) for a, name in (
        (buf_off, "buffer offsets"), (dst_off, "target offsets"), (lengths, "lengths"),
        (write_order, "write order")))
    same_size(bo, do, ln, wo, what="piece")
    if bo.size:
        if (ln > len(mv) - bo).any():
            raise ValueError("piece does not fit the buffer")
        if (do > INT64_MAX - ln).any():
            raise ValueError("piece ends past INT64_MAX in the target")
        if int(wo.max()) >= wo.size:
            raise ValueError("write order names a piece that does not exist")
    zero_chunk = int_arg(zero_chunk, "zero_chunk", 0, INT64_MAX)
    mark_base = int_arg(mark_base, "mark_base", 0, INT64_MAX)
    mark_shift = int_arg(mark_shift, "mark_shift", 0, MARK_SHIFT_MAX)
    mark_mv, mark_nbits = None, 0
    if mark is not None:
        mark_mv, mark_nbits = bitbuf(mark)
        if mark_mv.readonly and mark_nbits:
            raise ValueError("mark must be writable")
        if not mark_nbits:
            mark_mv = None
    return Batch(mv, bo, do, ln, wo, zero_chunk, mark_base, mark_shift, mark_mv, mark_nbits)


def set_bits(mv: memoryview, nbits: int, start: int, end: int) -> None:
    """Set bits ``[start, min(end, nbits))`` of an LSB-first bitmap, bytes at a time."""
    end = min(end, nbits)
    if start >= end:
        return
    first, last = start // 8, end // 8
    if first == last:
        mv[first] |= ((1 << (end - start)) - 1) << (start % 8)
        return
    if start % 8:
        mv[first] |= (0xFF << (start % 8)) & 0xFF
        first += 1
    mv[first:last] = b"\xff" * (last - first)
    if end % 8:
        mv[last] |= (1 << (end % 8)) - 1


# --------------------------------------------------------------------- bitmaps
def bitbuf(bits, nbits=None):
    """(memoryview of the bytes, number of bits) of a bitmap argument: a
    little-endian bitarray (its length in bits) or bytes-like (8 bits a byte),
    ``nbits`` at most that."""
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
        n = int_arg(nbits, "nbits", 0, n)
    return mv, n


def unpacked(bits, nbits=None) -> np.ndarray:
    mv, n = bitbuf(bits, nbits)
    return np.unpackbits(np.frombuffer(mv, dtype=np.uint8), bitorder="little")[:n]


def clip(n: int, start, end) -> Tuple[int, int]:
    """``[start, end)`` (any Python ints, end None = n) clipped to ``[0, n)``."""
    start = int_arg(start, "start")
    end = n if end is None else min(int_arg(end, "end"), n)
    return max(start, 0), end


def op_args(a, b, op: str, out):
    """(a, b, out bytes, out object) of ``bitmap_op``."""
    if op not in BITMAP_OPS:
        raise ValueError(f"unknown bitmap op {op!r}")
    ma, mb = bytes_of(a), bytes_of(b)
    if len(ma) != len(mb):
        raise ValueError("bitmaps differ in size")
    if out is None:
        out = bytearray(len(ma))
    mo = bytes_of(out, writable=True, name="output")
    if len(mo) != len(ma):
        raise ValueError("output differs in size")
    return ma, mb, mo, out


def mask_args(guest, length, granularity):
    """(guest, length, granularity) of ``bitmap_mask_extents``: extents end at or
    before INT64_MAX, granularity in ``[1, INT64_MAX]``."""
    granularity = int_arg(granularity, "granularity", 1, INT64_MAX)
    g, n = offsets(guest, "guest offsets"), offsets(length, "lengths")
    same_size(g, n, what="extent")
    if g.size and (g > INT64_MAX - n).any():
        raise ValueError("extent ends past INT64_MAX")
    return g, n, granularity
