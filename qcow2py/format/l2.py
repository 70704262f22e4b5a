"""L1 and L2 table entries, declared once (qcow2 spec, "Cluster mapping").

Everything that reads or writes an L1/L2 entry (the reader, the writer, check,
create, the pure and C decoders) takes its bits from here; ``csrc`` repeats them
as ``#define`` and a test checks that both say the same.
"""

from __future__ import annotations

from enum import IntEnum

from ..lazyimport import numpy as np

#: L1 entry: host offset of the L2 table; bits 1-8 and 56-62 are reserved
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
#: L2 entry (standard cluster): host offset, reserved bits, the zero flag
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
OFLAG_ZERO = 1 << 0
#: both tables: refcount is exactly one (may be written in place)
OFLAG_COPIED = 1 << 63
#: L2 entry: the cluster is compressed (the rest is a compressed descriptor)
OFLAG_COMPRESSED = 1 << 62
#: the same bits as numpy scalars, for masks over arrays of entries: U64_OFFSET_MASK,
#: U64_COPIED, U64_COMPRESSED, U64_ZERO (made on first use, see __getattr__ below)
_U64 = {"U64_OFFSET_MASK": L2E_OFFSET_MASK, "U64_COPIED": OFLAG_COPIED,
        "U64_COMPRESSED": OFLAG_COMPRESSED, "U64_ZERO": OFLAG_ZERO}
#: extended L2: the subcluster bitmap (second 64-bit word), allocated bits low, zero bits high
SUBCLUSTERS = 32


class ClusterKind(IntEnum):
    """What one mapping unit (a cluster, or a subcluster with extended L2) is.
    The values are the kinds the decoders (``native``, ``csrc``) return."""

    UNALLOCATED = 0        # read through to the backing file
    ZERO = 1               # reads as zeros, no host cluster
    ZERO_ALLOC = 2         # reads as zeros, host cluster preallocated
    DATA = 3               # data at the host offset
    COMPRESSED = 4         # compressed cluster; host offset is a byte offset
    UNALLOCATED_ALLOC = 5  # extended L2: unallocated subcluster of an allocated cluster


# ------------------------------------------------------------ compressed descriptor
def csize_shift(cluster_bits: int) -> int:
    """Bit position of the sector-count field of a compressed descriptor."""
    return 62 - (cluster_bits - 8)


def compressed_fields(entries, cluster_bits: int):
    """``(host byte offset, sector count - 1)`` of compressed L2 entries (ints or
    uint64 arrays)."""
    shift = csize_shift(cluster_bits)
    if isinstance(entries, np.ndarray):
        coff = entries & np.uint64((1 << shift) - 1)
        nsect = (entries >> np.uint64(shift)) & np.uint64((1 << (cluster_bits - 8)) - 1)
        return coff, nsect
    return entries & ((1 << shift) - 1), (entries >> shift) & ((1 << (cluster_bits - 8)) - 1)


def compressed_entry(host: int, nsectors: int, cluster_bits: int) -> int:
    """The L2 entry of a compressed cluster at byte ``host`` spanning ``nsectors``
    512-byte sectors (counted from the sector that holds ``host``)."""
    return OFLAG_COMPRESSED | ((nsectors - 1) << csize_shift(cluster_bits)) | host


def __getattr__(name: str):
    """The ``U64_*`` numpy scalars, made when first imported (by the writer), so that
    reading a header (``qcow2py info``) does not import numpy."""
    if name in _U64:
        value = globals()[name] = np.uint64(_U64[name])
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
