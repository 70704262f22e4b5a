"""The state one fleecing shares between its copy-before-write filter, its
snapshot view and the pushes that read it.

Everything is kept per *copy cluster* (the temp image's cluster size) in
numpy arrays guarded by one condition variable:

- ``access``: the snapshot may still read the cluster (starts as the frozen
  bitmap, or everywhere; cleared by a snapshot discard);
- ``loc``: where the point-in-time content of the cluster is now: still on
  the disk (not copied yet), in the RAM cache, in the temp image, or gone
  (discarded after it was copied);
- ``claimed``: a copy-before-write of the cluster is under way;
- ``disk_readers`` / ``store_readers``: snapshot reads in flight on the disk
  (a guest write must wait for them before it changes the cluster) and on
  the copy (a discard must wait for them before it frees it).

A cluster needs a copy before write exactly when it is accessible and still
on the disk, so nothing is copied twice, and no snapshot read sees a cluster
torn by a guest write: the write copies first, then waits for the disk
readers that started before the copy was recorded.
"""

from __future__ import annotations

import threading
from typing import List, Optional, Tuple

from ...lazyimport import numpy as np

from ...errors import SnapshotAccessError

DISK, RAM, TEMP, GONE = 0, 1, 2, 3
LOC_NAMES = {DISK: "disk", RAM: "ram", TEMP: "temp"}


def index_runs(idx: np.ndarray) -> List[Tuple[int, int]]:
    """Runs ``[(start, end)]`` of consecutive values in a sorted index array."""
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], breaks))]
    ends = idx[np.concatenate((breaks - 1, [idx.size - 1]))] + 1
    return list(zip(starts.tolist(), ends.tolist()))


def value_runs(values: np.ndarray, base: int = 0) -> List[Tuple[int, int, int]]:
    """Runs ``[(start, end, value)]`` of equal values, offset by ``base``."""
    if values.size == 0:
        return []
    breaks = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [values.size]))
    return [(base + s, base + e, int(values[s])) for s, e in zip(starts.tolist(), ends.tolist())]


def extents_to_mask(offsets: np.ndarray, lengths: np.ndarray, cluster_size: int,
                    nclusters: int) -> np.ndarray:
    """Clusters touched by any of the byte extents (a cluster is needed if any
    byte of it is), vectorised with a difference array."""
    delta = np.zeros(nclusters + 1, dtype=np.int64)
    keep = lengths > 0
    first = offsets[keep] // cluster_size
    last = -(-(offsets[keep] + lengths[keep]) // cluster_size)
    np.add.at(delta, first, 1)
    np.add.at(delta, np.minimum(last, nclusters), -1)
    return np.cumsum(delta[:-1]) > 0


class FrozenBitmap:
    """A copy of a disk bitmap taken at the point in time (what a pull backup
    serves as ``qemu:dirty-bitmap:NAME``): ``name``, ``granularity`` and
    ``dirty_extents()`` as :class:`qcow2py.Bitmap` has them."""

    def __init__(self, name: str, granularity: int, size: int,
                 offsets: np.ndarray, lengths: np.ndarray) -> None:
        self.name = name
        self.granularity = granularity
        self.size = size
        self.enabled = False
        self._lo = np.asarray(offsets, dtype=np.int64)
        self._hi = self._lo + np.asarray(lengths, dtype=np.int64)

    @classmethod
    def of(cls, bitmap, size: int) -> "FrozenBitmap":
        ext = bitmap.dirty_extents()
        lo = np.array([e[0] for e in ext], dtype=np.int64)
        n = np.array([e[1] for e in ext], dtype=np.int64)
        return cls(bitmap.name, bitmap.granularity, size, lo, n)

    def dirty_extents(self, start: int = 0, length: Optional[int] = None) -> List[Tuple[int, int]]:
        """Dirty guest ranges ``[(offset, length)]`` within ``[start, start+length)``."""
        if start < 0 or (length is not None and length < 0):
            raise ValueError("start and length must be non-negative")
        end = self.size if length is None else min(self.size, start + length)
        i = int(np.searchsorted(self._hi, start, side="right"))
        j = int(np.searchsorted(self._lo, end, side="left"))
        lo = np.maximum(self._lo[i:j], start)
        hi = np.minimum(self._hi[i:j], end)
        keep = hi > lo
        return list(zip(lo[keep].tolist(), (hi - lo)[keep].tolist()))

    def count_dirty(self) -> int:
        return int((self._hi - self._lo).sum())

    def __repr__(self) -> str:
        return f"<FrozenBitmap {self.name!r} granularity={self.granularity}>"


class CopyState:
    """Per-cluster state and the in-flight registry (see the module docstring).

    Every method that reads or changes the arrays takes ``cond``; waits use it
    too, and every change that may end a wait notifies all waiters.
    """

    def __init__(self, size: int, cluster_size: int, access: np.ndarray) -> None:
        self.size = size
        self.cluster_size = cluster_size
        self.nclusters = -(-size // cluster_size)
        self.access = access.astype(bool, copy=True)
        self.loc = np.zeros(self.nclusters, dtype=np.int8)
        self.claimed = np.zeros(self.nclusters, dtype=bool)
        self.disk_readers = np.zeros(self.nclusters, dtype=np.int16)
        self.store_readers = np.zeros(self.nclusters, dtype=np.int16)
        self.cond = threading.Condition()
        self.broken: Optional[BaseException] = None   # break-snapshot: why the snapshot died
        self.active = True          # False once the fleecing ended: no more copies
        self.busy = 0               # copy-before-writes and snapshot reads in flight
        self.pushes = 0             # pushes running over the snapshot
        self.cancel = threading.Event()

    # ------------------------------------------------------------ geometry
    def span(self, offset: int, length: int) -> Tuple[int, int]:
        """The clusters covering ``[offset, offset+length)`` (widened outward)."""
        cs = self.cluster_size
        return offset // cs, -(-(offset + length) // cs)

    def inner(self, offset: int, length: int) -> Tuple[int, int]:
        """The whole clusters inside ``[offset, offset+length)`` (aligned inward);
        a range ending at the disk's end covers its last, partial cluster."""
        cs = self.cluster_size
        end = offset + length
        b = self.nclusters if end >= self.size else end // cs
        return -(-offset // cs), b

    def byte_range(self, a: int, b: int) -> Tuple[int, int]:
        """Guest bytes of clusters ``[a, b)``, clipped to the disk size."""
        return a * self.cluster_size, min(b * self.cluster_size, self.size)

    # ------------------------------------------------------------ snapshot side
    def check_readable(self, a: int, b: int) -> None:
        """Raise unless every cluster of ``[a, b)`` may be read (``cond`` held)."""
        if self.broken is not None:
            raise SnapshotAccessError(f"the snapshot is broken: a copy-before-write failed "
                                      f"({self.broken})")
        if not self.access[a:b].all():
            bad = a + int(np.argmin(self.access[a:b]))
            raise SnapshotAccessError(f"snapshot cluster at offset {bad * self.cluster_size} "
                                      f"is not accessible (outside the bitmap or discarded)")

    def end_read(self, disk_idx: np.ndarray, store_idx: np.ndarray) -> None:
        with self.cond:
            self.disk_readers[disk_idx] -= 1
            self.store_readers[store_idx] -= 1
            self.busy -= 1
            self.cond.notify_all()

    # ------------------------------------------------------------ guest-write side
    def claim(self, a: int, b: int, timeout: Optional[float]) -> Optional[np.ndarray]:
        """Claim the clusters of ``[a, b)`` that need a copy before write.

        Waits (up to ``timeout``) for copies other writers have under way in
        the range, so the caller never writes over a cluster still being
        copied.  Returns the claimed indexes, or None once the fleecing has
        ended (the write just passes through).  Raises TimeoutError.
        """
        with self.cond:
            if not self.cond.wait_for(lambda: not self.active or not self.claimed[a:b].any(),
                                      timeout):
                raise TimeoutError("copy-before-write: timed out waiting for a copy in flight")
            if not self.active:
                return None
            self.busy += 1
            if self.broken is not None:
                return np.zeros(0, dtype=np.int64)
            need = a + np.flatnonzero(self.access[a:b] & (self.loc[a:b] == DISK))
            self.claimed[need] = True
            return need

    def unclaim(self, idx: np.ndarray) -> None:
        """Give up claims whose copy failed: the clusters stay on the disk."""
        with self.cond:
            self.claimed[idx] = False
            self.cond.notify_all()

    def place(self, a: int, b: int, where: int) -> None:
        """Record that clusters ``[a, b)`` were copied to ``where`` (``cond`` held)."""
        self.loc[a:b] = where
        self.claimed[a:b] = False
        self.cond.notify_all()

    def wait_disk_readers(self, a: int, b: int) -> None:
        """Block until no snapshot read of the disk overlaps clusters ``[a, b)``."""
        with self.cond:
            self.cond.wait_for(lambda: not self.disk_readers[a:b].any())

    def end_write(self) -> None:
        with self.cond:
            self.busy -= 1
            self.cond.notify_all()

    def break_snapshot(self, err: BaseException) -> None:
        with self.cond:
            if self.broken is None:
                self.broken = err
            self.cond.notify_all()

    # ------------------------------------------------------------ counts
    def count(self, where: int) -> int:
        """Bytes whose point-in-time content is now at ``where``."""
        with self.cond:
            n = int(np.count_nonzero(self.loc == where))
            last = self.nclusters - 1
            if n and self.loc[last] == where:
                return n * self.cluster_size - (self.nclusters * self.cluster_size - self.size)
            return n * self.cluster_size
