"""Internal snapshots of a writable qcow2 image (``qemu-img snapshot -c/-a/-d``) and the
snapshot lookups of the reader (``open(snapshot=)``).

Create, delete and apply work on a writable qcow2 image through its storage and
refcounts (public attributes), after a flush; then the image re-reads its tables
(``reload_tables``).  Order, as QEMU's: refcount increments and new tables are
durable before anything refers to them; the snapshot table is switched by one
synced header write; decrements come only after the switch.  The table text of
``qemu-img snapshot -l`` is :func:`qcow2py.report.snapshot_rows`.
"""

from __future__ import annotations

import struct
import time as _time
from typing import List

from ..lazyimport import numpy as np

from ..errors import CorruptImageError, Qcow2Error
from ..format.header import MAX_L1_BYTES
from ..format.l2 import (U64_COMPRESSED as _COMPRESSED, U64_COPIED as _COPIED,
                         U64_OFFSET_MASK as _OFFSET, U64_ZERO as _ZERO)
from ..format.snapshot import Snapshot, encode_snapshot_table, snapshot_table_size
from .overlap import Kind

_L1_OFFSET = _OFFSET                # L1 and L2 entries keep the offset in the same bits


class SnapshotError(Qcow2Error):
    """A snapshot operation qemu-img would refuse (name not found, refcount too narrow,
    active bitmaps...)."""


def check_l1_bounds(img, offset: int, size: int) -> None:
    """A snapshot's L1 table must fit QEMU's limit and the file (hostile tables)."""
    if size * 8 > MAX_L1_BYTES or offset % img.cluster_size or \
            offset + size * 8 > img.storage.size():
        raise CorruptImageError(f"{img.filename}: snapshot L1 table ({size} entries at "
                                f"{offset:#x}) is invalid")


def _read_l1(img, offset: int, size: int) -> np.ndarray:
    check_l1_bounds(img, offset, size)
    raw = img.storage.pread(offset, size * 8) if size else b""
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def _l2_entries(img, raw: bytes) -> np.ndarray:
    words = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
    return words[0::2] if img.extended_l2 else words


def _entry_clusters(img, entries: np.ndarray) -> np.ndarray:
    """Host clusters an L2 table's entries hold references to (repeats kept)."""
    cb = img.cluster_bits
    comp = (entries & _COMPRESSED) != 0
    parts = []
    if not img.header.has_data_file:
        normal = entries[~comp] & _OFFSET
        parts.append((normal[normal != 0] >> np.uint64(cb)).astype(np.int64))
    if comp.any():
        x = 62 - (cb - 8)
        c = entries[comp]
        off = (c & np.uint64((1 << x) - 1)).astype(np.int64)
        nsect = ((c >> np.uint64(x)) & np.uint64((1 << (cb - 8)) - 1)).astype(np.int64) + 1
        start = off & ~511
        first, last = start >> cb, (start + nsect * 512 - 1) >> cb
        for a, b in zip(first.tolist(), last.tolist()):
            parts.append(np.arange(a, b + 1, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def tree_clusters(img, l1: np.ndarray) -> np.ndarray:
    """Every host cluster an L1 table references: its L2 tables and their clusters."""
    cs, cb = img.cluster_size, img.cluster_bits
    tables = (l1 & _L1_OFFSET).astype(np.int64)
    tables = tables[tables != 0]
    parts = [tables >> cb]
    for off in tables.tolist():
        parts.append(_entry_clusters(img, _l2_entries(img, img.storage.pread(off, cs))))
    return np.concatenate(parts)


def _set_copied_flags(img, l1: np.ndarray) -> np.ndarray:
    """Make COPIED say "refcount is 1" in the active L2 tables (written back in place)
    and in ``l1`` (returned; the caller writes it)."""
    cs, cb, rc = img.cluster_size, img.cluster_bits, img.refcounts
    l1 = l1.copy()
    offs = (l1 & _L1_OFFSET).astype(np.int64)
    for i in np.flatnonzero(offs).tolist():
        off = int(offs[i])
        words = np.frombuffer(img.storage.pread(off, cs), dtype=">u8").astype(np.uint64)
        ent = words[0::2] if img.extended_l2 else words
        host = (ent & _OFFSET).astype(np.int64)
        live = (host != 0) & ((ent & _COMPRESSED) == 0)
        new = ent & ~_COPIED
        if img.header.has_data_file:
            new = np.where(live, ent, new)
        elif live.any():
            counts = rc.get_many(host[live] >> cb)
            sub = new[live]
            sub[counts == 1] |= _COPIED
            new[live] = sub
        if (new != ent).any():
            ent[:] = new
            img.journal.write_metadata(Kind.ACTIVE_L2, off, words.astype(">u8").tobytes())
        one = rc.get(off >> cb) == 1
        l1[i] = (l1[i] | _COPIED) if one else (l1[i] & ~_COPIED)
    return l1


def _check_room(img, clusters: np.ndarray, failure: str) -> None:
    """Refuse, before anything changes, when one more reference to ``clusters`` (repeats
    counted) would overflow the image's refcount width (QEMU fails then too)."""
    if clusters.size:
        rc = img.refcounts
        uniq, reps = np.unique(clusters, return_counts=True)
        if (rc.get_many(uniq).astype(np.int64) + reps > rc.max_refcount).any():
            raise SnapshotError(f"{failure} (refcount overflow at "
                                f"{img.header.refcount_bits} bits)")


def _durable_refcounts(img) -> None:
    rc = img.refcounts
    if rc.dirty_blocks:
        rc.write_dirty_blocks()
    if rc.dirty_reftable:
        rc.write_reftable()
    img.journal.barrier()


def _write_table(img, snapshots: List[Snapshot]) -> None:
    """Store a new snapshot table, switch the header to it, free the old one."""
    h, cs, cb, rc = img.header, img.cluster_size, img.cluster_bits, img.refcounts
    old = (h.snapshots_offset, h.nb_snapshots)
    old_bytes = snapshot_table_size(img.snapshots) if old[1] else 0
    data = encode_snapshot_table(snapshots)
    new_off = 0
    if snapshots:
        new_off = rc.allocate(-(-len(data) // cs))
        img.journal.write_metadata(Kind.SNAPSHOT_TABLE, new_off, data)
    _durable_refcounts(img)
    h.snapshots_offset, h.nb_snapshots = new_off, len(snapshots)
    img.write_header()
    img.snapshots = list(snapshots)     # what the overlap checks see from now on
    if old[1] and old_bytes:
        first = old[0] >> cb
        rc.free_later(np.arange(first, first + -(-old_bytes // cs), dtype=np.int64))
        rc.apply_frees()
        _durable_refcounts(img)


def _writable(img) -> None:
    if img.read_only or not hasattr(img, "reload_tables"):
        raise ValueError(f"image {img.filename!r} must be a qcow2 image opened 'r+'")


def find(img, name: str) -> Snapshot:
    """The snapshot whose id or name is ``name`` (id first, as qemu-img)."""
    for s in img.snapshots:
        if s.id == name:
            return s
    for s in img.snapshots:
        if s.name == name:
            return s
    raise SnapshotError(f"snapshot {name!r} not found")


def create_snapshot(img, name: str) -> Snapshot:
    """``qemu-img snapshot -c NAME``: the active L1 copied, every cluster it reaches
    referenced once more, a new table entry (vm state 0, now, VM clock 0, icount 0)."""
    _writable(img)
    img.flush()
    h, cs, rc = img.header, img.cluster_size, img.refcounts
    l1 = _read_l1(img, h.l1_table_offset, h.l1_size)
    clusters = tree_clusters(img, l1)
    _check_room(img, clusters, f"Could not create snapshot '{name}': -22 (Invalid argument)")
    copy_off = 0
    if h.l1_size:
        copy_off = rc.allocate(-(-h.l1_size * 8 // cs))
        img.journal.write_metadata(Kind.INACTIVE_L1, copy_off, l1.astype(">u8").tobytes())
    rc.increment(clusters)
    _durable_refcounts(img)                         # counted before anything refers to it
    new_l1 = _set_copied_flags(img, l1)
    if (new_l1 != l1).any():
        img.journal.write_metadata(Kind.ACTIVE_L1, h.l1_table_offset,
                                   new_l1.astype(">u8").tobytes())
    img.journal.barrier()
    now = _time.time_ns() // 1000
    ids = [int(s.id) for s in img.snapshots if s.id.isdigit()]
    snap = Snapshot(copy_off, h.l1_size, str(max(ids, default=0) + 1), name,
                    now // 1_000_000, now % 1_000_000 * 1000, 0, 0, img.size, 0,
                    struct.pack(">QQQ", 0, img.size, 0))
    _write_table(img, list(img.snapshots) + [snap])
    img.reload_tables()
    return snap


def delete_snapshot(img, name: str) -> None:
    """``qemu-img snapshot -d``: drop the entry (header switch), then the references."""
    _writable(img)
    try:
        snap = find(img, name)
    except SnapshotError:
        raise SnapshotError(f"Could not delete snapshot '{name}': snapshot not found") from None
    img.flush()
    rest = [s for s in img.snapshots if s is not snap]
    _write_table(img, rest)
    rc, cs, cb = img.refcounts, img.cluster_size, img.cluster_bits
    l1 = _read_l1(img, snap.l1_table_offset, snap.l1_size)
    drop = tree_clusters(img, l1)
    if snap.l1_size:
        first = snap.l1_table_offset >> cb
        drop = np.concatenate([drop, np.arange(first, first + -(-snap.l1_size * 8 // cs),
                                               dtype=np.int64)])
    rc.free_later(drop)
    rc.apply_frees()
    _durable_refcounts(img)
    h = img.header
    active = _read_l1(img, h.l1_table_offset, h.l1_size)
    new_l1 = _set_copied_flags(img, active)
    if (new_l1 != active).any():
        img.journal.write_metadata(Kind.ACTIVE_L1, h.l1_table_offset,
                                   new_l1.astype(">u8").tobytes())
    img.journal.barrier()
    img.reload_tables()


def apply_snapshot(img, name: str) -> None:
    """``qemu-img snapshot -a``: the active L1 becomes the snapshot's (its clusters
    referenced first, the old active tree released after the synced switch), and the
    virtual size the snapshot's."""
    _writable(img)
    if getattr(img, "bitmaps", None):
        raise SnapshotError(f"Could not apply snapshot '{name}': Device has active dirty bitmaps")
    try:
        snap = find(img, name)
    except SnapshotError:
        raise SnapshotError(f"Could not apply snapshot '{name}': Failed to load snapshot: "
                            f"No such file or directory") from None
    img.flush()
    h, rc = img.header, img.refcounts
    if snap.l1_size > h.l1_size:
        img.set_size(max(img.size, snap.disk_size or 0))      # grows (moves) the L1 table
        if snap.l1_size > h.l1_size:
            raise SnapshotError(f"Could not apply snapshot '{name}': its L1 table "
                                f"({snap.l1_size} entries) does not fit the image")
    sn_l1 = np.zeros(h.l1_size, dtype=np.uint64)
    sn_l1[:snap.l1_size] = _read_l1(img, snap.l1_table_offset, snap.l1_size)
    clusters = tree_clusters(img, sn_l1)
    _check_room(img, clusters, f"Could not apply snapshot '{name}'")
    rc.increment(clusters)
    _durable_refcounts(img)
    old_l1 = _read_l1(img, h.l1_table_offset, h.l1_size)
    img.journal.write_metadata(Kind.ACTIVE_L1, h.l1_table_offset, sn_l1.astype(">u8").tobytes())
    img.journal.barrier()                                       # the switch
    rc.free_later(tree_clusters(img, old_l1))
    rc.apply_frees()
    _durable_refcounts(img)
    new_l1 = _set_copied_flags(img, sn_l1)
    if (new_l1 != sn_l1).any():
        img.journal.write_metadata(Kind.ACTIVE_L1, h.l1_table_offset,
                                   new_l1.astype(">u8").tobytes())
    img.journal.barrier()
    if snap.disk_size is not None and snap.disk_size != img.size:
        h.size = snap.disk_size
        img.write_header()
        img.size = snap.disk_size
    img.reload_tables()


def check_downgrade(img) -> None:
    """QEMU's refusal to downgrade (compat=0.10) an image whose snapshots a v2 reader
    would misread: a snapshot of another disk size, or a VM state over 4 GiB."""
    for s in img.snapshots:
        if s.vm_state_size > 0xFFFFFFFF or (s.disk_size is not None and
                                            s.disk_size != img.size):
            raise SnapshotError("Internal snapshots prevent downgrade of image")


def expand_zero_clusters(img) -> None:
    """Rewrite the zero clusters of the snapshots' L2 tables in what qcow2 v2 can say
    (a downgrade; the active L1's were rewritten through the write path already).

    Without a backing file a zero cluster becomes unallocated; with one it gets a
    new cluster of zeros (refcount: one per reference to its L2 table, as QEMU
    counts it).  A zero cluster that kept its host cluster drops it rather than
    zeroing it in place: another snapshot may still read data there (QEMU 7.2
    zeroes it in place and so changes that snapshot's content).  The new clusters
    and their refcounts are durable before the tables are rewritten in place
    (each table one write); the dropped references are released after that, so a
    crash leaves v3 tables that still read as before, and at most leaked clusters.
    """
    cs, cb, rc = img.cluster_size, img.cluster_bits, img.refcounts
    seen = set()
    tables = []
    for s in img.snapshots:
        l1 = _read_l1(img, s.l1_table_offset, s.l1_size)
        for off in (l1 & _L1_OFFSET).astype(np.int64).tolist():
            if off and off not in seen:
                seen.add(off)
                ent = _l2_entries(img, img.storage.pread(off, cs)).copy()
                zero = np.flatnonzero(((ent & _ZERO) != 0) & ((ent & _COMPRESSED) == 0))
                if zero.size:
                    tables.append((off, ent, zero))
    if not tables:
        return
    backed = img.backing is not None
    dropped = []
    for off, ent, zero in tables:
        users = rc.get(off >> cb)
        kept = (ent[zero] & _OFFSET).astype(np.int64)
        kept = kept[kept != 0] >> cb
        if kept.size:
            dropped.append(np.repeat(kept, users))
        new = np.zeros(zero.size, dtype=np.uint64)
        if backed:                           # new clusters, contiguous: one write
            first = rc.allocate(int(zero.size))
            host = first + np.arange(zero.size, dtype=np.int64) * cs
            for _ in range(users - 1):
                rc.increment(host >> cb)
            img.journal.write_metadata(Kind.OTHER, first, bytes(zero.size * cs))
            new = host.astype(np.uint64) | (_COPIED if users == 1 else np.uint64(0))
        ent[zero] = new
    _durable_refcounts(img)                 # zeros and refcounts before the tables
    for off, ent, _zero in tables:
        img.journal.write_metadata(Kind.INACTIVE_L2, off, ent.astype(">u8").tobytes())
    img.journal.barrier()
    if dropped:
        rc.free_later(np.concatenate(dropped))
        rc.apply_frees()
        _durable_refcounts(img)
