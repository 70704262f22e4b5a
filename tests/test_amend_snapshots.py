"""``qcow2py amend -o compat=0.10`` of an image with internal snapshots against
``qemu-img amend`` on a copy: qemu-img 7.2 downgrades it (zero clusters of the
active and of every snapshot's tables rewritten in what v2 can say) unless a
snapshot has another disk size ("Internal snapshots prevent downgrade of image").
Both results read the same now; every snapshot of ours reads what it read before
(``qemu-img convert -l``; qemu-img 7.2 zeroes a zero cluster's old host cluster in
place, which changes the content of an older snapshot still reading data there, so
its snapshots are not the oracle); ours is ``qemu-img check`` clean, and no L2 table
of ours keeps a zero flag."""

from __future__ import annotations

import hashlib
import random
import shutil
import struct

import pytest

import qcow2py
from lifecycle_shapes import build, ours, random_ops
from qemu import create, info_json, qemu_img, qemu_io
from recording import Recorder, crashed_images

MiB = 1 << 20
SIZE = 4 * MiB


def _zero_flags(path) -> int:
    """L2 entries with the zero flag, over the active and every snapshot L1 table."""
    d = path.read_bytes()
    cb = struct.unpack(">I", d[20:24])[0]
    cs = 1 << cb
    l1s = [struct.unpack(">IQ", d[36:48])]
    nsnap, snap_off = struct.unpack(">IQ", d[60:72])
    p = snap_off
    for _ in range(nsnap):
        l1_off, l1_size, id_len, name_len, _a, _b, _c, _vm, extra = \
            struct.unpack(">QIHHIIQII", d[p:p + 40])
        l1s.append((l1_size, l1_off))
        p += -(-(40 + extra + id_len + name_len) // 8) * 8
    n = 0
    for size, off in l1s:
        for (e,) in struct.iter_unpack(">Q", d[off:off + 8 * size]):
            t = e & 0x00FFFFFFFFFFFE00
            if t:
                for (x,) in struct.iter_unpack(">Q", d[t:t + cs]):
                    n += bool(x & 1) and not x & (1 << 62)
    return n


def _digest(path, snap, tmp):
    out = tmp / "out.raw"
    args = ["-l", f"snapshot.name={snap}"] if snap else []
    qemu_img("convert", *args, "-O", "raw", path, out, cwd=path.parent)
    h = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return h


@pytest.mark.parametrize("backed", [False, True])
def test_twin_downgrade_with_snapshots(tmp_path, capsys, backed):
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    d = tmp_path / "src"
    d.mkdir()
    if backed:
        build(d / "base.qcow2", [], rnd, size=SIZE, n=6)
    img = d / "img.qcow2"
    create(img, SIZE, backing="base.qcow2" if backed else None, cwd=d)
    snaps = ["s1", "s2", "s3"]
    for s in snaps:            # zero writes, data, discards between the snapshots
        qemu_io(img, *random_ops(rnd, SIZE, 6), f"write -z {rnd.randrange(SIZE // 65536 - 1) * 65536} 128k",
                cwd=d)
        qemu_img("snapshot", "-c", s, img)
    qemu_io(img, *random_ops(rnd, SIZE, 4), cwd=d)
    if backed:
        qemu_img("snapshot", "-d", "s2", img)
        snaps.remove("s2")
    assert _zero_flags(img) > 0, f"seed {seed}: the image has no zero cluster to rewrite"
    before = {s: _digest(img, s, tmp_path) for s in [None, *snaps]}
    for who in ("q", "m"):
        shutil.copytree(d, tmp_path / who)
    q, m = tmp_path / "q" / "img.qcow2", tmp_path / "m" / "img.qcow2"
    p = qemu_img("amend", "-o", "compat=0.10", q, check=False)
    code, (out, err) = ours(capsys, ["amend", "-o", "compat=0.10", m])
    assert (code, out) == (p.returncode, p.stdout) == (0, ""), f"seed {seed}: {err} {p.stderr}"
    assert info_json(m)["format-specific"]["data"]["compat"] == "0.10"
    qemu_img("check", m)
    assert _zero_flags(m) == 0, f"seed {seed}"
    assert _digest(q, None, tmp_path) == before[None], f"seed {seed}"
    for s in [None, *snaps]:
        assert _digest(m, s, tmp_path) == before[s], f"seed {seed} snapshot {s}"
    assert [x["name"] for x in info_json(m)["snapshots"]] == snaps


def test_twin_snapshot_of_another_size_refuses(tmp_path, capsys):
    src = tmp_path / "img.qcow2"
    create(src, SIZE)
    qemu_io(src, "write -P 1 0 64k", "write -z 64k 64k")
    qemu_img("snapshot", "-c", "small", src)
    qemu_img("resize", src, "+1M")
    q, m = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    shutil.copyfile(src, q)
    shutil.copyfile(src, m)
    p = qemu_img("amend", "-o", "compat=0.10", q, check=False)
    code, (out, err) = ours(capsys, ["amend", "-o", "compat=0.10", m])
    assert (code, out) == (p.returncode, p.stdout) and code == 1
    assert "Internal snapshots prevent downgrade of image" in err
    assert "Internal snapshots prevent downgrade of image" in p.stderr
    assert m.read_bytes() == src.read_bytes()


def test_downgrade_crash_points(tmp_path):
    """A crash at any sync point of a downgrade with snapshots over a backing file
    leaves an image without corruption whose state and snapshots read as before."""
    rnd = random.Random(5)
    size = MiB
    build(tmp_path / "base.qcow2", [], rnd, size=size, n=4)
    img = tmp_path / "img.qcow2"
    create(img, size, backing="base.qcow2", cwd=tmp_path)
    qemu_io(img, "write -P 1 0 192k", "write -z 64k 64k", "write -z 512k 128k", cwd=tmp_path)
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -z 0 64k", "write -P 2 640k 64k", "write -z 768k 64k", cwd=tmp_path)
    qemu_img("snapshot", "-c", "s2", img)
    qemu_io(img, "write -P 3 576k 64k", cwd=tmp_path)
    before = {s: _digest(img, s, tmp_path) for s in (None, "s1", "s2")}
    wrap = Recorder(img)

    with qcow2py.open(img, "r+", storage_wrapper=wrap, lock=False) as im:
        im.amend(compat="0.10")
    rec = wrap.rec
    crashed = tmp_path / "crash.qcow2"
    points = 0
    for upto in crashed_images(rec, crashed, rnd, 8):
        points += 1
        for s in (None, "s1", "s2"):
            assert _digest(crashed, s, tmp_path) == before[s], (upto, s)
    assert points >= 5
