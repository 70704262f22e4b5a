"""Decompress a batch of compressed clusters straight into the caller's buffers.

A read of many compressed clusters is split into small chunks that the
calling thread and the pool's workers take in turn from a shared counter, so
every core decompresses (zlib and zstandard release the GIL while they work)
and the calling thread never sits idle waiting for the pool.  Each cluster is
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
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

from .codec import decompress_cluster
from .errors import CorruptImageError

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

_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()
_local = threading.local()


def pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="qcow2py-inflate")
        return _pool


def _fail(codec: str, stream, cluster_size: int) -> CorruptImageError:
    """The error for a stream the fast path rejected (raised by the reference codec)."""
    decompress_cluster(codec, bytes(stream), cluster_size)      # raises with the message
    return CorruptImageError(f"compressed cluster does not decompress ({codec})")


def _zlib_into(src: memoryview, dst: memoryview, cluster_size: int) -> None:
    try:
        out = zlib.decompressobj(-12).decompress(src, cluster_size)
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
    __slots__ = ("decode", "src", "offs", "lens", "dsts", "cs", "chunk", "nchunks",
                 "counter", "failed")

    def __init__(self, decode, src, offs, lens, dsts, cs, chunk):
        self.decode, self.src, self.offs, self.lens, self.dsts = decode, src, offs, lens, dsts
        self.cs, self.chunk = cs, chunk
        self.nchunks = -(-len(dsts) // chunk)
        self.counter = itertools.count()       # next() is atomic under the GIL
        self.failed = False

    def drain(self) -> None:
        decode, src, offs, lens, dsts, cs = (self.decode, self.src, self.offs, self.lens,
                                             self.dsts, self.cs)
        try:
            while not self.failed:
                c = next(self.counter)
                if c >= self.nchunks:
                    return
                for i in range(c * self.chunk, min((c + 1) * self.chunk, len(dsts))):
                    a = offs[i]
                    decode(src[a:a + lens[i]], dsts[i], cs)
        except BaseException:
            self.failed = True
            raise


def decompress_into(codec: str, src, src_offsets: Sequence[int], src_lengths: Sequence[int],
                    dsts: List[memoryview], cluster_size: int) -> None:
    """Decompress stream ``i`` (``src[src_offsets[i]:+src_lengths[i]]``) into ``dsts[i]``.

    Every ``dsts[i]`` is a writable byte memoryview of ``cluster_size`` bytes
    and is filled completely, or an error is raised (after every thread has
    stopped touching the buffers).
    """
    n = len(dsts)
    if n == 0:
        return
    smv = memoryview(src).cast("B")
    decode = _decoder(codec)
    parts = min(WORKERS + 1, n)
    if parts == 1:
        for i in range(n):
            a = src_offsets[i]
            decode(smv[a:a + src_lengths[i]], dsts[i], cluster_size)
        return
    # chunks of a few clusters: small enough to balance the threads, large
    # enough that the hand-out costs nothing next to the decompression
    chunk = max(1, n // (parts * 4))
    batch = _Batch(decode, smv, src_offsets, src_lengths, dsts, cluster_size, chunk)
    futures = [pool().submit(batch.drain) for _ in range(parts - 1)]
    error: Optional[BaseException] = None
    try:
        batch.drain()
    except BaseException as e:       # still wait for the workers before raising
        error = e
    for f in futures:
        try:
            f.result()
        except BaseException as e:
            if error is None:
                error = e
    if error is not None:
        raise error
