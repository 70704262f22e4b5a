"""qcow2py's check agrees with ``qemu-img check`` (JSON and exit code)."""

import json
import random
import struct
import subprocess
import sys

import pytest

import qcow2py
from qcow2py.qcow2.check import check_image
from qcow2py.format import refcount as rc
from qcow2py.format.header import Header
from qemu import create, qemu_img, qemu_io


def qemu_check(path):
    p = qemu_img("check", "--output=json", path, check=False)
    return json.loads(p.stdout), p.returncode


def ours(path):
    with qcow2py.open(path) as img:
        r = check_image(img)
    return r


def assert_same(path):
    want, code = qemu_check(path)
    r = ours(path)
    got = r.to_json_dict()
    assert got == want, (got, want, r.messages)
    assert r.exit_code == code
    # the CLI prints the same JSON text and exit code
    p = subprocess.run([sys.executable, "-m", "qcow2py", "check", "--output=json", str(path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.returncode == code and json.loads(p.stdout) == want
    return r


def fragmented(path, *opts, n=40, seed=1, compressed=False):
    create(path, "32M", *opts)
    rnd = random.Random(seed)
    clusters = list(range(256))
    rnd.shuffle(clusters)
    cmds = [f"write {'-c ' if compressed else ''}-P {c % 250 + 1} {c * 65536} 65536"
            for c in clusters[:n]]
    cmds += [f"write -z {c * 65536} 65536" for c in clusters[n:n + 5]]
    qemu_io(path, *cmds)


@pytest.mark.parametrize("opts", [
    (), ("compat=0.10",), ("cluster_size=512",), ("cluster_size=2M",), ("refcount_bits=1",),
    ("refcount_bits=64",), ("extended_l2=on",), ("lazy_refcounts=on",),
])
def test_clean_images(tmp_path, opts):
    path = tmp_path / "a.qcow2"
    fragmented(path, *opts)
    r = assert_same(path)
    assert r.exit_code == 0 and r.allocated_clusters > 0


def test_compressed_and_snapshots_and_bitmaps(tmp_path):
    path = tmp_path / "c.qcow2"
    fragmented(path, compressed=True)
    qemu_img("snapshot", "-c", "s1", path)
    qemu_io(path, "write -P 9 0 1M")
    qemu_img("bitmap", "--add", path, "b0")
    qemu_io(path, "write -P 7 2M 64k")
    r = assert_same(path)
    assert r.compressed_clusters > 0


def _poke_refcount(path, cluster, value):
    raw = bytearray(path.read_bytes())
    h = Header.parse(bytes(raw[:1 << 21]))
    table = rc.decode_table(raw[h.refcount_table_offset:h.refcount_table_offset + h.cluster_size])
    per = rc.entries_per_block(h.cluster_size, h.refcount_order)
    block_off = int(table[cluster // per])
    counts = rc.decode_block(raw[block_off:block_off + h.cluster_size], h.refcount_order)
    counts[cluster % per] = value
    raw[block_off:block_off + h.cluster_size] = rc.encode_block(counts, h.refcount_order)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("cluster,value,code", [(0, 2, 3), (5, 0, 2), (5, 2, 2), (200, 1, 3)])
def test_corruptions_and_leaks(tmp_path, cluster, value, code):
    path = tmp_path / "p.qcow2"
    create(path, "64M")
    qemu_io(path, "write -P 1 0 128k", "write -P 2 4M 64k")
    qemu_img("resize", path, "128M")
    if cluster == 200:   # a leak needs the cluster inside the file
        with open(path, "r+b") as f:
            f.truncate(201 * 65536)
    _poke_refcount(path, cluster, value)
    r = assert_same(path)
    assert r.exit_code == code


def test_dirty_lazy_refcount_image(tmp_path):
    path = tmp_path / "lz.qcow2"
    create(path, "16M", "lazy_refcounts=on")
    subprocess.run(["qemu-io", "-c", "write -P 3 0 128k", "-c", "abort", str(path)],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    r = assert_same(path)
    assert r.exit_code == 2 and r.corruptions >= 2


def _damaged(path, cluster, value):
    create(path, "64M")
    qemu_io(path, "write -P 1 0 128k", "write -P 2 4M 64k")
    qemu_img("resize", path, "128M")
    if cluster == 200:
        with open(path, "r+b") as f:
            f.truncate(201 * 65536)
    _poke_refcount(path, cluster, value)


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("cluster,value", [(0, 2), (5, 0), (5, 2), (200, 1)])
def test_repair_matches_qemu(tmp_path, cluster, value, mode):
    theirs, ours_path = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    _damaged(theirs, cluster, value)
    _damaged(ours_path, cluster, value)
    p = qemu_img("check", "--output=json", "-r", mode, theirs, check=False)
    want = json.loads(p.stdout) if p.stdout.strip() else None
    img = qcow2py.open(ours_path, "r+", repair=True)
    try:
        res = img.check(repair=mode)
        got = res.to_json_dict()
        got["filename"] = str(theirs)
        code = res.exit_code
    except qcow2py.Qcow2Error as e:
        assert "rebuilt" in str(e)
        got, code = None, 1
    finally:
        img.close()
    assert (got, code) == (want, p.returncode)
    # both images are now in the same state, as qemu-img check sees it
    after_q = qemu_img("check", "--output=json", theirs, check=False)
    after_o = qemu_img("check", "--output=json", ours_path, check=False)
    assert after_o.returncode == after_q.returncode
    assert qemu_img("compare", theirs, ours_path, check=False).returncode == 0


def _lazy_crashed(path):
    create(path, "16M", "lazy_refcounts=on")
    subprocess.run(["qemu-io", "-c", "write -P 3 0 128k", "-c", "abort", str(path)],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_repair_dirty_image_cli(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    _lazy_crashed(a)
    b.write_bytes(a.read_bytes())
    want = qemu_img("check", "--output=json", "-r", "all", a.name, cwd=tmp_path, check=False)
    p = subprocess.run([sys.executable, "-m", "qcow2py", "check", "--output=json", "-r", "all",
                        b.name], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    assert p.returncode == want.returncode == 0
    assert p.stdout == want.stdout.replace("a.qcow2", "b.qcow2")
    with qcow2py.open(b) as img:
        assert not img.dirty
    assert qemu_img("compare", a, b, check=False).returncode == 0


def test_dirty_image_is_repaired_when_opened_for_writing(tmp_path):
    path = tmp_path / "d.qcow2"
    _lazy_crashed(path)
    with qcow2py.open(path) as img:
        assert img.dirty                    # read-only access works as is
        before = img.read(0, 1 << 20)
    with qcow2py.open(path, "r+") as img:
        assert not img.dirty
        img.write(1 << 20, b"\x42" * 4096)
    assert qemu_img("check", path, check=False).returncode == 0
    with qcow2py.open(path) as img:
        assert img.read(0, 1 << 20) == before
        assert img.read(1 << 20, 4096) == b"\x42" * 4096


def test_corrupt_bit_refuses_writing_until_repaired(tmp_path):
    path = tmp_path / "c.qcow2"
    create(path, "16M")
    qemu_io(path, "write -P 1 0 64k")
    raw = bytearray(path.read_bytes())
    struct.pack_into(">Q", raw, 72, 2)         # incompatible bit 1: corrupt
    path.write_bytes(bytes(raw))
    with pytest.raises(qcow2py.CorruptImageError, match="corrupt"):
        qcow2py.open(path, "r+")
    with qcow2py.open(path, "r+", repair=True) as img:
        res = img.check(repair="all")
        assert res.exit_code == 0
    with qcow2py.open(path, "r+") as img:
        assert not img.corrupt


def _l2_offset(path):
    raw = path.read_bytes()
    h = Header.parse(raw[:65536])
    return h, struct.unpack_from(">Q", raw, h.l1_table_offset)[0] & 0x00FFFFFFFFFFFE00


def _corrupt(path, kind):
    create(path, "16M")
    qemu_io(path, "write -P 1 0 192k")
    raw = bytearray(path.read_bytes())
    h, l2 = _l2_offset(path)
    if kind == "reserved-bits":
        e = struct.unpack_from(">Q", raw, l2)[0]
        struct.pack_into(">Q", raw, l2, e | 0x2)               # a reserved bit (1..8)
    elif kind == "overlapping-l2":
        # guest cluster 3 points at the L2 table itself: two owners for one cluster
        struct.pack_into(">Q", raw, l2 + 3 * 8, l2 | (1 << 63))
    elif kind == "refcount-too-low":
        pass
    path.write_bytes(bytes(raw))
    if kind == "refcount-too-low":
        _poke_refcount(path, 5, 0)


@pytest.mark.parametrize("kind", ["reserved-bits", "overlapping-l2", "refcount-too-low"])
def test_corrupted_images_report_and_repair_like_qemu(tmp_path, kind):
    ours_path, theirs = tmp_path / "o.qcow2", tmp_path / "q.qcow2"
    _corrupt(ours_path, kind)
    _corrupt(theirs, kind)
    want, code = qemu_check(theirs)
    with qcow2py.open(ours_path) as img:
        r = check_image(img)
    got = r.to_json_dict()
    got["filename"] = str(theirs)
    assert (got, r.exit_code) == (want, code)
    assert code == 2
    with qcow2py.open(ours_path, "r+", repair=True) as img:
        img.check(repair="all")
    after = qemu_img("check", "--output=json", ours_path, check=False)
    if kind == "reserved-bits":
        # qemu-img cannot repair reserved bits either: it still reports them
        qemu_img("check", "-r", "all", theirs, check=False)
        assert after.returncode == qemu_img("check", theirs, check=False).returncode
    else:
        assert after.returncode == 0, after.stdout + after.stderr
