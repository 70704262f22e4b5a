"""The qcow2 side of ``qemu-img resize`` and of header changes made from outside
the write path (rebase, snapshots, amend): :class:`Resizing`, between the bulk
mapping and the writable façade in the driver's class chain.

Growing past what the L1 table maps moves the L1 table crash-safely: the new
table and its refcounts are made durable first, then one synced header write
switches to it together with the new size, and only then is the old one freed;
a crash leaks at most one of the two tables.  Shrinking releases every cluster
past the new end first.  What is format-independent (qemu-img's refusals, the
zero-fill of an area a longer backing file would show) is
:meth:`qcow2py.image.Image.resize`.
"""

from __future__ import annotations

from typing import Optional

from ..lazyimport import numpy as np
from bitarray import bitarray

from ..format.header import COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY
from .bulk import BulkMapping
from .overlap import Kind


class Resizing(BulkMapping):
    """Virtual-size changes and header switches of a writable qcow2 layer."""

    # ------------------------------------------------------------ header
    def write_header(self) -> None:
        """Flush everything, then write ``self.header`` to cluster 0 (one synced write,
        the journal's header switch): the switch point of metadata changes made
        outside the write path (snapshots, amend)."""
        with self._lock:
            self.flush_metadata()
            self.journal.write_header()

    def set_backing(self, backing_file: Optional[str],
                    backing_format: Optional[str] = None) -> None:
        """Name another backing file in the header (rebase); None or "" removes it.

        Everything written so far is made durable first (a safe rebase copies
        data before the switch), then cluster 0 is rewritten in one synced
        write.  The open chain is not changed: reopen to read through it.
        """
        with self._lock:
            self.flush_metadata()
            h = self.header
            old = (h.backing_file, h.backing_format)
            h.backing_file = backing_file or None
            h.backing_format = backing_format if backing_file else None
            try:
                self.journal.write_header()
            except BaseException:
                h.backing_file, h.backing_format = old
                raise

    def reload_tables(self) -> None:
        """Forget cached L1/L2 tables, snapshots and the refcount mode and read them
        again from the file and header, after metadata was changed through
        ``storage``, ``refcounts`` and ``header`` directly (snapshots and amend do
        so, after a :meth:`flush`)."""
        with self._lock:
            self.flush_metadata()
            h = self.header
            self._file_size = max(self._file_size, self.storage.size())
            raw = self.storage.pread(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
            self._l1_raw = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
            self._l1 = self._read_l1()
            self._l2.clear()
            self._dirty_l2.clear()
            self.forget_tables()
            self.snapshots = self._read_snapshots()
            self.journal.template.invalidate()
            self.journal.lazy = bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS)
            self.journal.marked_dirty = bool(h.incompatible_features & INCOMPAT_DIRTY)

    # ------------------------------------------------------------ size
    def set_size(self, new_size: int, *, shrink: bool = False,
                 preallocation: str = "off") -> None:
        """Change this layer's virtual size (the qcow2 part of
        :meth:`~qcow2py.image.Image.resize`, which also zero-fills what a longer
        backing file would show).  A grow with ``preallocation`` other than "off"
        then maps the new clusters as ``qemu-img resize --preallocation`` does
        (a partial cluster at the old end over a backing file is left to the
        zero-fill, which copies its head from the backing file)."""
        with self._lock:
            self._check_open()
            new_size = self.check_resize(new_size, shrink)
            grow_from = self.size
            # persistent bitmaps follow the size (stored on close); an inconsistent
            # one refuses the resize, as QEMU refuses it
            bitmap_bits = [b.bits for b in self.bitmaps]
            h, cs, cb = self.header, self.cluster_size, self.cluster_bits
            per_l2 = cs // (16 if self.extended_l2 else 8)
            need = -(-new_size // (cs * per_l2))
            self.flush_metadata()
            old_l1 = None
            if new_size < self.size:
                self._drop_tail(new_size, need)
            elif need > h.l1_size:
                n_clusters = -(-need * 8 // cs)
                new_off = self.allocate(n_clusters)
                raw = np.zeros(need, dtype=np.uint64)
                raw[:self._l1_raw.size] = self._l1_raw
                # a new active L1 table: checked against everything but the old one
                self.journal.write_metadata(Kind.ACTIVE_L1, new_off, raw.astype(">u8").tobytes())
                self.flush_metadata()       # the new table and its refcounts are durable
                old_l1 = (h.l1_table_offset, h.l1_size)
                self._l1_raw = raw
                self._l1 = np.concatenate([self._l1, np.zeros(need - self._l1.size,
                                                              dtype=self._l1.dtype)])
                h.l1_table_offset, h.l1_size = new_off, need
            h.size = new_size
            self.journal.write_header()     # the switch: one synced write of cluster 0
            self.size = new_size
            if self.data_storage is not self.storage and \
                    self.data_storage.size() != new_size:
                self.data_storage.truncate(new_size)    # as QEMU sizes the data file
            for b, bits in zip(self.bitmaps, bitmap_bits):
                _fit_bits(bits, b.nbits)
            self.journal.template.invalidate()
            if old_l1 is not None and old_l1[1]:
                first = old_l1[0] >> cb
                self.refcounts.free_later(np.arange(first, first + -(-old_l1[1] * 8 // cs),
                                                    dtype=np.int64))
                self.flush_metadata()
            if preallocation != "off" and new_size > grow_from:
                start = grow_from
                if self.backing is not None:
                    start = -(-start // cs) * cs
                if start < new_size:
                    self.preallocate(preallocation, start)

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
        self.flush_metadata()
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
            self.flush_metadata()


def _fit_bits(bits: bitarray, nbits: int) -> None:
    """Cut or extend (with clear bits) a bitmap's bits in place to ``nbits``, as QEMU
    truncates a dirty bitmap with the image."""
    if len(bits) > nbits:
        del bits[nbits:]
    elif len(bits) < nbits:
        grown = bitarray(nbits - len(bits), endian="little")
        grown.setall(0)
        bits.extend(grown)
