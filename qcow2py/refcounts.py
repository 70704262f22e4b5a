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

import struct
from typing import Callable, Dict, List, Optional, Set

import numpy as np

from .errors import CorruptImageError, FormatError
from .format import refcount as rc
from .format.header import MAX_REFTABLE_BYTES, Header
from .storage import Storage

#: header offset of refcount_table_offset (u64) + refcount_table_clusters (u32)
_REFTABLE_FIELDS = 48


class RefcountManager:
    """Reads, allocates and frees host clusters of one qcow2 file."""

    def __init__(self, storage: Storage, header: Header):
        self.storage = storage
        self.header = header
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
            if blk is None:
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
            seg = blk[pos % self.per_block:]
            used = np.flatnonzero(seg != 0)
            if used.size:
                return count + int(used[0])
            count += seg.size
            pos += seg.size
        return count

    def allocate(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1); returns the host offset.

        Refcount blocks missing for the chosen range are created right after
        it (so they never split the run), in the same pass.
        """
        if n <= 0:
            raise ValueError("allocate needs n >= 1")
        while True:
            extra = 0
            while True:
                start = self._find_free(n + extra, self.free_hint)
                end = start + n + extra
                missing = [bi for bi in range(start // self.per_block,
                                              (end - 1) // self.per_block + 1)
                           if self._block(bi) is None]
                if len(missing) <= extra:
                    break
                extra = len(missing)
            if missing and max(missing) >= self.reftable.size:
                self._grow_reftable(max(missing) + 1)
                continue
            break
        for j, bi in enumerate(missing):
            self.blocks[bi] = np.zeros(self.per_block, dtype=np.uint64)
            self.dirty_blocks.add(bi)
            self.reftable[bi] = (start + n + j) << self.cluster_bits
            self.dirty_reftable = True
            self.layout_version += 1
        used_end = start + n + len(missing)
        self.increment(np.arange(start, used_end, dtype=np.int64))
        self.free_hint = used_end
        return start << self.cluster_bits

    def _grow_reftable(self, min_entries: int) -> None:
        """Move the refcount table to new, larger clusters (one synced header switch)."""
        per_cluster = self.cs // 8
        old_clusters = self.header.refcount_table_clusters
        want = max(min_entries, self.reftable.size + self.reftable.size // 2 + 1)
        # the table and the refcount blocks for its own clusters are placed together
        extra = 0
        while True:
            tclusters = -(-want // per_cluster)
            if tclusters * self.cs > MAX_REFTABLE_BYTES:
                raise FormatError("refcount table would exceed QEMU's 8 MiB limit")
            start = self._find_free(tclusters + extra, self.free_hint)
            end = start + tclusters + extra
            missing = [bi for bi in range(start // self.per_block, (end - 1) // self.per_block + 1)
                       if self._block(bi) is None]
            if len(missing) > extra:
                extra = len(missing)
                continue
            if missing and max(missing) >= tclusters * per_cluster:
                want = max(missing) + 1
                continue
            break
        new_table = np.zeros(tclusters * per_cluster, dtype=np.int64)
        new_table[:self.reftable.size] = self.reftable
        self.reftable = new_table
        for j, bi in enumerate(missing):
            blk = np.zeros(self.per_block, dtype=np.uint64)
            self.blocks[bi] = blk
            self.dirty_blocks.add(bi)
            self.reftable[bi] = (start + tclusters + j) << self.cluster_bits
        self.increment(np.arange(start, end, dtype=np.int64))
        self.free_hint = max(self.free_hint, end)
        # blocks first, then the table, then the header switch
        self.write_dirty_blocks()
        self.storage.fsync()
        self.storage.pwrite(self._table_bytes(), start << self.cluster_bits)
        self.storage.fsync()
        old_offset = self.header.refcount_table_offset
        self.header.refcount_table_offset = start << self.cluster_bits
        self.header.refcount_table_clusters = tclusters
        self.storage.pwrite(struct.pack(">QI", self.header.refcount_table_offset, tclusters),
                            _REFTABLE_FIELDS)
        self.storage.fsync()
        self.dirty_reftable = False
        self.layout_version += 1
        old = (old_offset >> self.cluster_bits) + np.arange(old_clusters, dtype=np.int64)
        self.free_later(old)

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
            if v == 0:
                self.free_hint = min(self.free_hint, c)

    def rebuild(self, counts: np.ndarray) -> None:
        """Replace all refcount structures by new ones holding ``counts``.

        The new table and blocks go after the last used cluster; they are
        written and synced before one synced header switch, so a crash leaves
        either the old or the new structures in force.
        """
        cs, per = self.cs, self.per_block
        used = np.flatnonzero(counts)
        base = int(used[-1]) + 1 if used.size else 1
        nblocks = tclusters = 0
        while True:
            total = base + tclusters + nblocks
            need_blocks = -(-total // per)
            need_t = -(-need_blocks * 8 // cs)
            if (need_blocks, need_t) == (nblocks, tclusters):
                break
            nblocks, tclusters = need_blocks, need_t
        if tclusters * cs > MAX_REFTABLE_BYTES:
            raise FormatError("rebuilt refcount table would exceed QEMU's 8 MiB limit")
        full = np.zeros(nblocks * per, dtype=np.uint64)
        n = min(counts.size, full.size)
        full[:n] = np.asarray(counts[:n], dtype=np.uint64)
        full[base:base + tclusters + nblocks] = 1
        table = np.zeros(tclusters * cs // 8, dtype=np.int64)
        self.blocks = {}
        for j in range(nblocks):
            off = (base + tclusters + j) * cs
            table[j] = off
            blk = full[j * per:(j + 1) * per].copy()
            self.blocks[j] = blk
            self.storage.pwrite(rc.encode_block(blk, self.order), off)
        self.storage.pwrite(table.astype(">u8").tobytes(), base * cs)
        self.storage.fsync()
        self.header.refcount_table_offset = base * cs
        self.header.refcount_table_clusters = tclusters
        self.storage.pwrite(struct.pack(">QI", base * cs, tclusters), _REFTABLE_FIELDS)
        self.storage.fsync()
        self.reftable = table
        self.dirty_blocks.clear()
        self.dirty_reftable = False
        self.pending = []
        self.free_hint = 0
        self.layout_version += 1

    # ------------------------------------------------------------ write-back
    def _table_bytes(self) -> bytes:
        return self.reftable.astype(">u8").tobytes()

    def write_dirty_blocks(self) -> None:
        for bi in sorted(self.dirty_blocks):
            self.storage.pwrite(rc.encode_block(self.blocks[bi], self.order),
                                int(self.reftable[bi]))
        self.dirty_blocks.clear()

    def write_reftable(self) -> None:
        if self.dirty_reftable:
            self.storage.pwrite(self._table_bytes(), self.header.refcount_table_offset)
            self.dirty_reftable = False

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_blocks or self.dirty_reftable or self.pending)
