"""The point-in-time snapshot view of a fleecing (QEMU's snapshot-access).

Reads return the disk as it was when the fleecing started: clusters copied
before a guest write come from the RAM cache or the temp image, the others
from the disk itself, read under an in-flight registration so that a guest
write waits for the read before changing them.  A read touching any byte the
snapshot no longer holds (outside the frozen bitmap, discarded, or after a
failed copy-before-write under ``break-snapshot``) raises
:class:`~qcow2py.errors.SnapshotAccessError` whole, as QEMU fails it.

``discard`` is the backup client's "I have this": the whole clusters inside
the range become inaccessible, their copies are freed and guest writes there
no longer copy anything.  Writes raise ``PermissionError``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional

from ...lazyimport import numpy as np

from ...image import Image
from ...node import BlockKind, Extent, Node, merge_extents
from .cache import CopyStore
from .state import DISK, GONE, LOC_NAMES, RAM, TEMP, CopyState, index_runs, value_runs

_NO_ACCESS = -1


class SnapshotView(Node):
    """A read-only :class:`~qcow2py.node.Node`; thread-safe."""

    def __init__(self, disk: Image, state: CopyState, store: CopyStore) -> None:
        self.disk = disk
        self.state = state
        self.store = store
        self.temp_filename = store.temp.filename
        self.bytes_discarded = 0
        self._ended = False

    # ------------------------------------------------------------ facts
    @property
    def size(self) -> int:              # type: ignore[override]
        return self.state.size

    @property
    def cluster_size(self) -> int:
        """The copy granularity (discards are aligned inward to it)."""
        return self.state.cluster_size

    @property
    def closed(self) -> bool:
        return self._ended

    def check_open(self) -> None:
        """Raise ValueError once the fleecing has ended."""
        if self._ended:
            raise ValueError("the snapshot is closed (its fleecing has ended)")

    def accessible_extents(self) -> List[tuple]:
        """Guest ranges ``[(offset, length)]`` the snapshot can still read."""
        st = self.state
        with st.cond:
            self.check_open()
            idx = np.flatnonzero(st.access)
        out = []
        for a, b in index_runs(idx):
            lo, hi = st.byte_range(a, b)
            out.append((lo, hi - lo))
        return out

    # ------------------------------------------------------------ reading
    def read(self, offset: int, length: int) -> bytes:
        if length < 0:
            raise ValueError("offset and length must be non-negative")
        buf = bytearray(length)
        self.read_accounted_into(buf, offset)
        return bytes(buf)

    def read_into(self, buf, offset: int) -> None:
        self.read_accounted_into(buf, offset)

    def read_accounted_into(self, buf, offset: int) -> Dict[str, int]:
        """:meth:`read_into` that also tells how many bytes came from where
        (``{"ram": n, "disk": n, "temp": n}``): what a push reports."""
        mv = memoryview(buf).cast("B")
        n = len(mv)
        st = self.state
        counts = {"ram": 0, "disk": 0, "temp": 0}
        if offset < 0:
            raise ValueError("offset and length must be non-negative")
        if offset + n > st.size:
            raise ValueError(f"read of {n} bytes at {offset} goes past the end of the "
                             f"snapshot ({st.size} bytes)")
        if n == 0:
            self.check_open()
            return counts
        a, b = st.span(offset, n)
        with st.cond:
            self.check_open()
            st.check_readable(a, b)
            loc = st.loc[a:b].copy()
            rng = np.arange(a, b)
            disk_idx, temp_idx = rng[loc == DISK], rng[loc == TEMP]
            ram = {c: self.store.lookup(c) for c in rng[loc == RAM].tolist()}
            st.disk_readers[disk_idx] += 1
            st.store_readers[temp_idx] += 1
            st.busy += 1
        try:
            cs, end = st.cluster_size, offset + n
            for s, e, where in value_runs(loc, a):
                lo, hi = max(offset, s * cs), min(end, e * cs)
                part = mv[lo - offset:hi - offset]
                if where == DISK:
                    self.disk.read_into(part, lo)
                elif where == TEMP:
                    self.store.temp.read_into(part, lo)
                else:
                    for c in range(s, e):
                        c_lo, c_hi = max(lo, c * cs), min(hi, (c + 1) * cs)
                        part[c_lo - lo:c_hi - lo] = ram[c][c_lo - c * cs:c_hi - c * cs]
                counts[LOC_NAMES[where]] += hi - lo
        finally:
            st.end_read(disk_idx, temp_idx)
        return counts

    def block_status(self, offset: int, length: int) -> List[Extent]:
        """The point-in-time map: copies in RAM are DATA without a host range,
        copies in the temp are DATA at their temp host offset (depth 0), clusters
        still on the disk report the disk's extents one level deeper.

        Ranges the snapshot no longer holds (outside its bitmap, discarded after
        copy) are DATA without a host range: a client that copies what the map
        calls data reads them and gets the error, where a hole or zero would
        let it write zeros for bytes it never had -- a silent wrong backup.
        (QEMU fails the whole block-status request there; we keep the map
        usable and let the read fail.)"""
        st = self.state
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        end = min(st.size, offset + length)
        if offset >= end:
            self.check_open()
            return []
        a, b = st.span(offset, end - offset)
        with st.cond:
            self.check_open()
            cls = np.where(st.access[a:b], st.loc[a:b], _NO_ACCESS)
        out: List[Extent] = []
        cs = st.cluster_size
        for s, e, where in value_runs(cls, a):
            lo, hi = max(offset, s * cs), min(end, e * cs)
            if where == DISK:
                out.extend(replace(x, depth=x.depth + 1)
                           for x in self.disk.block_status(lo, hi - lo))
            elif where == TEMP:
                out.extend(x if x.depth == 0 and x.kind == BlockKind.DATA
                           else Extent(x.offset, x.length, BlockKind.DATA)
                           for x in self.store.temp.block_status(lo, hi - lo))
            elif where == RAM:
                out.append(Extent(lo, hi - lo, BlockKind.DATA))
            else:
                out.append(Extent(lo, hi - lo, BlockKind.DATA))
        return merge_extents(out)

    def map(self, start: int = 0, length: Optional[int] = None) -> List[dict]:
        """``qemu-img map --output=json`` entries of the snapshot."""
        end = self.size if length is None else min(self.size, start + length)
        out = []
        for e in self.block_status(start, end - start):
            d = {"start": e.offset, "length": e.length, "depth": e.depth,
                 "present": e.present, "zero": e.zero, "data": e.data}
            if e.host_offset is not None:
                d["offset"] = e.host_offset
            out.append(d)
        return out

    # ------------------------------------------------------------ discard after copy
    def discard(self, offset: int, length: int) -> None:
        """Drop whole clusters inside the range from the snapshot (see module doc)."""
        st = self.state
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        a, b = st.inner(offset, min(length, max(0, st.size - offset)))
        with st.cond:
            self.check_open()
            if a >= b:
                return
            self.bytes_discarded += int(np.count_nonzero(st.access[a:b])) * st.cluster_size
            st.access[a:b] = False          # no new reads, no new claims
            st.cond.wait_for(lambda: not (st.claimed[a:b].any() or st.store_readers[a:b].any()
                                          or self.store.in_spill[a:b].any()))
            loc = st.loc[a:b]
            self.store.drop_ram(a + np.flatnonzero(loc == RAM))
            temp_runs = index_runs(a + np.flatnonzero(loc == TEMP))
            loc[loc != DISK] = GONE
            st.busy += 1
        try:
            for s, e in temp_runs:
                lo, hi = st.byte_range(s, e)
                self.store.temp.discard(lo, hi - lo)
            if temp_runs:
                # freed clusters are reused only once the metadata that dropped them
                # is written (the temp never waits for fsync, so this is cheap)
                self.store.temp.flush()
        finally:
            with st.cond:
                st.busy -= 1
                st.cond.notify_all()

    # ------------------------------------------------------------ read-only node
    @property
    def read_only(self) -> bool:
        return True

    def write(self, offset: int, data) -> None:
        raise PermissionError("the snapshot is read-only")

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        raise PermissionError("the snapshot is read-only")

    def flush(self) -> None:
        self.check_open()

    def close(self) -> None:
        """The fleecing owns the snapshot: closing a user's handle changes nothing."""

    def end(self) -> None:
        """Called by the fleecing at its end: every later use raises ValueError."""
        with self.state.cond:
            self._ended = True
