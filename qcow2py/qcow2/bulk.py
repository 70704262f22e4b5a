"""What block-copy and create need in bulk: compressed clusters packed back to
back, whole runs of new clusters mapped at once (and unmapped when they turn
out zero), and QEMU's preallocation modes.
"""

from __future__ import annotations

from typing import Optional

from ..lazyimport import numpy as np

from ..errors import UnsupportedFeatureError
from ..format.codec import compress_cluster
from ..format.l2 import U64_COPIED as _COPIED, U64_ZERO as _ZERO, compressed_entry
from .zero import Zeroing


class BulkMapping(Zeroing):
    """Bulk mapping for block-copy and create."""

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
            entry = np.uint64(compressed_entry(coff, nsect, cb))
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
            new = self.allocate(1)
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
                hosts = self.allocate(clusters.size) + np.arange(clusters.size, dtype=np.int64) * cs
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

    def preallocate(self, mode: str, start: int = 0) -> None:
        """Allocate every L2 table and data cluster, as QEMU's preallocation does.

        "metadata" allocates each L2 table followed by its data clusters; "falloc"
        and "full" allocate the L2 tables first and then one contiguous data area
        (which they also reserve or zero-fill).  With a raw external data file the
        guest offset *is* the host offset, and nothing is refcounted.

        ``start`` > 0 preallocates only the clusters from the one holding guest
        offset ``start`` on (a grow by ``qemu-img resize --preallocation``); the
        clusters there that are already mapped keep their entries.
        """
        cs = self.cluster_size
        size = self.size
        # extended L2 entries are (entry, subcluster bitmap) pairs: preallocated clusters
        # get bitmap 0, as QEMU leaves them
        step = 2 if self.extended_l2 else 1
        span = cs * (cs // (8 * step))
        copied = _COPIED
        raw_data = self.header.has_data_file
        with self._lock:
            # a grow maps clusters it does not write: they must read as zeros, so
            # they come from past the end of the file.  Free clusters in the file's
            # tail (QEMU leaves freed metadata there) keep old bytes; QEMU maps the
            # new area from its last used cluster on and, where that lies inside
            # such a tail, shows those bytes in the guest's new area: we do not
            fresh = -(-self.storage.size() // cs) if start else 0
            tables = []
            first = start // cs
            for l1i in range(first * cs // span, self.header.l1_size):
                base = l1i * span
                n = -(-min(span, size - base) // cs)
                lo = max(0, first - base // cs)
                if lo >= n:
                    continue
                l2 = self._writable_l2(l1i)
                idx = np.arange(lo, n, dtype=np.int64)
                if start:                       # a grow: keep what is mapped already
                    idx = idx[l2[idx * step] == 0]
                    if not idx.size:
                        continue
                if raw_data:
                    l2[idx * step] = (np.uint64(base) + idx.astype(np.uint64) *
                                      np.uint64(cs)) | copied
                    self._touch_l2(l1i)
                elif mode == "metadata":
                    host = self.allocate(idx.size, fresh)
                    l2[idx * step] = (np.uint64(host) + np.arange(idx.size, dtype=np.uint64) *
                                      np.uint64(cs)) | copied
                    self._touch_l2(l1i)
                else:
                    tables.append((l1i, l2, idx))
            if tables:
                total = sum(idx.size for _, _, idx in tables)
                host = self.allocate(total, fresh)
                end = host + total * cs
                pos = host
                for l1i, l2, idx in tables:
                    l2[idx * step] = (np.uint64(pos) + np.arange(idx.size, dtype=np.uint64) *
                                      np.uint64(cs)) | copied
                    self._touch_l2(l1i)
                    pos += idx.size * cs
                if mode == "full":
                    self._overlap_check(host, end - host)
                self.storage.preallocate(host, end - host, mode)
            elif not raw_data:
                # metadata preallocation: the file covers the data area (sparse)
                end = self._file_size
                if self.storage.size() < end:
                    self.storage.truncate(end)
            elif start and mode in ("falloc", "full"):
                # a grow of an image with a data file: reserve (or zero) the new area
                # of the data file, as qemu-img resize does (create reserves it itself)
                _reserve(self.data_storage, first * cs, size, mode)
            self.flush_metadata()


def _reserve(storage, start: int, end: int, mode: str) -> None:
    """Extend ``storage`` to ``end`` with ``[start, end)`` reserved ("falloc") or
    written with zeros ("full")."""
    if storage.size() < end:
        storage.truncate(end)
    storage.preallocate(start, end - start, mode)
