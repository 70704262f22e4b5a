"""QEMU's metadata overlap check (``overlap-check=cached``) for a qcow2 file opened "r+".

Every write into the image file is checked, before it happens, against a
template of where the metadata lies, as QEMU's ``qcow2_pre_write_overlap_check``
does: the header (cluster 0), the active L1 table, the active L2 tables, the
refcount table, the refcount blocks, the snapshot table, the snapshots' L1
tables and the bitmap directory (while the bitmaps autoclear bit is set).  A
write of a structure of kind K ignores K (an L2 table write may lie on an L2
table, itself); a write of guest data, bitmap data or a bitmap table ignores
nothing.  Like QEMU, the write range is widened to whole clusters.

The template is kept as intervals of host cluster indexes sorted by start,
with the running maximum of their ends, and, for each ignore mask in use, the
same without the ignored kinds: a query is one binary search on the starts and
a look at the running maximum (a batch of writes: one vectorised search), so
the check costs the same on a 10 GiB and a 10 TiB image and sizes nothing by a
hostile field (a snapshot's L1 of 2^32 entries is one interval).  It is rebuilt
lazily when the refcount structures change (new blocks, a moved table), when
clusters are freed (a freed structure's clusters may be reused), when the
header is rewritten, and when the writer says so (:meth:`OverlapTemplate.invalidate`);
new L2 tables join it without a rebuild (:meth:`OverlapTemplate.add_active_l2`).

What happens on a hit (the corrupt bit, the error) is the journal's
(:meth:`~qcow2py.qcow2.journal.Journal.write_metadata`).
"""

from __future__ import annotations

import enum
from typing import Dict, List, NamedTuple, Sequence, Set, Tuple

from ..lazyimport import numpy as np

from ..format.header import AUTOCLEAR_BITMAPS, Header
from ..format.snapshot import Snapshot


class Kind(enum.IntFlag):
    """The kinds of metadata QEMU's overlap check knows (its QCOW2_OL_* bits)."""

    #: a write of something the template does not list (guest data, bitmap data
    #: and tables): checked against every kind
    OTHER = 0
    HEADER = 1 << 0
    ACTIVE_L1 = 1 << 1
    ACTIVE_L2 = 1 << 2
    REFCOUNT_TABLE = 1 << 3
    REFCOUNT_BLOCK = 1 << 4
    SNAPSHOT_TABLE = 1 << 5
    INACTIVE_L1 = 1 << 6
    #: the snapshots' L2 tables: not in the "cached" template (QEMU's "all" mode
    #: reads them from the file); a write of one ignores the kind, as QEMU's does
    INACTIVE_L2 = 1 << 7
    BITMAP_DIRECTORY = 1 << 8


#: QEMU's names, in the order its check looks (the first found is reported)
NAMES = {
    Kind.HEADER: "qcow2_header",
    Kind.ACTIVE_L1: "active L1 table",
    Kind.REFCOUNT_TABLE: "refcount table",
    Kind.SNAPSHOT_TABLE: "snapshot table",
    Kind.INACTIVE_L1: "inactive L1 table",
    Kind.ACTIVE_L2: "active L2 table",
    Kind.REFCOUNT_BLOCK: "refcount block",
    Kind.INACTIVE_L2: "inactive L2 table",
    Kind.BITMAP_DIRECTORY: "bitmap directory",
}


def first_name(hit: int) -> str:
    """The name QEMU reports for a set of overlapping kinds."""
    return next(name for kind, name in NAMES.items() if hit & kind)


def header_structures(h: Header, snapshot_table_bytes: int) -> List[Tuple[Kind, int, int]]:
    """The structures the header itself names, as (kind, offset, length in bytes):
    the header, the active L1 table, the refcount table, the snapshot table (when
    ``snapshot_table_bytes``), the bitmap directory (when the extension is there;
    QEMU uses it only while the bitmaps autoclear bit is set).  The overlap
    template, the "r+" refusal of truncated images and the refcount rebuild of
    ``check -r`` all start from this list."""
    cs = h.cluster_size
    out = [(Kind.HEADER, 0, cs), (Kind.ACTIVE_L1, h.l1_table_offset, h.l1_size * 8),
           (Kind.REFCOUNT_TABLE, h.refcount_table_offset, h.refcount_table_clusters * cs)]
    if snapshot_table_bytes:
        out.append((Kind.SNAPSHOT_TABLE, h.snapshots_offset, snapshot_table_bytes))
    if h.bitmaps is not None:
        out.append((Kind.BITMAP_DIRECTORY, h.bitmaps.directory_offset,
                    h.bitmaps.directory_size))
    return out


class MetadataLayout(NamedTuple):
    """Where the writer's metadata lies now (what the template is built from)."""

    header: Header
    #: the active L1 table's L2 table offsets (0: none)
    l2_offsets: np.ndarray
    #: the refcount table's block offsets (0: none)
    reftable: np.ndarray
    snapshots: List[Snapshot]
    #: the snapshot table's size in bytes (0: no table)
    snapshot_table_bytes: int


class OverlapTemplate:
    """The "cached" overlap template of one writer (see the module docstring).

    ``source`` is the writer: its ``refcounts`` (a
    :class:`~qcow2py.qcow2.refcounts.RefcountManager`, whose ``layout_version``
    and ``free_epoch`` say when the template is stale) and its
    ``metadata_layout()`` (a :class:`MetadataLayout`)."""

    def __init__(self, source) -> None:
        self._source = source
        # built for these refcounts at this layout_version and free_epoch (None: stale)
        self._rc = None
        self._lv = self._fe = -1
        self._starts = self._ends = self._pmax = self._masks = None
        self._extra: Set[int] = set()           # L2 tables added since the build
        self._views: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}     # by ignore mask
        self._cluster_bits = 0

    # ------------------------------------------------------------ upkeep
    def invalidate(self) -> None:
        """The metadata moved in a way the template cannot see: rebuild on next use."""
        self._rc = None

    def add_active_l2(self, offset: int) -> None:
        """A new active L2 table at ``offset`` (joins without a rebuild; the set of
        such tables is folded into the arrays when it grows past an eighth of them,
        so a preallocation of many tables stays linear)."""
        if self._rc is None:
            return                              # the next build reads the L1 table
        self._extra.add(offset >> self._cluster_bits)
        if len(self._extra) >= max(64, self._starts.size // 8):
            add = np.fromiter(self._extra, dtype=np.int64, count=len(self._extra))
            self._extra = set()
            self._set_intervals(np.concatenate([self._starts, add]),
                                np.concatenate([self._ends, add]),
                                np.concatenate([self._masks, np.full(add.size, int(Kind.ACTIVE_L2),
                                                                     dtype=np.int64)]))

    def _current(self) -> None:
        rc = self._source.refcounts
        if rc is not self._rc or rc.layout_version != self._lv or rc.free_epoch != self._fe:
            self._build(self._source.metadata_layout())
            self._rc, self._lv, self._fe = rc, rc.layout_version, rc.free_epoch

    def _build(self, lay: MetadataLayout) -> None:
        h = lay.header
        cb = h.cluster_bits
        cs = 1 << cb
        self._cluster_bits = cb
        self._extra = set()
        starts: List[np.ndarray] = []
        ends: List[np.ndarray] = []
        masks: List[np.ndarray] = []

        def spans(kind: Kind, offsets, lengths) -> None:
            offsets = np.asarray(offsets, dtype=np.uint64)
            lengths = np.asarray(lengths, dtype=np.uint64)
            keep = lengths > 0
            if keep.any():
                off, n = offsets[keep], lengths[keep]
                last = (off + n - np.uint64(1)) >> np.uint64(cb)
                # a hostile offset near 2^64 wraps: such a table reaches the end
                last[last < (off >> np.uint64(cb))] = np.uint64(1 << (64 - cb)) - np.uint64(1)
                starts.append((off >> np.uint64(cb)).astype(np.int64))
                ends.append(last.astype(np.int64))
                masks.append(np.full(off.size, int(kind), dtype=np.int64))

        for kind, offset, length in header_structures(h, lay.snapshot_table_bytes):
            if kind != Kind.BITMAP_DIRECTORY or h.autoclear_features & AUTOCLEAR_BITMAPS:
                spans(kind, [offset], [length])
        if lay.snapshots:
            spans(Kind.INACTIVE_L1, [s.l1_table_offset for s in lay.snapshots],
                  [s.l1_size * 8 for s in lay.snapshots])
        l2 = lay.l2_offsets[lay.l2_offsets != 0]
        spans(Kind.ACTIVE_L2, l2, np.full(l2.size, cs))
        rt = lay.reftable[lay.reftable != 0]
        spans(Kind.REFCOUNT_BLOCK, rt, np.full(rt.size, cs))
        self._set_intervals(np.concatenate(starts), np.concatenate(ends),
                            np.concatenate(masks))

    def _set_intervals(self, starts: np.ndarray, ends: np.ndarray, masks: np.ndarray) -> None:
        order = np.argsort(starts, kind="stable")
        self._starts, self._ends, self._masks = starts[order], ends[order], masks[order]
        self._pmax = np.maximum.accumulate(self._ends)
        self._views = {}

    def _view(self, ignore: int) -> Tuple[np.ndarray, np.ndarray]:
        """The starts and running maximum of the ends of the kinds not ignored."""
        ignore = int(ignore)
        v = self._views.get(ignore)
        if v is None:
            keep = (self._masks & ~ignore) != 0
            ends = self._ends[keep]
            v = (self._starts[keep], np.maximum.accumulate(ends) if ends.size else ends)
            self._views[ignore] = v
        return v

    # ------------------------------------------------------------ queries
    def overlap(self, offset: int, length: int, ignore: int = 0) -> int:
        """The kinds (a :class:`Kind` mask, 0 for none) other than ``ignore`` that
        ``[offset, offset + length)``, widened to whole clusters, overlaps."""
        if length <= 0:
            return 0
        self._current()
        cb = self._cluster_bits
        first, last = offset >> cb, (offset + length - 1) >> cb
        hit = 0
        starts, pmax = self._views.get(ignore) or self._view(ignore)
        i = starts.searchsorted(last, "right")
        if i and pmax[i - 1] >= first:              # something; which kinds (rare)
            ignore = int(ignore)
            i = int(np.searchsorted(self._starts, last, side="right"))
            j = int(np.searchsorted(self._pmax, first, side="left"))
            near = self._masks[j:i][self._ends[j:i] >= first]
            hit = int(np.bitwise_or.reduce(near)) if near.size else 0
        if self._extra and not int(ignore) & Kind.ACTIVE_L2 and self._in_extra(first, last):
            hit |= int(Kind.ACTIVE_L2)
        return hit & ~int(ignore) if hit else 0

    def _in_extra(self, first: int, last: int) -> bool:
        extra = self._extra
        if last - first < len(extra):
            return any(c in extra for c in range(first, last + 1))
        return any(first <= c <= last for c in extra)

    def first_overlap(self, offsets: Sequence[int], length: int, ignore: int = 0) -> int:
        """The index of the first of the writes of ``length`` bytes at ``offsets`` that
        overlaps a kind other than ``ignore`` (see :meth:`overlap`), or -1: one
        vectorised search for all of them."""
        if not len(offsets) or length <= 0:
            return -1
        self._current()
        cb = self._cluster_bits
        off = np.asarray(offsets, dtype=np.int64)
        first, last = off >> cb, (off + (length - 1)) >> cb
        starts, pmax = self._view(int(ignore))
        i = np.searchsorted(starts, last, side="right")
        near = (i > 0) & (pmax[np.maximum(i - 1, 0)] >= first) if starts.size else \
            np.zeros(off.size, dtype=bool)
        if self._extra and not int(ignore) & Kind.ACTIVE_L2:
            near |= np.fromiter((self._in_extra(f, e) for f, e in zip(first.tolist(),
                                                                      last.tolist())),
                                dtype=bool, count=off.size)
        hits = np.flatnonzero(near)
        return int(hits[0]) if hits.size else -1
