"""Image shapes for the lifecycle twin tests (commit, rebase, compare, measure).

Each shape is built by qemu-img/qemu-io from a seed, so a failure names the
seed that reproduces it.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import List

from qemu import create, qemu_img, qemu_io

MiB = 1 << 20
SIZE = 6 * MiB

#: name -> qemu-img create -o options
SHAPES = {
    "c512": ["cluster_size=512"],
    "c64k": [],
    "c2M": ["cluster_size=2M"],
    "extl2": ["extended_l2=on", "cluster_size=128k"],
    "v2": ["compat=0.10"],
    "rc1": ["refcount_bits=1"],
}


def random_ops(rnd: random.Random, size: int, n: int = 12, zero: bool = True) -> List[str]:
    """qemu-io commands: patterned writes of any alignment, zero writes, discards."""
    ops = []
    for _ in range(n):
        length = rnd.choice([512, 4096, 65536, 300_000, 1 << 20, rnd.randrange(1, 200_000)])
        off = rnd.randrange(0, size - length)
        kind = rnd.random()
        if kind < 0.7 or not zero:
            ops.append(f"write -P {rnd.randrange(1, 255)} {off} {length}")
        elif kind < 0.85:
            ops.append(f"write -z {off // 512 * 512} {length // 512 * 512 or 512}")
        else:
            ops.append(f"discard {off // 512 * 512} {length // 512 * 512 or 512}")
    return ops


def build(path: Path, opts: List[str], rnd: random.Random, size: int = SIZE,
          backing: Path = None, n: int = 12) -> Path:
    create(path, size, *opts, backing=backing)
    qemu_io(path, *random_ops(rnd, size, n))
    return path


def build_compressed(path: Path, rnd: random.Random, size: int = SIZE) -> Path:
    """A qcow2 image whose data clusters are compressed (qemu-img convert -c)."""
    raw = path.with_suffix(".src.raw")
    create(raw, size, fmt="raw")
    qemu_io(raw, *random_ops(rnd, size, zero=False), fmt="raw")
    qemu_img("convert", "-c", "-O", "qcow2", raw, path)
    raw.unlink()
    return path


def build_chain(d: Path, opts: List[str], rnd: random.Random, depth: int = 3,
                size: int = SIZE) -> List[Path]:
    """base <- mid <- top (relative backing names), each with its own writes; top first."""
    paths: List[Path] = []
    below = None
    for i in range(depth):
        p = d / f"layer{i}.qcow2"
        create(p, size, *opts, backing=below.name if below else None, cwd=d)
        qemu_io(p, *random_ops(rnd, size), cwd=d)
        paths.append(p)
        below = p
    return paths[::-1]


def copy_chain(paths: List[Path], dest: Path) -> List[Path]:
    """Copy a chain (relative backing names) into ``dest``; same order."""
    dest.mkdir(exist_ok=True)
    out = []
    for p in paths:
        q = dest / p.name
        shutil.copyfile(p, q)
        out.append(q)
    return out


def ours(capsys, args):
    """(exit status, captured (out, err)) of ``qcow2py ARGS`` run in-process."""
    from qcow2py import cli
    capsys.readouterr()
    try:
        code = cli.main(list(map(str, args)))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def resize_twin(tmp_path, capsys, src, args, after=None, seed=None):
    """``qemu-img resize ARGS`` and ``qcow2py resize ARGS`` on two copies of ``src``:
    the same exit status and stdout, then (after the qemu-io command ``after`` on
    both) ``qemu-img compare``-identical and ours ``qemu-img check`` clean.
    Returns (exit status, qemu's copy, ours)."""
    q, m = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    shutil.copyfile(src, q)
    shutil.copyfile(src, m)
    p = qemu_img("resize", *args[:-1], q, *args[-1:], check=False)
    code, (out, err) = ours(capsys, ["resize", *args[:-1], m, *args[-1:]])
    assert (code, out) == (p.returncode, p.stdout), f"seed {seed} {args}: {err} / {p.stderr}"
    if after:
        qemu_io(q, after)
        qemu_io(m, after)
    r = qemu_img("compare", q, m, check=False)
    assert r.returncode == 0, f"seed {seed} {args}: {r.stdout}"
    qemu_img("check", m)
    return p.returncode, q, m
