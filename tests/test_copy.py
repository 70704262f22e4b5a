"""Block-copy and qcow2py-copy against qemu-img: same content, clean, sparse, ordered reads."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

import qcow2py
from qcow2py.jobs.blockcopy.blockcopy import BlockCopy
from qcow2py.io.wrappers import TracingStorage
from images import SHAPES, build
from qemu import create, qemu_img, qemu_io

MiB = 1 << 20


def copy_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qcow2py.copy", *map(str, args)], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def allocated_clusters(path):
    return json.loads(qemu_img("check", "--output=json", path, check=False).stdout) \
        .get("allocated-clusters", 0)


@pytest.mark.parametrize("out_fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("shape", SHAPES)
def test_copy_matches_qemu(tmp_path, shape, out_fmt):
    src = build(shape, tmp_path)
    ours, theirs = tmp_path / f"ours.{out_fmt}", tmp_path / f"theirs.{out_fmt}"
    p = copy_cli("-O", out_fmt, "--stats=json", src, ours)
    assert p.returncode == 0, p.stderr
    stats = json.loads(p.stdout)
    assert stats["bytes_total"] > 0
    qemu_img("convert", "-O", out_fmt, src, theirs)
    assert qemu_img("compare", src, ours, check=False).returncode == 0
    if out_fmt == "qcow2":
        assert qemu_img("check", ours, check=False).returncode == 0
        # as sparse as qemu-img's output: zero ranges stay unallocated
        assert allocated_clusters(ours) <= allocated_clusters(theirs)
    else:
        assert os.stat(ours).st_blocks <= os.stat(theirs).st_blocks + 64


def test_raw_to_qcow2_and_options(tmp_path):
    src = build("raw", tmp_path)
    out = tmp_path / "o.qcow2"
    p = copy_cli("-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k,compat=0.10",
                 src, out)
    assert p.returncode == 0, p.stderr
    info = json.loads(qemu_img("info", "--output=json", out).stdout)
    assert info["cluster-size"] == 4096
    assert info["format-specific"]["data"]["compat"] == "0.10"
    assert qemu_img("compare", src, out, check=False).returncode == 0
    assert qemu_img("check", out, check=False).returncode == 0


def test_fully_allocated_with_S0(tmp_path):
    src = build("fragmented", tmp_path)
    out = tmp_path / "o.qcow2"
    assert copy_cli("-O", "qcow2", "-S", "0", src, out).returncode == 0
    assert allocated_clusters(out) == 256
    assert qemu_img("compare", src, out, check=False).returncode == 0


def test_top_layer_only_with_B(tmp_path):
    src = build("chain", tmp_path)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    p = copy_cli("-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", src.name, ours.name,
                 cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    qemu_img("convert", "-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", src.name, theirs.name,
             cwd=tmp_path)
    assert qemu_img("compare", src, ours, check=False).returncode == 0
    assert qemu_img("check", ours, check=False).returncode == 0

    def layer0(path):
        return [(e["start"], e["length"], e["zero"], e["data"])
                for e in json.loads(qemu_img("map", "--output=json", path).stdout)
                if e["depth"] == 0]
    assert layer0(ours) == layer0(theirs)


@pytest.mark.parametrize("target_is_zero", [True, False])
def test_existing_target(tmp_path, target_is_zero):
    src = build("fragmented", tmp_path)
    out = tmp_path / "existing.raw"
    create(out, "16M", fmt="raw")
    if not target_is_zero:
        qemu_io(out, "write -P 0xee 0 16M", fmt="raw")      # garbage to overwrite
    args = ["-n", "-O", "raw"] + (["--target-is-zero"] if target_is_zero else [])
    p = copy_cli(*args, src, out)
    assert p.returncode == 0, p.stderr
    assert qemu_img("compare", "-F", "raw", src, out, check=False).returncode == 0


def _traced_copy(src_path, tmp_path, order):
    holder = {}

    def wrap(st):
        holder["t"] = TracingStorage(st)
        return holder["t"]
    src = qcow2py.open(src_path, storage_wrapper=wrap)
    tgt = qcow2py.create(tmp_path / f"t-{order}.raw", src.size, format="raw")
    stats = BlockCopy(src, tgt, order=order, workers=1).run()
    tgt.close()
    h = src.header
    meta_end = 4 * src.cluster_size
    reads = [(o, n) for o, n in holder["t"].reads()]
    src.close()
    return stats, reads


def test_host_order_reads_are_ascending(tmp_path):
    src = build("fragmented", tmp_path)
    stats, reads = _traced_copy(src, tmp_path, "host")
    data_reads = reads[-stats.read_requests:]
    offsets = [o for o, _ in data_reads]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    for (o1, n1), (o2, _) in zip(data_reads, data_reads[1:]):
        assert o2 >= o1 + n1
    assert stats.backward_seeks == 0 and stats.guest_order_backward_seeks > 0
    assert qemu_img("compare", src, tmp_path / "t-host.raw", check=False).returncode == 0


@pytest.mark.parametrize("shape", ["fragmented", "zstd", "chain"])
def test_worker_threads_read_one_ascending_stream(tmp_path, monkeypatch, shape):
    """With several workers and many small batches the file still sees the reads of one
    sweep: batches take turns to read (random delays make untidy interleaving likely)."""
    from qcow2py.io.storage import FileStorage
    src = build(shape, tmp_path)
    log, lock, rnd = [], __import__("threading").Lock(), random.Random(5)
    real = FileStorage.read_runs

    def read_runs(self, buf, buf_offsets, host_offsets, lengths):
        __import__("time").sleep(rnd.random() / 500)
        with lock:
            log.extend((self.name, h, n) for h, n in zip(host_offsets.tolist(), lengths.tolist()))
        return real(self, buf, buf_offsets, host_offsets, lengths)
    monkeypatch.setattr(FileStorage, "read_runs", read_runs)
    with qcow2py.open(src) as img:
        tgt = qcow2py.create(tmp_path / "t.qcow2", img.size)
        try:
            stats = BlockCopy(img, tgt, order="host", workers=3, memory_limit=1 * MiB).run()
        finally:
            tgt.close()
    assert stats.read_requests == len(log) > 4
    by_file = {}
    for name, h, n in log:
        by_file.setdefault(name, []).append((h, n))
    for reads in by_file.values():
        for (o1, n1), (o2, _) in zip(reads, reads[1:]):
            assert o2 >= o1 + n1 or shape == "zstd" and o2 >= o1     # streams share sectors
    files = [name for name, _, _ in log]
    assert files == sorted(files, key=files.index)          # one file after the other
    assert qemu_img("compare", src, tmp_path / "t.qcow2", check=False).returncode == 0


@pytest.mark.parametrize("shape,expect", [("fragmented", "host"), ("sequential", "guest"),
                                          ("compressed-shuffled", "host"), ("zlib", "guest")])
def test_auto_order(tmp_path, shape, expect):
    """auto: host order when the stored clusters (plain or compressed) are out of guest order."""
    if shape == "sequential":
        src = tmp_path / "seq.qcow2"
        create(src, "16M")
        qemu_io(src, *[f"write -P {c + 1} {c * 65536} 64k" for c in range(0, 200, 3)])
    elif shape == "compressed-shuffled":
        src = tmp_path / "cs.qcow2"
        create(src, "16M")
        order = list(range(200))
        random.Random(4).shuffle(order)
        qemu_io(src, *[f"write -c -P {c % 200 + 1} {c * 65536} 64k" for c in order])
    else:
        src = build(shape, tmp_path)      # zlib: qemu-img convert -c, stored in guest order
    with qcow2py.open(src) as img:
        tgt = qcow2py.create(tmp_path / "t.qcow2", img.size)
        try:
            stats = BlockCopy(img, tgt, order="auto").run()
        finally:
            tgt.close()
    assert stats.order == expect
    assert qemu_img("compare", src, tmp_path / "t.qcow2", check=False).returncode == 0


def test_guest_order_reads_follow_the_guest(tmp_path):
    src = build("fragmented", tmp_path)
    stats, reads = _traced_copy(src, tmp_path, "guest")
    data_reads = reads[-stats.read_requests:]
    with qcow2py.open(src) as img:
        expect = [e["offset"] for e in img.map() if e["data"] and "offset" in e]
    assert [o for o, _ in data_reads] == expect
    assert stats.backward_seeks == stats.guest_order_backward_seeks > 0


def test_bitmap_limits_the_copy(tmp_path):
    import bitarray
    src_path = build("fragmented", tmp_path)
    dirty = bitarray.bitarray(256)
    dirty.setall(0)
    rnd = random.Random(3)
    picks = rnd.sample(range(256), 40)
    for c in picks:
        dirty[c] = 1
    out = tmp_path / "inc.raw"
    create(out, "16M", fmt="raw")
    qemu_io(out, "write -P 0xee 0 16M", fmt="raw")
    with qcow2py.open(src_path) as src, qcow2py.open(out, "r+") as tgt:
        BlockCopy(src, tgt, bitmap=dirty, bitmap_granularity=65536,
                  target_is_zero=False).run()
        want = src.read(0, src.size)
    got = out.read_bytes()
    for c in range(256):
        a, b = c * 65536, (c + 1) * 65536
        if c in picks:
            assert got[a:b] == want[a:b], c
        else:
            assert got[a:b] == b"\xee" * 65536, c


def test_bad_input(tmp_path):
    src = build("fragmented", tmp_path)
    before = src.read_bytes()
    # unreadable source
    p = copy_cli("-O", "raw", tmp_path / "missing.qcow2", tmp_path / "x.raw")
    assert p.returncode != 0 and "No such file" in p.stderr and p.stderr.count("\n") == 1
    assert not (tmp_path / "x.raw").exists()
    # existing target without -n
    existing = tmp_path / "exists.raw"
    existing.write_bytes(b"keep")
    p = copy_cli("-O", "raw", src, existing)
    assert p.returncode != 0 and "exists" in p.stderr and existing.read_bytes() == b"keep"
    # target smaller with -n
    small = tmp_path / "small.raw"
    small.write_bytes(bytes(MiB))
    p = copy_cli("-n", "-O", "raw", src, small)
    assert p.returncode != 0 and "smaller" in p.stderr
    # unknown format, bad -S, -o with -n
    assert copy_cli("-O", "vmdk", src, tmp_path / "y").returncode != 0
    p = copy_cli("-S", "1000", src, tmp_path / "y")
    assert p.returncode != 0 and "sparse" in p.stderr
    p = copy_cli("-n", "-o", "cluster_size=4k", src, small)
    assert p.returncode != 0 and "-o has no effect" in p.stderr
    # a corrupt source: clear error, the new target is removed
    bad = tmp_path / "bad.qcow2"
    raw = bytearray(before)
    raw[4:8] = (7).to_bytes(4, "big")
    bad.write_bytes(bytes(raw))
    p = copy_cli("-O", "qcow2", bad, tmp_path / "z.qcow2")
    assert p.returncode != 0 and "version" in p.stderr
    assert not (tmp_path / "z.qcow2").exists()
    assert src.read_bytes() == before


@pytest.mark.parametrize("codec", ["zlib", "zstd"])
@pytest.mark.parametrize("shape", ["fragmented", "chain", "zlib", "small-clusters"])
def test_compressed_output(tmp_path, shape, codec):
    src = build(shape, tmp_path)
    out = tmp_path / "c.qcow2"
    opts = f"compression_type={codec}" + (",cluster_size=512" if shape == "small-clusters" else "")
    p = copy_cli("-c", "-O", "qcow2", "-o", opts, src, out)
    assert p.returncode == 0, p.stderr
    assert qemu_img("compare", src, out, check=False).returncode == 0
    res = json.loads(qemu_img("check", "--output=json", out).stdout)
    assert res["check-errors"] == 0 and "corruptions" not in res and "leaks" not in res
    assert res.get("compressed-clusters", 0) > 0
    info = json.loads(qemu_img("info", "--output=json", out).stdout)
    assert info["format-specific"]["data"]["compression-type"] == codec


@pytest.mark.parametrize("codec", ["zlib", "zstd"])
def test_compressed_output_packed_like_qemu(tmp_path, codec):
    """Streams of ~40% of a cluster pack across host-cluster boundaries, as QEMU packs
    them: the output ends where ``qemu-img convert -c`` output ends (it was ~20% longer
    when each stream had to fit in one host cluster)."""
    rnd = random.Random(7)
    cs = 65536
    chunks = []
    for i in range(160):
        k = rnd.randrange(cs // 4, cs // 2)
        chunks.append(rnd.randbytes(k) + bytes(cs - k) if i % 9 else bytes(cs))
    src = tmp_path / "src.raw"
    src.write_bytes(b"".join(chunks))
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "qemu.qcow2"
    p = copy_cli("-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={codec}", src, ours)
    assert p.returncode == 0, p.stderr
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={codec}",
             src, theirs)
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", src, ours,
                    check=False).returncode == 0
    ends = []
    for out in (ours, theirs):
        res = json.loads(qemu_img("check", "--output=json", out).stdout)
        assert res["check-errors"] == 0 and "corruptions" not in res and "leaks" not in res
        ends.append(res["image-end-offset"])
    # zstd streams differ by a few bytes from QEMU's (library version, frame flags)
    assert ends[0] <= ends[1] + 2 * cs


def test_compressed_output_needs_qcow2(tmp_path):
    src = build("fragmented", tmp_path)
    p = copy_cli("-c", "-O", "raw", src, tmp_path / "x.raw")
    assert p.returncode != 0 and "Compression not supported" in p.stderr


def test_sparse_64g_copy_stays_small(tmp_path):
    """Planning is windowed: a 64 GiB sparse image copies in bounded memory."""
    src = tmp_path / "big.qcow2"
    create(src, "64G")
    qemu_io(src, "write -P 1 0 4M", "write -P 2 30G 4M", "write -P 3 63G 1M")
    # VmHWM, the peak of this process's own memory: ru_maxrss is not, a child that
    # exec()s keeps its parent's peak (a pytest worker past 150 MB failed the test)
    code = ("import sys; from qcow2py.cli.copy import main; "
            "rc = main(sys.argv[1:]); "
            "print([ln.split()[1] for ln in open('/proc/self/status') "
            "if ln.startswith('VmHWM:')][0]); sys.exit(rc)")
    for fmt in ("qcow2", "raw"):
        out = tmp_path / f"big-out.{fmt}"
        p = subprocess.run([sys.executable, "-c", code, "-O", fmt, str(src), str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.returncode == 0, p.stderr
        assert int(p.stdout.split()[-1]) < 150 * 1024          # KiB
        assert qemu_img("compare", src, out, check=False).returncode == 0
        assert os.stat(out).st_blocks * 512 < 64 * MiB


def test_cancelled_copy_leaves_a_consistent_target(tmp_path):
    """KeyboardInterrupt mid-copy: the qcow2 target still passes qemu-img check."""
    src_path = build("fragmented", tmp_path)
    out = tmp_path / "cancelled.qcow2"
    calls = []

    def progress(done, total):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    _interrupted_copy(src_path, out, progress, workers=1, memory_limit=2 * MiB)
    assert len(calls) == 2


def _interrupted_copy(src_path, out, progress, **kw):
    """A copy that ``progress`` interrupts; the qcow2 target passes qemu-img check."""
    with qcow2py.open(src_path) as src:
        tgt = qcow2py.create(out, src.size)
        with pytest.raises(KeyboardInterrupt):
            BlockCopy(src, tgt, order="host", progress=progress, **kw).run()
        tgt.close()
    res = qemu_img("check", "--output=json", out, check=False)
    assert res.returncode in (0, 3), res.stdout + res.stderr      # at worst leaks
    assert "corruptions" not in json.loads(res.stdout)


def test_interrupt_with_workers_stops_promptly(tmp_path, monkeypatch):
    """With worker threads, an interruption drops the batches not yet started."""
    from qcow2py.io.storage import FileStorage
    src_path = build("fragmented", tmp_path)
    reads = []
    real = FileStorage.read_runs

    def read_runs(self, *args):
        reads.append(1)
        __import__("time").sleep(0.01)          # a slow disk: batches queue up
        return real(self, *args)
    monkeypatch.setattr(FileStorage, "read_runs", read_runs)
    at_interrupt = []

    def progress(done, total):
        if reads and not at_interrupt:           # after the first batch
            at_interrupt.append(len(reads))
            raise KeyboardInterrupt

    _interrupted_copy(src_path, tmp_path / "stopped.qcow2", progress, workers=2,
                      memory_limit=1 * MiB)
    assert len(reads) <= at_interrupt[0] + 2 < 8       # of 12 batches


def test_cli_interrupt_removes_new_target(tmp_path):
    src = build("fragmented", tmp_path)
    out = tmp_path / "gone.qcow2"
    code = ("import sys, qcow2py.jobs.blockcopy.blockcopy as b\n"
            "def boom(self, n): raise KeyboardInterrupt\n"
            "b.BlockCopy._advance = boom\n"
            "from qcow2py.cli.copy import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", code, "-O", "qcow2", str(src), str(out)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.returncode == 1 and "interrupted" in p.stderr
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_block_copy_api_as_documented(tmp_path, fmt):
    """``from qcow2py import BlockCopy`` with the keywords of the issue and the README;
    progress ends at the total (zero ranges count as done)."""
    from qcow2py import BlockCopy as TopLevel
    src_path = tmp_path / "s.qcow2"
    create(src_path, "8M")
    qemu_io(src_path, "write -P 5 1M 200k", "write -P 6 5M 64k")
    seen = []
    with qcow2py.open(src_path) as src:
        dst = qcow2py.create(tmp_path / "d", src.size, format=fmt)
        try:
            stats = TopLevel(src, dst, order="host", bitmap=None, compress=False,
                             sparse_size=4096, workers=2, memory_limit=64 << 20,
                             progress=lambda done, total: seen.append((done, total))).run()
        finally:
            dst.close()
    assert stats.bytes_read >= 264 * 1024 and stats.bytes_written == 264 * 1024
    assert stats.read_requests >= 1 and stats.seconds > 0
    assert seen and seen[-1][0] == seen[-1][1] == 8 * MiB
    assert qemu_img("compare", "-F", fmt, src_path, tmp_path / "d", check=False).returncode == 0
