"""The writable driver's metadata state: the L1 table, the writable L2 tables
(cached, dirty set), host-cluster allocation, the overlap checks that keep data
and metadata writes off other metadata (QEMU's "cached" template, kept by
:mod:`.overlap`, enforced by the journal), and the hand-over of dirty metadata
to the journal.

The class chain of the writable driver, one job per module:
``state.WriterState`` (this) → ``write.WriteAlgorithm`` → ``zero.Zeroing`` →
``bulk.BulkMapping`` → ``image.WritableQcow2Image`` (the façade), each module
importing only the one below.
"""

from __future__ import annotations


from ..lazyimport import numpy as np

from ..errors import CorruptImageError, ImageClosedError
from ..format.snapshot import snapshot_table_size
from ..format.l2 import (L1E_OFFSET_MASK, U64_COMPRESSED as _COMPRESSED, U64_COPIED as _COPIED,
                         U64_OFFSET_MASK as _OFFSET_MASK, compressed_fields)
from .overlap import Kind, MetadataLayout
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
        # a new table of kind "active L2": checked now, before anything refers to it
        self.journal.check_write(Kind.ACTIVE_L2, new, self.cluster_size)
        self._l2.pop(l1_index, None)
        self._l2[l1_index] = content
        self._dirty_l2.add(l1_index)
        self._set_l1(l1_index, new)
        if off:
            rc.free_later(np.array([off >> self.cluster_bits]))
        self._forget_table(l1_index)
        return content

    def _check_l2_placement(self, off: int) -> None:
        """An L2 table about to be updated in place must not lie on other metadata:
        refused now, before the guest data is written (QEMU refuses the table's
        write back, later; see :meth:`~qcow2py.qcow2.journal.Journal.check_write`)."""
        self.journal.check_write(Kind.ACTIVE_L2, off, self.cluster_size)

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

    def allocate(self, n: int, fresh_from: int = 0) -> int:
        """Allocate ``n`` contiguous host clusters; returns the offset of the first
        (at or after cluster ``fresh_from``: see :meth:`RefcountManager.allocate`)."""
        host = self.refcounts.allocate(n, fresh_from)
        self._file_size = max(self._file_size, host + n * self.cluster_size)
        return host

    def _set_l1(self, l1_index: int, l2_offset: int) -> None:
        self._l1_raw[l1_index] = np.uint64(l2_offset) | _COPIED
        self._l1[l1_index] = l2_offset
        self._dirty_l1 = True
        # a new L2 table joins the overlap template without a rebuild (rebuilding
        # it for every new table made preallocation quadratic in the tables); a
        # replaced table stays in it until its clusters are freed (the flush),
        # which makes the template rebuild
        self.journal.template.add_active_l2(l2_offset)

    # ------------------------------------------------------------ overlap checks
    def metadata_layout(self) -> MetadataLayout:
        """Where the metadata lies now (what the overlap template is built from)."""
        h = self.header
        return MetadataLayout(h, self._l1, self.refcounts.reftable, self.snapshots,
                              snapshot_table_size(self.snapshots) if h.nb_snapshots else 0)

    def _overlap_check(self, host: int, length: int) -> None:
        """A guest data write of ``length`` bytes at ``host`` must not land on metadata."""
        if self._external:
            return          # data goes to the external file, metadata stays in this one
        self.journal.check_write(Kind.OTHER, host, length)

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

    def metadata_moved(self) -> None:
        """Metadata clusters changed outside the L1/L2 tables (bitmaps stored, refcount
        structures rebuilt): the overlap template is rebuilt on next use."""
        self.journal.template.invalidate()

    def _write_dirty_l2(self) -> None:
        order = sorted(self._dirty_l2, key=lambda i: int(self._l1[i]))
        self.journal.write_metadata_many(Kind.ACTIVE_L2, self.cluster_size,
                                         [int(self._l1[i]) for i in order],
                                         (self._l2[i].astype(">u8").tobytes() for i in order))
        self._dirty_l2.clear()

    def _write_l1(self) -> None:
        self.journal.write_metadata(Kind.ACTIVE_L1, self.header.l1_table_offset,
                                    self._l1_raw.astype(">u8").tobytes())
        self._dirty_l1 = False
