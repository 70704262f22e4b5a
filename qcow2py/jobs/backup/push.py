"""Push backup: copy a fleecing's snapshot view to a target image.

Orders (what is read first):

- ``guest``: ascending guest offset, as QEMU's backup job reads;
- ``host``: by ``(host file, host offset)`` from ``block_status``, so each
  file is read front to back;
- ``priority``: copies in the RAM cache first (every batch looks again, so
  new copies never wait long), then clusters still on the disk in disk host
  order (each one pushed there is a copy-before-write that will never
  happen), then clusters in the temp in temp host order.

Each batch is a list of whole copy clusters, read in merged runs through the
snapshot (which knows where every cluster is at that moment, so the plan is
only an order, never a correctness matter), written to the target, and with
``discard_source`` discarded from the snapshot at once: its copies are freed
and guest writes there stop copying.  Clusters the disk reported as zeros and
that are still on the disk are not read at all.  At most ``workers`` batches
are in flight, so memory is bounded by ``workers * batch_bytes``.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

from ...lazyimport import numpy as np

from ...opener import create
from ...errors import Qcow2Error, SnapshotAccessError
from ...image import Image
from .snapshot import SnapshotView
from .state import DISK, LOC_NAMES, TEMP, index_runs

ORDERS = ("priority", "host", "guest")
_BATCH_BYTES = 4 << 20
_WINDOW_BYTES = 4 << 30


class BackupCancelled(Qcow2Error):
    """The push was stopped because its fleecing ended (or it was cancelled)."""


@dataclass
class PushResult:
    """What a push did: bytes by where they were read from, and its phases."""

    bytes_total: int = 0
    bytes_from_ram: int = 0
    bytes_from_disk: int = 0
    bytes_from_temp: int = 0
    bytes_zero: int = 0            # bytes known or found to be zeros (not written as data)
    seconds: float = 0.0
    order: str = "priority"
    phases: List[Tuple[str, int]] = field(default_factory=list)

    def add_phase(self, name: str, n: int) -> None:
        if self.phases and self.phases[-1][0] == name:
            self.phases[-1] = (name, self.phases[-1][1] + n)
        elif n:
            self.phases.append((name, n))


class _Planner:
    """Hands out batches of clusters in the chosen order (see the module doc).

    The order is planned one window of guest space at a time (``window``
    clusters), so the plan's memory stays bounded on any disk; a priority
    push makes one pass over the windows for the clusters on the disk, one
    for those in the temp, and a last one for anything that moved meanwhile.
    """

    def __init__(self, snap: SnapshotView, order: str, batch_bytes: int,
                 window_bytes: int) -> None:
        self.snap = snap
        self.st = snap.state
        self.order = order
        cs = self.st.cluster_size
        self.batch = max(1, batch_bytes // cs)
        self.window = max(self.batch, window_bytes // cs)
        with self.st.cond:
            self.pending = self.st.access.copy()
        self.queue: Optional[Tuple[str, np.ndarray, np.ndarray]] = None   # phase, order, zero
        self.qpos = 0
        self.passes: List[Optional[int]] = [DISK, TEMP, None] if order == "priority" else [None]
        self.scan = 0

    def total_bytes(self) -> int:
        return int(np.count_nonzero(self.pending)) * self.st.cluster_size

    def next_batch(self) -> Optional[Tuple[str, np.ndarray, np.ndarray]]:
        """``(phase, clusters in read order, known-zero mask)`` or None when done."""
        while True:
            with self.st.cond:
                got = self._ram_batch() if self.order == "priority" else None
                if got is None:
                    got = self._from_queue()
                if got is not None:
                    return got
                window = self._next_window()
                if window is None:
                    return None
            # plan outside the lock: block_status may read metadata
            self.queue, self.qpos = self._host_order(*window), 0

    def _ram_batch(self):
        """Pending clusters held in RAM, lowest first (``cond`` held)."""
        store = self.snap.store
        if not (store.ram or store.spilling):
            return None
        keys = np.fromiter(itertools.chain(store.ram.keys(), store.spilling.keys()),
                           dtype=np.int64)
        keys = np.sort(keys[self.pending[keys]])[:self.batch]
        if keys.size == 0:
            return None
        self.pending[keys] = False
        return "ram", keys, np.zeros(keys.size, dtype=bool)

    def _from_queue(self):
        """The next batch of the planned window still pending (``cond`` held)."""
        if self.queue is None:
            return None
        phase, cl, zero = self.queue
        takes, ztakes, need = [], [], self.batch
        while need and self.qpos < cl.size:
            seg, zseg = cl[self.qpos:self.qpos + need], zero[self.qpos:self.qpos + need]
            self.qpos += seg.size
            keep = self.pending[seg]
            takes.append(seg[keep])
            ztakes.append(zseg[keep])
            need -= int(np.count_nonzero(keep))
        take = np.concatenate(takes) if takes else np.zeros(0, dtype=np.int64)
        if take.size == 0:
            self.queue = None
            return None
        self.pending[take] = False
        return phase, take, np.concatenate(ztakes)

    def _next_window(self):
        """``(clusters, their loc)`` of the next window with work, or None (``cond`` held)."""
        st, n = self.st, self.st.nclusters
        while self.passes:
            where = self.passes[0]
            while self.scan < n:
                s, e = self.scan, min(n, self.scan + self.window)
                self.scan = e
                idx = s + np.flatnonzero(self.pending[s:e])
                loc = st.loc[idx]
                if where is not None:
                    idx, loc = idx[loc == where], loc[loc == where]
                if idx.size:
                    return idx, loc
            self.passes.pop(0)
            self.scan = 0
        return None

    def _host_order(self, idx: np.ndarray, loc: np.ndarray):
        """Sort clusters by (file, host offset) of their first byte, known zeros first
        (guest order: keep the order, only find the known zeros)."""
        st, cs = self.st, self.st.cluster_size
        files: Dict[str, int] = {}
        fkey = np.zeros(idx.size, dtype=np.int64)
        hkey = idx * cs
        zero = np.zeros(idx.size, dtype=bool)
        for where, node in ((DISK, self.snap.disk), (TEMP, self.snap.store.temp)):
            sel = np.flatnonzero(loc == where)
            if sel.size == 0:
                continue
            offs, ends, hosts, fids, zeros = [], [], [], [], []
            for a, b in index_runs(idx[sel]):
                lo, hi = st.byte_range(a, b)
                for e in node.block_status(lo, hi - lo):
                    offs.append(e.offset)
                    ends.append(e.end)
                    hosts.append(-1 if e.host_offset is None else e.host_offset)
                    fids.append(files.setdefault(e.host_file, len(files) + 1)
                                if e.host_file is not None and e.host_offset is not None
                                else 1 << 40)
                    zeros.append(e.zero and where == DISK)
            offs_a, ends_a = np.array(offs, dtype=np.int64), np.array(ends, dtype=np.int64)
            hosts_a, fids_a = np.array(hosts, dtype=np.int64), np.array(fids, dtype=np.int64)
            starts = idx[sel] * cs
            k = np.searchsorted(offs_a, starts, side="right") - 1
            has_host = hosts_a[k] >= 0
            fkey[sel] = fids_a[k]
            hkey[sel] = np.where(has_host, hosts_a[k] + starts - offs_a[k], starts)
            c_end = np.minimum(starts + cs, st.size)
            zero[sel] = np.array(zeros, dtype=bool)[k] & (ends_a[k] >= c_end)
            fkey[sel[zero[sel]]] = 0                 # zeros need no read: hand them out first
        if self.order == "guest":
            return "guest", idx, zero
        order = np.lexsort((hkey, fkey))
        phase = "host" if self.order == "host" else LOC_NAMES[int(loc[0])]
        return phase, idx[order], zero[order]


def _open_target(snap: SnapshotView, target, target_format: str,
                 overwrite: bool) -> Tuple[Image, bool]:
    if isinstance(target, Image):
        if target.read_only:
            raise ValueError(f"target {target.filename!r} is open read-only (use mode 'r+')")
        if target.size < snap.size:
            raise ValueError(f"target {target.filename!r} is smaller than the snapshot")
        return target, False
    path = os.fspath(target)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(errno.EEXIST, "target exists (use overwrite=True)", path)
    if target_format not in ("qcow2", "raw"):
        raise ValueError(f"unknown target format {target_format!r} (qcow2 or raw)")
    return create(path, snap.size, format=target_format), True


def push(snapshot: SnapshotView, target: Union[str, os.PathLike, Image], *,
         target_format: str = "qcow2", discard_source: bool = False,
         order: str = "priority", workers: int = 2,
         progress: Optional[Callable[[int, int], None]] = None,
         overwrite: bool = False, batch_bytes: int = _BATCH_BYTES,
         window_bytes: int = _WINDOW_BYTES) -> PushResult:
    """Copy the point-in-time content of ``snapshot`` to ``target`` (see the
    module doc).  A path is created (``FileExistsError`` unless ``overwrite``);
    an open writable Image is written in place (zeros written as zeros).
    Raises :class:`BackupCancelled` if the fleecing ends meanwhile.
    ``batch_bytes`` is the unit read and written at once (``workers`` of them in
    flight); ``window_bytes`` the guest span planned at once (host order holds
    within a window)."""
    if not isinstance(snapshot, SnapshotView):
        raise TypeError("push() reads a fleecing's snapshot (Fleecing.snapshot)")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    st = snapshot.state
    with st.cond:
        snapshot.check_open()
        if st.cancel.is_set():
            raise ValueError("the snapshot is closed (its fleecing is ending)")
        st.pushes += 1
    t0 = time.monotonic()
    tgt, fresh = None, False
    try:
        tgt, fresh = _open_target(snapshot, target, target_format, overwrite)
        res = _Push(snapshot, tgt, fresh, order, discard_source, batch_bytes,
                    window_bytes).run(
            max(1, workers), progress)
        tgt.flush()
        res.seconds = time.monotonic() - t0
        return res
    finally:
        if fresh and tgt is not None:
            tgt.close()
        with st.cond:
            st.pushes -= 1
            st.cond.notify_all()


class _Push:
    def __init__(self, snap: SnapshotView, target: Image, fresh: bool, order: str,
                 discard_source: bool, batch_bytes: int, window_bytes: int) -> None:
        self.snap, self.target, self.fresh = snap, target, fresh
        self.discard_source = discard_source
        self.planner = _Planner(snap, order, batch_bytes, window_bytes)
        self.res = PushResult(order=order)
        self.lock = threading.Lock()

    def run(self, workers: int, progress) -> PushResult:
        st, res = self.snap.state, self.res
        res.bytes_total = total = self.planner.total_bytes()
        done = 0
        inflight: deque = deque()

        def finish_one() -> None:
            nonlocal done
            phase, fut = inflight.popleft()
            n = fut.result()
            res.add_phase(phase, n)
            done += n
            if progress is not None:
                progress(done, total)

        with ThreadPoolExecutor(workers, thread_name_prefix="push") as pool:
            try:
                while True:
                    if st.cancel.is_set():
                        raise BackupCancelled("backup cancelled: the fleecing ended")
                    batch = self.planner.next_batch()
                    if batch is None:
                        break
                    if len(inflight) >= workers:
                        finish_one()
                    inflight.append((batch[0], pool.submit(self._do_batch, batch[1], batch[2])))
                while inflight:
                    finish_one()
            except BaseException:
                for _, fut in inflight:
                    fut.cancel()
                raise
        if st.broken is not None:
            raise SnapshotAccessError(f"the snapshot broke during the push ({st.broken})")
        return res

    def _do_batch(self, clusters: np.ndarray, zero: np.ndarray) -> int:
        """Push one batch; returns the guest bytes it covered."""
        st, snap, tgt = self.snap.state, self.snap, self.target
        with st.cond:
            zero = zero & (st.loc[clusters] == DISK)   # still on the disk: still zero
        covered = 0
        for known_zero in (True, False):
            sel = clusters[zero == known_zero]
            # runs that continue each other in read order
            if sel.size == 0:
                continue
            breaks = np.flatnonzero(np.diff(sel) != 1) + 1
            for run in np.split(sel, breaks):
                lo, hi = st.byte_range(int(run[0]), int(run[-1]) + 1)
                covered += hi - lo
                if known_zero:
                    self._zeros(lo, hi - lo)
                else:
                    buf = bytearray(hi - lo)
                    counts = snap.read_accounted_into(buf, lo)
                    with self.lock:
                        self.res.bytes_from_ram += counts["ram"]
                        self.res.bytes_from_disk += counts["disk"]
                        self.res.bytes_from_temp += counts["temp"]
                    if np.frombuffer(buf, dtype=np.uint8).any():
                        tgt.write(lo, buf)
                    else:
                        self._zeros(lo, hi - lo)
                if self.discard_source:
                    snap.discard(lo, hi - lo)
        return covered

    def _zeros(self, lo: int, n: int) -> None:
        with self.lock:
            self.res.bytes_zero += n
        if not self.fresh:
            self.target.write_zeroes(lo, n)
