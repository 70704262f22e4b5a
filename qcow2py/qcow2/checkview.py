"""The lenient open of a qcow2 file for check and repair (QEMU's semantics).

:class:`CheckView` opens an image the way ``qemu-img check`` does: only what
QEMU refuses at open time (bad magic, unsupported features, tables beyond the
format's limits, a broken bitmap directory, a backing file it cannot open)
raises; every bad L1/L2/refcount entry is left for :mod:`qcow2py.qcow2.checkwalk`
to report.  Reads past the end of the file return zeros, as QEMU's do; reads
QEMU could not even issue (past 2^63) are refused as QEMU refuses them.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Callable, List, Optional, Tuple

from ..lazyimport import numpy as np

from ..errors import BackingChainError, FormatError
from ..format import refcount as rc
from ..format.bitmap import BitmapEntry, parse_bitmap_directory, MAX_DIRECTORY_SIZE
from ..format.header import AUTOCLEAR_BITMAPS, MAX_SNAPSHOTS, Header
from ..format.l2 import L2E_OFFSET_MASK
from ..format.snapshot import Snapshot, parse_snapshot_table, snapshot_table_bytes_upper_bound
from ..io.storage import Storage
from .bitmaps import entry_problem

#: opens (and closes) a backing file as qemu-img check does, or raises:
#: (name as the image gives it, backing format or None, path of the image naming it)
OpenBacking = Callable[[str, Optional[str], str], None]

BME_RESERVED_MASK = 0xFF000000000001FE
MAX_L1_ENTRIES = (32 << 20) // 8
MAX_SNAPSHOT_EXTRA = 1024
_REQUEST_MAX = ((1 << 31) - 1) >> 9 << 9
#: QEMU fails (EIO) any request reaching past this offset
MAX_IO_OFFSET = ((1 << 63) - 1) // _REQUEST_MAX * _REQUEST_MAX

U64 = np.uint64


class CheckFailed(FormatError):
    """The check itself could not complete (qemu-img: "Check failed", exit 1)."""


#: the last snapshot table parsed (a repair opens the same table several times)
_snapshot_memo: dict = {}


class CheckView:
    """The metadata of one qcow2 file, read leniently for check and repair."""

    def __init__(self, storage: Storage, filename: str, repairing: bool = False,
                 open_backing: Optional[OpenBacking] = None) -> None:
        """``open_backing``: how the backing file is opened (the opener's policy
        lives above the drivers); None when the chain is already open or not wanted."""
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
        self.l1 = self.table(h.l1_table_offset, h.l1_size * 8)
        self.reftable_raw = self.table(h.refcount_table_offset,
                                        h.refcount_table_clusters * self.cs)
        self.snapshots: List[Snapshot] = []
        self.snapshots_size = 0
        self.snapshot_error: Optional[str] = None
        #: each snapshot table entry: (40-byte header, extra data kept, id + name)
        self.snapshot_parts: List[Tuple[bytes, bytes, bytes]] = []
        self.snapshots_dropped_extra = 0
        self.repairing = repairing
        #: a snapshot table offset QEMU refuses, without snapshots (check -r all clears it)
        self.bad_snapshot_offset = h.snapshot_offset_problem() is not None
        if self.bad_snapshot_offset and not repairing:
            raise FormatError(h.snapshot_offset_problem())
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
        if h.backing_file is not None and h.backing_file.split("\0", 1)[0] \
                and open_backing is not None:
            self._open_backing(open_backing)

    def can_read(self, offset: int, length: int) -> bool:
        """Whether QEMU would issue this read at all (else it fails with EIO)."""
        return 0 <= offset and offset + length <= MAX_IO_OFFSET

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; past the end of the file: zeros."""
        if offset >= self.file_size or length <= 0:
            return bytes(max(length, 0))
        return self.storage.pread(offset, length)

    def table(self, offset: int, nbytes: int) -> np.ndarray:
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
        # one (key, value) pair, swapped in one assignment: checks in other threads
        # never see a key with another table's value
        memo = _snapshot_memo.get("last")
        if memo is not None and memo[0] == key:     # repairs re-read the same table
            (self.snapshots, self.snapshot_parts, self.snapshots_size,
             self.snapshots_dropped_extra, self.snapshot_error) = memo[1]
            return
        try:
            self._parse_snapshots(raw, bound)
        finally:
            _snapshot_memo["last"] = (key, (self.snapshots, self.snapshot_parts,
                                            self.snapshots_size, self.snapshots_dropped_extra,
                                            self.snapshot_error))

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
            t = self.table(e.table_offset, e.table_size * 8)
            offs = t & U64(L2E_OFFSET_MASK)
            if ((t & U64(BME_RESERVED_MASK)) != 0).any() or \
                    ((offs != 0) & (((t & U64(1)) != 0) | ((offs & U64(self.cs - 1)) != 0))).any():
                raise FormatError(f"Could not read bitmap_table table from image for "
                                  f"bitmap '{e.name}': Invalid argument")
        return entries

    def _open_backing(self, open_backing: OpenBacking) -> None:
        """qemu-img check opens the backing chain: an image whose backing file
        cannot be opened fails the same way (exit 1)."""
        h = self.header
        if h.backing_format is not None and h.backing_format not in ("qcow2", "raw"):
            raise BackingChainError(f"Could not open backing file: unknown driver "
                                    f"{h.backing_format!r}")
        name = h.backing_file.split("\0", 1)[0]        # QEMU reads a C string
        open_backing(name, h.backing_format, self.storage.name or self.filename)

    def _find_data_file(self) -> None:
        name = self.header.data_file
        if name is None:
            raise FormatError("image uses an external data file but does not name it")
        path = name if os.path.isabs(name) else \
            os.path.join(os.path.dirname(self.storage.name or self.filename), name)
        if not os.path.exists(path):
            raise BackingChainError(f"external data file {path!r} not found")
