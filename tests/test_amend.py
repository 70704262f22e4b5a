"""``qcow2py amend`` against ``qemu-img amend`` on copies of one image: the same
exit status, the same resulting options (``qemu-img info``), ``qemu-img
compare``-identical content, ``qemu-img check`` clean."""

from __future__ import annotations

import random
import shutil

import pytest

from lifecycle_shapes import build, ours
from qemu import create, info_json, qemu_img, qemu_io


def spec(path):
    d = info_json(path)["format-specific"]["data"]
    return {k: d.get(k) for k in ("compat", "lazy-refcounts", "refcount-bits")}


@pytest.mark.parametrize("start,opts,backed", [
    ([], "compat=0.10", False),                  # zero clusters become unallocated
    ([], "compat=0.10", True),                   # ... or written zeros over a backing file
    (["compat=0.10"], "compat=1.1,lazy_refcounts=on,refcount_bits=64", True),
    (["lazy_refcounts=on"], "lazy_refcounts=off", False),
    ([], "refcount_bits=1", True),
    (["cluster_size=4k"], "refcount_bits=2", False),
    (["refcount_bits=64"], "refcount_bits=16", False),
    ([], "refcount_bits=3", False),              # refused
    (["compat=0.10"], "lazy_refcounts=on", False),     # refused
    (["compat=0.10"], "refcount_bits=8", False),       # refused
    (["extended_l2=on"], "compat=0.10", False),  # refused: incompatible feature
    ([], "cluster_size=4k", False),              # refused: creation only
])
def test_twin_amend(tmp_path, capsys, start, opts, backed):
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    d = tmp_path / "src"
    d.mkdir()
    backing = None
    if backed:
        build(d / "base.qcow2", [], rnd)
        backing = "base.qcow2"
    create(d / "img.qcow2", 6 << 20, *start, backing=backing, cwd=d)
    qemu_io(d / "img.qcow2", "write -P 1 0 1M", "write -z 512k 256k", "write -z 3M 1M",
            "discard 5M 64k", cwd=d)
    results = []
    for who in ("q", "m"):
        shutil.copytree(d, tmp_path / who)
        img = tmp_path / who / "img.qcow2"
        if who == "q":
            p = qemu_img("amend", "-o", opts, img, check=False)
            results.append((p.returncode, p.stdout))
        else:
            code, (out, err) = ours(capsys, ["amend", "-o", opts, img])
            results.append((code, out))
    assert results[0] == results[1], f"seed {seed}: {err}"
    q, m = tmp_path / "q" / "img.qcow2", tmp_path / "m" / "img.qcow2"
    assert spec(q) == spec(m), f"seed {seed}"
    r = qemu_img("compare", q, m, check=False)
    assert r.returncode == 0, f"seed {seed}: {r.stdout}"
    qemu_img("check", m)


def test_amend_open_image_stays_usable(tmp_path):
    """img.amend() on an image opened "r+": later writes follow the new options."""
    import qcow2py
    path = tmp_path / "img.qcow2"
    create(path, 4 << 20)
    with qcow2py.open(path, "r+") as img:
        img.write(0, b"\x01" * 70000)
        img.amend(lazy_refcounts=True, refcount_bits=8)
        img.write(1 << 20, b"\x02" * 70000)
        img.amend(lazy_refcounts=False)
        img.write(2 << 20, b"\x03" * 70000)
    assert spec(path) == {"compat": "1.1", "lazy-refcounts": False, "refcount-bits": 8}
    qemu_img("check", path)
    with qcow2py.open(path) as img:
        assert img.read(69999, 1) + img.read((1 << 20) + 69999, 1) + \
            img.read((2 << 20) + 69999, 1) == b"\x01\x02\x03"
