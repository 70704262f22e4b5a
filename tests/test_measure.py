"""``qcow2py measure`` against ``qemu-img measure``: the same numbers and text for
new images of many sizes and options, and for sources of every shape."""

from __future__ import annotations

import random

import pytest

import qcow2py
from qcow2py import cli
from lifecycle_shapes import SHAPES, build, build_chain, build_compressed
from qemu import create, qemu_img, qemu_io


def agree(capsys, *args):
    p = qemu_img("measure", *map(str, args), check=False)
    capsys.readouterr()
    try:
        code = cli.main(["measure", *map(str, args)])
    except SystemExit as e:
        code = e.code
    out, _ = capsys.readouterr()
    assert (code, out) == (p.returncode, p.stdout), f"measure {args}: {p.stderr}"
    return p


OPTIONS = ["", "cluster_size=512", "cluster_size=2M", "cluster_size=4k,refcount_bits=1",
           "refcount_bits=64", "extended_l2=on", "extended_l2=on,cluster_size=1M",
           "compat=0.10", "preallocation=full", "preallocation=metadata"]


@pytest.mark.parametrize("opts", OPTIONS)
def test_twin_sizes(capsys, opts):
    o = ["-o", opts] if opts else []
    for size in ["0", "1000", "1M", "1049088", "1G", "3T", "100T"]:
        agree(capsys, "--output=json", "-O", "qcow2", *o, "--size", size)
    agree(capsys, "-O", "qcow2", *o, "--size", "5G")


@pytest.mark.parametrize("shape", sorted(SHAPES) + ["compressed", "chain"])
def test_twin_sources(tmp_path, capsys, shape):
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    src = tmp_path / "src.qcow2"
    if shape == "compressed":
        build_compressed(src, rnd)
    elif shape == "chain":
        src = build_chain(tmp_path, [], rnd)[0]
    else:
        build(src, SHAPES[shape], rnd, size=rnd.choice([6 << 20, (6 << 20) + 4096 + 512]))
    for opts in ("", "cluster_size=512", "cluster_size=2M", "extended_l2=on,cluster_size=128k",
                 "compat=0.10", "refcount_bits=1"):
        o = ["-o", opts] if opts else []
        agree(capsys, "-O", "qcow2", *o, src)
    agree(capsys, "--output=json", "-O", "qcow2", src)
    agree(capsys, "--output=json", "-O", "raw", src)
    raw = tmp_path / "src.raw"
    qemu_img("convert", "-O", "raw", src, raw)
    agree(capsys, "-O", "qcow2", "-f", "raw", raw)


def test_twin_bitmaps(tmp_path, capsys):
    src = tmp_path / "src.qcow2"
    create(src, 100 << 20)
    qemu_io(src, "write -P 1 0 3M")
    qemu_img("bitmap", "--add", "-g", "512", src, "fine")
    qemu_img("bitmap", "--add", src, "a-rather-long-bitmap-name-for-the-directory")
    for opts in ("", "cluster_size=512", "cluster_size=2M"):
        agree(capsys, "-O", "qcow2", *(["-o", opts] if opts else []), src)
    agree(capsys, "--output=json", "-O", "qcow2", src)


def test_refusals(tmp_path, capsys):
    src = tmp_path / "src.qcow2"
    create(src, 1 << 20)
    for args in (["-O", "qcow2"], ["--size", "1M", src]):
        p = agree(capsys, *args)
        assert p.returncode == 1


def test_api():
    r = qcow2py.measure(1 << 30, cluster_size=65536)
    assert (r.required, r.fully_allocated) == (393216, 1074135040)
