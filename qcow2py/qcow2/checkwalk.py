"""The memory-bounded metadata walk behind ``check`` (QEMU's semantics).

It works on a :class:`~qcow2py.qcow2.checkview.CheckView` (the lenient open).
:class:`Walk` recomputes every cluster's reference count from the metadata
(QEMU's calculate_refcounts) and compares it with the stored one
(compare_refcounts), then checks the COPIED flags (check_oflag_copied).  The
arrays it allocates are sized by the file (one entry per host cluster, plus
one), never by an entry's value: a reference one cluster or more past the end
of the file is counted apart as a corruption, exactly as QEMU does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..lazyimport import numpy as np

from ..format import refcount as rc
from ..format.l2 import (L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK,
                         L2E_STD_RESERVED_MASK, OFLAG_COMPRESSED as COMPRESSED,
                         OFLAG_COPIED as COPIED)
from .checkview import (BME_RESERVED_MASK, MAX_IO_OFFSET, MAX_L1_ENTRIES, CheckFailed,
                        CheckView, U64)
from .checkresult import CheckResult

__all__ = ["CheckFailed", "CheckView", "L2Fixes", "Walk"]


@dataclass
class L2Fixes:
    """What a repair would change in one L2 table (by entry index)."""

    zero: List[int] = field(default_factory=list)       # unaligned preallocated clusters
    copied: Dict[int, bool] = field(default_factory=dict)


class Walk:
    """One pass of QEMU's check over a :class:`CheckView`; results go to ``res``
    (a :class:`~qcow2py.qcow2.checkresult.CheckResult`)."""

    def __init__(self, view: CheckView, res: CheckResult, fix: bool = False,
                 count_refcount_structures: bool = True) -> None:
        self.v = view
        self.res = res
        self.fix = fix
        self.count_structures = count_refcount_structures
        self.refs = np.zeros(view.nb_clusters + 1, dtype=np.int64)
        self.rebuild = False            # refcount structures must be rebuilt (QEMU's flag)
        self.outside_blocks = False     # a refcount block lies past the end of the file
        self.l2_fixes: Dict[int, L2Fixes] = {}
        self.l1_fixes: Dict[int, bool] = {}
        self.stored: Optional[np.ndarray] = None
        self.known: Optional[np.ndarray] = None
        self.highest = -1
        self._blocks: Dict[int, Optional[np.ndarray]] = {}

    # ------------------------------------------------------------ counting
    def corrupt(self, msg: str, n: int = 1) -> None:
        self.res.corruptions += n
        self.res.note(msg)

    def inc(self, offset: int, size: int, what: str = "") -> None:
        """QEMU's qcow2_inc_refcounts_imrt for one region."""
        if size <= 0:
            return
        if offset + size - self.v.file_size >= self.v.cs:
            self.corrupt(f"ERROR: counting reference for region exceeding the end of the file "
                         f"by one cluster or more: offset {offset:#x} size {size:#x}")
            return
        self.inc_many(np.array([offset], dtype=np.int64), np.array([size], dtype=np.int64))

    def inc_many(self, offsets: np.ndarray, sizes, weight: int = 1) -> None:
        """+weight on every host cluster each (offset, size) region touches."""
        offsets = np.asarray(offsets, dtype=np.int64)
        sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64), offsets.shape)
        keep = sizes > 0
        offsets, sizes = offsets[keep], sizes[keep]
        if not offsets.size:
            return
        beyond = offsets + sizes - self.v.file_size >= self.v.cs
        if beyond.any():
            for o, s in zip(offsets[beyond][:20].tolist(), sizes[beyond][:20].tolist()):
                self.res.note(f"ERROR: counting reference for region exceeding the end of the "
                              f"file by one cluster or more: offset {o:#x} size {s:#x}")
            self.res.corruptions += int(beyond.sum()) * weight
            offsets, sizes = offsets[~beyond], sizes[~beyond]
        first = offsets >> self.v.bits
        span = ((offsets + sizes - 1) >> self.v.bits) - first + 1
        if np.all(span == 1):
            idx = first
        else:
            idx = np.repeat(first, span) + (np.arange(int(span.sum())) -
                                            np.repeat(np.cumsum(span) - span, span))
        counts = np.bincount(idx, minlength=self.refs.size)
        self.refs += counts[:self.refs.size] * weight

    def _cap_overflow(self) -> None:
        over = self.refs > self.v.refcount_max
        if over.any():
            for i in np.flatnonzero(over)[:20].tolist():
                self.res.note(f"ERROR: overflow cluster offset={i << self.v.bits:#x}")
            self.corrupt("Use qemu-img amend to increase the refcount entry width or "
                         "qemu-img convert to create a clean copy if the image cannot be "
                         "opened for writing",
                         int((self.refs[over] - self.v.refcount_max).sum()))
            self.refs[over] = self.v.refcount_max

    # ------------------------------------------------------------ the pass
    def run(self) -> None:
        v, h, res = self.v, self.v.header, self.res
        res.total_clusters = v.total_clusters
        self.inc(0, v.cs, "header")
        self.walk_l1(h.l1_table_offset, h.l1_size, active=True)
        if v.snapshot_error is not None:
            res.check_errors += 1
            res.note(f"Failed to read the snapshot table: {v.snapshot_error}")
        if h.version >= 3:
            for i, sn in enumerate(v.snapshots):
                if len(sn.extra_data) < 16:
                    self.corrupt(f"{'Repairing' if self.fix else 'ERROR'} snapshot table "
                                 f"entry {i} is incomplete")
        if h.has_data_file and h.nb_snapshots:
            self.corrupt(f"ERROR {h.nb_snapshots} snapshots in image with data file")
        for sn in v.snapshots:
            if sn.l1_table_offset % v.cs:
                self.corrupt(f"ERROR snapshot {sn.id} ({sn.name}) l1_offset="
                             f"{sn.l1_table_offset:#x}: L1 table is not cluster aligned; "
                             f"snapshot table entry corrupted")
                continue
            if sn.l1_size > MAX_L1_ENTRIES:
                self.corrupt(f"ERROR snapshot {sn.id} ({sn.name}) l1_size={sn.l1_size:#x}: "
                             f"L1 table is too large; snapshot table entry corrupted")
                continue
            if not v.can_read(sn.l1_table_offset, sn.l1_size * 8):
                self.inc(sn.l1_table_offset, sn.l1_size * 8)
                res.check_errors += 1
                raise CheckFailed("ERROR: I/O error in check_refcounts_l1")
            self.walk_l1(sn.l1_table_offset, sn.l1_size, active=False)
        self.inc(h.snapshots_offset, v.snapshots_size, "snapshot table")
        if self.count_structures:
            self.inc(h.refcount_table_offset, h.refcount_table_clusters * v.cs)
        self.count_bitmaps()
        self._cap_overflow()
        if self.count_structures:
            self.check_refblocks()
            self._cap_overflow()

    def walk_l1(self, l1_offset: int, l1_size: int, active: bool) -> None:
        """QEMU's check_refcounts_l1 (L2 tables shared by several entries are read once)."""
        if not l1_size:
            return
        v = self.v
        self.inc(l1_offset, l1_size * 8, "L1 table")
        l1 = v.l1 if active else v.table(l1_offset, l1_size * 8)
        nz = np.flatnonzero(l1)
        if not nz.size:
            return
        ent = l1[nz]
        bad = (ent & U64(L1E_RESERVED_MASK)) != 0
        for e in ent[bad][:20].tolist():
            self.res.note(f"ERROR found L1 entry with reserved bits set: {e:x}")
        self.res.corruptions += int(bad.sum())
        l2offs = (ent & U64(L1E_OFFSET_MASK)).astype(np.int64)
        self.inc_many(l2offs, v.cs)
        unaligned = (l2offs & (v.cs - 1)) != 0
        for o in l2offs[unaligned][:20].tolist():
            self.res.note(f"ERROR l2_offset={o:x}: Table is not cluster aligned; "
                          f"L1 entry corrupted")
        self.res.corruptions += int(unaligned.sum())
        uniq, mult = np.unique(l2offs, return_counts=True)
        for off, m in zip(uniq.tolist(), mult.tolist()):
            self.walk_l2(off, m, active)

    def _l2_words(self, off: int) -> Tuple[np.ndarray, np.ndarray]:
        v = self.v
        words = np.frombuffer(v.pread(off, v.cs), dtype=">u8").astype(np.uint64)
        if v.header.extended_l2:
            return words[0::2], words[1::2]
        return words, np.zeros(words.size, dtype=np.uint64)

    def walk_l2(self, l2_off: int, mult: int, active: bool) -> None:
        """QEMU's check_refcounts_l2 for a table referenced ``mult`` times."""
        v, h, res = self.v, self.v.header, self.res
        entries, bitmaps = self._l2_words(l2_off)
        ext = h.extended_l2
        compressed = (entries & U64(COMPRESSED)) != 0
        std = ~compressed
        n = int((std & ((entries & U64(L2E_STD_RESERVED_MASK)) != 0)).sum())
        if n:
            self.corrupt(f"ERROR found {n} l2 entries with reserved bits set "
                         f"(L2 table {l2_off:#x})", n * mult)
        # compressed clusters
        if compressed.any():
            c = np.flatnonzero(compressed)
            n = int(((entries[c] & U64(COPIED)) != 0).sum())
            if n:
                self.corrupt(f"ERROR: {n} compressed clusters with the copied flag set "
                             f"(copied flag must never be set for compressed clusters)",
                             n * mult)
            if h.has_data_file:
                self.corrupt(f"ERROR {c.size} compressed clusters with data file", c.size * mult)
                c = c[:0]
            elif ext:
                badmap = bitmaps[c] != 0
                if badmap.any():
                    self.corrupt(f"ERROR {int(badmap.sum())} compressed clusters with non-zero "
                                 f"subcluster allocation bitmap", int(badmap.sum()) * mult)
                c = c[~badmap]
            e = entries[c]
            shift = 62 - (v.bits - 8)
            coff = (e & U64((1 << shift) - 1)).astype(np.int64)
            nsect = ((e >> U64(shift)) & U64((1 << (v.bits - 8)) - 1)).astype(np.int64) + 1
            self.inc_many(coff, nsect * 512 - (coff & 511), mult)
            if active and c.size:
                res.allocated_clusters += c.size * mult
                res.compressed_clusters += c.size * mult
                res.fragmented_clusters += c.size * mult
        # standard clusters
        off = (entries & U64(L2E_OFFSET_MASK)).astype(np.int64)
        zero_flag = ((entries & U64(1)) != 0) & std if not ext else np.zeros(entries.size, bool)
        normal = std & ~zero_flag & (off != 0)
        if h.has_data_file:
            normal |= std & ~zero_flag & (off == 0) & ((entries & U64(COPIED)) != 0)
        alloc = normal | (zero_flag & (off != 0))
        if ext:
            amap = bitmaps & U64(0xFFFFFFFF)
            n = int((alloc & (((bitmaps >> U64(32)) & amap) != 0)).sum())
            if n:
                self.corrupt(f"ERROR {n} allocated clusters have corrupted subcluster "
                             f"allocation bitmap (L2 table {l2_off:#x})", n * mult)
            n = int((std & ~alloc & (amap != 0)).sum())
            if n:
                self.corrupt("ERROR: Unallocated cluster has non-zero subcluster "
                             "allocation map", n * mult)
            has_data = amap != 0
        else:
            has_data = ~zero_flag
        unaligned = alloc & ((off & (v.cs - 1)) != 0)
        skip = np.zeros(entries.size, dtype=bool)
        if unaligned.any():
            for i in np.flatnonzero(unaligned)[:20].tolist():
                kind = "Data" if has_data[i] else "Preallocated"
                verb = "Repairing" if self.fix and not has_data[i] else "ERROR"
                res.note(f"{verb} offset={int(off[i]):x}: {kind} cluster is not properly "
                         f"aligned; L2 entry corrupted.")
            res.corruptions += int(unaligned.sum()) * mult
            if self.fix:
                fixable = unaligned & ~has_data
                if fixable.any():
                    self.l2_fixes.setdefault(l2_off, L2Fixes()).zero = \
                        np.flatnonzero(fixable).tolist()
                    skip = fixable
        counted = alloc & ~skip
        hosts = off[counted]
        if active and hosts.size:
            res.allocated_clusters += hosts.size * mult
            res.fragmented_clusters += int(np.count_nonzero(hosts[1:] != hosts[:-1] + v.cs)) * mult
        if not h.has_data_file:
            self.inc_many(hosts, v.cs, mult)

    def count_bitmaps(self) -> None:
        """QEMU's qcow2_check_bitmaps_refcounts."""
        v = self.v
        if not v.bitmaps:
            return
        ext = v.header.bitmaps
        self.inc(ext.directory_offset, ext.directory_size, "bitmap directory")
        for bm in v.bitmaps:
            self.inc(bm.table_offset, bm.table_size * 8, "bitmap table")
            if not v.can_read(bm.table_offset, bm.table_size * 8):
                self.corrupt(f"ERROR bitmap {bm.name!r}: cannot read the bitmap table")
                break
            t = v.table(bm.table_offset, bm.table_size * 8)
            offs = t & U64(L2E_OFFSET_MASK)
            bad = ((t & U64(BME_RESERVED_MASK)) != 0) | \
                ((offs != 0) & (((t & U64(1)) != 0) | ((offs & U64(v.cs - 1)) != 0)))
            if bad.any():
                self.corrupt(f"ERROR bitmap {bm.name!r}: invalid bitmap table")
                break
            live = offs[offs != 0].astype(np.int64)
            self.inc_many(live, v.cs)

    def check_refblocks(self) -> None:
        """QEMU's check_refblocks: every refcount block must be referenced exactly once."""
        v = self.v
        t = v.reftable_raw
        for i in np.flatnonzero(t).tolist():
            e = int(t[i])
            off = e & rc.REFT_OFFSET_MASK
            if e & rc.REFT_RESERVED_MASK:
                self.corrupt(f"ERROR refcount table entry {i} has reserved bits set")
                self.rebuild = True
                continue
            if off % v.cs:
                self.corrupt(f"ERROR refcount block {i} is not cluster aligned; refcount "
                             f"table entry corrupted")
                self.rebuild = True
                continue
            cluster = off >> v.bits
            if cluster >= v.nb_clusters:
                self.corrupt(f"{'Repairing' if self.fix else 'ERROR'} refcount block {i} "
                             f"is outside image")
                self.outside_blocks = True
                continue
            self.inc(off, v.cs)
            if self.refs[cluster] != 1:
                self.corrupt(f"ERROR refcount block {i} refcount={int(self.refs[cluster])}")
                self.rebuild = True

    # ------------------------------------------------------------ stored refcounts
    def _block(self, bi: int) -> Optional[bytes]:
        """Refcount block ``bi`` as stored; None when QEMU cannot read it (EIO:
        unaligned table entry, or an offset past what a request may reach)."""
        if bi in self._blocks:
            return self._blocks[bi]
        v = self.v
        t = v.reftable_raw
        e = int(t[bi]) & rc.REFT_OFFSET_MASK if bi < t.size else 0
        if e % v.cs or e + v.cs > MAX_IO_OFFSET:
            out = None
        elif e == 0:
            out = b""
        else:
            out = v.pread(e, v.cs)
        if len(self._blocks) > 64:
            self._blocks.clear()
        self._blocks[bi] = out
        return out

    def _decode(self, raw: bytes, count: int) -> np.ndarray:
        """The first ``count`` refcounts of a stored block (decoding no more)."""
        if not raw:
            return np.zeros(count, dtype=np.uint64)
        bits = 1 << self.v.refcount_order
        nbytes = -(-count * bits // 8)
        return rc.decode_block(raw[:nbytes], self.v.refcount_order)[:count]

    def refcounts_of(self, idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Stored refcounts of host clusters ``idx`` (values, readable mask)."""
        idx = np.asarray(idx, dtype=np.int64)
        vals = np.zeros(idx.size, dtype=np.uint64)
        ok = np.ones(idx.size, dtype=bool)
        bi = idx // self.v.per_block
        for b in np.unique(bi).tolist():
            sel = bi == b
            raw = self._block(b)
            if raw is None:
                ok[sel] = False
                continue
            within = idx[sel] - b * self.v.per_block
            vals[sel] = self._decode(raw, int(within.max()) + 1)[within]
        return vals, ok

    def compare(self) -> None:
        """QEMU's compare_refcounts (without fixing): leaks, corruptions, rebuild."""
        v, res = self.v, self.res
        n = v.nb_clusters + (1 if self.refs[v.nb_clusters] else 0)
        stored = np.zeros(n, dtype=np.uint64)
        known = np.ones(n, dtype=bool)
        per = v.per_block
        for b in range(-(-n // per)):
            lo, hi = b * per, min(n, (b + 1) * per)
            raw = self._block(b)
            if raw is None:
                known[lo:hi] = False
                res.check_errors += hi - lo
                res.note(f"Can't get refcount for clusters {lo}..{hi - 1}: Input/output error")
            else:
                stored[lo:hi] = self._decode(raw, hi - lo)
        self.stored, self.known = stored, known
        comp = self.refs[:n].astype(np.uint64)
        used = known & ((stored > 0) | (comp > 0))
        nzu = np.flatnonzero(used)
        self.highest = int(nzu[-1]) if nzu.size else -1
        diff = np.flatnonzero(known & (stored != comp))
        low = diff[stored[diff] < comp[diff]]
        high = diff[stored[diff] > comp[diff]]
        if (stored[low] == 0).any():
            self.rebuild = True
        for i in diff[:200].tolist():
            kind = "ERROR" if stored[i] < comp[i] else "Leaked"
            res.note(f"{kind} cluster {i} refcount={int(stored[i])} reference={int(comp[i])}")
        res.corruptions += low.size
        res.leaks += high.size
        res.mismatches = [(int(i), int(stored[i]), int(comp[i])) for i in diff.tolist()]

    def check_copied(self, repair: bool) -> None:
        """QEMU's check_oflag_copied over the active L1 table and its L2 tables."""
        v, h, res = self.v, self.v.header, self.res
        l1 = v.l1
        offs = (l1 & U64(L1E_OFFSET_MASK)).astype(np.int64)
        live = np.flatnonzero(offs)
        if not live.size:
            return
        ref, ok = self.refcounts_of(offs[live] >> v.bits)
        copied = (l1[live] & U64(COPIED)) != 0
        bad = ok & ((ref == 1) != copied)
        for k in np.flatnonzero(bad).tolist():
            i = int(live[k])
            res.corruptions += 1
            res.note(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 cluster: "
                     f"l1_index={i} l1_entry={int(l1[i]):x} refcount={int(ref[k])}")
            self.l1_fixes[i] = bool(ref[k] == 1)
        seen: Dict[int, int] = {}
        for k in np.flatnonzero(ok).tolist():
            off = int(offs[live[k]])
            seen[off] = seen.get(off, 0) + 1
        for off, mult in seen.items():
            if repair:
                mult = 1
            entries, _ = self._l2_words(off)
            std = (entries & U64(COMPRESSED)) == 0
            hosts = (entries & U64(L2E_OFFSET_MASK)).astype(np.int64)
            zero_flag = ((entries & U64(1)) != 0) if not h.extended_l2 else \
                np.zeros(entries.size, bool)
            alloc = std & (hosts != 0)
            if h.has_data_file:
                alloc |= std & ~zero_flag & ((entries & U64(COPIED)) != 0)
            idx = np.flatnonzero(alloc)
            if not idx.size:
                continue
            if h.has_data_file:
                r, rok = np.ones(idx.size, dtype=np.uint64), np.ones(idx.size, dtype=bool)
            else:
                r, rok = self.refcounts_of(hosts[idx] >> v.bits)
            cp = (entries[idx] & U64(COPIED)) != 0
            badl2 = rok & ((r == 1) != cp)
            nbad = int(badl2.sum())
            if not nbad:
                continue
            for j in np.flatnonzero(badl2)[:20].tolist():
                res.note(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data cluster: "
                         f"l2_entry={int(entries[idx[j]]):x} refcount={int(r[j])}")
            res.corruptions += nbad * mult
            if repair:
                fx = self.l2_fixes.setdefault(off, L2Fixes())
                for j in np.flatnonzero(badl2).tolist():
                    fx.copied[int(idx[j])] = bool(r[j] == 1)

    def finish(self) -> None:
        self.res.image_end_offset = (self.highest + 1) * self.v.cs
