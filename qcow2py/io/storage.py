"""The one place that touches files.

Every byte qcow2py reads or writes goes through a :class:`Storage`.  Keeping
the interface this small is what lets tests trace the exact request stream
(:mod:`~qcow2py.io.wrappers`), simulate crashes, inject faults, feed a disk
model, or run on memory (:class:`MemoryStorage`) without changing the engine.

All I/O is positional (pread/pwrite); nothing uses the file position and
nothing is memory-mapped, so an I/O error is an exception and tools such as
strace see the real requests.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
import os
import threading
from typing import List, Optional, Tuple

from ..lazyimport import numpy as np

from .. import native
from .writebehind import WriteBehind

__all__ = ["Storage", "FileStorage", "MemoryStorage"]


class Storage(ABC):
    """Abstract positional block storage.  Subclasses implement the primitives."""

    name: str = "<storage>"
    writable: bool = False
    #: O_DIRECT request alignment (offset and length); 1: any request is fine.  Code that
    #: hands the descriptor to C must honour it (``DirectFileStorage`` splits for it).
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

    def fallocate(self, offset: int, length: int) -> None:
        """Reserve host space for ``[offset, offset+length)``, extending the storage;
        the default only extends it (reads of the new range give zeros)."""
        if self.size() < offset + length:
            self.truncate(offset + length)

    def write_zeros(self, offset: int, length: int) -> None:
        """Write ``length`` zero bytes at ``offset``, 1 MiB a request (space really
        allocated: qemu-img's "full" preallocation)."""
        chunk = bytes(min(max(length, 0), 1 << 20))
        for p in range(offset, offset + length, len(chunk) or 1):
            self.pwrite(chunk[:min(len(chunk), offset + length - p)], p)

    def preallocate(self, offset: int, length: int, mode: str) -> None:
        """Reserve ``[offset, offset+length)`` as qemu-img's preallocation ``mode``
        does for a file: "falloc" reserves it, "full" writes zeros there; "off"
        and "metadata" leave the file as it is."""
        if length <= 0:
            return
        if mode == "falloc":
            self.fallocate(offset, length)
        elif mode == "full":
            self.write_zeros(offset, length)

    def fileno(self) -> Optional[int]:
        """A real OS descriptor when requests may bypass Python (native copy), else None."""
        return None

    @property
    def native_io(self) -> bool:
        """Whether bulk requests (read_runs, write_batch) run in C with the GIL released,
        so that several threads may issue them at once."""
        return self.fileno() is not None

    def write_batch(self, buf, buf_off, dst_off, lengths, write_order, zero_chunk: int = 0,
                    write_zeroes: bool = False, mark_base: int = 0, mark_shift: int = 0,
                    mark=None) -> list:
        """Gather-write pieces ``buf[buf_off[i]:+lengths[i]]`` to ``dst_off[i]`` in
        ``write_order`` (pieces that continue each other in one request), skipping
        all-zero chunks of ``zero_chunk`` bytes (or writing them as zeros with
        ``write_zeroes``) and setting bit ``(dst - mark_base) >> mark_shift`` of
        ``mark`` for data written.  Returns ``[0, written, zero, 0]``.  The default
        writes through :meth:`pwrite`; files do it in C."""
        def writev(views, off):
            self.pwrite(b"".join(bytes(v) for v in views), off)
        return native.write_batch_writev(writev, buf_off, dst_off, lengths, write_order, buf,
                                         zero_chunk, write_zeroes, mark_base, mark_shift, mark)

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

    _behind: Optional[WriteBehind] = None      # subclasses without page cache: none

    def __init__(self, path: str, writable: bool = False, create: bool = False,
                 dsync: bool = False, write_behind: bool = True):
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        if dsync:
            flags |= os.O_DSYNC               # cache=writethrough: each write durable
        flags |= getattr(os, "O_CLOEXEC", 0)
        self.name = path
        self.writable = writable
        self._fd: Optional[int] = os.open(path, flags, 0o644)
        # streams of writes start their writeback early (a hint; O_DSYNC writes
        # are on the device already when they return)
        self._behind = WriteBehind() if writable and write_behind and not dsync else None

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
        if self._behind is not None:
            self._behind.wrote(fd, offset, done)

    def fsync(self) -> None:
        # fdatasync, as QEMU's file driver flushes: it makes the data and the
        # metadata needed to read it back (size, block allocation) durable and
        # skips the timestamps, one journal commit fewer on ext4/xfs
        os.fdatasync(self._check())

    def truncate(self, size: int) -> None:
        os.ftruncate(self._check(), size)

    def fallocate(self, offset: int, length: int) -> None:
        os.posix_fallocate(self._check(), offset, length)

    def write_batch(self, buf, buf_off, dst_off, lengths, write_order, zero_chunk: int = 0,
                    write_zeroes: bool = False, mark_base: int = 0, mark_shift: int = 0,
                    mark=None) -> list:
        return native.write_batch(buf_off, dst_off, lengths, write_order, self._check(), buf,
                                  zero_chunk, write_zeroes, mark_base, mark_shift, mark)

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
