"""Change the format options of an existing qcow2 image (``qemu-img amend -o``).

Supported: ``compat`` (0.10 <-> 1.1), ``lazy_refcounts`` and ``refcount_bits``,
applied in qemu-img's order (upgrade, refcount width, lazy refcounts, then a
downgrade) with its refusals.

Crash safety: every change ends in one synced write of cluster 0.  A new
refcount width is built beside the old structures (blocks and table written
past the last used cluster and synced), and the header switch names the new
table and width together; the old structures, not counted by the new ones,
become free space.  A downgrade first turns zero clusters into what v2 can
express (unallocated without a backing file, zeros written with one), through
the image's crash-ordered write path, and in the internal snapshots' tables
(:func:`.snapshots.expand_zero_clusters`), before the header says version 2.
Snapshots of another disk size refuse a downgrade, as in QEMU.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ..lazyimport import numpy as np

from ..errors import AmendError, FormatError
from ..format.header import COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY, V2_HEADER_LENGTH
from . import snapshots
from .refcounts import RefcountManager, write_new_structures

_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}


def check_options(compat: Optional[str], refcount_bits: Optional[int],
                  unsupported: Iterable[str]) -> None:
    """qemu-img amend's refusals of the options themselves (before any image is opened)."""
    for key in unsupported:
        raise AmendError(f"Invalid parameter '{key}'\nThis option is only supported for "
                         f"image creation" if key in ("cluster_size", "extended_l2",
                                                      "preallocation", "size")
                         else f"qcow2py amend does not support the option '{key}'")
    if compat is not None and compat not in _VERSIONS:
        raise AmendError(f"Unknown compatibility level {compat}")
    if refcount_bits is not None and (refcount_bits < 1 or refcount_bits > 64
                                      or refcount_bits & (refcount_bits - 1)):
        raise AmendError("Refcount width must be a power of two and may not exceed 64 bits")


def amend_image(img, *, compat: Optional[str] = None, lazy_refcounts: Optional[bool] = None,
                refcount_bits: Optional[int] = None, **unsupported) -> None:
    """Amend a qcow2 image opened "r+" (it stays usable); see :func:`qcow2py.amend`."""
    check_options(compat, refcount_bits, unsupported)
    _amend_open(img, compat, lazy_refcounts, refcount_bits)


def _amend_open(img, compat, lazy_refcounts, refcount_bits) -> None:
    if img.format != "qcow2" or img.read_only:
        raise AmendError(f"Format driver '{img.format}' does not support option amendment"
                         if img.format != "qcow2" else
                         f"image {img.filename!r} is open read-only (use mode 'r+')")
    h = img.header
    old_version = h.version
    version = _VERSIONS[compat] if compat is not None else old_version
    order = (refcount_bits.bit_length() - 1) if refcount_bits else h.refcount_order
    if order != 4 and version < 3:
        raise AmendError("Refcount widths other than 16 bits require compatibility level "
                         "1.1 or above (use compat=1.1 or greater)")
    if lazy_refcounts and version < 3:
        raise AmendError("Lazy refcounts only supported with compatibility level 1.1 and "
                         "above (use compat=1.1 or greater)")
    if version < old_version:
        _check_downgrade(img)
    if version > old_version:
        h.version = 3
        h.header_length = 112
        img.write_header()
    if order != h.refcount_order:
        _change_refcount_order(img, order)
    if lazy_refcounts is not None and version >= 3:
        img.flush()                       # refcounts durable: the dirty bit may go
        if lazy_refcounts:
            h.compatible_features |= COMPAT_LAZY_REFCOUNTS
        else:
            h.compatible_features &= ~COMPAT_LAZY_REFCOUNTS
            h.incompatible_features &= ~INCOMPAT_DIRTY
        img.write_header()
        img.reload_tables()               # the image takes the new refcount mode
    if version < old_version:
        _downgrade(img)


def _check_downgrade(img) -> None:
    h = img.header
    bad = h.incompatible_features & ~INCOMPAT_DIRTY
    if bad:
        raise AmendError(f"Cannot downgrade an image with incompatible features {bad:#x} set")
    snapshots.check_downgrade(img)


def _downgrade(img) -> None:
    """v3 -> v2: bitmaps dropped, zero clusters expressed without the zero flag."""
    for bm in list(img.bitmaps):
        img.remove_bitmap(bm.name)
    cs = img.cluster_size
    cb = cs.bit_length() - 1
    zeros = [r for r in img.layer_runs(0, img.size) if r.zero and not r.data]
    for r in zeros:
        if img.backing is None:
            c0, c1 = r.start >> cb, (r.start + r.length - 1 >> cb) + 1
            img.unmap_clusters(np.arange(c0, c1, dtype=np.int64), zero=False)
        else:
            chunk = bytes(min(r.length, 1 << 20))
            for pos in range(r.start, r.start + r.length, len(chunk)):
                img.write(pos, chunk[:min(len(chunk), r.start + r.length - pos)])
    img.flush()
    snapshots.expand_zero_clusters(img)     # the snapshots' tables, as QEMU rewrites them
    h = img.header
    h.version = 2
    h.header_length = V2_HEADER_LENGTH
    h.incompatible_features = h.compatible_features = h.autoclear_features = 0
    h.unknown_header_fields = b""
    h.bitmaps = None
    img.write_header()


def _change_refcount_order(img, order: int) -> None:
    """Rebuild the refcount structures at ``1 << order`` bits, then switch the header."""
    img.flush()
    h, cs, rc = img.header, img.cluster_size, img.refcounts
    n = -(-img.storage.size() // cs)
    counts = rc.get_many(np.arange(n, dtype=np.int64)).astype(np.uint64)
    # the old structures are not counted by the new ones: they become free
    old_table = h.refcount_table_offset // cs
    counts[old_table:old_table + h.refcount_table_clusters] = 0
    blocks = rc.reftable[rc.reftable != 0] // cs
    counts[blocks[blocks < n].astype(np.int64)] = 0
    new_max = (1 << (1 << order)) - 1
    over = np.flatnonzero(counts > np.uint64(new_max))
    if over.size:
        c = int(over[0])
        raise AmendError(f"Cannot decrease refcount entry width to {1 << order} bits: Cluster "
                         f"at offset {c * cs:#x} has a refcount of {int(counts[c])}")
    try:
        base, tclusters, _, _ = write_new_structures(img.journal, counts, order, cs)
    except FormatError as e:
        raise AmendError(str(e)) from None
    img.journal.barrier()
    h.refcount_order = order
    h.refcount_table_offset, h.refcount_table_clusters = base * cs, tclusters
    img.refcounts = RefcountManager(img.journal)
    img.write_header()                   # the switch: new table and width together
    img.reload_tables()
