"""Zero writes and discards: zero flags (v3), zero subclusters (extended L2),
zero bytes where v2 has no flag, unmapping, and raw external data files.
"""

from __future__ import annotations

from typing import Optional, Tuple

from ..lazyimport import numpy as np

from .. import native
from ..format.l2 import (OFLAG_COMPRESSED, OFLAG_COPIED, U64_COMPRESSED as _COMPRESSED,
                         U64_COPIED as _COPIED, U64_OFFSET_MASK as _OFFSET_MASK, U64_ZERO as _ZERO)
from .write import WriteAlgorithm


class Zeroing(WriteAlgorithm):
    """write_zeroes and discard."""

    def _zero_units_ext(self, l1i: int, start: int, length: int, unmap: bool) -> None:
        """Zero whole subclusters: zero bits, or a whole zeroed cluster."""
        cs, cb = self.cluster_size, self.cluster_bits
        sc = cs >> 5
        per = cs // 16
        end = start + length
        l2 = self._writable_l2(l1i)
        released = []
        changed = False
        for c in range((start >> cb), ((end - 1) >> cb) + 1):
            i = c % per
            e, bm = int(l2[2 * i]), int(l2[2 * i + 1])
            g = c * cs
            s0, s1 = (max(start, g) - g) // sc, -(-(min(end, g + cs) - g) // sc)
            rng = ((1 << s1) - 1) ^ ((1 << s0) - 1)
            compressed = bool(e & OFLAG_COMPRESSED)
            host = e & int(_OFFSET_MASK)
            owned = not compressed and bool(e & OFLAG_COPIED) and (host != 0 or self._external)
            if rng == 0xFFFFFFFF:
                if owned and not unmap:
                    new_e = e
                else:
                    new_e = 0
                    if compressed or host:
                        released.append(e)
                new_bm = 0xFFFFFFFF << 32
            elif compressed:
                # a compressed cluster cannot be zeroed in part: rewrite it
                self._write_in_table_ext(l1i, g + s0 * sc, memoryview(bytes((s1 - s0) * sc)))
                e, bm = int(l2[2 * i]), int(l2[2 * i + 1])
                new_e, new_bm = e, bm
            else:
                new_e = e
                new_bm = (((bm >> 32) | rng) << 32) | ((bm & 0xFFFFFFFF) & ~rng)
            if (new_e, new_bm) != (e, bm):
                l2[2 * i], l2[2 * i + 1] = np.uint64(new_e), np.uint64(new_bm)
                changed = True
        if released:
            self._release(np.array(released, dtype=np.uint64))
        if changed:
            self._touch_l2(l1i)
            self._zero_raw_data_file(start, min(end, self.size))

    # ------------------------------------------------------------ zeroes and discard
    def _full_clusters(self, offset: int, length: int,
                       cs: Optional[int] = None) -> Tuple[int, int]:
        """The whole units inside a range (the last partial unit of the image counts)."""
        cs = cs or self.cluster_size
        first = -(-offset // cs)
        end = offset + length
        last = end // cs if end != self.size else -(-end // cs)
        return first, max(first, last)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make a range read as zeros, with zero clusters where the format allows (v3).

        The unit is the cluster, or the subcluster with extended L2.  Whole
        units become zero clusters/subclusters; partial ones get zero bytes
        (or become zero units when they already read as zeros).  Without
        ``unmap`` a cluster owned by this image alone keeps its host cluster
        (a preallocated zero cluster); with it the host cluster is released.
        """
        self._check_range(offset, length)
        if not length:
            return
        self._mark_bitmaps(offset, length)
        unit = self.cluster_size >> 5 if self.extended_l2 else self.cluster_size
        end = offset + length
        cb = self.cluster_bits
        with self._ranges.hold(offset >> cb, ((end - 1) >> cb) + 1, True), self._lock:
            u_first, u_last = self._full_clusters(offset, length, unit)
            for u in sorted({offset // unit, (end - 1) // unit}):
                if not u_first <= u < u_last:
                    self._zero_partial(max(offset, u * unit), min(end, (u + 1) * unit), unit)
            if u_last > u_first:
                full_end = min(u_last * unit, self.size)
                self._zero_whole(u_first * unit, full_end, unmap)
            self._flush_if_full()

    def _zero_whole(self, start: int, end: int, unmap: bool) -> None:
        """Zero whole units (v3: zero flags; v2: zero bytes where needed)."""
        if self.header.version < 3:
            self._zero_v2(start, end)
            return
        zero = self._zero_units_ext if self.extended_l2 else self._zero_clusters
        for l1i, s, n in self._table_chunks(start, end - start):
            zero(l1i, s, n, unmap)

    def _zero_partial(self, a: int, b: int, unit: int) -> None:
        g = a // unit * unit
        ue = min(g + unit, self.size)
        old = self._old_range(g, ue - g)
        old[a - g:b - g] = bytes(b - a)
        if self.header.version >= 3 and native.is_zero(old):
            self._zero_whole(g, ue, unmap=False)
        else:
            self._write_range(a, memoryview(bytes(b - a)))

    def _zero_v2(self, a: int, b: int) -> None:
        # v2 has no zero flag: write zeros where the range does not already read as zero
        step = 1 << 20
        for pos in range(a, b, step):
            n = min(step, b - pos)
            if any(r.data or (not r.allocated and self.backing is not None)
                   for r in self.layer_runs(pos, n)):
                self._write_range(pos, memoryview(bytes(n)))

    def _zero_clusters(self, l1i: int, start: int, length: int, unmap: bool) -> None:
        cs, cb = self.cluster_size, self.cluster_bits
        c0, c1 = start >> cb, ((start + length - 1) >> cb) + 1
        l2 = self._writable_l2(l1i)
        idx = np.arange(c0, c1, dtype=np.int64) % (cs // 8)
        entries = l2[idx]
        compressed = (entries & _COMPRESSED) != 0
        hosts = entries & _OFFSET_MASK
        copied = (entries & _COPIED) != 0
        keep = ~compressed & ((hosts != 0) | (copied & self._external)) & copied & (not unmap)
        new = np.where(keep, hosts | _COPIED | _ZERO, _ZERO)
        changed = new != entries
        if not changed.any():
            return
        self._release(entries[changed & ~keep])
        l2[idx[changed]] = new[changed]
        self._touch_l2(l1i)
        self._zero_raw_data_file(c0 * cs, min(c1 * cs, self.size))

    def _zero_raw_data_file(self, start: int, end: int) -> None:
        """A raw external data file must read like the guest disk: zero it too."""
        if not (self._external and self.header.data_file_raw) or end <= start:
            return
        self.data_storage.write_zeros(start, end - start)

    def discard(self, offset: int, length: int) -> None:
        """Release whole clusters in a range, as QEMU does.

        Afterwards the clusters read as zeros.  Partial clusters are left
        alone, and so is everything on a v2 image with a backing file: without
        the zero flag, discarding would expose the backing file's stale data,
        so QEMU 7.2 refuses (ENOTSUP, which discard ignores), and so do we.
        """
        self._check_range(offset, length)
        self._mark_bitmaps(offset, length)      # as QEMU: the whole request, even if ignored
        cs = self.cluster_size
        if self.header.version < 3 and self.backing is not None:
            return
        cb = self.cluster_bits
        with self._ranges.hold(offset >> cb, ((offset + max(length, 1) - 1) >> cb) + 1, True), \
                self._lock:
            c_first, c_last = self._full_clusters(offset, length)
            if c_last <= c_first:
                return
            end = min(c_last * cs, self.size)
            for l1i, s, n in self._table_chunks(c_first * cs, end - c_first * cs):
                if self._l1[l1i] == 0 and self.backing is None:
                    continue          # nothing allocated and nothing to shadow
                l2 = self._writable_l2(l1i)
                c0, c1 = s >> self.cluster_bits, ((s + n - 1) >> self.cluster_bits) + 1
                ext = self.extended_l2
                step = 2 if ext else 1
                idx = (np.arange(c0, c1, dtype=np.int64) % (cs // (8 * step))) * step
                entries = l2[idx]
                allocated = ((entries & _COMPRESSED) != 0) | ((entries & _OFFSET_MASK) != 0) | \
                    (((entries & _COPIED) != 0) & self._external)
                act = allocated | (self.backing is not None)
                if ext:
                    new = np.where(act, np.uint64(0), entries)
                    new_bm = np.where(act, np.uint64(0xFFFFFFFF << 32), l2[idx + 1])
                    changed = (new != entries) | (new_bm != l2[idx + 1])
                else:
                    target = _ZERO if self.header.version >= 3 else np.uint64(0)   # v2: no backing
                    new = np.where(act, target, entries)
                    changed = new != entries
                if changed.any():
                    self._release(entries[changed & allocated])
                    l2[idx[changed]] = new[changed]
                    if ext:
                        l2[idx[changed] + 1] = new_bm[changed]
                    self._touch_l2(l1i)
                    self._zero_raw_data_file(c0 * cs, min(c1 * cs, self.size))
            self._flush_if_full()
