"""Bad input: every problem with an image is a Qcow2Error naming the problem.

Each test builds a real image with qemu-img/qemu-io, then pokes big-endian
values at known header offsets or table entries (offsets from the spec, see
the reference section 1.1) and checks the exception class and a fragment of
its message.  Nothing here may surface as IndexError, struct.error,
KeyError, OverflowError or MemoryError.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tracemalloc

import pytest

import qcow2py
from qcow2py import (BackingChainError, BackingPolicy, CorruptImageError, FormatError,
                     Qcow2Error, UnsupportedFeatureError)
from qcow2py.cli import copy as copy_cli, img as img_cli
from qcow2py.format.header import EXT_FEATURE_TABLE, Header

from qemu import create, qemu_img, qemu_io

# header field offsets (spec; reference 1.1)
VERSION, BF_OFF, BF_SIZE, CLUSTER_BITS, SIZE, CRYPT = 4, 8, 16, 20, 24, 32
L1_SIZE, L1_OFF, RT_OFF, RT_CLUSTERS, NB_SNAP, SNAP_OFF = 36, 40, 48, 56, 60, 64
INCOMPAT, COMPAT, AUTOCLEAR, REFCOUNT_ORDER, HEADER_LENGTH = 72, 80, 88, 96, 100
COMPRESSION_TYPE = 104

COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00


# ----------------------------------------------------------------- helpers
def poke(path, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">" + fmt, *values))


def peek(path, offset: int, fmt: str):
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(struct.calcsize(">" + fmt))
    v = struct.unpack(">" + fmt, data)
    return v[0] if len(v) == 1 else v


def header(path) -> Header:
    with open(path, "rb") as f:
        data = f.read(2 << 20)
    cs = 1 << struct.unpack_from(">I", data, CLUSTER_BITS)[0]
    return Header.parse(data[:cs], os.path.getsize(path))


def image(tmp_path, name="t.qcow2", size="4M", *opts, writes=("write -P 0x11 0 128k",),
          backing=None, backing_fmt=None):
    """A qemu-made image with some data in it."""
    path = tmp_path / name
    create(path, size, *opts, backing=backing, backing_fmt=backing_fmt)
    if writes:
        qemu_io(path, *writes)
    return path


def l1_entry_offset(path, index=0) -> int:
    return header(path).l1_table_offset + 8 * index


def l2_entry_offset(path, guest_cluster=0) -> int:
    """File offset of the L2 entry (first word) mapping ``guest_cluster``."""
    h = header(path)
    per = h.l2_entries
    l1e = peek(path, h.l1_table_offset + 8 * (guest_cluster // per), "Q")
    l2 = l1e & OFFSET_MASK
    assert l2, "guest cluster has no L2 table"
    return l2 + (guest_cluster % per) * h.l2_entry_size


def check_msg(err: BaseException, *fragments: str) -> None:
    msg = str(err)
    for frag in fragments:
        assert frag.lower() in msg.lower(), f"{frag!r} not in message {msg!r}"


def open_fails(path, exc, *fragments, **kw):
    with pytest.raises(exc) as ei:
        qcow2py.open(path, **kw).close()
    assert isinstance(ei.value, Qcow2Error)
    check_msg(ei.value, *fragments)
    return ei.value


def read_fails(path, exc, *fragments, offset=0, length=65536, **kw):
    with qcow2py.open(path, **kw) as img:
        with pytest.raises(exc) as ei:
            img.read(offset, length)
    assert isinstance(ei.value, Qcow2Error)
    check_msg(ei.value, *fragments)
    return ei.value


def _ours(main, *args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    assert "Traceback" not in err.getvalue()
    return rc, out.getvalue(), err.getvalue()


def _info(text):
    d = json.loads(text)
    d.pop("actual-size", None)
    return d


def opens_as_qemu(path, tmp_path, converts: bool = True) -> None:
    """QEMU opens this image, reading zeros past the end of the file: qcow2py gives
    the same info and map, and converts it to the same bytes (or both fail to)."""
    q = qemu_img("info", "--output=json", path)
    rc, out, err = _ours(img_cli.main, "info", "--output=json", path)
    assert rc == 0 and _info(out) == _info(q.stdout), err
    q = qemu_img("map", "--output=json", path)
    rc, out, err = _ours(img_cli.main, "map", "--output=json", path)
    assert rc == 0 and json.loads(out) == json.loads(q.stdout), err
    qraw, oraw = tmp_path / "q.raw", tmp_path / "o.raw"
    q = qemu_img("convert", "-O", "raw", path, qraw, check=False)
    rc, out, err = _ours(copy_cli.main, "-O", "raw", path, oraw)
    assert (q.returncode, rc) == ((0, 0) if converts else (1, 1)), (q.stderr, err)
    if converts:
        assert oraw.read_bytes() == qraw.read_bytes()


def walk_extensions(path):
    """[(offset_of_ext_header, magic, length)] of cluster 0, end marker excluded."""
    h = header(path)
    pos = h.header_length if h.version == 3 else 72
    out = []
    with open(path, "rb") as f:
        data = f.read(h.cluster_size)
    while True:
        magic, length = struct.unpack_from(">II", data, pos)
        if magic == 0:
            return out, pos
        out.append((pos, magic, length))
        pos += 8 + ((length + 7) & ~7)


def insert_in_cluster0(path, at: int, blob: bytes) -> None:
    """Insert ``blob`` at ``at`` in cluster 0, shifting the rest of the cluster down."""
    cs = header(path).cluster_size
    with open(path, "r+b") as f:
        c0 = f.read(cs)
        assert c0[cs - len(blob):] == bytes(len(blob))
        c0 = c0[:at] + blob + c0[at:cs - len(blob)]
        f.seek(0)
        f.write(c0)


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
def _backed(tmp_path):
    image(tmp_path, "base.qcow2")
    return image(tmp_path, "top.qcow2", writes=(), backing="base.qcow2", backing_fmt="qcow2")


def test_backing_name_too_long(tmp_path):
    p = _backed(tmp_path)
    poke(p, BF_SIZE, "I", 1024)
    open_fails(p, FormatError, "backing file name too long", "1024")


def test_backing_name_past_cluster(tmp_path):
    p = _backed(tmp_path)
    poke(p, BF_OFF, "Q", 65536 - 4)
    open_fails(p, FormatError, "backing file name")


@pytest.mark.parametrize("offset", [65536 + 8, 1 << 63])
def test_backing_offset_beyond_cluster(tmp_path, offset):
    p = _backed(tmp_path)
    poke(p, BF_OFF, "Q", offset)
    open_fails(p, FormatError, "backing file offset", str(offset))


def test_backing_name_not_utf8(tmp_path):
    p = _backed(tmp_path)
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


# ----------------------------------------------------------------- L2 tables (read time)
def test_l2_entry_reserved_bits(tmp_path):
    p = image(tmp_path)
    off = l2_entry_offset(p, 0)
    poke(p, off, "Q", peek(p, off, "Q") | 2)
    read_fails(p, CorruptImageError, "L2 entry 0", "reserved bits")
    with qcow2py.open(p) as img:
        with pytest.raises(CorruptImageError, match="reserved bits"):
            img.map()


def test_l2_entry_unaligned_host_offset(tmp_path):
    p = image(tmp_path)
    off = l2_entry_offset(p, 1)
    poke(p, off, "Q", peek(p, off, "Q") + 512)
    read_fails(p, CorruptImageError, "L2 entry 1", "not cluster aligned", offset=65536)


def test_l2_data_cluster_beyond_eof(tmp_path):
    # QEMU reads a data cluster past the end of the file as zeros (check reports it)
    p = image(tmp_path)
    poke(p, l2_entry_offset(p, 0), "Q", COPIED | (1 << 40))
    opens_as_qemu(p, tmp_path)
    with qcow2py.open(p) as img:
        assert img.read(0, 65536) == bytes(65536)
        assert img.read(65536, 65536) == b"\x11" * 65536


def test_compressed_cluster_garbage(tmp_path):
    p = image(tmp_path, writes=("write -c -P 0x33 0 64k",))
    l2e = peek(p, l2_entry_offset(p, 0), "Q")
    assert l2e & COMPRESSED
    coff = l2e & ((1 << (62 - 8)) - 1)
    poke(p, coff, "16s", b"\xff" * 16)
    read_fails(p, CorruptImageError, "compressed cluster", "does not decompress")


def test_compressed_cluster_short(tmp_path):
    # a valid deflate stream of 100 bytes where a 64 KiB cluster is expected
    import zlib
    p = image(tmp_path, writes=("write -c -P 0x33 0 64k",))
    off = l2_entry_offset(p, 0)
    coff = peek(p, off, "Q") & ((1 << 54) - 1)
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    stream = c.compress(b"x" * 100) + c.flush()
    poke(p, coff, f"{len(stream)}s", stream)
    read_fails(p, CorruptImageError, "compressed cluster", "100 bytes")


def test_compressed_cluster_past_eof(tmp_path):
    p = image(tmp_path, writes=("write -c -P 0x33 0 64k",))
    off = l2_entry_offset(p, 0)
    poke(p, off, "Q", COMPRESSED | (1 << 40))
    # read as zeros, the stream does not decompress: EIO in QEMU, which opens it
    opens_as_qemu(p, tmp_path, converts=False)
    read_fails(p, CorruptImageError, "compressed cluster", "does not decompress")


def test_compressed_with_copied_flag(tmp_path):
    p = image(tmp_path, writes=("write -c -P 0x33 0 64k",))
    off = l2_entry_offset(p, 0)
    poke(p, off, "Q", peek(p, off, "Q") | COPIED)
    read_fails(p, CorruptImageError, "L2 entry 0", "reserved bits")


def _zstd_rle_bomb(blocks: int, byte: int = 0x5A) -> bytes:
    """A zstd frame of ``blocks`` RLE blocks of 128 KiB each, no content size."""
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    out += bytes([0x00, 0x38])            # no checksum/content size; window 2^17
    for i in range(blocks):
        last = 1 if i == blocks - 1 else 0
        hdr = last | (1 << 1) | ((128 << 10) << 3)      # type 1 = RLE, size 128 KiB
        out += hdr.to_bytes(3, "little") + bytes([byte])
    return bytes(out)


def test_compressed_zstd_bomb_is_bounded(tmp_path):
    """A zstd stream expanding to 2 GiB must yield one cluster, not a 2 GiB buffer."""
    p = image(tmp_path, "z.qcow2", "4M", "compression_type=zstd",
              writes=("write -c -P 0x33 0 64k",))
    off = l2_entry_offset(p, 0)
    l2e = peek(p, off, "Q")
    shift = 62 - (16 - 8)
    coff = l2e & ((1 << shift) - 1)
    bomb = _zstd_rle_bomb((128 * 512 - (coff & 511) - 6) // 4)   # 64 KiB -> 2 GiB
    assert len(bomb) <= 128 * 512 - (coff & 511)
    with open(p, "r+b") as f:
        f.seek(coff)
        f.write(bomb)
    poke(p, off, "Q", COMPRESSED | (127 << shift) | coff)
    tracemalloc.start()
    try:
        with qcow2py.open(p) as img:
            data = img.read(0, 65536)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data == b"\x5a" * 65536          # QEMU stops once a cluster is produced
    assert peak < 64 << 20, f"peak {peak} bytes"


def test_compressed_zstd_garbage(tmp_path):
    p = image(tmp_path, "z.qcow2", "4M", "compression_type=zstd",
              writes=("write -c -P 0x33 0 64k",))
    coff = peek(p, l2_entry_offset(p, 0), "Q") & ((1 << 54) - 1)
    poke(p, coff, "16s", b"\xff" * 16)
    read_fails(p, CorruptImageError, "compressed cluster", "zstd")


def test_extended_l2_alloc_and_zero(tmp_path):
    p = image(tmp_path, "x.qcow2", "4M", "extended_l2=on", "cluster_size=64k")
    off = l2_entry_offset(p, 0)
    bitmap = peek(p, off + 8, "Q")
    assert bitmap & 1
    poke(p, off + 8, "Q", bitmap | (1 << 32))
    read_fails(p, CorruptImageError, "L2 entry 0", "subcluster")


def test_extended_l2_alloc_bits_on_unallocated_cluster(tmp_path):
    p = image(tmp_path, "x.qcow2", "4M", "extended_l2=on", "cluster_size=64k")
    off = l2_entry_offset(p, 0)
    poke(p, off, "QQ", 0, 0xFF)
    read_fails(p, CorruptImageError, "L2 entry 0", "subcluster")


def test_extended_l2_compressed_with_bitmap(tmp_path):
    p = image(tmp_path, "x.qcow2", "4M", "extended_l2=on", "cluster_size=64k",
              writes=("write -c -P 0x33 0 64k",))
    off = l2_entry_offset(p, 0)
    assert peek(p, off, "Q") & COMPRESSED
    poke(p, off + 8, "Q", 1)
    read_fails(p, CorruptImageError, "L2 entry 0", "subcluster")


def test_crypto_extension_without_luks(tmp_path):
    p = image(tmp_path)
    _, end = walk_extensions(p)
    insert_in_cluster0(p, end, struct.pack(">IIQQ", 0x0537BE77, 16, 0x30000, 0x10000))
    open_fails(p, FormatError, "crypto header extension", "crypt_method is 0")


def test_extended_l2_small_clusters(tmp_path):
    p = image(tmp_path, "x.qcow2", "4M", "cluster_size=4k")
    poke(p, INCOMPAT, "Q", 1 << 4)
    open_fails(p, FormatError, "extended L2", "16 KiB", "4096")
    p = image(tmp_path, "y.qcow2", "1M", "cluster_size=4k")
    poke(p, INCOMPAT, "Q", 1 << 4)
    open_fails(p, FormatError, "extended L2", "16 KiB")


def test_map_of_huge_empty_l1_is_fast(tmp_path):
    """128 Ki empty L1 entries (4 GiB of 512-byte clusters) map in one pass, like QEMU."""
    import time
    p = image(tmp_path, "s.qcow2", "1M", "cluster_size=512", writes=("write -P 1 0 16k",))
    h = header(p)
    first = peek(p, h.l1_table_offset, "Q")
    end = -(-os.path.getsize(p) // 512) * 512
    n = (1 << 20) // 8
    with open(p, "r+b") as f:
        f.seek(end)
        f.write(struct.pack(">Q", first) + bytes(n * 8 - 8))
    poke(p, L1_SIZE, "IQ", n, end)
    poke(p, SIZE, "Q", n * 64 * 512)
    t0 = time.monotonic()
    with qcow2py.open(p) as img:
        m = img.map()
        assert img.read(img.size - 4096, 4096) == bytes(4096)
    took = time.monotonic() - t0
    assert m[-1] == {"start": 16384, "length": n * 64 * 512 - 16384, "depth": 0,
                     "present": False, "zero": True, "data": False}
    assert took < 1.0, f"map took {took:.2f} s"


# ----------------------------------------------------------------- backing chains
def test_backing_loop(tmp_path):
    create(tmp_path / "b.qcow2", "1M")
    create(tmp_path / "a.qcow2", "1M", backing="b.qcow2", backing_fmt="qcow2")
    qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", tmp_path / "b.qcow2")
    open_fails(tmp_path / "a.qcow2", BackingChainError, "loops", "a.qcow2")
    open_fails(tmp_path / "b.qcow2", BackingChainError, "loops", "b.qcow2")


def test_backing_self_loop(tmp_path):
    create(tmp_path / "a.qcow2", "1M")
    qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", tmp_path / "a.qcow2")
    open_fails(tmp_path / "a.qcow2", BackingChainError, "loops", "a.qcow2")


def test_backing_self_loop_unprobed(tmp_path):
    # no backing format: the format is probed (qcow2), the loop still caught
    create(tmp_path / "b.qcow2", "1M")
    p = tmp_path / "a.qcow2"
    create(p, "1M", backing="b.qcow2", backing_fmt="qcow2")
    exts, _ = walk_extensions(p)
    [(pos, _, _)] = [e for e in exts if e[1] == 0xE2792ACA]
    poke(p, pos, "I", 0x12345678)          # the backing format becomes an unknown extension
    h = header(p)
    poke(p, h.backing_file_offset, "7s", b"a.qcow2")
    assert header(p).backing_format is None and header(p).backing_file == "a.qcow2"
    open_fails(tmp_path / "a.qcow2", BackingChainError, "loops")


def test_backing_chain_too_deep(tmp_path):
    create(tmp_path / "c0.qcow2", "1M")
    for i in range(1, 6):
        create(tmp_path / f"c{i}.qcow2", "1M", backing=f"c{i - 1}.qcow2", backing_fmt="qcow2")
    open_fails(tmp_path / "c5.qcow2", BackingChainError, "deeper than 3",
               backing_policy=BackingPolicy(max_depth=3))
    with qcow2py.open(tmp_path / "c3.qcow2", backing_policy=BackingPolicy(max_depth=3)) as img:
        assert len(img.chain()) == 4


def test_backing_missing(tmp_path):
    p = _backed(tmp_path)
    os.unlink(tmp_path / "base.qcow2")
    open_fails(p, BackingChainError, "base.qcow2", "not found")


@pytest.mark.parametrize("name, proto", [
    ("nbd://localhost/x", "nbd"),
    ('json:{"file":{"driver":"file","filename":"/etc/passwd"}}', "json"),
    ("http://example.com/disk.img", "http"),
])
def test_backing_protocol_refused(tmp_path, name, proto):
    create(tmp_path / "a.qcow2", "1M")
    qemu_img("rebase", "-u", "-b", name, "-F", "raw", tmp_path / "a.qcow2")
    open_fails(tmp_path / "a.qcow2", BackingChainError, f"protocol '{proto}'", "refuses")


@pytest.mark.timeout(60)          # before the fix, the FIFO blocked the open forever
@pytest.mark.parametrize("name, kind", [(".", "a directory"), ("/", "a directory"),
                                        ("fifo", "a FIFO"), ("/dev/null", "a character device")])
@pytest.mark.parametrize("fmt", ["raw", "qcow2", None])
def test_backing_not_a_regular_file(tmp_path, name, kind, fmt):
    """A directory fails on read and a FIFO blocks open: refuse both up front."""
    os.mkfifo(tmp_path / "fifo")
    p = image(tmp_path, "a.qcow2", "1M", writes=())
    qemu_img("rebase", "-u", "-b", name, "-F", fmt or "raw", p)
    if fmt is None:
        exts, _ = walk_extensions(p)
        [(pos, _, _)] = [e for e in exts if e[1] == 0xE2792ACA]
        poke(p, pos, "I", 0x12345678)     # the format becomes an unknown extension: probe
    open_fails(p, BackingChainError, "backing file", kind)


def test_no_backing_policy(tmp_path):
    p = _backed(tmp_path)
    open_fails(p, BackingChainError, "base.qcow2", "refused",
               backing_policy=qcow2py.NO_BACKING)
    with qcow2py.open(p) as img:                    # the default policy allows it
        assert img.backing is not None


def test_backing_format_unsupported(tmp_path):
    create(tmp_path / "base.raw", "1M", fmt="raw")
    create(tmp_path / "a.qcow2", "1M")
    qemu_img("rebase", "-u", "-b", "base.raw", "-F", "vmdk", tmp_path / "a.qcow2")
    open_fails(tmp_path / "a.qcow2", BackingChainError, "unsupported format 'vmdk'")


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


# ----------------------------------------------------------------- reads and files
def test_read_past_end(tmp_path):
    p = image(tmp_path)
    with qcow2py.open(p) as img:
        with pytest.raises(ValueError, match="past the end"):
            img.read(img.size - 10, 11)
        with pytest.raises(ValueError):
            img.read(img.size + 1, 0)
        assert img.read(img.size, 0) == b""


@pytest.mark.parametrize("offset, length", [(-1, 10), (0, -1), (-(1 << 70), 1)])
def test_read_negative(tmp_path, offset, length):
    p = image(tmp_path)
    with qcow2py.open(p) as img:
        with pytest.raises(ValueError, match="non-negative"):
            img.read(offset, length)
        if offset < 0:
            with pytest.raises(ValueError):
                img.read_into(bytearray(4), offset)


@pytest.mark.parametrize("content", [b"", b"QFI\xfb\x00\x00\x00\x03xx", b"0123456789"])
def test_tiny_file_as_qcow2(tmp_path, content):
    p = tmp_path / "tiny.qcow2"
    p.write_bytes(content)
    open_fails(p, FormatError, "too short", f"{len(content)} bytes", format="qcow2")


def test_zero_length_file_message(tmp_path):
    p = tmp_path / "empty.qcow2"
    p.write_bytes(b"")
    open_fails(p, FormatError, "0 bytes", format="qcow2")


@pytest.mark.parametrize("cut", [72, 80, 100, 103])
def test_truncated_image_refused(tmp_path, cut):
    # cut before the end of the v3 header: its header_length reads as 0, which QEMU
    # refuses ("qcow2 header too short")
    p = image(tmp_path)
    os.truncate(p, cut)
    assert "header too short" in qemu_img("info", p, check=False).stderr
    open_fails(p, FormatError, "header too short", f"{cut} bytes", format="qcow2")


@pytest.mark.parametrize("cut", [104, 112, 120, 512, 4096, 65536, 65536 + 100, 3 * 65536,
                                 4 * 65536 + 100])
def test_truncated_image(tmp_path, cut):
    # QEMU opens these (past the end of the file: zeros), and so does qcow2py
    # (tests/test_truncated.py is the differential test over random cuts)
    p = image(tmp_path)
    os.truncate(p, cut)
    opens_as_qemu(p, tmp_path)


@pytest.mark.parametrize("cut, fragment", [(20, "cluster size"),
                                           (40, "table")])
def test_truncated_v2_header_refused(tmp_path, cut, fragment):
    p = image(tmp_path, "v2.qcow2", "4M", "compat=0.10")
    os.truncate(p, cut)
    assert qemu_img("info", p, check=False).returncode == 1
    open_fails(p, FormatError, fragment, f"{cut} bytes", format="qcow2")


def test_truncated_v2_header(tmp_path):
    # the v2 header's last fields (snapshots) read as zeros: QEMU opens it
    p = image(tmp_path, "v2.qcow2", "4M", "compat=0.10")
    os.truncate(p, 60)
    opens_as_qemu(p, tmp_path)


def test_unknown_format_name(tmp_path):
    p = image(tmp_path)
    with pytest.raises(FormatError, match="vmdk"):
        qcow2py.open(p, format="vmdk")
