"""Persistent dirty bitmaps, checked against QEMU 7.2.

QEMU's view of a bitmap is read over NBD: ``qemu-nbd -r -B NAME`` on a unix
socket in the test's directory, and ``nbdinfo --map=qemu:dirty-bitmap:NAME``.
Bitmaps made and dirtied by qemu-img/qemu-io must read back identically in
qcow2py, bitmaps made and dirtied by qcow2py must look the same to QEMU, the
``qcow2py bitmap`` command must behave as ``qemu-img bitmap``, edits must
round-trip between the two, and a crash while bitmaps are open must leave
them in_use for both.
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import qcow2py
from qcow2py.errors import BitmapError
from qemu import create, info_json, need, qemu_img, qemu_io, run
from recording import Recorder

KiB, MiB = 1 << 10, 1 << 20


# ---------------------------------------------------------------- helpers
def nbd_dirty(path, name):
    """QEMU's dirty extents of bitmap ``name``: [(offset, length)], merged."""
    need("qemu-nbd")
    need("nbdinfo")
    sock = os.path.join(os.path.dirname(os.path.abspath(path)), "nbd.sock")
    assert len(sock) < 100, f"socket path too long for a unix socket: {sock}"
    if os.path.exists(sock):
        os.unlink(sock)
    p = subprocess.Popen(["qemu-nbd", "-t", "-r", "-f", "qcow2", "-B", name, "-k", sock,
                          os.path.abspath(path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if p.poll() is not None:
                raise AssertionError(f"qemu-nbd exited ({p.returncode}): {p.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("qemu-nbd did not create its socket")
            time.sleep(0.02)
        # the socket file appears at bind(), a moment before qemu-nbd listens
        for _ in range(200):
            r = run(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}",
                     f"nbd+unix:///?socket={sock}"], check=False)
            if r.returncode == 0 or "Connection refused" not in r.stderr:
                break
            time.sleep(0.05)
        assert r.returncode == 0, r.stderr
        out = r.stdout
    finally:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()
        if os.path.exists(sock):
            os.unlink(sock)
    extents = []
    for line in out.splitlines():
        off, ln, typ = (int(x) for x in line.split()[:3])
        if typ & 1:
            if extents and extents[-1][0] + extents[-1][1] == off:
                extents[-1] = (extents[-1][0], extents[-1][1] + ln)
            else:
                extents.append((off, ln))
    return extents


def qemu_bitmaps(path):
    return info_json(path, "-U")["format-specific"]["data"].get("bitmaps", [])


def our_bitmaps(path):
    with qcow2py.open(path) as img:
        return [b.info() for b in img.bitmaps]


def our_dirty(path):
    with qcow2py.open(path) as img:
        return {b.name: b.dirty_extents() for b in img.bitmaps}


def assert_same_as_qemu(path):
    """Flags, granularities and every bitmap's dirty extents agree with QEMU's."""
    ours = our_bitmaps(path)
    assert ours == qemu_bitmaps(path)
    dirty = our_dirty(path)
    for b in ours:
        assert dirty[b["name"]] == nbd_dirty(path, b["name"]), b["name"]
    return dirty


def assert_clean(path):
    out = qemu_img("check", "--output=json", path, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads(out.stdout)
    assert res.get("leaks", 0) == 0 and res.get("corruptions", 0) == 0, res
    with qcow2py.open(path) as img:
        ours = img.check()
    assert (ours.corruptions, ours.leaks, ours.image_end_offset) == \
        (0, 0, res["image-end-offset"])


def random_ops(rnd, size, n, align=512):
    """(kind, offset, length) guest operations: writes, zero writes, discards."""
    ops = []
    for _ in range(n):
        kind = rnd.choice("wwwzd")
        off = rnd.randrange(0, size // align) * align
        ln = min(size - off, rnd.choice([align, 3 * align, 64 * KiB, 200 * KiB, 1 * MiB]))
        ops.append((kind, off, ln))
    return ops


def apply_qemu(path, ops):
    cmds = []
    for i, (k, off, ln) in enumerate(ops):
        cmds.append({"w": f"write -P {i % 250 + 1} {off} {ln}", "z": f"write -z {off} {ln}",
                     "d": f"discard {off} {ln}"}[k])
    qemu_io(path, *cmds)


def apply_ours(img, ops):
    for i, (k, off, ln) in enumerate(ops):
        if k == "w":
            img.write(off, bytes([i % 250 + 1]) * ln)
        elif k == "z":
            img.write_zeroes(off, ln)
        else:
            img.discard(off, ln)


def cli(*args, prog="qcow2py"):
    mod = "qcow2py" if prog == "qcow2py" else "qcow2py.copy"
    return subprocess.run([sys.executable, "-m", mod, *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------- QEMU -> qcow2py
def test_qemu_bitmaps_read_back_identically(tmp_path):
    p = tmp_path / "q.qcow2"
    create(p, 24 * MiB + 4096)                    # a last granule cut by the end of the disk
    qemu_img("bitmap", "--add", "-g", "512", p, "fine")
    qemu_img("bitmap", "--add", p, "default")
    qemu_img("bitmap", "--add", "-g", "1M", p, "coarse")
    qemu_img("bitmap", "--add", "-g", "64k", p, "frozen")
    apply_qemu(p, random_ops(random.Random(1), 24 * MiB, 30))
    qemu_img("bitmap", "--disable", p, "frozen")
    apply_qemu(p, random_ops(random.Random(2), 24 * MiB, 10) + [("w", 24 * MiB, 4096)])
    dirty = assert_same_as_qemu(p)
    assert dirty["fine"] and dirty["frozen"] != dirty["default"]
    with qcow2py.open(p) as img:
        for b in img.bitmaps:
            ext = b.dirty_extents()
            assert b.count_dirty() == sum(n for _, n in ext)
            assert b.next_dirty(0) == (ext[0][0] if ext else None)
            a, n = ext[len(ext) // 2]
            assert b.dirty_extents(a + 1, n) == [(a + 1, n - 1)]
            assert b.count_dirty(a + 1, n) == n - 1
            assert b.next_clean(a) == a + n
            assert len(b.bits) == -(-img.size // b.granularity)
            assert b.bits.endian in ("little",) or b.bits.endian() == "little"
        assert [b.enabled for b in img.bitmaps] == [True, True, True, False]
        with pytest.raises(ValueError, match="read-only"):
            img.bitmaps[0].clear()
        with pytest.raises(ValueError, match="read-only"):
            img.add_bitmap("x")
        with pytest.raises(TypeError):
            img.bitmaps[0].bits[0] = 1          # a frozenbitarray


@pytest.mark.parametrize("opts", [(), ("cluster_size=4096", "extended_l2=off"),
                                  ("cluster_size=2M",), ("extended_l2=on",)])
def test_same_operations_same_bitmaps(tmp_path, opts):
    """The same writes, zero writes and discards, through QEMU and through qcow2py,
    leave identical bitmaps (QEMU marks whole requests, discards included)."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create(a, 8 * MiB, *opts)
    for g in ("512", "4k", "64k", "2M"):
        qemu_img("bitmap", "--add", "-g", g, a, f"g{g}")
    shutil.copy(a, b)
    ops = random_ops(random.Random(len(opts)), 8 * MiB, 25)
    apply_qemu(a, ops)
    with qcow2py.open(b, "r+") as img:
        apply_ours(img, ops)
    assert qemu_bitmaps(a) == qemu_bitmaps(b)
    theirs = {n["name"]: nbd_dirty(a, n["name"]) for n in qemu_bitmaps(a)}
    assert our_dirty(b) == theirs
    assert_same_as_qemu(b)
    assert_clean(b)


# ---------------------------------------------------------------- qcow2py -> QEMU
def test_our_bitmaps_seen_identically_by_qemu(tmp_path):
    p = tmp_path / "o.qcow2"
    qcow2py.create(str(p), 16 * MiB).close()
    with qcow2py.open(p, "r+") as img:
        assert img.bitmaps == []
        b0 = img.add_bitmap("b0", granularity=65536, enabled=True)
        b1 = img.add_bitmap("tiny", granularity=512)
        b2 = img.add_bitmap("off", granularity=1 << 20, enabled=False)
        assert [b.in_use for b in img.bitmaps] == [False] * 3
        assert [b.info()["flags"] for b in img.bitmaps] == [["auto"], ["auto"], []]
        apply_ours(img, random_ops(random.Random(5), 16 * MiB, 20))
        assert b2.count_dirty() == 0
        b2.merge_from(b1)                       # 512 B bits into 1 MiB bits
        assert b2.dirty_extents() == _coarsen(b1.dirty_extents(), 1 << 20, 16 * MiB)
        img.write(15 * MiB, b"\x01" * 700)
        img.flush()
    dirty = assert_same_as_qemu(p)
    assert [b["name"] for b in qemu_bitmaps(p)] == ["off", "tiny", "b0"]   # QEMU's order
    assert (15 * MiB, 65536) in dirty["b0"]
    assert_clean(p)


def test_stored_as_qemu_stores(tmp_path):
    """Data clusters only where a bit is set, table entries of 0 elsewhere (never
    all-ones), the same table shape as QEMU's for the same writes."""
    tables = []
    for prog in ("qemu", "ours"):
        p = tmp_path / f"{prog}.qcow2"
        create(p, 64 * MiB, "cluster_size=4096")
        qemu_img("bitmap", "--add", "-g", "512", p, "s")
        if prog == "qemu":
            qemu_io(p, "write 0 512", "write 63M 4k")
        else:
            with qcow2py.open(p, "r+") as img:
                img.write(0, bytes(512))
                img.write(63 * MiB, bytes(4096))
        with qcow2py.open(p) as img:
            bm = img.find_bitmap("s")
            t = np.frombuffer(img.storage.pread(bm.table_offset, bm.table_size * 8), ">u8")
            tables.append((t != 0).tolist())
            assert not (t & 1).any()
            assert bm.dirty_extents() == [(0, 512), (63 * MiB, 4096)]
    assert tables[0] == tables[1] == [True, False, False, True]


def _coarsen(extents, g, size):
    out = []
    for off, n in extents:
        a, b = off // g * g, min(size, -(-(off + n) // g) * g)
        if out and out[-1][1] >= a:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b - a) for a, b in out]


def test_bits_view_and_clear_enable_disable(tmp_path):
    p = tmp_path / "v.qcow2"
    create(p, 4 * MiB)
    with qcow2py.open(p, "r+") as img:
        bm = img.add_bitmap("v", granularity=4096)
        bm.bits[10:20] = 1                      # advanced use: the live bitarray
        assert bm.dirty_extents() == [(40960, 40960)]
        bm.disable()
        img.write(0, b"x")
        assert bm.count_dirty() == 40960
        bm.enable()
        img.write(0, b"x")
        assert bm.dirty_extents()[0] == (0, 4096)
        other = img.add_bitmap("w", granularity=4096)
        other.merge_from(bm)
        assert other.dirty_extents() == bm.dirty_extents()
        bm.clear()
        assert bm.count_dirty() == 0 and bm.dirty_extents() == []
        img.remove_bitmap("w")
        with pytest.raises(BitmapError, match="Dirty bitmap 'w' not found"):
            other.clear()
        with pytest.raises(BitmapError, match="Bitmap already exists: v"):
            img.add_bitmap("v")
        for g, msg in ((100, "power of 2"), (256, "at least 512"),
                       (1 << 32, "Granularity exceeds maximum")):
            with pytest.raises(BitmapError, match=msg):
                img.add_bitmap("g", granularity=g)
        with pytest.raises(BitmapError, match="Name length exceeds maximum"):
            img.add_bitmap("n" * 1024)
        with pytest.raises(BitmapError, match="Bitmap name cannot be empty"):
            img.add_bitmap("")
    assert_same_as_qemu(p)
    assert_clean(p)


def test_v2_and_size_limits(tmp_path):
    p = tmp_path / "v2.qcow2"
    create(p, 4 * MiB, "compat=0.10")
    with qcow2py.open(p, "r+") as img:
        with pytest.raises(BitmapError, match="Cannot store dirty bitmaps in qcow2 v2 files"):
            img.add_bitmap("b")
    big = tmp_path / "big.qcow2"
    create(big, "100T")
    with qcow2py.open(big, "r+") as img:
        with pytest.raises(BitmapError, match="Too much space will be occupied"):
            img.add_bitmap("b", granularity=512)
        img.add_bitmap("ok", granularity=1 << 20)
        img.write(99 << 40, b"end")
    assert qemu_bitmaps(big) == [{"name": "ok", "granularity": 1 << 20, "flags": ["auto"]}]
    assert our_dirty(big) == {"ok": [(99 << 40, 1 << 20)]}
    assert_clean(big)


def test_merge_between_images(tmp_path):
    a, b, c = tmp_path / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "c.qcow2"
    create(a, 8 * MiB)
    create(c, 16 * MiB)
    qemu_img("bitmap", "--add", "-g", "4k", a, "src")
    qemu_img("bitmap", "--add", c, "other")
    qemu_io(a, "write 1M 10k", "write 5M 64k")
    create(b, 8 * MiB)
    with qcow2py.open(a) as src, qcow2py.open(c) as wrong, qcow2py.open(b, "r+") as dst:
        bm = dst.add_bitmap("dst", granularity=65536)
        bm.merge_from(src.find_bitmap("src"))
        assert bm.dirty_extents() == [(1 * MiB, 65536), (5 * MiB, 65536)]
        with pytest.raises(BitmapError, match=r"Bitmaps are of different sizes \(destination "
                                              r"size is 8388608, source size is 16777216\)"):
            bm.merge_from(wrong.find_bitmap("other"))


# ---------------------------------------------------------------- the command line
def _norm(text, prog):
    text = text.replace(f"{prog}: ", "PROG: ")
    return re.sub(r"in '(#block\d+|[^']*\.qcow2)'", "in 'NODE'", text)


# (options, bitmap name or None), applied in order to one image by both programs
CLI_SCRIPTS = [
    [(["--add"], "b0"), (["--add", "-g", "512"], "b1"), (["--add"], "b0"),
     (["--disable"], "b1"), (["--clear"], "b0"), (["--remove"], "nope"), (["--enable"], "b1")],
    [(["--add", "--disable"], "x"), (["--add", "-g", "100"], "y"), (["--add", "-g", "4G"], "y"),
     (["--add", "-g", "2G"], "y"), (["--add", "-g", "0"], "z"), (["--add", "-g", "1k"], "")],
    [(["--add"], "m"), (["--merge", "nope"], "m"), (["--merge", "m"], "zz"),
     (["--add", "--add"], "dup"),
     (["--add", "--clear", "--disable", "--merge", "m", "--enable"], "seq"),
     (["--remove"], "dup")],
    [(["--remove"], "m"), (["--add"], None), ([], "m"), (["-g", "4k", "--remove"], "m"),
     (["--merge", "m", "-F", "qcow2"], "m"), (["-b", "other.qcow2", "--add"], "m"),
     (["--add", "-g", "abc"], "m")],
]


@pytest.mark.parametrize("script", range(len(CLI_SCRIPTS)))
def test_bitmap_command_matches_qemu_img(tmp_path, script):
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir()
    ours.mkdir()
    create(theirs / "img.qcow2", 4 * MiB)
    qemu_io(theirs / "img.qcow2", "write 0 100k")
    shutil.copy(theirs / "img.qcow2", ours / "img.qcow2")
    for opts, name in CLI_SCRIPTS[script]:
        pos = ["img.qcow2"] + ([] if name is None else [name])
        a = subprocess.run(["qemu-img", "bitmap", *opts, *pos], cwd=theirs,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        b = subprocess.run([sys.executable, "-m", "qcow2py", "bitmap", *opts, *pos], cwd=ours,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert (b.returncode, _norm(b.stderr, "qcow2py")) == \
            (a.returncode, _norm(a.stderr, "qemu-img")), (opts, name)
        assert qemu_bitmaps(ours / "img.qcow2") == qemu_bitmaps(theirs / "img.qcow2"), opts
    for b in qemu_bitmaps(theirs / "img.qcow2"):
        assert nbd_dirty(ours / "img.qcow2", b["name"]) == \
            nbd_dirty(theirs / "img.qcow2", b["name"])
    assert_clean(ours / "img.qcow2")


def test_bitmap_command_merge_from_other_file(tmp_path):
    src = tmp_path / "src.qcow2"
    create(src, 4 * MiB)
    qemu_img("bitmap", "--add", "-g", "4k", src, "s")
    qemu_io(src, "write 8k 4k", "write 3M 1k")
    results = []
    for prog in ("qemu-img", "qcow2py"):
        dst = tmp_path / f"{prog}.qcow2"
        create(dst, 4 * MiB)
        base = ["qemu-img"] if prog == "qemu-img" else [sys.executable, "-m", "qcow2py"]
        for args in (["--add", "--merge", "s", "-b", str(src), "-F", "qcow2"],
                     ["--merge", "missing", "-b", str(src)]):
            p = subprocess.run([*base, "bitmap", *args, str(dst), "d"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
            results.append((prog, p.returncode, _norm(p.stderr, prog)))
        results.append((prog, nbd_dirty(dst, "d")))
    n = len(results) // 2
    assert [r[1:] for r in results[:n]] == [r[1:] for r in results[n:]]
    assert results[n - 1][1] == [(0, 64 * KiB), (3 * MiB, 64 * KiB)]


def test_edits_round_trip_between_qemu_and_qcow2py(tmp_path):
    p = tmp_path / "r.qcow2"
    create(p, 8 * MiB)
    # ours first, then QEMU edits ours, then we edit theirs, back and forth
    with qcow2py.open(p, "r+") as img:
        img.add_bitmap("a", granularity=4096)
        img.add_bitmap("b")
        img.write(1 * MiB, b"x" * 5000)
    qemu_img("bitmap", "--disable", p, "a")
    qemu_io(p, "write 2M 64k")
    qemu_img("bitmap", "--add", "-g", "128k", p, "c")
    qemu_img("bitmap", "--merge", "a", p, "c")
    assert_same_as_qemu(p)
    with qcow2py.open(p, "r+") as img:
        assert [(b.name, b.enabled, b.granularity) for b in img.bitmaps] == \
            [("b", True, 65536), ("a", False, 4096), ("c", True, 128 * KiB)]
        img.find_bitmap("b").clear()
        img.remove_bitmap("a")
        img.write(7 * MiB, b"y")
    qemu_img("bitmap", "--remove", p, "c")
    qemu_img("bitmap", "--add", p, "d")
    dirty = assert_same_as_qemu(p)
    assert dirty == {"b": [(7 * MiB, 64 * KiB)], "d": []}
    assert_clean(p)


# ---------------------------------------------------------------- crashes and in_use
_ABANDON = """
import os, sys
import qcow2py
img = qcow2py.open(sys.argv[1], "r+")
img.write(0, b"a" * 4096)
img.find_bitmap("b0").clear()
img.flush()
os._exit(0)          # no close: the bitmaps are never stored
"""


def test_abandoned_image_leaves_bitmaps_in_use(tmp_path):
    p = tmp_path / "c.qcow2"
    create(p, 4 * MiB)
    qemu_img("bitmap", "--add", p, "b0")
    qemu_img("bitmap", "--add", "--disable", p, "b1")
    qemu_io(p, "write 1M 4k")
    subprocess.run([sys.executable, "-c", _ABANDON, str(p)], check=True)
    theirs = qemu_bitmaps(p)
    assert [b["flags"] for b in theirs] == [["in-use", "auto"], ["in-use"]]
    assert our_bitmaps(p) == theirs
    assert qemu_img("check", p, check=False).returncode == 0
    with qcow2py.open(p) as img:
        bm = img.find_bitmap("b0")
        assert bm.inconsistent and bm.in_use
        with pytest.raises(BitmapError, match="Bitmap 'b0' is inconsistent and cannot be used") \
                as e:
            bm.dirty_extents()
        assert "block-dirty-bitmap-remove" in e.value.hint
    with qcow2py.open(p, "r+") as img:
        for call in (img.find_bitmap("b1").enable, lambda: img.find_bitmap("b0").bits):
            with pytest.raises(BitmapError, match="inconsistent"):
                call()
        img.write(2 * MiB, b"b")                # inconsistent bitmaps are not tracked
        img.remove_bitmap("b0")
    # what QEMU does with the one left: still in use, and kept as it was
    assert qemu_bitmaps(p) == [{"name": "b1", "granularity": 65536, "flags": ["in-use"]}]
    assert_clean(p)
    r = cli("bitmap", "--clear", p, "b1")
    assert r.returncode == 1 and r.stderr == (
        "qcow2py: Operation clear on bitmap b1 failed: Bitmap 'b1' is inconsistent and cannot "
        "be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk\n")
    assert cli("bitmap", "--remove", p, "b1").returncode == 0
    assert qemu_bitmaps(p) == []
    assert_clean(p)


def test_qemu_crash_seen_in_use_by_us(tmp_path):
    p = tmp_path / "q.qcow2"
    create(p, 4 * MiB)
    qemu_img("bitmap", "--add", p, "b0")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "abort", str(p)],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert our_bitmaps(p) == qemu_bitmaps(p) == [
        {"name": "b0", "granularity": 65536, "flags": ["in-use", "auto"]}]
    with qcow2py.open(p) as img:
        assert img.bitmaps[0].inconsistent


def test_crash_at_any_instant_of_a_bitmap_session(tmp_path):
    """Crash replay of open (in_use marking), writes and close (store): QEMU always
    finds a clean image whose bitmaps are either in use or exactly right."""
    p = tmp_path / "img.qcow2"
    create(p, 4 * MiB, "cluster_size=4096")
    qemu_img("bitmap", "--add", "-g", "4k", p, "keep")
    qemu_img("bitmap", "--add", p, "gone")
    qemu_io(p, "write 0 12k")
    wrap = Recorder(p)

    img = qcow2py.open(p, "r+", storage_wrapper=wrap, lock=False)
    apply_ours(img, random_ops(random.Random(9), 4 * MiB, 12))
    img.add_bitmap("new", granularity=512)
    img.remove_bitmap("gone")
    img.write(3 * MiB, b"z" * 1000)
    final = {b.name: b.dirty_extents() for b in img.bitmaps}
    img.close()
    rec = wrap.rec
    rnd = random.Random(3)
    syncs = rec.sync_points()
    points = sorted(set([q - 1 for q in syncs] + syncs + [len(rec.journal)]))
    crashed = tmp_path / "crash.qcow2"
    seen = set()
    for upto in points:
        durable = max([q for q in syncs if q <= upto], default=0)
        survivors = [i for i in range(durable, upto) if rnd.random() < 0.5]
        crashed.write_bytes(rec.crash_image(upto, survivors))
        out = qemu_img("check", "--output=json", crashed, check=False)
        res = json.loads(out.stdout)
        assert res.get("corruptions", 0) == 0 and out.returncode in (0, 3), (upto, res)
        theirs = qemu_bitmaps(crashed)
        assert our_bitmaps(crashed) == theirs, upto
        states = {tuple(b["flags"]) for b in theirs}
        names = [b["name"] for b in theirs]
        if not theirs:
            seen.add("stale")           # crash inside the autoclear protocol: ignored, leaks
        elif all("in-use" in b["flags"] for b in theirs):
            seen.add("in-use")
            assert names == ["keep", "gone"]
        else:
            seen.add("stored")
            assert states == {("auto",)} and names == ["keep", "new"]
            assert our_dirty(crashed) == final
            for n in names:
                assert nbd_dirty(crashed, n) == final[n]
    assert seen == {"stale", "in-use", "stored"}
    assert_same_as_qemu(p)
    assert_clean(p)


def test_stale_extension_is_dropped_as_qemu_does(tmp_path):
    """A program lacking bitmap support cleared autoclear bit 0: the extension is stale;
    an r+ open drops it (as QEMU's does), leaking the bitmap clusters."""
    results = []
    for prog in ("qemu", "ours"):
        p = tmp_path / f"{prog}.qcow2"
        create(p, 4 * MiB)
        qemu_img("bitmap", "--add", p, "b0")
        with open(p, "r+b") as f:
            f.seek(88)
            f.write((0).to_bytes(8, "big"))
        if prog == "qemu":
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(p)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
        else:
            with qcow2py.open(p, "r+") as img:
                assert img.bitmaps == []
                img.write(0, b"\xcd" * 4096)
        with qcow2py.open(p) as img:
            results.append((img.header.bitmaps, img.header.autoclear_features, qemu_bitmaps(p),
                            json.loads(qemu_img("check", "--output=json", p,
                                                check=False).stdout).get("leaks")))
    assert results[0] == results[1]
    assert results[0][0] is None and results[0][3] > 0


# ---------------------------------------------------------------- check
def test_check_counts_bitmap_clusters_while_open(tmp_path):
    p = tmp_path / "k.qcow2"
    create(p, 8 * MiB)
    qemu_img("bitmap", "--add", "-g", "512", p, "b0")
    qemu_io(p, "write 0 8M")
    with qcow2py.open(p, "r+") as img:
        img.write(0, b"q")
        res = img.check()
        assert (res.corruptions, res.leaks) == (0, 0)
    assert_clean(p)


# ---------------------------------------------------------------- qcow2py-copy
def test_copy_bitmaps_like_qemu_img_convert(tmp_path):
    src = tmp_path / "src.qcow2"
    create(src, 8 * MiB)
    for args in (["-g", "4k", "one"], ["two"], ["-g", "1M", "three"]):
        qemu_img("bitmap", "--add", *args[:-1], src, args[-1])
    qemu_io(src, "write -P 1 0 300k", "write -P 2 5M 1M", "write -z 7M 64k")
    qemu_img("bitmap", "--disable", src, "two")
    qemu_io(src, "write -P 3 2M 4k")
    qemu_img("convert", "--bitmaps", "-O", "qcow2", src, tmp_path / "theirs.qcow2")
    r = cli("--bitmaps", "-O", "qcow2", src, tmp_path / "ours.qcow2", prog="copy")
    assert r.returncode == 0, r.stderr
    theirs = qemu_bitmaps(tmp_path / "theirs.qcow2")
    assert qemu_bitmaps(tmp_path / "ours.qcow2") == theirs
    assert [b["name"] for b in theirs] == ["one", "two", "three"]
    for b in theirs:
        assert nbd_dirty(tmp_path / "ours.qcow2", b["name"]) == \
            nbd_dirty(tmp_path / "theirs.qcow2", b["name"])
    assert_clean(tmp_path / "ours.qcow2")
    # refusals, as qemu-img's
    for t in ("t1.qcow2", "t2.qcow2"):
        create(tmp_path / t, 8 * MiB)
        qemu_img("bitmap", "--add", tmp_path / t, "two")
    for opts, t1, t2 in ((["-O", "raw"], "x1.raw", "x2.raw"),
                         (["-n", "-O", "qcow2"], "t1.qcow2", "t2.qcow2")):
        a = qemu_img("convert", "--bitmaps", *opts, src, tmp_path / t1, check=False)
        b = cli("--bitmaps", *opts, src, tmp_path / t2, prog="copy")
        assert (b.returncode, b.stderr.replace("qcow2py-copy:", "qemu-img:")) == \
            (a.returncode, a.stderr), opts
    assert qemu_bitmaps(tmp_path / "t1.qcow2") == qemu_bitmaps(tmp_path / "t2.qcow2")


def test_copy_bitmap_incremental_backup(tmp_path):
    """Full backup, then only what the bitmap says changed, onto the same target."""
    src = tmp_path / "disk.qcow2"
    create(src, 16 * MiB)
    qemu_io(src, "write -P 1 0 16M")
    backup = tmp_path / "backup.qcow2"
    assert cli("-O", "qcow2", src, backup, prog="copy").returncode == 0
    qemu_img("bitmap", "--add", src, "inc")
    qemu_io(src, "write -P 2 1M 100k", "write -z 9M 64k", "discard 12M 1M", "write -P 3 15M 1")
    # a clean range of the target that the incremental copy must not touch
    qemu_io(backup, "write -P 0xee 4M 64k")
    r = cli("--bitmap", "inc", "-n", "-O", "qcow2", src, backup, "--stats=json", prog="copy")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["bytes_total"] == sum(n for _, n in our_dirty(src)["inc"])
    with qcow2py.open(src) as s, qcow2py.open(backup) as b:
        want, got = s.read(0, s.size), b.read(0, b.size)
    assert got[4 * MiB:4 * MiB + 65536] == b"\xee" * 65536
    assert got[:4 * MiB] + got[4 * MiB + 65536:] == want[:4 * MiB] + want[4 * MiB + 65536:]
    assert_clean(backup)
    for args, msg in ((["--bitmap", "nope"], "Dirty bitmap 'nope' not found"),
                      (["--skip-broken-bitmaps"], "requires --bitmaps")):
        r = cli(*args, "-n", "-O", "qcow2", src, backup, prog="copy")
        assert r.returncode == 1 and msg in r.stderr
