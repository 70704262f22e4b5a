"""``qcow2py snapshot`` against ``qemu-img snapshot``: the same sequence of writes and
snapshot operations on copies of one image leaves images ``qemu-img compare``-
identical (active state and every snapshot, read with ``qemu-img convert -l``),
``qemu-img check`` clean, the same refusals; the snapshot table text of
``qcow2py info`` and ``snapshot -l`` byte-identical to qemu-img's."""

from __future__ import annotations

import random
import re
import shutil

import pytest

import qcow2py
from lifecycle_shapes import SHAPES, ours, random_ops
from qemu import create, qemu_img, qemu_io

SIZE = 2 << 20


DATE = re.compile(r" \d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def snap_both(capsys, q, m, args, seed, same_dates=False):
    """Both tools on their copy; the dates of snapshots created separately may differ
    by a second: unless ``same_dates``, the date column is compared in form only."""
    p = qemu_img("snapshot", *args, q, check=False)
    code, (out, err) = ours(capsys, ["snapshot", *args, m])
    theirs = p.stdout
    if not same_dates:
        assert len(DATE.findall(out)) == len(DATE.findall(theirs))
        out, theirs = DATE.sub(" DATE ", out), DATE.sub(" DATE ", theirs)
    assert (code, out) == (p.returncode, theirs), f"seed {seed} {args}: {err} / {p.stderr}"
    return code


def same_images(tmp_path, q, m, seed):
    qemu_img("check", m)
    r = qemu_img("compare", q, m, check=False)
    assert r.returncode == 0, f"seed {seed}: {r.stdout}"
    names = [line.split()[1] for line in
             qemu_img("snapshot", "-l", q).stdout.splitlines()[2:]]
    for name in set(names):
        for img, out in ((q, "q.raw"), (m, "m.raw")):
            qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", img, tmp_path / out)
        want = (tmp_path / "q.raw").read_bytes()
        assert want == (tmp_path / "m.raw").read_bytes(), f"seed {seed}: snapshot {name} differs"
        with qcow2py.open(m, snapshot=name) as view:       # qcow2py's own snapshot read
            assert view.read(0, view.size) == want, f"seed {seed}: open(snapshot={name!r})"


SNAP_SHAPES = {k: v for k, v in SHAPES.items() if k not in ("rc1", "c2M")}


@pytest.mark.parametrize("shape", sorted(SNAP_SHAPES) + ["compressed"])
def test_twin_sequence(tmp_path, capsys, shape):
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    q, m = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    if shape == "compressed":
        raw = tmp_path / "src.raw"
        create(raw, SIZE, fmt="raw")
        qemu_io(raw, *random_ops(rnd, SIZE, zero=False), fmt="raw")
        qemu_img("convert", "-c", "-O", "qcow2", raw, q)
    else:
        create(q, SIZE, *SNAP_SHAPES[shape])
    shutil.copyfile(q, m)
    names = []
    for step in range(6):
        ops = random_ops(rnd, SIZE, 4)
        qemu_io(q, *ops)
        qemu_io(m, *ops)
        kind = rnd.choice("ccad" if names else "c")
        if kind == "c":
            name = f"s{step}"
            names.append(name)
            snap_both(capsys, q, m, ["-c", name], seed)
        else:
            name = rnd.choice(names)
            snap_both(capsys, q, m, [f"-{kind}", name], seed)
            if kind == "d":
                names.remove(name)
        r = qemu_img("compare", q, m, check=False)
        assert r.returncode == 0, f"seed {seed} step {step}: {r.stdout}"
    same_images(tmp_path, q, m, seed)
    snap_both(capsys, q, m, ["-l"], seed)


def test_twin_refusals_and_info_text(tmp_path, capsys):
    q, m = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    create(q, SIZE)
    qemu_io(q, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "first", q)
    qemu_img("snapshot", "-c", "first", q)          # qemu-img allows a repeated name
    shutil.copyfile(q, m)
    assert qemu_img("info", q).stdout == ours(capsys, ["info", q])[1].out
    snap_both(capsys, q, m, ["-l"], 0, same_dates=True)
    for args in (["-a", "nope"], ["-d", "nope"]):
        assert snap_both(capsys, q, m, args, 0) == 1
    qemu_img("bitmap", "--add", q, "b")
    qemu_img("bitmap", "--add", m, "b")
    assert snap_both(capsys, q, m, ["-a", "first"], 0) == 1   # active dirty bitmaps
    n1, n2 = tmp_path / "n1.qcow2", tmp_path / "n2.qcow2"
    create(n1, SIZE, "refcount_bits=1")
    qemu_io(n1, "write 0 64k")
    shutil.copyfile(n1, n2)
    p = qemu_img("snapshot", "-c", "s", n1, check=False)
    code, _ = ours(capsys, ["snapshot", "-c", "s", n2])
    assert code == p.returncode == 1
    qemu_img("check", n2)                           # refused before anything changed


def test_copy_of_a_snapshot(tmp_path):
    """``qcow2py-copy -l snapshot.name=NAME`` as ``qemu-img convert -l``."""
    from qcow2py.cli.copy import main as copy_main
    src = tmp_path / "src.qcow2"
    create(src, SIZE)
    qemu_io(src, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "old", src)
    qemu_io(src, "write -P 2 64k 64k")
    qemu_img("convert", "-l", "snapshot.name=old", "-O", "raw", src, tmp_path / "q.raw")
    assert copy_main(["-l", "snapshot.name=old", "-O", "raw", str(src),
                      str(tmp_path / "m.raw")]) == 0
    assert (tmp_path / "q.raw").read_bytes() == (tmp_path / "m.raw").read_bytes()
    with pytest.raises(ValueError):
        qcow2py.open(src, "r+", snapshot="old")


def test_no_snapshots_list_is_empty(tmp_path, capsys):
    q = tmp_path / "q.qcow2"
    create(q, SIZE)
    assert ours(capsys, ["snapshot", "-l", q]) [1].out == qemu_img("snapshot", "-l", q).stdout
