"""Steps 4-6 of a copy: cut the ordered extents into batches, read each batch,
write it.

A batch is at most one buffer of reading.  :func:`read_pieces` reads it with one
request per run of extents that continue each other in their file
(``Storage.read_runs``: ``qp_pread_runs`` in C); :func:`write_pieces` writes the
pieces in target order, zero chunks skipped (``Storage.write_batch``:
``qp_write_batch`` in C).  :class:`DataBatches` and :class:`CompressedBatches`
(which inflates streams between the two) say what one batch reads and writes;
:func:`run_batches` runs them on worker threads whose reads take turns, so the
source sees one ascending stream.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional

from ...lazyimport import numpy as np

from ...io.directio import PAGE, aligned_empty
from ...qcow2.decompress import decompress_into
from .plan import P_COMPRESSED, Plan


def cut_batches(cost: np.ndarray, limit: int) -> np.ndarray:
    """Bounds ``[b[i], b[i + 1])`` of consecutive entries costing at most ``limit``
    bytes each (an entry costing more is a batch of its own)."""
    batch = (np.cumsum(cost) - 1) // limit
    return np.r_[0, np.flatnonzero(np.diff(batch)) + 1, len(cost)]


def read_pieces(storages, key: np.ndarray, host: np.ndarray, length: np.ndarray, buf):
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


def write_pieces(dst_storage, pos, dst, length, buf, mark, mark_at, zero_chunk: int,
                 write_zeroes: bool) -> list:
    """Write ``length[i]`` bytes at ``buf[pos[i]:]`` to ``dst[i]``, in target order:
    zero detection, gathered pwritev, in C with the GIL released."""
    order = np.argsort(dst, kind="stable")
    return dst_storage.write_batch(buf, pos, dst, length, order, zero_chunk, write_zeroes,
                                   mark_at[0], mark_at[1], mark)


class DataBatches:
    """Batches of data extents: read from their files, written to ``dst``."""

    def __init__(self, storages, pieces: Plan, dst: np.ndarray, dst_storage, mark_at,
                 zero_chunk: int, write_zeroes: bool, half: int) -> None:
        self.storages = storages
        self.key = pieces.layer.astype(np.int64)
        self.src, self.length, self.dst = pieces.host, pieces.length, dst
        self.dst_storage, self.mark_at = dst_storage, mark_at
        self.zero_chunk, self.write_zeroes = zero_chunk, write_zeroes
        self.bounds = cut_batches(pieces.length, half)

    def read(self, a: int, b: int, buf):
        return read_pieces(self.storages, self.key[a:b], self.src[a:b], self.length[a:b], buf)

    def write(self, a: int, b: int, buf, mark, got):
        pos, n_read, requests = got
        r = write_pieces(self.dst_storage, pos, self.dst[a:b], self.length[a:b], buf, mark,
                         self.mark_at, self.zero_chunk, self.write_zeroes)
        r[0], r[3] = n_read, requests
        return r, int(self.length[a:b].sum())


class CompressedBatches:
    """Batches of compressed clusters (and plain extents among them): streams read,
    inflated on every core into the space after them (from the next page boundary,
    so that whole clusters are O_DIRECT-aligned pieces: the buffer needs
    :data:`SLACK` bytes beyond the streams and clusters), pieces written to ``dst``."""

    #: room for the page alignment of the inflated clusters
    SLACK = PAGE

    def __init__(self, chain, storages, comp: Plan, src_key, in_len, out_len, dst_off,
                 dst_storage, mark_at, zero_chunk: int, write_zeroes: bool, half: int) -> None:
        self.chain, self.storages, self.comp = chain, storages, comp
        self.src_key, self.in_len, self.out_len, self.dst_off = src_key, in_len, out_len, dst_off
        self.is_comp = comp.kind == P_COMPRESSED
        self.cluster_size = np.array([img.cluster_size for img in chain], dtype=np.int64)
        self.dst_storage, self.mark_at = dst_storage, mark_at
        self.zero_chunk, self.write_zeroes = zero_chunk, write_zeroes
        self.bounds = cut_batches(in_len + out_len, half)

    def read(self, a: int, b: int, buf):
        return read_pieces(self.storages, self.src_key[a:b], self.comp.host[a:b],
                           self.in_len[a:b], buf)

    def write(self, a: int, b: int, buf, mark, got):
        comp, chain = self.comp, self.chain
        pos, n_read, requests = got
        sl = slice(a, b)
        mv = memoryview(buf)
        piece = pos.copy()
        ci = np.flatnonzero(self.is_comp[sl])
        if ci.size:
            layers = comp.layer[sl][ci]
            out_pos = -(-n_read // PAGE) * PAGE + np.r_[0, np.cumsum(self.out_len[sl][ci])[:-1]]
            for li in np.unique(layers).tolist():
                sel = layers == li
                cs = chain[li].cluster_size
                dsts = [mv[o:o + cs] for o in out_pos[sel].tolist()]
                decompress_into(chain[li].codec, mv, pos[ci[sel]], self.in_len[sl][ci[sel]],
                                dsts, cs)
            piece[ci] = out_pos + comp.guest[sl][ci] % self.cluster_size[layers]
        length = comp.length[sl]
        r = write_pieces(self.dst_storage, piece, self.dst_off[sl], length, buf, mark,
                         self.mark_at, self.zero_chunk, self.write_zeroes)
        r[0], r[3] = n_read, requests
        return r, int(length.sum())


def run_batches(batches, buf_len: int, workers: int, mark_buf: Optional[bytearray],
            stats, advance: Callable[[int], None]) -> None:
    """Run ``batches`` (``bounds``, ``read``, ``write``) on ``workers`` threads.

    ``batches.read(a, b, buf)`` fills the thread's buffer (``buf_len`` bytes) and
    returns what ``batches.write(a, b, buf, mark, got)`` needs, which returns
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
            got = batches.read(a, b, buf)
        finally:
            with turn:
                next_read[0] += 1
                turn.notify_all()
        return batches.write(a, b, buf, local.mark, got)

    st = stats
    bounds = batches.bounds
    jobs = list(enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())))
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        results = pool.map(run, jobs) if pool else map(run, jobs)
        for r, nbytes in results:
            st.bytes_read += int(r[0])
            st.bytes_written += int(r[1])
            st.bytes_zero += int(r[2])
            st.read_requests += int(r[3])
            advance(nbytes)
    finally:
        if pool is not None:
            # an interruption: batches not started are dropped, running ones finish
            pool.shutdown(wait=True, cancel_futures=True)
    if mark_buf is not None:
        acc = np.frombuffer(bytes(mark_buf), dtype=np.uint8).copy()
        for m in marks:
            acc |= np.frombuffer(bytes(m), dtype=np.uint8)
        mark_buf[:] = acc.tobytes()
