"""Batch decompression into caller buffers (qcow2py.qcow2.decompress) and its use by reads."""

import hashlib
import os
import random
import zlib

import pytest

from qcow2py import CorruptImageError
from qcow2py.qcow2 import decompress
from qcow2py.format.codec import compress_cluster, decompress_cluster

CS = 65536


def _clusters(n, seed=7):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            data = rng.randbytes(CS)                       # incompressible
        elif kind == 1:
            data = bytes([i % 251]) * CS                   # very compressible
        else:
            data = (b"qcow2 cluster %d " % i) * (CS // 16)
            data = data[:CS]
        out.append(data)
    return out


def _pack(streams, pad=300):
    """Streams back to back at unaligned offsets, each followed by junk padding."""
    src, offs, lens = bytearray(b"\x99" * 17), [], []
    for s in streams:
        offs.append(len(src))
        lens.append(len(s) + pad)
        src += s + os.urandom(pad)
    return src, offs, lens


@pytest.mark.parametrize("codec", ["zlib", "zstd"])
@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_batch_matches_reference(codec, n):
    data = _clusters(n)
    streams = [compress_cluster(codec, d) for d in data]
    src, offs, lens = _pack(streams)
    out = bytearray(b"\xee" * (CS * n))
    mv = memoryview(out)
    decompress.decompress_into(codec, src, offs, lens, [mv[i * CS:(i + 1) * CS] for i in range(n)],
                               CS)
    for i in range(n):
        assert out[i * CS:(i + 1) * CS] == data[i] == decompress_cluster(
            codec, bytes(src[offs[i]:offs[i] + lens[i]]), CS)


@pytest.mark.parametrize("codec", ["zlib", "zstd"])
@pytest.mark.parametrize("bad_at", [0, 17, 39])
def test_batch_error_names_the_problem(codec, bad_at):
    data = _clusters(40)
    streams = [compress_cluster(codec, d) for d in data]
    streams[bad_at] = b"\xff" * 64
    src, offs, lens = _pack(streams)
    dsts = [memoryview(bytearray(CS)) for _ in range(40)]
    with pytest.raises(CorruptImageError, match="does not decompress"):
        decompress.decompress_into(codec, src, offs, lens, dsts, CS)


def test_batch_short_stream():
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    short = c.compress(b"x" * 100) + c.flush()
    streams = [compress_cluster("zlib", d) for d in _clusters(9)]
    streams[5] = short
    src, offs, lens = _pack(streams, pad=0)
    dsts = [memoryview(bytearray(CS)) for _ in range(9)]
    with pytest.raises(CorruptImageError, match="100 bytes"):
        decompress.decompress_into("zlib", src, offs, lens, dsts, CS)


def test_batch_stream_longer_than_a_cluster_is_cut():
    data = _clusters(4)
    streams = [compress_cluster("zlib", d + d) for d in data]          # 2 clusters each
    src, offs, lens = _pack(streams)
    dsts = [memoryview(bytearray(CS)) for _ in range(4)]
    decompress.decompress_into("zlib", src, offs, lens, dsts, CS)
    assert [bytes(d) for d in dsts] == data


def test_unknown_codec_raises():
    from qcow2py import UnsupportedFeatureError
    with pytest.raises(UnsupportedFeatureError):
        decompress.decompress_into("lz4", b"abc", [0, 0], [3, 3],
                                   [memoryview(bytearray(CS))] * 2, CS)


def test_sequential_small_reads_decompress_each_cluster_once(tmp_path):
    """4 KiB reads through compressed clusters fetch each stream from the file once."""
    import qcow2py
    from qcow2py.io.wrappers import TracingStorage
    from qemu import qemu_img

    data = b"".join(c for i, c in enumerate(_clusters(6, seed=3)) if i % 3)   # compressible
    raw = tmp_path / "c.raw"
    raw.write_bytes(data)
    p = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, p)
    with qcow2py.open(str(p)) as img:
        assert img.read(len(data) - 1, 1) == data[-1:]      # loads the L2 table
        img.storage = tr = TracingStorage(img.storage)
        got = b"".join(img.read(off, 4096) for off in range(0, len(data), 4096))
        assert got == data
        assert len(tr.reads()) == 4, tr.reads()


def test_deflate_stream_with_a_32k_window_reads_like_qemu(tmp_path):
    """QEMU inflates a cluster in one call into the whole cluster buffer, so
    back-references up to 32 KiB (a stream not written by QEMU, e.g. with a
    15-bit window) decode; a 4 KiB-window inflate fed in pieces would reject them."""
    import struct
    import qcow2py
    from qemu import create, qemu_img, qemu_io

    p = tmp_path / "w.qcow2"
    create(p, "1M")
    qemu_io(p, "write -c -P 0x11 0 64k")
    block = random.Random(5).randbytes(20000)
    data = (block * 4)[:CS]
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = c.compress(data) + c.flush()
    with pytest.raises(zlib.error, match="too far back"):       # the premise
        zlib.decompressobj(-12).decompress(stream, CS)
    with qcow2py.open(str(p)) as img:
        l2 = int(img._l1[0])
    size = os.path.getsize(p)
    coff = size + 100                        # unaligned, past the old end
    nsect = (coff % 512 + len(stream) + 511) // 512
    with open(p, "r+b") as f:
        f.seek(coff)
        f.write(stream + bytes(-(coff + len(stream)) % 512))
        f.seek(l2)
        f.write(struct.pack(">Q", (1 << 62) | ((nsect - 1) << (62 - 8)) | coff))
    qemu_img("convert", "-O", "raw", p, tmp_path / "w.raw")
    want = (tmp_path / "w.raw").read_bytes()
    assert want[:CS] == data
    with qcow2py.open(str(p)) as img:
        assert img.read(0, img.size) == want
        assert img.read(100, 5000) == want[100:5100]          # partial read path too


def test_forked_child_reads_compressed_clusters(tmp_path):
    """The decompression pool's threads do not survive fork(): a child makes its own."""
    import multiprocessing
    import qcow2py
    from qemu import qemu_img

    data = b"".join(_clusters(12, seed=9))
    raw = tmp_path / "f.raw"
    raw.write_bytes(data)
    p = tmp_path / "f.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, p)
    with qcow2py.open(str(p)) as img:
        assert img.read(0, len(data)) == data        # the parent's pool is running now
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(str(p), len(data), q))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung reading compressed clusters")
    assert q.get(timeout=5) == hashlib.sha256(data).hexdigest()


def _read_in_child(path, n, q):
    import qcow2py
    with qcow2py.open(path) as img:
        q.put(hashlib.sha256(img.read(0, n)).hexdigest())
