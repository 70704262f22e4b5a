"""Host cluster allocation: the refcount table and refcount blocks, write-back.

Refcount blocks are loaded on demand into numpy arrays and written back by
:meth:`RefcountManager.write_dirty`.  The crash-safety contract with the
writer (see ``writer.py``) is:

* increments may reach the disk at any time (a refcount that is too high only
  leaks), so they are simply marked dirty;
* decrements are *deferred*: :meth:`free_later` queues them, and the writer
  applies them with :meth:`apply_frees` only after the metadata that dropped
  the reference is durable.  Until then the clusters stay allocated, so they
  cannot be reused while an old reference may still be on disk.

New refcount blocks describe themselves: a block created for a range of
clusters is placed inside that range.  The refcount table grows into new
clusters and is switched with one synced 12-byte header write.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

from ..lazyimport import numpy as np

from ..errors import CorruptImageError, FormatError
from ..format import refcount as rc
from ..format.header import MAX_REFTABLE_BYTES, Header
from ..io.storage import Storage
from .journal import Journal
from .overlap import Kind

#: header offset of refcount_table_offset (u64) + refcount_table_clusters (u32)


_MAX_IO_OFFSET = (1 << 56) - 1      # QCOW_MAX_CLUSTER_OFFSET: no refcount block lies beyond


class RefcountManager:
    """Reads, allocates and frees host clusters of one qcow2 file."""

    def __init__(self, journal: Journal):
        self.journal = journal
        self.storage: Storage = journal.storage
        self.header: Header = journal.header
        storage, header = self.storage, self.header
        self.cluster_bits = header.cluster_bits
        self.cs = header.cluster_size
        self.order = header.refcount_order
        self.max_refcount = (1 << (1 << self.order)) - 1
        self.per_block = rc.entries_per_block(self.cs, self.order)
        raw = storage.pread(header.refcount_table_offset, header.refcount_table_clusters * self.cs)
        self.reftable: np.ndarray = rc.decode_table(raw)
        self.blocks: Dict[int, np.ndarray] = {}
        self.dirty_blocks: Set[int] = set()
        self.dirty_reftable = False
        self.free_hint = 0
        self.pending: List[np.ndarray] = []     # cluster indexes to decrement later
        #: bumped whenever refcount blocks or the table move (metadata layout changed)
        self.layout_version = 0
        #: bumped whenever a refcount drops: freed clusters may be reused, so
        #: anything remembered about what they hold is stale (the overlap template)
        self.free_epoch = 0

    # ------------------------------------------------------------ lookup
    def _block(self, bi: int) -> Optional[np.ndarray]:
        blk = self.blocks.get(bi)
        if blk is not None:
            return blk
        if bi >= self.reftable.size or self.reftable[bi] == 0:
            return None
        off = int(self.reftable[bi])
        if off % self.cs:
            raise CorruptImageError(f"refcount block {bi} at {off:#x} is not cluster aligned")
        if off < 0 or off + self.cs > _MAX_IO_OFFSET:       # QEMU: EIO
            raise CorruptImageError(f"refcount block {bi} at {off:#x} lies beyond the largest "
                                    f"offset a request can reach")
        blk = rc.decode_block(self.storage.pread(off, self.cs), self.order)
        self.blocks[bi] = blk
        return blk

    def get(self, cluster: int) -> int:
        blk = self._block(cluster // self.per_block)
        return 0 if blk is None else int(blk[cluster % self.per_block])

    def get_many(self, clusters: np.ndarray) -> np.ndarray:
        clusters = np.asarray(clusters, dtype=np.int64)
        out = np.zeros(clusters.size, dtype=np.int64)
        if not clusters.size:
            return out
        bis = clusters // self.per_block
        for bi in np.unique(bis).tolist():
            blk = self._block(bi)
            if blk is not None:
                sel = bis == bi
                out[sel] = blk[clusters[sel] % self.per_block].astype(np.int64)
        return out

    # ------------------------------------------------------------ changes
    def _add(self, clusters: np.ndarray, delta: int) -> None:
        clusters = np.asarray(clusters, dtype=np.int64)
        if clusters.size == 1:                   # the common case, without numpy passes
            c = int(clusters[0])
            self._add_run(c, c + 1, delta)
            return
        bis = clusters // self.per_block
        for bi in np.unique(bis).tolist():
            blk = self._block(bi)
            if blk is None:
                raise CorruptImageError(f"no refcount block for host cluster "
                                        f"{int(clusters[bis == bi][0])}")
            idx = clusters[bis == bi] % self.per_block
            counts = np.bincount(idx, minlength=0)
            uniq = np.flatnonzero(counts)
            new = blk[uniq].astype(np.int64) + delta * counts[uniq]
            if (new < 0).any():
                raise CorruptImageError(f"refcount of host cluster "
                                        f"{bi * self.per_block + int(uniq[new < 0][0])} "
                                        f"would drop below zero")
            if (new > self.max_refcount).any():
                raise FormatError(f"refcount overflow ({self.max_refcount} is the maximum "
                                  f"at {1 << self.order} bits)")
            blk[uniq] = new.astype(np.uint64)
            self.dirty_blocks.add(bi)
        if delta < 0:
            self.free_epoch += 1

    def _add_run(self, start: int, end: int, delta: int) -> None:
        """``delta`` on every cluster of ``[start, end)`` (the blocks must exist)."""
        per = self.per_block
        pos = start
        while pos < end:
            bi = pos // per
            blk = self._block(bi)
            if blk is None:
                raise CorruptImageError(f"no refcount block for host cluster {pos}")
            a = pos % per
            b = min(per, a + end - pos)
            seg = blk[a:b]
            if delta < 0 and int(seg.min()) < -delta:
                bad = a + int(np.flatnonzero(seg < -delta)[0])
                raise CorruptImageError(f"refcount of host cluster {bi * per + bad} "
                                        f"would drop below zero")
            if delta > 0 and int(seg.max()) > self.max_refcount - delta:
                raise FormatError(f"refcount overflow ({self.max_refcount} is the maximum "
                                  f"at {1 << self.order} bits)")
            if delta > 0:
                seg += np.uint64(delta)
            else:
                seg -= np.uint64(-delta)
                self.free_epoch += 1
            self.dirty_blocks.add(bi)
            pos += b - a

    def increment(self, clusters: np.ndarray) -> None:
        """+1 for each listed cluster (repeats count)."""
        self._add(clusters, +1)

    def free_later(self, clusters: np.ndarray) -> None:
        """Queue -1 for each listed cluster, applied by :meth:`apply_frees`."""
        clusters = np.asarray(clusters, dtype=np.int64)
        if clusters.size:
            self.pending.append(clusters)

    def apply_frees(self) -> None:
        """Apply queued decrements (call only once the dropped references are durable)."""
        if not self.pending:
            return
        allc = np.concatenate(self.pending)
        self.pending = []
        self._add(allc, -1)
        freed = allc[self.get_many(allc) == 0]
        if freed.size:
            self.free_hint = min(self.free_hint, int(freed.min()))

    # ------------------------------------------------------------ allocation
    def _find_free(self, n: int, start: int) -> int:
        """First cluster index >= start beginning ``n`` clusters with refcount 0."""
        pos = self._next_free(start)
        while True:
            run = self._count_free_from(pos, n)
            if run >= n:
                return pos
            pos = self._next_free(pos + run + 1)

    def _next_free(self, pos: int) -> int:
        """The first free cluster at or after ``pos``."""
        while True:
            blk = self._block(pos // self.per_block)
            if blk is None or blk[pos % self.per_block] == 0:
                return pos
            frees = np.flatnonzero(blk[pos % self.per_block:] == 0)
            if frees.size:
                return pos + int(frees[0])
            pos = (pos // self.per_block + 1) * self.per_block

    def _count_free_from(self, pos: int, want: int) -> int:
        """How many consecutive free clusters start at ``pos`` (stops counting at ``want``)."""
        count = 0
        while count < want:
            bi = pos // self.per_block
            blk = self._block(bi)
            if blk is None:
                return want
            seg = blk[pos % self.per_block:pos % self.per_block + want - count]
            used = np.flatnonzero(seg != 0)
            if used.size:
                return count + int(used[0])
            count += seg.size
            pos += seg.size
        return count

    def allocate(self, n: int, fresh_from: int = 0) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1); returns the host offset.

        Placement follows the policy of QEMU's allocator, so that new images
        (create, preallocation) are laid out byte for byte as qemu-img lays
        them out:

        * the run is the first ``n`` free clusters at or after the free hint
          (clusters no refcount block covers yet count as free);
        * when the run needs a refcount block that does not exist yet, the
          block is created (:meth:`_new_block`) and the search starts over
          from the run's start (so the run may stay where it was, or move past
          the new block).

        ``fresh_from`` (a cluster index) makes the run start at or after it: the
        caller maps the clusters without writing them and they must read as
        zeros, so they come from past the end of the file, never from freed
        clusters that still hold old bytes (QEMU's preallocation of a grow
        allocates past the old end of the file too).
        """
        if n <= 0:
            raise ValueError("allocate needs n >= 1")
        per = self.per_block
        hint = self.free_hint
        while True:
            start = self._find_free(n, max(self.free_hint, fresh_from))
            end = start + n
            self.free_hint = end
            missing = next((bi for bi in range(start // per, (end - 1) // per + 1)
                            if self._block(bi) is None), None)
            if missing is None:
                break
            self._new_block(missing, max(start, missing * per))
            self.free_hint = min(self.free_hint, start)
        if fresh_from:
            self.free_hint = min(self.free_hint, hint)   # the free clusters before it stay
        self._add_run(start, end, +1)
        return start << self.cluster_bits

    def _new_block(self, bi: int, cluster: int) -> None:
        """Create the missing refcount block ``bi`` (``cluster`` needs it).

        The block goes on the next free cluster.  It counts itself when it
        lies in its own range; else it is counted in the block covering it,
        and when that block is missing too, that one is created instead and
        ``bi`` is left for the caller's next attempt.  A table too small for
        ``bi`` grows (:meth:`_grow_reftable`).
        """
        per = self.per_block
        host = self._find_free(1, self.free_hint)
        self.free_hint = host + 1
        blk = np.zeros(per, dtype=np.uint64)
        if host // per == bi:
            blk[host % per] = 1
        elif self._block(host // per) is None:
            self._new_block(host // per, host)
            return
        else:
            self.increment(np.array([host], dtype=np.int64))
        self.layout_version += 1
        if bi < self.reftable.size:
            self.blocks[bi] = blk
            self.dirty_blocks.add(bi)
            self.reftable[bi] = host << self.cluster_bits
            self.dirty_reftable = True
        else:
            self._grow_reftable(bi, blk, host, cluster)

    def _refblocks_for(self, clusters: int) -> int:
        """Refcount blocks needed to cover ``clusters`` plus the refcount structures
        themselves, with room for half the table again (QEMU's sizing)."""
        per_table_cluster = self.cs // 8
        blocks = table = 0
        total, generous = -1, True
        while True:
            blocks = -(-(clusters + table + blocks) // self.per_block)
            table = -(-blocks // per_table_cluster)
            now = clusters + blocks + table
            if now == total:
                if not generous:
                    return blocks
                clusters += -(-table // 2)
                generous, total = False, -1
                continue
            total = now

    def _grow_reftable(self, bi: int, blk: np.ndarray, host: int, cluster: int) -> None:
        """A larger refcount table, with the new block ``blk`` for index ``bi`` at ``host``.

        As QEMU does: the table and the refcount blocks that cover it go at the
        start of the first block range past both ``cluster`` and ``host``,
        sized for that much space with half the table again to spare, and
        count themselves.  Blocks, then the table, then one synced header
        switch; the old table is freed at once, as nothing durable points at
        it any more.
        """
        cs, per, cb = self.cs, self.per_block, self.cluster_bits
        per_table_cluster = cs // 8
        meta = -(-(max(cluster, host) + 1) // per) * per     # a cluster index
        total = self._refblocks_for(meta)
        entries = total + -(-total // 2)
        entries = -(-entries // per_table_cluster) * per_table_cluster
        tclusters = entries // per_table_cluster
        if tclusters * cs > MAX_REFTABLE_BYTES:
            raise FormatError("refcount table would exceed QEMU's 8 MiB limit")
        if self.dirty_reftable:
            # the old table gets the blocks hooked up so far, as QEMU writes each
            # hook-up at once (its clusters may be reused with that content)
            self.write_dirty_blocks()
            self.journal.barrier()
            self.write_reftable()
        table = np.zeros(entries, dtype=np.int64)
        keep = min(entries, self.reftable.size)
        table[:keep] = self.reftable[:keep]
        table[bi] = host << cb
        self.reftable = table
        self.blocks[bi] = blk
        self.dirty_blocks.add(bi)
        area = meta // per
        k = 0
        for i in range(area, total):
            if table[i] == 0:
                table[i] = (meta + k) << cb
                self.blocks[i] = np.zeros(per, dtype=np.uint64)
                k += 1
        tstart = meta + k
        end = tstart + tclusters
        for i in range(area, total):                  # the new structures count themselves
            lo, hi = max(meta, i * per), min(end, (i + 1) * per)
            if lo < hi:
                b = self._block(i)
                b[lo - i * per:hi - i * per] += np.uint64(1)
                self.dirty_blocks.add(i)
        # blocks first, then the table, then the header switch
        self.write_dirty_blocks()
        self.journal.barrier()
        self.journal.write_metadata(Kind.REFCOUNT_TABLE, tstart << cb, self._table_bytes())
        old_offset = self.header.refcount_table_offset
        old_clusters = self.header.refcount_table_clusters
        self.journal.switch_reftable(tstart << cb, tclusters)
        self.dirty_reftable = False
        self.layout_version += 1
        old = (old_offset >> cb) + np.arange(old_clusters, dtype=np.int64)
        if old.size:                # a header may claim a table of 0 clusters
            self._add(old, -1)
            self.free_hint = min(self.free_hint, int(old[0]))

    # ------------------------------------------------------------ repairs
    def set_counts(self, clusters: np.ndarray, values: np.ndarray) -> None:
        """Overwrite refcounts (repairs only); the blocks must exist."""
        clusters = np.asarray(clusters, dtype=np.int64)
        values = np.asarray(values, dtype=np.int64)
        if (values > self.max_refcount).any():
            raise FormatError(f"refcount does not fit in {1 << self.order} bits")
        for c, v in zip(clusters.tolist(), values.tolist()):
            blk = self._block(c // self.per_block)
            if blk is None:
                raise CorruptImageError(f"no refcount block for host cluster {c}")
            blk[c % self.per_block] = v
            self.dirty_blocks.add(c // self.per_block)
            self.free_epoch += 1
            if v == 0:
                self.free_hint = min(self.free_hint, c)

    def rebuild(self, counts: np.ndarray) -> None:
        """Replace all refcount structures by new ones holding ``counts``.

        The new table and blocks go after the last used cluster; they are
        written and synced before one synced header switch, so a crash leaves
        either the old or the new structures in force.
        """
        base, tclusters, table, full = write_new_structures(self.journal, counts, self.order,
                                                            self.cs)
        per = self.per_block
        self.blocks = {j: full[j * per:(j + 1) * per].copy() for j in range(full.size // per)}
        self.journal.switch_reftable(base * self.cs, tclusters)
        self.reftable = table.astype(np.int64)
        self.dirty_blocks.clear()
        self.dirty_reftable = False
        self.pending = []
        self.free_hint = 0
        self.layout_version += 1

    # ------------------------------------------------------------ write-back
    def _table_bytes(self) -> bytes:
        return self.reftable.astype(">u8").tobytes()

    def write_dirty_blocks(self) -> None:
        """Write the changed refcount blocks (each checked against the other metadata
        first, see :meth:`~qcow2py.qcow2.journal.Journal.write_metadata_many`)."""
        order = sorted(self.dirty_blocks)
        self.journal.write_metadata_many(Kind.REFCOUNT_BLOCK, self.cs,
                                         [int(self.reftable[bi]) for bi in order],
                                         (rc.encode_block(self.blocks[bi], self.order)
                                          for bi in order))
        self.dirty_blocks.clear()

    def write_reftable(self) -> None:
        if self.dirty_reftable:
            # in place, unchecked as QEMU leaves it (see the journal's docstring)
            self.journal.write_metadata(Kind.REFCOUNT_TABLE, self.header.refcount_table_offset,
                                        self._table_bytes(), checked=False)
            self.dirty_reftable = False

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_blocks or self.dirty_reftable or self.pending)


def write_new_structures(journal, counts: np.ndarray, order: int,
                         cluster_size: int) -> Tuple[int, int, np.ndarray, np.ndarray]:
    """Write a whole new refcount table and its blocks, at ``1 << order`` bits,
    holding ``counts`` (one per host cluster), after the last used cluster; the
    new structures count themselves.  Nothing points at them yet: the caller
    syncs and switches the header (a rebuild, or amend's change of width), so a
    crash leaves the old or the new structures in force.

    Returns (first cluster of the table, table clusters, table entries, all new
    counts as one array of whole blocks)."""
    cs = cluster_size
    per = rc.entries_per_block(cs, order)
    used = np.flatnonzero(counts)
    base = int(used[-1]) + 1 if used.size else 1
    nblocks = tclusters = 0
    while True:                          # blocks and table count themselves: fixed point
        need_blocks = -(-(base + tclusters + nblocks) // per)
        need_t = -(-need_blocks * 8 // cs)
        if (need_blocks, need_t) == (nblocks, tclusters):
            break
        nblocks, tclusters = need_blocks, need_t
    if tclusters * cs > MAX_REFTABLE_BYTES:
        raise FormatError("the new refcount table would exceed QEMU's 8 MiB limit")
    full = np.zeros(nblocks * per, dtype=np.uint64)
    n = min(counts.size, full.size)
    full[:n] = np.asarray(counts[:n], dtype=np.uint64)
    full[base:base + tclusters + nblocks] = 1
    table = np.zeros(tclusters * cs // 8, dtype=np.uint64)
    table[:nblocks] = (base + tclusters + np.arange(nblocks, dtype=np.uint64)) * np.uint64(cs)
    journal.write_metadata_many(Kind.REFCOUNT_BLOCK, cs, [int(t) for t in table[:nblocks]],
                                (rc.encode_block(full[j * per:(j + 1) * per], order)
                                 for j in range(nblocks)))
    journal.write_metadata(Kind.REFCOUNT_TABLE, base * cs, table.astype(">u8").tobytes())
    return base, tclusters, table, full
