"""One NBD client connection: negotiation, then the transmission phase.

The loop reads the client's options and requests; each request runs on the
server's worker pool (:mod:`qcow2py.nbd.engine`), and on a plain socket its
reply is written by the worker or the connection's sender thread
(:mod:`qcow2py.nbd.sockout`), never by the loop.  Over TLS the loop writes
the replies (the standard library's SSL transport owns the socket).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, List, Optional, Tuple

from . import protocol as P
from .engine import Refused, errno_of, read_chunks, run_command, status_chunks
from .sockout import Flight, ReplySender

log = logging.getLogger("qcow2py.nbd")

#: bytes of request payloads and read buffers one connection may hold at once
CONNECTION_BUDGET = 64 << 20
#: a client must have chosen an export this soon after connecting (it holds a slot of -e)
HANDSHAKE_TIMEOUT = 30.0
#: what a request counts against the budget at least (its reply, its bookkeeping)
MIN_COST = 4096
#: what a BLOCK_STATUS counts (its reply holds up to MAX_EXTENTS extents per context)
STATUS_COST = 1 << 20


def request_cost(req: P.Request) -> int:
    """Bytes a request may hold until its reply is written: its payload or read
    data, so that a client that sends and never reads is stopped by the budget."""
    if req.command in (P.CMD_READ, P.CMD_WRITE) and req.length <= P.MAX_BLOCK:
        return max(MIN_COST, req.length)
    if req.command == P.CMD_BLOCK_STATUS:
        return STATUS_COST
    return MIN_COST


class Connection:
    """One client: negotiation, then the transmission phase."""

    def __init__(self, server, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, cid: int):
        self.server, self.reader, self.writer, self.id = server, reader, writer, cid
        self.task: Optional[asyncio.Task] = None
        self.export: Optional["Export"] = None
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
                    self._send(P.export_name_reply(exp.node.size, exp.flags(self.structured),
                                                   no_zeroes))
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
                    info = P.info_export(exp.node.size, exp.flags(self.structured))
                    self._send(P.option_reply(opt, P.REP_INFO, info))
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

    def _export(self, name: str) -> "Export":
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

    def _enter(self, exp, meta: Optional[Tuple[str, List[str]]]) -> bool:
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
                takes_payload = req.command == P.CMD_WRITE and req.length <= P.MAX_BLOCK
                if req.command == P.CMD_WRITE and not takes_payload:
                    await self._drain_bytes(req.length)       # too big: read and dropped
                cost = request_cost(req)
                payload = None
                await flight.reserve(cost)
                if takes_payload:
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
                self.server.pool.submit(self._execute, req, payload, cost)
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
                self.server.pool, self._execute, req, payload, cost)
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
