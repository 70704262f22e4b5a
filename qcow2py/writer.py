"""Writing qcow2 images: allocation, copy-on-write, zero clusters, discard.

Crash safety
------------
Guest data goes straight to the file; metadata (L2 tables, the L1 table,
refcount blocks, the refcount table) is kept in memory and written back by
:meth:`WritableQcow2Image.flush` in this order, each step made durable with an
fsync before the next one starts:

1. refcount blocks (increments only) — together with all data written so far
   (and the file extended over new clusters past its old end: a partial write
   into such a cluster writes only its own bytes, the rest reads as zeros);
2. the refcount table (entries for new refcount blocks);
3. L2 tables (they may now point at the new data and the new clusters are
   already counted);
4. L1 entries (pointing at new L2 tables, which are on disk by now);
5. refcount *decrements* for references the steps above removed; only now do
   freed clusters become reusable.

A crash at any instant therefore leaves references that are all counted:
it may leak clusters, never corrupt.  With lazy refcounts the dirty bit is
made durable before the first L2 write and steps 1–2 need no separate fsync.

Locks (always taken in this order)
----------------------------------
1. ``_ranges``: a shared/exclusive lock on guest cluster ranges.  A write
   holds its clusters exclusively from planning to commit, so two writes to
   one cluster never interleave into a torn allocation; a read holds its
   clusters shared, so they cannot be freed and reused under it.
2. ``_lock``: one re-entrant lock serialising every metadata change (L1/L2,
   refcounts, flush).  A plain write takes it twice, briefly: to plan
   (classify clusters, allocate) and to commit its L2 entries; the data moves
   in between without it, so writes to different clusters run in parallel
   (the GIL is released in the system calls).  write_zeroes, discard and
   writes to extended-L2 images hold it throughout.
3. the reader's L2 cache lock (``_cache_lock``), innermost.

Persistent dirty bitmaps
------------------------
Opening "r+" marks every consistent bitmap *in_use* in the image (the
directory rewritten in place between a clear and a set of autoclear bit 0,
each synced); every write, write_zeroes and discard then marks the enabled
bitmaps in memory.  ``close`` stores them (see :mod:`qcow2py.bitmaps`): data,
tables and a new directory to new clusters, the metadata flush above, one
synced header switch, then the old clusters are freed like any other
decrement (step 5).  A crash before the switch leaves the bitmaps in_use:
inconsistent for QEMU and for qcow2py, as they should be.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from bitarray import bitarray, frozenbitarray

from . import bitmaps, locking, native
from .bitmaps import Bitmap, load_bits
from .errors import (BitmapError, CorruptImageError, FormatError, ImageClosedError,
                     UnsupportedFeatureError)
from .format.header import (AUTOCLEAR_KNOWN, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT,
                            INCOMPAT_DIRTY)
from .qcow2 import L1E_OFFSET_MASK, Qcow2Image
from .rangelock import RangeLock
from .refcounts import RefcountManager
from .image import open_file_storage
from .storage import Storage

_COPIED = np.uint64(1 << 63)
_COMPRESSED = np.uint64(1 << 62)
_ZERO = np.uint64(1)
_OFFSET_MASK = np.uint64(0x00FFFFFFFFFFFE00)
_INCOMPAT_FIELD = 72           # header offset of incompatible_features
#: flush metadata by itself once this many L2 tables are dirty (bounds memory)
MAX_DIRTY_L2 = 256


class WritableQcow2Image(Qcow2Image):
    """A qcow2 image opened "r+"."""

    def __init__(self, storage: Storage, filename: str, ctx) -> None:
        super().__init__(storage, filename, ctx)
        h = self.header
        try:
            self._refuse_unsupported(ctx.repair)
            fd = storage.fileno()
            self._locked_fd: Optional[int] = None
            if fd is not None and ctx.lock:
                locking.lock_for_write(fd, filename)
                self._locked_fd = fd
        except BaseException:
            self.close()
            raise
        self._lock = threading.RLock()
        self._ranges = RangeLock()
        if h.has_data_file and self.data_file_path is not None:
            # guest data lives in the external file, at host offset == guest offset
            ro = self.data_storage
            self.data_storage = open_file_storage(self.data_file_path, True,
                                                  getattr(ctx, "cache", "writeback"))
            ro.close()
        self._external = h.has_data_file
        self.refcounts = RefcountManager(storage, h)
        raw = storage.pread(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
        self._l1_raw = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        self._l2: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._dirty_l2: Set[int] = set()
        self._dirty_l1 = False
        self._metadata_map: Optional[np.ndarray] = None
        self._metadata_extra: List[int] = []
        self._lazy = bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS)
        self._marked_dirty = False
        self._corrupt_reason: Optional[str] = None
        if h.autoclear_features & ~AUTOCLEAR_KNOWN:
            # a program that does not know a feature must clear its autoclear bit (spec)
            h.autoclear_features &= AUTOCLEAR_KNOWN
            self._write_header()
        if h.incompatible_features & INCOMPAT_DIRTY and not ctx.repair:
            # refcounts may lag after a crash with lazy refcounts: rebuild them first
            result = self.check(repair="all")
            if result.corruptions or result.check_errors:
                self.close()
                raise CorruptImageError(f"{self.filename}: could not repair dirty image "
                                        f"({result.corruptions} corruptions left)")
        self._bitmaps_attached = False      # this writer keeps the bitmaps up to date
        self._bitmaps_dirty = False         # they must be stored on close
        self._tracking: List[Bitmap] = []   # the enabled, consistent ones
        if not ctx.repair:                  # check -r leaves bitmaps as they are
            try:
                bitmaps.attach(self)
            except BaseException:
                self._bitmaps_attached = self._bitmaps_dirty = False
                self.close()
                raise
            self._bitmaps_changed_state()

    def _refuse_unsupported(self, repair: bool) -> None:
        h = self.header
        if h.incompatible_features & INCOMPAT_CORRUPT and not repair:
            raise CorruptImageError(f"{self.filename}: image is marked corrupt; it can only be "
                                    f"opened read-only (or repaired with check -r all)")

    # ------------------------------------------------------------ bitmaps
    def add_bitmap(self, name: str, granularity: Optional[int] = None,
                   enabled: bool = True) -> Bitmap:
        """Add an empty persistent bitmap (stored when the image is closed).

        ``granularity``: bytes per bit, a power of two from 512 to 2 GiB
        (default: the cluster size clamped to [4 KiB, 64 KiB], as QEMU).
        Refusals raise :class:`~qcow2py.errors.BitmapError` with QEMU's message.
        """
        self._check_bitmaps_attached()
        with self._lock:
            gbits = bitmaps.check_new(self, name, granularity)
            bm = Bitmap(self, name, gbits, enabled)
            bm._bits = bitarray(bm.nbits, endian="little")
            bm._bits.setall(0)
            self.bitmaps.append(bm)
            self._bitmaps_dirty = True
            self._bitmaps_changed_state()
        return bm

    def remove_bitmap(self, name: str) -> None:
        """Remove a persistent bitmap (an inconsistent one too); its clusters are
        freed when the image is closed."""
        self._check_bitmaps_attached()
        with self._lock:
            bm = self.find_bitmap(name)
            self.bitmaps.remove(bm)
            bm._removed = True
            self._bitmaps_dirty = True
            self._bitmaps_changed_state()

    def _check_bitmaps_attached(self) -> None:
        if self._closed:
            raise ImageClosedError(f"image {self.filename!r} is closed")
        if not self._bitmaps_attached:
            raise ValueError(f"image {self.filename!r} was opened for repair: its bitmaps "
                             f"cannot be changed")

    def _check_bitmap_writable(self, bm: Bitmap) -> None:
        self._check_bitmaps_attached()
        if bm._removed or all(b is not bm for b in self.bitmaps):
            raise BitmapError(f"Dirty bitmap '{bm.name}' not found")

    def _load_bitmap_bits(self, bm: Bitmap):
        if self._closed:
            raise ImageClosedError(f"image {self.filename!r} is closed")
        if bm.entry is None:
            bits = bitarray(bm.nbits, endian="little")
            bits.setall(0)
            return bits
        # the clusters read here stay allocated until close has stored the bitmap anew
        bits = load_bits(self.storage, bm.entry, self.size, self.cluster_size,
                         self.storage.size())
        return bits if self._bitmaps_attached else frozenbitarray(bits)

    def _bitmaps_changed_state(self) -> None:
        self._tracking = [b for b in self.bitmaps if b.enabled and not b.inconsistent]

    def _mark_bitmaps(self, offset: int, length: int) -> None:
        """Mark a changed guest range in every enabled bitmap."""
        if length > 0:
            for b in self._tracking:
                b._mark(offset, length)

    # ------------------------------------------------------------ header
    def _write_header(self) -> None:
        self.storage.pwrite(self.header.encode(), 0)
        self.storage.fsync()

    def set_backing(self, backing_file: Optional[str], backing_format: Optional[str] = None) -> None:
        """Name another backing file in the header (rebase); None or "" removes it.

        Everything written so far is made durable first (a safe rebase copies
        data before the switch), then cluster 0 is rewritten in one synced
        write.  The open chain is not changed: reopen to read through it.
        """
        with self._lock:
            self._flush_metadata()
            h = self.header
            old = (h.backing_file, h.backing_format)
            h.backing_file = backing_file or None
            h.backing_format = backing_format if backing_file else None
            try:
                self._write_header()
            except BaseException:
                h.backing_file, h.backing_format = old
                raise

    def write_header(self) -> None:
        """Flush everything, then write ``self.header`` to cluster 0 (one synced write):
        the switch point of metadata changes made outside this class (snapshots)."""
        with self._lock:
            self._flush_metadata()
            self._write_header()

    def reload_tables(self) -> None:
        """Forget cached L1/L2 tables, snapshots and the refcount mode and read them
        again from the file and header, after metadata was changed through
        ``storage``, ``refcounts`` and ``header`` directly (snapshots and amend do
        so, after a :meth:`flush`)."""
        with self._lock:
            self._flush_metadata()
            h = self.header
            self._file_size = max(self._file_size, self.storage.size())
            raw = self.storage.pread(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
            self._l1_raw = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
            self._l1 = self._read_l1()
            self._l2.clear()
            for i in range(max(self._l1.size, 1)):
                self._forget_table(i)
            self.snapshots = self._read_snapshots()
            self._metadata_map = None
            self._lazy = bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS)
            self._marked_dirty = bool(h.incompatible_features & INCOMPAT_DIRTY)

    def set_size(self, new_size: int, *, shrink: bool = False) -> None:
        """Change this layer's virtual size (the qcow2 part of :meth:`Image.resize`, which
        also zero-fills what a longer backing file would show; see :mod:`qcow2py.resize`).

        Growing past what the L1 table maps moves the L1 table: a new one is
        written and made durable (data, then refcounts), then one synced header
        write switches to it together with the new size, and only then is the
        old one freed; a crash leaks at most one of the two tables.  Shrinking
        (``shrink``) releases every cluster past the new end first.
        """
        from .resize import check_resize
        with self._lock:
            self._check_open()
            new_size = check_resize(self, new_size, shrink)
            h, cs, cb = self.header, self.cluster_size, self.cluster_bits
            per_l2 = cs // (16 if self.extended_l2 else 8)
            need = -(-new_size // (cs * per_l2))
            self._flush_metadata()
            old_l1 = None
            if new_size < self.size:
                self._drop_tail(new_size, need)
            elif need > h.l1_size:
                n_clusters = -(-need * 8 // cs)
                new_off = self._allocate(n_clusters)
                self._overlap_check(new_off, n_clusters * cs)
                raw = np.zeros(need, dtype=np.uint64)
                raw[:self._l1_raw.size] = self._l1_raw
                self.storage.pwrite(raw.astype(">u8").tobytes(), new_off)
                self._flush_metadata()      # the new table and its refcounts are durable
                old_l1 = (h.l1_table_offset, h.l1_size)
                self._l1_raw = raw
                self._l1 = np.concatenate([self._l1, np.zeros(need - self._l1.size,
                                                              dtype=self._l1.dtype)])
                h.l1_table_offset, h.l1_size = new_off, need
            h.size = new_size
            self._write_header()            # the switch: one synced write of cluster 0
            self.size = new_size
            self._metadata_map = None
            if old_l1 is not None and old_l1[1]:
                first = old_l1[0] >> cb
                self.refcounts.free_later(np.arange(first, first + -(-old_l1[1] * 8 // cs),
                                                    dtype=np.int64))
                self._flush_metadata()

    def _drop_tail(self, new_size: int, need: int) -> None:
        """Release the clusters past ``new_size`` and the L2 tables past ``need`` entries."""
        cs, cb = self.cluster_size, self.cluster_bits
        first = -(-new_size // cs)
        clusters = []
        for r in self.layer_runs(first * cs, self.size - first * cs) if first * cs < self.size \
                else ():
            if r.allocated or r.offset is not None:
                clusters.append(np.arange(r.start >> cb, ((r.start + r.length - 1) >> cb) + 1,
                                          dtype=np.int64))
        if clusters:
            self.unmap_clusters(np.unique(np.concatenate(clusters)), zero=False)
        self._flush_metadata()
        tables = [i for i in range(need, self._l1_raw.size) if self._l1[i]]
        for i in tables:
            self.refcounts.free_later(np.array([int(self._l1[i]) >> cb], dtype=np.int64))
            self._l2.pop(i, None)
            self._dirty_l2.discard(i)
            self._l1_raw[i] = 0
            self._l1[i] = 0
            self._forget_table(i)
        if tables:
            self._dirty_l1 = True
            self._flush_metadata()

    def _set_incompat(self, bit: int, on: bool) -> None:
        h = self.header
        value = (h.incompatible_features | bit) if on else (h.incompatible_features & ~bit)
        self.storage.pwrite(struct.pack(">Q", value), _INCOMPAT_FIELD)
        self.storage.fsync()
        h.incompatible_features = value

    def _clear_problem_bits(self) -> None:
        """After a successful full repair: clear the corrupt and dirty bits."""
        if self.header.incompatible_features & (INCOMPAT_CORRUPT | INCOMPAT_DIRTY):
            self._set_incompat(INCOMPAT_CORRUPT | INCOMPAT_DIRTY, False)
        self._marked_dirty = False

    def check(self, repair: Optional[str] = None):
        """``qemu-img check`` on this image; ``repair`` is None, "leaks" or "all"."""
        from .check import check_image, repair_image
        if repair is None:
            with self._lock:
                self._flush_metadata()
                return check_image(self)
        return repair_image(self, repair)

    def _mark_corrupt(self, why: str) -> None:
        try:
            self._set_incompat(INCOMPAT_CORRUPT, True)
        finally:
            self._corrupt_reason = why
        raise CorruptImageError(f"{self.filename}: marking image as corrupt: {why}")

    # ------------------------------------------------------------ L2 access
    def _l2_bytes(self, l1_index: int, l2_off: int) -> bytes:
        t = self._l2.get(l1_index)
        if t is not None:
            return t.astype(">u8").tobytes()
        return super()._l2_bytes(l1_index, l2_off)

    def _load_l2(self, l1_index: int) -> np.ndarray:
        t = self._l2.get(l1_index)
        if t is None:
            off = int(self._l1_raw[l1_index] & np.uint64(L1E_OFFSET_MASK))
            raw = self.storage.pread(off, self.cluster_size)
            t = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
            self._l2[l1_index] = t
            if len(self._l2) > 2 * MAX_DIRTY_L2:
                self._evict_clean()
        else:
            self._l2.move_to_end(l1_index)
        return t

    def _evict_clean(self) -> None:
        for key in list(self._l2):
            if len(self._l2) <= MAX_DIRTY_L2:
                break
            if key not in self._dirty_l2:
                del self._l2[key]

    def _writable_l2(self, l1_index: int) -> np.ndarray:
        """The L2 table for ``l1_index``, owned by the active L1 alone (allocated or COW'd)."""
        entry = self._l1_raw[l1_index]
        off = int(entry & np.uint64(L1E_OFFSET_MASK))
        if off and entry & _COPIED:
            return self._load_l2(l1_index)
        rc = self.refcounts
        if off and rc.get(off >> self.cluster_bits) == 1:
            # refcount says exclusive although COPIED was clear: just fix the flag
            self._set_l1(l1_index, off)
            return self._load_l2(l1_index)
        content = self._load_l2(l1_index).copy() if off else \
            np.zeros(self.cluster_size // 8, dtype=np.uint64)
        if off:
            # the old table stays with its other owners (snapshots): recompute COPIED
            ent = content[0::2] if self.extended_l2 else content     # a view
            ent[:] = np.where((ent & _COMPRESSED) != 0, ent & ~_COPIED,
                              self._with_copied_from_refcounts(ent))
        new = self._allocate(1)
        self._overlap_check(new, self.cluster_size)
        self._l2.pop(l1_index, None)
        self._l2[l1_index] = content
        self._dirty_l2.add(l1_index)
        self._set_l1(l1_index, new)
        if off:
            rc.free_later(np.array([off >> self.cluster_bits]))
        self._forget_table(l1_index)
        return content

    def _with_copied_from_refcounts(self, entries: np.ndarray) -> np.ndarray:
        hosts = (entries & _OFFSET_MASK).astype(np.int64)
        live = (hosts != 0) & ((entries & _COMPRESSED) == 0)
        out = entries & ~_COPIED
        if live.any():
            counts = self.refcounts.get_many(hosts[live] >> self.cluster_bits)
            sub = out[live]
            sub[counts == 1] |= _COPIED
            out[live] = sub
        return out

    def _allocate(self, n: int) -> int:
        """Allocate ``n`` contiguous host clusters; returns the offset of the first."""
        rc = self.refcounts
        version = rc.layout_version
        host = rc.allocate(n)
        if rc.layout_version != version:
            self._metadata_map = None          # new refcount blocks or table
        self._file_size = max(self._file_size, host + n * self.cluster_size)
        return host

    def _set_l1(self, l1_index: int, l2_offset: int) -> None:
        self._l1_raw[l1_index] = np.uint64(l2_offset) | _COPIED
        self._l1[l1_index] = l2_offset
        self._dirty_l1 = True
        if self._metadata_map is not None:
            # a new L2 table joins the overlap map without a rebuild (rebuilding it
            # for every new table made preallocation quadratic in the tables); a
            # replaced table stays in it until the next flush rebuilds the map,
            # and it cannot be reused before that flush frees it
            extra = self._metadata_extra
            extra.append(l2_offset >> self.cluster_bits)
            if len(extra) >= 64:
                add = np.array(sorted(extra), dtype=np.int64)
                m = self._metadata_map
                self._metadata_map = np.insert(m, np.searchsorted(m, add), add)
                extra.clear()

    # ------------------------------------------------------------ overlap checks
    def _metadata_clusters(self) -> np.ndarray:
        """Sorted host cluster indexes holding metadata (QEMU's "cached" overlap template)."""
        if self._metadata_map is None:
            self._metadata_extra = []                  # see _set_l1
            h = self.header
            cb = self.cluster_bits
            parts = [np.array([0], dtype=np.int64)]

            def span(off: int, length: int) -> None:
                if length > 0:
                    parts.append(np.arange(off >> cb, ((off + length - 1) >> cb) + 1,
                                           dtype=np.int64))

            span(h.l1_table_offset, h.l1_size * 8)
            span(h.refcount_table_offset, h.refcount_table_clusters * self.cluster_size)
            rt = self.refcounts.reftable
            parts.append((rt[rt != 0] >> cb).astype(np.int64))
            parts.append((self._l1[self._l1 != 0] >> cb).astype(np.int64))
            if h.nb_snapshots:
                span(h.snapshots_offset, 1)
                for s in self.snapshots:
                    span(s.l1_table_offset, s.l1_size * 8)
            if h.bitmaps is not None:
                span(h.bitmaps.directory_offset, h.bitmaps.directory_size)
            self._metadata_map = np.unique(np.concatenate(parts))
        return self._metadata_map

    def _overlap_check(self, host: int, length: int) -> None:
        if self._external:
            return          # data goes to the external file, metadata stays in this one
        m = self._metadata_clusters()
        first, last = host >> self.cluster_bits, (host + length - 1) >> self.cluster_bits
        i = np.searchsorted(m, first)
        hit = int(m[i]) if i < m.size and m[i] <= last else None
        if hit is None:
            hit = next((c for c in self._metadata_extra if first <= c <= last), None)
        if hit is not None:
            self._mark_corrupt(f"write to host cluster {hit} ({host:#x}+{length}) "
                               f"would overwrite metadata")

    # ------------------------------------------------------------ guest writes
    def _check_range(self, offset: int, length: int) -> None:
        if self._closed:
            raise ImageClosedError(f"image {self.filename!r} is closed")
        if self._corrupt_reason:
            raise CorruptImageError(f"{self.filename}: image was marked corrupt: "
                                    f"{self._corrupt_reason}")
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        if offset + length > self.size:
            raise ValueError(f"write of {length} bytes at {offset} goes past the end of the "
                             f"image ({self.size} bytes)")

    def _table_chunks(self, offset: int, length: int):
        """Split a guest range at L2 table boundaries: (l1_index, start, length)."""
        span_bits = self.cluster_bits + (self.cluster_bits - (4 if self.extended_l2 else 3))
        pos, end = offset, offset + length
        while pos < end:
            l1i = pos >> span_bits
            n = min(end, (l1i + 1) << span_bits) - pos
            yield l1i, pos, n
            pos += n

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
            compressed = bool(e & (1 << 62))
            copied = bool(e & (1 << 63))
            host = e & int(_OFFSET_MASK)
            owned = not compressed and copied and (host != 0 or self._external)
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
                new_host = g if self._external else self._allocate(1)
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
            l2[2 * i] = np.uint64(new_host | (1 << 63))
            l2[2 * i + 1] = np.uint64(((zero & ~rng) << 32) | (alloc | rng))
        if released:
            self._release(np.array(released, dtype=np.uint64))
        self._touch_l2(l1i)

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
            compressed = bool(e & (1 << 62))
            host = e & int(_OFFSET_MASK)
            owned = not compressed and bool(e & (1 << 63)) and (host != 0 or self._external)
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
            m = int(alloc.sum())
            if m and self._external:
                targets[alloc] = np.arange(c0, c1, dtype=np.int64)[alloc] * cs
            elif m:
                targets[alloc] = self._allocate(m) + np.arange(m, dtype=np.int64) * cs
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
            compressed = bool(e & (1 << 62))
            host = 0 if compressed else e & int(_OFFSET_MASK)
            copied = bool(e & (1 << 63))
            has_host = host != 0 or (copied and self._external)
            owned = not compressed and has_host and copied
            inplace = owned and not e & 1
            alloc = not owned                       # else in place, or a preallocated zero
            if alloc:
                target = g if self._external else self._allocate(1)
            else:
                target = host
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
                l2[i] = np.uint64(target | (1 << 63))
                self._touch_l2(l1i)

    def _cow_source(self, entry: int, allocated: bool, guest: int, host: int):
        """For a copy-on-write cluster: (reads as zeros now, new host cluster untouched).

        The old content is known to be zeros, without a read, for a zero cluster
        and for an unallocated one with nothing (or a too short backing file)
        below.  A newly allocated host cluster at or past the end of the file
        has never been written: it reads as zeros, so a zero copy-on-write
        need not write anything there.  Called with the metadata lock held.
        """
        if entry & (1 << 62):                                   # compressed
            return False, False
        if entry & 1:                                           # zero flag
            zero_old = True
        elif entry & int(_OFFSET_MASK) or (entry & (1 << 63) and self._external):
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

    def _release(self, old_entries: np.ndarray) -> None:
        """Queue the refcount decrements for L2 entries that are being replaced."""
        if not old_entries.size:
            return
        cb = self.cluster_bits
        comp = (old_entries & _COMPRESSED) != 0
        std = old_entries[~comp]
        hosts = (std & _OFFSET_MASK).astype(np.int64)
        # external data clusters are not refcounted
        clusters = [hosts[hosts != 0] >> cb] if not self._external else []
        if comp.any():
            e = old_entries[comp]
            shift = np.uint64(62 - (cb - 8))
            coff = (e & ((np.uint64(1) << shift) - np.uint64(1))).astype(np.int64)
            nsect = ((e >> shift) & np.uint64((1 << (cb - 8)) - 1)).astype(np.int64) + 1
            first = (coff & ~511) >> cb
            last = ((coff & ~511) + nsect * 512 - 1) >> cb
            for f, l in zip(first.tolist(), last.tolist()):
                clusters.append(np.arange(f, l + 1, dtype=np.int64))
        if clusters:
            self.refcounts.free_later(np.concatenate(clusters))

    def _touch_l2(self, l1i: int) -> None:
        self._dirty_l2.add(l1i)
        self._forget_table(l1i)
        # the reader keeps the last decompressed cluster by its stream offset: a
        # released stream's bytes may be reused by a new stream at that offset
        self._last_cluster = (-1, b"")

    # ------------------------------------------------------------ compressed clusters
    def write_compressed(self, cluster: int, data, compressed: Optional[bytes] = None) -> None:
        """Store one whole guest cluster compressed, as ``qemu-img convert -c`` does.

        ``data`` is the cluster's content (the image's last cluster may be
        short); ``compressed`` may carry the stream already compressed with the
        image's codec (block-copy compresses on worker threads).  A cluster
        that does not shrink is written uncompressed.  Streams are packed back
        to back inside host clusters; each host cluster's refcount counts the
        streams in it.
        """
        cs, cb = self.cluster_size, self.cluster_bits
        data = bytes(data)
        if self._external:
            raise UnsupportedFeatureError("compressed clusters cannot be used with an external "
                                          "data file")
        if compressed is None:
            from .codec import compress_cluster
            compressed = compress_cluster(self.codec, data.ljust(cs, b"\0"))
        guest = cluster * cs
        self._check_range(guest, min(cs, self.size - guest))
        self._mark_bitmaps(guest, min(cs, self.size - guest))
        if len(compressed) >= cs:
            self.write(guest, data[:self.size - guest])
            return
        with self._ranges.hold(cluster, cluster + 1, True), self._lock:
            coff = self._alloc_bytes(len(compressed))
            self._put(compressed, coff)
            nsect = ((coff + len(compressed) - 1) >> 9) - (coff >> 9) + 1
            shift = 62 - (cb - 8)
            entry = np.uint64((1 << 62) | ((nsect - 1) << shift) | coff)
            clusters = np.array([cluster], dtype=np.int64)
            old = self._entries_of(clusters)
            self._set_entries(clusters, np.array([entry], dtype=np.uint64), np.uint64(0))
            self._release(old)
            self._flush_if_full()

    def _alloc_bytes(self, size: int) -> int:
        """Room for a compressed stream (``size`` < one cluster), packed after the previous one.

        It goes right after the previous stream when that fits in the same
        host cluster, or when the next host cluster allocated is the one that
        follows: the stream then spans the two (the format allows it, QEMU
        packs so, and ``qemu-img convert -c`` output is as small as QEMU's).
        Every host cluster a stream touches counts it in its refcount.
        """
        cs, cb = self.cluster_size, self.cluster_bits
        rc = self.refcounts
        off = getattr(self, "_free_byte", 0)
        shared = bool(off and off % cs) and rc.get(off >> cb) < rc.max_refcount
        if shared and cs - off % cs >= size:
            rc.increment(np.array([off >> cb], dtype=np.int64))
        else:
            new = self._allocate(1)
            if shared and new == (off >> cb) + 1 << cb:
                rc.increment(np.array([off >> cb], dtype=np.int64))
            else:
                off = new
        self._free_byte = off + size
        return off

    # ------------------------------------------------------------ bulk mapping (block-copy)
    def map_new_clusters(self, clusters: np.ndarray) -> np.ndarray:
        """Give unallocated guest clusters one contiguous run of new host clusters.

        ``clusters`` must be sorted guest cluster indexes whose L2 entries are
        unallocated (a fresh target).  Returns the host offset of each, so a
        copy can write the data straight there; the entries reach the disk
        with the next flush, after the data (crash-safe order).
        """
        clusters = np.asarray(clusters, dtype=np.int64)
        cs = self.cluster_size
        if not clusters.size:
            return np.zeros(0, dtype=np.int64)
        if self._tracking:
            brk = np.flatnonzero(np.diff(clusters) != 1) + 1
            for a, b in zip(np.r_[0, brk].tolist(), np.r_[brk, clusters.size].tolist()):
                g = int(clusters[a]) * cs
                self._mark_bitmaps(g, min(self.size, (int(clusters[b - 1]) + 1) * cs) - g)
        with self._lock:
            if self._external:
                hosts = clusters * cs
            else:
                hosts = self._allocate(clusters.size) + np.arange(clusters.size, dtype=np.int64) * cs
            self._set_entries(clusters, hosts.astype(np.uint64) | _COPIED,
                              np.uint64(0xFFFFFFFF))
            return hosts

    def unmap_clusters(self, clusters: np.ndarray, zero: bool) -> None:
        """Undo :meth:`map_new_clusters` for clusters that turned out all zero.

        The entries become unallocated (or zero clusters when ``zero``, to hide
        a backing file) and the host clusters are released.
        """
        clusters = np.asarray(clusters, dtype=np.int64)
        if not clusters.size:
            return
        with self._lock:
            old = self._entries_of(clusters)
            if zero and self.header.version >= 3:
                new, bm = (np.uint64(0), np.uint64(0xFFFFFFFF << 32)) if self.extended_l2 \
                    else (_ZERO, np.uint64(0))
            else:
                new, bm = np.uint64(0), np.uint64(0)
            self._set_entries(clusters, np.full(clusters.size, new, dtype=np.uint64), bm)
            self._release(old)

    def _entries_of(self, clusters: np.ndarray) -> np.ndarray:
        per = self.cluster_size // (16 if self.extended_l2 else 8)
        out = np.zeros(clusters.size, dtype=np.uint64)
        l1s = clusters // per
        for t in np.unique(l1s).tolist():
            sel = l1s == t
            l2 = self._writable_l2(t)
            idx = clusters[sel] % per
            out[sel] = l2[idx * 2] if self.extended_l2 else l2[idx]
        return out

    def _set_entries(self, clusters: np.ndarray, entries: np.ndarray, bitmap) -> None:
        per = self.cluster_size // (16 if self.extended_l2 else 8)
        l1s = clusters // per
        for t in np.unique(l1s).tolist():
            sel = l1s == t
            l2 = self._writable_l2(t)
            idx = clusters[sel] % per
            if self.extended_l2:
                l2[idx * 2] = entries[sel]
                l2[idx * 2 + 1] = bitmap
            else:
                l2[idx] = entries[sel]
            self._touch_l2(t)

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
        chunk = bytes(min(end - start, 1 << 20))
        for pos in range(start, end, len(chunk)):
            self.data_storage.pwrite(chunk[:min(len(chunk), end - pos)], pos)

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

    # ------------------------------------------------------------ flushing
    def _flush_if_full(self) -> None:
        if len(self._dirty_l2) >= MAX_DIRTY_L2:
            self._flush_metadata()

    def _flush_metadata(self) -> None:
        st, rc = self.storage, self.refcounts
        if not (self._dirty_l2 or self._dirty_l1 or rc.dirty):
            st.fsync()
            return
        if self._lazy and not self._marked_dirty and (self._dirty_l2 or self._dirty_l1):
            self._set_incompat(INCOMPAT_DIRTY, True)
            self._marked_dirty = True
        if self.data_storage is not st:
            self.data_storage.fsync()
        # 1: refcount increments, together with every data write so far (and the
        # file extended over new clusters that were only written in part)
        if not self._external and st.size() < self._file_size:
            st.truncate(self._file_size)
        if rc.dirty_blocks:
            rc.write_dirty_blocks()
        st.fsync()
        # 2: refcount table entries for new refcount blocks
        if rc.dirty_reftable:
            rc.write_reftable()
            st.fsync()
        # 3: L2 tables
        if self._dirty_l2:
            for l1i in sorted(self._dirty_l2, key=lambda i: int(self._l1[i])):
                st.pwrite(self._l2[l1i].astype(">u8").tobytes(), int(self._l1[l1i]))
            self._dirty_l2.clear()
            st.fsync()
        # 4: L1 table
        if self._dirty_l1:
            st.pwrite(self._l1_raw.astype(">u8").tobytes(), self.header.l1_table_offset)
            self._dirty_l1 = False
            st.fsync()
        # 5: decrements, now that no durable metadata refers to the freed clusters
        if rc.pending:
            rc.apply_frees()
            rc.write_dirty_blocks()
            st.fsync()
        self._metadata_map = None

    def flush(self) -> None:
        """Make every write issued so far durable (fsync included)."""
        if self._closed:
            raise ImageClosedError(f"image {self.filename!r} is closed")
        with self._lock:
            self._flush_metadata()

    def _close_layer(self) -> None:
        try:
            if hasattr(self, "_lock") and not self._corrupt_reason:
                with self._lock:
                    if self._bitmaps_dirty:
                        bitmaps.store(self)
                    self._flush_metadata()
                    if self._marked_dirty:
                        self._set_incompat(INCOMPAT_DIRTY, False)
                        self._marked_dirty = False
        finally:
            if getattr(self, "_locked_fd", None) is not None:
                locking.unlock(self._locked_fd)
                self._locked_fd = None
            super()._close_layer()
