"""Reading qcow2 images: L1/L2 mapping, the L2 cache, compressed clusters.

Mapping works on *units*: a unit is a guest cluster, or a subcluster with
extended L2 entries.  Each L2 table is decoded once (in C, or numpy) into a
kind and a host offset per unit and cached; a guest range then becomes runs
of units with the same kind and contiguous host offsets, computed with numpy.
Data runs are read with one request each, in a single native call that
releases the GIL; compressed clusters are decompressed on a thread pool.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Tuple

from .lazyimport import numpy as np
from bitarray import frozenbitarray

from . import native
from .bitmaps import Bitmap, load_bits
from .decompress import pool as decompress_pool, read_and_decompress
from .errors import (BackingChainError, BitmapError, CorruptImageError, FormatError,
                     UnsupportedFeatureError)
from .format.bitmap import BitmapEntry, parse_bitmap_directory, MAX_DIRECTORY_SIZE
from .format.header import AUTOCLEAR_BITMAPS, Header, QEMU_HEADER_LENGTH
from .format.snapshot import Snapshot, parse_snapshot_table, snapshot_table_bytes_upper_bound
from .image import Image, Run, open_backing, open_file_storage, probe_format
from .native import COMPRESSED, DATA, UNALLOCATED, UNALLOCATED_ALLOC, ZERO, ZERO_ALLOC
from .storage import Storage

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
DEFAULT_L2_CACHE_BYTES = 32 << 20
_MAX_HEADER_READ = 1 << 21

_pool = decompress_pool     # the decompression threads (started on first use)


class _UnitTable:
    """One decoded L2 table: per-unit kind, host offset, compressed size."""

    __slots__ = ("kinds", "hosts", "csizes", "nbytes")

    def __init__(self, kinds: np.ndarray, hosts: np.ndarray, csizes: Optional[np.ndarray]):
        self.kinds, self.hosts, self.csizes = kinds, hosts, csizes
        self.nbytes = kinds.nbytes + hosts.nbytes + (csizes.nbytes if csizes is not None else 0)


class Qcow2Image(Image):
    """A qcow2 image opened for reading (with its backing chain)."""

    format = "qcow2"

    def __init__(self, storage: Storage, filename: str, ctx) -> None:
        super().__init__()
        self.storage = storage
        self.filename = filename
        self._file_size = storage.size()
        # cluster 0 holds the header: read its first 4 KiB, then the rest if larger
        first = storage.pread(0, min(4096, max(self._file_size, 0)))
        if len(first) < 72 or first[:4] != b"QFI\xfb":
            Header.parse(first[:QEMU_HEADER_LENGTH], self._file_size)   # raises a clear error
        bits = int.from_bytes(first[20:24], "big")
        cs = 1 << bits if 9 <= bits <= 21 else _MAX_HEADER_READ
        want = min(cs, _MAX_HEADER_READ, max(self._file_size, 0))
        if want > len(first):
            first = storage.pread(0, want)
        self.header = h = Header.parse(first[:cs], self._file_size)
        self.size = h.size
        self.cluster_size = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.unit_bits = h.subcluster_bits
        self.extended_l2 = h.extended_l2
        self.units_per_table = h.l2_entries * (32 if h.extended_l2 else 1)
        self.codec = h.compression_name
        self._cache: "OrderedDict[int, _UnitTable]" = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = ctx.l2_cache_bytes or DEFAULT_L2_CACHE_BYTES
        self._cache_lock = threading.Lock()
        #: per L1 index, how often its decoded table was dropped (see _table)
        self._forgotten: Dict[int, int] = {}
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
            if not getattr(ctx, "chain", True):
                self.detached = h.has_data_file or h.backing_file is not None
            elif h.has_data_file:
                self._open_data_file(ctx)
            if h.backing_file is not None and getattr(ctx, "chain", True):
                self.backing = open_backing(self, h.backing_file, h.backing_format, ctx)
        except BaseException:
            if self.data_storage is not storage:
                self.data_storage.close()
            raise

    # ------------------------------------------------------------ open helpers
    def select_snapshot(self, name: str) -> None:
        """Read the internal snapshot ``name`` (id or name) instead of the active state:
        its L1 table (read-only) and its virtual size.  Only on images opened "r"."""
        from .snapshots import check_l1_bounds, find
        if not self.read_only:
            raise ValueError("a snapshot is read through an image opened read-only ('r')")
        snap = find(self, name)
        check_l1_bounds(self, snap.l1_table_offset, snap.l1_size)
        self._l1 = self._read_l1(snap.l1_table_offset, snap.l1_size)
        with self._cache_lock:
            self._cache.clear()
            self._cache_bytes = 0
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
        bad = np.flatnonzero(offs + np.uint64(self.cluster_size) > np.uint64(self._file_size))
        bad = bad[offs[bad] != 0]
        if bad.size:
            i = int(bad[0])
            raise CorruptImageError(f"L1 entry {i}: L2 table at {int(offs[i]):#x} lies past "
                                    f"the end of the file ({self._file_size} bytes)")
        return offs.astype(np.int64)

    def _read_snapshots(self) -> List[Snapshot]:
        h = self.header
        if not h.nb_snapshots:
            return []
        length = min(snapshot_table_bytes_upper_bound(h.nb_snapshots),
                     self._file_size - h.snapshots_offset)
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
        if ext.directory_offset + ext.directory_size > self._file_size:
            raise FormatError(f"bitmap directory at {ext.directory_offset:#x} "
                              f"(+{ext.directory_size}) extends past the end of the file "
                              f"({self._file_size} bytes)")
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

    def _load_bitmap_bits(self, bm: Bitmap):
        self._check_open()
        return frozenbitarray(load_bits(self.storage, bm.entry, self.size, self.cluster_size,
                                        self.storage.size()))

    def _check_bitmap_writable(self, bm: Bitmap) -> None:
        self._read_only()

    def _bitmaps_changed_state(self) -> None:
        pass

    def _open_data_file(self, ctx) -> None:
        name = self.header.data_file
        if name is None:
            raise FormatError("image uses an external data file but does not name it")
        path = ctx.policy.resolve(name, self.storage.name, what="data file")
        try:
            self.data_storage = open_file_storage(path, False, getattr(ctx, "cache", "writeback"))
        except FileNotFoundError:
            raise BackingChainError(f"external data file {path!r} not found") from None
        if getattr(ctx, "wrap_chain", False) and ctx.storage_wrapper is not None:
            self.data_storage = ctx.storage_wrapper(self.data_storage)
        self.data_file_path = path

    def _close_layer(self) -> None:
        if self.data_storage is not self.storage:
            self.data_storage.close()
        self.storage.close()

    # ------------------------------------------------------------ L2 tables
    def _table(self, l1_index: int) -> _UnitTable:
        """The decoded L2 table for one L1 entry (cached, LRU by bytes)."""
        with self._cache_lock:
            t = self._cache.get(l1_index)
            if t is not None:
                self._cache.move_to_end(l1_index)
                return t
            generation = self._forgotten.get(l1_index, 0)
        l2_off = int(self._l1[l1_index]) if l1_index < self._l1.size else 0
        if l2_off == 0:
            t = self._empty_table()
        else:
            raw = self._l2_bytes(l1_index, l2_off)
            try:
                kinds, hosts = native.decode_l2(raw, self.cluster_bits, self.extended_l2,
                                                self.header.has_data_file)
            except CorruptImageError as e:
                raise CorruptImageError(f"L2 table at {l2_off:#x} (L1 index {l1_index}): {e}") \
                    from None
            csizes = self._compressed_sizes(raw, kinds, hosts) \
                if (kinds == COMPRESSED).any() else None
            t = _UnitTable(kinds, hosts, csizes)
        with self._cache_lock:
            if self._forgotten.get(l1_index, 0) != generation:
                # a writer changed the table while it was decoded here: the result
                # is good for this caller's clusters (it holds them) but may be stale
                # for others, so it must not be cached
                return t
            old = self._cache.pop(l1_index, None)
            if old is not None:
                self._cache_bytes -= old.nbytes
            self._cache[l1_index] = t
            self._cache_bytes += t.nbytes
            while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
        return t

    def _l2_bytes(self, l1_index: int, l2_off: int) -> bytes:
        """Raw bytes of an L2 table (the writer overrides this with its own cache)."""
        return self.storage.pread(l2_off, self.cluster_size)

    def _forget_table(self, l1_index: int) -> None:
        """Drop a decoded table from the cache after its L2 entries changed."""
        with self._cache_lock:
            self._forgotten[l1_index] = self._forgotten.get(l1_index, 0) + 1
            t = self._cache.pop(l1_index, None)
            if t is not None:
                self._cache_bytes -= t.nbytes

    _empty: Optional[_UnitTable] = None

    def _empty_table(self) -> _UnitTable:
        if self._empty is None:
            n = self.units_per_table
            kinds = np.zeros(n, dtype=np.uint8)      # all UNALLOCATED
            self._empty = _UnitTable(kinds, np.zeros(n, dtype=np.int64), None)
            self._empty.nbytes = 0
        return self._empty

    def _compressed_sizes(self, raw: bytes, kinds: np.ndarray, hosts: np.ndarray) -> np.ndarray:
        if self.header.has_data_file:
            raise CorruptImageError("compressed cluster in an image with an external data file")
        entries = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        if self.extended_l2:
            entries = np.repeat(entries[0::2], 32)
        shift = 62 - (self.cluster_bits - 8)
        mask = (1 << (self.cluster_bits - 8)) - 1
        nsect = ((entries >> np.uint64(shift)) & np.uint64(mask)).astype(np.int64) + 1
        csizes = nsect * 512 - (hosts & 511)
        return np.where(kinds == COMPRESSED, csizes, 0)

    # ------------------------------------------------------------ runs
    def unit_arrays(self, offset: int, length: int) -> Tuple[int, np.ndarray, np.ndarray,
                                                             Optional[np.ndarray]]:
        """Per-unit (kinds, hosts, csizes) covering ``[offset, offset+length)``.

        Returns ``(first_unit, kinds, hosts, csizes)``; ``csizes`` is None when
        no unit in the range is compressed.
        """
        ub = self.unit_bits
        u0 = offset >> ub
        u1 = ((offset + length - 1) >> ub) + 1
        per = self.units_per_table
        ks, hs, cs = [], [], []
        any_c = False
        for t in range(u0 // per, (u1 - 1) // per + 1):
            tab = self._table(t)
            a = max(u0, t * per) - t * per
            b = min(u1, (t + 1) * per) - t * per
            ks.append(tab.kinds[a:b])
            hs.append(tab.hosts[a:b])
            cs.append(tab.csizes[a:b] if tab.csizes is not None else None)
            any_c |= tab.csizes is not None
        kinds = ks[0] if len(ks) == 1 else np.concatenate(ks)
        hosts = hs[0] if len(hs) == 1 else np.concatenate(hs)
        csizes = None
        if any_c:
            csizes = np.concatenate([c if c is not None else np.zeros(k.size, np.int64)
                                     for c, k in zip(cs, ks)])
        return u0, kinds, hosts, csizes

    def run_arrays(self, offset: int, length: int):
        """Coalesced runs of one layer: arrays ``(starts, lengths, kinds, hosts, csizes)``.

        Units merge when their kind is equal and, for kinds with a host
        offset, the host offsets are contiguous.  A compressed run is one
        cluster (its ``hosts`` is the compressed stream's byte offset and its
        ``csizes`` the stream length).  Every run is at least one byte long.
        """
        u0, kinds, hosts, csizes = self.unit_arrays(offset, length)
        ub = self.unit_bits
        n = kinds.size
        brk = np.empty(n, dtype=bool)
        brk[0] = True
        if n > 1:
            contiguous = (kinds == DATA) | (kinds == ZERO_ALLOC) | (kinds == UNALLOCATED_ALLOC)
            brk[1:] = (kinds[1:] != kinds[:-1]) | \
                (contiguous[1:] & (hosts[1:] != hosts[:-1] + (1 << ub)))
            if csizes is not None:
                cl_shift = self.cluster_bits - ub
                units = np.arange(u0, u0 + n, dtype=np.int64) >> cl_shift
                brk[1:] |= (kinds[1:] == COMPRESSED) & (units[1:] != units[:-1])
        first = np.flatnonzero(brk)
        starts = (first.astype(np.int64) + u0) << ub
        ends = np.empty_like(starts)
        ends[:-1] = starts[1:]
        ends[-1] = (u0 + n) << ub
        starts[0] = offset
        ends[-1] = offset + length
        rkinds = kinds[first]
        rhosts = hosts[first].copy()
        # a run starting inside its first unit: advance host offsets that are positional
        skew = offset - ((u0) << ub)
        if skew and rkinds[0] in (DATA, ZERO_ALLOC, UNALLOCATED_ALLOC):
            rhosts[0] += skew
        rcs = csizes[first] if csizes is not None else None
        return starts, ends - starts, rkinds, rhosts, rcs

    def _next_allocated_table(self, t: int) -> Optional[int]:
        """First L1 index >= ``t`` with an L2 table, or None (scans in growing steps)."""
        l1 = self._l1
        step = 64
        while t < l1.size:
            nz = np.flatnonzero(l1[t:t + step])
            if nz.size:
                return t + int(nz[0])
            t += step
            step *= 2
        return None

    def layer_runs(self, offset: int, length: int) -> Iterator[Run]:
        end = min(offset + length, self.size)
        window = self.units_per_table << self.unit_bits
        pos = offset
        while pos < end:
            # a stretch of L1 entries without L2 tables is one unallocated run: a
            # hostile image with a huge, empty L1 must not cost one pass per entry
            nxt = self._next_allocated_table(pos // window)
            if nxt != pos // window:
                stop = end if nxt is None else min(end, nxt * window)
                yield Run(pos, stop - pos, False, False)
                pos = stop
                continue
            n = min(end - pos, window - pos % window)
            starts, lens, kinds, hosts, _ = self.run_arrays(pos, n)
            for s, ln, k, h in zip(starts.tolist(), lens.tolist(), kinds.tolist(),
                                   hosts.tolist()):
                if k == DATA:
                    yield Run(s, ln, True, False, h)
                elif k == COMPRESSED:
                    yield Run(s, ln, True, False, None, compressed=True)
                elif k == ZERO:
                    yield Run(s, ln, False, True)
                elif k == ZERO_ALLOC:
                    yield Run(s, ln, False, True, h)
                elif k == UNALLOCATED_ALLOC:
                    yield Run(s, ln, False, False, h)
                else:
                    yield Run(s, ln, False, False)
            pos += n

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
            h, n = hosts[data], lens[data]
            if self.data_storage is self.storage:
                past = np.flatnonzero(h >= self._file_size)
                if past.size:
                    i = int(past[0])
                    raise CorruptImageError(
                        f"guest offset {int(starts[data][i])}: data cluster at host "
                        f"{int(h[i]):#x} lies past the end of the file")
            self.data_storage.read_runs(mv, rel[data], h, n)
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
        k = int(tab.kinds[i])
        if k == DATA:
            h = int(tab.hosts[i]) + offset - (u << self.unit_bits)
            if self.data_storage is self.storage and h >= self._file_size:
                raise CorruptImageError(f"guest offset {offset}: data cluster at host "
                                        f"{h:#x} lies past the end of the file")
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
            if co + sz > self._file_size + 512:
                raise CorruptImageError(f"compressed cluster at {co:#x} (+{sz}) lies past "
                                        f"the end of the file")
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
        from .check import check_image
        return check_image(self)

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
