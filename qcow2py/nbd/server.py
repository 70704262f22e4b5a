"""An asyncio NBD server exporting any :class:`qcow2py.node.Node`.

One event loop accepts connections (Unix or TCP), negotiates (fixed
newstyle, see :mod:`qcow2py.nbd.protocol`) and reads requests; every engine
call (read, write, block status, flush...) runs on a worker thread of one
pool, never on the loop.  A connection's requests are pipelined: each runs as
its own task as soon as its header (and payload) is in, and replies go out in
the order they complete, each one written whole in one step of the loop so
that replies never interleave.

Every connection of an export shares the export's one node, so a flush on
one is seen by all: the server advertises CAN_MULTI_CONN.  Exports can be
added and removed while clients are connected (the fleecing snapshot of a
pull backup comes and goes that way).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from . import protocol as P
from .connection import Connection
from .engine import BufferPool, HostFiles, direct_reads

log = logging.getLogger("qcow2py.nbd")



@dataclass
class Export:
    """A named node on the server.

    ``bitmaps`` are objects with ``name``, ``granularity`` and
    ``dirty_extents(start, length)`` (a :class:`qcow2py.Bitmap` or a frozen
    view of one), each served as the meta context ``qemu:dirty-bitmap:NAME``.
    A read-only export is flagged READ_ONLY and refuses writes with EPERM; a
    writable export over a node that refuses writes answers them with the
    node's error (a snapshot view: EPERM for writes, TRIM allowed).
    """

    name: str
    node: Any
    readonly: bool
    bitmaps: List[Any] = field(default_factory=list)
    description: str = ""
    connections: Set[Any] = field(default_factory=set)
    host: Optional[HostFiles] = None      #: direct reads of a read-only image

    def disconnect_all(self) -> None:
        """Close every connection to this export (on the loop)."""
        for c in list(self.connections):
            c.shutdown()

    def contexts(self) -> List[str]:
        return [P.BASE_ALLOCATION] + [P.DIRTY_BITMAP_PREFIX + b.name for b in self.bitmaps]

    def context_source(self, name: str):
        """None for base:allocation, else the bitmap object behind the context."""
        if name == P.BASE_ALLOCATION:
            return None
        return next(b for b in self.bitmaps if P.DIRTY_BITMAP_PREFIX + b.name == name)

    def flags(self, structured: bool = True) -> int:
        """Transmission flags (DF only means something with structured replies)."""
        f = P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_CAN_MULTI_CONN | P.TF_SEND_CACHE
        if structured:
            f |= P.TF_SEND_DF
        if self.readonly:
            return f | P.TF_READ_ONLY
        return f | P.TF_SEND_FUA | P.TF_SEND_TRIM | P.TF_SEND_WRITE_ZEROES | \
            P.TF_SEND_FAST_ZERO

    def info(self) -> dict:
        """What ``query-exports`` reports about this export."""
        out = {"name": self.name, "size": self.node.size, "read-only": self.readonly,
               "connections": len(self.connections), "bitmaps": []}
        for b in self.bitmaps:
            d = {"name": b.name, "granularity": b.granularity}
            if hasattr(b, "count_dirty"):
                d["count"] = b.count_dirty()
            out["bitmaps"].append(d)
        return out


class Server:
    """An NBD server: exports, listeners and the loop that serves them.

    Use from a program::

        srv = Server()
        srv.add_export("", img, bitmaps=[img.find_bitmap("b0")])
        srv.listen_unix("/run/disk.sock")
        srv.start()            # serves on a background thread
        ...                    # the program may go on using img
        srv.close()

    or ``serve_forever()`` to serve on the calling thread until :meth:`close`
    (or SIGINT/SIGTERM with ``handle_signals=True``).  Nodes are not closed
    by the server: their owner closes them after :meth:`close`.
    """

    def __init__(self, *, max_connections: int = 16, tls: Optional[ssl.SSLContext] = None,
                 workers: int = 8) -> None:
        self.exports: Dict[str, Export] = {}
        self.max_connections = max_connections
        self.tls = tls
        self.workers = workers
        self._listen: List[Tuple[str, Any]] = []
        self.addresses: List[Any] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._thread: Optional[threading.Thread] = None
        self._thread_of_loop: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._startup_error: Optional[BaseException] = None
        self.pool: Optional[ThreadPoolExecutor] = None
        self._connections: Set[Any] = set()
        self._next_id = 0
        self.buffers = BufferPool()

    # -- configuration -----------------------------------------------------
    def add_export(self, name: str, node, *, readonly: Optional[bool] = None,
                   bitmaps: Sequence[Any] = (), description: str = "") -> Export:
        """Export ``node`` as ``name`` (also while serving)."""
        if name in self.exports:
            raise ValueError(f"export {name!r} already exists")
        if len(name.encode()) > P.MAX_NAME:
            raise ValueError("export name longer than 4096 bytes")
        ro = bool(node.read_only) if readonly is None else bool(readonly)
        exp = Export(name, node, ro, list(bitmaps), description, host=direct_reads(node))
        self.exports[name] = exp
        return exp

    def remove_export(self, name: str) -> Export:
        """Stop exporting ``name``: new clients no longer see it and connected ones
        are disconnected after the requests they have in flight.  Returns the
        export (its node is not closed)."""
        exp = self.exports.pop(name)
        loop = self._loop
        if loop is not None and loop.is_running():
            if threading.current_thread() is self._thread_of_loop:
                exp.disconnect_all()
            else:
                loop.call_soon_threadsafe(exp.disconnect_all)
        return exp

    def listen_unix(self, path: str) -> None:
        self._listen.append(("unix", os.fspath(path)))

    def listen_tcp(self, host: str = "127.0.0.1", port: int = 10809) -> None:
        self._listen.append(("tcp", (host, port)))

    def add_unix_service(self, path: str, handler) -> None:
        """Serve another line protocol (the control socket) from the same loop:
        ``handler(reader, writer)`` runs as a connection coroutine."""
        self._listen.append(("service", (os.fspath(path), handler)))

    # -- running -------------------------------------------------------------
    def start(self) -> None:
        """Serve on a background thread; returns once listening (or raises)."""
        self._thread = threading.Thread(target=self._run, name="qcow2py-nbd", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error

    def serve_forever(self, handle_signals: bool = False, ready=None) -> None:
        """Serve on this thread until :meth:`close` (or a signal, if asked)."""
        self._run(handle_signals, ready)
        if self._startup_error is not None:
            raise self._startup_error

    def stop_soon(self) -> None:
        """Ask the server to stop, without waiting (from any thread, a worker too)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass

    def close(self) -> None:
        """Stop serving: listeners closed, clients disconnected, in-flight engine
        calls finished.  Safe from any thread but the server's own; idempotent."""
        self.stop_soon()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()

    def run_in_pool(self, fn, *args):
        """Await ``fn(*args)`` on the server's worker pool (for the control socket)."""
        return asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _run(self, handle_signals: bool = False, ready=None) -> None:
        try:
            asyncio.run(self._main(handle_signals, ready))
        except BaseException as e:     # noqa: BLE001 - reported to the starter
            if self._startup_error is None and not self._ready.is_set():
                self._startup_error = e
            elif not isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            self._ready.set()

    async def _main(self, handle_signals: bool, ready) -> None:
        loop = asyncio.get_running_loop()
        self._loop, self._stop = loop, asyncio.Event()
        self._thread_of_loop = threading.current_thread()
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="qcow2py-nbd-io")
        servers = []
        try:
            for kind, where in self._listen:
                if kind == "unix":
                    s = await asyncio.start_unix_server(self._accept, where)
                    self.addresses.append(where)
                elif kind == "tcp":
                    s = await asyncio.start_server(self._accept, where[0], where[1])
                    self.addresses.append(s.sockets[0].getsockname()[:2])
                else:
                    s = await asyncio.start_unix_server(where[1], where[0])
                servers.append(s)
        except BaseException as e:
            self._startup_error = e
            for s in servers:
                s.close()
            self.pool.shutdown()
            self._ready.set()
            return
        if handle_signals:
            import signal
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
        self._ready.set()
        if ready is not None:
            ready()
        try:
            await self._stop.wait()
        finally:
            for s in servers:
                s.close()
            for c in list(self._connections):
                c.shutdown()
            tasks = [c.task for c in self._connections if c.task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=30)
            self.pool.shutdown(wait=True)
            for kind, where in self._listen:
                path = where if kind == "unix" else where[0] if kind == "service" else None
                if path is not None:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
            self._loop = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next_id += 1
        conn = Connection(self, reader, writer, self._next_id)
        if len(self._connections) >= self.max_connections:
            log.info("connection %d refused: %d clients already connected (-e)",
                     conn.id, len(self._connections))
            writer.close()
            return
        conn.task = asyncio.current_task()
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
