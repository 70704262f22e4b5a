"""Bad input in the header and the metadata it points to (L1 and refcount tables,
snapshots, backing name, header extensions, bitmaps): every problem found at
open is a Qcow2Error naming the problem.

Each test pokes bad values into a real image (bad_images.py) and checks the
exception class and a fragment of its message.  Nothing here may surface as
IndexError, struct.error, KeyError, OverflowError or MemoryError.
"""

from __future__ import annotations

import os
import struct

import pytest

import qcow2py
from qcow2py import CorruptImageError, FormatError, UnsupportedFeatureError
from qcow2py.format.header import EXT_FEATURE_TABLE

from bad_images import (AUTOCLEAR, BF_OFF, BF_SIZE, CLUSTER_BITS, COMPAT, COMPRESSION_TYPE, COPIED,
                        CRYPT, HEADER_LENGTH, INCOMPAT, L1_OFF, L1_SIZE, NB_SNAP, REFCOUNT_ORDER,
                        RT_CLUSTERS, RT_OFF, SIZE, SNAP_OFF, VERSION, backed, header, image,
                        insert_in_cluster0, l1_entry_offset, open_fails, opens_as_qemu, peek, poke,
                        walk_extensions)
from qemu import qemu_img


# ----------------------------------------------------------------- the fixed header
def test_bad_magic(tmp_path):
    p = image(tmp_path)
    poke(p, 0, "I", 0x12345678)
    open_fails(p, FormatError, "bad magic", "0x12345678", format="qcow2")


@pytest.mark.parametrize("version", [1, 4])
def test_bad_version(tmp_path, version):
    p = image(tmp_path)
    poke(p, VERSION, "I", version)
    open_fails(p, UnsupportedFeatureError, f"version {version}")


@pytest.mark.parametrize("bits", [8, 22, 0, 63, 0xFFFFFFFF])
def test_bad_cluster_bits(tmp_path, bits):
    p = image(tmp_path)
    poke(p, CLUSTER_BITS, "I", bits)
    open_fails(p, FormatError, "cluster size", f"2^{bits}")


@pytest.mark.parametrize("length, fragment", [
    (96, "header_length 96"), (0, "header_length 0"),
    (65536 + 8, "exceeds the cluster size"), (0xFFFFFFF8, "exceeds the cluster size"),
    (108, "not a multiple of 8"),
])
def test_bad_header_length(tmp_path, length, fragment):
    p = image(tmp_path)
    poke(p, HEADER_LENGTH, "I", length)
    open_fails(p, FormatError, fragment)


def _add_feature_name(path, kind: int, bit: int, name: str) -> None:
    exts, _ = walk_extensions(path)
    [(pos, _, length)] = [e for e in exts if e[1] == EXT_FEATURE_TABLE]
    entry = bytes([kind, bit]) + name.encode().ljust(46, b"\0")
    insert_in_cluster0(path, pos + 8 + length, entry)
    poke(path, pos + 4, "I", length + 48)


def test_unknown_incompatible_feature_named(tmp_path):
    p = image(tmp_path)
    _add_feature_name(p, 0, 9, "teleportation")
    assert (0, 9, "teleportation") in header(p).feature_table
    poke(p, INCOMPAT, "Q", 1 << 9)
    open_fails(p, UnsupportedFeatureError, "teleportation")


def test_unknown_incompatible_feature_unnamed(tmp_path):
    p = image(tmp_path)
    poke(p, INCOMPAT, "Q", (1 << 40) | (1 << 63))
    open_fails(p, UnsupportedFeatureError, "bit 40", "bit 63")


def test_unknown_compatible_and_autoclear_bits_are_ignored(tmp_path):
    p = image(tmp_path)
    poke(p, COMPAT, "Q", 1 << 33)
    poke(p, AUTOCLEAR, "Q", 1 << 17)
    with qcow2py.open(p) as img:
        assert img.read(0, 4096) == b"\x11" * 4096


@pytest.mark.parametrize("method, kind", [(1, "AES"), (2, "LUKS"), (77, "method 77")])
def test_encrypted(tmp_path, method, kind):
    p = image(tmp_path)
    poke(p, CRYPT, "I", method)
    e = open_fails(p, UnsupportedFeatureError, "encrypted", "not supported", kind)
    assert "crypt" in str(e).lower()


def test_unknown_compression_type(tmp_path):
    p = image(tmp_path)
    poke(p, INCOMPAT, "Q", 1 << 3)
    poke(p, COMPRESSION_TYPE, "B", 7)
    open_fails(p, UnsupportedFeatureError, "compression type 7")


def test_compression_type_without_incompatible_bit(tmp_path):
    p = image(tmp_path)
    poke(p, COMPRESSION_TYPE, "B", 1)
    open_fails(p, FormatError, "compression_type", "bit 3")


@pytest.mark.parametrize("order", [7, 64, 0xFFFFFFFF])
def test_refcount_order_too_large(tmp_path, order):
    p = image(tmp_path)
    poke(p, REFCOUNT_ORDER, "I", order)
    open_fails(p, FormatError, f"refcount_order {order}")


def test_virtual_size_too_large(tmp_path):
    p = image(tmp_path)
    poke(p, SIZE, "Q", 1 << 63)
    open_fails(p, FormatError, "virtual size")


# ----------------------------------------------------------------- L1 table
@pytest.mark.parametrize("entries", [(32 << 20) // 8 + 1, 0xFFFFFFFF])
def test_l1_too_large(tmp_path, entries):
    p = image(tmp_path)
    poke(p, L1_SIZE, "I", entries)
    open_fails(p, FormatError, "L1 table too large", str(entries))


def test_l1_too_small(tmp_path):
    p = image(tmp_path)
    poke(p, L1_SIZE, "I", 0)
    open_fails(p, FormatError, "L1 table is too small", "0 entries")


def test_l1_too_small_for_virtual_size(tmp_path):
    p = image(tmp_path)
    poke(p, SIZE, "Q", 1 << 40)          # 1 TiB needs 2048 L1 entries at 64k clusters
    open_fails(p, FormatError, "L1 table is too small", "2048 needed")


def test_l1_offset_unaligned(tmp_path):
    p = image(tmp_path)
    poke(p, L1_OFF, "Q", header(p).l1_table_offset + 512)
    open_fails(p, FormatError, "L1 table offset", "not cluster aligned")


@pytest.mark.parametrize("table, refusal", [("L1 table", "L1 table.*past the end"),
                                            ("L1 entry", "L1 entry 0.*0x10000000000.*past")])
def test_l1_or_l2_table_beyond_eof(tmp_path, table, refusal):
    # QEMU reads a table past the end of the file as zeros: nothing allocated;
    # "r+" refuses to build on them
    p = image(tmp_path)
    if table == "L1 table":
        poke(p, L1_OFF, "Q", 1 << 40)
    else:
        poke(p, l1_entry_offset(p), "Q", COPIED | (1 << 40))
    opens_as_qemu(p, tmp_path)
    with qcow2py.open(p) as img:
        assert img.read(0, 65536) == bytes(65536)
    with pytest.raises(CorruptImageError, match=refusal):
        qcow2py.open(p, "r+")


def test_l1_offset_beyond_max(tmp_path):
    p = image(tmp_path)
    offset = (1 << 64) - (1 << 16)
    poke(p, L1_OFF, "Q", offset)
    assert qemu_img("info", p, check=False).returncode == 1
    open_fails(p, FormatError, "L1 table", f"{offset:#x}")


def test_l1_offset_zero(tmp_path):
    p = image(tmp_path)
    poke(p, L1_OFF, "Q", 0)
    open_fails(p, FormatError, "L1 table offset is 0")


def test_l1_entry_reserved_bits(tmp_path):
    p = image(tmp_path)
    off = l1_entry_offset(p)
    poke(p, off, "Q", peek(p, off, "Q") | 1 | (1 << 57))
    open_fails(p, CorruptImageError, "L1 entry 0", "reserved bits")


def test_l1_entry_unaligned_l2(tmp_path):
    p = image(tmp_path)
    off = l1_entry_offset(p)
    poke(p, off, "Q", peek(p, off, "Q") + 512)
    open_fails(p, CorruptImageError, "L1 entry 0", "not cluster aligned")


# ----------------------------------------------------------------- refcount table
def test_refcount_table_offset_zero(tmp_path):
    p = image(tmp_path)
    poke(p, RT_OFF, "Q", 0)
    open_fails(p, FormatError, "reference count table")


def test_refcount_table_unaligned(tmp_path):
    p = image(tmp_path)
    poke(p, RT_OFF, "Q", header(p).refcount_table_offset + 8)
    open_fails(p, FormatError, "refcount table offset", "not cluster aligned")


def test_refcount_table_beyond_eof(tmp_path):
    p = image(tmp_path)
    poke(p, RT_OFF, "Q", 1 << 36)
    opens_as_qemu(p, tmp_path)          # reading needs no refcounts
    with pytest.raises(CorruptImageError, match="refcount table.*past the end"):
        qcow2py.open(p, "r+")


@pytest.mark.parametrize("clusters", [(8 << 20) // 65536 + 1, 0xFFFFFFFF])
def test_refcount_table_too_large(tmp_path, clusters):
    p = image(tmp_path)
    poke(p, RT_CLUSTERS, "I", clusters)
    open_fails(p, FormatError, "refcount table too large", str(clusters))


# ----------------------------------------------------------------- snapshots
def _snap_image(tmp_path):
    p = image(tmp_path)
    qemu_img("snapshot", "-c", "snap1", p)
    return p


def test_too_many_snapshots(tmp_path):
    p = _snap_image(tmp_path)
    poke(p, NB_SNAP, "I", 65537)
    open_fails(p, FormatError, "too many snapshots", "65537")


def test_snapshot_table_beyond_eof(tmp_path):
    # QEMU reads a zeroed table: one snapshot without id or name
    p = _snap_image(tmp_path)
    poke(p, SNAP_OFF, "Q", 1 << 36)
    opens_as_qemu(p, tmp_path)
    with pytest.raises(CorruptImageError, match="snapshot table.*past the end"):
        qcow2py.open(p, "r+")


def test_snapshot_table_unaligned(tmp_path):
    p = _snap_image(tmp_path)
    poke(p, SNAP_OFF, "Q", header(p).snapshots_offset + 8)
    open_fails(p, FormatError, "snapshot table", "not cluster aligned")


def test_snapshot_table_truncated(tmp_path):
    p = _snap_image(tmp_path)
    h = header(p)
    assert h.l1_table_offset < h.snapshots_offset
    os.truncate(p, h.snapshots_offset + 48)        # entry is 40 + 24 extra + id + name
    opens_as_qemu(p, tmp_path)                     # the rest of the entry reads as zeros


def test_snapshot_count_past_table(tmp_path):
    p = _snap_image(tmp_path)
    h = header(p)
    # the first entry claims 65535 bytes of name: runs past the end of the file
    poke(p, h.snapshots_offset + 14, "H", 65535)
    os.truncate(p, h.snapshots_offset + h.cluster_size)
    opens_as_qemu(p, tmp_path)                     # the name is read with zeros past EOF


def test_snapshot_extra_data_too_large(tmp_path):
    p = _snap_image(tmp_path)
    poke(p, header(p).snapshots_offset + 36, "I", 0xFFFFFFFF)
    open_fails(p, FormatError, "snapshot 0", "extra data")


# ----------------------------------------------------------------- backing name, extensions
def test_backing_name_too_long(tmp_path):
    p = backed(tmp_path)
    poke(p, BF_SIZE, "I", 1024)
    open_fails(p, FormatError, "backing file name too long", "1024")


def test_backing_name_past_cluster(tmp_path):
    p = backed(tmp_path)
    poke(p, BF_OFF, "Q", 65536 - 4)
    open_fails(p, FormatError, "backing file name")


@pytest.mark.parametrize("offset", [65536 + 8, 1 << 63])
def test_backing_offset_beyond_cluster(tmp_path, offset):
    p = backed(tmp_path)
    poke(p, BF_OFF, "Q", offset)
    open_fails(p, FormatError, "backing file offset", str(offset))


def test_backing_name_not_utf8(tmp_path):
    p = backed(tmp_path)
    poke(p, header(p).backing_file_offset, "B", 0xFF)
    open_fails(p, FormatError, "backing file", "UTF-8")


@pytest.mark.parametrize("length", [70000, 0xFFFFFFFF, 65536 - 120 + 1])
def test_extension_runs_past_cluster0(tmp_path, length):
    p = image(tmp_path)
    exts, _ = walk_extensions(p)
    poke(p, exts[0][0] + 4, "I", length)
    open_fails(p, FormatError, "header extension", f"{length} bytes", "runs past")


def test_extension_area_without_end_marker(tmp_path):
    # unknown extensions filling cluster 0 with no end marker: QEMU stops at the end
    p = image(tmp_path)
    exts, end = walk_extensions(p)
    poke(p, end, "II", 0x12345678, 65536 - end - 8)
    with qcow2py.open(p) as img:
        assert img.header.unknown_extensions[0][0] == 0x12345678


def test_duplicate_extension(tmp_path):
    p = image(tmp_path)
    _, end = walk_extensions(p)
    entry = bytes([0, 20]) + b"again".ljust(46, b"\0")
    insert_in_cluster0(p, end, struct.pack(">II", EXT_FEATURE_TABLE, 48) + entry)
    # QEMU takes a repeated extension (the last one wins): so does qcow2py
    with qcow2py.open(p) as img:
        assert img.header.feature_name(0, 20) == "again"


def test_feature_table_bad_length(tmp_path):
    p = image(tmp_path)
    exts, _ = walk_extensions(p)
    [(pos, _, length)] = [e for e in exts if e[1] == EXT_FEATURE_TABLE]
    poke(p, pos + 4, "I", length - 1)
    # QEMU reads the whole 48-byte entries of any length: so does qcow2py
    with qcow2py.open(p) as img:
        assert len(img.header.feature_table) == (length - 1) // 48


def test_bitmaps_extension_too_short(tmp_path):
    p = _bitmap_image(tmp_path)
    exts, _ = walk_extensions(p)
    [(pos, _, _)] = [e for e in exts if e[1] == 0x23852875]
    poke(p, pos + 4, "I", 16)
    open_fails(p, FormatError, "bitmaps extension", "16")


# ----------------------------------------------------------------- bitmaps
def _bitmap_image(tmp_path):
    p = image(tmp_path, "bm.qcow2")
    qemu_img("bitmap", "--add", p, "bm0")
    return p


def _bitmap_dir(p):
    h = header(p)
    assert h.bitmaps is not None
    return h.bitmaps


def test_bitmap_bad_granularity(tmp_path):
    p = _bitmap_image(tmp_path)
    poke(p, _bitmap_dir(p).directory_offset + 17, "B", 8)
    open_fails(p, FormatError, "bm0", "granularity bits 8")


def test_bitmap_entries_past_directory(tmp_path):
    p = _bitmap_image(tmp_path)
    exts, _ = walk_extensions(p)
    [(pos, _, _)] = [e for e in exts if e[1] == 0x23852875]
    poke(p, pos + 8, "I", 2)                      # nb_bitmaps: 2, directory holds 1
    open_fails(p, FormatError, "bitmap directory entry 1", "runs past")


def test_bitmap_name_past_directory(tmp_path):
    p = _bitmap_image(tmp_path)
    poke(p, _bitmap_dir(p).directory_offset + 18, "H", 1000)
    open_fails(p, FormatError, "bitmap directory entry 0", "runs past")


def test_bitmap_directory_beyond_eof(tmp_path):
    p = _bitmap_image(tmp_path)
    exts, _ = walk_extensions(p)
    [(pos, _, _)] = [e for e in exts if e[1] == 0x23852875]
    poke(p, pos + 24, "Q", 1 << 40)
    # read as zeros past the end of the file (as QEMU reads it), the entry is invalid
    assert "doesn't satisfy the constraints" in qemu_img("info", p, check=False).stderr
    open_fails(p, FormatError, "bitmap directory entry 0", "name size 0")


def test_bitmap_directory_too_large(tmp_path):
    p = _bitmap_image(tmp_path)
    exts, _ = walk_extensions(p)
    [(pos, _, _)] = [e for e in exts if e[1] == 0x23852875]
    poke(p, pos + 16, "Q", 1 << 62)
    open_fails(p, FormatError, "bitmap directory too large")


def test_bitmap_directory_unaligned(tmp_path):
    p = _bitmap_image(tmp_path)
    exts, _ = walk_extensions(p)
    [(pos, _, _)] = [e for e in exts if e[1] == 0x23852875]
    poke(p, pos + 24, "Q", _bitmap_dir(p).directory_offset + 8)
    open_fails(p, FormatError, "bitmap directory offset", "not cluster aligned")


@pytest.mark.parametrize("field, value, fragment", [
    (4, 7, "reserved field is 0x7"), (0, 0, "zero bitmaps"), (0, 65536, "too many bitmaps"),
])
def test_bitmaps_extension_fields(tmp_path, field, value, fragment):
    p = _bitmap_image(tmp_path)
    exts, _ = walk_extensions(p)
    [(pos, _, _)] = [e for e in exts if e[1] == 0x23852875]
    poke(p, pos + 8 + field, "I", value)
    open_fails(p, FormatError, fragment)


def test_bitmap_stale_extension_is_ignored(tmp_path):
    # without autoclear bit 0 the extension is stale: QEMU ignores it (spec)
    p = _bitmap_image(tmp_path)
    poke(p, _bitmap_dir(p).directory_offset + 17, "B", 8)
    poke(p, AUTOCLEAR, "Q", 0)
    with qcow2py.open(p) as img:
        assert img.bitmaps == []
