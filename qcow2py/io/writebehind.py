"""Write-behind: start the writeback of a stream of writes while it is written.

With the page cache (``cache=writeback``) a write returns once the data is in
memory; the device sees it when the kernel gets to it, or when a flush
(``fdatasync``) makes the writer wait for all of it at once.  A writer that
streams gigabytes and then flushes (a guest filling its disk, a commit, a
backup target) waits at that flush for everything still dirty, one device's
worth of time it could have spent overlapped with its own writes.

This tracker watches the host offsets a file storage writes: while they
continue each other (sequential data, or a qcow2 image appending new clusters),
every ``window`` bytes it asks the kernel to start writing that range back
(:func:`qcow2py.native.start_writeback`, Linux ``sync_file_range`` with
``SYNC_FILE_RANGE_WRITE``), as PostgreSQL's ``*_flush_after`` and RocksDB's
``bytes_per_sync`` do.  It is only a hint: it makes nothing durable (the
journal's fdatasync still does), and scattered small writes, which would gain
nothing and could cost rewrites of the same pages, never trigger it.
"""

from __future__ import annotations

import threading

from .. import native

#: bytes of one contiguous stream after which its writeback is started
DEFAULT_WINDOW = 8 << 20


class WriteBehind:
    """Tracks one file's contiguous write stream and starts its writeback."""

    def __init__(self, window: int = DEFAULT_WINDOW):
        self.window = window
        self._start = self._end = -1
        self._lock = threading.Lock()

    def wrote(self, fd: int, offset: int, length: int) -> None:
        """Note a completed write of ``length`` bytes at ``offset`` of ``fd``."""
        with self._lock:
            if offset != self._end:             # not the continuation: a new stream
                self._start = offset
            self._end = offset + length
            if self._end - self._start < self.window:
                return
            start, self._start = self._start, self._end
            end = self._end
        native.start_writeback(fd, start, end - start)
