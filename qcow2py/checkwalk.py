"""The lenient, memory-bounded metadata walk behind ``check`` (QEMU's semantics).

:class:`CheckView` opens an image the way ``qemu-img check`` does: only what
QEMU refuses at open time (bad magic, unsupported features, tables beyond the
format's limits) raises; every bad L1/L2/refcount entry is left for the walk
to report.  Reads past the end of the file return zeros, as QEMU's do.

:func:`walk` recomputes every cluster's reference count from the metadata
(QEMU's calculate_refcounts) and compares it with the stored one
(compare_refcounts), then checks the COPIED flags (check_oflag_copied).  The
arrays it allocates are sized by the file (one entry per host cluster, plus
one), never by an entry's value: a reference one cluster or more past the end
of the file is counted apart as a corruption, exactly as QEMU does.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import BackingChainError, FormatError
from .format import refcount as rc
from .format.bitmap import BitmapEntry, parse_bitmap_directory, MAX_DIRECTORY_SIZE
from .format.header import AUTOCLEAR_BITMAPS, MAX_SNAPSHOTS, Header
from .format.snapshot import Snapshot, parse_snapshot_table, snapshot_table_bytes_upper_bound
from .bitmaps import entry_problem
from .storage import Storage

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
BME_RESERVED_MASK = 0xFF000000000001FE
COPIED = 1 << 63
COMPRESSED = 1 << 62
MAX_L1_ENTRIES = (32 << 20) // 8
BME_MAX_TABLE_SIZE = 0x8000000
MAX_SNAPSHOT_EXTRA = 1024
BME_MAX_PHYS_SIZE = 0x20000000
_REQUEST_MAX = ((1 << 31) - 1) >> 9 << 9
#: QEMU fails (EIO) any request reaching past this offset
MAX_IO_OFFSET = ((1 << 63) - 1) // _REQUEST_MAX * _REQUEST_MAX

_U = np.uint64


#: the last snapshot table parsed (a repair opens the same table several times)
_snapshot_memo: dict = {}


class CheckFailed(FormatError):
    """The check itself could not complete (qemu-img: "Check failed", exit 1)."""


@dataclass
class L2Fixes:
    """What a repair would change in one L2 table (by entry index)."""

    zero: List[int] = field(default_factory=list)       # unaligned preallocated clusters
    copied: Dict[int, bool] = field(default_factory=dict)


class CheckView:
    """The metadata of one qcow2 file, read leniently for check and repair."""

    def __init__(self, storage: Storage, filename: str, repairing: bool = False) -> None:
        self.storage = storage
        self.filename = filename
        self.file_size = storage.size()
        first = storage.pread(0, 4096)
        bits = int.from_bytes(first[20:24], "big")
        cs = 1 << bits if 9 <= bits <= 21 else 4096
        buf = storage.pread(0, cs) if cs > 4096 else first[:cs]
        self.header = h = Header.parse(buf, None, lenient=True)
        self.cs = h.cluster_size
        self.bits = h.cluster_bits
        self.refcount_order = h.refcount_order
        self.per_block = rc.entries_per_block(self.cs, h.refcount_order)
        self.refcount_max = (1 << h.refcount_bits) - 1
        self.nb_clusters = -(-self.file_size // self.cs)
        # QEMU counts the virtual size in whole 512-byte sectors
        self.total_clusters = -(-(h.size // 512 * 512) // self.cs)
        for what, off, n in (("L1 table", h.l1_table_offset, h.l1_size * 8),
                             ("refcount table", h.refcount_table_offset,
                              h.refcount_table_clusters * self.cs)):
            if not self.can_read(off, n):
                raise FormatError(f"Could not read the {what} at {off:#x}: I/O error")
        self.l1 = self._table(h.l1_table_offset, h.l1_size * 8)
        self.reftable_raw = self._table(h.refcount_table_offset,
                                        h.refcount_table_clusters * self.cs)
        self.snapshots: List[Snapshot] = []
        self.snapshots_size = 0
        self.snapshot_error: Optional[str] = None
        #: each snapshot table entry: (40-byte header, extra data kept, id + name)
        self.snapshot_parts: List[Tuple[bytes, bytes, bytes]] = []
        self.snapshots_dropped_extra = 0
        self.repairing = repairing
        #: snapshots past QEMU's limit (check -r all drops them; check fails on them)
        self.overhanging = max(0, h.nb_snapshots - MAX_SNAPSHOTS)
        if self.overhanging and not repairing:
            raise FormatError(f"too many snapshots ({h.nb_snapshots}; at most "
                              f"{MAX_SNAPSHOTS}): check -r all drops the "
                              f"{self.overhanging} overhanging ones")
        if not self.overhanging:
            self._read_snapshots()
        self.bitmaps: List[BitmapEntry] = self._read_bitmaps()
        if h.has_data_file:
            self._find_data_file()
        if h.backing_file is not None and h.backing_file.split("\0", 1)[0]:
            self._open_backing()

    def can_read(self, offset: int, length: int) -> bool:
        """Whether QEMU would issue this read at all (else it fails with EIO)."""
        return 0 <= offset and offset + length <= MAX_IO_OFFSET

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; past the end of the file: zeros."""
        if offset >= self.file_size or length <= 0:
            return bytes(max(length, 0))
        return self.storage.pread(offset, length)

    def _table(self, offset: int, nbytes: int) -> np.ndarray:
        return np.frombuffer(self.pread(offset, nbytes), dtype=">u8").astype(np.uint64)

    def _read_snapshots(self) -> None:
        """QEMU's qcow2_do_read_snapshots: past the end of the file reads zeros;
        when repairing, extra data beyond 1 KiB is dropped (the entry kept)."""
        h = self.header
        if not h.nb_snapshots:
            return
        bound = snapshot_table_bytes_upper_bound(h.nb_snapshots)
        raw = self.pread(h.snapshots_offset, min(bound, max(0, self.file_size -
                                                           h.snapshots_offset)))

        key = (hashlib.sha1(raw).digest(), len(raw), h.nb_snapshots, self.repairing)
        if _snapshot_memo.get("key") == key:        # repairs re-read the same table
            (self.snapshots, self.snapshot_parts, self.snapshots_size,
             self.snapshots_dropped_extra, self.snapshot_error) = _snapshot_memo["value"]
            return
        try:
            self._parse_snapshots(raw, bound)
        finally:
            _snapshot_memo["key"] = key
            _snapshot_memo["value"] = (self.snapshots, self.snapshot_parts, self.snapshots_size,
                                       self.snapshots_dropped_extra, self.snapshot_error)

    def _parse_snapshots(self, raw: bytes, bound: int) -> None:
        h = self.header

        def get(at: int, n: int) -> bytes:          # zeros past the end of the file
            chunk = raw[at:at + n]
            return chunk + bytes(n - len(chunk))

        pos = 0
        parts = []
        for i in range(h.nb_snapshots):
            head = get(pos, 40)
            id_len, name_len = struct.unpack_from(">HH", head, 12)
            extra_len = struct.unpack_from(">I", head, 36)[0]
            pos += 40
            keep = extra_len
            if extra_len > MAX_SNAPSHOT_EXTRA:
                if not self.repairing:
                    self.snapshot_error = (f"Too much extra metadata in snapshot table "
                                           f"entry {i}")
                    return
                keep = 24                # the known fields; the rest is dropped
                self.snapshots_dropped_extra += 1
            extra = get(pos, keep)
            pos += extra_len
            names = get(pos, id_len + name_len)
            pos += id_len + name_len
            if pos > bound:
                self.snapshot_error = "Snapshot table is too big"
                return
            pos += -pos % 8
            parts.append((head, extra, names))
        buf = bytearray()
        for head, extra, names in parts:
            buf += head[:36] + struct.pack(">I", len(extra)) + extra + names
            buf += bytes(-len(buf) % 8)
        try:
            self.snapshots = parse_snapshot_table(bytes(buf), len(parts))
        except FormatError as e:
            self.snapshot_error = str(e)
            return
        self.snapshot_parts, self.snapshots_size = parts, pos

    def _read_bitmaps(self) -> List[BitmapEntry]:
        h = self.header
        ext = h.bitmaps
        if ext is None or not (h.autoclear_features & AUTOCLEAR_BITMAPS):
            return []
        if ext.reserved or ext.nb_bitmaps == 0 or ext.directory_size > MAX_DIRECTORY_SIZE \
                or ext.directory_offset % self.cs:
            raise FormatError("bitmaps extension: invalid bitmap directory")
        entries = parse_bitmap_directory(self.pread(ext.directory_offset, ext.directory_size),
                                         ext.nb_bitmaps)
        for e in entries:           # QEMU loads every bitmap's table when it opens
            err = entry_problem(e, h.size, self.cs, 1 << 62)   # past EOF: counted by check
            if err is not None:
                raise err
            if not self.can_read(e.table_offset, e.table_size * 8):
                raise FormatError(f"Could not read bitmap_table table from image for "
                                  f"bitmap '{e.name}': I/O error")
            t = self._table(e.table_offset, e.table_size * 8)
            offs = t & _U(L2E_OFFSET_MASK)
            if ((t & _U(BME_RESERVED_MASK)) != 0).any() or \
                    ((offs != 0) & (((t & _U(1)) != 0) | ((offs & _U(self.cs - 1)) != 0))).any():
                raise FormatError(f"Could not read bitmap_table table from image for "
                                  f"bitmap '{e.name}': Invalid argument")
        return entries

    def _open_backing(self) -> None:
        """qemu-img check opens the backing chain: an image whose backing file
        cannot be opened fails the same way (exit 1)."""
        from .backing import DEFAULT_POLICY
        from .image import open as open_image
        h = self.header
        if h.backing_format is not None and h.backing_format not in ("qcow2", "raw"):
            raise BackingChainError(f"Could not open backing file: unknown driver "
                                    f"{h.backing_format!r}")
        name = h.backing_file.split("\0", 1)[0]        # QEMU reads a C string
        path = DEFAULT_POLICY.resolve(name, self.storage.name or self.filename)
        try:
            open_image(path, format=h.backing_format if h.backing_format in ("qcow2", "raw")
                       else None).close()
        except FileNotFoundError:
            raise BackingChainError(f"Could not open backing file {path!r}") from None

    def _find_data_file(self) -> None:
        name = self.header.data_file
        if name is None:
            raise FormatError("image uses an external data file but does not name it")
        path = name if os.path.isabs(name) else \
            os.path.join(os.path.dirname(self.storage.name or self.filename), name)
        if not os.path.exists(path):
            raise BackingChainError(f"external data file {path!r} not found")

    def reftable(self) -> np.ndarray:
        return self.reftable_raw


class Walk:
    """One pass of QEMU's check over a :class:`CheckView`; results go to ``res``
    (a :class:`~qcow2py.check.CheckResult`)."""

    def __init__(self, view: CheckView, res, fix: bool = False,
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
        l1 = v.l1 if active else v._table(l1_offset, l1_size * 8)
        nz = np.flatnonzero(l1)
        if not nz.size:
            return
        ent = l1[nz]
        bad = (ent & _U(L1E_RESERVED_MASK)) != 0
        for e in ent[bad][:20].tolist():
            self.res.note(f"ERROR found L1 entry with reserved bits set: {e:x}")
        self.res.corruptions += int(bad.sum())
        l2offs = (ent & _U(L1E_OFFSET_MASK)).astype(np.int64)
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
        compressed = (entries & _U(COMPRESSED)) != 0
        std = ~compressed
        n = int((std & ((entries & _U(L2E_STD_RESERVED_MASK)) != 0)).sum())
        if n:
            self.corrupt(f"ERROR found {n} l2 entries with reserved bits set "
                         f"(L2 table {l2_off:#x})", n * mult)
        # compressed clusters
        if compressed.any():
            c = np.flatnonzero(compressed)
            n = int(((entries[c] & _U(COPIED)) != 0).sum())
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
            coff = (e & _U((1 << shift) - 1)).astype(np.int64)
            nsect = ((e >> _U(shift)) & _U((1 << (v.bits - 8)) - 1)).astype(np.int64) + 1
            self.inc_many(coff, nsect * 512 - (coff & 511), mult)
            if active and c.size:
                res.allocated_clusters += c.size * mult
                res.compressed_clusters += c.size * mult
                res.fragmented_clusters += c.size * mult
        # standard clusters
        off = (entries & _U(L2E_OFFSET_MASK)).astype(np.int64)
        zero_flag = ((entries & _U(1)) != 0) & std if not ext else np.zeros(entries.size, bool)
        normal = std & ~zero_flag & (off != 0)
        if h.has_data_file:
            normal |= std & ~zero_flag & (off == 0) & ((entries & _U(COPIED)) != 0)
        alloc = normal | (zero_flag & (off != 0))
        if ext:
            amap = bitmaps & _U(0xFFFFFFFF)
            n = int((alloc & (((bitmaps >> _U(32)) & amap) != 0)).sum())
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
            t = v._table(bm.table_offset, bm.table_size * 8)
            offs = t & _U(L2E_OFFSET_MASK)
            bad = ((t & _U(BME_RESERVED_MASK)) != 0) | \
                ((offs != 0) & (((t & _U(1)) != 0) | ((offs & _U(v.cs - 1)) != 0)))
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
        offs = (l1 & _U(L1E_OFFSET_MASK)).astype(np.int64)
        live = np.flatnonzero(offs)
        if not live.size:
            return
        ref, ok = self.refcounts_of(offs[live] >> v.bits)
        copied = (l1[live] & _U(COPIED)) != 0
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
            std = (entries & _U(COMPRESSED)) == 0
            hosts = (entries & _U(L2E_OFFSET_MASK)).astype(np.int64)
            zero_flag = ((entries & _U(1)) != 0) if not h.extended_l2 else \
                np.zeros(entries.size, bool)
            alloc = std & (hosts != 0)
            if h.has_data_file:
                alloc |= std & ~zero_flag & ((entries & _U(COPIED)) != 0)
            idx = np.flatnonzero(alloc)
            if not idx.size:
                continue
            if h.has_data_file:
                r, rok = np.ones(idx.size, dtype=np.uint64), np.ones(idx.size, dtype=bool)
            else:
                r, rok = self.refcounts_of(hosts[idx] >> v.bits)
            cp = (entries[idx] & _U(COPIED)) != 0
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
