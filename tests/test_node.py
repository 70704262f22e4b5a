"""The node protocol on images: block_status through a chain, seeded sub-ranges."""

from __future__ import annotations

import random

import pytest

import qcow2py
from qcow2py.node import BlockKind, Extent, Node, merge_extents

from qemu import create, qemu_img, qemu_io

KiB, MiB = 1024, 1 << 20


@pytest.fixture
def chain(tmp_path):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    create(base, 4 * MiB, "cluster_size=65536")
    qemu_io(base, "write -P 0x11 0 1M", "write -z 2M 64k", "write -c -P 0x22 3M 64k")
    create(top, 4 * MiB, "cluster_size=65536", backing=base.name, backing_fmt="qcow2",
           cwd=tmp_path)
    qemu_io(top, "write -P 0x33 512k 128k", "write -z 64k 64k", "discard 3M 64k")
    return top, base


def test_image_is_a_node(chain):
    top, _ = chain
    with qcow2py.open(top) as img:
        assert isinstance(img, Node)
        assert img.read_only
    with qcow2py.open(top, "r+") as img:
        assert not img.read_only


def test_block_status_matches_map_and_chain(chain):
    top, base = chain
    with qcow2py.open(top) as img:
        ext = img.block_status(0, img.size)
        assert ext[0].offset == 0 and ext[-1].end == img.size
        assert all(a.end == b.offset for a, b in zip(ext, ext[1:]))
        assert merge_extents(ext) == ext
        by_kind = {(e.kind, e.depth) for e in ext}
        assert (BlockKind.DATA, 0) in by_kind and (BlockKind.DATA, 1) in by_kind
        assert (BlockKind.ZERO, 0) in by_kind and (BlockKind.COMPRESSED, 1) not in by_kind
        assert (BlockKind.ZERO, 1) in by_kind          # write -z in the base at 2M
        for e in ext:
            if e.kind == BlockKind.DATA:
                want = str(top) if e.depth == 0 else str(base)
                assert e.host_file.endswith(want.rsplit("/", 1)[1])
                layer = qcow2py.open(e.host_file)
                layer.close()
        # the map is built from block_status: same runs, qemu-img's verdict
        import json
        ref = json.loads(qemu_img("map", "--output=json", top).stdout)
        assert img.map() == ref


@pytest.mark.parametrize("seed", range(20))
def test_block_status_subranges_agree(chain, seed):
    rng = random.Random(seed)
    top, _ = chain
    with qcow2py.open(top) as img:
        whole = img.block_status(0, img.size)
        off = rng.randrange(0, img.size)
        n = rng.randrange(1, img.size - off + 1)
        part = img.block_status(off, n)
        assert part[0].offset == off and part[-1].end == off + n, f"seed {seed}"
        for e in part:
            outer = next(w for w in whole if w.offset <= e.offset < w.end)
            assert e.end <= outer.end and (e.kind, e.depth) == (outer.kind, outer.depth), seed
            if e.host_offset is not None:
                assert e.host_offset == outer.host_offset + (e.offset - outer.offset), seed


def test_block_status_clips_and_refuses(chain):
    top, _ = chain
    with qcow2py.open(top) as img:
        assert img.block_status(img.size, 10) == []
        assert img.block_status(img.size - 512, 4096)[-1].end == img.size
        with pytest.raises(ValueError):
            img.block_status(-1, 10)
    with pytest.raises(qcow2py.ImageClosedError):
        img.block_status(0, 10)


def test_raw_block_status(tmp_path):
    p = tmp_path / "r.raw"
    with open(p, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(1 * MiB)
        f.write(b"x" * 65536)
    with qcow2py.open(p) as img:
        ext = img.block_status(0, img.size)
        data = [e for e in ext if e.data]
        assert data == [Extent(1 * MiB, 65536, BlockKind.DATA, 0, 1 * MiB, str(p))]
        assert all(e.zero for e in ext if not e.data)
