"""The NBD wire format (fixed newstyle), as pure bytes <-> values.

No sockets here: the server (:mod:`qcow2py.nbd.server`) reads bytes and hands
them to these parsers, and sends what these encoders return.  Every hostile
field is checked before it sizes anything: option payloads are bounded
(:data:`MAX_OPTION_LENGTH`), names and queries must fit inside their option.
Numbers are those of the NBD protocol (doc/proto.md of the NetworkBlockDevice
project).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

# -- handshake -----------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943           # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_TOO_BIG = (1 << 31) + 9

# NBD_OPT_INFO / NBD_OPT_GO information types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# -- transmission ----------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disc", CMD_FLUSH: "flush",
                 CMD_TRIM: "trim", CMD_CACHE: "cache", CMD_WRITE_ZEROES: "write_zeroes",
                 CMD_BLOCK_STATUS: "block_status"}

CMDF_FUA = 1 << 0
CMDF_NO_HOLE = 1 << 1
CMDF_DF = 1 << 2
CMDF_REQ_ONE = 1 << 3
CMDF_FAST_ZERO = 1 << 4

#: the flags each command accepts (anything else: EINVAL)
ALLOWED_FLAGS = {
    CMD_READ: CMDF_DF,
    CMD_WRITE: CMDF_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMDF_FUA,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMDF_FUA | CMDF_NO_HOLE | CMDF_FAST_ZERO,
    CMD_BLOCK_STATUS: CMDF_REQ_ONE,
}

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

# errno values of the protocol (fixed by the spec, not by the host)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

STATE_HOLE = 1 << 0            # base:allocation
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0           # qemu:dirty-bitmap:NAME

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

#: advertised block sizes: any alignment, 4 KiB preferred, 32 MiB per request
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_BLOCK = 32 << 20
#: the longest option payload read (names are at most 4 KiB by the spec; a
#: SET_META_CONTEXT with many queries stays well below this)
MAX_OPTION_LENGTH = 64 << 10
MAX_NAME = 4096

HANDSHAKE = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
EXPORT_NAME_REPLY = struct.Struct(">QH")


class ProtocolError(Exception):
    """The peer broke the protocol badly enough that the connection must close."""


class OptionError(Exception):
    """An option the server answers with an error reply (negotiation goes on)."""

    def __init__(self, reply: int, message: str):
        super().__init__(message)
        self.reply = reply


# -- handshake -----------------------------------------------------------------
def server_greeting() -> bytes:
    return HANDSHAKE.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)


def parse_client_flags(data: bytes) -> int:
    (flags,) = CLIENT_FLAGS.unpack(data)
    if flags & ~CLIENT_FLAGS_KNOWN:
        raise ProtocolError(f"unknown client flags {flags:#x}")
    return flags


def parse_option_header(data: bytes) -> Tuple[int, int]:
    """``(option, payload_length)``; a wrong magic is fatal."""
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    return option, length


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def option_error(option: int, reply: int, message: str) -> bytes:
    return option_reply(option, reply, message.encode()[:MAX_NAME])


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    return EXPORT_NAME_REPLY.pack(size, flags) + (b"" if no_zeroes else bytes(124))


def rep_server(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + description.encode()


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_name(name: str) -> bytes:
    return struct.pack(">H", INFO_NAME) + name.encode()


def info_description(text: str) -> bytes:
    return struct.pack(">H", INFO_DESCRIPTION) + text.encode()


def info_block_size() -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK)


def rep_meta_context(context_id: int, name: str) -> bytes:
    return struct.pack(">I", context_id) + name.encode()


class _Cursor:
    """Bounded reads from an option payload; running out is ERR_INVALID."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise OptionError(REP_ERR_INVALID, "option payload is too short")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def string(self) -> str:
        n = self.u32()
        if n > MAX_NAME:
            raise OptionError(REP_ERR_INVALID, f"string of {n} bytes is too long")
        try:
            return self.take(n).decode()
        except UnicodeDecodeError as e:
            raise OptionError(REP_ERR_INVALID, "string is not UTF-8") from e

    def end(self) -> None:
        if self.pos != len(self.data):
            raise OptionError(REP_ERR_INVALID, "option payload has trailing bytes")


def parse_info_request(data: bytes) -> Tuple[str, List[int]]:
    """NBD_OPT_INFO/GO payload: ``(export name, requested info types)``."""
    c = _Cursor(data)
    name = c.string()
    n = c.u16()
    infos = [c.u16() for _ in range(n)]
    c.end()
    return name, infos


def parse_meta_context_request(data: bytes) -> Tuple[str, List[str]]:
    """NBD_OPT_LIST/SET_META_CONTEXT payload: ``(export name, queries)``."""
    c = _Cursor(data)
    name = c.string()
    n = c.u32()
    queries = []
    for _ in range(n):
        queries.append(c.string())
    c.end()
    return name, queries


def match_contexts(queries: Sequence[str], available: Sequence[str], listing: bool) -> List[str]:
    """The contexts of ``available`` that ``queries`` select, in order, once each.

    LIST with no query lists everything; LIST also takes the namespace
    wildcards ``base:``, ``qemu:`` and ``qemu:dirty-bitmap:``.  SET takes exact
    names only.  Unknown names are ignored (the spec says so).
    """
    if listing and not queries:
        return list(available)
    out: List[str] = []
    for q in queries:
        for name in available:
            hit = name == q or (listing and q.endswith(":") and name.startswith(q))
            if hit and name not in out:
                out.append(name)
    return out


# -- transmission ----------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    flags: int
    command: int
    cookie: int
    offset: int
    length: int


def parse_request(data: bytes) -> Request:
    magic, flags, command, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, command, cookie, offset, length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, rtype: int, length: int, done: bool) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, rtype,
                      cookie, length)


def chunk_done(cookie: int) -> bytes:
    return chunk_header(cookie, REPLY_TYPE_NONE, 0, True)


def chunk_data_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; ``length`` data bytes follow it."""
    return chunk_header(cookie, REPLY_TYPE_OFFSET_DATA, 8 + length, done) + \
        struct.pack(">Q", offset)


def chunk_hole(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return chunk_header(cookie, REPLY_TYPE_OFFSET_HOLE, 12, done) + \
        struct.pack(">QI", offset, length)


def chunk_error(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_NAME]
    return chunk_header(cookie, REPLY_TYPE_ERROR, 6 + len(msg), True) + \
        struct.pack(">IH", error, len(msg)) + msg


def chunk_block_status(cookie: int, context_id: int, extents: Sequence[Tuple[int, int]],
                       done: bool) -> bytes:
    """One BLOCK_STATUS chunk: ``extents`` are ``(length, flags)`` pairs."""
    body = struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", n, f) for n, f in extents)
    return chunk_header(cookie, REPLY_TYPE_BLOCK_STATUS, len(body), done) + body


def check_request(req: Request, size: int, structured: bool) -> Optional[int]:
    """The errno a request must be refused with before it runs, or None.

    Unknown commands and flags are EINVAL; READ and WRITE over
    :data:`MAX_BLOCK` are EINVAL; past the end is ENOSPC for writes and
    EINVAL for everything else (CACHE is clipped instead).
    """
    allowed = ALLOWED_FLAGS.get(req.command)
    if allowed is None or req.flags & ~allowed:
        return EINVAL
    if req.flags & CMDF_DF and not structured:
        return EINVAL
    if req.command in (CMD_READ, CMD_WRITE) and req.length > MAX_BLOCK:
        return EINVAL
    if req.command in (CMD_DISC, CMD_FLUSH, CMD_CACHE):
        return None
    if req.command == CMD_BLOCK_STATUS and req.length == 0:
        return EINVAL
    if req.offset > size or req.length > size - req.offset:
        return ENOSPC if req.command in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    return None
