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
import errno
import logging
import os
import ssl
import threading
from collections import deque
from itertools import islice
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from ..errors import Qcow2Error, SnapshotAccessError
from . import protocol as P
from .engine import (BufferPool, HostFiles, Refused, direct_reads, read_chunks,
                     run_command, status_chunks)
from .sockout import Flight, ReplySender

log = logging.getLogger("qcow2py.nbd")

#: bytes of request payloads and read buffers one connection may hold at once
CONNECTION_BUDGET = 64 << 20
#: a client must have chosen an export this soon after connecting (it holds a slot of -e)
HANDSHAKE_TIMEOUT = 30.0


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
    connections: Set["_Connection"] = field(default_factory=set)
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


def errno_of(exc: BaseException) -> int:
    """The NBD error a node's exception is answered with (QEMU's choices)."""
    if isinstance(exc, SnapshotAccessError):
        return P.EINVAL           # QEMU turns EACCES into EINVAL on the wire
    if isinstance(exc, PermissionError):
        return P.EPERM
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return P.ENOSPC
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM or isinstance(exc, MemoryError):
        return P.ENOMEM
    return P.EIO


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
        self._ready = threading.Event()
        self._startup_error: Optional[BaseException] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._connections: Set["_Connection"] = set()
        self._extra_servers: List[Any] = []      # e.g. the control socket
        self._next_id = 0
        self.buffers = BufferPool()
        self._removed: List[Export] = []

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
        self._removed.append(exp)        # its host files close when the server stops
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
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

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
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="qcow2py-nbd-io")
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
            self._pool.shutdown()
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
            self._pool.shutdown(wait=True)
            for exp in list(self.exports.values()) + self._removed:
                if exp.host is not None:
                    exp.host.close()
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
        conn = _Connection(self, reader, writer, self._next_id)
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


class _Connection:
    """One client: negotiation, then the transmission phase."""

    def __init__(self, server: Server, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, cid: int):
        self.server, self.reader, self.writer, self.id = server, reader, writer, cid
        self.task: Optional[asyncio.Task] = None
        self.export: Optional[Export] = None
        self.structured = False
        self.contexts: List[Tuple[int, str, Any]] = []
        self.requests = 0
        self.closing = False
        self.sender: Optional[ReplySender] = None     # plain sockets: the writing thread
        self.peer = writer.get_extra_info("peername") or "unix socket"
        self.flight: Optional[Flight] = None

    def shutdown(self) -> None:
        """Disconnect (from the loop's thread)."""
        self.closing = True
        self.writer.close()
        if self.sender is not None:
            self.sender.abort()

    # -- negotiation -----------------------------------------------------------
    async def run(self) -> None:
        why = "disconnected"
        try:
            try:
                entered = await asyncio.wait_for(self._negotiate(), HANDSHAKE_TIMEOUT)
            except asyncio.TimeoutError:
                entered, why = False, f"no export chosen within {HANDSHAKE_TIMEOUT:g}s"
            if entered:
                why = await self._transmit()
        except (asyncio.IncompleteReadError, ConnectionError):
            why = "disconnected"
        except P.ProtocolError as e:
            why = f"protocol error: {e}"
        except ssl.SSLError as e:
            why = f"TLS error: {e}"
        finally:
            if self.export is not None:
                self.export.connections.discard(self)
            self.writer.close()
            peer = self.peer
            name = self.export.name if self.export is not None else None
            log.info("connection %d from %s, export %r: %d requests, %s",
                     self.id, peer, name, self.requests, why)

    async def _drain_bytes(self, n: int) -> None:
        while n > 0:
            chunk = await self.reader.readexactly(min(n, 1 << 20))
            n -= len(chunk)

    def _send(self, data) -> None:
        """Write on the loop (negotiation, and replies of TLS connections)."""
        if not self.writer.is_closing():
            self.writer.write(data)

    async def _negotiate(self) -> bool:
        r, srv = self.reader, self.server
        self._send(P.server_greeting())
        no_zeroes = bool(P.parse_client_flags(await r.readexactly(4)) & P.FLAG_NO_ZEROES)
        tls_needed = srv.tls is not None
        meta: Optional[Tuple[str, List[str]]] = None
        while True:
            opt, length = P.parse_option_header(await r.readexactly(16))
            if length > P.MAX_OPTION_LENGTH:
                if opt == P.OPT_EXPORT_NAME:
                    raise P.ProtocolError(f"export name of {length} bytes")
                await self._drain_bytes(length)
                self._send(P.option_error(opt, P.REP_ERR_TOO_BIG, "option too long"))
                continue
            data = await r.readexactly(length)
            if tls_needed and opt not in (P.OPT_STARTTLS, P.OPT_ABORT):
                if opt == P.OPT_EXPORT_NAME:
                    raise P.ProtocolError("EXPORT_NAME before STARTTLS on a TLS server")
                self._send(P.option_error(opt, P.REP_ERR_TLS_REQD, "TLS is required"))
                continue
            try:
                if opt == P.OPT_EXPORT_NAME:
                    exp = srv.exports.get(data.decode(errors="replace"))
                    if exp is None:
                        raise P.ProtocolError("EXPORT_NAME of an unknown export")
                    self._enter(exp, meta)
                    self._send(P.export_name_reply(exp.node.size, exp.flags(self.structured), no_zeroes))
                    return True
                if opt == P.OPT_ABORT:
                    self._send(P.option_reply(opt, P.REP_ACK))
                    await self.writer.drain()
                    return False
                if opt == P.OPT_STARTTLS:
                    await self._starttls(data, tls_needed)
                    tls_needed, self.structured, meta = False, False, None
                elif opt == P.OPT_LIST:
                    self._empty(data)
                    for exp in list(srv.exports.values()):
                        self._send(P.option_reply(opt, P.REP_SERVER,
                                                  P.rep_server(exp.name, exp.description)))
                    self._send(P.option_reply(opt, P.REP_ACK))
                elif opt in (P.OPT_INFO, P.OPT_GO):
                    name, infos = P.parse_info_request(data)
                    exp = self._export(name)
                    self._send(P.option_reply(opt, P.REP_INFO,
                                              P.info_export(exp.node.size, exp.flags(self.structured))))
                    if P.INFO_NAME in infos:
                        self._send(P.option_reply(opt, P.REP_INFO, P.info_name(exp.name)))
                    if P.INFO_DESCRIPTION in infos and exp.description:
                        self._send(P.option_reply(opt, P.REP_INFO,
                                                  P.info_description(exp.description)))
                    self._send(P.option_reply(opt, P.REP_INFO, P.info_block_size()))
                    if opt == P.OPT_GO:
                        self._enter(exp, meta)      # before the ACK: removable from now on
                    self._send(P.option_reply(opt, P.REP_ACK))
                    if opt == P.OPT_GO:
                        return True
                elif opt == P.OPT_STRUCTURED_REPLY:
                    self._empty(data)
                    self.structured = True
                    self._send(P.option_reply(opt, P.REP_ACK))
                elif opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
                    chosen = self._meta_context(opt, data)
                    if opt == P.OPT_SET_META_CONTEXT:
                        meta = chosen
                else:
                    raise P.OptionError(P.REP_ERR_UNSUP, f"option {opt} is not supported")
            except P.OptionError as e:
                self._send(P.option_error(opt, e.reply, str(e)))
            await self.writer.drain()

    @staticmethod
    def _empty(data: bytes) -> None:
        if data:
            raise P.OptionError(P.REP_ERR_INVALID, "this option takes no payload")

    def _export(self, name: str) -> Export:
        exp = self.server.exports.get(name)
        if exp is None:
            raise P.OptionError(P.REP_ERR_UNKNOWN, f"export {name!r} not present")
        return exp

    async def _starttls(self, data: bytes, tls_needed: bool) -> None:
        self._empty(data)
        if self.server.tls is None:
            raise P.OptionError(P.REP_ERR_POLICY, "TLS is not configured on this server")
        if not tls_needed:
            raise P.OptionError(P.REP_ERR_INVALID, "TLS is already in use")
        self._send(P.option_reply(P.OPT_STARTTLS, P.REP_ACK))
        await self.writer.drain()
        await self.writer.start_tls(self.server.tls)

    def _meta_context(self, opt: int, data: bytes) -> Tuple[str, List[str]]:
        if not self.structured:
            raise P.OptionError(P.REP_ERR_INVALID, "meta contexts need structured replies")
        name, queries = P.parse_meta_context_request(data)
        exp = self._export(name)
        listing = opt == P.OPT_LIST_META_CONTEXT
        chosen = P.match_contexts(queries, exp.contexts(), listing)
        for i, ctx in enumerate(chosen):
            self._send(P.option_reply(opt, P.REP_META_CONTEXT,
                                      P.rep_meta_context(0 if listing else i + 1, ctx)))
        self._send(P.option_reply(opt, P.REP_ACK))
        return name, chosen

    def _enter(self, exp: Export, meta: Optional[Tuple[str, List[str]]]) -> bool:
        self.export = exp
        if meta is not None and meta[0] == exp.name:
            self.contexts = [(i + 1, n, exp.context_source(n)) for i, n in enumerate(meta[1])
                             if n in exp.contexts()]
        exp.connections.add(self)
        return True

    # -- transmission -----------------------------------------------------------
    async def _transmit(self) -> str:
        exp = self.export
        loop = asyncio.get_running_loop()
        await self.writer.drain()
        sock = self.writer.get_extra_info("socket")
        if self.writer.get_extra_info("sslcontext") is None and sock is not None and \
                self.writer.transport.get_write_buffer_size() == 0:
            self.sender = ReplySender(loop, sock.fileno(), CONNECTION_BUDGET,
                                      self.server.buffers.put)
            flight: Flight = self.sender
        else:
            flight = Flight(loop, CONNECTION_BUDGET)
        self.flight = flight
        r = self.reader
        why = "disconnected"
        try:
            while not self.closing:
                req = P.parse_request(await r.readexactly(P.REQUEST.size))
                self.requests += 1
                if req.command == P.CMD_DISC:
                    why = "client sent DISC"
                    break
                err = P.check_request(req, exp.node.size, self.structured)
                if err is None and exp.readonly and req.command in (
                        P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM):
                    err = P.EPERM
                cost = req.length if req.command in (P.CMD_READ, P.CMD_WRITE) and \
                    req.length <= P.MAX_BLOCK else 0
                payload = None
                if req.command == P.CMD_WRITE and not cost:
                    await self._drain_bytes(req.length)
                await flight.reserve(cost)
                if req.command == P.CMD_WRITE and cost:
                    try:
                        payload = await r.readexactly(req.length)
                    except BaseException:
                        flight.done(cost)
                        raise
                if err is not None:
                    self._reply_now([self._error_reply(req, err, "request refused")], cost)
                else:
                    self._dispatch(req, payload, cost)
        except (asyncio.IncompleteReadError, ConnectionError):
            why = "disconnected" if not self.closing else "server shut the connection"
        except P.ProtocolError as e:
            why = f"protocol error: {e}"
            if self.sender is not None:
                self.sender.abort()
        finally:
            await flight.idle()
            if self.sender is not None:
                self.sender.close()
        if self.sender is None and not self.writer.is_closing():
            await self.writer.drain()
        return why

    def _reply_now(self, parts, cost: int) -> None:
        """A reply made on the loop (a refusal), in line with the others."""
        if self.sender is not None:
            self.sender.put(parts, cost)
        else:
            for p in parts:
                self._send(p)
            self.flight.done(cost)

    def _dispatch(self, req: P.Request, payload, cost: int) -> None:
        if self.sender is not None:
            try:
                self.server._pool.submit(self._execute, req, payload, cost)
            except RuntimeError:          # the pool is shutting down
                self._reply_now([self._error_reply(req, P.ESHUTDOWN, "server stopping")], cost)
        else:
            asyncio.get_running_loop().create_task(self._serve_on_loop(req, payload, cost))

    def _error_reply(self, req: P.Request, err: int, message: str) -> bytes:
        if self.structured and req.command in (P.CMD_READ, P.CMD_BLOCK_STATUS):
            return P.chunk_error(req.cookie, err, message)
        return P.simple_reply(req.cookie, err)

    async def _serve_on_loop(self, req: P.Request, payload, cost: int) -> None:
        """TLS: the request on the pool, its reply written by the loop."""
        try:
            parts, _buf = await asyncio.get_running_loop().run_in_executor(
                self.server._pool, self._execute, req, payload, cost)
            for p in parts:
                self._send(p)
        finally:
            self.flight.done(cost)
        try:
            await self.writer.drain()
        except ConnectionError:
            pass

    def _execute(self, req: P.Request, payload, cost: int):
        """The request on the node (worker thread).  Plain sockets: the reply goes
        to the sender; TLS: ``(parts, buffer)`` is returned to the loop."""
        exp = self.export
        node = exp.node
        buf = None
        sender = self.sender
        try:
            cmd = req.command
            if cmd == P.CMD_READ:
                buf = self.server.buffers.get(req.length)
                chunks = read_chunks(node, req.offset, req.length,
                                     bool(req.flags & P.CMDF_DF) or not self.structured,
                                     buf, exp.host, files=sender is not None)
                parts = self._read_reply(req, chunks)
            elif cmd == P.CMD_BLOCK_STATUS:
                if not self.contexts:
                    raise Refused(P.EINVAL, "no meta context was selected")
                replies = status_chunks(node, self.contexts, req.offset, req.length,
                                        bool(req.flags & P.CMDF_REQ_ONE))
                parts = [P.chunk_block_status(req.cookie, cid, ext, i == len(replies) - 1)
                         for i, (cid, ext) in enumerate(replies)]
            else:
                run_command(node, req, payload)
                parts = [P.simple_reply(req.cookie)]
        except Refused as e:
            parts = [self._error_reply(req, e.errno, e.message)]
        except Exception as e:      # noqa: BLE001 - every engine error becomes an NBD error
            code = errno_of(e)
            if code == P.EIO:
                log.warning("connection %d: %s at %d+%d failed: %s", self.id,
                            P.COMMAND_NAMES.get(req.command), req.offset, req.length, e)
            parts = [self._error_reply(req, code, str(e))]
        if sender is None:
            return parts, buf
        sender.put(parts, cost, buf)
        return None

    def _read_reply(self, req: P.Request, chunks) -> list:
        if not self.structured:
            return [P.simple_reply(req.cookie)] + (chunks[0][2] if chunks else [])
        if not chunks:
            return [P.chunk_done(req.cookie)]
        last = len(chunks) - 1
        parts: list = []
        for i, (start, length, pieces) in enumerate(chunks):
            if pieces is None:
                parts.append(P.chunk_hole(req.cookie, start, length, i == last))
            else:
                parts.append(P.chunk_data_header(req.cookie, start, length, i == last))
                parts.extend(pieces)
        return parts
