"""fleece(): freeze a point-in-time view of a disk that keeps being written.

::

    guest writes ─▶ fl.disk (CopyBeforeWrite) ─▶ disk
                        │ old data of clusters the snapshot still needs
                        ▼
                    RAM cache (bounded) ─spill oldest─▶ temp qcow2 (backing = disk)
    backup / NBD ─▶ fl.snapshot (SnapshotView) ─▶ push(...)

The point in time is the moment :func:`fleece` returns; from then on every
guest write must go through ``fl.disk``.  The temp is disposable: a crash
leaves the disk as clean as the disk's own writes leave it.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Optional

from ...lazyimport import numpy as np

from ...opener import create_file, open as open_image
from ...image import Image
from ...io.wrappers import UnsafeStorage
from .cache import CopyStore
from .cbw import CopyBeforeWrite
from .snapshot import SnapshotView
from .state import RAM, TEMP, CopyState, FrozenBitmap, extents_to_mask


@dataclass
class FleecingStats:
    """Counters of a fleecing: cumulative copies and discards, and where the
    point-in-time copies are now."""

    cbw_copies: int = 0          # copy runs done before guest writes
    cbw_bytes: int = 0           # bytes they copied
    bytes_discarded: int = 0     # snapshot bytes given up by discards (discard-after-copy)
    bytes_in_ram: int = 0        # copies held in the RAM cache now
    bytes_in_temp: int = 0       # copies held in the temp image now
    temp_bytes_written: int = 0  # bytes ever written to the temp (cumulative)


class Fleecing:
    """A running fleecing (a context manager; see :func:`fleece`).

    ``disk``: the node guests write through; ``snapshot``: the point-in-time
    view; ``bitmap``: the frozen bitmap (None without ``bitmap=``);
    ``temp_filename``; ``stats``.
    """

    def __init__(self, disk: Image, temp: Image, temp_path: str, state: CopyState,
                 store: CopyStore, filt: CopyBeforeWrite, snapshot: SnapshotView,
                 bitmap: Optional[FrozenBitmap], keep_temp: bool) -> None:
        self.source = disk
        self.temp_filename = temp_path
        self._temp = temp
        self._state = state
        self._store = store
        self.disk = filt
        self.snapshot = snapshot
        self.bitmap = bitmap
        self.keep_temp = keep_temp
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> FleecingStats:
        st = self._state
        with st.cond:
            s = FleecingStats(self.disk.cbw_copies, self.disk.cbw_bytes,
                              self.snapshot.bytes_discarded,
                              temp_bytes_written=self._store.temp_bytes_written)
        s.bytes_in_ram = st.count(RAM)
        s.bytes_in_temp = st.count(TEMP)
        return s

    def __enter__(self) -> "Fleecing":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the fleecing: cancel running pushes and wait for them, stop copying
        before writes, drop the RAM copies, close the temp (removed unless
        ``keep_temp``).  The disk stays open and writable.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        st = self._state
        st.cancel.set()
        with st.cond:
            st.cond.wait_for(lambda: st.pushes == 0)
            st.active = False               # new guest writes pass straight through...
            self.snapshot.end()             # ...and new snapshot reads raise ValueError
            st.cond.notify_all()
            st.cond.wait_for(lambda: st.busy == 0)
        self.disk.shutdown()                # copies left running by cbw_timeout
        self._store.clear()
        try:
            self._temp.close()
        except Exception:
            if self.keep_temp:
                raise
            # a failing temp is disposable: it is removed below anyway
        finally:
            if not self.keep_temp:
                try:
                    os.unlink(self.temp_filename)
                except FileNotFoundError:
                    pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running"
        return f"<Fleecing {self.source.filename!r} -> {self.temp_filename!r} {state}>"


def fleece(disk: Image, temp: str, *, bitmap: Optional[str] = None, ram_cache: int = 0,
           cluster_size: int = 65536, on_cbw_error: str = "break-guest-write",
           cbw_timeout: Optional[float] = None, keep_temp: bool = False,
           overwrite_temp: bool = False, temp_storage_wrapper=None) -> Fleecing:
    """Start fleecing ``disk`` (an Image opened "r+") into the temp qcow2 ``temp``.

    The point in time is when this returns.  ``bitmap`` limits the snapshot
    to the clusters the disk's bitmap of that name marks dirty (frozen now;
    the disk's bitmap is left alone).  ``ram_cache`` bytes of RAM hold copies
    before they spill to the temp.  ``cluster_size`` is the temp's cluster
    size and the copy granularity.  ``on_cbw_error`` ("break-guest-write" or
    "break-snapshot") and ``cbw_timeout`` (seconds) decide what a failed or
    slow copy does.  The temp is removed at the end unless ``keep_temp``.
    ``temp_storage_wrapper`` wraps the temp's storage (tracing, fault
    injection), as ``storage_wrapper`` of :func:`qcow2py.create` does.
    """
    if not isinstance(disk, Image):
        raise TypeError("fleece() needs an open Image (qcow2py.open(path, 'r+'))")
    if disk.closed:
        raise ValueError(f"image {disk.filename!r} is closed")
    if disk.read_only:
        raise ValueError(f"image {disk.filename!r} is open read-only: fleecing needs "
                         f"the active disk opened 'r+'")
    if ram_cache < 0:
        raise ValueError("ram_cache must be >= 0 bytes")
    temp = os.fspath(temp)
    if os.path.exists(temp) and not overwrite_temp:
        raise FileExistsError(errno.EEXIST, "temp image exists (use overwrite_temp=True)", temp)
    frozen = None
    nclusters = -(-disk.size // cluster_size)
    if bitmap is not None:
        bm = disk.find_bitmap(bitmap)
        frozen = FrozenBitmap.of(bm, disk.size)
        lo = np.array([e[0] for e in frozen.dirty_extents()], dtype=np.int64)
        n = np.array([e[1] for e in frozen.dirty_extents()], dtype=np.int64)
        access = extents_to_mask(lo, n, cluster_size, nclusters)
    else:
        access = np.ones(nclusters, dtype=bool)
    disk.flush()            # the temp's backing must show the point in time on disk

    def wrap(storage):
        # the temp is disposable (a crash throws it away): it never waits for fsync
        storage = UnsafeStorage(storage)
        return storage if temp_storage_wrapper is None else temp_storage_wrapper(storage)
    create_file(temp, disk.size, cluster_size=cluster_size,
                backing_file=os.path.abspath(disk.filename), backing_format=disk.format)
    # the temp's backing is the active disk, which this process keeps writing
    tmp = open_image(temp, "r+", format="qcow2", storage_wrapper=wrap, share_backing_write=True)
    try:
        state = CopyState(disk.size, cluster_size, access)
        store = CopyStore(state, tmp, ram_cache)
        filt = CopyBeforeWrite(disk, state, store, on_cbw_error, cbw_timeout)
        snap = SnapshotView(disk, state, store)
    except BaseException:
        tmp.close()
        os.unlink(temp)
        raise
    return Fleecing(disk, tmp, temp, state, store, filt, snap, frozen, keep_temp)
