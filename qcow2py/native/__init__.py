"""The native hot path: the ONE place that chooses a back-end.

Each function has two implementations with one contract: C in ``csrc/``
(:mod:`.backend_c`, through the cffi module ``qcow2py._native``, which releases
the GIL) and a numpy/Python twin (:mod:`.backend_pure`) that documents the
contract, is compared with C in tests, and runs where no compiler was available.
``QCOW2PY_PURE=1`` forces the twins.  Production code calls the names below,
never a back-end module.
"""

from __future__ import annotations

import os

from ..format.l2 import ClusterKind
from . import backend_c, backend_pure
from .common import BITMAP_OPS

# Unit kinds (one unit = a guest cluster, or a subcluster with extended L2), as plain
# ints for numpy: the values of format.l2.ClusterKind
UNALLOCATED = int(ClusterKind.UNALLOCATED)
ZERO = int(ClusterKind.ZERO)
ZERO_ALLOC = int(ClusterKind.ZERO_ALLOC)
DATA = int(ClusterKind.DATA)
COMPRESSED = int(ClusterKind.COMPRESSED)
UNALLOCATED_ALLOC = int(ClusterKind.UNALLOCATED_ALLOC)

#: True when the C module is built (the twin tests compare it with the pure code).
HAVE_NATIVE = backend_c.AVAILABLE
#: True when the package uses it (``QCOW2PY_PURE=1`` forces the pure twins).
USE_NATIVE = HAVE_NATIVE and not os.environ.get("QCOW2PY_PURE")

_backend = backend_c if USE_NATIVE else backend_pure

is_zero = _backend.is_zero
decode_l2 = _backend.decode_l2
pread_runs = _backend.pread_runs
write_batch = _backend.write_batch
bitmap_count = _backend.bitmap_count
bitmap_next = _backend.bitmap_next
bitmap_runs = _backend.bitmap_runs
bitmap_op = _backend.bitmap_op
bitmap_mask_extents = _backend.bitmap_mask_extents
start_writeback = _backend.start_writeback
#: the write-batch contract over a ``writev(views, offset)`` callable: storages
#: without a descriptor (tracing, recording, memory) write through their pwrite
write_batch_writev = backend_pure.write_batch_generic

__all__ = [
    "UNALLOCATED", "ZERO", "ZERO_ALLOC", "DATA", "COMPRESSED", "UNALLOCATED_ALLOC",
    "HAVE_NATIVE", "USE_NATIVE", "BITMAP_OPS", "is_zero", "decode_l2", "pread_runs",
    "write_batch", "write_batch_writev", "bitmap_count", "bitmap_next", "bitmap_runs",
    "bitmap_op", "bitmap_mask_extents", "start_writeback",
]
