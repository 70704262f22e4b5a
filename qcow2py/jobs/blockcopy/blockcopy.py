"""Block-copy: copy an image reading its clusters in the order they lie on disk.

QEMU's convert and backup read in guest order; on a fragmented qcow2 that is
a seek per cluster on a spinning disk.  BlockCopy plans the copy from the
metadata (:mod:`.plan`), sorts the data extents by (file, host offset) and
moves them in batches: each batch is read with one request per run of
extents that continue each other (``qp_pread_runs``), its compressed
clusters inflated on every core, and written in target order, zero chunks
skipped (``qp_write_batch``), all in C with the GIL released.  Worker
threads overlap one batch's writing with the next one's reading, but the
reads take turns: the source sees one ascending stream, as on a disk it must.

Target layout: a new qcow2 target gets all its data clusters allocated in one
run, in guest order, before the copy (so the output is defragmented whatever
the read order); clusters whose data turn out all zero are released at the
end.  The L2 entries reach the file at the final flush, after the data.

Memory: the plan holds ~40 bytes per extent.  An image too big to plan at
once (more extents than ``memory_limit`` allows) is planned in windows of
guest space and sorted within each window: reads stay sequential inside a
window, with one jump back per window.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

from ...lazyimport import numpy as np

from ... import native
from ...errors import Qcow2Error
from ...format.codec import compress_cluster
from ...image import Image
from ...qcow2.decompress import read_and_decompress
from ...qcow2.read import Qcow2Image
from .batch import CompressedBatches, DataBatches, run_batches
from .order import ORDERS, backward_seeks, choose_order, order_extents
from .plan import (P_BACKING, P_COMPRESSED, P_DATA, P_ZERO, Plan, clip_plan, clusters_of, coalesce,
                   empty_plan, mask_plan, plan_window, split_extents)

_EXTENT_BYTES = 48          # plan memory per extent (six int64-ish arrays)
_MIXED_WINDOW = 8 << 20     # host span read per step when data and compressed clusters mix


@dataclass
class CopyStats:
    """What a copy did (``qcow2py-copy --stats`` prints these)."""

    bytes_total: int = 0          # guest bytes covered by the copy
    bytes_read: int = 0           # bytes read from the source files
    bytes_written: int = 0        # data bytes written to the target
    bytes_zero: int = 0           # bytes that were zero (skipped or written as zeros)
    read_requests: int = 0
    backward_seeks: int = 0       # reads that started before the previous read's end
    guest_order_backward_seeks: int = 0   # the same count had the reads gone in guest order
    extents: int = 0
    order: str = "host"
    seconds: float = 0.0

    @property
    def seeks_avoided(self) -> int:
        return max(0, self.guest_order_backward_seeks - self.backward_seeks)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["seeks_avoided"] = self.seeks_avoided
        return d


class BlockCopy:
    """Copy ``source`` (with its backing chain) into ``target``, opened for writing.

    ``order``: "host" (by file, then host offset: each file is read front to
    back), "guest" (QEMU's order) or "auto" (host when more than
    ``auto_threshold`` of the data extents are out of order).  ``bitmap``: a
    bitarray over guest clusters of ``bitmap_granularity`` bytes; only dirty
    ranges are copied.  ``sparse_size``: zero detection granularity (0: copy
    every byte).  ``base_depth``: copy only the top N layers of the source
    chain (``-B``); the rest stays with the target's backing file.
    ``target_is_zero``: the target reads as zeros already (a new image), so
    zero ranges need no writes.
    """

    def __init__(self, source: Image, target: Image, order: str = "host", bitmap=None,
                 compress: bool = False, sparse_size: int = 4096, workers: int = 2,
                 memory_limit: int = 64 << 20, progress: Optional[Callable[[int, int], None]] = None,
                 *, bitmap_granularity: int = 65536, base_depth: Optional[int] = None,
                 target_is_zero: bool = True, auto_threshold: float = 0.05) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
        if compress and not isinstance(target, Qcow2Image):
            raise Qcow2Error("compressed output needs a qcow2 target")
        if sparse_size < 0 or (sparse_size and sparse_size % 512):
            raise ValueError("sparse_size must be 0 or a multiple of 512")
        if target.size < source.size:
            raise ValueError(f"target is smaller ({target.size} bytes) than the source "
                             f"({source.size} bytes)")
        self.source, self.target = source, target
        self.order = order
        self.compress = compress
        self.bitmap, self.bitmap_granularity = bitmap, bitmap_granularity
        self.sparse_size = sparse_size
        self.workers = max(1, int(workers))
        self.memory_limit = max(1 << 20, int(memory_limit))
        self.progress = progress
        self.base_depth = base_depth
        self.target_is_zero = target_is_zero
        self.auto_threshold = auto_threshold
        self.stats = CopyStats()
        self._done = 0
        self._progress_lock = threading.Lock()

    # ------------------------------------------------------------ planning
    def plan(self) -> Plan:
        """The guest-ordered plan (masked by the bitmap), windowed to bound memory."""
        chain = self.source.chain()
        size = self.source.size
        max_extents = max(1024, self.memory_limit // 4 // _EXTENT_BYTES)
        parts: List[Plan] = []
        window = 1 << 30
        for a in range(0, size, window):
            parts.append(plan_window(chain, a, min(size, a + window), self.base_depth))
        plan = coalesce(Plan.concat(parts)) if parts else empty_plan()
        if self.bitmap is not None:
            plan = mask_plan(plan, self.bitmap, self.bitmap_granularity)
        self._windowed = len(plan) > max_extents
        self._window_extents = max_extents
        return plan

    # ------------------------------------------------------------ running
    def run(self) -> CopyStats:
        """Copy everything and flush the target; returns the statistics.

        Interrupting it (KeyboardInterrupt) stops between batches; a qcow2
        target then holds what was copied so far and is consistent (at worst
        it leaks clusters).
        """
        t0 = time.perf_counter()
        plan = self.plan()
        st = self.stats
        st.bytes_total = int(plan.length.sum())
        st.extents = len(plan)
        data = plan.select(plan.kind == P_DATA)
        # compressed streams count too: an image of them written out of order is fragmented
        order = choose_order(plan.select((plan.kind == P_DATA) | (plan.kind == P_COMPRESSED)),
                             self.order, self.auto_threshold)
        st.order = order
        st.guest_order_backward_seeks = backward_seeks(data.layer, data.host, data.length)
        data = order_extents(data, order, self._window_extents if self._windowed else 0)
        comp = plan.select(plan.kind == P_COMPRESSED)
        if order == "host" and len(comp):
            comp = comp.select(np.lexsort((comp.host, comp.layer)))
        zeros = plan.select(plan.kind == P_ZERO)
        if self.compress:
            self._run_compressed(plan, order)
            self.target.flush()
            st.seconds = time.perf_counter() - t0
            return st
        if self.sparse_size == 0 and len(zeros):
            # no zero detection (-S 0): zeros are data too, the output fully allocated
            self._write_zero_data(zeros)
            zeros = zeros.select(np.zeros(len(zeros), dtype=bool))
        # ranges with nothing to read are done at once (progress reaches the total)
        self._advance(int(zeros.length.sum()) + int(plan.length[plan.kind == P_BACKING].sum()))
        if isinstance(self.target, Qcow2Image):
            self._run_qcow2(data, comp, zeros, plan)
        else:
            self._run_raw(data, comp, zeros)
        self.target.flush()
        st.seconds = time.perf_counter() - t0
        return st

    def _run_compressed(self, plan: Plan, order: str) -> None:
        """Compressed output: whole clusters, compressed on worker threads, stored in guest order.

        Works window by window (half the memory limit of guest space): the
        window's data is read (sorted by host offset inside the window),
        all-zero clusters are skipped, the rest are compressed in parallel and
        appended in guest order, so the target is laid out like the guest.
        """
        tgt = self.target
        cs = tgt.cluster_size
        size = self.source.size
        window = max(cs, (self.memory_limit // 2) // cs * cs)
        chain = self.source.chain()
        st = self.stats
        ends = plan.guest + plan.length
        with ThreadPoolExecutor(max_workers=max(2, self.workers)) as pool:
            for w0 in range(0, size, window):
                w1 = min(size, w0 + window)
                a = int(np.searchsorted(ends, w0, side="right"))
                b = int(np.searchsorted(plan.guest, w1, side="left"))
                sub = clip_plan(plan.select(np.arange(a, b)), w0, w1)
                nbytes = -(-(w1 - w0) // cs) * cs
                buf = bytearray(nbytes)
                mv = memoryview(buf)
                data = sub.select(sub.kind == P_DATA)
                if order == "host" and len(data):
                    data = data.select(np.lexsort((data.host, data.layer)))
                for li in np.unique(data.layer).tolist():
                    sel = data.layer == li
                    stor = self._layer_storage(li)
                    stor.read_runs(mv, data.guest[sel] - w0, data.host[sel], data.length[sel])
                    st.read_requests += int(sel.sum())
                    st.bytes_read += int(data.length[sel].sum())
                comp = sub.select(sub.kind == P_COMPRESSED)
                for li in np.unique(comp.layer).tolist():       # inflated on every core
                    c = comp.select(comp.layer == li)
                    if order == "host":
                        c = c.select(np.argsort(c.host, kind="stable"))
                    img = chain[li]
                    lcs = img.cluster_size
                    out = memoryview(bytearray(len(c) * lcs))
                    read_and_decompress(img.codec, img.storage, c.host.tolist(), c.csize.tolist(),
                                        [out[i * lcs:(i + 1) * lcs] for i in range(len(c))], lcs)
                    for i, (g, n) in enumerate(zip(c.guest.tolist(), c.length.tolist())):
                        within = i * lcs + g % lcs
                        mv[g - w0:g - w0 + n] = out[within:within + n]
                    st.bytes_read += int(c.csize.sum())
                    st.read_requests += len(c)
                arr = np.frombuffer(buf, dtype=np.uint8).reshape(-1, cs)
                nonzero = np.flatnonzero(arr.any(axis=1))
                st.bytes_zero += (arr.shape[0] - nonzero.size) * cs
                codec = tgt.codec
                futures = [(int(i), pool.submit(compress_cluster, codec,
                                                bytes(mv[i * cs:(i + 1) * cs])))
                           for i in nonzero.tolist()]
                for i, fut in futures:
                    cluster = w0 // cs + i
                    tgt.write_compressed(cluster, mv[i * cs:(i + 1) * cs][:size - cluster * cs],
                                         fut.result())
                    st.bytes_written += cs
                self._advance(w1 - w0)

    def _write_zero_data(self, zeros: Plan) -> None:
        chunk = bytes(1 << 20)
        for g, n in zip(zeros.guest.tolist(), zeros.length.tolist()):
            for a in range(g, g + n, len(chunk)):
                m = min(len(chunk), g + n - a)
                self.target.write(a, chunk[:m])
                self.stats.bytes_written += m
            self._advance(n)

    # -- targets
    def _run_raw(self, data: Plan, comp: Plan, zeros: Plan) -> None:
        dst = self.target.storage
        self._copy_mixed(data, data.guest, comp, comp.guest, dst, None)
        if not self.target_is_zero:
            for g, n in zip(zeros.guest.tolist(), zeros.length.tolist()):
                self.target.write_zeroes(g, n)
        self.stats.bytes_zero += int(zeros.length.sum())

    def _run_qcow2(self, data: Plan, comp: Plan, zeros: Plan, plan: Plan) -> None:
        tgt = self.target
        cb = tgt.cluster_bits
        cs = 1 << cb
        fresh = self.target_is_zero and not tgt.has_allocations()
        if not fresh or not hasattr(tgt, "map_new_clusters"):
            return self._run_generic(plan)
        copied = np.concatenate([data.guest, comp.guest])
        copied_len = np.concatenate([data.length, comp.length])
        clusters = clusters_of(copied, copied_len, cb)
        # clusters shared with ranges left to the backing file are written the slow way
        backing = plan.select(plan.kind == P_BACKING)
        partial = np.intersect1d(clusters, clusters_of(backing.guest, backing.length, cb))
        if partial.size:
            clusters = np.setdiff1d(clusters, partial)
        hosts = tgt.map_new_clusters(clusters)
        mark = bytearray((clusters.size + 7) // 8)
        base = int(hosts[0]) if hosts.size else 0
        # with an external data file hosts follow guest offsets: no per-cluster marks
        contiguous = not tgt.header.has_data_file
        # a target offset for every extent: its cluster's host + offset in the cluster
        dst_data = self._dst_offsets(data, clusters, hosts, cb)
        dst_comp = self._dst_offsets(comp, clusters, hosts, cb)
        in_bulk_d = dst_data >= 0
        in_bulk_c = dst_comp >= 0
        self._copy_mixed(data.select(in_bulk_d), dst_data[in_bulk_d], comp.select(in_bulk_c),
                         dst_comp[in_bulk_c], tgt.data_storage,
                         (mark, base, cb) if contiguous else None)
        rest = plan.select(np.isin(plan.guest >> cb, partial) & (plan.kind != P_BACKING))
        self._run_generic(rest)
        if contiguous and hosts.size and self.sparse_size:
            bits = np.unpackbits(np.frombuffer(bytes(mark), dtype=np.uint8),
                                 bitorder="little")[:clusters.size].astype(bool)
            empty = clusters[~bits]
            tgt.unmap_clusters(empty, zero=tgt.backing is not None)
        if tgt.backing is not None:
            for g, n in zip(zeros.guest.tolist(), zeros.length.tolist()):
                tgt.write_zeroes(g, n)
        self.stats.bytes_zero += int(zeros.length.sum())

    def _run_generic(self, plan: Plan) -> None:
        """Through the target's write path (partial clusters, existing targets)."""
        tgt, src = self.target, self.source
        chunk = 1 << 20
        for g, n, k in zip(plan.guest.tolist(), plan.length.tolist(), plan.kind.tolist()):
            if k == P_BACKING:
                continue
            if k == P_ZERO:
                if not self.target_is_zero or tgt.backing is not None:
                    tgt.write_zeroes(g, n)
                self.stats.bytes_zero += n
                continue
            for a in range(g, g + n, chunk):
                m = min(chunk, g + n - a)
                buf = src.read(a, m)
                self.stats.bytes_read += m
                self.stats.read_requests += 1
                if self.sparse_size and native.is_zero(buf):
                    if not self.target_is_zero or tgt.backing is not None:
                        tgt.write_zeroes(a, m)
                    self.stats.bytes_zero += m
                else:
                    tgt.write(a, buf)
                    self.stats.bytes_written += m
            self._advance(n)

    @staticmethod
    def _dst_offsets(p: Plan, clusters: np.ndarray, hosts: np.ndarray, cb: int) -> np.ndarray:
        if not len(p):
            return np.zeros(0, dtype=np.int64)
        c = p.guest >> cb
        i = np.clip(np.searchsorted(clusters, c), 0, max(clusters.size - 1, 0))
        ok = clusters.size > 0
        found = (clusters[i] == c) if ok else np.zeros(c.size, bool)
        # an extent may span several clusters: all must be in the bulk set (contiguous hosts)
        last = (p.guest + p.length - 1) >> cb
        j = np.clip(np.searchsorted(clusters, last), 0, max(clusters.size - 1, 0))
        found &= (clusters[j] == last) if ok else found
        found &= (j - i) == (last - c)
        out = np.where(found, hosts[i] + (p.guest & ((1 << cb) - 1)), -1) if ok else \
            np.full(c.size, -1, dtype=np.int64)
        return out.astype(np.int64)

    # -- data movement
    def _advance(self, n: int) -> None:
        if self.progress is None:
            return
        with self._progress_lock:
            self._done += n
            self.progress(self._done, self.stats.bytes_total)

    def _layer_storage(self, layer: int):
        img = self.source.chain()[layer]
        return getattr(img, "data_storage", img.storage)

    def _copy_data(self, data: Plan, dst_off: np.ndarray, dst_storage, mark=None) -> None:
        """Move the data extents in batches: reads in plan order, writes by target offset.

        Each batch (at most half a buffer of reading, cut from the ordered
        extent list) is read with one request per run of extents that continue
        each other in their file — in host order, one big sequential read —
        then written in target order, pieces that continue each other in the
        target gathered into one pwritev.  Batches run on ``workers`` threads,
        each with its own buffer, reading in turn (:func:`.batch.run_batches`).
        """
        if not len(data):
            return
        storages = [self._layer_storage(i) for i in range(len(self.source.chain()))]
        mark_buf, mark_base, mark_shift = mark if mark else (None, 0, 0)
        native_ok = dst_storage.native_io and all(s.native_io for s in storages)
        workers = self.workers if native_ok else 1
        buf_len = max(2 << 20, min(64 << 20, self.memory_limit // workers))
        half = buf_len // 2
        # split extents longer than half a buffer, then cut batches of <= one buffer
        pieces, dst = split_extents(data, dst_off, half)
        self.stats.backward_seeks += backward_seeks(pieces.layer, pieces.host, pieces.length)
        batches = DataBatches(dict(enumerate(storages)), pieces, dst, dst_storage,
                              (mark_base, mark_shift), self.sparse_size,
                              self._write_zeroes(), half)
        run_batches(batches, buf_len, workers, mark_buf, self.stats, self._advance)

    def _write_zeroes(self) -> bool:
        """Whether zero chunks must be written (the target does not read as zeros)."""
        return bool(self.sparse_size) and not self.target_is_zero

    def _copy_mixed(self, data: Plan, dst_data: np.ndarray, comp: Plan, dst_comp: np.ndarray,
                    dst_storage, mark) -> None:
        """Data and compressed extents; in host order, one sweep over each file.

        ``qemu-img convert -c`` stores the clusters that do not compress as
        plain data, between the compressed ones: copying all the data and then
        all the compressed clusters would read such a file twice over (on a
        disk, twice the time).  In host order the file is taken in windows of
        ``_MIXED_WINDOW`` bytes; in a window that holds compressed clusters, they
        and the data extents between them are read together in host order (by
        the compressed path, which passes plain extents through).
        """
        if not len(data) or not len(comp) or (self._windowed and self.stats.order == "host"):
            # (a windowed plan is sorted window by window: two passes, each in order)
            self._copy_data(data, dst_data, dst_storage, mark=mark)
            self._copy_compressed(comp, dst_comp, dst_storage, mark)
            return
        if self.stats.order != "host":
            # one pass in guest order, as QEMU reads (the compressed path takes plain extents)
            both, dst = split_extents(Plan.concat([data, comp]),
                                    np.concatenate([dst_data, dst_comp]), _MIXED_WINDOW)
            by_guest = np.argsort(both.guest, kind="stable")
            self._copy_compressed(both.select(by_guest), dst[by_guest], dst_storage, mark)
            return
        # (layer, window) keys: both lists are sorted by (layer, host) in host order
        kd = (data.layer.astype(np.int64) << 40) | (data.host // _MIXED_WINDOW)
        kc = (comp.layer.astype(np.int64) << 40) | (comp.host // _MIXED_WINDOW)
        keys = np.union1d(kd, kc)
        da, db = np.searchsorted(kd, keys), np.searchsorted(kd, keys, side="right")
        ca, cb = np.searchsorted(kc, keys), np.searchsorted(kc, keys, side="right")

        def copy_data(idx) -> None:
            if len(idx):
                self._copy_data(data.select(idx), dst_data[idx], dst_storage, mark=mark)

        start = 0                       # data-only windows go to the data path together
        for i in range(keys.size):
            c0, c1 = int(ca[i]), int(cb[i])
            if c1 == c0:
                continue
            d0, d1 = int(da[i]), int(db[i])
            copy_data(np.arange(start, d0))
            small = np.arange(d0, d1)[data.length[d0:d1] <= _MIXED_WINDOW]
            copy_data(np.setdiff1d(np.arange(d0, d1), small))
            both = Plan.concat([data.select(small), comp.select(slice(c0, c1))])
            by_host = np.argsort(both.host, kind="stable")
            dst = np.concatenate([dst_data[small], dst_comp[c0:c1]])
            self._copy_compressed(both.select(by_host), dst[by_host], dst_storage, mark)
            start = d1
        copy_data(np.arange(start, len(data)))

    def _copy_compressed(self, comp: Plan, dst_off: np.ndarray, dst_storage, mark) -> None:
        """Compressed source clusters (and plain extents among them), in batches.

        A batch reads its streams with one request per run of them that
        continue (or overlap: stored lengths are rounded to sectors) each other
        in their file, so packed streams in host order are one sequential
        read; inflates them on every core
        (:func:`qcow2py.decompress.decompress_into`) into the batch's buffer;
        then writes the pieces in target order like a data batch (zero
        detection, gathered writes, in C with the GIL released).  Batches run
        on ``workers`` threads, so one batch's I/O overlaps another's
        inflating.
        """
        if not len(comp):
            return
        chain = self.source.chain()
        is_comp = comp.kind == P_COMPRESSED
        cluster_size = np.array([img.cluster_size for img in chain], dtype=np.int64)
        in_len = np.where(is_comp, comp.csize, comp.length)
        out_len = np.where(is_comp, cluster_size[comp.layer], 0)
        # where each entry is read from: 2 * layer + 1 is the layer's image file (its
        # streams, and its data unless an external data file holds it), 2 * layer that file
        in_image = np.array([self._layer_storage(i) is img.storage
                             for i, img in enumerate(chain)], dtype=bool)
        src_key = comp.layer.astype(np.int64) * 2 + (is_comp | in_image[comp.layer])
        storages = {k: chain[k // 2].storage if k % 2 else self._layer_storage(k // 2)
                    for k in np.unique(src_key).tolist()}
        mark_buf, mark_base, mark_shift = mark if mark else (None, 0, 0)
        workers = self.workers
        # streams may share a sector with the one before: only a start before the
        # previous start counts as a step back
        self.stats.backward_seeks += backward_seeks(src_key, comp.host, np.ones_like(in_len))
        cost = in_len + out_len
        half = max(int(cost.max()), max(2 << 20, min(32 << 20, self.memory_limit // 2 // workers)))
        batches = CompressedBatches(chain, storages, comp, src_key, in_len, out_len, dst_off,
                                    dst_storage, (mark_base, mark_shift), self.sparse_size,
                                    self._write_zeroes(), half)
        run_batches(batches, 2 * half + batches.SLACK, workers, mark_buf, self.stats,
                    self._advance)

