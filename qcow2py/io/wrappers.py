"""Storage wrappers: one forwarding base, and what the engine and its tests wrap
files with: tracing (request logs, disk models), recording (crash tests),
``cache=unsafe`` (throw-away copy targets) and fault injection.

A wrapper that must see every request hides the file descriptor (``fileno()``
is None), so the native bulk paths (``read_runs``, ``write_batch``) come back
through its Python methods; :class:`UnsafeStorage` passes the descriptor on.
"""

from __future__ import annotations

import errno as _errno
import os
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .storage import Storage


class ForwardingStorage(Storage):
    """Forwards every request to ``inner``; subclasses override what they watch."""

    #: forward ``fileno()`` (and with it the native paths) to the inner storage
    pass_fd = False

    def __init__(self, inner: Storage):
        self.inner = inner
        self.name = inner.name
        self.writable = inner.writable
        self.alignment = inner.alignment

    def size(self) -> int:
        return self.inner.size()

    def allocated_size(self) -> int:
        return self.inner.allocated_size()

    def fileno(self) -> Optional[int]:
        return self.inner.fileno() if self.pass_fd else None

    def pread_into(self, buf, offset: int) -> int:
        return self.inner.pread_into(buf, offset)

    def read_runs(self, buf, buf_offsets, host_offsets, lengths) -> None:
        self.inner.read_runs(buf, buf_offsets, host_offsets, lengths)

    def pwrite(self, data, offset: int) -> None:
        self.inner.pwrite(data, offset)

    def fsync(self) -> None:
        self.inner.fsync()

    def truncate(self, size: int) -> None:
        self.inner.truncate(size)

    def fallocate(self, offset: int, length: int) -> None:
        if self.pass_fd:
            self.inner.fallocate(offset, length)
        else:
            super().fallocate(offset, length)     # through truncate: the wrapper sees it

    def write_batch(self, *args, **kwargs) -> list:
        if self.pass_fd:
            return self.inner.write_batch(*args, **kwargs)
        return super().write_batch(*args, **kwargs)   # through pwrite: the wrapper sees it

    def allocation(self, offset: int, length: int):
        return self.inner.allocation(offset, length)

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class Request:
    """One traced request: ``kind`` is "read", "write", "fsync" or "truncate"."""

    kind: str
    offset: int = 0
    length: int = 0


class TracingStorage(ForwardingStorage):
    """Wraps another storage and records every request, in order.

    Reads are recorded one per request actually issued, so a test can assert
    that a copy read the file front to back, or feed the trace to a disk model.
    """

    def __init__(self, inner: Storage, log: Optional["TraceLog"] = None):
        super().__init__(inner)
        self.requests: List[Request] = []
        self._lock = threading.Lock()
        self.log = log              # a shared log: one order across several storages

    def _log(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)
        if self.log is not None:
            self.log.record(self.name, req)

    def pread_into(self, buf, offset: int) -> int:
        self._log(Request("read", offset, len(memoryview(buf).cast("B"))))
        return self.inner.pread_into(buf, offset)

    def read_runs(self, buf, buf_offsets, host_offsets, lengths) -> None:
        reqs = [Request("read", int(h), int(n))
                for h, n in zip(host_offsets.tolist(), lengths.tolist())]
        with self._lock:
            self.requests.extend(reqs)
        if self.log is not None:
            for r in reqs:
                self.log.record(self.name, r)
        self.inner.read_runs(buf, buf_offsets, host_offsets, lengths)

    def pwrite(self, data, offset: int) -> None:
        self._log(Request("write", offset, len(memoryview(data).cast("B"))))
        self.inner.pwrite(data, offset)

    def fsync(self) -> None:
        self._log(Request("fsync"))
        self.inner.fsync()

    def truncate(self, size: int) -> None:
        self._log(Request("truncate", size))
        self.inner.truncate(size)

    def reads(self) -> List[Tuple[int, int]]:
        """The (offset, length) of every read, in issue order."""
        return [(r.offset, r.length) for r in self.requests if r.kind == "read"]


class TraceLog:
    """One ordered request log shared by several :class:`TracingStorage` objects.

    Tracing every file of a backing chain into one log keeps the order in
    which the layers were read, which a disk model needs (a guest-order copy
    hops between the files).  Entries are ``(file, request, thread id)``;
    :meth:`wrap` is a ``storage_wrapper`` for :func:`qcow2py.open` (use it with
    ``wrap_chain=True`` to trace the backing files too).
    """

    def __init__(self) -> None:
        self.entries: List[Tuple[str, Request, int]] = []
        self._lock = threading.Lock()

    def wrap(self, storage: Storage) -> "TracingStorage":
        return TracingStorage(storage, log=self)

    def record(self, name: str, req: Request) -> None:
        with self._lock:
            self.entries.append((name, req, threading.get_ident()))

    def reads(self) -> List[Tuple[str, int, int]]:
        """``(file, offset, length)`` of every read, in issue order, over all files."""
        return [(name, r.offset, r.length) for name, r, _ in self.entries if r.kind == "read"]


class UnsafeStorage(ForwardingStorage):
    """Wraps a storage and drops fsync (qemu-img's ``cache=unsafe``).

    For copies whose target is thrown away if they fail: the target still
    gets every write in crash-safe order, but nothing waits for the disk.
    """

    pass_fd = True

    def fsync(self) -> None:
        pass


class RecordingStorage(ForwardingStorage):
    """Wraps another storage and journals every write and fsync, with the data.

    :meth:`crash_image` rebuilds the file as a crash could have left it: every
    write before the last completed fsync, plus any chosen subset of the
    writes after it (the disk may have persisted any of them, in any order).
    """

    def __init__(self, inner: Storage, initial: bytes = b""):
        super().__init__(inner)
        self.initial = bytes(initial)
        self.journal: List[Tuple[str, int, bytes]] = []     # ("write", off, data) / ("fsync",..)
        self._lock = threading.Lock()

    def pwrite(self, data, offset: int) -> None:
        data = bytes(memoryview(data).cast("B"))
        with self._lock:
            self.journal.append(("write", offset, data))
        self.inner.pwrite(data, offset)

    def fsync(self) -> None:
        self.inner.fsync()
        with self._lock:
            self.journal.append(("fsync", 0, b""))

    def truncate(self, size: int) -> None:
        with self._lock:
            self.journal.append(("truncate", size, b""))
        self.inner.truncate(size)

    def sync_points(self) -> List[int]:
        """Journal indexes just after each fsync."""
        return [i + 1 for i, (kind, _, _) in enumerate(self.journal) if kind == "fsync"]

    def crash_image(self, upto: int, survivors) -> bytes:
        """The file after a crash at journal index ``upto``.

        Everything before the last fsync preceding ``upto`` is durable; of the
        writes after it, only the journal indexes in ``survivors`` persisted.
        """
        durable = max([p for p in self.sync_points() if p <= upto], default=0)
        buf = bytearray(self.initial)
        keep = set(survivors)
        for i, (kind, off, data) in enumerate(self.journal[:upto]):
            if i >= durable and i not in keep:
                continue
            if kind == "write":
                end = off + len(data)
                if end > len(buf):
                    buf.extend(bytes(end - len(buf)))
                buf[off:end] = data
            elif kind == "truncate":
                if off < len(buf):
                    del buf[off:]
                else:
                    buf.extend(bytes(off - len(buf)))
        return bytes(buf)


@dataclass
class Fault:
    """One rule of a :class:`FaultStorage`: the requests of kind ``op`` ("read",
    "write", "fsync", "truncate", "fallocate") that touch ``[offset, offset+length)``
    (any, when ``offset`` is None) pass ``after`` times, then the next ``count``
    (every one, when None) sleep ``delay`` seconds and fail with ``error`` (an errno;
    None only delays)."""

    op: str
    error: Optional[int] = _errno.EIO
    after: int = 0
    count: Optional[int] = 1
    offset: Optional[int] = None
    length: int = 1 << 62
    delay: float = 0.0
    seen: int = 0
    fired: int = 0


class FaultStorage(ForwardingStorage):
    """Injects EIO, ENOSPC (any errno) or delays into chosen requests, for tests of
    error paths: ``FaultStorage(st).fail("write", errno.ENOSPC, after=3)``."""

    OPS = ("read", "write", "fsync", "truncate", "fallocate")

    def __init__(self, inner: Storage):
        super().__init__(inner)
        self.faults: List[Fault] = []
        self._lock = threading.Lock()

    def fail(self, op: str, error: Optional[int] = _errno.EIO, *, after: int = 0,
             count: Optional[int] = 1, offset: Optional[int] = None, length: int = 1 << 62,
             delay: float = 0.0) -> Fault:
        """Add a rule (see :class:`Fault`) and return it (its ``fired`` counts hits)."""
        if op not in self.OPS:
            raise ValueError(f"unknown request kind {op!r} (one of {', '.join(self.OPS)})")
        f = Fault(op, error, after, count, offset, length, delay)
        with self._lock:
            self.faults.append(f)
        return f

    def _check(self, op: str, offset: int = 0, length: int = 0) -> None:
        hit = None
        with self._lock:
            for f in self.faults:
                if f.op != op or (f.offset is not None and not (
                        offset < f.offset + f.length and f.offset < offset + max(length, 1))):
                    continue
                f.seen += 1
                if f.seen > f.after and (f.count is None or f.fired < f.count):
                    f.fired += 1
                    hit = f
                    break
        if hit is None:
            return
        if hit.delay:
            time.sleep(hit.delay)
        if hit.error is not None:
            raise OSError(hit.error, os.strerror(hit.error), self.name)

    def pread_into(self, buf, offset: int) -> int:
        self._check("read", offset, len(memoryview(buf).cast("B")))
        return self.inner.pread_into(buf, offset)

    def read_runs(self, buf, buf_offsets, host_offsets, lengths) -> None:
        for h, n in zip(host_offsets.tolist(), lengths.tolist()):
            self._check("read", int(h), int(n))
        self.inner.read_runs(buf, buf_offsets, host_offsets, lengths)

    def pwrite(self, data, offset: int) -> None:
        self._check("write", offset, len(memoryview(data).cast("B")))
        self.inner.pwrite(data, offset)

    def fsync(self) -> None:
        self._check("fsync")
        self.inner.fsync()

    def truncate(self, size: int) -> None:
        self._check("truncate", size)
        self.inner.truncate(size)

    def fallocate(self, offset: int, length: int) -> None:
        self._check("fallocate", offset, length)
        self.inner.fallocate(offset, length)
