"""``qcow2py resize`` against ``qemu-img resize`` on copies of one image: the same
stdout and exit status, ``qemu-img compare``-identical images (also after a write
to the new area), ``qemu-img check`` clean; and a crash at any sync point of a
grow that moves the L1 table leaves an image that reads the old or the new size's
content and has no corruption."""

from __future__ import annotations

import random
import shutil

import pytest

import qcow2py
from lifecycle_shapes import SHAPES, build, ours, resize_twin
from qemu import create, qemu_img, qemu_io
from recording import Recorder, crashed_images

MiB = 1 << 20


def twin(tmp_path, capsys, src, args, after=None, seed=None):
    return resize_twin(tmp_path, capsys, src, args, after, seed)[0]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_twin_grow_and_shrink(tmp_path, capsys, shape):
    seed = random.randrange(1 << 30)
    src = build(tmp_path / "src.qcow2", SHAPES[shape], random.Random(seed))
    # c512: 32 KiB per L2 table, the L1 table grows and moves
    assert twin(tmp_path, capsys, src, ["+40M"], "write -P 9 45M 70000", seed) == 0
    assert twin(tmp_path, capsys, src, ["--", "-1M"], None, seed) == 1
    assert twin(tmp_path, capsys, src, ["--shrink", "--", "-1M"],
                "write -P 8 4000000 100000", seed) == 0
    assert twin(tmp_path, capsys, src, ["--shrink", "3000001"], None, seed) == 1
    assert twin(tmp_path, capsys, src, ["--shrink", "3000320"], None, seed) == 0


def test_twin_overlay_over_longer_backing(tmp_path, capsys):
    create(tmp_path / "base.qcow2", 8 * MiB)
    qemu_io(tmp_path / "base.qcow2", "write -P 1 0 8M")
    create(tmp_path / "top.qcow2", 2 * MiB, backing="base.qcow2", cwd=tmp_path)
    for d in ("q", "m"):
        (tmp_path / d).mkdir()
        for n in ("base.qcow2", "top.qcow2"):
            shutil.copyfile(tmp_path / n, tmp_path / d / n)
    p = qemu_img("resize", tmp_path / "q" / "top.qcow2", "6M")
    code, (out, _) = ours(capsys, ["resize", tmp_path / "m" / "top.qcow2", "6M"])
    assert (code, out) == (p.returncode, p.stdout)
    r = qemu_img("compare", tmp_path / "q" / "top.qcow2", tmp_path / "m" / "top.qcow2",
                 check=False)
    assert r.returncode == 0, r.stdout
    with qcow2py.open(tmp_path / "m" / "top.qcow2") as t:
        assert t.read(2 * MiB, 4) == bytes(4) and t.read(0, 1) == b"\x01"


def test_twin_raw_and_refusals(tmp_path, capsys):
    raw = tmp_path / "a.raw"
    create(raw, MiB, fmt="raw")
    for args in (["-f", "raw", "+1M"], ["-f", "raw", "--", "-64k"],
                 ["-f", "raw", "--shrink", "--", "-64k"], ["-f", "raw", "+-5"]):
        q, m = tmp_path / "q.raw", tmp_path / "m.raw"
        shutil.copyfile(raw, q)
        shutil.copyfile(raw, m)
        p = qemu_img("resize", *args[:-1], q, *args[-1:], check=False)
        code, (out, _) = ours(capsys, ["resize", *args[:-1], m, *args[-1:]])
        assert (code, out) == (p.returncode, p.stdout), args
        assert q.stat().st_size == m.stat().st_size, args


def test_grow_crash_points(tmp_path):
    """Growing a 512 B-cluster image moves its L1 table: crash at every sync point."""
    path = tmp_path / "img.qcow2"
    create(path, MiB, "cluster_size=512")
    qemu_io(path, "write -P 3 0 1M")
    wrap = Recorder(path)

    with qcow2py.open(path, "r+", storage_wrapper=wrap, lock=False) as img:
        img.resize(64 * MiB)
    rec = wrap.rec
    assert len(rec.sync_points()) >= 3
    crashed = tmp_path / "crash.qcow2"
    rnd = random.Random(1)
    for upto in crashed_images(rec, crashed, rnd, 12):
        with qcow2py.open(crashed) as img:
            assert img.size in (MiB, 64 * MiB), upto
            assert img.read(0, MiB) == b"\x03" * MiB, upto
            assert not any(img.read(MiB, img.size - MiB)), upto


def test_api_refusals(tmp_path):
    path = tmp_path / "a.qcow2"
    create(path, MiB)
    with qcow2py.open(path) as img, pytest.raises(ValueError):
        img.resize(2 * MiB)                         # read-only
    with qcow2py.open(path, "r+") as img:
        with pytest.raises(qcow2py.Qcow2Error):
            img.resize(MiB // 2)                    # a shrink needs shrink=True
        img.resize(MiB // 2, shrink=True)
        assert img.size == MiB // 2
