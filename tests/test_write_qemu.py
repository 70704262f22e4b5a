"""The writer against QEMU: the same random operations applied by qcow2py and by
qemu-io to twin images must give the same guest content and clean images.

For each writable ``create`` option combination (and for images QEMU built:
backing chains, internal snapshots, compressed clusters) a seeded sequence of
``write -P``, ``write -z``, ``write -z -u`` and ``discard`` requests (byte,
sector and cluster granular; some span several L2 tables) is applied

* by qcow2py (``img.write`` / ``write_zeroes`` / ``discard``) to one image, and
* by a single ``qemu-io`` process (all commands of the sequence) to its twin,

and then

* ``qemu-img check`` of ours is clean (exit 0), and ``qcow2py.check`` reports
  exactly what ``qemu-img check --output=json`` reports, for both images;
* ``qemu-img compare`` finds the two images identical;
* qcow2py reads qemu-io's twin exactly as ``qemu-img convert -O raw`` does,
  and both equal a byte model of the sequence (the model names the operation
  that last touched the first differing byte, to make failures readable).

Also: ``qcow2py.create`` writes the very bytes ``qemu-img create`` writes
(preallocation off and metadata), and refuses what it refuses, with its
message, as :class:`qcow2py.CreateError`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

import qcow2py
from qcow2py.qcow2.check import check_image
from qcow2py.qcow2.overlap import Kind
from qemu import create as qemu_create, need, qemu_img, run

KiB = 1 << 10
MiB = 1 << 20

Op = Tuple[str, int, int, int]           # (kind, offset, length, pattern)


# ---------------------------------------------------------------- operations
def make_ops(rnd: random.Random, size: int, cs: int, n: int) -> List[Op]:
    """``n`` requests: cluster-aligned, sector-aligned and byte-granular ones, a few
    long ones crossing L2 tables.  Kinds: write ~50%, zeroes 20%, zeroes+unmap 10%,
    discard 15%, plus reads (checked against the model, qcow2py only) and flushes
    (so freed clusters get reused within the sequence)."""
    unit = min(cs, 256 * KiB)
    ops: List[Op] = []
    for _ in range(n):
        kind = rnd.choices(("w", "z", "zu", "d", "r", "f"), weights=(50, 20, 10, 15, 6, 3))[0]
        shape = rnd.random()
        if shape < 0.3:                                   # whole clusters
            off = rnd.randrange(size // cs) * cs
            length = cs * rnd.randint(1, 3 if cs < MiB else 1)
        elif shape < 0.6:                                 # sectors
            off = rnd.randrange(size // 512) * 512
            length = 512 * rnd.randint(1, max(1, 3 * unit // 512))
        elif shape < 0.95:                                # bytes
            off = rnd.randrange(size)
            length = rnd.randint(1, 2 * unit + 1000)
        else:                                             # long: several L2 tables
            off = rnd.randrange(size // 2)
            length = rnd.randint(1, min(4 * MiB, size // 2))
        length = min(length, size - off)
        ops.append((kind, off, length, rnd.randrange(1, 256)))
    return ops


def qemu_io_commands(ops: List[Op]) -> List[str]:
    cmds = []
    for kind, off, n, pat in ops:
        if kind == "w":
            cmds.append(f"write -q -P {pat} {off} {n}")
        elif kind == "z":
            cmds.append(f"write -q -z {off} {n}")
        elif kind == "zu":
            cmds.append(f"write -q -z -u {off} {n}")
        elif kind == "d":
            cmds.append(f"discard -q {off} {n}")
        elif kind == "f":
            cmds.append("flush")
    return cmds


def apply_ours(img, ops: List[Op], model: Optional[bytearray] = None,
               discard_works: bool = True) -> None:
    """Apply ``ops`` with qcow2py; with ``model``, keep it in step and check reads."""
    cs = img.cluster_size
    for i, (kind, off, n, pat) in enumerate(ops):
        if kind == "w":
            img.write(off, bytes([pat]) * n)
        elif kind == "z":
            img.write_zeroes(off, n)
        elif kind == "zu":
            img.write_zeroes(off, n, unmap=True)
        elif kind == "d":
            img.discard(off, n)
        elif kind == "f":
            img.flush()
        elif kind == "r" and model is not None:
            got = img.read(off, n)
            if got != model[off:off + n]:
                pytest.fail(explain(got, bytes(model[off:off + n]), ops[:i], f"read at op {i}",
                                    base=off))
        if model is not None:
            apply_model(model, [ops[i]], cs, discard_works)


def apply_model(model: bytearray, ops: List[Op], cs: int, discard_works: bool) -> None:
    """What the guest sees after ``ops``."""
    size = len(model)
    for kind, off, n, pat in ops:
        if kind == "w":
            model[off:off + n] = bytes([pat]) * n
        elif kind in ("z", "zu"):
            model[off:off + n] = bytes(n)
        elif kind == "d" and discard_works:
            # whole clusters only; the last, partial cluster of the image counts
            first = -(-off // cs)
            end = off + n
            last = end // cs if end != size else -(-end // cs)
            if last > first:
                a, b = first * cs, min(last * cs, size)
                model[a:b] = bytes(b - a)


def explain(got: bytes, want: bytes, ops: List[Op], what: str, base: int = 0) -> str:
    """Where two contents differ first, and the last operations that touched it."""
    if len(got) != len(want):
        return f"{what}: {len(got)} bytes, want {len(want)}"
    i = next(i for i in range(len(want)) if got[i] != want[i])
    pos = base + i
    last = [(j, op) for j, op in enumerate(ops)
            if op[0] not in "rf" and op[1] <= pos < op[1] + op[2]]
    return (f"{what}: first difference at byte {pos} (got {got[i]:#x}, want {want[i]:#x}); "
            f"last ops touching it: {last[-3:]}")


# ---------------------------------------------------------------- oracles
def qemu_check_json(path: Path) -> Tuple[dict, int]:
    # from the image's folder: QEMU 7.2 opens a relative data file name against the cwd
    p = qemu_img("check", "--output=json", path.name, cwd=path.parent, check=False)
    return json.loads(p.stdout), p.returncode


def assert_checks_agree(path: Path) -> int:
    want, code = qemu_check_json(path)
    with qcow2py.open(str(path)) as img:
        r = check_image(img)
    want["filename"] = str(path)
    assert r.to_json_dict() == want, (path.name, r.to_json_dict(), want, r.messages[:10])
    assert r.exit_code == code
    return code


def raw_of(path: Path, tmp: Path) -> bytes:
    out = tmp / (path.name + ".ref.raw")
    qemu_img("convert", "-O", "raw", path.name, str(out), cwd=path.parent)
    data = out.read_bytes()
    out.unlink()
    return data


def read_all(path: Path) -> bytes:
    with qcow2py.open(str(path)) as img:
        return img.read(0, img.size)


def run_qemu_io(path: Path, cmds: List[str]) -> None:
    need("qemu-io")
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    p = run(args + [path.name], cwd=str(path.parent))
    bad = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert not bad, f"qemu-io: {bad[:5]}"


# ---------------------------------------------------------------- scenarios
def _opts(kw: dict) -> List[str]:
    out = []
    for k, v in kw.items():
        if isinstance(v, bool):
            v = "on" if v else "off"
        out.append(f"{k}={v}")
    return out


def fill(path: Path, size: int, seed: int, step: int = 192 * KiB) -> None:
    """Give an image QEMU-written content: patterns, zero ranges, odd-sized pieces."""
    rnd = random.Random(seed)
    cmds = []
    for off in range(0, size - step, step):
        r = rnd.random()
        if r < 0.7:
            cmds.append(f"write -q -P {rnd.randrange(1, 256)} {off + rnd.randrange(0, 4096)} "
                        f"{rnd.randrange(1, step)}")
        elif r < 0.8:
            cmds.append(f"write -q -z {off} {step}")
    run_qemu_io(path, cmds)


class Twins:
    """Ours and the twin, the content they start with, and how to open ours."""

    def __init__(self, d: Path, ours: Path, twin: Path, initial: bytes, cs: int,
                 image=None):
        self.d, self.ours, self.twin, self.initial, self.cs = d, ours, twin, initial, cs
        self.image = image            # ours already open (from qcow2py.create), or None

    def open_ours(self):
        return self.image if self.image is not None else qcow2py.open(str(self.ours), "r+")


def fresh(d: Path, size: int, **kw) -> Twins:
    """qcow2py.create for ours, qemu-img create for the twin (each with its own
    external data file when ``data_file`` is given)."""
    ours, twin = d / "ours.qcow2", d / "twin.qcow2"
    okw, tkw = dict(kw), dict(kw)
    if "data_file" in kw:
        okw["data_file"], tkw["data_file"] = "ours.data", "twin.data"
    img = qcow2py.create(str(ours), size, **okw)
    qemu_create(twin, size, *_opts(tkw), cwd=d)
    return Twins(d, ours, twin, bytes(img.size), img.cluster_size, img)


def over_backing(d: Path, size: int, fmt: str, base_size: int, compat: str = "1.1",
                 **kw) -> Twins:
    """Both overlays over one backing file (qcow2 or raw, maybe shorter) QEMU filled."""
    base = d / f"base.{fmt}"
    qemu_create(base, base_size, *(["compat=" + compat] if fmt == "qcow2" else []), fmt=fmt)
    if fmt == "qcow2":
        fill(base, base_size, seed=base_size)
    else:
        rnd = random.Random(5)
        with open(base, "r+b") as f:
            for off in range(0, base_size, 64 * KiB):
                f.seek(off)
                f.write(bytes([rnd.randrange(256)]) * min(40 * KiB, base_size - off))
    initial = (raw_of(base, d) + bytes(size))[:size]
    ours, twin = d / "ours.qcow2", d / "twin.qcow2"
    img = qcow2py.create(str(ours), size, backing_file=base.name, backing_format=fmt,
                         compat=compat, **kw)
    qemu_create(twin, size, "compat=" + compat, *_opts(kw), backing=base.name,
                backing_fmt=fmt, cwd=d)
    return Twins(d, ours, twin, initial, img.cluster_size, img)


def copied(d: Path, src: Path) -> Twins:
    ours, twin = d / "ours.qcow2", d / "twin.qcow2"
    shutil.copyfile(src, ours)
    shutil.copyfile(src, twin)
    with qcow2py.open(str(src)) as img:
        cs = img.cluster_size
    return Twins(d, ours, twin, raw_of(src, d), cs)


def with_snapshots(d: Path, size: int, *opts: str, compress: bool = False) -> Twins:
    src = d / "src.qcow2"
    qemu_create(src, size, *opts)
    fill(src, size, seed=1)
    if compress:                      # snapshots sharing compressed clusters too
        plain = d / "plain.qcow2"
        src.rename(plain)
        qemu_img("convert", "-c", "-O", "qcow2", "-o", ",".join(opts) or "compat=1.1",
                 str(plain), str(src))
    qemu_img("snapshot", "-c", "s1", str(src))
    fill(src, size // 2, seed=2, step=320 * KiB)
    qemu_img("snapshot", "-c", "s2", str(src))
    run_qemu_io(src, ["write -q -P 77 1M 300k", "write -q -z 2M 128k", "discard -q 3M 1M"])
    t = copied(d, src)
    # what s1 holds, to check `qemu-img snapshot -a` restores it on both images
    probe = d / "probe.qcow2"
    shutil.copyfile(src, probe)
    qemu_img("snapshot", "-a", "s1", str(probe))
    t.snapshot_content = raw_of(probe, d)
    probe.unlink()
    return t


def resized(d: Path, size: int, new_size: int, *opts: str) -> Twins:
    """An image QEMU filled and then grew (a longer L1 table, a tail never written)."""
    src = d / "src.qcow2"
    qemu_create(src, size, *opts)
    fill(src, size, seed=4)
    qemu_img("resize", str(src), str(new_size))
    return copied(d, src)


def compressed_overlay(d: Path, size: int) -> Twins:
    """Compressed clusters in an overlay whose backing file has data too."""
    base = d / "base.qcow2"
    qemu_create(base, size)
    fill(base, size, seed=5)
    plain = d / "plain.qcow2"
    qemu_create(plain, size, backing=base.name, backing_fmt="qcow2", cwd=d)
    fill(plain, size // 2, seed=6, step=256 * KiB)
    comp = d / "comp.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-B", base.name, "-F", "qcow2", plain.name,
             comp.name, cwd=d)
    return copied(d, comp)


def compressed(d: Path, size: int, compression_type: str = "zlib") -> Twins:
    src = d / "plain.qcow2"
    qemu_create(src, size)
    fill(src, size, seed=3)
    comp = d / "comp.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression_type}",
             str(src), str(comp))
    return copied(d, comp)


# name -> (builder(tmp_path) -> Twins, number of operations)
SCENARIOS: Dict[str, Tuple[Callable[[Path], Twins], int]] = {
    "v3-64k": (lambda d: fresh(d, 16 * MiB), 300),
    "v2-compat010": (lambda d: fresh(d, 16 * MiB, compat="0.10"), 300),
    "cluster-512": (lambda d: fresh(d, 4 * MiB, cluster_size=512), 300),
    "cluster-4k": (lambda d: fresh(d, 8 * MiB, cluster_size=4096), 300),
    "cluster-2M": (lambda d: fresh(d, 16 * MiB, cluster_size=2 * MiB), 80),
    "v2-cluster-512": (lambda d: fresh(d, 4 * MiB, compat="0.10", cluster_size=512), 200),
    "refcount-1-c512": (lambda d: fresh(d, 4 * MiB, cluster_size=512, refcount_bits=1), 200),
    "refcount-2-c4k": (lambda d: fresh(d, 8 * MiB, cluster_size=4096, refcount_bits=2), 200),
    "refcount-4": (lambda d: fresh(d, 16 * MiB, refcount_bits=4), 200),
    "refcount-8-c512": (lambda d: fresh(d, 4 * MiB, cluster_size=512, refcount_bits=8), 200),
    "refcount-32": (lambda d: fresh(d, 16 * MiB, refcount_bits=32), 200),
    # 64-bit refcounts with 512-byte clusters: the refcount table has to grow
    "refcount-64-c512": (lambda d: fresh(d, 4 * MiB, cluster_size=512, refcount_bits=64),
                         250),
    "refcount-64-c4k": (lambda d: fresh(d, 8 * MiB, cluster_size=4096, refcount_bits=64), 200),
    "lazy-refcounts": (lambda d: fresh(d, 16 * MiB, lazy_refcounts=True), 250),
    "zstd": (lambda d: fresh(d, 16 * MiB, compression_type="zstd"), 150),
    "prealloc-metadata": (lambda d: fresh(d, 16 * MiB, preallocation="metadata"), 250),
    "prealloc-metadata-c4k": (lambda d: fresh(d, 8 * MiB, cluster_size=4096,
                                              preallocation="metadata"), 200),
    "prealloc-falloc": (lambda d: fresh(d, 16 * MiB, preallocation="falloc"), 200),
    "prealloc-full": (lambda d: fresh(d, 8 * MiB, preallocation="full"), 200),
    "v2-prealloc-metadata": (lambda d: fresh(d, 8 * MiB, compat="0.10",
                                             preallocation="metadata"), 200),
    "unaligned-size": (lambda d: fresh(d, 5 * MiB + 1536), 250),
    "extended-l2": (lambda d: fresh(d, 16 * MiB, extended_l2=True), 250),
    "extended-l2-c16k": (lambda d: fresh(d, 8 * MiB, extended_l2=True, cluster_size=16384),
                         250),
    "extended-l2-c2M": (lambda d: fresh(d, 16 * MiB, extended_l2=True, cluster_size=2 * MiB),
                        80),
    "extended-l2-prealloc-metadata": (lambda d: fresh(d, 8 * MiB, extended_l2=True,
                                                      preallocation="metadata"), 200),
    "extended-l2-backing": (lambda d: over_backing(d, 8 * MiB, "qcow2", 6 * MiB + 20 * KiB,
                                                   extended_l2=True), 250),
    "data-file": (lambda d: fresh(d, 8 * MiB, data_file="x"), 200),
    "data-file-raw": (lambda d: fresh(d, 8 * MiB, data_file="x", data_file_raw=True), 200),
    "data-file-extended-l2": (lambda d: fresh(d, 8 * MiB, data_file="x", extended_l2=True),
                              200),
    "backing-qcow2": (lambda d: over_backing(d, 16 * MiB, "qcow2", 16 * MiB), 250),
    "backing-qcow2-short": (lambda d: over_backing(d, 16 * MiB, "qcow2", 6 * MiB + 40 * KiB),
                            200),
    "backing-raw": (lambda d: over_backing(d, 8 * MiB, "raw", 8 * MiB), 200),
    "backing-raw-short": (lambda d: over_backing(d, 8 * MiB, "raw", 3 * MiB + 1536), 200),
    "backing-c4k-over-64k": (lambda d: over_backing(d, 8 * MiB, "qcow2", 8 * MiB,
                                                    cluster_size=4096), 200),
    "v2-backing": (lambda d: over_backing(d, 16 * MiB, "qcow2", 16 * MiB, compat="0.10"), 250),
    "snapshots": (lambda d: with_snapshots(d, 8 * MiB), 250),
    "snapshots-v2": (lambda d: with_snapshots(d, 8 * MiB, "compat=0.10"), 200),
    "snapshots-lazy-refcounts": (lambda d: with_snapshots(d, 8 * MiB, "lazy_refcounts=on"),
                                 200),
    "snapshots-refcount-4-c4k": (lambda d: with_snapshots(d, 8 * MiB, "refcount_bits=4",
                                                          "cluster_size=4096"), 200),
    "snapshots-compressed": (lambda d: with_snapshots(d, 8 * MiB, compress=True), 200),
    "snapshots-extended-l2": (lambda d: with_snapshots(d, 8 * MiB, "extended_l2=on"), 200),
    "resized": (lambda d: resized(d, 6 * MiB, 20 * MiB), 200),
    "resized-c512": (lambda d: resized(d, 2 * MiB, 5 * MiB, "cluster_size=512"), 200),
    "compressed-overlay": (lambda d: compressed_overlay(d, 8 * MiB), 200),
    "compressed-zlib": (lambda d: compressed(d, 8 * MiB), 250),
    "compressed-zstd": (lambda d: compressed(d, 8 * MiB, "zstd"), 150),
}


#: more seeds for a longer hunt: QCOW2PY_WRITE_SEEDS=20
SEEDS = range(int(os.environ.get("QCOW2PY_WRITE_SEEDS", "2")))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_random_ops_match_qemu_io(name, seed, tmp_path):
    need("qemu-img")
    need("qemu-io")
    build, n_ops = SCENARIOS[name]
    t = build(tmp_path)
    img = t.open_ours()
    try:
        size = img.size
        v2_backing = img.header.version < 3 and img.backing is not None
        ops = make_ops(random.Random(f"{name}-{seed}"), size, t.cs, n_ops)
        model = bytearray(t.initial)
        apply_ours(img, ops, model, discard_works=not v2_backing)
        model = bytes(model)
    finally:
        img.close()
    run_qemu_io(t.twin, qemu_io_commands(ops))

    # ours: clean for qemu-img check, and qcow2py's check says the same
    assert assert_checks_agree(t.ours) == 0, \
        qemu_img("check", t.ours.name, cwd=tmp_path, check=False).stdout
    assert_checks_agree(t.twin)
    # the twins hold the same guest data, which is the model's
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", t.ours.name, t.twin.name,
                   cwd=tmp_path, check=False)
    twin_raw = raw_of(t.twin, tmp_path)
    if twin_raw != model:
        pytest.fail(explain(twin_raw, model, ops, "qemu-io's twin vs the model (test bug?)"))
    got = read_all(t.ours)
    if got != model:
        pytest.fail(explain(got, model, ops, "qcow2py's image vs the model"))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # qcow2py reads qemu's twin as qemu-img convert does
    twin_read = read_all(t.twin)
    if twin_read != twin_raw:
        pytest.fail(explain(twin_read, twin_raw, ops, "qcow2py reading the twin"))

    for data_file in (tmp_path / "ours.data", tmp_path / "twin.data"):
        with qcow2py.open(str(t.ours)) as img:
            raw_data = img.header.data_file_raw
        if raw_data:
            # a raw external data file reads like the guest disk itself
            assert data_file.read_bytes() == model, data_file.name

    snap = getattr(t, "snapshot_content", None)
    if snap is not None:
        # the snapshot was left alone: applying it restores the old content on both
        for p in (t.ours, t.twin):
            qemu_img("snapshot", "-a", "s1", str(p))
            assert assert_checks_agree(p) == 0
            assert raw_of(p, tmp_path) == snap
            assert read_all(p) == snap
        # and ours can be written again after QEMU switched its L1 table
        with qcow2py.open(str(t.ours), "r+") as img:
            apply_ours(img, ops[:40])
        run_qemu_io(t.twin, qemu_io_commands(ops[:40]))
        assert assert_checks_agree(t.ours) == 0
        assert qemu_img("compare", str(t.ours), str(t.twin), check=False).returncode == 0


def test_reopen_and_write_again(tmp_path):
    """Several r+ sessions on one image (flushes in between) still match qemu-io."""
    need("qemu-io")
    t = fresh(tmp_path, 8 * MiB, cluster_size=4096)
    t.image.close()
    rnd = random.Random(99)
    all_ops: List[Op] = []
    for session in range(4):
        ops = make_ops(rnd, 8 * MiB, 4096, 60)
        with qcow2py.open(str(t.ours), "r+") as img:
            for i in range(0, len(ops), 15):
                apply_ours(img, ops[i:i + 15])
                img.flush()
        run_qemu_io(t.twin, qemu_io_commands(ops))
        all_ops += ops
        assert assert_checks_agree(t.ours) == 0
    model = bytearray(8 * MiB)
    apply_model(model, all_ops, 4096, True)
    assert read_all(t.ours) == bytes(model)
    assert qemu_img("compare", str(t.ours), str(t.twin), check=False).returncode == 0


# ---------------------------------------------------------------- create
IDENTICAL = [
    ({}, 64 * MiB),
    ({"compat": "0.10"}, 64 * MiB),
    ({"cluster_size": 512}, 16 * MiB),
    ({"cluster_size": 4096}, 64 * MiB),
    ({"cluster_size": 2 * MiB}, 64 * MiB),
    ({"refcount_bits": 1}, 64 * MiB),
    ({"refcount_bits": 2, "cluster_size": 4096}, 64 * MiB),
    ({"refcount_bits": 8}, 64 * MiB),
    ({"refcount_bits": 64, "cluster_size": 512}, 16 * MiB),
    ({"lazy_refcounts": True}, 64 * MiB),
    ({"compression_type": "zstd"}, 64 * MiB),
    ({"extended_l2": True}, 64 * MiB),
    ({}, 0),
    ({}, 12345),                               # rounded up to whole sectors
    # new refcount blocks and a grown refcount table on the way (QEMU's placement)
    ({"cluster_size": 512, "refcount_bits": 32}, 24 * MiB),
    ({"cluster_size": 1024, "refcount_bits": 64}, 40 * MiB),
]
IDENTICAL = [(o, s, p) for o, s in IDENTICAL for p in ("off", "metadata")] + [
    # off only: metadata preallocation of these takes qemu-img minutes
    ({"cluster_size": 4096}, 3 * (1 << 30), "off"),    # an L1 table over several clusters
    ({"cluster_size": 512}, 1 << 30, "off"),           # L1 over three refcount blocks
    ({"cluster_size": 512, "refcount_bits": 64}, 1 << 30, "off"),    # ... over nine
    ({"cluster_size": 512, "refcount_bits": 1}, 8 << 30, "off"),
]


@pytest.mark.parametrize("opts,size,prealloc", IDENTICAL,
                         ids=[",".join(_opts(o) + [f"size={s}", p]) for o, s, p in IDENTICAL])
def test_create_is_byte_identical(tmp_path, opts, size, prealloc):
    need("qemu-img")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qcow2py.create(str(ours), size, preallocation=prealloc, **opts).close()
    qemu_create(theirs, size, *_opts(dict(opts, preallocation=prealloc)))
    a, b = ours.read_bytes(), theirs.read_bytes()
    if a != b:
        i = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        pytest.fail(f"differs from qemu-img create at byte {i} (sizes {len(a)}, {len(b)})")


def test_create_backing_and_data_file_are_byte_identical(tmp_path):
    need("qemu-img")
    qemu_create(tmp_path / "base.qcow2", 32 * MiB)
    for n, kw in enumerate([
            {"backing_file": "base.qcow2", "backing_format": "qcow2"},
            {"backing_file": "base.qcow2", "backing_format": "qcow2", "compat": "0.10"},
            {"data_file": "d.raw"},
            {"data_file": "d.raw", "data_file_raw": True},
            {"data_file": "d.raw", "preallocation": "metadata"}]):
        ours, theirs = tmp_path / f"o{n}.qcow2", tmp_path / f"t{n}.qcow2"
        okw = dict(kw)
        size = None if "backing_file" in kw else 32 * MiB
        if "data_file" in kw:
            okw["data_file"] = f"o{n}.raw"
        qcow2py.create(str(ours), size, **okw).close()
        qkw = dict(kw)
        if "data_file" in kw:
            qkw["data_file"] = f"t{n}.raw"
        opts = []
        for k, v in qkw.items():
            if k == "backing_file":
                continue
            k = {"backing_format": "backing_fmt"}.get(k, k)
            opts.append(f"{k}={'on' if v is True else v}")
        args = ["create", "-q", "-f", "qcow2"]
        if "backing_file" in kw:
            args += ["-b", kw["backing_file"], "-F", kw["backing_format"]]
        if opts:
            args += ["-o", ",".join(opts)]
        qemu_img(*args, theirs.name, *([] if size is None else [size]), cwd=tmp_path)
        a = ours.read_bytes()
        b = theirs.read_bytes()
        if "data_file" in kw:
            a = a.replace(b"o%d.raw" % n, b"t%d.raw" % n)
            assert (tmp_path / f"o{n}.raw").stat().st_size == \
                (tmp_path / f"t{n}.raw").stat().st_size
        assert a == b, kw


ERRORS = [
    {"cluster_size": 1000},
    {"cluster_size": 256},
    {"cluster_size": 4 * MiB},
    {"refcount_bits": 3},
    {"refcount_bits": 128},
    {"compat": "0.10", "lazy_refcounts": True},
    {"compat": "0.10", "refcount_bits": 8},
    {"compat": "0.10", "compression_type": "zstd"},
    {"compat": "0.10", "extended_l2": True},
    {"compat": "0.10", "data_file": "d.raw"},
    {"extended_l2": True, "cluster_size": 8192},
    {"data_file_raw": True},
    {"backing_file": "base.qcow2", "backing_format": "qcow2", "preallocation": "metadata"},
    {"backing_file": "base.qcow2", "backing_format": "qcow2", "preallocation": "falloc"},
    {"backing_file": "base.qcow2", "backing_format": "qcow2", "preallocation": "full"},
    {"backing_format": "qcow2"},
    {"preallocation": "foo"},
    {"compat": "1.2"},
    {"compat": "0.9"},
    {"compression_type": "lzo"},
]


@pytest.mark.parametrize("opts", ERRORS, ids=[",".join(_opts(o)) for o in ERRORS])
def test_create_refuses_what_qemu_img_refuses(tmp_path, opts):
    need("qemu-img")
    qemu_create(tmp_path / "base.qcow2", 16 * MiB)
    args = ["create", "-f", "qcow2"]
    qopts = []
    for k, v in opts.items():
        if k == "backing_file":
            args += ["-b", v]
        elif k == "backing_format":
            args += ["-F", v]
        else:
            qopts.append(f"{k}={'on' if v is True else v}")
    if qopts:
        args += ["-o", ",".join(qopts)]
    p = qemu_img(*args, "x.qcow2", "16M", cwd=tmp_path, check=False)
    assert p.returncode == 1
    qemu_msg = p.stderr.strip().splitlines()[-1]
    prefix = "qemu-img: x.qcow2: "
    assert qemu_msg.startswith(prefix), qemu_msg
    with pytest.raises(qcow2py.CreateError) as e:
        qcow2py.create(str(tmp_path / "y.qcow2"), 16 * MiB, **opts)
    assert str(e.value) == qemu_msg[len(prefix):]
    assert not (tmp_path / "y.qcow2").exists()


def test_overlap_check_sees_tables_made_in_this_session(tmp_path):
    """The overlap map grows with each new L2 table (without a rebuild): a data
    write aimed at a table made a moment ago still marks the image corrupt."""
    need("qemu-img")
    path = tmp_path / "o.qcow2"
    img = qcow2py.create(str(path), 64 * MiB, cluster_size=4096)    # 2 MiB per L2 table
    try:
        img.write(0, b"\x01" * 4096)                  # builds the overlap map
        for t in range(1, 6):                         # five new tables after it
            img.write(t * 2 * MiB, b"\x02" * 4096)
        victim = int(img._l1[5])
        tpl = img.journal.template
        built = tpl._starts
        assert victim and tpl.overlap(victim, 4096) == Kind.ACTIVE_L2
        assert tpl._starts is built                   # joined without a rebuild
        l2 = img._writable_l2(0)
        l2[1] = np.uint64(victim | (1 << 63))         # guest cluster 1 -> that L2 table
        img._forget_table(0)
        with pytest.raises(qcow2py.CorruptImageError,
                           match=r"Preventing invalid write on metadata \(overlaps with "
                                 r"active L2 table\)"):
            img.write(4096, b"\x03" * 4096)
    finally:
        img.close()
    assert qemu_img("info", "--output=json", str(path)).stdout.count('"corrupt": true')
