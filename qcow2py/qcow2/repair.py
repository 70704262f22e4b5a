"""``check -r leaks|all`` at the storage level, in QEMU's order and crash-safe.

Works on the file through :class:`~qcow2py.io.storage.Storage` only (so it runs
before any writer state exists, and never needs one):

1. (``all``) preallocated clusters at unaligned offsets become zero clusters;
2. refcounts: when the structures are broken (an entry with reserved bits, an
   unaligned or out-of-file block, a block referenced twice, a referenced
   cluster without a refcount) they are rebuilt from scratch *after the end
   of the file*, and only then does the header point at them; otherwise the
   wrong counts are rewritten in place (``leaks``: only counts too high);
3. COPIED flags: L2 tables first, then the L1 table;
4. the dirty and corrupt bits are cleared when nothing is left to fix.

Every step ends with a barrier of :class:`~qcow2py.qcow2.journal.Journal`
(the journal's docstring lists this ordering with the others), and every
header change is one of its synced field writes, so an interruption leaves
an image that is at worst leaking clusters (data before refcounts before L2
before L1 before header).

Its writes are not overlap-checked (:mod:`.overlap`): repair's Journal has no
template.  The metadata is what is under suspicion here; repair writes only
from a full walk of it (the same walk that finds overlapping structures and
rebuilds the refcounts around them), and its new structures go past the end
of the file, where nothing else can lie.  QEMU's repair likewise writes its
rebuilt refcount structures without the runtime check.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

from ..lazyimport import numpy as np

from ..errors import CorruptImageError
from ..format import refcount as rc
from ..format.header import MAX_REFTABLE_BYTES, Header
from ..io.storage import Storage
from .checkresult import CheckResult
from .checkview import OpenBacking
from .checkwalk import CheckFailed, CheckView, L2Fixes, Walk
from .journal import Journal
from .overlap import Kind, header_structures


def _journal(view: CheckView) -> Journal:
    """The journal of the file as the lenient view reads it (its barriers and
    header field writes order every repair step)."""
    return Journal(view.storage, view.header)


def check_storage(storage: Storage, filename: str,
                  open_backing: Optional[OpenBacking] = None) -> CheckResult:
    """Check the qcow2 file in ``storage`` (read only)."""
    res = CheckResult(filename=filename)
    w = Walk(CheckView(storage, filename, open_backing=open_backing), res)
    w.run()
    w.compare()
    w.check_copied(repair=False)
    w.finish()
    return res


def repair_storage(storage: Storage, filename: str, mode: str,
                   open_backing: Optional[OpenBacking] = None) -> CheckResult:
    """Repair like ``qemu-img check -r MODE``; returns the check made afterwards
    (with ``leaks_fixed``/``corruptions_fixed`` set).  Raises
    :class:`~qcow2py.qcow2.checkview.CheckFailed` where qemu-img reports "Check failed".
    ``open_backing``: see :class:`~qcow2py.qcow2.checkview.CheckView` (the first
    open only: the repair does not change the backing file)."""
    if mode not in ("leaks", "all"):
        raise ValueError(f"repair mode must be 'leaks' or 'all', not {mode!r}")
    fix_all = mode == "all"
    first = CheckResult(filename=filename)
    view = CheckView(storage, filename, repairing=fix_all, open_backing=open_backing)
    if view.bad_snapshot_offset:
        _journal(view).set_fields(("snapshots_offset", 0))     # no snapshots: no table
        view = CheckView(storage, filename, repairing=fix_all)
    if view.overhanging:
        # QEMU's answer to a snapshot count past its limit: keep the first 65536
        _journal(view).set_fields(("nb_snapshots", view.header.nb_snapshots - view.overhanging))
        view = CheckView(storage, filename, repairing=fix_all)
    if fix_all and _fix_snapshot_table(view):
        view = CheckView(storage, filename)
    w = Walk(view, first, fix=fix_all)
    w.run()
    if w.l2_fixes:
        _write_l2_fixes(view, w.l2_fixes)
        _journal(view).barrier()
    w.compare()
    if w.rebuild or (fix_all and w.outside_blocks):
        if not fix_all:
            raise CheckFailed("ERROR need to rebuild refcount structures: they must be "
                              "rebuilt with check -r all")
        view = CheckView(storage, filename)
        refs = Walk(view, CheckResult(filename=filename), count_refcount_structures=False)
        refs.run()
        _rebuild(view, refs.refs)
    else:
        fixes = [(i, b) for i, a, b in first.mismatches if a > b or (fix_all and a < b)]
        if fixes:
            _set_refcounts(view, w, fixes)
    # COPIED flags, against the refcounts as they are now
    mid = CheckResult(filename=filename)
    view = CheckView(storage, filename)
    w = Walk(view, mid)
    w.run()
    w.compare()
    if fix_all or not (mid.corruptions or mid.leaks or mid.check_errors):
        w.check_copied(repair=True)
        journal = _journal(view)
        _write_l2_fixes(view, w.l2_fixes)
        journal.barrier()
        for i, want in sorted(w.l1_fixes.items()):
            e = int(view.l1[i])
            e = e | (1 << 63) if want else e & ~(1 << 63)
            storage.pwrite(struct.pack(">Q", e), view.header.l1_table_offset + 8 * i)
        journal.barrier()
    final = check_storage(storage, filename)
    if not (final.corruptions or final.check_errors):
        _clear_problem_bits(storage, view.cs)
    final.leaks_fixed = max(0, first.leaks - final.leaks)
    final.corruptions_fixed = max(0, first.corruptions - final.corruptions)
    return final


def _fix_snapshot_table(view: CheckView) -> bool:
    """v3 entries without the 16 bytes of extra data (VM state size, disk size)
    get them, in a new table written after the end of the file; the header
    then points at it.  The refcount pass that follows counts the new table
    (and rebuilds the refcounts, since it has none yet).  True if rewritten."""
    h = view.header
    incomplete = h.version >= 3 and any(len(e) < 16 for _, e, _ in view.snapshot_parts)
    if not (incomplete or view.snapshots_dropped_extra):
        return False
    out = bytearray()
    for head, extra, names in view.snapshot_parts:
        if h.version >= 3 and len(extra) < 16:
            vmss = struct.unpack_from(">Q", extra)[0] if len(extra) >= 8 else \
                struct.unpack_from(">I", head, 32)[0]
            extra = struct.pack(">QQ", vmss, h.size // 512 * 512)
        head = bytearray(head)
        struct.pack_into(">I", head, 36, len(extra))
        out += head + extra + names
        out += bytes(-len(out) % 8)
    start = -(-view.file_size // view.cs) * view.cs
    journal = _journal(view)
    view.storage.pwrite(bytes(out) + bytes(-len(out) % view.cs), start)
    journal.barrier()
    journal.set_fields(("nb_snapshots", len(view.snapshot_parts)), ("snapshots_offset", start))
    return True


def _metadata_clusters(view: CheckView) -> set:
    """Clusters an L2 write must never touch (QEMU's overlap check, cached mode)."""
    h, cs = view.header, view.cs
    out = {0}
    for off, n in ((h.l1_table_offset, h.l1_size * 8),
                   (h.refcount_table_offset, h.refcount_table_clusters * cs),
                   (h.snapshots_offset, view.snapshots_size)):
        if n > 0:
            out.update(range(off // cs, (off + n - 1) // cs + 1))
    t = view.reftable_raw & np.uint64(rc.REFT_OFFSET_MASK)
    out.update((t[t != 0] // np.uint64(cs)).astype(np.int64).tolist())
    return out


def _write_l2_fixes(view: CheckView, fixes: Dict[int, L2Fixes]) -> None:
    cs, ext = view.cs, view.header.extended_l2
    forbidden = _metadata_clusters(view)
    for off, fx in sorted(fixes.items()):
        if not (fx.zero or fx.copied) or off % cs or off + cs > view.file_size \
                or off // cs in forbidden:
            continue                # QEMU refuses such a write (overlap check) too
        words = np.frombuffer(view.pread(off, cs), dtype=">u8").astype(np.uint64)
        step = 2 if ext else 1
        for i in fx.zero:
            if ext:
                words[2 * i], words[2 * i + 1] = 0, np.uint64(0xFFFFFFFF00000000)
            else:
                words[i] = 1
        for i, want in fx.copied.items():
            e = int(words[step * i])
            words[step * i] = (e | (1 << 63)) if want else (e & ~(1 << 63))
        view.storage.pwrite(words.astype(">u8").tobytes(), off)


def _set_refcounts(view: CheckView, w: Walk, fixes) -> None:
    """Rewrite the counts of clusters in place (their refcount blocks exist)."""
    per = view.per_block
    byblock: Dict[int, list] = {}
    for i, want in fixes:
        byblock.setdefault(i // per, []).append((i % per, want))
    for b, items in sorted(byblock.items()):
        off = int(view.reftable_raw[b]) & rc.REFT_OFFSET_MASK
        if not off or off % view.cs:
            continue
        raw = bytearray(view.pread(off, view.cs))
        for j, want in items:
            _put_entry(raw, view.refcount_order, j, want)
        view.storage.pwrite(bytes(raw), off)
    _journal(view).barrier()


def _put_entry(raw: bytearray, order: int, j: int, value: int) -> None:
    """Store refcount ``value`` as entry ``j`` of a refcount block, in place."""
    bits = 1 << order
    if bits >= 8:
        n = bits // 8
        raw[j * n:(j + 1) * n] = value.to_bytes(n, "big")
    else:
        byte, shift = divmod(j * bits, 8)
        mask = ((1 << bits) - 1) << shift
        raw[byte] = (raw[byte] & ~mask) | ((value << shift) & mask)


def _layout(nonzero_blocks: np.ndarray, start: int, per: int, cs: int) -> Tuple[np.ndarray, int]:
    """Block indices to allocate and reftable clusters, when the new structures
    (blocks, then table) occupy the clusters from ``start`` on."""
    nblocks, tclusters = 0, 0
    while True:
        total = nblocks + tclusters
        tail = np.arange(start // per, (start + max(total, 1) - 1) // per + 1, dtype=np.int64)
        blocks = np.union1d(nonzero_blocks, tail)
        t = -(-(int(blocks[-1]) + 1) * 8 // cs)
        if blocks.size == nblocks and t == tclusters:
            return blocks, tclusters
        nblocks, tclusters = blocks.size, t


def _header_structures(view: CheckView) -> List[Tuple[int, int, bool]]:
    """Cluster ranges [a, b) of the structures the header names (but the header),
    each with whether it stays referenced after a rebuild (all but the old
    refcount table); sizes as the header and the lenient open give them, so each
    is bounded by the format."""
    h, cs = view.header, view.cs
    table = view.snapshots_size if h.nb_snapshots and not view.bad_snapshot_offset else 0
    return [(offset // cs, -(-(offset + max(length, 1)) // cs), kind != Kind.REFCOUNT_TABLE)
            for kind, offset, length in header_structures(h, table)
            if kind != Kind.HEADER and offset > 0]


def _rebuild(view: CheckView, refs: np.ndarray) -> None:
    """New refcount blocks and table after the end of the file, then the header."""
    cs, per, st = view.cs, view.per_block, view.storage
    refs = np.minimum(refs, min(view.refcount_max, 1 << 62)).astype(np.uint64)
    # the new structures never land on a structure the header names, even one past
    # the end of the file that no reference counted (a truncated image): QEMU's
    # rebuild puts its blocks there and its overlap check stops it; ours go after
    # it, and once the file reaches over such a structure (the L1 table, the
    # snapshot table, the bitmap directory) it is counted like any other
    named = _header_structures(view)
    while True:
        used = np.flatnonzero(refs)
        start = max(view.nb_clusters, int(used[-1]) + 1 if used.size else 1)
        blocks, tclusters = _layout(np.unique(used // per), start, per, cs)
        while True:
            end = start + blocks.size + tclusters
            hit = [b for a, b, _ in named if a < end and start < b]
            if not hit:
                break
            start = max(hit)
            blocks, tclusters = _layout(np.unique(used // per), start, per, cs)
        inside = [(a, b) for a, b, kept in named if kept and view.nb_clusters <= a and
                  b <= start and (b > refs.size or not refs[a:b].all())]
        if not inside:
            break
        grow = max(b for _, b in inside)
        if grow > refs.size:
            refs = np.concatenate([refs, np.zeros(grow - refs.size, dtype=refs.dtype)])
        for a, b in inside:
            refs[a:b] = np.maximum(refs[a:b], 1)
    if tclusters * cs > MAX_REFTABLE_BYTES:
        raise CorruptImageError("cannot rebuild the refcount structures: the refcount "
                                "table would be too large")
    end = start + blocks.size + tclusters
    table = np.zeros(tclusters * cs // 8, dtype=np.uint64)
    for k, b in enumerate(blocks.tolist()):
        off = (start + k) * cs
        table[b] = off
        lo, hi = b * per, min((b + 1) * per, max(refs.size, end))
        vals = np.zeros(-(-(hi - lo) // 8) * 8, dtype=np.uint64)   # whole bytes at any width
        part = refs[lo:min(hi, refs.size)]
        vals[:part.size] = part
        a, z = max(start, lo), min(end, hi)
        if a < z:
            vals[a - lo:z - lo] = 1                 # the new blocks and table themselves
        data = rc.encode_block(vals, view.refcount_order)
        st.pwrite(data + bytes(cs - len(data)), off)
    table_off = (start + blocks.size) * cs
    st.pwrite(table.astype(">u8").tobytes(), table_off)
    _journal(view).switch_reftable(table_off, tclusters)     # blocks and table durable first


def _clear_problem_bits(storage: Storage, cluster_size: int) -> None:
    """The dirty and corrupt bits go (the journal's synced header field write)."""
    h = Header.parse(storage.pread(0, cluster_size), None, lenient=True)
    Journal(storage, h).clear_problem_bits()
