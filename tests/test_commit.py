"""``qcow2py commit`` against ``qemu-img commit`` on copies of the same chain:
every layer ``qemu-img compare``-identical afterwards, ``qemu-img check`` clean,
the same stdout and exit status."""

from __future__ import annotations

import random

import pytest

import qcow2py
from lifecycle_shapes import SHAPES, build_chain, copy_chain, ours
from qemu import create, qemu_img, qemu_io


def twin(tmp_path, capsys, opts, args_of, seed):
    """Run the same commit with both tools on two copies of a 3-deep chain."""
    chain = build_chain(tmp_path / "src" if (tmp_path / "src").mkdir() is None else None,
                        opts, random.Random(seed))
    q, m = copy_chain(chain, tmp_path / "qemu"), copy_chain(chain, tmp_path / "mine")
    p = qemu_img("commit", *args_of(q), check=False)
    code, (out, err) = ours(capsys, ["commit", *args_of(m)])
    if "-p" in args_of(q):      # qemu-img's progress lines depend on timing
        assert out.endswith("(100.00/100%)\r\nImage committed.\n"), f"seed {seed}"
        out, p.stdout = out.splitlines()[-1], p.stdout.splitlines()[-1]
    assert (code, out) == (p.returncode, p.stdout), f"seed {seed}: {err}"
    for a, b in zip(q, m):
        r = qemu_img("compare", a, b, check=False)
        assert r.returncode == 0, f"seed {seed}: {a.name}: {r.stdout}"
        qemu_img("check", b)
    return q, m


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_twin_commit_top(tmp_path, capsys, shape):
    seed = random.randrange(1 << 30)
    q, m = twin(tmp_path, capsys, SHAPES[shape], lambda c: [c[0]], seed)
    # the emptied overlay has nothing left of its own
    with qcow2py.open(m[0]) as img:
        assert not any(r.allocated for r in img.layer_runs(0, img.size)), f"seed {seed}"


@pytest.mark.parametrize("args", [["-d"], ["-b", "layer0.qcow2"], ["-p"], ["-q"]])
def test_twin_commit_options(tmp_path, capsys, args):
    seed = random.randrange(1 << 30)
    twin(tmp_path, capsys, [], lambda c: [*[str(c[0].parent / a) if a.endswith(".qcow2")
                                             else a for a in args], c[0]], seed)


def test_twin_commit_into_raw_and_smaller_base(tmp_path, capsys):
    for d in ("qemu", "mine"):
        (tmp_path / d).mkdir()
        create(tmp_path / d / "base.raw", 1 << 20, fmt="raw")
        qemu_io(tmp_path / d / "base.raw", "write -P 5 0 1M", fmt="raw")
        create(tmp_path / d / "top.qcow2", 2 << 20, backing="base.raw", backing_fmt="raw",
               cwd=tmp_path / d)
        qemu_io(tmp_path / d / "top.qcow2", "write -P 6 1000 200000", "write -P 7 1500000 9")
    p = qemu_img("commit", tmp_path / "qemu" / "top.qcow2", check=False)
    code, (out, _) = ours(capsys, ["commit", tmp_path / "mine" / "top.qcow2"])
    assert (code, out) == (p.returncode, p.stdout)
    r = qemu_img("compare", "-f", "raw", "-F", "raw", tmp_path / "qemu" / "base.raw",
                 tmp_path / "mine" / "base.raw", check=False)
    assert r.returncode == 0, r.stdout


def test_refusals(tmp_path, capsys):
    create(tmp_path / "a.qcow2", 1 << 20)
    create(tmp_path / "b.qcow2", 1 << 20, backing="a.qcow2", cwd=tmp_path)
    create(tmp_path / "other.qcow2", 1 << 20)
    for args in ([tmp_path / "a.qcow2"], ["-b", tmp_path / "other.qcow2", tmp_path / "b.qcow2"],
                 [tmp_path / "missing.qcow2"]):
        p = qemu_img("commit", *args, check=False)
        code, (out, err) = ours(capsys, ["commit", *args])
        assert code == p.returncode == 1
        assert err.strip().split(": ")[-1] in p.stderr.strip().split(": ")[-1] or \
            p.stderr.split(": ", 1)[1].strip() in err


def test_api_progress_and_stats(tmp_path):
    create(tmp_path / "a.qcow2", 4 << 20)
    create(tmp_path / "b.qcow2", 4 << 20, backing="a.qcow2", cwd=tmp_path)
    qemu_io(tmp_path / "b.qcow2", "write -P 1 0 1M", "write -z 2M 1M")
    seen = []
    st = qcow2py.commit(tmp_path / "b.qcow2", progress=lambda d, t: seen.append((d, t)))
    assert (st.bytes_copied, st.bytes_zeroed) == (1 << 20, 1 << 20)
    assert seen[0] == (0, 2 << 20) and seen[-1] == (2 << 20, 2 << 20)
    with qcow2py.open(tmp_path / "a.qcow2") as a:
        assert a.read(0, 4) == b"\x01" * 4
