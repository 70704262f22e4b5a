"""Direct I/O (``O_DIRECT``): cache modes, alignment, aligned buffers, bounce paths.

``cache=none`` (qemu-img ``-t none``/``-T none``) bypasses the page cache:
what a benchmark times is then the disk, not memory, and a copy of a big
image does not evict everything else from the cache.  O_DIRECT requests must
be aligned — file offset and length to the file system's direct-I/O block
(``request alignment``), buffer address to its memory alignment — or the
kernel answers EINVAL.  :class:`DirectFileStorage` is a
:class:`~qcow2py.io.storage.FileStorage` whose every request is legal: aligned
ones go straight to the file (the copy's bulk data, in C), the rest (headers,
L1/L2 and refcount tables smaller than a block, compressed streams, a partial
cluster, the tail of a file) through an aligned bounce buffer, writes as
read-modify-write of the covering blocks under a range lock so that two
partial writes to one block cannot lose each other's bytes.

The alignment is asked from the kernel (``statx`` with ``STATX_DIOALIGN``,
Linux 6.1+) or, as QEMU does, probed by reading 512, then 4096 bytes with
O_DIRECT; a file too short to probe gets 4096, which every file system
accepts.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import Dict, List, Optional, Tuple

from .. import native
from ..errors import Qcow2Error
from ..lazyimport import numpy as np
from .rangelock import RangeLock
from .storage import FileStorage, Storage
from .wrappers import UnsafeStorage

__all__ = ["CACHE_MODES", "PAGE", "DirectIOUnsupportedError", "DirectFileStorage",
           "aligned_empty", "dio_alignment", "open_storage", "cache_flags", "probe_alignment"]

#: qemu-img's cache modes: (O_DIRECT, O_DSYNC, flush honoured)
CACHE_MODES: Dict[str, Tuple[bool, bool, bool]] = {
    "writeback": (False, False, True),
    "unsafe": (False, False, False),
    "writethrough": (False, True, True),
    "none": (True, False, True),
    "directsync": (True, True, True),
}

PAGE = mmap.PAGESIZE
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_STATX_DIOALIGN = 0x2000
_AT_EMPTY_PATH = 0x1000
_STATX_MASK, _STATX_MEM_ALIGN, _STATX_OFFSET_ALIGN = 0, 152, 156


class DirectIOUnsupportedError(Qcow2Error, OSError):
    """The file system refuses O_DIRECT (the message is qemu-img's)."""

    def __str__(self) -> str:
        return str(self.strerror)


def cache_flags(cache: str) -> Tuple[bool, bool, bool]:
    """``(direct, dsync, flush)`` for a cache mode name; ValueError for an unknown one."""
    try:
        return CACHE_MODES[cache]
    except KeyError:
        raise ValueError(f"invalid cache option {cache!r} (one of "
                         f"{', '.join(CACHE_MODES)})") from None


def aligned_empty(n: int):
    """A numpy uint8 array of ``n`` bytes at a page-aligned address (anonymous
    mmap: zero pages committed only as data lands in them), usable for
    O_DIRECT with any memory alignment a file system asks."""
    m = mmap.mmap(-1, max(int(n), 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(m, dtype=np.uint8, count=int(n))


def _address(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if len(buf) else 0


def _statx_dio(fd: int) -> Optional[Tuple[int, int]]:
    """``(offset_align, mem_align)`` from statx(STATX_DIOALIGN), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        statx = libc.statx
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(256)
    if statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buf) != 0:
        return None
    raw = buf.raw
    mask = int.from_bytes(raw[_STATX_MASK:_STATX_MASK + 4], "little")
    mem = int.from_bytes(raw[_STATX_MEM_ALIGN:_STATX_MEM_ALIGN + 4], "little")
    off = int.from_bytes(raw[_STATX_OFFSET_ALIGN:_STATX_OFFSET_ALIGN + 4], "little")
    if not mask & _STATX_DIOALIGN or off == 0:
        return None
    return off, max(mem, 1)


def probe_alignment(fd: int) -> Optional[int]:
    """The smallest of 512 and 4096 that an O_DIRECT read at 0 accepts (QEMU's probe);
    None when the file is too short for the read to prove anything."""
    if os.fstat(fd).st_size < 4096:
        return None
    scratch = aligned_empty(4096)
    mv = memoryview(scratch)
    for size in (512, 4096):
        try:
            os.preadv(fd, [mv[:size]], 0)
            return size
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return None


def dio_alignment(fd: int) -> Tuple[int, int]:
    """``(request alignment, memory alignment)`` for O_DIRECT on ``fd``."""
    got = _statx_dio(fd)
    if got is not None:
        return got
    probed = probe_alignment(fd) or 4096
    return probed, probed


def _open_direct(path: str, flags: int, mode: int = 0o644) -> int:
    """open(2) with O_DIRECT; a file system that refuses it gets qemu-img's message."""
    try:
        return os.open(path, flags | os.O_DIRECT, mode)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        fd = os.open(path, flags, mode)          # the file opens: O_DIRECT is the problem
        os.close(fd)
        raise DirectIOUnsupportedError(
            errno.EINVAL, f"Could not open '{path}': filesystem does not support O_DIRECT",
            path) from None


class DirectFileStorage(FileStorage):
    """A file opened with O_DIRECT (and O_DSYNC for ``dsync``); any request is legal.

    ``alignment`` is the request alignment (offset and length), the
    attribute copy engines check before handing the descriptor to C
    (:meth:`write_batch` and :meth:`read_runs` do the splitting for them).
    """

    def __init__(self, path: str, writable: bool = False, create: bool = False,
                 dsync: bool = False):
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        if dsync:
            flags |= os.O_DSYNC
        self.name = path
        self.writable = writable
        self._fd = _open_direct(path, flags)
        try:
            self.alignment, self.mem_alignment = dio_alignment(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._ranges = RangeLock()
        # every write, truncate and fallocate holds this shared; a read-modify-write whose
        # last block overhangs the end of the file holds it exclusively, so that nothing
        # extends the file between its write and its cut back to the length asked for
        self._growth = RangeLock()

    # -- helpers
    def _aligned(self, buf, offset: int) -> bool:
        a = self.alignment
        return offset % a == 0 and len(buf) % a == 0 and _address(buf) % self.mem_alignment == 0

    def _span(self, offset: int, length: int) -> Tuple[int, int]:
        a = self.alignment
        return offset // a * a, -(-(offset + length) // a) * a

    def _read_span(self, view, lo: int) -> int:
        """O_DIRECT read of an aligned span into an aligned view; stops at EOF."""
        fd = self._check()
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], lo + done)
            if n == 0:
                break
            done += n
            if done % self.alignment:
                break                  # a short read ending off a block: end of file
        return done

    # -- reads
    def pread_into(self, buf, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        if not len(mv):
            return 0
        if self._aligned(mv, offset):
            return self._read_span(mv, offset)
        lo, hi = self._span(offset, len(mv))
        bounce = memoryview(aligned_empty(hi - lo))
        got = self._read_span(bounce, lo)
        n = max(0, min(len(mv), got - (offset - lo)))
        mv[:n] = bounce[offset - lo:offset - lo + n]
        return n

    def read_runs(self, buf, buf_offsets, host_offsets, lengths) -> None:
        """Aligned runs (whole blocks before the file's last partial one) in C, the
        others through the bounce path; bytes past EOF read as zeros."""
        b = np.asarray(buf_offsets, dtype=np.int64)
        h = np.asarray(host_offsets, dtype=np.int64)
        n = np.asarray(lengths, dtype=np.int64)
        mv = memoryview(buf).cast("B")
        a = self.alignment
        full = self.size() // a * a
        ok = ((h % a == 0) & (n % a == 0) & ((_address(mv) + b) % self.mem_alignment == 0)
              & (h + n <= full))
        if ok.all():
            native.pread_runs(self._check(), mv, b, h, n)
            return
        if ok.any():
            native.pread_runs(self._check(), mv, b[ok], h[ok], n[ok])
        for bo, ho, ln in zip(b[~ok].tolist(), h[~ok].tolist(), n[~ok].tolist()):
            got = self.pread_into(mv[bo:bo + ln], ho)
            if got < ln:
                mv[bo + got:bo + ln] = bytes(ln - got)

    # -- writes
    def pwrite(self, data, offset: int) -> None:
        self.writev([memoryview(data).cast("B")], offset)

    def writev(self, views: List[memoryview], offset: int) -> None:
        """Write the views back to back at ``offset``: one pwritev when everything is
        aligned, else a read-modify-write of the covering blocks (under the range
        lock; the file is cut back to its length if the last block overhung it)."""
        fd = self._check()
        total = sum(len(v) for v in views)
        if not total:
            return
        lo, hi = self._span(offset, total)
        with self._ranges.hold(lo, hi, True):
            if offset == lo and total == hi - lo and all(self._aligned(v, 0) for v in views):
                with self._growing():
                    self._write_all(views, offset)
                return
            bounce = memoryview(aligned_empty(hi - lo))
            a = self.alignment
            head = offset != lo                   # the first block is partly kept
            if head:
                self._read_span(bounce[:a], lo)
            if offset + total != hi and not (head and hi - lo == a):   # (one block: read)
                self._read_span(bounce[hi - lo - a:], hi - a)
            pos = offset - lo
            for v in views:
                bounce[pos:pos + len(v)] = v
                pos += len(v)
            overhang = offset + total < hi and hi > os.fstat(fd).st_size
            with self._growing(exclusive=overhang):
                old = os.fstat(fd).st_size
                self._write_all([bounce], lo)
                # the last block overhung the end: cut the file back to what was asked
                # (nothing else writes meanwhile: the growth lock is held exclusively)
                if overhang and hi > old:
                    os.ftruncate(fd, max(old, offset + total))

    def _growing(self, exclusive: bool = False):
        """Hold the growth lock: shared for a write that cannot be cut back, exclusive
        for one that may be."""
        return self._growth.hold(0, 1, exclusive)

    def truncate(self, size: int) -> None:
        with self._growing():
            super().truncate(size)

    def fallocate(self, offset: int, length: int) -> None:
        with self._growing():
            super().fallocate(offset, length)

    def _write_all(self, views: List[memoryview], offset: int) -> None:
        fd = self._check()
        views = [v for v in views if len(v)]
        while views:
            # at most IOV_MAX buffers a call (more is EINVAL): a batch of many small
            # pieces gathered by the pure back-end has thousands
            n = os.pwritev(fd, views[:_IOV_MAX], offset)
            offset += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]      # (a short write ends on a block boundary)

    def write_batch(self, buf, buf_off, dst_off, lengths, write_order, zero_chunk: int = 0,
                    write_zeroes: bool = False, mark_base: int = 0, mark_shift: int = 0,
                    mark=None) -> list:
        """A copy batch (:meth:`Storage.write_batch`'s contract): pieces whose target
        offset, length and buffer address are aligned are written in C; the others
        gathered through :meth:`writev`.  Zero detection runs on chunks of whole
        blocks (so a skipped chunk never leaves a partial block to fill)."""
        a = self.alignment
        if zero_chunk:
            zero_chunk = -(-zero_chunk // a) * a
        pos = np.asarray(buf_off, dtype=np.int64)
        dst = np.asarray(dst_off, dtype=np.int64)
        length = np.asarray(lengths, dtype=np.int64)
        order = np.asarray(write_order, dtype=np.int64)
        base = _address(memoryview(buf).cast("B"))
        ok = (dst % a == 0) & (length % a == 0) & ((base + pos) % self.mem_alignment == 0)
        stats = [0, 0, 0, 0]
        # (the pure twin joins pieces into unaligned bytes: everything through writev)
        in_order = ok[order] if native.USE_NATIVE else np.zeros(len(order), dtype=bool)
        if in_order.any():
            sel = order[in_order]                 # already in write order
            with self._growing():
                got = native.write_batch(pos[sel], dst[sel], length[sel], _in_turn(sel),
                                         self._check(), buf, zero_chunk, write_zeroes,
                                         mark_base, mark_shift, mark)
            stats = [x + int(y) for x, y in zip(stats, got)]
        if not in_order.all():
            sel = order[~in_order]
            native.write_batch_writev(self.writev, pos[sel], dst[sel], length[sel],
                                      _in_turn(sel), buf, zero_chunk, write_zeroes,
                                      mark_base, mark_shift, mark, stats)
        return stats


def _in_turn(sel):
    """The write order of a sub-batch already taken in write order."""
    return np.arange(len(sel), dtype=np.int64)


def open_storage(path: str, writable: bool = False, cache: str = "writeback",
                 create: bool = False) -> Storage:
    """The storage of one file in a cache mode (qemu-img's ``-t``/``-T`` names):
    the opener opens every file of a chain through this."""
    direct, dsync, flush = cache_flags(cache)
    if direct:
        return DirectFileStorage(path, writable, create, dsync=dsync)
    # cache=unsafe never flushes: nothing waits for the device, start no writeback
    st: Storage = FileStorage(path, writable, create, dsync=dsync, write_behind=flush)
    if not flush:
        st = UnsafeStorage(st)
    return st
