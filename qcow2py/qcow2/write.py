"""The write algorithm: plan which clusters a guest write allocates or overwrites
in place, copy-on-write the partial ones (from this image, a compressed cluster or
the backing chain), move the data without the metadata lock, then commit the L2
entries.  Extended L2 images are a variant of it (subcluster bitmaps).
"""

from __future__ import annotations


from ..lazyimport import numpy as np

from ..format.l2 import (OFLAG_COMPRESSED, OFLAG_COPIED, U64_COMPRESSED as _COMPRESSED,
                         U64_COPIED as _COPIED, U64_OFFSET_MASK as _OFFSET_MASK, U64_ZERO as _ZERO)
from .read import Qcow2Image
from .state import WriterState


class WriteAlgorithm(WriterState):
    """Guest writes (see the module docstring)."""

    def write(self, offset: int, data) -> None:
        """Write guest bytes (any offset and length)."""
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        if not len(mv):
            return
        self._mark_bitmaps(offset, len(mv))
        cb = self.cluster_bits
        with self._ranges.hold(offset >> cb, ((offset + len(mv) - 1) >> cb) + 1, True):
            self._write_range(offset, mv)
        with self._lock:
            self._flush_if_full()

    def _write_range(self, offset: int, mv: memoryview) -> None:
        """Write with the range lock held by the caller."""
        for l1i, start, n in self._table_chunks(offset, len(mv)):
            rel = start - offset
            if self.extended_l2:
                with self._lock:
                    self._write_in_table_ext(l1i, start, mv[rel:rel + n])
            elif (start ^ (start + n - 1)) >> self.cluster_bits == 0:
                self._write_in_cluster(l1i, start, mv[rel:rel + n])
            else:
                self._write_in_table(l1i, start, mv[rel:rel + n])

    def _read_zeroed(self, mv: memoryview, offset: int) -> None:
        # readers hold their clusters shared: none can be freed and reused under them
        cb = self.cluster_bits
        with self._ranges.hold(offset >> cb, ((offset + len(mv) - 1) >> cb) + 1, False):
            Qcow2Image._read_zeroed(self, mv, offset)

    def _old_content(self, cluster: int) -> bytearray:
        """What the guest sees in one cluster now (used for copy-on-write)."""
        return self._old_range(cluster * self.cluster_size, self.cluster_size)

    def _old_range(self, start: int, length: int) -> bytearray:
        """What the guest sees in a range now; zeros past the end of the image."""
        buf = bytearray(length)
        n = min(length, self.size - start)
        if n > 0:
            # the caller holds these clusters exclusively: read without the range lock
            Qcow2Image._read_zeroed(self, memoryview(buf)[:n], start)
        return buf

    def data_file_mismatch(self, guest: int, host: int, l2_index: int) -> None:
        """A misplaced cluster in the external data file (see the reader's method):
        refused, and the image marked corrupt, for a read as for a write.  (QEMU 7.2
        finds it on reads only and writes a COPIED cluster in place, over another
        guest cluster's data; qcow2py refuses the write too.)"""
        journal = getattr(self, "journal", None)
        if journal is None or journal.corrupt_reason:
            super().data_file_mismatch(guest, host, l2_index)       # raises
            return
        with self._lock:
            journal.mark_corrupt(self.filename,
                                 self.data_file_mismatch_text(guest, host, l2_index))

    def _check_external_targets(self, c0: int, idx: np.ndarray, targets: np.ndarray,
                                keep: np.ndarray) -> None:
        """Before a write reuses host clusters (``keep``) of an external data file:
        each must sit at its guest offset."""
        guest = np.arange(c0, c0 + targets.size, dtype=np.int64) << self.cluster_bits
        bad = np.flatnonzero(keep & (targets != guest))
        if bad.size:
            j = int(bad[0])
            self.data_file_mismatch(int(guest[j]), int(targets[j]), int(idx[j]))

    def _put(self, data, host: int) -> None:
        self._overlap_check(host, len(data))
        self.data_storage.pwrite(data, host)

    # ------------------------------------------------------------ extended L2
    def _write_in_table_ext(self, l1i: int, start: int, mv: memoryview) -> None:
        """Writes with subclusters: only the touched subclusters become allocated.

        Subclusters not written keep their state (unallocated ones still read
        from the backing file), so a small write costs one subcluster of
        copy-on-write instead of a cluster.
        """
        cs, cb = self.cluster_size, self.cluster_bits
        sc = cs >> 5
        per = cs // 16
        end = start + len(mv)
        l2 = self._writable_l2(l1i)
        released = []
        for c in range((start >> cb), ((end - 1) >> cb) + 1):
            i = c % per
            e, bm = int(l2[2 * i]), int(l2[2 * i + 1])
            g = c * cs
            a, b = max(start, g) - g, min(end, g + cs) - g
            s0, s1 = a // sc, -(-b // sc)
            rng = ((1 << s1) - 1) ^ ((1 << s0) - 1)
            data = mv[g + a - start:g + b - start]
            compressed = bool(e & OFLAG_COMPRESSED)
            copied = bool(e & OFLAG_COPIED)
            host = e & int(_OFFSET_MASK)
            owned = not compressed and copied and (host != 0 or self._external)
            if owned and self._external and host != g:
                self.data_file_mismatch(g, host, i)
            alloc, zero = bm & 0xFFFFFFFF, bm >> 32
            edge_cow = (a % sc and not (alloc >> s0) & 1) or (b % sc and not (alloc >> (s1 - 1)) & 1)
            if owned:
                if edge_cow:
                    buf = self._old_range(g + s0 * sc, (s1 - s0) * sc)
                    buf[a - s0 * sc:b - s0 * sc] = data
                    self._put(buf, host + s0 * sc)
                else:
                    self._put(data, host + a)
                new_host = host
            else:
                new_host = g if self._external else self.allocate(1)
                if compressed or host:
                    # copy the whole cluster: its allocated subclusters move with it
                    buf = self._old_content(c)
                    buf[a:b] = data
                    self._put(buf, new_host)
                    if compressed:
                        alloc, zero = 0xFFFFFFFF, 0
                    released.append(e)
                else:
                    buf = self._old_range(g + s0 * sc, (s1 - s0) * sc)
                    buf[a - s0 * sc:b - s0 * sc] = data
                    self._put(buf, new_host + s0 * sc)
            l2[2 * i] = np.uint64(new_host | OFLAG_COPIED)
            l2[2 * i + 1] = np.uint64(((zero & ~rng) << 32) | (alloc | rng))
        if released:
            self._release(np.array(released, dtype=np.uint64))
        self._touch_l2(l1i)

    def _write_in_table(self, l1i: int, start: int, mv: memoryview) -> None:
        """Write within one L2 table: plan under the metadata lock, move data without
        it (the caller holds the clusters exclusively), then commit the L2 entries."""
        cs, cb = self.cluster_size, self.cluster_bits
        length = len(mv)
        c0, c1 = start >> cb, ((start + length - 1) >> cb) + 1
        n = c1 - c0
        head_partial = start % cs != 0
        tail_partial = (start + length) % cs != 0
        idx = np.arange(c0, c1, dtype=np.int64) % (cs // 8)
        with self._lock:                                    # 1. plan
            entries = self._writable_l2(l1i)[idx].copy()
            compressed = (entries & _COMPRESSED) != 0
            hosts = (entries & _OFFSET_MASK).astype(np.int64)
            hosts[compressed] = 0
            copied = (entries & _COPIED) != 0
            zero = (entries & _ZERO) != 0
            has_host = (hosts != 0) | (copied & self._external)
            inplace = ~compressed & has_host & copied & ~zero
            reuse = ~compressed & has_host & copied & zero       # preallocated zero cluster
            alloc = ~(inplace | reuse)
            targets = hosts.copy()
            if self._external:
                self._check_external_targets(c0, idx, targets, ~alloc)
            m = int(alloc.sum())
            if m and self._external:
                targets[alloc] = np.arange(c0, c1, dtype=np.int64)[alloc] * cs
            elif m:
                targets[alloc] = self.allocate(m) + np.arange(m, dtype=np.int64) * cs
            writes = self._plan_writes(start, length, c0, targets, inplace,
                                       head_partial, tail_partial)
            cow = {}
            for host, kind, a, _, size in writes:
                self._overlap_check(host, size)
                if kind == "cow":
                    cow[a] = self._cow_source(int(entries[a // cs - c0]),
                                              bool(alloc[a // cs - c0]), a, host)
        for host, kind, a, b, _ in writes:                  # 2. data
            if kind == "cow":
                g = a
                lo, hi = max(start, g), min(start + length, g + cs)
                zero_old, virgin = cow[g]
                if virgin:
                    # a new cluster past the end of the file reads as zeros already:
                    # only the new bytes are written (flush extends the file over it)
                    self.data_storage.pwrite(mv[lo - start:hi - start], host + lo - g)
                    continue
                # copy-on-write: the old content, read before the L2 entry changes
                buf = bytearray(cs) if zero_old else self._old_content(g // cs)
                buf[lo - g:hi - g] = mv[lo - start:hi - start]
                self.data_storage.pwrite(buf, host)
            else:
                self.data_storage.pwrite(mv[a:b], host)
        changed = alloc | reuse
        if changed.any():                                   # 3. commit
            with self._lock:
                l2 = self._writable_l2(l1i)
                self._release(entries[alloc])
                l2[idx[changed]] = targets[changed].astype(np.uint64) | _COPIED
                self._touch_l2(l1i)

    def _write_in_cluster(self, l1i: int, start: int, mv: memoryview) -> None:
        """:meth:`_write_in_table` for a write inside one cluster, with scalars (the
        same plan, data and commit steps; random I/O is mostly such writes)."""
        cs, cb = self.cluster_size, self.cluster_bits
        length = len(mv)
        g = (start >> cb) << cb
        i = (start >> cb) % (cs // 8)
        within = start - g
        with self._lock:                                    # 1. plan
            e = int(self._writable_l2(l1i)[i])
            compressed = bool(e & OFLAG_COMPRESSED)
            host = 0 if compressed else e & int(_OFFSET_MASK)
            copied = bool(e & OFLAG_COPIED)
            has_host = host != 0 or (copied and self._external)
            owned = not compressed and has_host and copied
            inplace = owned and not e & 1
            alloc = not owned                       # else in place, or a preallocated zero
            if alloc:
                target = g if self._external else self.allocate(1)
            else:
                target = host
                if self._external and host != g:
                    self.data_file_mismatch(g, host, i)
            whole = within == 0 and length == cs
            if inplace or whole:
                self._overlap_check(target + within, length)
                cow = None
            else:
                self._overlap_check(target, cs)
                cow = self._cow_source(e, alloc, g, target)
        if cow is None:                                     # 2. data
            self.data_storage.pwrite(mv, target + within)
        elif cow[1]:
            # a new cluster past the end of the file: only the new bytes (see _cow_source)
            self.data_storage.pwrite(mv, target + within)
        else:
            buf = bytearray(cs) if cow[0] else self._old_content(g >> cb)
            buf[within:within + length] = mv
            self.data_storage.pwrite(buf, target)
        if not inplace:                                     # 3. commit
            with self._lock:
                l2 = self._writable_l2(l1i)
                if alloc and (compressed or (host and not self._external)):
                    self._release(np.array([e], dtype=np.uint64))
                l2[i] = np.uint64(target | OFLAG_COPIED)
                self._touch_l2(l1i)

    def _cow_source(self, entry: int, allocated: bool, guest: int, host: int):
        """For a copy-on-write cluster: (reads as zeros now, new host cluster untouched).

        The old content is known to be zeros, without a read, for a zero cluster
        and for an unallocated one with nothing (or a too short backing file)
        below.  A newly allocated host cluster at or past the end of the file
        has never been written: it reads as zeros, so a zero copy-on-write
        need not write anything there.  Called with the metadata lock held.
        """
        if entry & OFLAG_COMPRESSED:                                   # compressed
            return False, False
        if entry & 1:                                           # zero flag
            zero_old = True
        elif entry & int(_OFFSET_MASK) or (entry & OFLAG_COPIED and self._external):
            zero_old = False
        else:
            zero_old = self.backing is None or guest >= self.backing.size
        virgin = zero_old and allocated and not self._external and \
            host >= self.data_storage.size()
        return zero_old, virgin

    def _plan_writes(self, start, length, c0, targets, inplace, head_partial, tail_partial):
        """The pwrites of one table's write: ``(host, kind, a, b, size)`` tuples.

        Partial edge clusters that are not written in place get a whole-cluster
        copy-on-write buffer (kind "cow", ``a`` = guest offset of the cluster);
        the rest are slices ``mv[a:b]`` of the caller's data, merged where the
        host clusters are contiguous.  ``size`` is the bytes written at ``host``.
        """
        cs = self.cluster_size
        n = targets.size
        out = []
        first, last = 0, n
        if head_partial:
            if inplace[0]:
                b = min(length, cs - start % cs)
                out.append((int(targets[0]) + start % cs, "data", 0, b, b))
            else:
                out.append((int(targets[0]), "cow", c0 * cs, 0, cs))
            first = 1
        if tail_partial and n - 1 >= first:
            g = (c0 + n - 1) * cs
            if inplace[n - 1]:
                out.append((int(targets[n - 1]), "data", g - start, length, length - (g - start)))
            else:
                out.append((int(targets[n - 1]), "cow", g, 0, cs))
            last = n - 1
        if last > first:
            t = targets[first:last]
            brk = np.flatnonzero(np.diff(t) != cs) + 1
            bounds = np.concatenate(([0], brk, [t.size]))
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
                g = (c0 + first + a) * cs - start
                out.append((int(t[a]), "data", g, g + (b - a) * cs, (b - a) * cs))
        return out
