"""Safe ``qcow2py rebase`` reads the old chain and the new backing file each in its
own host order (the comparison pieces come from both sides' block status), and
``rebase -c`` writes what it copies as compressed clusters.  Both against
``qemu-img rebase`` on a copy: ``qemu-img compare``-identical, the content what it
was before, ``qemu-img check`` clean.  (qemu-img 7.2 has no ``rebase -c``: its
result without ``-c`` is the content oracle.)"""

from __future__ import annotations

import json
import random

import pytest

import qcow2py
import qcow2py.jobs.rebase as rebase_job
from qcow2py.io.wrappers import TraceLog
from lifecycle_shapes import copy_chain, ours
from qemu import create, map_json, qemu_img, qemu_io

KiB, MiB = 1 << 10, 1 << 20
SIZE = 2 * MiB


def _shuffled(path, opts, rnd, pattern, backing=None, cwd=None, cs=64 * KiB):
    """An image whose clusters are written one by one in a random guest order, so
    that host order and guest order differ."""
    create(path, SIZE, *opts, backing=backing, cwd=cwd)
    clusters = list(range(SIZE // cs))
    rnd.shuffle(clusters)
    ops = [f"write -P {pattern + c % 7} {c * cs} {cs}" for c in clusters
           if rnd.random() < 0.8]
    ops += [f"write -z {rnd.randrange(SIZE // cs) * cs} {cs}" for _ in range(2)]
    qemu_io(path, *ops, cwd=cwd)


def _chain(d, rnd, opts=(), cs=64 * KiB):
    d.mkdir()
    _shuffled(d / "base.qcow2", opts, rnd, 1, cs=cs)
    _shuffled(d / "other.qcow2", opts, rnd, 40, cs=cs)
    create(d / "top.qcow2", SIZE, *opts, backing="base.qcow2", cwd=d)
    qemu_io(d / "top.qcow2", f"write -P 99 {3 * cs + 512} 1024", cwd=d)
    return [d / "top.qcow2", d / "base.qcow2"]


def _data_ranges(path):
    return [(e["offset"], e["offset"] + e["length"]) for e in map_json(path)
            if e.get("data") and e["depth"] == 0 and "offset" in e]


def _twin(tmp_path, capsys, chain, args, seed):
    src = chain[0].parent
    q = copy_chain(chain + [src / "other.qcow2"], tmp_path / "qemu")
    m = copy_chain(chain + [src / "other.qcow2"], tmp_path / "mine")
    before = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", q[0], before)
    p = qemu_img("rebase", *[a for a in args if a != "-c"], q[0], check=False)
    code, (out, err) = ours(capsys, ["rebase", *args, m[0]])
    assert (code, out) == (p.returncode, p.stdout) == (0, ""), f"seed {seed}: {err} {p.stderr}"
    assert qemu_img("compare", q[0], m[0], check=False).returncode == 0, f"seed {seed}"
    r = qemu_img("compare", "-F", "raw", m[0], before, check=False)
    assert r.returncode == 0, f"seed {seed}: content changed: {r.stdout}"
    qemu_img("check", m[0])
    return q[0], m[0]


@pytest.mark.parametrize("opts", [[], ["cluster_size=4k"], ["extended_l2=on"]])
def test_reads_in_host_order_of_both(tmp_path, capsys, monkeypatch, opts):
    seed = random.randrange(1 << 30)
    cs = 4 * KiB if opts == ["cluster_size=4k"] else 64 * KiB
    chain = _chain(tmp_path / "src", random.Random(seed), opts, cs)
    old_data = _data_ranges(chain[1])
    new_data = _data_ranges(chain[0].parent / "other.qcow2")
    # the shuffle makes guest order jump back in both files
    assert any(b[0] < a[0] for a, b in zip(old_data, old_data[1:])), f"seed {seed}"
    log = TraceLog()
    real_open = rebase_job.open_image

    def traced_open(path, *a, **kw):
        return real_open(path, *a, storage_wrapper=log.wrap, wrap_chain=True, **kw)

    compared = []          # the log's length when the (single) batch was compared
    real_write = rebase_job._write_runs

    def write_runs(*a):
        compared.append(len(log.entries))
        return real_write(*a)

    monkeypatch.setattr(rebase_job, "open_image", traced_open)
    monkeypatch.setattr(rebase_job, "_write_runs", write_runs)
    _twin(tmp_path, capsys, chain, ["-b", "other.qcow2", "-F", "qcow2"], seed)
    # the comparison's reads (the image's write path then reads what it keeps of
    # partial clusters, in guest order)
    assert len(compared) == 1, f"seed {seed}"
    reads = [(f, r.offset, r.length) for f, r, _t in log.entries[:compared[0]]
             if r.kind == "read"]
    for name, data in (("base.qcow2", old_data), ("other.qcow2", new_data)):
        offs = [o for f, o, n in reads if f.endswith("/" + name) and
                any(a <= o < b for a, b in data)]
        assert len(offs) > 4, f"seed {seed}: {name} was not read"
        assert offs == sorted(offs), f"seed {seed}: {name} read out of host order: {offs}"


@pytest.mark.parametrize("opts", [[], ["compat=0.10"], ["cluster_size=4k"]])
def test_rebase_compressed(tmp_path, capsys, opts):
    seed = random.randrange(1 << 30)
    cs = 4 * KiB if opts == ["cluster_size=4k"] else 64 * KiB
    chain = _chain(tmp_path / "src", random.Random(seed), opts, cs)
    q, m = _twin(tmp_path, capsys, chain, ["-c", "-b", "other.qcow2", "-F", "qcow2"], seed)
    cq = json.loads(qemu_img("check", "--output=json", q).stdout)
    cm = json.loads(qemu_img("check", "--output=json", m).stdout)
    assert cq.get("compressed-clusters", 0) == 0
    # every cluster rebase wrote is compressed (all-zero ones become zero clusters);
    # the top's own cluster stays as it was
    assert cm["compressed-clusters"] == cm["allocated-clusters"] - 1 > 0, f"seed {seed} {cm}"


def test_compress_refusals(tmp_path, capsys):
    create(tmp_path / "a.qcow2", MiB)
    create(tmp_path / "t.qcow2", MiB, backing="a.qcow2", cwd=tmp_path)
    code, (_, err) = ours(capsys, ["rebase", "-u", "-c", "-b", "", tmp_path / "t.qcow2"])
    assert code == 1 and "unsafe" in err
    create(tmp_path / "d.qcow2", MiB, f"data_file={tmp_path / 'd.raw'}")
    with pytest.raises(qcow2py.Qcow2Error, match="data file"):
        qcow2py.rebase(tmp_path / "d.qcow2", "", compress=True)
    qemu_img("check", tmp_path / "t.qcow2")


def test_multi_batch_onto_odd_raw(tmp_path, capsys):
    """More than one 4 MiB batch, and a raw new backing file that ends inside a sector."""
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    d = tmp_path / "src"
    d.mkdir()
    size = 9 * MiB
    create(d / "base.qcow2", size, "cluster_size=16k")
    qemu_io(d / "base.qcow2", *[f"write -P {rnd.randrange(1, 250)} {rnd.randrange(size - MiB)} "
                                f"{rnd.randrange(1, MiB)}" for _ in range(30)])
    create(d / "top.qcow2", size, "cluster_size=16k", backing="base.qcow2", cwd=d)
    qemu_io(d / "top.qcow2", "write -P 7 100000 300000", cwd=d)
    odd = bytearray(rnd.randbytes(5 * MiB + 100))
    qemu_img("convert", "-O", "raw", d / "base.qcow2", d / "other.qcow2")
    with open(d / "other.qcow2", "r+b") as f:        # raw, named like the others
        f.seek(2 * MiB)
        f.write(odd[:MiB])
        f.truncate(5 * MiB + 100)
    _twin(tmp_path, capsys, [d / "top.qcow2", d / "base.qcow2"],
          ["-b", "other.qcow2", "-F", "raw"], seed)
