"""Decompress a batch of compressed clusters straight into the caller's buffers.

The clusters of a read are handed out one at a time, from a shared counter,
to the calling thread and the pool's workers, so every core reads and
decompresses (file reads, zlib and zstandard all release the GIL) and the
calling thread never sits idle waiting for the pool.  Each cluster is
decompressed into its destination (zstd without any intermediate copy).

Semantics are those of :func:`qcow2py.codec.decompress_cluster`: a stream
may be followed by padding, decoding stops once one cluster is produced, and
a stream that is invalid or short raises the same :class:`CorruptImageError`
(the failing stream is simply handed to ``decompress_cluster`` for the
message).
"""

from __future__ import annotations

import itertools
import os
import threading
import zlib
from typing import Any, List, Optional, Sequence

from ..format.codec import ZLIB_WBITS, decompress_cluster
from ..errors import CorruptImageError

try:
    import zstandard as _zstd
except ImportError:  # pragma: no cover - zstandard is a dependency
    _zstd = None

_ZSTD_ERRORS = (getattr(_zstd, "ZstdError", zlib.error), zlib.error)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: worker threads besides the caller (the caller decompresses too)
WORKERS = max(1, _usable_cpus() - 1)

_pool: Optional[Any] = None       # a concurrent.futures.ThreadPoolExecutor
_pool_pid = 0
_pool_lock = threading.Lock()
_local = threading.local()


def pool() -> Any:
    """The worker threads (started on first use; anew in a forked child, which has none)."""
    from concurrent.futures import ThreadPoolExecutor    # not at import: qcow2py info
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="qcow2py-inflate")
            _pool_pid = os.getpid()
        return _pool


def _fail(codec: str, stream, cluster_size: int) -> CorruptImageError:
    """The error for a stream the fast path rejected (raised by the reference codec)."""
    decompress_cluster(codec, bytes(stream), cluster_size)      # raises with the message
    return CorruptImageError(f"compressed cluster does not decompress ({codec})")


def _zlib_into(src: memoryview, dst: memoryview, cluster_size: int) -> None:
    try:
        # A 32 KiB window (see codec.ZLIB_WBITS): QEMU inflates the whole
        # cluster in one call, so a back-reference reaches anything already out
        out = zlib.decompressobj(ZLIB_WBITS).decompress(src, cluster_size)
    except zlib.error:
        out = b""
    if len(out) != cluster_size:
        raise _fail("zlib", src, cluster_size)
    dst[:] = out


def _zstd_into(src: memoryview, dst: memoryview, cluster_size: int) -> None:
    if _zstd is None:
        raise _fail("zstd", src, cluster_size)
    dctx = getattr(_local, "zstd", None)
    if dctx is None:            # a decompression context is not thread-safe: one per thread
        dctx = _local.zstd = _zstd.ZstdDecompressor()
    got = 0
    try:
        # stops after one cluster: a hostile frame cannot make us allocate more
        reader = dctx.stream_reader(src, read_across_frames=True)
        while got < cluster_size:
            n = reader.readinto(dst[got:])
            if not n:
                break
            got += n
    except _ZSTD_ERRORS:
        got = -1
    if got != cluster_size:
        _local.zstd = None      # start the next cluster from a fresh context
        raise _fail("zstd", src, cluster_size)


def _other_into(codec: str):
    def run(src: memoryview, dst: memoryview, cluster_size: int) -> None:
        dst[:] = decompress_cluster(codec, bytes(src), cluster_size)
    return run


def _decoder(codec: str):
    if codec == "zlib":
        return _zlib_into
    if codec == "zstd":
        return _zstd_into
    return _other_into(codec)          # raises UnsupportedFeatureError


class _Batch:
    """Clusters handed out one at a time, from a shared counter, to every thread."""

    __slots__ = ("decode", "fetch", "dsts", "cs", "counter", "failed")

    def __init__(self, decode, fetch, dsts, cs):
        self.decode, self.fetch, self.dsts, self.cs = decode, fetch, dsts, cs
        self.counter = itertools.count()       # next() is atomic under the GIL
        self.failed = False

    def drain(self) -> None:
        decode, fetch, dsts, cs, counter = self.decode, self.fetch, self.dsts, self.cs, \
            self.counter
        n = len(dsts)
        try:
            while not self.failed:
                i = next(counter)
                if i >= n:
                    return
                decode(fetch(i), dsts[i], cs)
        except BaseException:
            self.failed = True
            raise


def _run(codec: str, fetch, dsts: List[memoryview], cluster_size: int) -> None:
    n = len(dsts)
    if n == 0:
        return
    decode = _decoder(codec)
    if n == 1 or WORKERS == 0:
        for i in range(n):
            decode(fetch(i), dsts[i], cluster_size)
        return
    batch = _Batch(decode, fetch, dsts, cluster_size)
    futures = [pool().submit(batch.drain) for _ in range(min(WORKERS, n - 1))]
    error: Optional[BaseException] = None
    try:
        batch.drain()
    except BaseException as e:       # still wait for the workers before raising
        error = e
    for f in futures:
        if f.cancel():               # a worker that never started: nothing to wait for
            continue
        try:
            f.result()
        except BaseException as e:
            if error is None:
                error = e
    if error is not None:
        raise error


def decompress_into(codec: str, src, src_offsets: Sequence[int], src_lengths: Sequence[int],
                    dsts: List[memoryview], cluster_size: int) -> None:
    """Decompress stream ``i`` (``src[src_offsets[i]:+src_lengths[i]]``) into ``dsts[i]``.

    Every ``dsts[i]`` is a writable byte memoryview of ``cluster_size`` bytes
    and is filled completely, or an error is raised (after every thread has
    stopped touching the buffers).
    """
    smv = memoryview(src).cast("B")
    _run(codec, lambda i: smv[src_offsets[i]:src_offsets[i] + src_lengths[i]], dsts,
         cluster_size)


def _scratch(n: int) -> memoryview:
    """This thread's reusable buffer of at least ``n`` bytes."""
    buf = getattr(_local, "scratch", None)
    if buf is None or len(buf) < n:
        buf = _local.scratch = memoryview(bytearray(max(n, 1 << 17)))
    return buf


def read_and_decompress(codec: str, storage, offsets: Sequence[int], lengths: Sequence[int],
                        dsts: List[memoryview], cluster_size: int) -> None:
    """Like :func:`decompress_into`, each thread reading its streams from ``storage``.

    Stream ``i`` is ``lengths[i]`` bytes at ``offsets[i]`` of the storage
    (bytes past its end read as zeros).  The reads happen on the threads that
    decompress, so they overlap with the decompression of other clusters.
    """
    def fetch(i: int) -> memoryview:
        n = lengths[i]
        buf = _scratch(n)[:n]
        got = storage.pread_into(buf, offsets[i])
        if got < n:
            buf[got:] = bytes(n - got)
        return buf

    _run(codec, fetch, dsts, cluster_size)
