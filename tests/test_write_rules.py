"""Writer rules: header fidelity, overlap protection, cluster reuse, refusals."""

import struct

import pytest

import qcow2py
from qcow2py.format.header import Header
from qemu import create, info_json, qemu_img, qemu_io

UNKNOWN_EXT = 0x12345678


def _add_unknown_extension(path, payload: bytes, autoclear=0, compat=0):
    raw = bytearray(path.read_bytes())
    h = Header.parse(bytes(raw[:65536]))
    h.unknown_extensions.append((UNKNOWN_EXT, payload))
    h.autoclear_features |= autoclear
    h.compatible_features |= compat
    raw[:65536] = h.encode()
    path.write_bytes(bytes(raw))


def test_header_rewrite_keeps_what_it_does_not_own(tmp_path):
    base = tmp_path / "base.qcow2"
    create(base, "4M")
    path = tmp_path / "img.qcow2"
    create(path, "4M", "compression_type=zstd,lazy_refcounts=on", backing="base.qcow2",
           cwd=tmp_path)
    payload = bytes(range(37))
    _add_unknown_extension(path, payload, autoclear=1 << 7, compat=1 << 9)
    before_bytes = path.read_bytes()[:65536]
    before = Header.parse(before_bytes)
    with qcow2py.open(path, "r+") as img:          # clears the unknown autoclear bit
        img.write(0, b"\x11" * 4096)
    after = Header.parse(path.read_bytes()[:65536])
    assert after.unknown_extensions == [(UNKNOWN_EXT, payload)]
    assert after.autoclear_features == before.autoclear_features & ~(1 << 7)
    assert after.compatible_features == before.compatible_features     # lazy + bit 9 kept
    assert after.compression_type == 1 and after.incompatible_features & 8
    assert (after.backing_file, after.backing_format) == ("base.qcow2", "qcow2")
    assert after.feature_table == before.feature_table
    # everything but the autoclear field is the same, byte for byte
    after_bytes = path.read_bytes()[:65536]
    assert after_bytes[:88] == before_bytes[:88] and after_bytes[96:] == before_bytes[96:]
    assert qemu_img("check", path, check=False).returncode == 0
    assert info_json(path)["format-specific"]["data"]["compression-type"] == "zstd"


def test_overlap_with_metadata_marks_the_image_corrupt(tmp_path):
    path = tmp_path / "o.qcow2"
    create(path, "4M")
    qemu_io(path, "write -P 1 0 64k")
    raw = bytearray(path.read_bytes())
    h = Header.parse(bytes(raw[:65536]))
    l2_off = struct.unpack_from(">Q", raw, h.l1_table_offset)[0] & 0x00FFFFFFFFFFFE00
    # point guest cluster 0 at the L1 table (COPIED set, so it would be written in place)
    struct.pack_into(">Q", raw, l2_off, h.l1_table_offset | (1 << 63))
    path.write_bytes(bytes(raw))
    img = qcow2py.open(path, "r+")
    with pytest.raises(qcow2py.CorruptImageError, match=r"Preventing invalid write on metadata "
                                                    r"\(overlaps with active L1 table\)"):
        img.write(0, b"\xff" * 512)
    with pytest.raises(qcow2py.CorruptImageError):
        img.write(1 << 20, b"\xff")                 # no further writes
    img.close()
    assert info_json(path)["format-specific"]["data"]["corrupt"] is True
    l1 = path.read_bytes()[h.l1_table_offset:h.l1_table_offset + 8]
    assert l1 == bytes(raw[h.l1_table_offset:h.l1_table_offset + 8])   # L1 untouched
    with pytest.raises(qcow2py.CorruptImageError):
        qcow2py.open(path, "r+")


def test_freed_clusters_are_reused(tmp_path):
    path = tmp_path / "r.qcow2"
    with qcow2py.create(path, 64 << 20) as img:
        img.write(0, b"\x22" * (8 << 20))
        img.flush()
        size_full = path.stat().st_size
        img.discard(0, 8 << 20)
        img.flush()
        img.write(16 << 20, b"\x33" * (8 << 20))
        img.flush()
        assert path.stat().st_size <= size_full + 65536
        assert img.read(0, 4096) == bytes(4096)
    assert qemu_img("check", path, check=False).returncode == 0


def test_copied_flag_exact_after_snapshot_and_rewrite(tmp_path):
    path = tmp_path / "s.qcow2"
    create(path, "8M")
    qemu_io(path, "write -P 1 0 2M")
    qemu_img("snapshot", "-c", "s", path)
    with qcow2py.open(path, "r+") as img:
        img.write(65536, b"\x02" * 65536)          # COW of a shared L2 and data cluster
        img.write_zeroes(0, 65536)                 # shared cluster: becomes a plain zero
        res = img.check()
        assert (res.corruptions, res.leaks) == (0, 0)
    out = qemu_img("check", path, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_read_only_images_refuse_writes(tmp_path):
    path = tmp_path / "ro.qcow2"
    create(path, "1M")
    before = path.read_bytes()
    with qcow2py.open(path) as img:
        for call in (lambda: img.write(0, b"x"), lambda: img.write_zeroes(0, 512),
                     lambda: img.discard(0, 65536)):
            with pytest.raises(ValueError, match="read-only"):
                call()
    assert path.read_bytes() == before


def test_writes_mark_persistent_bitmaps(tmp_path):
    # images with bitmaps are written, and the bitmaps kept up to date (tests/test_bitmaps.py)
    path = tmp_path / "b.qcow2"
    create(path, "4M")
    qemu_img("bitmap", "--add", path, "b0")
    with qcow2py.open(path, "r+") as img:
        img.write(0, b"x")
        assert img.find_bitmap("b0").dirty_extents() == [(0, 65536)]
    assert qemu_img("check", path, check=False).returncode == 0
