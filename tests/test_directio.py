"""Cache modes (qcow2py-copy -t/-T, open/create cache=) and O_DIRECT.

Copies in every cache combination equal the source (qemu-img compare) and
check clean; strace and /proc/self/fdinfo show that O_DIRECT (and O_DSYNC) are
really in the open flags; with the alignment forced to 4096 bytes the bounce
and read-modify-write paths (512-byte clusters, 2 KiB subclusters,
compressed streams, a file tail off a block) give the same bytes; a file
system without O_DIRECT is refused with qemu-img's message.
"""

import errno
import os
import random
import subprocess
import tempfile
import threading

import numpy as np
import pytest

import qcow2py
from qcow2py.cli import copy as copy_cli_mod
from qcow2py.io import directio
from qcow2py.jobs.blockcopy import BlockCopy
from qcow2py.nbd import Server
from images import build
from nbdtest import RawClient
from qemu import create, need, qemu_img, qemu_io, unavailable
from test_copy import copy_cli

O_DIRECT = os.O_DIRECT
CACHES_T = ("none", "directsync", "writeback", "unsafe", "writethrough")
CACHES_S = ("none", "writeback")


@pytest.fixture
def d(tmp_path):
    """A folder on a file system with O_DIRECT (the tests are about it)."""
    probe = tmp_path / "probe"
    probe.write_bytes(bytes(4096))
    try:
        os.close(os.open(probe, os.O_RDONLY | O_DIRECT))
    except OSError as e:
        pytest.fail(f"{tmp_path} has no O_DIRECT ({e}); run pytest with --basetemp on a disk")
    probe.unlink()
    return tmp_path


def _check_copy(src, out, fmt):
    c = qemu_img("compare", "-F", fmt, src, out, check=False)
    assert c.returncode == 0, (src, out, c.stdout, c.stderr)
    if fmt == "qcow2":
        qemu_img("check", out)


@pytest.mark.parametrize("shape", ["fragmented", "zlib", "chain", "extended-l2"])
def test_copy_every_cache_combination(d, shape):
    src = build(shape, d)
    for i, (t, T) in enumerate((t, T) for t in CACHES_T for T in CACHES_S):
        fmt = ("qcow2", "raw")[i % 2]
        out = d / f"out-{t}-{T}.{fmt}"
        p = copy_cli("-O", fmt, "-t", t, "-T", T, src, out)
        assert p.returncode == 0, (t, T, p.stderr)
        _check_copy(src, out, fmt)


def _openat_flags(trace: str, name: str):
    return [line for line in trace.splitlines()
            if f'"{name}"' in line and "openat(" in line and "= -1" not in line]


@pytest.mark.parametrize("t,T,direct_t,dsync_t,direct_s", [
    ("none", "none", True, False, True),
    ("directsync", "writeback", True, True, False),
    ("writethrough", "none", False, True, True),
    ("writeback", "writeback", False, False, False),
])
def test_strace_shows_the_open_flags(d, t, T, direct_t, dsync_t, direct_s):
    need("strace")
    src = build("chain", d)                      # src.qcow2 -> mid.qcow2 -> base.raw
    out = d / "out.qcow2"
    log = d / "trace"
    p = subprocess.run(["strace", "-f", "-e", "trace=openat", "-o", str(log),
                        "qcow2py-copy", "-O", "qcow2", "-t", t, "-T", T, str(src), str(out)],
                       capture_output=True, text=True, cwd=d)
    assert p.returncode == 0, p.stderr
    trace = log.read_text()
    for name in (str(src), "mid.qcow2", "base.raw"):
        opens = [ln for ln in trace.splitlines() if "openat(" in ln and "= -1" not in ln
                 and ln.split('"')[1].endswith(name)]
        assert opens, (name, trace[-2000:])
        assert all(("O_DIRECT" in ln) == direct_s for ln in opens), opens
    target = [ln for ln in _openat_flags(trace, str(out)) if "O_CREAT" not in ln]
    assert target, trace[-2000:]
    assert ("O_DIRECT" in target[-1]) == direct_t, target
    assert ("O_DSYNC" in target[-1]) == dsync_t, target
    _check_copy(src, out, "qcow2")


def _fdinfo_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


def test_api_cache_none_uses_o_direct_on_every_file(d):
    src = build("chain", d)
    with qcow2py.open(src, cache="none") as img:
        layers = img.chain()
        assert len(layers) == 3
        for layer in layers:
            assert _fdinfo_flags(layer.storage.fileno()) & O_DIRECT, layer.filename
        qemu_img("convert", "-O", "raw", src, d / "ref.raw")
        assert img.read(0, img.size) == (d / "ref.raw").read_bytes()
    with qcow2py.open(src) as img:
        assert not _fdinfo_flags(img.storage.fileno()) & O_DIRECT
    with qcow2py.create(d / "new.qcow2", 4 << 20, cache="directsync") as img:
        flags = _fdinfo_flags(img.storage.fileno())
        assert flags & O_DIRECT and flags & os.O_DSYNC
        img.write(1000, b"x" * 70000)
        img.write_zeroes(200000, 5000)
    qemu_img("check", d / "new.qcow2")
    qemu_io(d / "new.qcow2", "read -P 0x78 1000 70000")
    with pytest.raises(ValueError):
        qcow2py.open(src, cache="bogus")


@pytest.fixture
def align4k(monkeypatch):
    """Every O_DIRECT file gets 4096-byte alignment (a 4Kn disk), and unaligned
    writes are counted, to prove the bounce path ran."""
    monkeypatch.setattr(directio, "dio_alignment", lambda fd: (4096, 4096))
    counts = {"rmw": 0}
    orig = directio.DirectFileStorage.writev

    def writev(self, views, offset):
        total = sum(len(v) for v in views)
        if offset % 4096 or total % 4096:
            counts["rmw"] += 1
        return orig(self, views, offset)

    monkeypatch.setattr(directio.DirectFileStorage, "writev", writev)
    return counts


@pytest.mark.parametrize("shape", ["small-clusters", "extended-l2", "zlib", "chain"])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_copy_with_4k_alignment(d, align4k, shape, fmt):
    src = build(shape, d)
    out = d / f"out.{fmt}"
    with qcow2py.open(src, cache="none") as s:
        assert s.storage.alignment == 4096
        with qcow2py.create(out, s.size, format=fmt, cache="none") as t:
            BlockCopy(s, t, order="host", workers=2, memory_limit=4 << 20).run()
    _check_copy(src, out, fmt)
    if fmt == "qcow2":
        assert align4k["rmw"] > 0          # header and tables smaller than a block


def test_unaligned_tail_keeps_the_file_length(d, align4k):
    """A raw target whose size is not a multiple of the block: the last write is a
    read-modify-write past the end, and the file is cut back to its size."""
    src = d / "odd.qcow2"
    create(src, str((1 << 20) + 512))
    qemu_io(src, "write -P 0x5a 0 4096", f"write -P 0x33 {(1 << 20) - 1024} 1536")
    out = d / "odd.raw"
    p = subprocess.run(["qcow2py-copy", "-O", "raw", "-t", "none", "-T", "none", str(src),
                        str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with qcow2py.open(src) as s, qcow2py.create(d / "odd4k.raw", s.size, format="raw",
                                                 cache="none") as t:
        BlockCopy(s, t, workers=2).run()
    for path in (out, d / "odd4k.raw"):
        assert os.path.getsize(path) == (1 << 20) + 512
        _check_copy(src, path, "raw")
    assert align4k["rmw"] > 0


def test_unaligned_writes_from_threads(d, align4k):
    """512-byte pieces sharing 4 KiB blocks, written by four threads at once, then
    random unaligned reads: read-modify-write under the range lock loses nothing."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    size = 256 << 10
    path = d / "t.raw"
    with qcow2py.create(path, size, format="raw", cache="none") as img:
        assert img.storage.alignment == 4096
        want = bytearray(size)
        slots = list(range(0, size // 512))
        rng.shuffle(slots)
        parts = [slots[i::4] for i in range(4)]
        datas = {s: bytes([rng.randrange(1, 256)]) * 512 for s in slots}
        for s, b in datas.items():
            want[s * 512:(s + 1) * 512] = b

        def worker(mine):
            for s in mine:
                img.write(s * 512, datas[s])

        threads = [threading.Thread(target=worker, args=(p,)) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for _ in range(200):
            off = rng.randrange(size)
            n = rng.randrange(1, 20000)
            assert img.read(off, min(n, size - off)) == bytes(want[off:off + n]), seed
        buf = bytearray(10000)
        img.read_into(memoryview(buf)[1:], 777)            # unaligned buffer address too
        assert buf[1:] == want[777:777 + 9999], seed
    assert path.read_bytes() == bytes(want), f"seed {seed}"


def test_tail_cut_back_spares_a_write_beyond_it(d, align4k, monkeypatch):
    """A read-modify-write whose last block overhangs the end of the file cuts the
    file back after writing; a copy batch written meanwhile (in C) past that block
    must survive the cut.  The batch is started just before the cut and given time
    to finish there if nothing holds it back."""
    path = d / "grow.raw"
    path.write_bytes(b"")
    st = directio.DirectFileStorage(str(path), writable=True)
    assert st.alignment == 4096
    batch = directio.aligned_empty(8192)
    batch[:] = 0x77
    real_ftruncate = os.ftruncate
    racing = []

    def ftruncate(fd, size):
        if not racing:
            t = threading.Thread(target=st.write_batch,
                                 args=(batch, np.array([0]), np.array([8192]),
                                       np.array([8192]), np.array([0])))
            racing.append(t)
            t.start()
            t.join(0.5)
        real_ftruncate(fd, size)

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    try:
        st.pwrite(b"\x11" * 1000, 0)               # block [0, 4096), cut back to 1000
        assert racing, "the write overhung the end: it must cut the file back"
        racing[0].join()
    finally:
        st.close()
    data = path.read_bytes()
    assert len(data) == 16384
    assert data[:1000] == b"\x11" * 1000 and data[1000:8192] == bytes(7192)
    assert data[8192:] == b"\x77" * 8192


def test_refused_without_o_direct_as_qemu_img(d, monkeypatch, capsys):
    """The message and exit code of qemu-img 7.2 when the file system refuses O_DIRECT
    (simulated: open(2) answers EINVAL to O_DIRECT, as on such a file system)."""
    src = build("fragmented", d)
    real_open = os.open

    def no_direct(path, flags, *a, **kw):
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    out = d / "t.raw"
    assert copy_cli_mod.main(["-O", "raw", "-t", "none", str(src), str(out)]) == 1
    assert capsys.readouterr().err == (f"qcow2py-copy: Could not open '{out}': Could not open "
                                       f"'{out}': filesystem does not support O_DIRECT\n")
    assert copy_cli_mod.main(["-O", "raw", "-T", "none", str(src), str(d / "u.raw")]) == 1
    assert capsys.readouterr().err == (f"qcow2py-copy: Could not open '{src}': Could not open "
                                       f"'{src}': filesystem does not support O_DIRECT\n")
    with pytest.raises(directio.DirectIOUnsupportedError) as e:
        qcow2py.open(src, cache="none")
    assert str(e.value) == f"Could not open '{src}': filesystem does not support O_DIRECT"
    assert isinstance(e.value, qcow2py.Qcow2Error)


def test_ramfs_refusal_matches_qemu_img(tmp_path):
    """On a real file system without O_DIRECT (ramfs; mounting needs root) both tools
    print the same message with the same exit code, for -t none and -T none."""
    need("qemu-img")
    if os.geteuid() != 0:
        unavailable("mounting a ramfs needs root")
    mnt = tempfile.mkdtemp(dir=tmp_path)
    subprocess.run(["mount", "-t", "ramfs", "ramfs", mnt], check=True)
    try:
        src = os.path.join(mnt, "s.raw")
        qemu_img("create", "-q", "-f", "raw", src, "1M")
        for opt, target in (("-t", "t.raw"), ("-T", str(tmp_path / "t2.raw"))):
            results = []
            for tool in (["qemu-img", "convert"], ["qcow2py-copy"]):
                for leftover in ("t.raw", "t2.raw"):
                    for folder in (mnt, str(tmp_path)):
                        if os.path.exists(os.path.join(folder, leftover)):
                            os.unlink(os.path.join(folder, leftover))
                p = subprocess.run(tool + ["-O", "raw", opt, "none", "s.raw", target],
                                   capture_output=True, text=True, cwd=mnt)
                results.append((p.returncode, p.stderr.split(": ", 1)[1]))
            assert results[0] == results[1], results
            assert "filesystem does not support O_DIRECT" in results[0][1]
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_writev_of_more_buffers_than_iov_max(d):
    """An aligned writev of thousands of buffers (a pure-mode copy batch of small
    pieces) is split into calls of at most IOV_MAX: one pwritev of them all is
    EINVAL.  Copies from compressed images hit it with QCOW2PY_PURE=1."""
    f = d / "many.raw"
    f.write_bytes(b"")
    st = directio.open_storage(str(f), writable=True, cache="none")
    try:
        a = st.alignment
        n = os.sysconf("SC_IOV_MAX") + 500
        buf = directio.aligned_empty(n * a)
        buf[:] = np.repeat(np.arange(n, dtype=np.uint8), a)
        mv = memoryview(buf)
        st.writev([mv[i * a:(i + 1) * a] for i in range(n)], 0)
    finally:
        st.close()
    assert f.read_bytes() == bytes(buf)


def test_aligned_buffers_and_probe(d):
    buf = directio.aligned_empty(1 << 20)
    assert buf.ctypes.data % 4096 == 0 and buf.size == 1 << 20
    f = d / "f.raw"
    f.write_bytes(os.urandom(8192))
    fd = os.open(f, os.O_RDONLY | O_DIRECT)
    try:
        align, mem = directio.dio_alignment(fd)
        assert align in (512, 1024, 2048, 4096) and mem >= 1
        assert directio.probe_alignment(fd) in (512, 4096)        # QEMU's probe agrees it works
        mv = memoryview(buf)
        assert os.preadv(fd, [mv[:align]], align) == align
    finally:
        os.close(fd)
    assert np.array_equal(buf[:16], np.frombuffer(f.read_bytes()[align:align + 16], np.uint8))


def test_nbd_export_of_an_o_direct_image(d):
    """An image opened with cache="none" served over NBD: a read at an odd offset
    goes through the bounce path (no unaligned pread on the O_DIRECT descriptor)."""
    src = build("fragmented", d)
    qemu_img("convert", "-O", "raw", src, d / "ref.raw")
    want = (d / "ref.raw").read_bytes()
    sock = str(d / "nbd.sock")
    with qcow2py.open(src, cache="none") as img:
        srv = Server()
        srv.add_export("", img)
        srv.listen_unix(sock)
        srv.start()
        try:
            c = RawClient(sock)
            c.go("", structured=False)
            for cookie, (off, n) in enumerate([(1, 1000), (65536 * 7 + 3, 70001),
                                               (0, 1 << 20)], 1):
                c.request(0, off, n, cookie=cookie)
                assert c.simple_reply() == (0, cookie)
                assert c.recv_exactly(n) == want[off:off + n], (off, n)
            c.close()
        finally:
            srv.close()


def test_compressed_output_with_4k_alignment(d, align4k):
    """-c -t none: compressed clusters land at byte offsets, every one a
    read-modify-write of its block (in-process, so the forced alignment holds)."""
    src = build("fragmented", d)
    out = d / "c.qcow2"
    assert copy_cli_mod.main(["-c", "-O", "qcow2", "-t", "none", "-T", "none", str(src),
                              str(out)]) == 0
    _check_copy(src, out, "qcow2")
    assert align4k["rmw"] > 0


@pytest.mark.parametrize("pure", [False, True])
def test_existing_target_gets_zeros_written(d, pure):
    """-n onto a target full of old data: zero chunks are written (from the C side's
    zero buffer, which must be aligned too), in the C and the pure back-ends."""
    src = build("fragmented", d)                   # has clusters of zero data
    out = d / "old.raw"
    create(out, "16M", fmt="raw")
    qemu_io(out, "write -P 0xee 0 16M", fmt="raw")
    env = dict(os.environ, QCOW2PY_PURE="1" if pure else "")
    p = subprocess.run(["qcow2py-copy", "-n", "-O", "raw", "-t", "none", "-T", "none",
                        str(src), str(out)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    _check_copy(src, out, "raw")
