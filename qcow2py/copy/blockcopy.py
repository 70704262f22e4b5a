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

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import numpy as np

from .. import native
from ..decompress import decompress_into, read_and_decompress
from ..directio import PAGE, aligned_empty
from ..errors import Qcow2Error
from ..image import Image
from ..qcow2 import Qcow2Image
from ..raw import RawImage
from .plan import (P_BACKING, P_COMPRESSED, P_DATA, P_ZERO, Plan, coalesce, empty_plan,
                   plan_window)

_EXTENT_BYTES = 48          # plan memory per extent (six int64-ish arrays)
_MIXED_WINDOW = 8 << 20     # host span read per step when data and compressed clusters mix
ORDERS = ("host", "guest", "auto")


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


def backward_seeks(files: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> int:
    """Reads, in the given order, that start before the previous read of the same file ended."""
    count = 0
    for f in np.unique(files).tolist():
        sel = files == f
        o, n = offsets[sel], lengths[sel]
        if o.size > 1:
            count += int(np.count_nonzero(o[1:] < o[:-1] + n[:-1]))
    return count


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
            plan = self._mask(plan)
        self._windowed = len(plan) > max_extents
        self._window_extents = max_extents
        return plan

    def _mask(self, plan: Plan) -> Plan:
        """Keep only the parts of the plan under dirty bits (in C: one pass over the bits)."""
        from ..bitmaps import little_endian_bits
        bits = little_endian_bits(self.bitmap)
        g, n, i = native.bitmap_mask_extents(plan.guest, plan.length, bits,
                                             self.bitmap_granularity)
        if not g.size:
            return empty_plan()
        delta = g - plan.guest[i]
        host = np.where(plan.kind[i] == P_DATA, plan.host[i] + delta, plan.host[i])
        return Plan(g, n, plan.kind[i], plan.layer[i], host, plan.csize[i])

    def _choose_order(self, data: Plan) -> str:
        """``order``, or for "auto" host order when more than ``auto_threshold`` of the
        stored extents (guest order) start before the previous one in the same file."""
        if self.order != "auto":
            return self.order
        if len(data) < 2:
            return "guest"
        same = data.layer[1:] == data.layer[:-1]
        out_of_order = same & (data.host[1:] < data.host[:-1])
        return "host" if out_of_order.mean() > self.auto_threshold else "guest"

    def _ordered(self, data: Plan, order: str) -> Plan:
        if order == "guest":
            return data
        if self._windowed:
            # sort inside windows of guest space, to bound the sort's memory
            w = self._window_extents
            idx = np.concatenate([
                a + np.lexsort((data.host[a:a + w], data.layer[a:a + w]))
                for a in range(0, len(data), w)])
        else:
            idx = np.lexsort((data.host, data.layer))
        return data.select(idx)

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
        order = self._choose_order(plan.select((plan.kind == P_DATA) |
                                               (plan.kind == P_COMPRESSED)))
        st.order = order
        st.guest_order_backward_seeks = backward_seeks(data.layer, data.host, data.length)
        data = self._ordered(data, order)
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
        from ..codec import compress_cluster
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
                sub = _clip(plan.select(np.arange(a, b)), w0, w1)
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
        fresh = self.target_is_zero and not _has_allocations(tgt)
        if not fresh or not hasattr(tgt, "map_new_clusters"):
            return self._run_generic(plan)
        copied = np.concatenate([data.guest, comp.guest])
        copied_len = np.concatenate([data.length, comp.length])
        clusters = _clusters_of(copied, copied_len, cb)
        # clusters shared with ranges left to the backing file are written the slow way
        backing = plan.select(plan.kind == P_BACKING)
        partial = np.intersect1d(clusters, _clusters_of(backing.guest, backing.length, cb))
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
        each with its own buffer, reading in turn (:meth:`_run_batches`).
        """
        if not len(data):
            return
        storages = [self._layer_storage(i) for i in range(len(self.source.chain()))]
        src_fds = [s.fileno() for s in storages]
        dst_fd = dst_storage.fileno()
        mark_buf, mark_base, mark_shift = mark if mark else (None, 0, 0)
        st = self.stats
        native_ok = dst_fd is not None and all(fd is not None for fd in src_fds)
        workers = self.workers if native_ok else 1
        buf_len = max(2 << 20, min(64 << 20, self.memory_limit // workers))
        half = buf_len // 2
        # split extents longer than half a buffer, then cut batches of <= one buffer
        pieces, dst = _split_data(data, dst_off, half)
        length, layer, src = pieces.length, pieces.layer, pieces.host
        batch = (np.cumsum(length) - 1) // half
        bounds = np.r_[0, np.flatnonzero(np.diff(batch)) + 1, len(pieces)]
        st.backward_seeks += backward_seeks(layer, src, length)
        key = layer.astype(np.int64)
        by_key = dict(enumerate(storages))

        def read(a, b, buf):
            return _read_batch(by_key, key[a:b], src[a:b], length[a:b], buf)

        def write(a, b, buf, local_mark, got):
            pos, n_read, requests = got
            r = self._write_pieces(dst_storage, pos, dst[a:b], length[a:b], buf, local_mark,
                                   (mark_base, mark_shift))
            r[0], r[3] = n_read, requests
            return r, int(length[a:b].sum())

        self._run_batches(bounds, buf_len, workers, read, write, mark_buf)

    def _write_pieces(self, dst_storage, pos, dst, length, buf, local_mark, mark_at) -> list:
        """Write ``length[i]`` bytes at ``buf[pos[i]:]`` to ``dst[i]``, in target order:
        zero detection, gathered pwritev, in C with the GIL released."""
        zero_chunk = self.sparse_size
        write_zeroes = bool(zero_chunk) and not self.target_is_zero
        order = np.argsort(dst, kind="stable")
        fd = dst_storage.fileno()
        if hasattr(dst_storage, "write_batch"):       # O_DIRECT: it splits by alignment
            return dst_storage.write_batch(pos, dst, length, order, buf, zero_chunk,
                                           write_zeroes, mark_at[0], mark_at[1], local_mark)
        if fd is not None and getattr(dst_storage, "alignment", 1) == 1:
            return native.write_batch(pos, dst, length, order, fd, buf, zero_chunk,
                                      write_zeroes, mark_at[0], mark_at[1], local_mark)
        return native.write_batch_generic(_storage_writev(dst_storage), pos, dst, length, order,
                                          buf, zero_chunk, write_zeroes, mark_at[0], mark_at[1],
                                          local_mark)

    def _run_batches(self, bounds: np.ndarray, buf_len: int, workers: int, read, write,
                     mark_buf) -> None:
        """Run batches ``bounds[i]:bounds[i + 1]`` on ``workers`` threads.

        ``read(a, b, buf)`` fills the thread's buffer (``buf_len`` bytes) and
        returns what ``write(a, b, buf, mark, got)`` needs; ``write`` returns
        ([bytes read, written, zero, read requests], guest bytes).  The reads take
        turns in batch order, so the source sees one ascending stream of
        requests, as a single reader would issue (on a disk two interleaved
        streams cost a seek at each switch), while one batch's writing or
        inflating overlaps the next one's reading.  Each thread has its own
        copy of the target's cluster marks, OR-ed into ``mark_buf`` at the
        end.  Results are taken in batch order, so progress and an
        interruption stop between batches.
        """
        local = threading.local()
        marks: List[bytearray] = []
        marks_lock = threading.Lock()
        turn = threading.Condition()
        next_read = [0]

        def run(job):
            i, (a, b) = job
            buf = getattr(local, "buf", None)
            if buf is None:
                # page-aligned (O_DIRECT); pages are committed only as data lands in them
                buf = local.buf = aligned_empty(buf_len)
                local.mark = bytearray(len(mark_buf)) if mark_buf is not None else None
                if local.mark is not None:
                    with marks_lock:
                        marks.append(local.mark)
            # batches start in order (FIFO queue), so batch i - 1 is running or done
            with turn:
                turn.wait_for(lambda: next_read[0] == i)
            try:
                got = read(a, b, buf)
            finally:
                with turn:
                    next_read[0] += 1
                    turn.notify_all()
            return write(a, b, buf, local.mark, got)

        st = self.stats
        batches = list(enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())))
        pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        try:
            results = pool.map(run, batches) if pool else map(run, batches)
            for r, nbytes in results:
                st.bytes_read += int(r[0])
                st.bytes_written += int(r[1])
                st.bytes_zero += int(r[2])
                st.read_requests += int(r[3])
                self._advance(nbytes)
        finally:
            if pool is not None:
                # an interruption: batches not started are dropped, running ones finish
                pool.shutdown(wait=True, cancel_futures=True)
        if mark_buf is not None:
            acc = np.frombuffer(bytes(mark_buf), dtype=np.uint8).copy()
            for m in marks:
                acc |= np.frombuffer(bytes(m), dtype=np.uint8)
            mark_buf[:] = acc.tobytes()

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
            both, dst = _split_data(Plan.concat([data, comp]),
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
        batch = (np.cumsum(cost) - 1) // half
        bounds = np.r_[0, np.flatnonzero(np.diff(batch)) + 1, len(comp)]

        def read(a, b, buf):
            return _read_batch(storages, src_key[a:b], comp.host[a:b], in_len[a:b], buf)

        def write(a, b, buf, local_mark, got):
            pos, n_read, requests = got
            sl = slice(a, b)
            # inflate into the space after the streams, one cluster each
            mv = memoryview(buf)
            piece = pos.copy()
            ci = np.flatnonzero(is_comp[sl])
            if ci.size:
                layers = comp.layer[sl][ci]
                # (from a page boundary: the clusters are then O_DIRECT-aligned pieces)
                out_pos = -(-n_read // PAGE) * PAGE + np.r_[0, np.cumsum(out_len[sl][ci])[:-1]]
                for li in np.unique(layers).tolist():
                    sel = layers == li
                    cs = chain[li].cluster_size
                    dsts = [mv[o:o + cs] for o in out_pos[sel].tolist()]
                    decompress_into(chain[li].codec, mv, pos[ci[sel]], in_len[sl][ci[sel]],
                                    dsts, cs)
                piece[ci] = out_pos + comp.guest[sl][ci] % cluster_size[layers]
            length = comp.length[sl]
            r = self._write_pieces(dst_storage, piece, dst_off[sl], length, buf, local_mark,
                                   (mark_base, mark_shift))
            r[0], r[3] = n_read, requests
            return r, int(length.sum())

        self._run_batches(bounds, 2 * half + PAGE, workers, read, write, mark_buf)


def _read_batch(storages, key: np.ndarray, host: np.ndarray, length: np.ndarray, buf):
    """Read entries (``storages[key[i]]``, ``host[i]``, ``length[i]``) into ``buf``.

    One request per run of entries, in list order, that continue or overlap
    each other in the same storage (compressed streams share sectors; shared
    clusters repeat), each run after the previous one in the buffer.
    Returns each entry's position in ``buf``, the bytes read and the number
    of requests.
    """
    n = key.size
    end = host + length
    cont = np.zeros(n, dtype=bool)
    cont[1:] = (key[1:] == key[:-1]) & (host[1:] >= host[:-1]) & (host[1:] <= end[:-1])
    heads = np.flatnonzero(~cont)
    run_host = host[heads]
    run_len = np.maximum.reduceat(end, heads) - run_host
    run_pos = np.r_[0, np.cumsum(run_len)[:-1]].astype(np.int64)
    run_of = np.cumsum(~cont) - 1
    pos = run_pos[run_of] + host - run_host[run_of]
    mv = memoryview(buf)
    run_key = key[heads]
    segs = np.r_[0, np.flatnonzero(run_key[1:] != run_key[:-1]) + 1, heads.size]
    for s0, s1 in zip(segs[:-1].tolist(), segs[1:].tolist()):
        storages[int(run_key[s0])].read_runs(mv, run_pos[s0:s1], run_host[s0:s1], run_len[s0:s1])
    return pos, int(run_len.sum()), int(heads.size)


def _split_data(p: Plan, dst: np.ndarray, limit: int):
    """Data extents longer than ``limit`` cut into pieces of at most ``limit`` bytes
    (other kinds are kept whole); returns the plan and the pieces' target offsets."""
    n_pieces = np.where(p.kind == P_DATA, -(-p.length // limit), 1)
    idx = np.repeat(np.arange(len(p)), n_pieces)
    within = (np.arange(idx.size) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)) * limit
    q = p.select(idx)
    is_data = q.kind == P_DATA
    length = np.where(is_data, np.minimum(q.length - within, limit), q.length)
    host = np.where(is_data, q.host + within, q.host)
    return Plan(q.guest + within, length, q.kind, q.layer, host, q.csize), dst[idx] + within


def _storage_writev(storage):
    """A ``writev(views, offset)`` over a storage's pwrite (storages without a file descriptor)."""
    def writev(views, off):
        storage.pwrite(b"".join(bytes(v) for v in views), off)
    return writev


def _clip(p: Plan, start: int, end: int) -> Plan:
    """The part of a guest-ordered plan inside ``[start, end)``."""
    if not len(p):
        return p
    g0 = np.maximum(p.guest, start)
    g1 = np.minimum(p.guest + p.length, end)
    delta = g0 - p.guest
    host = np.where(p.kind == P_DATA, p.host + delta, p.host)
    return Plan(g0, g1 - g0, p.kind, p.layer, host, p.csize)


def _clusters_of(guest: np.ndarray, length: np.ndarray, cb: int) -> np.ndarray:
    """Sorted unique cluster indexes touched by the extents."""
    if not guest.size:
        return np.zeros(0, dtype=np.int64)
    first = guest >> cb
    last = (guest + length - 1) >> cb
    span = last - first + 1
    total = int(span.sum())
    idx = np.repeat(first - np.cumsum(span) + span, span) + np.arange(total, dtype=np.int64)
    return np.unique(idx)


def _has_allocations(img: Qcow2Image) -> bool:
    return bool(np.count_nonzero(img._l1))
