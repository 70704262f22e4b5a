"""Consistency check of a qcow2 image, with ``qemu-img check``'s semantics.

The check rebuilds every cluster's reference count from the metadata that
points at it (header, L1/L2 of the active state and of every snapshot, the
snapshot table, the refcount structures, persistent bitmaps) and compares the
result with the refcounts stored in the image:

* stored > computed: a *leak* (harmless, wasted space);
* stored < computed: a *corruption* (a later allocation could overwrite live data);
* the COPIED flag of L1/L2 entries must say exactly "refcount == 1".

Counting is vectorised: each structure contributes an array of host cluster
indices, and ``numpy.bincount`` does the rest.  Read-only: repairs belong to
the writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..lazyimport import numpy as np

from ..format import refcount as rc
from ..errors import CorruptImageError
from ..format.header import Header
# issue #11 (check.py is being rewritten): the qcow2 driver (qcow2/read.py) is passed
# in and typed by its base class, so that the reader can import check without a cycle
from ..image import Image as Qcow2Image
from ..format.l2 import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK,
                         OFLAG_COMPRESSED, OFLAG_COPIED)

_L2E_OFFSET_MASK = np.uint64(L2E_OFFSET_MASK)
_L2E_STD_RESERVED = np.uint64(L2E_STD_RESERVED_MASK)
_COPIED = np.uint64(OFLAG_COPIED)
_COMPRESSED = np.uint64(OFLAG_COMPRESSED)


@dataclass
class CheckResult:
    """What ``qemu-img check`` reports (its JSON keys via :meth:`to_json_dict`)."""

    filename: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    messages: List[str] = field(default_factory=list)
    leaks_fixed: int = 0
    corruptions_fixed: int = 0
    #: per-cluster (index, stored, computed) for every mismatch
    mismatches: List[tuple] = field(default_factory=list)
    #: (l1_index, l2_index or -1, copied wanted) for every wrong COPIED flag
    copied_fixes: List[tuple] = field(default_factory=list)
    #: computed reference counts, one per host cluster (for repairs)
    computed: Optional[np.ndarray] = None

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit status: 0 clean, 1 check errors, 2 corruptions, 3 leaks."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json_dict(self, fmt: str = "qcow2") -> Dict[str, object]:
        d: Dict[str, object] = {"filename": self.filename, "format": fmt,
                                "check-errors": self.check_errors,
                                "image-end-offset": self.image_end_offset}
        for key, val in (("corruptions", self.corruptions), ("leaks", self.leaks),
                         ("corruptions-fixed", self.corruptions_fixed),
                         ("leaks-fixed", self.leaks_fixed),
                         ("total-clusters", self.total_clusters),
                         ("allocated-clusters", self.allocated_clusters),
                         ("fragmented-clusters", self.fragmented_clusters),
                         ("compressed-clusters", self.compressed_clusters)):
            if val:
                d[key] = val
        return d


class _Counter:
    """Collects references as arrays of host cluster indices."""

    def __init__(self, img: Qcow2Image, result: CheckResult):
        self.img = img
        self.bits = img.cluster_bits
        self.parts: List[np.ndarray] = []
        self.result = result
        self.file_size = img.storage.size()

    def add_range(self, offset: int, length: int, what: str) -> None:
        if length <= 0:
            return
        if offset + length - self.file_size >= (1 << self.bits):
            self.result.corruptions += 1
            self.result.messages.append(
                f"ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset {offset:#x} size {length:#x} ({what})")
            return
        first = offset >> self.bits
        last = (offset + length - 1) >> self.bits
        self.parts.append(np.arange(first, last + 1, dtype=np.int64))

    def add_clusters(self, offsets: np.ndarray) -> None:
        if offsets.size:
            self.parts.append((offsets.astype(np.int64) >> self.bits))

    def counts(self, n: int) -> np.ndarray:
        if not self.parts:
            return np.zeros(n, dtype=np.int64)
        allidx = np.concatenate(self.parts)
        return np.bincount(allidx, minlength=n).astype(np.int64)


def check_image(img: Qcow2Image) -> CheckResult:
    """Check ``img`` (opened read-only) and return what qemu-img check would report."""
    h: Header = img.header
    res = CheckResult(filename=img.filename)
    cs = h.cluster_size
    res.total_clusters = -(-h.size // cs)
    counter = _Counter(img, res)
    counter.add_range(0, cs, "header")

    active_l2 = _count_l1(img, counter, res, h.l1_table_offset, h.l1_size, active=True)
    for snap in img.snapshots:
        _count_l1(img, counter, res, snap.l1_table_offset, snap.l1_size, active=False)
    if h.nb_snapshots:
        counter.add_range(h.snapshots_offset, _snapshot_table_size(img), "snapshot table")
    counter.add_range(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
    reftable = rc.decode_table(img.storage.pread(h.refcount_table_offset,
                                                 h.refcount_table_clusters * cs))
    blocks = reftable[reftable != 0]
    counter.add_clusters(blocks)
    _count_bitmaps(img, counter)

    nb = -(-counter.file_size // cs)
    computed = counter.counts(nb)
    stored = _stored_refcounts(img, reftable, max(nb, computed.size))
    n = nb
    r1, r2 = stored[:n], computed[:n]
    diff = np.flatnonzero(r1 != r2)
    for i in diff.tolist():
        a, b = int(r1[i]), int(r2[i])
        res.mismatches.append((i, a, b))
        if a < b:
            res.corruptions += 1
            res.messages.append(f"ERROR cluster {i} refcount={a} reference={b}")
        else:
            res.leaks += 1
            res.messages.append(f"Leaked cluster {i} refcount={a} reference={b}")
    used = np.flatnonzero((r1 > 0) | (r2 > 0))
    res.image_end_offset = (int(used[-1]) + 1) * cs if used.size else 0
    res.computed = computed
    _check_copied(img, res, stored, active_l2)
    return res


def _snapshot_table_size(img: Qcow2Image) -> int:
    size = 0
    for s in img.snapshots:
        entry = 40 + len(s.extra_data) + len(s.id.encode()) + len(s.name.encode())
        size += entry + (-entry % 8)
    return size


def _count_l1(img: Qcow2Image, counter: _Counter, res: CheckResult, l1_offset: int,
              l1_size: int, active: bool):
    """Count an L1 table, its L2 tables and their clusters; returns the L2 offsets."""
    cs = img.cluster_size
    counter.add_range(l1_offset, l1_size * 8, "L1 table")
    raw = img.storage.pread(l1_offset, l1_size * 8)
    l1 = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
    l2_offsets = (l1 & np.uint64(L1E_OFFSET_MASK)).astype(np.int64)
    tables = []
    for idx in np.flatnonzero(l2_offsets).tolist():
        off = int(l2_offsets[idx])
        if off % cs:
            res.corruptions += 1
            res.messages.append(f"ERROR l2_offset={off:#x}: Table is not cluster aligned; "
                                f"L1 entry corrupted")
            continue
        counter.add_range(off, cs, "L2 table")
        tables.append((idx, off))
    for idx, off in tables:
        _count_l2(img, counter, res, img.storage.pread(off, cs), active)
    return (l1, tables) if active else None


def _count_l2(img: Qcow2Image, counter: _Counter, res: CheckResult, raw: bytes,
              active: bool) -> None:
    h = img.header
    words = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
    if h.extended_l2:
        entries, bitmaps = words[0::2], words[1::2]
    else:
        entries, bitmaps = words, np.zeros(words.size, dtype=np.uint64)
    compressed = (entries & _COMPRESSED) != 0
    off = entries & _L2E_OFFSET_MASK
    std = ~compressed
    reserved = std & ((entries & _L2E_STD_RESERVED) != 0)
    if reserved.any():
        n = int(reserved.sum())
        res.corruptions += n
        res.messages.append(f"ERROR: {n} L2 entries with reserved bits set")
    # compressed clusters: +1 on every host cluster their stream touches
    if compressed.any():
        e = entries[compressed]
        shift = np.uint64(62 - (h.cluster_bits - 8))
        mask = np.uint64((1 << (h.cluster_bits - 8)) - 1)
        coff = (e & ((np.uint64(1) << shift) - np.uint64(1))).astype(np.int64)
        nsect = ((e >> shift) & mask).astype(np.int64) + 1
        csize = nsect * 512 - (coff & 511)
        first = coff >> h.cluster_bits
        last = (coff + csize - 1) >> h.cluster_bits
        span = last - first + 1
        idx = np.repeat(first, span) + (np.arange(span.sum()) -
                                        np.repeat(np.cumsum(span) - span, span))
        counter.parts.append(idx.astype(np.int64))
        if active:
            k = int(compressed.sum())
            res.allocated_clusters += k
            res.compressed_clusters += k
            res.fragmented_clusters += k
    allocated = std & (off != 0)
    if h.has_data_file:
        # host offset 0 is valid in an external data file: COPIED tells it from an
        # unallocated entry (QEMU's rule); a plain zero cluster (no subclusters) is not
        zero_flag = ((entries & np.uint64(1)) != 0) if not h.extended_l2 else \
            np.zeros(entries.size, dtype=bool)
        allocated |= std & (off == 0) & ((entries & _COPIED) != 0) & ~zero_flag
    if h.extended_l2:
        alloc_bits = bitmaps & np.uint64(0xFFFFFFFF)
        zero_bits = bitmaps >> np.uint64(32)
        bad = std & ((alloc_bits & zero_bits) != 0)
        bad |= std & ~allocated & (alloc_bits != 0)
        if bad.any():
            res.corruptions += int(bad.sum())
            res.messages.append(f"ERROR: {int(bad.sum())} invalid subcluster bitmaps")
    unaligned = allocated & ((off & np.uint64(img.cluster_size - 1)) != 0)
    if unaligned.any():
        res.corruptions += int(unaligned.sum())
        res.messages.append(f"ERROR: {int(unaligned.sum())} L2 entries with unaligned offsets")
    allocated &= ~unaligned
    hosts = off[allocated].astype(np.int64)
    if active and hosts.size:
        res.allocated_clusters += int(hosts.size)
        # a cluster is fragmented when it does not follow the previous one (per L2 table)
        res.fragmented_clusters += int(np.count_nonzero(hosts[1:] != hosts[:-1] +
                                                        img.cluster_size))
    if not h.has_data_file:
        for start in range(0, hosts.size, 1 << 16):
            chunk = hosts[start:start + (1 << 16)]
            beyond = chunk + img.cluster_size - counter.file_size >= img.cluster_size
            if beyond.any():
                for o in chunk[beyond].tolist():
                    counter.add_range(o, img.cluster_size, "data cluster")
                chunk = chunk[~beyond]
            counter.add_clusters(chunk)


def _count_bitmaps(img: Qcow2Image, counter: _Counter) -> None:
    ext = img.header.bitmaps
    # the directory as it is in the file (bitmaps added or removed since an "r+"
    # open reach the file only when the image is closed)
    if ext is None or not img.bitmap_directory:
        return
    counter.add_range(ext.directory_offset, ext.directory_size, "bitmap directory")
    for bm in img.bitmap_directory:
        counter.add_range(bm.table_offset, bm.table_size * 8, f"bitmap table {bm.name}")
        raw = img.storage.pread(bm.table_offset, bm.table_size * 8)
        t = np.frombuffer(raw, dtype=">u8").astype(np.uint64) & _L2E_OFFSET_MASK
        counter.add_clusters(t[t != 0].astype(np.int64))


def _stored_refcounts(img: Qcow2Image, reftable: np.ndarray, n: int) -> np.ndarray:
    h = img.header
    per = rc.entries_per_block(h.cluster_size, h.refcount_order)
    out = np.zeros(n, dtype=np.int64)
    size = img.storage.size()
    for i in np.flatnonzero(reftable).tolist():
        start = i * per
        if start >= n:
            break
        off = int(reftable[i])
        if off + h.cluster_size > size:
            continue
        counts = rc.decode_block(img.storage.pread(off, h.cluster_size), h.refcount_order)
        k = min(per, n - start)
        out[start:start + k] = counts[:k].astype(np.int64)
    return out


def _check_copied(img: Qcow2Image, res: CheckResult, stored: np.ndarray, active) -> None:
    """COPIED must be set exactly when the refcount is 1 (active L1 and its L2 tables)."""
    if active is None:
        return
    l1, tables = active
    cs = img.cluster_size

    def refcount_of(offsets: np.ndarray) -> np.ndarray:
        idx = offsets >> img.cluster_bits
        inside = idx < stored.size
        out = np.zeros(offsets.size, dtype=np.int64)
        out[inside] = stored[idx[inside]]
        return out

    offs = (l1 & np.uint64(L1E_OFFSET_MASK)).astype(np.int64)
    live = offs != 0
    copied = (l1 & _COPIED) != 0
    bad = live & ((refcount_of(offs) == 1) != copied)
    for i in np.flatnonzero(bad).tolist():
        res.corruptions += 1
        res.copied_fixes.append((i, -1, not bool(copied[i])))
        res.messages.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} "
                            f"l1_entry={int(l1[i]):x} refcount={int(refcount_of(offs[i:i+1])[0])}")
    h = img.header
    for l1i, off in tables:
        words = np.frombuffer(img.storage.pread(off, cs), dtype=">u8").astype(np.uint64)
        entries = words[0::2] if h.extended_l2 else words
        std = (entries & _COMPRESSED) == 0
        hosts = (entries & _L2E_OFFSET_MASK).astype(np.int64)
        live = std & (hosts != 0)
        if h.has_data_file:
            ref = np.ones(entries.size, dtype=np.int64)
            live = std & ((hosts != 0) | ((entries & _COPIED) != 0))
        else:
            ref = refcount_of(hosts)
        copied = (entries & _COPIED) != 0
        bad = live & ((ref == 1) != copied)
        for i in np.flatnonzero(bad).tolist():
            res.corruptions += 1
            res.copied_fixes.append((l1i, i, not bool(copied[i])))
            res.messages.append(f"ERROR OFLAG_COPIED data cluster: l2_entry={int(entries[i]):x} "
                                f"refcount={int(ref[i])}")


def repair_image(img, mode: str) -> CheckResult:
    """Repair like ``qemu-img check -r leaks|all`` and return the second check.

    ``img`` must be a writable qcow2 image (opened for repair).  Leaks are
    fixed by lowering refcounts to the computed ones; with ``"all"``, counts
    that are too low are raised, and when a referenced cluster has no refcount
    at all the refcount structures are rebuilt from scratch.  Wrong COPIED
    flags are fixed last (with ``"leaks"`` only when nothing else is wrong).
    """
    if mode not in ("leaks", "all"):
        raise ValueError(f"repair mode must be 'leaks' or 'all', not {mode!r}")
    first = check_image(img)
    rc = img.refcounts
    leaks_fixed = corruptions_fixed = 0
    with img._lock:
        img._flush_metadata()
        too_high = [(i, b) for i, a, b in first.mismatches if a > b]
        too_low = [(i, a, b) for i, a, b in first.mismatches if a < b]
        need_rebuild = any(a == 0 for _, a, _ in too_low) or \
            any(i >= rc.reftable.size * rc.per_block for i, _, _ in too_low)
        if too_high:
            rc.set_counts(np.array([i for i, _ in too_high]), np.array([b for _, b in too_high]))
            leaks_fixed = len(too_high)
        if mode == "all":
            if need_rebuild:
                computed = first.computed.copy()
                # the old refcount structures are dropped by the rebuild
                h = img.header
                old = (h.refcount_table_offset >> img.cluster_bits) + \
                    np.arange(h.refcount_table_clusters, dtype=np.int64)
                blocks = rc.reftable[rc.reftable != 0] >> img.cluster_bits
                for arr in (old, blocks):
                    arr = arr[arr < computed.size]
                    np.subtract.at(computed, arr, 1)
                computed = np.maximum(computed, 0)
                rc.write_dirty_blocks()
                img.storage.fsync()
                rc.rebuild(computed)
                img._metadata_map = None
                corruptions_fixed += len(too_low)
            elif too_low:
                rc.set_counts(np.array([i for i, _, _ in too_low]),
                              np.array([b for _, _, b in too_low]))
                corruptions_fixed += len(too_low)
            rc.write_dirty_blocks()
            img.storage.fsync()
        elif need_rebuild:
            rc.write_dirty_blocks()
            img.storage.fsync()
            raise CorruptImageError("check failed: refcount structures need to be rebuilt "
                                    "(repair 'all' does that)")
        rc.write_dirty_blocks()
        img.storage.fsync()
        fix_copied = mode == "all" or not (too_low or too_high or first.check_errors)
        if fix_copied:
            second_pass = check_image(img)
            corruptions_fixed += _fix_copied(img, second_pass.copied_fixes)
        img._flush_metadata()
    final = check_image(img)
    final.leaks_fixed = leaks_fixed
    final.corruptions_fixed = corruptions_fixed
    if mode == "all" and not (final.corruptions or final.check_errors):
        img._clear_problem_bits()
    return final


def _fix_copied(img, fixes) -> int:
    copied = np.uint64(1 << 63)
    for l1i, l2i, want in fixes:
        if l2i < 0:
            img._l1_raw[l1i] = (img._l1_raw[l1i] | copied) if want else \
                (img._l1_raw[l1i] & ~copied)
            img._dirty_l1 = True
        else:
            l2 = img._load_l2(l1i)
            l2[l2i] = (l2[l2i] | copied) if want else (l2[l2i] & ~copied)
            img._touch_l2(l1i)
    return len(fixes)
