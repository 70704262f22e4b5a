"""Differential tests: qcow2py against qemu-img / qemu-io 7.2.

Every case builds a small image (16-64 MiB virtual, a few MiB of data) with
the QEMU tools and then checks, against QEMU as the oracle:

* reads: the whole guest disk (sha256 against ``qemu-img convert -O raw``)
  and many unaligned partial reads that straddle cluster, subcluster and
  extent boundaries, compared byte for byte with the reference;
* ``img.map()`` against ``qemu-img map --output=json``, and the text of
  ``python -m qcow2py map --output=json`` against qemu-img's stdout;
* the text of ``qcow2py info --output=json [--backing-chain]`` against
  ``qemu-img info``, for a relative name (cwd = image folder), a relative
  name with a folder part, and an absolute name.

The shapes include those that broke other Python readers (see
``python-peers.md`` sections 1-2): zero clusters over backing data,
compressed clusters packed at unaligned offsets, extended L2 overlays, a v2
image with header extensions, ``../`` and absolute backing names, external
data files.  Writes land in shuffled order (seeded) so images are fragmented.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest

import qcow2py
from qcow2py import cli
from qcow2py.report import qemu_json
from qemu import create, info_json, map_json, need, qemu_img, qemu_io

KiB = 1 << 10
MiB = 1 << 20


# ---------------------------------------------------------------- building images
def _sources(d: Path, rng: random.Random) -> List[str]:
    """Pattern files for ``write -s``: prime lengths so content shifts from cluster to
    cluster (a mis-mapped cluster or a wrong offset inside one changes the bytes).
    One incompressible, one text-like, one half-compressible."""
    d.mkdir(parents=True, exist_ok=True)
    words = [b"qcow2", b"cluster", b"refcount", b"snapshot", b"guest", b"host ", b"\n",
             b"L2 ", b"table", b"zero ", b"backing"]
    blobs = {
        "src-random.bin": bytes(rng.getrandbits(8) for _ in range(4099)),
        "src-text.bin": b" ".join(rng.choice(words) for _ in range(1500))[:7919],
        "src-mixed.bin": bytes(rng.choice(b"abcdefgh0123") for _ in range(6151)),
    }
    out = []
    for name, blob in blobs.items():
        (d / name).write_bytes(blob)
        out.append(str(d / name))
    return out


def scatter(rng: random.Random, size: int, unit: int, count: int, sources: Sequence[str],
            *, align: int = 512, zero: float = 0.12, zero_unmap: float = 0.05,
            discard: float = 0.05, compressed: float = 0.0, limit: Optional[int] = None
            ) -> List[str]:
    """qemu-io commands touching ``count`` slots of ``unit`` bytes in shuffled order.

    Lengths vary: whole units, a few units, and partial ranges (``align``
    granular, some not even sector aligned) that straddle unit boundaries.
    """
    limit = size if limit is None else limit
    slots = list(range(limit // unit))
    rng.shuffle(slots)
    cmds = []
    for slot in slots[:count]:
        off = slot * unit
        shape = rng.random()
        if shape < 0.4:
            length = unit
        elif shape < 0.6:
            length = unit * rng.randint(2, 4)
        else:                                   # partial, crossing into the next unit
            off += rng.randrange(0, unit, align) if unit > align else 0
            length = rng.randint(1, 3 * unit // align) * align
            if rng.random() < 0.2:              # odd byte offsets too
                off += rng.randrange(1, 512)
                length -= rng.randrange(1, 300)
        length = max(1, min(length, limit - off))
        if length <= 0 or off >= limit:
            continue
        op = rng.random()
        if op < zero:
            cmds.append(f"write -z {off} {length}")
        elif op < zero + zero_unmap:
            cmds.append(f"write -z -u {off} {length}")
        elif op < zero + zero_unmap + discard:
            cmds.append(f"discard {off} {length}")
        elif op < zero + zero_unmap + discard + compressed and shape < 0.4 \
                and off % unit == 0:
            cmds.append(f"write -c -P {rng.randrange(1, 256)} {off} {unit}")
        elif rng.random() < 0.5:
            cmds.append(f"write -s {rng.choice(sources)} {off} {length}")
        else:
            cmds.append(f"write -P {rng.randrange(1, 256)} {off} {length}")
    return cmds


def run_io(image, cmds: Sequence[str], fmt: str = "qcow2", batch: int = 200) -> None:
    """qemu-io commands in batches, run in the image's folder (QEMU 7.2 resolves a
    relative external data file name against the working directory)."""
    need("qemu-io")
    image = Path(image)
    for i in range(0, len(cmds), batch):
        args = ["qemu-io", "-f", fmt]
        for c in cmds[i:i + batch]:
            args += ["-c", c]
        p = subprocess.run(args + [str(image)], cwd=str(image.parent), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        bad = [ln for ln in (p.stdout + p.stderr).splitlines()
               if "error" in ln.lower() or "failed" in ln.lower()]
        assert p.returncode == 0 and not bad, \
            f"qemu-io on {image.name} failed ({p.returncode}): {bad[:5]} {p.stderr[-500:]}"


def populate(path, d: Path, seed: int, size: int, unit: int, count: int, fmt: str = "qcow2",
             **kw) -> None:
    rng = random.Random(seed)
    run_io(path, scatter(rng, size, unit, count, _sources(d / "src", rng), **kw), fmt=fmt)


def run_io_abort(image, cmds: Sequence[str]) -> None:
    """Run qemu-io commands, then ``abort``: the image is left as a crash leaves it."""
    args = ["qemu-io", "-f", "qcow2"]
    for c in list(cmds) + ["abort"]:
        args += ["-c", c]
    p = subprocess.run(args + [str(image)], cwd=str(Path(image).parent),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.returncode == -6, (p.returncode, p.stderr)


def qcow2_image(d: Path, name: str, size: int, *opts, unit: int = 64 * KiB,
                count: int = 60, seed: int = 1, backing=None, backing_fmt=None,
                **kw) -> Path:
    p = d / name
    create(p, size, *opts, backing=backing, backing_fmt=backing_fmt, cwd=d)
    if count:
        populate(p, d, seed, size, unit, count, **kw)
    return p


def patch_backing_format_away(path: Path, replacement_magic: int) -> None:
    """Make QEMU probe the backing format: overwrite the magic of the backing-format
    header extension (with 0 = end of extensions, or an unknown magic that QEMU keeps
    and skips).  qemu-img 7.2 no longer creates such images itself."""
    data = bytearray(path.read_bytes()[:4096])
    version = struct.unpack_from(">I", data, 4)[0]
    pos = struct.unpack_from(">I", data, 100)[0] if version == 3 else 72
    magic = struct.unpack_from(">I", data, pos)[0]
    assert magic == 0xE2792ACA, hex(magic)
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(struct.pack(">I", replacement_magic))


CASES: Dict[str, Callable[[Path], Path]] = {}
#: cases qemu-img can map and convert only from the image's folder (it opens a
#: relative external data file name against its working directory)
IMAGE_DIR_ONLY = set()


def case(name: str, image_dir_only: bool = False):
    def register(fn):
        assert name not in CASES, name
        CASES[name] = fn
        if image_dir_only:
            IMAGE_DIR_ONLY.add(name)
        return fn
    return register


# ---- versions, cluster sizes, refcount widths
@case("v3-default")
def _(d):
    return qcow2_image(d, "v3.qcow2", 64 * MiB, count=80, seed=11)


@case("v2-compat010")
def _(d):
    return qcow2_image(d, "v2.qcow2", 64 * MiB, "compat=0.10", count=80, seed=12)


@case("v2-overlay-backing-format-ext")
def _(d):
    base = qcow2_image(d, "base.qcow2", 32 * MiB, count=60, seed=13, zero=0, zero_unmap=0,
                       discard=0)
    return qcow2_image(d, "top.qcow2", 32 * MiB, "compat=0.10", count=50, seed=14,
                       backing="base.qcow2", backing_fmt="qcow2")


for _cs, _size, _count in ((512, 16 * MiB, 300), (4 * KiB, 16 * MiB, 200),
                           (64 * KiB, 64 * MiB, 60), (2 * MiB, 64 * MiB, 12)):
    def _make(d, cs=_cs, size=_size, count=_count):
        return qcow2_image(d, f"cs{cs}.qcow2", size, f"cluster_size={cs}", unit=cs,
                           count=count, seed=cs)
    case(f"cluster-{_cs}")(_make)


for _bits in (1, 2, 4, 8, 16, 32, 64):
    def _make(d, bits=_bits):
        return qcow2_image(d, f"rc{bits}.qcow2", 16 * MiB, f"refcount_bits={bits}",
                           "cluster_size=4096", unit=4 * KiB, count=120, seed=100 + bits)
    case(f"refcount-bits-{_bits}")(_make)


# ---- zero clusters
@case("zero-plain")
def _(d):
    p = d / "z.qcow2"
    create(p, 32 * MiB)
    run_io(p, ["write -z 0 1M", "write -P 7 2M 1M", "write -z -u 2M 256k",
               "write -z 5M 64k", "write -z 6M 100k", "write -P 8 9M 64k",
               "write -z -u 9M 64k"])
    m = map_json(p)
    assert any(e["zero"] and e["present"] and "offset" not in e for e in m), m
    return p


@case("zero-preallocated")
def _(d):
    p = d / "zp.qcow2"
    create(p, 32 * MiB)
    run_io(p, ["write -P 1 0 4M", "write -z 1M 512k", "write -z 3M 64k",
               "write -P 2 8M 1M", "write -z 8M 1M", "write -z 3200k 64k"])
    m = map_json(p)
    assert any(e["zero"] and "offset" in e for e in m), m     # ZERO_ALLOC present
    return p


@case("zero-over-backing")
def _(d):
    base = d / "base.qcow2"
    create(base, 32 * MiB)
    run_io(base, ["write -P 0x11 0 16M", "write -P 0x22 20M 4M"])
    top = d / "top.qcow2"
    create(top, 32 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    rng = random.Random(5)
    slots = rng.sample(range(16 * MiB // (64 * KiB)), 60)
    cmds = []
    for i, s in enumerate(slots):
        off = s * 64 * KiB
        cmds.append(["write -z {} 64k", "write -z -u {} 64k", "discard {} 64k",
                     "write -z {} 128k", "write -P 0x33 {} 64k"][i % 5].format(off))
    cmds += ["write -z 20M 64k", "write -z -u 21M 100k"]
    run_io(top, cmds)
    m = map_json(top)
    assert any(e["depth"] == 0 and e["zero"] and not e["data"] for e in m), m
    return top


@case("zero-over-backing-extl2")
def _(d):
    base = d / "base.qcow2"
    create(base, 16 * MiB)
    run_io(base, ["write -P 0x11 0 8M"])
    top = d / "top.qcow2"
    create(top, 16 * MiB, "extended_l2=on", backing="base.qcow2", backing_fmt="qcow2")
    run_io(top, ["write -z 0 2k", "write -z 70k 2k", "write -z -u 1M 64k",
                 "discard 2M 64k", "write -P 3 3M 6k", "write -z 3M 2k"])
    return top


# ---- compressed clusters
def _compress_source(d: Path, size: int, cs: int, seed: int) -> Path:
    src = qcow2_image(d, "plain.qcow2", size, f"cluster_size={cs}", unit=cs, count=90,
                      seed=seed, zero=0.08, zero_unmap=0.02, discard=0.02)
    return src


@case("compressed-zlib")
def _(d):
    src = _compress_source(d, 32 * MiB, 64 * KiB, 21)
    out = d / "zlib.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", src, out)
    _assert_packed_compressed(out)
    return out


@case("compressed-zstd")
def _(d):
    src = _compress_source(d, 32 * MiB, 64 * KiB, 22)
    out = d / "zstd.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, out)
    _assert_packed_compressed(out)
    return out


@case("compressed-zlib-cluster-4k")
def _(d):
    src = _compress_source(d, 16 * MiB, 4 * KiB, 23)
    out = d / "zlib4k.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", src, out)
    _assert_packed_compressed(out)
    return out


@case("compressed-zlib-cluster-512")
def _(d):
    src = _compress_source(d, 16 * MiB, 512, 28)
    out = d / "zlib512.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=512", src, out)
    return out


@case("compressed-base-overwritten-in-overlay")
def _(d):
    src = _compress_source(d, 16 * MiB, 64 * KiB, 29)
    qemu_img("convert", "-c", "-O", "qcow2", src, d / "cbase.qcow2")
    return qcow2_image(d, "top.qcow2", 16 * MiB, unit=4 * KiB, count=80, seed=30,
                       align=512, backing="cbase.qcow2", backing_fmt="qcow2")


@case("compressed-zstd-cluster-2M")
def _(d):
    src = _compress_source(d, 64 * MiB, 2 * MiB, 24)
    out = d / "zstd2m.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=2M",
             src, out)
    return out


@case("compressed-qemu-io-write-c")
def _(d):
    p = d / "wc.qcow2"
    create(p, 32 * MiB)
    rng = random.Random(25)
    slots = rng.sample(range(32 * MiB // (64 * KiB)), 90)
    cmds = [f"write -c -P {rng.randrange(1, 256)} {s * 64 * KiB} 64k" for s in slots]
    srcs = _sources(d / "src", rng)
    cmds += [f"write -c -s {srcs[1]} {s * 64 * KiB} 64k"
             for s in sorted(set(range(512)) - set(slots))[:20]]
    # overwrite parts of some compressed clusters (copy-on-write decompresses them)
    cmds += [f"write -P 0x5a {s * 64 * KiB + 3000} 5000" for s in slots[:10]]
    cmds += [f"write -z {s * 64 * KiB} 64k" for s in slots[10:15]]
    run_io(p, cmds)
    _assert_packed_compressed(p)
    return p


@case("compressed-zstd-overlay")
def _(d):
    base = qcow2_image(d, "base.qcow2", 16 * MiB, count=40, seed=26)
    top = d / "top.qcow2"
    create(top, 16 * MiB, "compression_type=zstd", backing="base.qcow2", backing_fmt="qcow2")
    rng = random.Random(27)
    run_io(top, [f"write -c -P {rng.randrange(256)} {s * 64 * KiB} 64k"
                 for s in rng.sample(range(256), 40)])
    return top


def _assert_packed_compressed(path: Path) -> None:
    """The premise of the compressed cases: streams at unaligned byte offsets, several
    sharing one host cluster (read from the L2 tables with plain struct code)."""
    data = path.read_bytes()
    cluster_bits, = struct.unpack_from(">I", data, 20)
    l1_size, l1_off = struct.unpack_from(">IQ", data, 36)
    cs = 1 << cluster_bits
    version, = struct.unpack_from(">I", data, 4)
    extended = version == 3 and struct.unpack_from(">Q", data, 72)[0] & 16
    esize = 16 if extended else 8
    shift = 62 - (cluster_bits - 8)
    offsets = []
    for i in range(l1_size):
        l2 = struct.unpack_from(">Q", data, l1_off + 8 * i)[0] & 0x00FFFFFFFFFFFE00
        if not l2:
            continue
        for j in range(cs // esize):
            e = struct.unpack_from(">Q", data, l2 + esize * j)[0]
            if e & (1 << 62):
                offsets.append(e & ((1 << shift) - 1))
    assert len(offsets) >= 8, f"only {len(offsets)} compressed clusters"
    assert any(o % 512 for o in offsets), "no compressed stream at an unaligned offset"
    hosts = [o // cs for o in offsets]
    assert len(set(hosts)) < len(hosts), "no host cluster holds two compressed streams"


# ---- extended L2
@case("extl2-64k")
def _(d):
    return qcow2_image(d, "x64.qcow2", 32 * MiB, "extended_l2=on", unit=2 * KiB,
                       count=400, seed=31, align=2 * KiB, limit=8 * MiB)


@case("extl2-32k")
def _(d):
    p = qcow2_image(d, "x32.qcow2", 32 * MiB, "extended_l2=on", "cluster_size=32k",
                    unit=1 * KiB, count=400, seed=32, align=512, limit=4 * MiB)
    # single-subcluster zero writes inside allocated clusters
    run_io(p, [f"write -P 9 {20 * MiB} 256k"] +
           [f"write -z {20 * MiB + k * KiB} 1k" for k in range(0, 256, 7)])
    return p


@case("extl2-16k")
def _(d):
    return qcow2_image(d, "x16.qcow2", 16 * MiB, "extended_l2=on", "cluster_size=16k",
                       unit=512, count=400, seed=38, align=512, limit=2 * MiB)


@case("extl2-2M-cluster")
def _(d):
    return qcow2_image(d, "x2m.qcow2", 64 * MiB, "extended_l2=on", "cluster_size=2M",
                       unit=64 * KiB, count=60, seed=33, align=64 * KiB)


@case("extl2-overlay-on-plain-base")
def _(d):
    qcow2_image(d, "base.qcow2", 32 * MiB, count=60, seed=34)
    return qcow2_image(d, "top.qcow2", 32 * MiB, "extended_l2=on", unit=2 * KiB,
                       count=300, seed=35, align=2 * KiB, limit=12 * MiB,
                       backing="base.qcow2", backing_fmt="qcow2")


@case("plain-overlay-on-extl2-base")
def _(d):
    qcow2_image(d, "base.qcow2", 32 * MiB, "extended_l2=on", unit=2 * KiB, count=300,
                seed=36, align=2 * KiB, limit=12 * MiB)
    return qcow2_image(d, "top.qcow2", 32 * MiB, count=60, seed=37, align=4 * KiB,
                       backing="base.qcow2", backing_fmt="qcow2")


# ---- backing chains
@case("chain-depth-3")
def _(d):
    qcow2_image(d, "c0.qcow2", 32 * MiB, count=50, seed=41)
    qcow2_image(d, "c1.qcow2", 32 * MiB, count=40, seed=42, backing="c0.qcow2",
                backing_fmt="qcow2")
    return qcow2_image(d, "c2.qcow2", 32 * MiB, "cluster_size=16k", unit=16 * KiB,
                       count=60, seed=43, backing="c1.qcow2", backing_fmt="qcow2")


@case("backing-raw")
def _(d):
    raw = d / "base.raw"
    create(raw, 16 * MiB, fmt="raw")
    populate(raw, d, 44, 16 * MiB, 64 * KiB, 40, fmt="raw", zero=0.1, zero_unmap=0,
             discard=0)
    return qcow2_image(d, "top.qcow2", 16 * MiB, count=30, seed=45, backing="base.raw",
                       backing_fmt="raw")


@case("backing-raw-unaligned-size")
def _(d):
    raw = d / "base.raw"
    rng = random.Random(46)
    raw.write_bytes(bytes(rng.getrandbits(8) for _ in range(3 * MiB // 64)) * 64
                    + b"\x55" * 1000)
    return qcow2_image(d, "top.qcow2", 8 * MiB, count=10, seed=47, limit=2 * MiB,
                       backing="base.raw", backing_fmt="raw")


@case("backing-shorter-than-overlay")
def _(d):
    qcow2_image(d, "base.qcow2", 16 * MiB + 64 * KiB, count=40, seed=48, zero=0,
                zero_unmap=0, discard=0)
    run_io(d / "base.qcow2", ["write -P 0x77 15M 1088k"])
    return qcow2_image(d, "top.qcow2", 48 * MiB, count=40, seed=49,
                       backing="base.qcow2", backing_fmt="qcow2")


@case("backing-shorter-unaligned")
def _(d):
    base = d / "base.qcow2"
    create(base, 5 * MiB + 3 * 512)
    run_io(base, [f"write -P 0x66 0 {5 * MiB + 3 * 512}"])
    return qcow2_image(d, "top.qcow2", 16 * MiB, count=8, seed=50, limit=4 * MiB,
                       backing="base.qcow2", backing_fmt="qcow2")


@case("backing-absolute-path")
def _(d):
    (d / "b").mkdir()
    base = qcow2_image(d / "b", "base.qcow2", 32 * MiB, count=40, seed=51)
    (d / "t").mkdir()
    return qcow2_image(d / "t", "top.qcow2", 32 * MiB, count=30, seed=52,
                       backing=str(base), backing_fmt="qcow2")


@case("backing-dotdot-path")
def _(d):
    (d / "dir").mkdir()
    qcow2_image(d / "dir", "base.qcow2", 32 * MiB, count=40, seed=53)
    (d / "top").mkdir()
    top = d / "top" / "top.qcow2"
    create(top, 32 * MiB, backing="../dir/base.qcow2", backing_fmt="qcow2")
    populate(top, d, 54, 32 * MiB, 64 * KiB, 30)
    return top


@case("backing-format-probed-v3")
def _(d):
    qcow2_image(d, "base.qcow2", 16 * MiB, count=30, seed=55)
    top = qcow2_image(d, "top.qcow2", 16 * MiB, count=20, seed=56, backing="base.qcow2",
                      backing_fmt="qcow2")
    patch_backing_format_away(top, 0)
    assert "backing-filename-format" not in info_json(top)
    return top


@case("backing-format-probed-v2-unknown-ext")
def _(d):
    qcow2_image(d, "base.qcow2", 16 * MiB, count=30, seed=57)
    top = qcow2_image(d, "top.qcow2", 16 * MiB, "compat=0.10", count=20, seed=58,
                      backing="base.qcow2", backing_fmt="qcow2")
    patch_backing_format_away(top, 0x0BADF00D)
    assert "backing-filename-format" not in info_json(top)
    return top


@case("backing-raw-probed")
def _(d):
    raw = d / "base.img"
    create(raw, 16 * MiB, fmt="raw")
    populate(raw, d, 59, 16 * MiB, 64 * KiB, 30, fmt="raw", zero=0.1, zero_unmap=0,
             discard=0)
    top = qcow2_image(d, "top.qcow2", 16 * MiB, count=20, seed=60, backing="base.img",
                      backing_fmt="raw")
    patch_backing_format_away(top, 0)
    return top


# ---- external data files
@case("data-file", image_dir_only=True)
def _(d):
    return qcow2_image(d, "df.qcow2", 32 * MiB, "data_file=df.data", count=60, seed=61)


@case("data-file-raw", image_dir_only=True)
def _(d):
    return qcow2_image(d, "dfr.qcow2", 32 * MiB, "data_file=dfr.data", "data_file_raw=on",
                       count=60, seed=62)


@case("data-file-extl2", image_dir_only=True)
def _(d):
    return qcow2_image(d, "dfx.qcow2", 16 * MiB, "data_file=dfx.data", "extended_l2=on",
                       unit=2 * KiB, count=200, seed=63, align=2 * KiB, limit=4 * MiB)


@case("data-file-raw-prealloc-metadata", image_dir_only=True)
def _(d):
    return qcow2_image(d, "dfm.qcow2", 16 * MiB, "data_file=dfm.data", "data_file_raw=on",
                       "preallocation=metadata", count=30, seed=64)


@case("data-file-prealloc-full", image_dir_only=True)
def _(d):
    return qcow2_image(d, "dff.qcow2", 16 * MiB, "data_file=dff.data", "preallocation=full",
                       count=20, seed=65)


# ---- snapshots, dirty images, bitmaps
@case("snapshots")
def _(d):
    p = qcow2_image(d, "snap.qcow2", 32 * MiB, count=40, seed=71)
    qemu_img("snapshot", "-c", "s1", p)
    populate(p, d, 72, 32 * MiB, 64 * KiB, 40)
    qemu_img("snapshot", "-c", "second snapshot", p)
    populate(p, d, 73, 32 * MiB, 64 * KiB, 30)
    assert len(info_json(p)["snapshots"]) == 2
    return p


@case("snapshots-v2")
def _(d):
    p = qcow2_image(d, "snap2.qcow2", 16 * MiB, "compat=0.10", count=30, seed=74)
    qemu_img("snapshot", "-c", "s1", p)
    populate(p, d, 75, 16 * MiB, 64 * KiB, 30)
    return p


@case("lazy-refcounts-dirty")
def _(d):
    p = d / "lazy.qcow2"
    create(p, 16 * MiB, "lazy_refcounts=on")
    rng = random.Random(76)
    cmds = scatter(rng, 16 * MiB, 64 * KiB, 40, _sources(d / "src", rng))
    run_io_abort(p, cmds)
    assert info_json(p)["dirty-flag"] is True
    return p


@case("bitmaps")
def _(d):
    p = qcow2_image(d, "bm.qcow2", 32 * MiB, count=30, seed=77)
    qemu_img("bitmap", "--add", p, "bm0")
    qemu_img("bitmap", "--add", "-g", "128k", p, "bitmap-two")
    qemu_img("bitmap", "--add", "-g", "512", p, "tiny")
    qemu_img("bitmap", "--disable", p, "bitmap-two")
    populate(p, d, 78, 32 * MiB, 64 * KiB, 20)
    return p


@case("bitmaps-in-use")
def _(d):
    p = qcow2_image(d, "bmu.qcow2", 16 * MiB, count=20, seed=79)
    qemu_img("bitmap", "--add", p, "b1")
    qemu_img("bitmap", "--add", p, "b2")
    qemu_img("bitmap", "--disable", p, "b2")
    run_io_abort(p, ["write -P 1 0 64k"])
    flags = {b["name"]: b["flags"] for b in
             info_json(p)["format-specific"]["data"]["bitmaps"]}
    assert "in-use" in flags["b1"], flags
    return p


# ---- preallocation
for _mode in ("metadata", "falloc", "full"):
    def _make(d, mode=_mode):
        p = d / f"pre-{mode}.qcow2"
        create(p, 16 * MiB, f"preallocation={mode}")
        populate(p, d, 80, 16 * MiB, 64 * KiB, 20, limit=8 * MiB)
        return p
    case(f"prealloc-{_mode}")(_make)


@case("prealloc-metadata-overlay-on-raw")
def _(d):
    raw = d / "base.raw"
    create(raw, 16 * MiB, fmt="raw")
    populate(raw, d, 82, 16 * MiB, 64 * KiB, 20, fmt="raw", zero=0, zero_unmap=0.1,
             discard=0)
    # QEMU allows preallocation with a backing file only with extended L2 entries
    return qcow2_image(d, "top.qcow2", 16 * MiB, "preallocation=metadata", "extended_l2=on",
                       unit=2 * KiB, align=2 * KiB, count=60, seed=83, limit=4 * MiB,
                       backing="base.raw", backing_fmt="raw")


@case("prealloc-metadata-untouched")
def _(d):
    p = d / "pm.qcow2"
    create(p, 16 * MiB, "preallocation=metadata")
    return p


@case("prealloc-metadata-extl2")
def _(d):
    p = d / "pmx.qcow2"
    create(p, 16 * MiB, "preallocation=metadata", "extended_l2=on")
    populate(p, d, 81, 16 * MiB, 2 * KiB, 100, align=2 * KiB, limit=4 * MiB)
    return p


# ---- raw
@case("raw-sparse")
def _(d):
    p = d / "sparse.raw"
    create(p, 32 * MiB, fmt="raw")
    populate(p, d, 91, 32 * MiB, 64 * KiB, 40, fmt="raw", zero_unmap=0.05, discard=0.05)
    return p


@case("raw-dense")
def _(d):
    p = d / "dense.raw"
    rng = random.Random(92)
    p.write_bytes(bytes(rng.getrandbits(8) for _ in range(256 * KiB)) * 64)
    return p


@case("raw-odd-size")
def _(d):
    p = d / "odd.raw"
    rng = random.Random(93)
    p.write_bytes(bytes(rng.getrandbits(8) for _ in range(1 * MiB + 1000)))
    return p


@case("unicode-names")
def _(d):
    p = d / 'dïsk "€" 😀.qcow2'
    create(p, 16 * MiB)
    run_io(p, ["write -P 1 0 1M"])
    qemu_img("snapshot", "-c", "snäp/€😀\tx", p)
    qemu_img("bitmap", "--add", p, "bm\\ü\u007f")
    return p


@case("overlay-shorter-than-backing")
def _(d):
    qcow2_image(d, "base.qcow2", 32 * MiB, count=40, seed=94)
    return qcow2_image(d, "top.qcow2", 8 * MiB + 4096, count=10, seed=95, limit=8 * MiB,
                       backing="base.qcow2", backing_fmt="qcow2")


@case("compressed-extl2")
def _(d):
    src = _compress_source(d, 16 * MiB, 64 * KiB, 96)
    out = d / "cx.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "extended_l2=on", src, out)
    run_io(out, ["write -P 4 70k 2k", "write -z 1M 2k"])
    _assert_packed_compressed(out)
    return out


@case("empty-v3")
def _(d):
    p = d / "empty.qcow2"
    create(p, 16 * MiB)
    return p


@case("unaligned-virtual-size")
def _(d):
    p = d / "odd.qcow2"
    create(p, 16 * MiB + 1536)
    run_io(p, ["write -P 3 0 1M", f"write -P 4 {16 * MiB} 1536", f"write -P 5 {16 * MiB - 700} 1000"])
    return p


# ---------------------------------------------------------------- checks
def settle(d: Path) -> None:
    """fsync every file: until writeback has converted a file's extents, SEEK_DATA /
    SEEK_HOLE answers (which QEMU's block status reports) can change between calls."""
    for root, _, files in os.walk(d):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
                # Warm the page cache too: SEEK_DATA reports an unwritten extent
                # (fallocate) as data where the cache holds its pages, so the first
                # read of such a range would change later answers.
                while fh.read(8 << 20):
                    pass


def reference(path: Path, d: Path) -> bytes:
    out = d / "reference.raw"
    qemu_img("convert", "-O", "raw", path.name, out, cwd=path.parent)
    data = out.read_bytes()
    out.unlink()
    return data


def _boundaries(qemu_map: List[dict]) -> List[int]:
    return [e["start"] for e in qemu_map[1:]]


def check_read(path: Path, d: Path, qmap: List[dict], image_dir_only: bool = False) -> None:
    ref = reference(path, d)
    with qcow2py.open(str(path)) as img:
        assert img.size == len(ref), (img.size, len(ref))
        whole = img.read(0, img.size)
        assert hashlib.sha256(whole).hexdigest() == hashlib.sha256(ref).hexdigest(), \
            _first_difference(whole, ref, img.cluster_size or 65536)
        size = img.size
        cs = img.cluster_size or 65536
        sub = cs >> 5 if getattr(img, "extended_l2", False) else cs
        rng = random.Random(size ^ cs)
        reads = [(size - 1, 1), (0, 1), (max(0, size - 3 * cs - 5), min(size, 3 * cs + 5))]
        for unit in {cs, sub, 512}:
            for _ in range(12):
                b = rng.randrange(1, max(2, size // unit)) * unit
                off = max(0, b - rng.randrange(1, min(unit, 4096) + 1))
                reads.append((off, rng.randrange(1, 3 * unit + 2)))
        edges = _boundaries(qmap)
        for b in rng.sample(edges, min(40, len(edges))):
            reads.append((max(0, b - rng.randrange(1, 1500)), rng.randrange(2, 5000)))
        for _ in range(20):
            off = rng.randrange(size)
            reads.append((off, rng.randrange(1, 5 * cs)))
        for off, n in reads:
            n = min(n, size - off)
            got = img.read(off, n)
            assert got == ref[off:off + n], f"read({off}, {n}) differs: " + \
                _first_difference(got, ref[off:off + n], cs, base=off)
        # read_into a reused, dirty buffer
        buf = bytearray(b"\xee" * min(size, 3 * cs + 777))
        off = min(size - len(buf), cs - 333) if size > len(buf) else 0
        img.read_into(buf, off)
        assert bytes(buf) == ref[off:off + len(buf)], "read_into differs"


def _first_difference(got: bytes, want: bytes, cs: int, base: int = 0) -> str:
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    step = 4096
    bad = []
    for i in range(0, len(want), step):
        if got[i:i + step] != want[i:i + step]:
            g, w = got[i:i + step], want[i:i + step]
            bad.append(f"@{base + i:#x} got {'zeros' if not any(g) else g[:8].hex()} "
                       f"want {'zeros' if not any(w) else w[:8].hex()}")
            if len(bad) >= 6:
                break
    return "; ".join(bad)


def _ours(args: List[str], cwd: Path, subprocess_: bool) -> str:
    if subprocess_:
        p = subprocess.run([sys.executable, "-m", "qcow2py", *args], cwd=str(cwd),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.returncode == 0, f"qcow2py {' '.join(args)} failed: {p.stderr}"
        return p.stdout
    out = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            rc = cli.main(list(args))
    finally:
        os.chdir(old)
    assert rc == 0, f"qcow2py {' '.join(args)} returned {rc}"
    return out.getvalue()


#: which command the current case runs as a real ``python -m qcow2py`` process (the
#: other ways of naming the image call the same ``cli.main`` in-process); cases
#: alternate between map and info to keep the suite fast
SUBPROCESS = ["map"]


def _names(path: Path, image_dir_only: bool = False):
    """(cwd, filename, run-as-subprocess) for each way of naming the image."""
    names = [(path.parent, path.name, True),
             (path.parent.parent, f"{path.parent.name}/{path.name}", False),
             (Path("/"), str(path), False),
             (path.parent.parent, f"./{path.parent.name}//{path.name}", False)]
    return names[:1] if image_dir_only else names


def check_map(path: Path, d: Path, qmap: List[dict], image_dir_only: bool = False) -> None:
    with qcow2py.open(str(path)) as img:
        ours = img.map()
    qmap = map_json(path.name, cwd=path.parent)
    assert ours == qmap, _diff_list(ours, qmap)
    for cwd, name, sub in _names(path, image_dir_only):
        want = qemu_img("map", "--output=json", name, cwd=cwd).stdout
        got = _ours(["map", "--output=json", name], cwd, sub and SUBPROCESS[0] == "map")
        assert got == want, f"map text for {name!r} differs:\n" + _diff_text(got, want)
    # windows with odd bounds, and the human table (in-process: cheap)
    cwd, name = path.parent, path.name
    size = qmap[-1]["start"] + qmap[-1]["length"]
    rng = random.Random(size)
    for _ in range(3):
        start = rng.randrange(size)
        window = ["--start-offset", str(start), "--max-length", str(rng.randrange(1, size))]
        want = qemu_img("map", "--output=json", *window, name, cwd=cwd).stdout
        got = _ours(["map", "--output=json", *window, name], cwd, False)
        assert got == want, f"map {' '.join(window)} differs:\n" + _diff_text(got, want)
    q = qemu_img("map", name, cwd=cwd, check=False)
    if q.returncode == 0:
        got = _ours(["map", name], cwd, False)
        assert got == q.stdout, "human map differs:\n" + _diff_text(got, q.stdout)
    else:       # compressed clusters: both refuse the human table
        assert "compressed" in q.stderr, q.stderr
        with pytest.raises(AssertionError, match="returned 1"):
            _ours(["map", name], cwd, False)


def check_info(path: Path, d: Path, qmap: List[dict], image_dir_only: bool = False) -> None:
    # qemu-img info does not open an external data file: every name works
    for cwd, name, sub in _names(path):
        for extra in ([], ["--backing-chain"]):
            before = _allocations(path.parent)
            want = qemu_img("info", "--output=json", *extra, name, cwd=cwd).stdout
            got = _ours(["info", "--output=json", *extra, name], cwd,
                        sub and SUBPROCESS[0] == "info" and not extra)
            if got != want and _without_actual_size(got) == _without_actual_size(want):
                # the one field allowed to differ, and only if a file changed meanwhile
                assert _allocations(path.parent) != before, \
                    f"actual-size differs for {name!r}:\n" + _diff_text(got, want)
                continue
            assert got == want, f"info {' '.join(extra)} for {name!r} differs:\n" + \
                _diff_text(got, want)


def _allocations(folder: Path) -> Dict[str, int]:
    return {str(f): f.stat().st_blocks for f in folder.rglob("*") if f.is_file()}


def _without_actual_size(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if '"actual-size":' not in ln)


def _diff_list(got: List[dict], want: List[dict]) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"entry {i}: got {g}\n          want {w} ({len(got)} vs {len(want)} entries)"
    return f"{len(got)} entries, want {len(want)}; first extra: " \
           f"{(got + want)[min(len(got), len(want))]}"


def _diff_text(got: str, want: str) -> str:
    import difflib
    return "".join(list(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                             "qemu-img", "qcow2py", n=2))[:60])


@pytest.mark.parametrize("name", list(CASES))
def test_agrees_with_qemu(name, tmp_path):
    """Build the image with QEMU, then compare reads, map and info with qemu-img."""
    need("qemu-img")
    need("qemu-io")
    path = CASES[name](tmp_path)
    settle(tmp_path)
    qmap = map_json(path.name, cwd=path.parent)
    SUBPROCESS[0] = ("map", "info")[list(CASES).index(name) % 2]
    problems = []
    for check in (check_read, check_map, check_info):
        try:
            check(path, tmp_path, qmap, name in IMAGE_DIR_ONLY)
        except AssertionError as e:
            problems.append(f"{check.__name__}: {e}")
    assert not problems, "\n\n".join(problems)


# ---------------------------------------------------------------- focused tests
def _create_encrypted(path: Path, fmt: str) -> None:
    """``qemu-img create`` of an encrypted qcow2.  LUKS key setup benchmarks the CPU
    and fails at random on a busy machine ("Unable to get accurate CPU usage"), so
    retry a few times."""
    need("qemu-img")
    opts = f"encrypt.format={fmt},encrypt.key-secret=sec0"
    last = None
    for attempt in range(10):
        extra = f",encrypt.iter-time={100 + 50 * attempt}" if fmt == "luks" else ""
        last = qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456",
                        "-o", opts + extra, path, "16M", check=False)
        if last.returncode == 0:
            return
    raise AssertionError(f"could not create a {fmt} image: {last.stderr}")


@pytest.mark.parametrize("fmt", ["luks", "aes"])
def test_encrypted_image_is_refused_at_open(fmt, tmp_path):
    p = tmp_path / f"{fmt}.qcow2"
    _create_encrypted(p, fmt)
    # give it guest data, so reading ciphertext as plain data would be visible
    w = subprocess.run(["qemu-io", "--object", "secret,id=sec0,data=123456", "--image-opts",
                        f"driver=qcow2,file.filename={p},encrypt.key-secret=sec0",
                        "-c", "write -P 0x5a 0 1M"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    assert w.returncode == 0 and "wrote" in w.stdout, w
    assert info_json(p)["encrypted"] is True
    with pytest.raises(qcow2py.UnsupportedFeatureError, match="encrypt"):
        qcow2py.open(str(p))
    # an overlay over an encrypted base cannot be read either
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", p.name, "-F", "qcow2", top.name, "16M",
             cwd=tmp_path)
    with pytest.raises(qcow2py.UnsupportedFeatureError, match="encrypt"):
        qcow2py.open(str(top))
    r = subprocess.run([sys.executable, "-m", "qcow2py", "info", "--output=json", p.name],
                       cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 1 and r.stdout == "" and "encrypt" in r.stderr, r


def test_zero_clusters_hide_backing_data(tmp_path):
    """The bug pyqcow has: a zero-flagged cluster over backing data must read zeros."""
    base = tmp_path / "base.qcow2"
    create(base, 16 * MiB)
    run_io(base, ["write -P 0xab 0 4M"])
    top = tmp_path / "top.qcow2"
    create(top, 16 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=tmp_path)
    run_io(top, ["write -z 64k 64k", "write -z -u 1M 192k", "discard 2M 64k",
                 "write -P 0xcd 3M 64k", "write -z 3M 4k"])
    with qcow2py.open(str(top)) as img:
        assert img.read(64 * KiB, 64 * KiB) == bytes(64 * KiB)
        assert img.read(1 * MiB, 192 * KiB) == bytes(192 * KiB)
        assert img.read(2 * MiB, 64 * KiB) == bytes(64 * KiB)
        assert img.read(3 * MiB, 4 * KiB) == bytes(4 * KiB)
        assert img.read(3 * MiB + 4 * KiB, 60 * KiB) == b"\xcd" * (60 * KiB)
        assert img.read(0, 64 * KiB) == b"\xab" * (64 * KiB)
        assert img.read(128 * KiB - 10, 20) == bytes(10) + b"\xab" * 10


def test_metadata_preallocation_reports_holes_as_zero(tmp_path):
    """QEMU reports data clusters whose host range is a file hole as zero (block status
    recursion after its metadata-preallocation heuristic); so must qcow2py."""
    p = tmp_path / "pm.qcow2"
    create(p, 16 * MiB, "preallocation=metadata", cwd=tmp_path)
    run_io(p, ["write -P 7 1M 64k", "write -P 8 5M 100k"])
    settle(tmp_path)
    want = map_json(p.name, cwd=tmp_path)
    assert any(e["data"] and e["zero"] and "offset" in e for e in want), want
    assert any(e["data"] and not e["zero"] for e in want), want
    with qcow2py.open(str(p)) as img:
        assert img.metadata_preallocated
        assert img.map() == want
    # a normally allocated image of the same content is not taken for one
    q = tmp_path / "plain.qcow2"
    create(q, 16 * MiB, cwd=tmp_path)
    run_io(q, ["write -P 7 1M 64k", "write -P 8 5M 100k"])
    with qcow2py.open(str(q)) as img:
        assert not img.metadata_preallocated


def test_data_file_name_resolves_next_to_the_image(tmp_path, monkeypatch):
    """Known difference: QEMU 7.2 opens a relative external data file name against
    its working directory (so it maps and reads such images only from their folder;
    ``info`` does not open the data file); qcow2py resolves the name against the
    image's folder, as it does backing names."""
    (tmp_path / "img").mkdir()
    p = tmp_path / "img" / "df.qcow2"
    create(p, 16 * MiB, "data_file=df.data", cwd=p.parent)
    run_io(p, ["write -P 0x42 1M 1M", "write -z 3M 64k"])
    ref = reference(p, tmp_path)
    away = qemu_img("map", "--output=json", "img/df.qcow2", cwd=tmp_path, check=False)
    assert away.returncode != 0 and "df.data" in away.stderr
    monkeypatch.chdir(tmp_path)
    with qcow2py.open("img/df.qcow2") as img:
        assert img.data_file_path == os.path.join("img", "df.data")
        assert img.read(0, img.size) == ref


PURE_CASES = ["v3-default", "extl2-64k", "compressed-zlib", "zero-over-backing",
              "data-file-extl2", "refcount-bits-1"]


@pytest.mark.parametrize("name", PURE_CASES)
def test_pure_python_twins_agree_with_qemu(name, tmp_path, monkeypatch):
    """The same reads and maps with the C hot path replaced by its numpy twins."""
    from qcow2py import native
    from qcow2py.native import backend_pure
    monkeypatch.setattr(native, "decode_l2", backend_pure.decode_l2)
    monkeypatch.setattr(native, "pread_runs", backend_pure.pread_runs)
    path = CASES[name](tmp_path)
    settle(tmp_path)
    qmap = map_json(path.name, cwd=path.parent)
    check_read(path, tmp_path, qmap)
    with qcow2py.open(str(path)) as img:
        assert img.map() == qmap


@pytest.mark.parametrize("what", ["missing-backing", "protocol-backing", "missing-data-file"])
def test_info_opens_the_image_alone(what, tmp_path):
    """qemu-img info opens only the image: a missing backing file, a backing file
    named by a protocol, or a missing data file do not matter.  Neither for
    ``qcow2py info``; reads and maps of such an image opened with chain=False refuse."""
    p = tmp_path / "top.qcow2"
    if what == "missing-backing":
        create(tmp_path / "base.qcow2", 16 * MiB)
        create(p, 16 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=tmp_path)
        run_io(p, ["write -P 3 1M 64k"])
        (tmp_path / "base.qcow2").unlink()
    elif what == "protocol-backing":
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "nbd+unix:///exp?socket=/nonexistent",
                 "-F", "raw", p.name, "16M", cwd=tmp_path)
    else:
        create(p, 16 * MiB, "data_file=top.data", cwd=tmp_path)
        run_io(p, ["write -P 3 1M 64k"])
        (tmp_path / "top.data").unlink()
    want = qemu_img("info", "--output=json", p.name, cwd=tmp_path).stdout
    assert _ours(["info", "--output=json", p.name], tmp_path, True) == want
    assert qemu_img("info", "--backing-chain", p.name, cwd=tmp_path, check=False).returncode \
        or what == "missing-data-file"
    with qcow2py.open(str(p), chain=False) as img:
        assert img.detached
        assert qemu_json(img.info()) + "\n" == qemu_img("info", "--output=json", p).stdout
        with pytest.raises(qcow2py.BackingChainError, match="chain=False"):
            img.read(0, 512)
        with pytest.raises(qcow2py.BackingChainError, match="chain=False"):
            img.map()
    with pytest.raises(qcow2py.BackingChainError):
        qcow2py.open(str(p))
