"""Bad input met at read time (L2 tables, compressed clusters), in backing chains,
and in reads and files: every problem with an image is a Qcow2Error naming the
problem.  The header and its tables: test_bad_input_header.py.

Each test pokes bad values into a real image (bad_images.py) and checks the
exception class and a fragment of its message.  Nothing here may surface as
IndexError, struct.error, KeyError, OverflowError or MemoryError.
"""

from __future__ import annotations

import os
import struct
import tracemalloc

import pytest

import qcow2py
from qcow2py import BackingChainError, BackingPolicy, CorruptImageError, FormatError

from bad_images import (COMPRESSED, COPIED, INCOMPAT, L1_SIZE, SIZE, backed, header, image,
                        insert_in_cluster0, l2_entry_offset, open_fails, opens_as_qemu, peek, poke,
                        read_fails, walk_extensions)
from qemu import create, qemu_img


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
    p = backed(tmp_path)
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
    p = backed(tmp_path)
    open_fails(p, BackingChainError, "base.qcow2", "refused",
               backing_policy=qcow2py.NO_BACKING)
    with qcow2py.open(p) as img:                    # the default policy allows it
        assert img.backing is not None


def test_backing_format_unsupported(tmp_path):
    create(tmp_path / "base.raw", "1M", fmt="raw")
    create(tmp_path / "a.qcow2", "1M")
    qemu_img("rebase", "-u", "-b", "base.raw", "-F", "vmdk", tmp_path / "a.qcow2")
    open_fails(tmp_path / "a.qcow2", BackingChainError, "unsupported format 'vmdk'")


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
