"""The one place that touches files.

Every byte qcow2py reads or writes goes through a :class:`Storage`.  Keeping
the interface this small is what lets tests trace the exact request stream
(:class:`TracingStorage`), simulate crashes, feed a disk model, or run on
memory (:class:`MemoryStorage`) without changing the format engine.

All I/O is positional (pread/pwrite); nothing uses the file position and
nothing is memory-mapped, so an I/O error is an exception and tools such as
strace see the real requests.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
import os
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .lazyimport import numpy as np

from . import native

__all__ = ["Storage", "FileStorage", "MemoryStorage", "TracingStorage", "TraceLog", "RecordingStorage",
           "Request"]


class Storage(ABC):
    """Abstract positional block storage.  Subclasses implement the primitives."""

    name: str = "<storage>"
    writable: bool = False
    #: O_DIRECT request alignment (offset and length); 1: any request is fine.  Code that
    #: hands ``fileno()`` to C must honour it (``DirectFileStorage`` splits for it).
    alignment: int = 1

    # --- primitives -----------------------------------------------------
    @abstractmethod
    def size(self) -> int:
        """Current length in bytes."""

    @abstractmethod
    def pread_into(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset``; returns the bytes read (short only at EOF)."""

    @abstractmethod
    def pwrite(self, data, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (extending the storage if needed)."""

    @abstractmethod
    def fsync(self) -> None:
        """Return only once everything written before is durable."""

    @abstractmethod
    def truncate(self, size: int) -> None:
        """Set the length to ``size`` bytes."""

    def close(self) -> None:
        pass

    def fileno(self) -> Optional[int]:
        """A real OS descriptor when requests may bypass Python (native copy), else None."""
        return None

    # --- conveniences built on the primitives ------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes; the part past EOF reads as zeros."""
        buf = bytearray(length)
        self.pread_into(memoryview(buf), offset)
        return bytes(buf)

    def read_runs(self, buf, buf_offsets: np.ndarray, host_offsets: np.ndarray,
                  lengths: np.ndarray) -> None:
        """Scatter-read: for each i, ``buf[buf_offsets[i]:+lengths[i]] = file[host_offsets[i]:]``.

        Bytes past EOF read as zeros.  One request per run; the file
        implementation does the whole list in C with the GIL released.
        """
        mv = memoryview(buf).cast("B")
        for b, h, n in zip(buf_offsets.tolist(), host_offsets.tolist(), lengths.tolist()):
            got = self.pread_into(mv[b:b + n], h)
            if got < n:
                mv[b + got:b + n] = bytes(n - got)

    def allocation(self, offset: int, length: int) -> List[Tuple[int, int, bool]]:
        """Runs of ``(start, length, is_data)`` covering the range (holes are not data).

        The default says everything is data, which is always safe.
        """
        return [(offset, length, True)] if length > 0 else []

    def allocated_size(self) -> int:
        """Bytes the storage really occupies (``st_blocks * 512`` for files)."""
        return self.size()


class FileStorage(Storage):
    """A file on the host, accessed with pread/pwrite on one descriptor."""

    def __init__(self, path: str, writable: bool = False, create: bool = False,
                 dsync: bool = False):
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        if dsync:
            flags |= os.O_DSYNC               # cache=writethrough: each write durable
        flags |= getattr(os, "O_CLOEXEC", 0)
        self.name = path
        self.writable = writable
        self._fd: Optional[int] = os.open(path, flags, 0o644)

    def _check(self) -> int:
        if self._fd is None:
            raise ValueError(f"storage {self.name!r} is closed")
        return self._fd

    def fileno(self) -> Optional[int]:
        return self._fd

    def size(self) -> int:
        return os.fstat(self._check()).st_size

    def allocated_size(self) -> int:
        return os.fstat(self._check()).st_blocks * 512

    def pread_into(self, buf, offset: int) -> int:
        fd = self._check()
        mv = memoryview(buf).cast("B")
        done = 0
        while done < len(mv):
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def read_runs(self, buf, buf_offsets, host_offsets, lengths) -> None:
        native.pread_runs(self._check(), buf, buf_offsets, host_offsets, lengths)

    def pwrite(self, data, offset: int) -> None:
        fd = self._check()
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            done += os.pwrite(fd, mv[done:], offset + done)

    def fsync(self) -> None:
        os.fsync(self._check())

    def truncate(self, size: int) -> None:
        os.ftruncate(self._check(), size)

    def allocation(self, offset: int, length: int) -> List[Tuple[int, int, bool]]:
        fd = self._check()
        end = offset + length
        runs: List[Tuple[int, int, bool]] = []
        pos = offset
        try:
            while pos < end:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:
                        raise
                    data = end          # no data after pos: the rest is a hole
                data = min(data, end)
                if data > pos:
                    runs.append((pos, data - pos, False))
                    pos = data
                    continue
                hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
                runs.append((pos, hole - pos, True))
                pos = hole
        except (AttributeError, OSError):
            return [(offset, length, True)]
        return runs

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class MemoryStorage(Storage):
    """A growable in-memory file, for tests and scratch images."""

    def __init__(self, data: bytes = b"", name: str = "<memory>", writable: bool = True):
        self._buf = bytearray(data)
        self.name = name
        self.writable = writable
        self._lock = threading.Lock()

    def size(self) -> int:
        return len(self._buf)

    def getvalue(self) -> bytes:
        return bytes(self._buf)

    def pread_into(self, buf, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        chunk = self._buf[offset:offset + len(mv)]
        mv[:len(chunk)] = chunk
        return len(chunk)

    def pwrite(self, data, offset: int) -> None:
        data = bytes(data)
        with self._lock:
            end = offset + len(data)
            if end > len(self._buf):
                self._buf.extend(bytes(end - len(self._buf)))
            self._buf[offset:end] = data

    def fsync(self) -> None:
        pass

    def truncate(self, size: int) -> None:
        with self._lock:
            if size < len(self._buf):
                del self._buf[size:]
            else:
                self._buf.extend(bytes(size - len(self._buf)))


@dataclass(frozen=True)
class Request:
    """One traced request: ``kind`` is "read", "write", "fsync" or "truncate"."""

    kind: str
    offset: int = 0
    length: int = 0


class TracingStorage(Storage):
    """Wraps another storage and records every request, in order.

    Reads are recorded one per request actually issued, so a test can assert
    that a copy read the file front to back, or feed the trace to a disk model.
    """

    def __init__(self, inner: Storage, log: Optional["TraceLog"] = None):
        self.inner = inner
        self.name = inner.name
        self.writable = inner.writable
        self.requests: List[Request] = []
        self._lock = threading.Lock()
        self.log = log              # a shared log: one order across several storages

    def _log(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)
        if self.log is not None:
            self.log.record(self.name, req)

    def size(self) -> int:
        return self.inner.size()

    def allocated_size(self) -> int:
        return self.inner.allocated_size()

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

    def allocation(self, offset: int, length: int):
        return self.inner.allocation(offset, length)

    def close(self) -> None:
        self.inner.close()

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


class UnsafeStorage(Storage):
    """Wraps a storage and drops fsync (qemu-img's ``cache=unsafe``).

    For copies whose target is thrown away if they fail: the target still
    gets every write in crash-safe order, but nothing waits for the disk.
    """

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
        return self.inner.fileno()

    def pread_into(self, buf, offset: int) -> int:
        return self.inner.pread_into(buf, offset)

    def read_runs(self, buf, buf_offsets, host_offsets, lengths) -> None:
        self.inner.read_runs(buf, buf_offsets, host_offsets, lengths)

    def pwrite(self, data, offset: int) -> None:
        self.inner.pwrite(data, offset)

    def fsync(self) -> None:
        pass

    def truncate(self, size: int) -> None:
        self.inner.truncate(size)

    def allocation(self, offset: int, length: int):
        return self.inner.allocation(offset, length)

    def close(self) -> None:
        self.inner.close()


class RecordingStorage(Storage):
    """Wraps another storage and journals every write and fsync, with the data.

    :meth:`crash_image` rebuilds the file as a crash could have left it: every
    write before the last completed fsync, plus any chosen subset of the
    writes after it (the disk may have persisted any of them, in any order).
    """

    def __init__(self, inner: Storage, initial: bytes = b""):
        self.inner = inner
        self.name = inner.name
        self.writable = inner.writable
        self.initial = bytes(initial)
        self.journal: List[Tuple[str, int, bytes]] = []     # ("write", off, data) / ("fsync",..)
        self._lock = threading.Lock()

    def size(self) -> int:
        return self.inner.size()

    def allocated_size(self) -> int:
        return self.inner.allocated_size()

    def fileno(self) -> Optional[int]:
        return None        # keep every request in Python, where it is journaled

    def pread_into(self, buf, offset: int) -> int:
        return self.inner.pread_into(buf, offset)

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

    def allocation(self, offset: int, length: int):
        return self.inner.allocation(offset, length)

    def close(self) -> None:
        self.inner.close()

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
