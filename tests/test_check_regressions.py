"""Named regression tests for issue #11: check and repair of corrupt and hostile images.

Each test builds one corruption by hand on a QEMU-made image, then compares
``qcow2py check`` (exit code; messages where they matter) with ``qemu-img
check`` and, for repairs, requires ``qemu-img check`` to find our repaired
copy clean wherever QEMU's own repair leaves its copy clean.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest

import qcow2py
from qcow2py.opener import check_path
from qcow2py.qcow2.check import check_path as driver_check_path
from qcow2py.errors import BackingChainError, CorruptImageError, Qcow2Error
from qcow2py.format.header import Header

from qemu import create, need, qemu_img, qemu_io

U64 = struct.Struct(">Q")


def _image(path, *opts, size="4M", writes=("write -P 0x11 0 192k", "write -P 0x12 1M 64k")):
    need("qemu-img")
    create(path, size, *opts)
    if writes:
        qemu_io(path, *writes)
    return Header.parse(path.read_bytes()[:1 << 21])


def _poke(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _peek64(path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return U64.unpack(f.read(8))[0]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qcow2py", *args], capture_output=True,
                          text=True)


def _same_verdict(path):
    """qcow2py check and qemu-img check agree on the exit code (and the JSON counts)."""
    theirs = qemu_img("check", "--output=json", path, check=False)
    ours = _cli("check", "--output=json", str(path))
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    assert "Traceback" not in ours.stderr
    if theirs.stdout.strip() and ours.stdout.strip():
        t, o = json.loads(theirs.stdout), json.loads(ours.stdout)
        for key in ("check-errors", "corruptions", "leaks"):
            assert o.get(key, 0) == t.get(key, 0), (key, o, t)
    return ours


def _repair_like_qemu(path):
    """Repair copies with both tools; ours must be clean wherever QEMU's is."""
    theirs = path.with_suffix(".q")
    shutil.copyfile(path, theirs)
    qemu_img("check", "-r", "all", theirs, check=False)
    qemu_clean = qemu_img("check", theirs, check=False).returncode == 0
    r = _cli("check", "-r", "all", str(path))
    assert "Traceback" not in r.stderr, r.stderr
    after = qemu_img("check", path, check=False)
    if qemu_clean:
        assert after.returncode == 0, after.stdout + after.stderr
    return qemu_clean


def test_l1_entry_with_reserved_bits_is_reported_not_refused(tmp_path):
    p = tmp_path / "a.qcow2"
    h = _image(p)
    e = _peek64(p, h.l1_table_offset)
    _poke(p, h.l1_table_offset, U64.pack(e | 2))
    r = _same_verdict(p)
    assert r.returncode == 2
    assert "L1 entry with reserved bits set" in r.stderr


def test_l2_table_past_end_of_file_is_reported(tmp_path):
    p = tmp_path / "a.qcow2"
    h = _image(p)
    _poke(p, h.l1_table_offset, U64.pack((1 << 63) | 0x400000000000))
    assert _same_verdict(p).returncode == 2


@pytest.mark.parametrize("entry", [0x100, 1 << 44, 1 << 63, (1 << 63) | 0x10000, 0x10200])
def test_refcount_table_entry_hostile_values(tmp_path, entry):
    """Reserved bits, far outside the image, beyond 2^63, unaligned: no huge
    allocation, no ValueError; QEMU's verdict; repaired clean where QEMU's is."""
    p = tmp_path / "a.qcow2"
    h = _image(p)
    _poke(p, h.refcount_table_offset + 8, U64.pack(entry))
    r = _same_verdict(p)
    assert r.returncode in (1, 2)
    if entry == 1 << 44:
        assert "refcount block 1 is outside image" in r.stderr
    _repair_like_qemu(p)


def test_refcount_table_entry_at_2_pow_44_uses_little_memory(tmp_path):
    p = tmp_path / "a.qcow2"
    h = _image(p)
    _poke(p, h.refcount_table_offset + 8, U64.pack(1 << 44))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, "
            "resource.RLIM_INFINITY)); from qcow2py.opener import check_path; "
            f"r = check_path({str(p)!r}); print(r.exit_code, "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    exit_code, maxrss_kib = map(int, out.stdout.split())
    assert exit_code == 2
    assert maxrss_kib < 300 * 1024


def test_refcount_block_with_refcount_two_is_repaired(tmp_path):
    """A refcount block whose own refcount is 2 (an L2 entry points at it too)."""
    p = tmp_path / "a.qcow2"
    h = _image(p)
    block = _peek64(p, h.refcount_table_offset)
    l2 = _peek64(p, h.l1_table_offset) & 0x00FFFFFFFFFFFE00
    _poke(p, l2 + 8 * 40, U64.pack(block))          # guest cluster 40 -> the refcount block
    assert _same_verdict(p).returncode == 2
    _repair_like_qemu(p)


def test_refcount_block_unaligned_or_outside_is_rebuilt(tmp_path):
    """QEMU 7.2 gives up on the unaligned block (it marks the image corrupt in
    the middle of the repair); we rebuild both, and qemu-img finds them clean."""
    for i, entry in enumerate([0x10200, 0x7000000]):
        p = tmp_path / f"a{i}.qcow2"
        h = _image(p)
        _poke(p, h.refcount_table_offset, U64.pack(entry))
        _same_verdict(p)
        _repair_like_qemu(p)
        assert qemu_img("check", p, check=False).returncode == 0


def test_incomplete_snapshot_table_entry(tmp_path):
    p = tmp_path / "a.qcow2"
    h = _image(p)
    qemu_img("snapshot", "-c", "one", p)
    qemu_img("snapshot", "-c", "two", p)
    h = Header.parse(p.read_bytes()[:65536])
    # one more snapshot than the table holds: an all-zero (incomplete) entry
    _poke(p, 60, struct.pack(">I", h.nb_snapshots + 1))
    r = _same_verdict(p)
    assert "is incomplete" in r.stderr
    _repair_like_qemu(p)


def test_bitmap_table_hostile_size_and_offset(tmp_path):
    """A bitmap table_size of 2^32-1 or an offset >= 2^63: a clear error, no
    MemoryError or OverflowError; the same exit code as qemu-img."""
    for i, (rel, value) in enumerate([(8, struct.pack(">I", 0xFFFFFFFF)),
                                      (0, U64.pack(1 << 63)),
                                      (0, U64.pack((1 << 64) - 65536))]):
        p = tmp_path / f"b{i}.qcow2"
        _image(p)
        qemu_img("bitmap", "--add", p, "b0")
        h = Header.parse(p.read_bytes()[:65536])
        _poke(p, h.bitmaps.directory_offset + rel, value)
        _same_verdict(p)


def test_dirty_image_whose_repair_fails_raises_corrupt_image_error(tmp_path):
    p = tmp_path / "a.qcow2"
    h = _image(p, "lazy_refcounts=on")
    l2 = _peek64(p, h.l1_table_offset) & 0x00FFFFFFFFFFFE00
    _poke(p, l2 + 8 * 50, U64.pack((1 << 63) | (1 << 40)))    # data far past the end
    _poke(p, 72, U64.pack(h.incompatible_features | 1))        # dirty
    with pytest.raises(CorruptImageError):
        qcow2py.open(p, "r+").close()


def test_dirty_image_is_repaired_on_open_by_the_same_code(tmp_path):
    p = tmp_path / "a.qcow2"
    h = _image(p, "lazy_refcounts=on")
    block = _peek64(p, h.refcount_table_offset)
    _poke(p, block + 2 * 5, struct.pack(">H", 0))             # a live cluster lost its count
    _poke(p, 72, U64.pack(h.incompatible_features | 1))
    with qcow2py.open(p, "r+") as img:
        img.write(2 << 20, b"\x33" * 4096)
    assert qemu_img("check", p, check=False).returncode == 0
    with qcow2py.open(p) as img:
        assert img.read(2 << 20, 4096) == b"\x33" * 4096
        assert img.read(0, 4096) == b"\x11" * 4096


def test_check_errors_are_qcow2_errors_only(tmp_path):
    """check_path raises Qcow2Error (exit 1) for images qemu-img cannot open."""
    p = tmp_path / "a.qcow2"
    _image(p)
    _poke(p, 4, struct.pack(">I", 9))                          # version 9
    with pytest.raises(Qcow2Error):
        check_path(str(p))
    assert _cli("check", str(p)).returncode == qemu_img("check", p, check=False).returncode


def test_l2_table_on_the_refcount_table_refuses_writes(tmp_path):
    """An L1 entry pointing at the refcount table: the write is refused with
    CorruptImageError and the corrupt bit is set (QEMU: EIO, overlap check)."""
    p = tmp_path / "a.qcow2"
    h = _image(p)
    _poke(p, h.l1_table_offset, U64.pack((1 << 63) | h.refcount_table_offset))
    before = p.read_bytes()[h.refcount_table_offset:h.refcount_table_offset + 65536]
    img = qcow2py.open(p, "r+")
    with pytest.raises(CorruptImageError):
        img.write(0, b"\x77" * 4096)
    img.close()
    raw = p.read_bytes()
    assert raw[h.refcount_table_offset:h.refcount_table_offset + 65536] == before
    assert Header.parse(raw[:65536]).incompatible_features & 2     # corrupt bit


def test_zero_refcount_table_clusters_write_is_a_qcow2_error(tmp_path):
    p = tmp_path / "a.qcow2"
    _image(p)
    _poke(p, 56, struct.pack(">I", 0))
    try:
        with qcow2py.open(p, "r+") as img:
            img.write(3 << 20, b"\x01" * 65536)
    except Qcow2Error:
        pass


def test_virtual_size_not_a_multiple_of_512_is_floored_as_qemu(tmp_path):
    p = tmp_path / "a.qcow2"
    _image(p)
    _poke(p, 24, U64.pack((4 << 20) + 300))
    info = json.loads(qemu_img("info", "--output=json", p).stdout)
    with qcow2py.open(p) as img:
        assert img.size == info["virtual-size"] == 4 << 20
    with qcow2py.open(p, "r+") as img:
        with pytest.raises(ValueError):
            img.write(4 << 20, b"\x01" * 100)       # QEMU refuses it too (past the end)


def test_missing_backing_file_fails_the_check(tmp_path):
    """qemu-img check opens the backing chain: a missing backing file is "Check failed"
    (exit 1).  The opener's policy opens it (qcow2py.check_path); the driver-level
    check_path without ``open_backing`` leaves the chain alone."""
    need("qemu-img")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, "4M")
    create(top, "4M", backing=base.name, cwd=tmp_path)
    assert check_path(str(top)).exit_code == 0
    base.unlink()
    assert _same_verdict(top).returncode == 1
    with pytest.raises(BackingChainError):
        check_path(str(top))
    assert driver_check_path(str(top)).exit_code == 0
