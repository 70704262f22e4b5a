"""What an NBD request does on its node (runs on the server's worker threads).

Reads go by the node's map: zero ranges become holes without touching the
data; data ranges of an image nobody can write (opened read-only) are read
with ``os.preadv`` straight from the host file at the offsets the map gives,
into a buffer reused from a pool, so a 256 KiB read is one map lookup and
one system call.  Every other node is read through its ``read_into``.
"""

from __future__ import annotations

import errno
import threading
from itertools import islice
from typing import Dict, List, Optional

from ..errors import SnapshotAccessError
from ..image import Image
from ..node import BlockKind
from . import protocol as P
from .sockout import FileRange, pread_full

#: block-status extents in one reply chunk at most (8 bytes each; a client asking for
#: more gets a shorter answer and asks again from where it ends)
MAX_EXTENTS = 1 << 16


class Refused(Exception):
    """A request refused with a chosen NBD error."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno, self.message = code, message


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


class BufferPool:
    """Read buffers reused across requests (a fresh 256 KiB buffer costs page
    faults on every request).  Bounded in bytes; buffers of any size."""

    def __init__(self, limit: int = 64 << 20):
        self.limit, self.held = limit, 0
        self.free: Dict[int, List[bytearray]] = {}
        self.lock = threading.Lock()

    def get(self, n: int) -> bytearray:
        with self.lock:
            lst = self.free.get(n)
            if lst:
                self.held -= n
                return lst.pop()
        return bytearray(n)

    def put(self, buf: bytearray) -> None:
        n = len(buf)
        with self.lock:
            if n and self.held + n <= self.limit:
                self.free.setdefault(n, []).append(buf)
                self.held += n


class HostFiles:
    """The descriptors of the files a read-only image chain keeps its data in,
    by the names its map gives (``Extent.host_file``): borrowed from the
    images' own storage, so they name exactly the files the map describes."""

    def __init__(self, fds: Dict[str, int]):
        self.fds = fds

    def fd(self, name: str) -> Optional[int]:
        return self.fds.get(name)


def direct_reads(node) -> Optional[HostFiles]:
    """HostFiles for a qcow2py Image opened read-only (its chain cannot change
    under the reads), else None (reads go through ``read_into``)."""
    if not isinstance(node, Image) or not node.read_only:
        return None
    fds: Dict[str, int] = {}
    for layer in node.chain():
        data_path = getattr(layer, "data_file_path", None)
        storage = getattr(layer, "data_storage", layer.storage) if data_path else layer.storage
        fd = storage.fileno()
        if fd is not None and storage.alignment == 1:     # O_DIRECT: through read_into
            fds[data_path or layer.filename] = fd
    return HostFiles(fds)


def read_chunks(node, offset: int, length: int, whole: bool, buf: bytearray,
                host: Optional[HostFiles], files: bool = False) -> list:
    """Read a request: ``[(offset, length, pieces)]`` where ``pieces`` is None
    for a hole (a zero range of the node's map, sent without its bytes) or the
    list of the run's data: slices of ``buf`` or, with ``files``, file ranges
    to send with ``sendfile``.  ``whole`` asks for one data run (DF, or no
    structured replies): zeros are then read like data."""
    if length == 0:
        return []
    mv = memoryview(buf)
    if whole and host is None:
        node.read_into(mv, offset)
        return [(offset, length, [mv])]
    runs: list = []
    for e in node.block_status(offset, length):
        rel = e.offset - offset
        if e.zero and not whole:
            piece = None
        elif e.zero:
            mv[rel:rel + e.length] = bytes(e.length)
            piece = mv[rel:rel + e.length]
        elif host is not None and e.kind == BlockKind.DATA and e.host_offset is not None \
                and host.fd(e.host_file) is not None:
            fd = host.fd(e.host_file)
            if files:
                piece = FileRange(fd, e.host_offset, e.length)
            else:
                piece = mv[rel:rel + e.length]
                pread_full(fd, piece, e.host_offset)
        else:
            piece = mv[rel:rel + e.length]
            node.read_into(piece, e.offset)
        if runs and (runs[-1][2] is None) == (piece is None):
            runs[-1][1] += e.length
            if piece is not None:
                runs[-1][2].append(piece)
        else:
            runs.append([e.offset, e.length, None if piece is None else [piece]])
    if whole:
        return [(offset, length, [p for r in runs for p in r[2]])]
    return [tuple(r) for r in runs]


def _allocation_extents(node, offset: int, end: int):
    """``(length, flags)`` runs of ``base:allocation`` (equal neighbours merged)."""
    last = None
    for e in node.block_status(offset, end - offset):
        flags = (0 if e.data else P.STATE_HOLE) | (P.STATE_ZERO if e.zero else 0)
        if last is not None and last[1] == flags:
            last = (last[0] + e.length, flags)
            continue
        if last is not None:
            yield last
        last = (e.length, flags)
    if last is not None:
        yield last


def _bitmap_extents(bitmap, offset: int, end: int):
    """``(length, flags)`` runs of ``qemu:dirty-bitmap:NAME``: clean gaps and dirty runs."""
    pos = offset
    for s, n in bitmap.dirty_extents(offset, end - offset):
        if s > pos:
            yield (s - pos, 0)
        yield (n, P.STATE_DIRTY)
        pos = s + n
    if pos < end:
        yield (end - pos, 0)


def status_chunks(node, contexts, offset: int, length: int, one: bool):
    """``[(context_id, [(length, flags)])]`` for BLOCK_STATUS: at most
    :data:`MAX_EXTENTS` per context (one with REQ_ONE), never a zero length."""
    end = min(offset + length, node.size)
    limit = 1 if one else MAX_EXTENTS
    out = []
    for cid, _name, source in contexts:
        runs = _allocation_extents(node, offset, end) if source is None else \
            _bitmap_extents(source, offset, end)
        out.append((cid, list(islice(runs, limit))))
    return out


def run_command(node, req: P.Request, payload) -> None:
    """WRITE, WRITE_ZEROES, TRIM, FLUSH, CACHE on the node."""
    cmd = req.command
    if cmd == P.CMD_WRITE:
        node.write(req.offset, payload)
    elif cmd == P.CMD_WRITE_ZEROES:
        if node.read_only:          # a snapshot view: EPERM before any FAST_ZERO verdict
            raise PermissionError("the export's node is read-only")
        if req.flags & P.CMDF_FAST_ZERO and not fast_zero(node, req.offset, req.length):
            raise Refused(P.ENOTSUP, "zeroing this range would write data")
        if req.length:
            node.write_zeroes(req.offset, req.length, unmap=not req.flags & P.CMDF_NO_HOLE)
    elif cmd == P.CMD_TRIM:
        if req.length:
            node.discard(req.offset, req.length)
    elif cmd == P.CMD_FLUSH:
        node.flush()
    elif cmd == P.CMD_CACHE:
        return
    if req.flags & P.CMDF_FUA:
        node.flush()


def fast_zero(node, offset: int, length: int) -> bool:
    """True when zeroing needs no data written: whole clusters of a qcow2 node."""
    cs = getattr(node, "cluster_size", None)
    if not cs or getattr(node, "format", "") != "qcow2":
        return False
    return offset % cs == 0 and (length % cs == 0 or offset + length == node.size)
