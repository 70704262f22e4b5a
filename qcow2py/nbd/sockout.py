"""Replies written straight to a plain socket by one sender thread per connection.

The event loop reads requests; workers of the pool run them and hand the
reply (bytes, buffers, or file ranges for ``sendfile``) to the connection's
sender, which writes replies whole, in the order they were handed over, and
waits for the socket itself when the client reads slowly — so the data never
passes through the loop and a slow client holds only its own thread.  The
loop is told about progress only when it waits for room (the per-connection
budget of bytes in flight) or for the end of the connection.
"""

from __future__ import annotations

import asyncio
import os
import queue
import select
import socket
import threading
from typing import Callable, NamedTuple, Optional

#: a client that takes nothing for this long is disconnected
SEND_TIMEOUT = 60.0


class FileRange(NamedTuple):
    """Part of a reply sent from a file with ``os.sendfile`` (the kernel moves
    the bytes from the page cache to the socket, no copy through Python)."""

    fd: int
    offset: int
    length: int


def pread_full(fd: int, mv: memoryview, offset: int) -> None:
    """Fill ``mv`` from ``fd`` at ``offset``; bytes past the end of the file are zeros."""
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n == 0:
            mv[done:] = bytes(len(mv) - done)
            return
        done += n


class _Broken(Exception):
    pass


class Flight:
    """Replies owed on one connection and the bytes they hold.  The loop
    reserves before it dispatches a request; whoever writes the reply calls
    :meth:`done` (any thread); the loop hears of it only while it waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int):
        self.loop = loop
        self.limit = limit
        self.lock = threading.Lock()
        self.inflight = 0            # replies owed
        self.bytes = 0               # their budgeted bytes
        self.waiter: Optional[asyncio.Future] = None

    # -- the loop's side -----------------------------------------------------
    async def reserve(self, cost: int) -> None:
        """Count one more reply owed; waits while the budget is spent (a request
        always gets through when nothing else is in flight)."""
        while True:
            with self.lock:
                if self.inflight == 0 or self.bytes + cost <= self.limit:
                    self.inflight += 1
                    self.bytes += cost
                    return
                self.waiter = self.loop.create_future()
                fut = self.waiter
            await fut

    async def idle(self) -> None:
        """Wait until every reply owed has been written (or dropped)."""
        while True:
            with self.lock:
                if self.inflight == 0:
                    return
                self.waiter = self.loop.create_future()
                fut = self.waiter
            await fut

    def done(self, cost: int) -> None:
        with self.lock:
            self.inflight -= 1
            self.bytes -= cost
            w, self.waiter = self.waiter, None
        if w is not None:
            self.loop.call_soon_threadsafe(_wake, w)


class ReplySender(Flight):
    """The write side of one plain-socket connection.

    The thread that made a reply writes it itself when the socket is free
    and takes it all (the common case: no hand-over at all); otherwise the
    reply, or what is left of it, goes to the sender thread, which waits for
    the socket.  ``send_lock`` keeps replies whole: a reply cut short by a
    full socket is finished (``head``) before any other starts.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, limit: int,
                 recycle: Callable[[bytearray], None]):
        super().__init__(loop, limit)
        self.sock = socket.socket(fileno=os.dup(fd))   # same socket, our own descriptor
        self.fd = self.sock.fileno()
        self.recycle = recycle
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self.send_lock = threading.Lock()
        self.head: Optional[tuple] = None      # the unfinished rest of a reply
        self.broken = False
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLOUT)
        self.thread = threading.Thread(target=self._run, name="qcow2py-nbd-send", daemon=True)
        self.thread.start()

    def abort(self) -> None:
        """Drop the connection: pending and future replies are discarded."""
        self.broken = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Stop the thread once the queue is empty; it closes its descriptor."""
        self.queue.put(None)

    # -- any thread ------------------------------------------------------------
    def put(self, parts, cost: int, buf: Optional[bytearray] = None) -> None:
        """Send one whole reply (its ``reserve`` was done by the loop); ``buf``
        is recycled once written."""
        if self.send_lock.acquire(blocking=False):
            try:
                if self.head is None and not self.broken:
                    try:
                        rest = self._send(parts, block=False)
                    except OSError:
                        self.abort()
                        rest = []
                    if not rest:
                        self._finish(cost, buf)
                        return
                    self.head = (rest, cost, buf)
                    parts = None
            finally:
                self.send_lock.release()
        self.queue.put((parts, cost, buf))

    def _finish(self, cost: int, buf: Optional[bytearray]) -> None:
        if buf is not None and not self.broken:
            self.recycle(buf)
        self.done(cost)

    # -- the sender thread -------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    break
                with self.send_lock:
                    if self.head is not None:
                        self._send_item(self.head)
                        self.head = None
                    if item[0] is not None:       # else: only the head was to finish
                        self._send_item(item)
        finally:
            self.sock.close()

    def _send_item(self, item) -> None:
        parts, cost, buf = item
        if not self.broken:
            try:
                self._send(parts, block=True)
            except (_Broken, OSError):
                self.abort()
        self._finish(cost, buf)

    def _wait_writable(self) -> None:
        if self.broken:
            raise _Broken()
        events = self.poller.poll(SEND_TIMEOUT * 1000)
        if not events:
            raise _Broken()
        if events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            raise _Broken()

    def _send(self, parts, block: bool) -> list:
        """Write parts in order; with ``block`` wait for the socket, else stop
        when it is full and return the unsent rest (empty when all went out)."""
        parts = list(parts)
        i = 0
        while i < len(parts):
            part = parts[i]
            if isinstance(part, FileRange):
                try:
                    n = os.sendfile(self.fd, part.fd, part.offset, part.length) \
                        if part.length else 0
                except (BlockingIOError, InterruptedError):
                    n = -1
                if n < 0:
                    if not block:
                        return parts[i:]
                    self._wait_writable()
                    continue
                if n == 0 and part.length:
                    parts[i] = memoryview(bytes(part.length))   # the file ends early: zeros
                    continue
                if n < part.length:
                    parts[i] = FileRange(part.fd, part.offset + n, part.length - n)
                    continue
                i += 1
                continue
            j = i
            while j < len(parts) and not isinstance(parts[j], FileRange) and j - i < 512:
                j += 1
            mem = [memoryview(p).cast("B") for p in parts[i:j]]
            try:
                n = os.writev(self.fd, mem)
            except (BlockingIOError, InterruptedError):
                if not block:
                    return parts[i:]
                self._wait_writable()
                continue
            k = i
            while k < j and n >= len(mem[k - i]):
                n -= len(mem[k - i])
                k += 1
            if k < j and n:
                parts[k] = mem[k - i][n:]
            i = k
        return []


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
