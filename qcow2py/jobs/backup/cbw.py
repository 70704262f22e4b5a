"""The copy-before-write filter: the node guests write through while a
fleecing runs.

Before a write, write-zeroes or discard changes clusters the snapshot still
needs, their old content is read from the disk and saved (RAM cache or temp);
then the request waits for snapshot reads of the disk that overlap it, and
only then reaches the disk.  A copy that fails (or outlives ``cbw_timeout``)
either fails the guest request (``"break-guest-write"``, QEMU's default) or
lets it through and breaks the snapshot (``"break-snapshot"``: every later
snapshot read raises).  Once the fleecing ends the filter passes everything
straight to the disk.
"""

from __future__ import annotations

import errno
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import List, Optional

from ...lazyimport import numpy as np

from ...image import Image
from ...node import Extent, Node
from .cache import CopyStore
from .state import CopyState, index_runs

ON_CBW_ERROR = ("break-guest-write", "break-snapshot")


class CopyBeforeWrite(Node):
    """A :class:`~qcow2py.node.Node` over ``disk`` (thread-safe: the disk's own
    locks serialise what must be, the shared state the rest)."""

    def __init__(self, disk: Image, state: CopyState, store: CopyStore,
                 on_cbw_error: str = "break-guest-write",
                 cbw_timeout: Optional[float] = None) -> None:
        if on_cbw_error not in ON_CBW_ERROR:
            raise ValueError(f"on_cbw_error must be one of {ON_CBW_ERROR}, not {on_cbw_error!r}")
        if cbw_timeout is not None and cbw_timeout <= 0:
            raise ValueError("cbw_timeout must be positive seconds (or None)")
        self.disk = disk
        self.state = state
        self.store = store
        self.on_cbw_error = on_cbw_error
        self.cbw_timeout = cbw_timeout
        self.cbw_copies = 0          # copy runs done before guest writes
        self.cbw_bytes = 0
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="cbw") if cbw_timeout else None

    # ------------------------------------------------------------ the protocol
    @property
    def size(self) -> int:              # type: ignore[override]
        return self.disk.size

    @property
    def read_only(self) -> bool:
        return False

    def read(self, offset: int, length: int) -> bytes:
        return self.disk.read(offset, length)

    def read_into(self, buf, offset: int) -> None:
        self.disk.read_into(buf, offset)

    def write(self, offset: int, data) -> None:
        self._before_write(offset, len(memoryview(data).cast("B")))
        self.disk.write(offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._before_write(offset, length)
        self.disk.write_zeroes(offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        self._before_write(offset, length)
        self.disk.discard(offset, length)

    def flush(self) -> None:
        self.disk.flush()

    def block_status(self, offset: int, length: int) -> List[Extent]:
        return self.disk.block_status(offset, length)

    def map(self, start: int = 0, length: Optional[int] = None) -> List[dict]:
        return self.disk.map(start, length)

    def close(self) -> None:
        """The disk belongs to the caller: closing the filter leaves it open."""

    def shutdown(self) -> None:
        """Wait for background copies (``cbw_timeout``) still running."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # ------------------------------------------------------------ copy before write
    def _before_write(self, offset: int, length: int) -> None:
        st = self.state
        if length <= 0 or offset < 0 or offset >= st.size:
            return                      # nothing to copy; the disk judges the request
        a, b = st.span(offset, min(length, st.size - offset))
        try:
            mine = st.claim(a, b, self.cbw_timeout)
        except TimeoutError as e:
            self._failed(e)
            return
        if mine is None:
            return
        try:
            if mine.size:
                try:
                    self._copy(mine)
                except Exception as e:  # noqa: BLE001 - the policy decides what a failure does
                    self._failed(e)
            st.wait_disk_readers(a, b)
        finally:
            st.end_write()

    def _failed(self, err: BaseException) -> None:
        if self.on_cbw_error == "break-snapshot":
            self.state.break_snapshot(err)
            return
        if isinstance(err, (TimeoutError, FutureTimeout)):
            raise TimeoutError(errno.ETIMEDOUT, "copy-before-write timed out") from err
        raise err

    def _copy(self, mine: np.ndarray) -> None:
        if self._pool is None:
            self._copy_runs(mine)
            return
        # past the timeout the copy counts as failed; it still finishes (or fails) in the
        # background and keeps its clusters claimed until then
        self._pool.submit(self._copy_runs, mine).result(self.cbw_timeout)

    def _copy_runs(self, mine: np.ndarray) -> None:
        st = self.state
        try:
            for a, b in index_runs(mine):
                lo, hi = st.byte_range(a, b)
                data = self.disk.read(lo, hi - lo)
                self.store.save(a, b, data)
                with st.cond:
                    self.cbw_copies += 1
                    self.cbw_bytes += hi - lo
        except BaseException:
            st.unclaim(mine)            # placed clusters are unclaimed already
            raise
