"""The writable driver's metadata state: the L1 table, the writable L2 tables
(cached, dirty set), host-cluster allocation, the overlap map that keeps data
off metadata, and the hand-over of dirty metadata to the journal.

The class chain of the writable driver, one job per module:
``state.WriterState`` (this) → ``write.WriteAlgorithm`` → ``zero.Zeroing`` →
``bulk.BulkMapping`` → ``image.WritableQcow2Image`` (the façade), each module
importing only the one below.
"""

from __future__ import annotations


from ..lazyimport import numpy as np

from ..errors import CorruptImageError, ImageClosedError
from ..format.l2 import (L1E_OFFSET_MASK, U64_COMPRESSED as _COMPRESSED, U64_COPIED as _COPIED,
                         U64_OFFSET_MASK as _OFFSET_MASK, compressed_fields)
from .read import Qcow2Image


#: flush metadata by itself once this many L2 tables are dirty (bounds memory)
MAX_DIRTY_L2 = 256


class WriterState(Qcow2Image):
    """L1/L2 tables, allocation and overlap checks of a qcow2 image opened "r+"
    (the attributes are set up by :class:`~qcow2py.qcow2.image.WritableQcow2Image`)."""

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
        if off and l1_index not in self._l2:
            self._check_l2_placement(off)
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
        new = self.allocate(1)
        self._overlap_check(new, self.cluster_size)
        self._l2.pop(l1_index, None)
        self._l2[l1_index] = content
        self._dirty_l2.add(l1_index)
        self._set_l1(l1_index, new)
        if off:
            rc.free_later(np.array([off >> self.cluster_bits]))
        self._forget_table(l1_index)
        return content

    def _check_l2_placement(self, off: int) -> None:
        """An L2 table about to be updated in place must not lie on other metadata
        (QEMU's overlap check for writes of active L2 tables): refuse, mark corrupt."""
        h, cs, cb = self.header, self.cluster_size, self.cluster_bits
        c = off >> cb
        spans = [(0, cs), (h.l1_table_offset, h.l1_size * 8),
                 (h.refcount_table_offset, h.refcount_table_clusters * cs)]
        if h.nb_snapshots:
            spans.append((h.snapshots_offset, 1))
        if h.bitmaps is not None:
            spans.append((h.bitmaps.directory_offset, h.bitmaps.directory_size))
        hit = any(n > 0 and start >> cb <= c <= (start + n - 1) >> cb for start, n in spans)
        rt = self.refcounts.reftable
        if hit or bool(np.any((rt >> cb) == c) and c):
            self.journal.mark_corrupt(self.filename,
                                      f"L2 table at {off:#x} overlaps other metadata")

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

    def allocate(self, n: int) -> int:
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
            self.journal.mark_corrupt(self.filename, f"write to host cluster {hit} "
                                      f"({host:#x}+{length}) would overwrite metadata")

    # ------------------------------------------------------------ guest writes
    def _check_range(self, offset: int, length: int) -> None:
        if self._closed:
            raise ImageClosedError(f"image {self.filename!r} is closed")
        if self.journal.corrupt_reason:
            raise CorruptImageError(f"{self.filename}: image was marked corrupt: "
                                    f"{self.journal.corrupt_reason}")
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

    def _touch_l2(self, l1i: int) -> None:
        self._dirty_l2.add(l1i)
        self._forget_table(l1i)
        # the reader keeps the last decompressed cluster by its stream offset: a
        # released stream's bytes may be reused by a new stream at that offset
        self._last_cluster = (-1, b"")

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
            coff, nsect = compressed_fields(e, cb)
            coff, nsect = coff.astype(np.int64), nsect.astype(np.int64) + 1
            first = (coff & ~511) >> cb
            last = ((coff & ~511) + nsect * 512 - 1) >> cb
            for f, l in zip(first.tolist(), last.tolist()):
                clusters.append(np.arange(f, l + 1, dtype=np.int64))
        if clusters:
            self.refcounts.free_later(np.concatenate(clusters))

    def _mark_bitmaps(self, offset: int, length: int) -> None:
        """Mark a changed guest range in every enabled bitmap."""
        if length > 0:
            for b in self._tracking:
                b.mark(offset, length)

    # ------------------------------------------------------------ flushing
    def _flush_if_full(self) -> None:
        if len(self._dirty_l2) >= MAX_DIRTY_L2:
            self.flush_metadata()

    def flush_metadata(self) -> None:
        """Hand the dirty metadata to the journal, which writes it in its crash-safe
        order (:meth:`~qcow2py.qcow2.journal.Journal.commit`)."""
        self.journal.commit(self.refcounts,
                            self._write_dirty_l2 if self._dirty_l2 else None,
                            self._write_l1 if self._dirty_l1 else None,
                            None if self._external else self._file_size)
        self._metadata_map = None

    def metadata_moved(self) -> None:
        """Metadata clusters changed outside the L1/L2 tables (bitmaps stored, refcount
        structures rebuilt): the overlap map is rebuilt on next use."""
        self._metadata_map = None

    def _write_dirty_l2(self) -> None:
        st = self.storage
        for l1i in sorted(self._dirty_l2, key=lambda i: int(self._l1[i])):
            st.pwrite(self._l2[l1i].astype(">u8").tobytes(), int(self._l1[l1i]))
        self._dirty_l2.clear()

    def _write_l1(self) -> None:
        self.storage.pwrite(self._l1_raw.astype(">u8").tobytes(), self.header.l1_table_offset)
        self._dirty_l1 = False
