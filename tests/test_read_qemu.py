"""Differential reads of the qcow2 format's features: qcow2py against qemu-img /
qemu-io 7.2 (read_oracle.py says what is compared) on images of every
version, cluster size and refcount width, with zero clusters, compressed
clusters (zlib, zstd, packed at unaligned offsets), extended L2 entries, and
empty or odd-sized images; and encrypted images refused.

The shapes include those that broke other Python readers (see
``python-peers.md`` sections 1-2): zero clusters over backing data,
compressed clusters packed at unaligned offsets, extended L2 overlays, a v2
image with header extensions.  Backing chains, data files, snapshots and
preallocation: test_read_qemu_chains.py.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import qcow2py
from qemu import create, info_json, map_json, need, qemu_img
from read_oracle import (KiB, MiB, Cases, agrees_with_qemu, pure_python_twins_agree,
                         qcow2_image, run_io, sources)


CASES = Cases()
case = CASES.case


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
    srcs = sources(d / "src", rng)
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


# ---- compressed extended L2, empty and odd-sized images
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


@pytest.mark.parametrize("name", list(CASES))
def test_agrees_with_qemu(name, tmp_path):
    """Build the image with QEMU, then compare reads, map and info with qemu-img."""
    agrees_with_qemu(CASES, name, tmp_path)


PURE_CASES = ["v3-default", "extl2-64k", "compressed-zlib", "zero-over-backing",
              "refcount-bits-1"]


@pytest.mark.parametrize("name", PURE_CASES)
def test_pure_python_twins_agree_with_qemu(name, tmp_path, monkeypatch):
    """The same reads and maps with the C hot path replaced by its numpy twins."""
    pure_python_twins_agree(CASES, name, tmp_path, monkeypatch)


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
