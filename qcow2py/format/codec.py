"""Compressed-cluster codecs: raw deflate (QEMU's "zlib") and zstd.

Both libraries release the GIL while they work, so clusters can be
decompressed on several cores by plain threads.
"""

from __future__ import annotations

import zlib

from ..errors import CorruptImageError, UnsupportedFeatureError

try:
    import zstandard as _zstd
except ImportError:  # pragma: no cover - zstandard is a dependency
    _zstd = None

#: Raw deflate with a 32 KiB window.  QEMU compresses with a 4 KiB window but
#: inflates a cluster in a single call into the whole cluster buffer, so any
#: back-reference into the output so far decodes; a 4 KiB-window inflate fed
#: output in pieces (as Python's is) would reject such streams.
ZLIB_WBITS = -15


def decompress_cluster(codec: str, data: bytes, cluster_size: int) -> bytes:
    """Decompress one cluster; the stream may be followed by padding.

    Stops once ``cluster_size`` bytes are produced (as QEMU does) and raises
    :class:`CorruptImageError` if the stream is bad or produces less.
    """
    try:
        if codec == "zlib":
            d = zlib.decompressobj(ZLIB_WBITS)
            out = d.decompress(data, cluster_size)
        elif codec == "zstd":
            if _zstd is None:
                raise UnsupportedFeatureError("zstd-compressed image needs the zstandard package")
            # stream, and stop at one cluster: a hostile frame may expand to
            # gigabytes or claim any content size (QEMU also stops when full)
            reader = _zstd.ZstdDecompressor().stream_reader(bytes(data),
                                                            read_across_frames=True)
            parts, got = [], 0
            while got < cluster_size:
                part = reader.read(cluster_size - got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
            out = b"".join(parts)
        else:
            raise UnsupportedFeatureError(f"unknown compression type {codec!r}")
    except (zlib.error, getattr(_zstd, "ZstdError", zlib.error)) as e:
        raise CorruptImageError(f"compressed cluster does not decompress ({codec}): {e}") from None
    if len(out) != cluster_size:
        raise CorruptImageError(f"compressed cluster decompresses to {len(out)} bytes, "
                                f"expected {cluster_size} ({codec})")
    return out


def compress_cluster(codec: str, data: bytes) -> bytes:
    """Compress one cluster the way QEMU does (raw deflate wbits -12, or a zstd frame)."""
    if codec == "zlib":
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()
    if codec == "zstd":
        if _zstd is None:
            raise UnsupportedFeatureError("zstd compression needs the zstandard package")
        return _zstd.ZstdCompressor().compress(data)
    raise UnsupportedFeatureError(f"unknown compression type {codec!r}")
