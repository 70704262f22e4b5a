"""Named regression tests for issue #11: QEMU's metadata overlap check on every
metadata write of an image opened "r+" (``overlap-check=cached``).

Each test corrupts a QEMU-made image by hand so that one of our metadata writes
would land on another structure, then requires that the write is refused with
CorruptImageError naming the structure as QEMU names it, that the corrupt bit
is set (``qemu-img info``: corrupt: true), and that the other structure's bytes
are unchanged.  The same operation through qemu-io / qemu-img on a copy of the
image is the oracle: it fails with EIO ("Preventing invalid write on metadata
(overlaps with ...)") and sets the corrupt bit too.
"""

from __future__ import annotations

import os
import shutil
import struct
import time

import numpy as np
import pytest

import qcow2py
from qcow2py.errors import CorruptImageError
from qcow2py.format.header import Header
from qcow2py.format.snapshot import Snapshot
from qcow2py.qcow2.overlap import Kind, MetadataLayout, OverlapTemplate, first_name

from qemu import create, info_json, need, qemu_img, qemu_io, run

U64 = struct.Struct(">Q")
KiB, MiB = 1 << 10, 1 << 20


def _image(path, size="4M", *opts, writes=("write -P 0x11 0 192k",)) -> Header:
    need("qemu-img")
    create(path, size, *opts)
    if writes:
        qemu_io(path, *writes)
    return _header(path)


def _header(path) -> Header:
    return Header.parse(path.read_bytes()[:1 << 21])


def _poke(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _peek(path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _refblock0(path, h: Header) -> int:
    return U64.unpack(_peek(path, h.refcount_table_offset, 8))[0]


def _free_in_refcounts(path, h: Header, offset: int) -> None:
    """Set the (16-bit) refcount of the cluster at ``offset`` to 0: the next
    allocation takes it, although a structure lives there."""
    assert h.refcount_order == 4
    _poke(path, _refblock0(path, h) + 2 * (offset // h.cluster_size), b"\0\0")


def _snapshot_entry(path, h: Header, i: int = 0) -> int:
    """File offset of snapshot table entry ``i`` (entries without extra data
    beyond QEMU's 24 bytes, ids and names of one character: 64 bytes each)."""
    pos = h.snapshots_offset
    for _ in range(i):
        id_len, name_len = struct.unpack(">HH", _peek(path, pos + 12, 4))
        extra = struct.unpack(">I", _peek(path, pos + 36, 4))[0]
        n = 40 + extra + id_len + name_len
        pos += n + (-n % 8)
    return pos


def _corrupt(path) -> bool:
    return info_json(path)["format-specific"]["data"].get("corrupt") is True


def _qemu_io(path, *commands):
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    return run(args + [str(path)], check=False)


def _qemu_refuses(path, kind: str, p) -> None:
    """QEMU (the oracle) refused the same operation: EIO, the structure named (QEMU
    may refuse another write of the same operation first: then the same two
    structures, seen from the other side), the corrupt bit set."""
    out = p.stdout + p.stderr
    assert f"Preventing invalid write on metadata (overlaps with {kind})" in out, out
    assert "Input/output error" in out, out
    # the corrupt bit, from the header (qemu-img info may refuse what QEMU left)
    assert _header(path).incompatible_features & 2


def _refused(path, kind: str, victim: tuple, op, *more_victims: tuple) -> None:
    """Our ``op`` is refused (CorruptImageError naming ``kind``), the corrupt bit is
    set, and the bytes at ``victim`` (offset, length) are unchanged."""
    victims = (victim,) + more_victims
    before = [_peek(path, *v) for v in victims]
    with pytest.raises(CorruptImageError,
                       match=rf"Preventing invalid write on metadata \(overlaps with {kind}\); "
                             r"image marked as corrupt"):
        op()
    assert [_peek(path, *v) for v in victims] == before
    assert _corrupt(path)
    with pytest.raises(CorruptImageError):      # marked: refused "r+" from now on
        qcow2py.open(path, "r+")


def _twins(tmp_path, build):
    """Build one corrupt image and copy it: (ours, QEMU's)."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "qemu.qcow2"
    build(ours)
    shutil.copyfile(ours, theirs)
    return ours, theirs


def _write_and_flush(path, offset: int, length: int, closing: bool = True):
    def op():
        img = qcow2py.open(path, "r+")
        try:
            img.write(offset, b"\x5a" * length)
            img.flush()
        finally:
            img.close()
    return op


def _call(path, method: str, *args):
    """An operation: open "r+", call ``method(*args)``, close."""
    def op():
        with qcow2py.open(path, "r+") as img:
            getattr(img, method)(*args)
    return op


# ------------------------------------------------------------ L2 table writes
def test_l2_table_on_a_refcount_block_is_refused(tmp_path):
    """An L1 entry pointing at refcount block 0: updating that "L2 table" would
    overwrite refcounts."""
    def build(p):
        h = _image(p)
        _poke(p, h.l1_table_offset, U64.pack((1 << 63) | _refblock0(p, h)))
    ours, qemu = _twins(tmp_path, build)
    h = _header(ours)
    victim = (_refblock0(ours, h), h.cluster_size)
    # guest cluster 32's entry reads as 0 (refcounts of clusters 128-131: unused)
    _refused(ours, "refcount block", victim, _write_and_flush(ours, 2 * MiB, 4096))
    # QEMU refuses the refcount block's write for the new data cluster first
    _qemu_refuses(qemu, "active L2 table", _qemu_io(qemu, "write -P 0x5a 2M 4k"))


def test_l2_table_on_the_snapshot_table_is_refused(tmp_path):
    def build(p):
        _image(p)
        qemu_img("snapshot", "-c", "s1", p)
        qemu_io(p, "write -P 0x22 0 64k")           # the active table is the L1's own again
        h = _header(p)
        _poke(p, h.l1_table_offset, U64.pack((1 << 63) | h.snapshots_offset))
    ours, qemu = _twins(tmp_path, build)
    h = _header(ours)
    victim = (h.snapshots_offset, h.cluster_size)
    _refused(ours, "snapshot table", victim, _write_and_flush(ours, 2 * MiB, 4096))
    _qemu_refuses(qemu, "snapshot table", _qemu_io(qemu, "write -P 0x5a 2M 4k"))


def test_new_l2_table_on_the_bitmap_directory_is_refused(tmp_path):
    """The bitmap directory's refcount is 0: the allocation of a new L2 table takes
    its cluster, and the table is refused before anything refers to it."""
    def build(p):
        _image(p, "1G")
        qemu_img("bitmap", "--add", p, "b0")
        h = _header(p)
        _free_in_refcounts(p, h, h.bitmaps.directory_offset)
    ours, qemu = _twins(tmp_path, build)
    h = _header(ours)
    # the bitmap's flags (bytes 12-15) change: opening "r+" marks it in use
    d = h.bitmaps.directory_offset
    victim = (d, 12)
    _refused(ours, "bitmap directory", victim, _write_and_flush(ours, 600 * MiB, 4096),
             (d + 16, h.cluster_size - 16))
    # QEMU refuses too, yet its copy's directory is damaged ("Bitmap '' doesn't
    # satisfy the constraints" from qemu-img info afterwards); ours is intact
    _qemu_refuses(qemu, "bitmap directory", _qemu_io(qemu, "write -P 0x5a 600M 4k"))


# ------------------------------------------------------------ refcount block writes
def test_refcount_block_on_an_active_l2_table_is_refused(tmp_path):
    """L1 entry 1 points at refcount block 0: an allocation through L2 table 0
    updates that block, which is now also an active L2 table."""
    def build(p):
        h = _image(p, "1G")
        _poke(p, h.l1_table_offset + 8, U64.pack((1 << 63) | _refblock0(p, h)))
    ours, qemu = _twins(tmp_path, build)
    h = _header(ours)
    victim = (_refblock0(ours, h), h.cluster_size)
    _refused(ours, "active L2 table", victim, _write_and_flush(ours, 1 * MiB, 4096))
    _qemu_refuses(qemu, "active L2 table", _qemu_io(qemu, "write -P 0x5a 1M 4k"))


# ------------------------------------------------------------ L1 table writes
def test_active_l1_on_a_snapshot_l1_table_is_refused(tmp_path):
    """A snapshot whose L1 table is the active one: a new L2 table changes the
    active L1 table, which would change the snapshot."""
    def build(p):
        _image(p, "1G")
        qemu_img("snapshot", "-c", "s1", p)
        h = _header(p)
        _poke(p, _snapshot_entry(p, h), U64.pack(h.l1_table_offset))
    ours, qemu = _twins(tmp_path, build)
    h = _header(ours)
    victim = (h.l1_table_offset, h.cluster_size)
    _refused(ours, "inactive L1 table", victim, _write_and_flush(ours, 600 * MiB, 4096))
    _qemu_refuses(qemu, "inactive L1 table", _qemu_io(qemu, "write -P 0x5a 600M 4k"))


def test_grown_l1_table_on_the_refcount_table_is_refused(tmp_path):
    """resize: the new, larger L1 table is allocated on the refcount table (whose
    refcount is 0)."""
    def build(p):
        h = _image(p, "1G")
        _free_in_refcounts(p, h, h.refcount_table_offset)
    ours, qemu = _twins(tmp_path, build)
    h = _header(ours)
    victim = (h.refcount_table_offset, h.cluster_size)
    _refused(ours, "refcount table", victim, _call(ours, "resize", 64 << 30))
    _qemu_refuses(qemu, "refcount table", qemu_img("resize", qemu, "64G", check=False))


# ------------------------------------------------------------ refcount table writes
def test_refcount_table_updated_in_place_is_not_checked_as_qemu(tmp_path):
    """A snapshot's L1 table claimed on the refcount table: new refcount blocks
    change the refcount table in place.  QEMU 7.2 does not check that write (nor
    any refcount table write): the write succeeds, the image is not marked
    corrupt.  We match it."""
    def build(p):
        _image(p, "64M", "cluster_size=4096", "refcount_bits=64")
        qemu_img("snapshot", "-c", "s1", p)
        h = _header(p)
        _poke(p, _snapshot_entry(p, h), U64.pack(h.refcount_table_offset))
    ours, qemu = _twins(tmp_path, build)
    # 512 refcounts per block: 4 MiB of new clusters need new blocks
    p = _qemu_io(qemu, "write -P 0x5a 8M 4M")
    assert "wrote 4194304/4194304" in p.stdout and not _corrupt(qemu)
    _write_and_flush(ours, 8 * MiB, 4 * MiB)()
    assert not _corrupt(ours)
    assert _header(ours).refcount_table_offset == _header(qemu).refcount_table_offset
    assert qemu_img("compare", qemu, ours, check=False).returncode == 0


# ------------------------------------------------------------ snapshots
def test_snapshot_l1_copy_on_the_refcount_table_is_refused(tmp_path):
    """snapshot -c: the copy of the L1 table is allocated on the refcount table."""
    def build(p):
        h = _image(p)
        _free_in_refcounts(p, h, h.refcount_table_offset)
    ours, qemu = _twins(tmp_path, build)
    h = _header(ours)
    victim = (h.refcount_table_offset, h.cluster_size)
    _refused(ours, "refcount table", victim, _call(ours, "create_snapshot", "s1"))
    _qemu_refuses(qemu, "refcount table", qemu_img("snapshot", "-c", "s1", qemu, check=False))


def test_new_snapshot_table_on_the_active_l1_table_is_refused(tmp_path):
    """snapshot -d of one of two snapshots: the new snapshot table is allocated on
    the active L1 table."""
    def build(p):
        _image(p)
        qemu_img("snapshot", "-c", "s1", p)
        qemu_img("snapshot", "-c", "s2", p)
        h = _header(p)
        _free_in_refcounts(p, h, h.l1_table_offset)
    ours, qemu = _twins(tmp_path, build)
    h = _header(ours)
    victim = (h.l1_table_offset, h.cluster_size)
    _refused(ours, "active L1 table", victim, _call(ours, "delete_snapshot", "s1"))
    _qemu_refuses(qemu, "active L1 table", qemu_img("snapshot", "-d", "s1", qemu, check=False))


# ------------------------------------------------------------ bitmaps
def test_bitmap_directory_on_an_active_l2_table_is_refused(tmp_path):
    """L1 entry 1 points at the bitmap directory: opening "r+" marks the bitmaps
    in use, rewriting the directory in place, which is an active L2 table too."""
    def build(p):
        h = _image(p, "1G")
        qemu_img("bitmap", "--add", p, "b0")
        h = _header(p)
        with open(p, "r+b") as f:                   # the "L2 table" lies inside the file
            f.truncate(max(f.seek(0, 2), h.bitmaps.directory_offset + h.cluster_size))
        _poke(p, h.l1_table_offset + 8, U64.pack((1 << 63) | h.bitmaps.directory_offset))
    ours, qemu = _twins(tmp_path, build)
    h = _header(ours)
    victim = (h.bitmaps.directory_offset, h.cluster_size)
    _refused(ours, "active L2 table", victim, lambda: qcow2py.open(ours, "r+"))
    _qemu_refuses(qemu, "active L2 table", _qemu_io(qemu, "write -P 0x5a 0 4k"))


def test_bitmap_table_on_the_active_l1_table_is_refused(tmp_path):
    """close stores the bitmaps: the new bitmap table is allocated on the active
    L1 table."""
    def build(p):
        _image(p, "1G")
        qemu_img("bitmap", "--add", p, "b0")
        h = _header(p)
        _free_in_refcounts(p, h, h.l1_table_offset)
    ours, qemu = _twins(tmp_path, build)
    h = _header(ours)
    victim = (h.l1_table_offset, h.cluster_size)

    def op():
        img = qcow2py.open(ours, "r+")
        img.close()
    _refused(ours, "active L1 table", victim, op)
    _qemu_refuses(qemu, "active L1 table", _qemu_io(qemu, "read 0 4k"))


# ------------------------------------------------------------ the header
def test_data_cluster_on_the_header_is_refused(tmp_path):
    """Cluster 0's refcount is 0: the next allocation takes the header's cluster."""
    def build(p):
        h = _image(p)
        _free_in_refcounts(p, h, 0)
    ours, qemu = _twins(tmp_path, build)
    h = _header(ours)
    # all of cluster 0 but the incompatible features (the corrupt bit goes there)
    _refused(ours, "qcow2_header", (0, 72), _write_and_flush(ours, 1 * MiB, 64 * KiB),
             (80, h.cluster_size - 80))
    _qemu_refuses(qemu, "qcow2_header", _qemu_io(qemu, "write -P 0x5a 1M 64k"))


def test_header_writes_are_not_checked_as_qemu(tmp_path):
    """QEMU does not check its header writes: a snapshot L1 table claimed at offset
    0 stops neither ``qemu-img resize`` nor ``snapshot -c`` (cluster 0 is the
    header whatever else claims it).  We match it."""
    def build(p):
        _image(p)
        qemu_img("snapshot", "-c", "s1", p)
        h = _header(p)
        _poke(p, _snapshot_entry(p, h), U64.pack(0))
    ours, qemu = _twins(tmp_path, build)
    qemu_img("resize", qemu, "8M")
    qemu_img("snapshot", "-c", "s2", qemu)
    assert not _corrupt(qemu)
    with qcow2py.open(ours, "r+") as img:
        img.resize(8 * MiB)
        img.create_snapshot("s2")
    assert not _corrupt(ours)
    assert info_json(ours)["virtual-size"] == 8 * MiB


# ------------------------------------------------------------ the template itself
class _FakeRefcounts:
    layout_version = free_epoch = 0


class _FakeWriter:
    """What OverlapTemplate reads from a writer: a layout and refcount versions."""

    def __init__(self, header, l2=(), reftable=(), snapshots=(), snapshot_bytes=0):
        self.refcounts = _FakeRefcounts()
        self.layout = MetadataLayout(header, np.array(l2, dtype=np.int64),
                                     np.array(reftable, dtype=np.int64), list(snapshots),
                                     snapshot_bytes)

    def metadata_layout(self):
        return self.layout


def _fake_header(**fields) -> Header:
    h = _header_of_new_image()
    for k, v in fields.items():
        setattr(h, k, v)
    return h


_NEW_HEADER = []


def _header_of_new_image() -> Header:
    if not _NEW_HEADER:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "x.qcow2")
            qcow2py.create(p, 1 << 30).close()
            with open(p, "rb") as f:
                _NEW_HEADER.append(f.read(65536))
    return Header.parse(_NEW_HEADER[0])


def test_template_reports_the_first_kind_in_qemus_order():
    """Several kinds under one write: QEMU names the first its check looks at
    (header, active L1, refcount table, snapshot table, inactive L1, active L2,
    refcount block, bitmap directory)."""
    cs = 65536
    h = _fake_header(l1_table_offset=5 * cs, l1_size=1, snapshots_offset=5 * cs,
                     nb_snapshots=1)
    snap = Snapshot(5 * cs, 1, "1", "s", 0, 0, 0, 0, 1 << 30, 0, b"")
    t = OverlapTemplate(_FakeWriter(h, l2=[5 * cs], reftable=[5 * cs], snapshots=[snap],
                                    snapshot_bytes=48))
    hit = t.overlap(5 * cs + 100, 8)
    assert hit == Kind.ACTIVE_L1 | Kind.SNAPSHOT_TABLE | Kind.INACTIVE_L1 | \
        Kind.ACTIVE_L2 | Kind.REFCOUNT_BLOCK
    assert first_name(hit) == "active L1 table"
    assert first_name(t.overlap(5 * cs, cs, Kind.ACTIVE_L1)) == "snapshot table"
    assert first_name(t.overlap(5 * cs, cs, Kind.ACTIVE_L1 | Kind.SNAPSHOT_TABLE |
                                Kind.INACTIVE_L1)) == "active L2 table"
    assert t.overlap(6 * cs, cs) == 0 and t.overlap(4 * cs, cs) == Kind.OTHER
    assert first_name(t.overlap(100, 1)) == "qcow2_header"
    assert t.first_overlap([6 * cs, 7 * cs, 5 * cs], cs) == 2
    assert t.first_overlap([5 * cs], cs, ~0 & 0x1ff) == -1


def test_template_sizes_nothing_by_hostile_fields():
    """65536 snapshots whose L1 tables claim 2^32 entries each, one near the end
    of the 64-bit space: intervals, not clusters; a query is still quick."""
    cs = 65536
    h = _fake_header(nb_snapshots=65536, snapshots_offset=7 * cs)
    snaps = [Snapshot(((i + 8) * cs) if i else (1 << 64) - cs, 0xFFFFFFFF, str(i), "s",
                      0, 0, 0, 0, None, 0, b"") for i in range(65536)]
    t = OverlapTemplate(_FakeWriter(h, snapshots=snaps, snapshot_bytes=65536 * 48))
    assert t.overlap((1 << 64) - cs, cs) == Kind.INACTIVE_L1      # wraps: to the end
    assert t.overlap(20 << 30, cs) == Kind.INACTIVE_L1             # 32 GiB tables
    assert t.overlap(5 * cs, cs) == 0            # before every snapshot table: nothing
    start = time.perf_counter()
    for k in range(2000):
        t.overlap(5 * cs, cs, Kind.INACTIVE_L1)
    assert time.perf_counter() - start < 2.0


def test_new_l2_tables_fold_into_the_template():
    """Tables added one by one (a preallocation) are found before and after they
    are folded into the sorted arrays."""
    cs = 65536
    t = OverlapTemplate(_FakeWriter(_fake_header(), l2=[]))
    assert t.overlap(100 * cs, cs) == 0          # built
    for k in range(200):
        t.add_active_l2((100 + 2 * k) * cs)
    assert all(t.overlap((100 + 2 * k) * cs, cs) == Kind.ACTIVE_L2 for k in range(200))
    assert all(t.overlap((101 + 2 * k) * cs, cs) == 0 for k in range(200))
    assert t.overlap(100 * cs, cs, Kind.ACTIVE_L2) == 0
    assert t.first_overlap([101 * cs, 103 * cs, 104 * cs], cs) == 2
