"""``qcow2py rebase`` against ``qemu-img rebase`` on copies of the same chain: the
image ``qemu-img compare``-identical afterwards (and to what it read before, in
safe mode), ``qemu-img check`` clean, the same header, stdout and exit status."""

from __future__ import annotations

import random

import pytest

import qcow2py
from lifecycle_shapes import SHAPES, SIZE, build, build_chain, copy_chain, ours
from qemu import create, info_json, qemu_img, qemu_io


def twin(tmp_path, capsys, chain, args, seed, same_content=True):
    q, m = copy_chain(chain, tmp_path / "qemu"), copy_chain(chain, tmp_path / "mine")
    for extra in ("other.qcow2",):
        if (tmp_path / "src" / extra).exists():
            copy_chain([tmp_path / "src" / extra], tmp_path / "qemu")
            copy_chain([tmp_path / "src" / extra], tmp_path / "mine")
    before = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", q[0], before)
    p = qemu_img("rebase", *args, q[0], check=False)
    code, (out, err) = ours(capsys, ["rebase", *args, m[0]])
    if "-p" in args:      # qemu-img's progress lines depend on timing
        assert out.endswith("(100.00/100%)\r\n"), f"seed {seed}"
        out, p.stdout = "", ""
    assert (code, out) == (p.returncode, p.stdout), f"seed {seed}: {err} / {p.stderr}"
    iq, im = info_json(q[0]), info_json(m[0])
    for k in ("backing-filename", "backing-filename-format"):
        assert iq.get(k) == im.get(k), f"seed {seed}: {k}"
    r = qemu_img("compare", q[0], m[0], check=False)
    assert r.returncode == 0, f"seed {seed}: {r.stdout}"
    if same_content:
        r = qemu_img("compare", "-F", "raw", m[0], before, check=False)
        assert r.returncode == 0, f"seed {seed}: content changed: {r.stdout}"
    qemu_img("check", m[0])


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_twin_rebase_onto_other(tmp_path, capsys, shape):
    """Safe rebase of the top of a 3-deep chain onto an unrelated image."""
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    src = tmp_path / "src"
    src.mkdir()
    chain = build_chain(src, SHAPES[shape], rnd)
    build(src / "other.qcow2", SHAPES[shape], rnd, size=SIZE - (1 << 20))   # shorter
    twin(tmp_path, capsys, chain, ["-b", "other.qcow2", "-F", "qcow2"], seed)


@pytest.mark.parametrize("args,same", [
    (["-b", "layer0.qcow2", "-F", "qcow2"], True),      # skip the middle layer
    (["-b", "", "-F", "qcow2"], True),                  # flatten
    (["-u", "-b", "layer0.qcow2", "-F", "qcow2"], False),
    (["-u", "-b", ""], False),
    (["-p", "-b", "layer0.qcow2", "-F", "qcow2"], True),
    (["-b", "layer0.qcow2"], True),                     # refused: no backing format
    (["layer0.qcow2"], True),                           # refused: no -b
])
def test_twin_rebase_options(tmp_path, capsys, args, same):
    seed = random.randrange(1 << 30)
    src = tmp_path / "src"
    src.mkdir()
    chain = build_chain(src, ["cluster_size=4096"], random.Random(seed))
    if args == ["layer0.qcow2"]:
        args = []
    twin(tmp_path, capsys, chain, args, seed, same_content=same)


def test_unsafe_with_missing_backing(tmp_path, capsys):
    create(tmp_path / "a.qcow2", 1 << 20)
    create(tmp_path / "t.qcow2", 1 << 20, backing="a.qcow2", cwd=tmp_path)
    (tmp_path / "a.qcow2").rename(tmp_path / "moved.qcow2")
    code, _ = ours(capsys, ["rebase", "-u", "-b", "moved.qcow2", "-F", "qcow2",
                            tmp_path / "t.qcow2"])
    assert code == 0
    assert info_json(tmp_path / "t.qcow2")["backing-filename"] == "moved.qcow2"
    qemu_img("check", tmp_path / "t.qcow2")


def test_api_stats(tmp_path):
    create(tmp_path / "a.qcow2", 1 << 20)
    qemu_io(tmp_path / "a.qcow2", "write -P 3 0 128k")
    create(tmp_path / "t.qcow2", 1 << 20, backing="a.qcow2", cwd=tmp_path)
    qemu_io(tmp_path / "t.qcow2", "write -P 4 0 512")
    st = qcow2py.rebase(tmp_path / "t.qcow2", "")
    assert st.bytes_written == 65536          # cluster 0 is the overlay's own (COW)
    with qcow2py.open(tmp_path / "t.qcow2") as t:
        assert t.backing is None and t.read(0, 513) == b"\x04" * 512 + b"\x03"
        assert t.read(65535, 65538) == b"\x03" * 65537 + b"\x00"
