"""Argument checks and error texts shared by the two back-ends (C and pure)."""

from __future__ import annotations

from typing import Tuple

from ..lazyimport import numpy as np

from ..errors import CorruptImageError

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


def runs_args(buf, buf_offsets, host_offsets, lengths):
    arrs = [np.ascontiguousarray(a, dtype=np.int64) for a in (buf_offsets, host_offsets, lengths)]
    if not (arrs[0].shape == arrs[1].shape == arrs[2].shape) or arrs[0].ndim != 1:
        raise ValueError("run arrays must be 1-D and the same length")
    return arrs


def bitbuf(bits, nbits=None):
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


def unpacked(bits, nbits=None) -> np.ndarray:
    mv, n = bitbuf(bits, nbits)
    return np.unpackbits(np.frombuffer(mv, dtype=np.uint8), bitorder="little")[:n]


def clip(n: int, start: int, end) -> Tuple[int, int]:
    end = n if end is None else min(end, n)
    return max(start, 0), end


def mask_args(guest, length, granularity):
    g = np.ascontiguousarray(guest, dtype=np.int64)
    n = np.ascontiguousarray(length, dtype=np.int64)
    if g.shape != n.shape or g.ndim != 1:
        raise ValueError("extent arrays must be 1-D and the same length")
    if granularity < 1 or (g < 0).any() or (n < 0).any():
        raise ValueError("invalid arguments to bitmap_mask_extents")
    return g, n
