"""Reading qcow2 images: opening (header, L1, snapshots, bitmaps), reads through
the mapping of :mod:`.mapping`, compressed clusters, info and block status.

Data runs are read with one request each, in a single native call that
releases the GIL; compressed clusters are decompressed on a thread pool.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

from ..lazyimport import numpy as np
from bitarray import frozenbitarray

from ..errors import BitmapError, CorruptImageError, FormatError, Qcow2Error
from ..format.bitmap import BitmapEntry, parse_bitmap_directory, MAX_DIRECTORY_SIZE
from ..format.header import (AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, Header,
                             QEMU_HEADER_LENGTH, V3_MIN_HEADER_LENGTH, has_magic,
                             peek_cluster_bits)
from ..format.snapshot import Snapshot, parse_snapshot_table, snapshot_table_bytes_upper_bound
from ..format.l2 import L1E_OFFSET_MASK, L1E_RESERVED_MASK
from ..image import backing_display_name
from ..io.storage import Storage
from ..native import COMPRESSED, DATA, UNALLOCATED, UNALLOCATED_ALLOC
from .bitmaps import Bitmap, load_bits
from .decompress import pool as decompress_pool, read_and_decompress
from .mapping import Qcow2Mapping
from ..lazyimport import lazy_module

#: imported on first use (qcow2py info reads neither)
checking = lazy_module("qcow2py.qcow2.check")
snapshot_ops = lazy_module("qcow2py.qcow2.snapshots")

DEFAULT_L2_CACHE_BYTES = 32 << 20
_MAX_HEADER_READ = 1 << 21

_pool = decompress_pool     # the decompression threads (started on first use)


class Qcow2Image(Qcow2Mapping):
    """A qcow2 image opened for reading (with its backing chain)."""

    format = "qcow2"

    def __init__(self, storage: Storage, filename: str, ctx) -> None:
        super().__init__()
        self.storage = storage
        self.filename = filename
        self._file_size = storage.size()
        self.header = h = self._read_header()
        self.size = h.size // 512 * 512     # QEMU counts whole sectors (floors the size)
        self.cluster_size = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.unit_bits = h.subcluster_bits
        self.extended_l2 = h.extended_l2
        self.units_per_table = h.l2_entries * (32 if h.extended_l2 else 1)
        self.codec = h.compression_name
        self._init_l2_cache(ctx.l2_cache_bytes or DEFAULT_L2_CACHE_BYTES)
        self._last_cluster: Tuple[int, bytes] = (-1, b"")
        if getattr(ctx, "chain", True):   # info (chain=False) decodes it only if it reads
            self.__dict__["_l1"] = self._read_l1()      # the cached_property's slot
        self.snapshots: List[Snapshot] = self._read_snapshots()
        #: the bitmap directory as it is in the file (check counts its clusters)
        self.bitmap_directory: List[BitmapEntry] = self._read_bitmaps()
        #: the persistent dirty bitmaps, as :class:`~qcow2py.bitmaps.Bitmap` objects
        self.bitmaps: List[Bitmap] = [Bitmap.from_entry(self, e) for e in self.bitmap_directory]
        self.data_storage: Storage = storage
        self.data_file_path: Optional[str] = None
        try:
            if not ctx.chain:
                self.detached = h.has_data_file or h.backing_file is not None
            elif h.has_data_file:
                if h.data_file is None:
                    raise FormatError("image uses an external data file but does not name it")
                self.data_storage, self.data_file_path = ctx.open_data_file(self, h.data_file)
            if h.backing_file is not None and ctx.chain:
                self.backing = ctx.open_backing(self, h.backing_file, h.backing_format)
        except BaseException:
            if self.data_storage is not storage:
                self.data_storage.close()
            raise

    # ------------------------------------------------------------ open helpers
    def _read_header(self) -> Header:
        """Parse cluster 0 as QEMU reads it: past the end of the file, zeros.

        A truncated image opens as it does with QEMU (its header fields, tables
        and clusters past the end read as zeros: info, map and check work, reads
        return zeros), and fails as it does when a zeroed field is invalid.  A
        file too short to hold even the magic is "too short"."""
        size = max(self._file_size, 0)
        first = self.storage.pread(0, min(4096, size))
        if len(first) < 4 or not has_magic(first):
            Header.parse(first[:QEMU_HEADER_LENGTH], self._file_size)   # raises a clear error
        first = self.storage.pread(0, 4096)             # zero-padded
        bits = peek_cluster_bits(first)
        cs = 1 << bits if 9 <= bits <= 21 else _MAX_HEADER_READ
        want = min(cs, _MAX_HEADER_READ)
        if want > len(first):
            first = self.storage.pread(0, want)
        try:
            # tables past the end of the file are QEMU's to read as zeros: no file size
            return Header.parse(first[:cs], None)
        except Qcow2Error as e:
            if size >= min(cs, V3_MIN_HEADER_LENGTH):
                raise
            raise type(e)(f"{e} (the file is too short for a qcow2 header: {size} bytes, "
                          f"read as zeros past its end)") from None

    def select_snapshot(self, name: str) -> None:
        """Read the internal snapshot ``name`` (id or name) instead of the active state:
        its L1 table (read-only) and its virtual size.  Only on images opened "r"."""
        if not self.read_only:
            raise ValueError("a snapshot is read through an image opened read-only ('r')")
        snap = snapshot_ops.find(self, name)
        snapshot_ops.check_l1_bounds(self, snap.l1_table_offset, snap.l1_size)
        self._l1 = self._read_l1(snap.l1_table_offset, snap.l1_size)
        self.forget_tables()
        if snap.disk_size is not None:
            self.size = snap.disk_size
        self.snapshot = snap

    @functools.cached_property
    def _l1(self) -> np.ndarray:
        return self._read_l1()

    def _read_l1(self, offset: Optional[int] = None, size: Optional[int] = None) -> np.ndarray:
        h = self.header
        offset = h.l1_table_offset if offset is None else offset
        size = h.l1_size if size is None else size
        raw = self.storage.pread(offset, size * 8) if size else b""
        l1 = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        bad = np.flatnonzero(l1 & np.uint64(L1E_RESERVED_MASK))
        if bad.size:
            i = int(bad[0])
            raise CorruptImageError(f"L1 entry {i} ({int(l1[i]):#018x}) has reserved bits set")
        offs = l1 & np.uint64(L1E_OFFSET_MASK)
        bad = np.flatnonzero(offs & np.uint64(self.cluster_size - 1))
        if bad.size:
            i = int(bad[0])
            raise CorruptImageError(f"L1 entry {i}: L2 table offset {int(offs[i]):#x} is not "
                                    f"cluster aligned")
        # an L2 table past the end of the file reads as zeros (unallocated), as in QEMU
        return offs.astype(np.int64)

    def _read_snapshots(self) -> List[Snapshot]:
        h = self.header
        if not h.nb_snapshots:
            return []
        # past the end of the file the table reads as zeros (as QEMU reads it): room
        # for the file's part, one entry straddling its end and zeroed entries
        length = min(snapshot_table_bytes_upper_bound(h.nb_snapshots),
                     max(0, self._file_size - h.snapshots_offset) +
                     snapshot_table_bytes_upper_bound(1) + 40 * h.nb_snapshots)
        return parse_snapshot_table(self.storage.pread(h.snapshots_offset, length),
                                    h.nb_snapshots)

    def _read_bitmaps(self) -> List[BitmapEntry]:
        ext = self.header.bitmaps
        if ext is None or not (self.header.autoclear_features & AUTOCLEAR_BITMAPS):
            return []       # without the autoclear bit the extension is stale (spec)
        if ext.reserved:
            raise FormatError(f"bitmaps extension: reserved field is {ext.reserved:#x}, not 0")
        if ext.nb_bitmaps == 0:
            raise FormatError("bitmaps extension with zero bitmaps")
        if ext.directory_size > MAX_DIRECTORY_SIZE:
            raise FormatError(f"bitmap directory too large ({ext.directory_size} bytes; at "
                              f"most {MAX_DIRECTORY_SIZE})")
        if ext.directory_offset % self.cluster_size:
            raise FormatError(f"bitmap directory offset {ext.directory_offset:#x} is not "
                              f"cluster aligned")
        # past the end of the file the directory reads as zeros, as in QEMU (its
        # size is bounded above)
        raw = self.storage.pread(ext.directory_offset, ext.directory_size)
        return parse_bitmap_directory(raw, ext.nb_bitmaps)

    # ------------------------------------------------------------ bitmaps
    def find_bitmap(self, name: str) -> Bitmap:
        """The persistent bitmap called ``name`` (BitmapError if there is none)."""
        for b in self.bitmaps:
            if b.name == name:
                return b
        raise BitmapError(f"Dirty bitmap '{name}' not found")

    def add_bitmap(self, name: str, granularity: Optional[int] = None,
                   enabled: bool = True) -> Bitmap:
        """Add a persistent bitmap (needs the image opened "r+")."""
        return self._read_only()

    def remove_bitmap(self, name: str) -> None:
        """Remove a persistent bitmap (needs the image opened "r+")."""
        self._read_only()

    def load_bitmap_bits(self, bm: Bitmap):
        self._check_open()
        return frozenbitarray(load_bits(self.storage, bm.entry, self.size, self.cluster_size,
                                        self.storage.size()))

    def check_bitmap_writable(self, bm: Bitmap) -> None:
        self._read_only()

    def bitmaps_changed_state(self) -> None:
        pass

    def _close_layer(self) -> None:
        try:
            if self.data_storage is not self.storage:
                self.data_storage.close()
        finally:
            self.storage.close()        # and its locks, even if the data file's close failed

    # ------------------------------------------------------------ reading
    def _read_zeroed(self, mv: memoryview, offset: int) -> None:
        self._check_open()
        ub = self.unit_bits
        if offset >> ub == (offset + len(mv) - 1) >> ub:
            self._read_in_unit(mv, offset)          # a small read: no arrays
            return
        starts, lens, kinds, hosts, csizes = self.run_arrays(offset, len(mv))
        rel = starts - offset
        data = kinds == DATA
        if data.any():
            # past the end of the file a data cluster reads as zeros, as in QEMU
            self.data_storage.read_runs(mv, rel[data], hosts[data], lens[data])
        fall = (kinds == UNALLOCATED) | (kinds == UNALLOCATED_ALLOC)
        if self.backing is not None and fall.any():
            for r, s, n in zip(rel[fall].tolist(), starts[fall].tolist(), lens[fall].tolist()):
                self._read_backing(mv[r:r + n], s)
        comp = kinds == COMPRESSED
        if comp.any():
            self._read_compressed(mv, rel[comp], starts[comp], lens[comp], hosts[comp],
                                  csizes[comp])

    def _read_in_unit(self, mv: memoryview, offset: int) -> None:
        """``_read_zeroed`` for a range inside one unit, with scalars instead of arrays."""
        u = offset >> self.unit_bits
        t, i = divmod(u, self.units_per_table)
        tab = self._table(t)
        self.check_placed(t, tab, i, i + 1)
        k = int(tab.kinds[i])
        if k == DATA:
            h = int(tab.hosts[i]) + offset - (u << self.unit_bits)
            self.data_storage.pread_into(mv, h)     # past EOF: mv is already zero
        elif k == UNALLOCATED or k == UNALLOCATED_ALLOC:
            if self.backing is not None:
                self._read_backing(mv, offset)
        elif k == COMPRESSED:
            co = int(tab.hosts[i])
            last_off, last_data = self._last_cluster
            if co == last_off:
                w = offset & (self.cluster_size - 1)
                mv[:] = last_data[w:w + len(mv)]
            else:
                self._read_compressed(mv, np.zeros(1, np.int64), np.array([offset]),
                                      np.array([len(mv)]), tab.hosts[i:i + 1],
                                      tab.csizes[i:i + 1])

    def _read_compressed(self, mv, rel, starts, lens, coffs, csizes) -> None:
        cs = self.cluster_size
        last_off, last_data = self._last_cluster
        jobs = []        # (mv_offset, offset_in_cluster, length, coff, csize)
        for r, s, n, co, sz in zip(rel.tolist(), starts.tolist(), lens.tolist(),
                                   coffs.tolist(), csizes.tolist()):
            if co == last_off:
                w = s % cs
                mv[r:r + n] = last_data[w:w + n]
                continue
            jobs.append((r, s % cs, n, co, sz))
        if not jobs:
            return
        coffs_, csizes_, dsts, partial = [], [], [], []
        for r, within, n, co, sz in jobs:
            # past the end of the file the stream reads as zeros: it then fails to
            # decompress (QEMU's EIO), unless only its padding was cut off
            coffs_.append(co)
            csizes_.append(sz)
            if n == cs:                   # a whole cluster: decompress in place
                dsts.append(mv[r:r + cs])
            else:
                buf = bytearray(cs)
                dsts.append(memoryview(buf))
                partial.append((r, within, n, co, buf))
        # every thread reads and decompresses its share of the clusters
        read_and_decompress(self.codec, self.storage, coffs_, csizes_, dsts, cs)
        for r, within, n, co, buf in partial:
            mv[r:r + n] = buf[within:within + n]
            self._last_cluster = (co, bytes(buf))   # a partial read often continues here

    def check(self, repair: Optional[str] = None):
        """``qemu-img check`` of this image (repairs need the image opened "r+")."""
        if repair is not None:
            raise ValueError("repairing needs the image opened with mode 'r+'")
        return checking.check_image(self)

    def has_allocations(self) -> bool:
        """Whether any L1 entry points at an L2 table (a fresh image has none)."""
        return bool(np.count_nonzero(self._l1))

    # ------------------------------------------------------------ info
    def format_info(self) -> Dict[str, object]:
        """qcow2's fields of ``qemu-img info --output=json`` (QEMU 7.2 ImageInfo)."""
        h = self.header
        info: Dict[str, object] = {"cluster-size": self.cluster_size}
        if h.backing_file is not None:
            info["backing-filename"] = h.backing_file
            info["full-backing-filename"] = backing_display_name(self.filename, h.backing_file)
            if h.backing_format is not None:
                info["backing-filename-format"] = h.backing_format
        if self.snapshots:
            info["snapshots"] = [s.info() for s in self.snapshots]
        info["format-specific"] = {"type": "qcow2", "data": self._format_specific()}
        return info

    def _format_specific(self) -> Dict[str, object]:
        h = self.header
        if h.version == 2:
            return {"compat": "0.10", "compression-type": h.compression_name,
                    "refcount-bits": h.refcount_bits}
        d: Dict[str, object] = {
            "compat": "1.1",
            "compression-type": h.compression_name,
            "lazy-refcounts": bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS),
            "refcount-bits": h.refcount_bits,
            "corrupt": bool(h.incompatible_features & INCOMPAT_CORRUPT),
            "extended-l2": h.extended_l2,
        }
        if self.bitmaps:
            d["bitmaps"] = [b.info() for b in self.bitmaps]
        if h.has_data_file:
            if h.data_file is not None:
                d["data-file"] = h.data_file
            d["data-file-raw"] = h.data_file_raw
        return d

    # ------------------------------------------------------------ block status
    def _host_file(self) -> str:
        return self.data_file_path or self.filename

    def _host_holes(self, host_offset: int, length: int):
        if not self.metadata_preallocated:
            return None
        return self.data_storage.allocation(host_offset, length)

    # ------------------------------------------------------------ facts
    @property
    def dirty(self) -> bool:
        return bool(self.header.incompatible_features & 1)

    @property
    def corrupt(self) -> bool:
        return bool(self.header.incompatible_features & 2)

    _metadata_prealloc: Optional[bool] = None

    @property
    def metadata_preallocated(self) -> bool:
        """Whether QEMU 7.2 would take this image for a metadata-preallocated one.

        QEMU's block status decides it once per open: it counts the host
        clusters (below the end of the file) whose refcount is not zero and
        compares that with the space the file really occupies; at least
        ``max(real * 10/9, real + 2)`` referenced clusters, ``real`` being the
        allocated bytes in whole clusters, means metadata preallocation.  Then
        each data range is also checked against the host file's holes, which
        ``map`` reports as zeros.  Any refcount error means "no", as in QEMU.
        """
        if self._metadata_prealloc is None:
            cs = self.cluster_size
            real = self.storage.allocated_size() // cs
            threshold = max(real * 10 // 9, real + 2)
            end_cluster = -(-self.storage.size() // cs)
            try:
                self._metadata_prealloc = \
                    self._count_referenced(end_cluster, threshold) >= threshold
            except (CorruptImageError, FormatError, ValueError):
                self._metadata_prealloc = False
        return self._metadata_prealloc

    def _count_referenced(self, end_cluster: int, enough: int) -> int:
        """Number of host clusters below ``end_cluster`` with a refcount above 0
        (counting stops once it reaches ``enough``)."""
        h = self.header
        cs = self.cluster_size
        order = h.refcount_order
        per_block = (cs * 8) >> order
        nblocks = min(-(-end_cluster // per_block), h.refcount_table_clusters * cs // 8)
        if nblocks <= 0:
            return 0
        table = np.frombuffer(self.storage.pread(h.refcount_table_offset, nblocks * 8),
                              dtype=">u8").astype(np.uint64) & np.uint64(~511 & (2**64 - 1))
        count = 0
        for bi in np.flatnonzero(table).tolist():
            off = int(table[bi])
            if off % cs:
                raise CorruptImageError(f"refcount block {bi} at {off:#x} is misaligned")
            if off >= self._file_size:
                continue        # reads as zeros, as the past-the-end bytes of the file
            raw = np.frombuffer(self.storage.pread(off, cs), dtype=np.uint8)
            if order >= 3:
                entries = raw.view(f">u{1 << (order - 3)}")
            else:
                width = 1 << order          # sub-byte entries, first entry in the low bits
                shifts = np.arange(0, 8, width, dtype=np.uint8)
                entries = ((raw[:, None] >> shifts) & ((1 << width) - 1)).reshape(-1)
            entries = entries[:max(0, end_cluster - bi * per_block)]
            count += int(np.count_nonzero(entries))
            if count >= enough:
                break
        return count
