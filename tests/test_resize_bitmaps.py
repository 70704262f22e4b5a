"""``qcow2py resize`` of an image with persistent bitmaps against ``qemu-img resize``:
the bitmaps follow the size as QEMU truncates them (bits past a shrink dropped, a
grow adds clear bits, writes after the resize mark the enabled ones), checked
through ``qemu-nbd -B`` + ``nbdinfo``; an inconsistent bitmap refuses the resize
as qemu-img refuses it."""

from __future__ import annotations

import random
import shutil
import struct

import pytest

import qcow2py
from lifecycle_shapes import SHAPES, build, ours, resize_twin
from qemu import create, info_json, qemu_img, qemu_io
from test_bitmaps import nbd_dirty

MiB = 1 << 20
BITMAPS = ("b0", "b1", "fine")


def _with_bitmaps(path, shape, seed):
    build(path, SHAPES[shape], random.Random(seed), n=6)
    qemu_img("bitmap", "--add", path, "b0")
    qemu_img("bitmap", "--add", "-g", "512", path, "fine")
    qemu_img("bitmap", "--add", "--disable", path, "b1")
    rnd = random.Random(seed)
    ops = [f"write -P 7 {rnd.randrange(0, 6 * MiB - 70000)} {rnd.randrange(1, 70000)}"
           for _ in range(4)] + ["write -P 5 6100000 191152"]     # up to the last byte
    qemu_io(path, *ops)
    qemu_img("bitmap", "--merge", "b0", path, "b1")     # b1: disabled, with bits set
    return path


def twin(tmp_path, capsys, src, args, after=None, seed=None):
    code, q, m = resize_twin(tmp_path, capsys, src, args, after, seed)
    bitmaps = [info_json(x)["format-specific"]["data"].get("bitmaps") for x in (q, m)]
    assert bitmaps[0] == bitmaps[1], f"seed {seed} {args}"
    if code == 0:
        for name in BITMAPS:
            assert nbd_dirty(m, name) == nbd_dirty(q, name), f"seed {seed} {args} {name}"
    return code


@pytest.mark.parametrize("shape", ["c512", "c64k", "extl2", "rc1"])
def test_twin_resize_with_bitmaps(tmp_path, capsys, shape):
    seed = random.randrange(1 << 30)
    src = _with_bitmaps(tmp_path / "src.qcow2", shape, seed)
    # c512: the L1 table moves; the writes land in the new area and across the old end
    assert twin(tmp_path, capsys, src, ["+40M"], "write -P 9 6200000 3000000", seed) == 0
    assert twin(tmp_path, capsys, src, ["--shrink", "3000320"], "write -P 8 2990000 10320",
                seed) == 0
    assert twin(tmp_path, capsys, src, ["--preallocation=falloc", "7M"], None, seed) == 0


def test_twin_inconsistent_bitmap_refuses(tmp_path, capsys):
    src = tmp_path / "src.qcow2"
    create(src, 4 * MiB)
    qemu_img("bitmap", "--add", src, "b0")
    qemu_io(src, "write 0 64k")
    # set in_use in b0's directory entry, as a crash with the image open leaves it
    d = bytearray(src.read_bytes())
    p = struct.unpack(">I", d[100:104])[0]
    while True:
        t, n = struct.unpack(">II", d[p:p + 8])
        assert t != 0, "no bitmaps extension"
        if t == 0x23852875:
            doff = struct.unpack(">Q", d[p + 24:p + 32])[0]
            flags = struct.unpack(">I", d[doff + 12:doff + 16])[0]
            d[doff + 12:doff + 16] = struct.pack(">I", flags | 1)
            break
        p += 8 + -(-n // 8) * 8
    src.write_bytes(bytes(d))
    q, m = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    shutil.copyfile(src, q)
    shutil.copyfile(src, m)
    r = qemu_img("resize", q, "+1M", check=False)
    code, (out, err) = ours(capsys, ["resize", m, "+1M"])
    assert (code, out) == (r.returncode, r.stdout) and r.returncode == 1
    assert "inconsistent" in err and "inconsistent" in r.stderr
    assert m.read_bytes() == src.read_bytes() or info_json(m)["virtual-size"] == 4 * MiB
    with qcow2py.open(m) as img:
        assert img.size == 4 * MiB
