"""Refcount blocks at every width (1 to 64 bits), as numpy arrays.

Entries narrower than a byte are packed least-significant bit first within
each byte (spec); wider entries are big-endian.  Pure: no I/O.
"""

from __future__ import annotations

from ..lazyimport import numpy as np

from ..errors import FormatError

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

_WIDE = {8: ">u1", 16: ">u2", 32: ">u4", 64: ">u8"}


def entries_per_block(cluster_size: int, refcount_order: int) -> int:
    return cluster_size * 8 >> refcount_order


def decode_block(block, refcount_order: int) -> np.ndarray:
    """Refcounts of one block as ``uint64``, one per host cluster."""
    if not 0 <= refcount_order <= 6:
        raise FormatError(f"refcount_order {refcount_order} out of range")
    bits = 1 << refcount_order
    raw = np.frombuffer(memoryview(block).cast("B"), dtype=np.uint8)
    if bits >= 8:
        return np.frombuffer(raw.tobytes(), dtype=_WIDE[bits]).astype(np.uint64)
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    vals = (raw[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(-1).astype(np.uint64)


def encode_block(refcounts: np.ndarray, refcount_order: int) -> bytes:
    """Inverse of :func:`decode_block`; raises if a value does not fit the width."""
    bits = 1 << refcount_order
    vals = np.asarray(refcounts, dtype=np.uint64)
    if bits < 64 and vals.size and int(vals.max()) >> bits:
        raise FormatError(f"refcount {int(vals.max())} does not fit in {bits} bits")
    if bits >= 8:
        return vals.astype(_WIDE[bits]).tobytes()
    per_byte = 8 // bits
    if vals.size % per_byte:
        raise FormatError("refcount count is not a whole number of bytes")
    v = vals.astype(np.uint8).reshape(-1, per_byte)
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(v << shifts, axis=1).astype(np.uint8).tobytes()


def decode_table(raw) -> np.ndarray:
    """Refcount table entries (block offsets) as ``int64``; raises on reserved bits."""
    t = np.frombuffer(memoryview(raw).cast("B"), dtype=">u8").astype(np.uint64)
    bad = np.flatnonzero(t & np.uint64(REFT_RESERVED_MASK))
    if bad.size:
        i = int(bad[0])
        raise FormatError(f"refcount table entry {i} ({int(t[i]):#x}) has reserved bits set")
    return (t & np.uint64(REFT_OFFSET_MASK)).astype(np.int64)
