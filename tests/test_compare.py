"""``qcow2py compare`` against ``qemu-img compare``: same lines, same exit status."""

from __future__ import annotations

import random
import shutil

import pytest

import qcow2py
from qcow2py import cli
from lifecycle_shapes import SHAPES, SIZE, build, build_chain, build_compressed
from qemu import create, qemu_img, qemu_io

MiB = 1 << 20


def both(capsys, *args):
    """(exit, stdout) of qemu-img compare and of qcow2py compare with ``args``."""
    p = qemu_img("compare", *map(str, args), check=False)
    capsys.readouterr()
    try:
        code = cli.main(["compare", *map(str, args)])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return (p.returncode, p.stdout), (code, out)


def agree(capsys, *args):
    theirs, ours = both(capsys, *args)
    assert ours == theirs, f"compare {args}"
    return theirs


@pytest.mark.parametrize("shape", sorted(SHAPES) + ["compressed"])
def test_twin_shapes(tmp_path, capsys, shape):
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    a = tmp_path / "a.qcow2"
    if shape == "compressed":
        build_compressed(a, rnd)
    else:
        build(a, SHAPES[shape], rnd)
    raw = tmp_path / "a.raw"
    qemu_img("convert", "-O", "raw", a, raw)
    b = tmp_path / "b.qcow2"
    shutil.copyfile(a, b)
    try:
        assert agree(capsys, a, b)[0] == 0
        assert agree(capsys, "-F", "raw", a, raw)[0] == 0
        assert agree(capsys, "-s", "-F", "raw", a, raw)[0] == 1      # allocation differs
        off = rnd.randrange(SIZE - 700)
        qemu_io(b, f"write -P 0xee {off} {rnd.randrange(1, 700)}")
        assert agree(capsys, a, b)[0] == 1
        assert agree(capsys, "-q", b, a)[0] == 1
        assert agree(capsys, "-s", a, b)[0] == 1
        qemu_io(a, f"write -z {off // 512 * 512} 4096", f"write -P 3 {off // 512 * 512} 1")
        agree(capsys, "-s", a, b)
        agree(capsys, a, b)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}: {e}") from None


def test_twin_chain_against_flat(tmp_path, capsys):
    seed = random.randrange(1 << 30)
    top = build_chain(tmp_path, [], random.Random(seed))[0]
    flat = tmp_path / "flat.qcow2"
    qemu_img("convert", "-O", "qcow2", top, flat)
    assert agree(capsys, top, flat)[0] == 0, f"seed {seed}"
    agree(capsys, "-s", top, flat)
    qemu_io(top, "write -P 9 3M 1")
    assert agree(capsys, top, flat)[0] == 1, f"seed {seed}"


def test_twin_sizes_differ(tmp_path, capsys):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create(a, 4 * MiB)
    create(b, 6 * MiB)
    qemu_io(a, "write -P 1 1000 10")
    qemu_io(b, "write -P 1 1000 10")
    assert agree(capsys, a, b)[1].startswith("Warning: Image size mismatch!")
    assert agree(capsys, "-s", a, b)[0] == 1
    qemu_io(b, "write -z 5M 64k")
    assert agree(capsys, b, a)[0] == 0
    qemu_io(b, "write -P 7 5000000 1", "write -P 0 4194304 65536")
    assert agree(capsys, a, b)[0] == 1            # non-zero tail: offset of its sector
    qemu_io(a, "write -P 2 0 1")
    assert agree(capsys, a, b)[0] == 1            # common part first: no warning


def test_open_errors_exit_2(tmp_path, capsys):
    a = tmp_path / "a.qcow2"
    create(a, MiB)
    for args in ([a, tmp_path / "missing"], [tmp_path / "missing", a]):
        theirs, ours = both(capsys, *args)
        assert theirs[0] == ours[0] == 2


def test_api_result(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create(a, MiB)
    create(b, MiB)
    assert qcow2py.compare(a, b).identical
    qemu_io(b, "write -P 1 70000 1")
    with qcow2py.open(a) as ia:
        r = qcow2py.compare(ia, b)
    assert (r.identical, r.offset, r.reason) == (False, 69632, "content")
