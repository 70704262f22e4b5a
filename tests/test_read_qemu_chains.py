"""Differential reads of chains and files: qcow2py against qemu-img / qemu-io 7.2
(read_oracle.py says what is compared) on backing chains (raw and qcow2
backings, shorter or longer than the overlay, ``../`` and absolute names,
probed formats), external data files, snapshots, dirty and bitmapped images,
preallocation, raw images and unicode names; and the ways ``info`` and the
data file name differ from reads.  The format's own features:
test_read_qemu.py.
"""

from __future__ import annotations

import os
import random

import pytest

import qcow2py
from qcow2py.report import qemu_json
from qemu import create, info_json, map_json, qemu_img
from read_oracle import (KiB, MiB, Cases, agrees_with_qemu, cli_output, patch_backing_format_away,
                         populate, pure_python_twins_agree, qcow2_image, reference, run_io,
                         run_io_abort, scatter, settle, sources)


CASES = Cases()
case = CASES.case


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
    cmds = scatter(rng, 16 * MiB, 64 * KiB, 40, sources(d / "src", rng))
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


@pytest.mark.parametrize("name", list(CASES))
def test_agrees_with_qemu(name, tmp_path):
    """Build the image with QEMU, then compare reads, map and info with qemu-img."""
    agrees_with_qemu(CASES, name, tmp_path)


PURE_CASES = ["data-file-extl2"]


@pytest.mark.parametrize("name", PURE_CASES)
def test_pure_python_twins_agree_with_qemu(name, tmp_path, monkeypatch):
    """The same reads and maps with the C hot path replaced by its numpy twins."""
    pure_python_twins_agree(CASES, name, tmp_path, monkeypatch)


# ---------------------------------------------------------------- focused tests
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
    assert cli_output(["info", "--output=json", p.name], tmp_path, True) == want
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
