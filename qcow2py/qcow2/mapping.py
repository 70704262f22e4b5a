"""Mapping a qcow2 layer: the decoded L2 tables (an LRU cache by bytes) and guest
ranges turned into runs of units with one kind and contiguous host offsets.

Mapping works on *units*: a unit is a guest cluster, or a subcluster with
extended L2 entries.  Each L2 table is decoded once (in C, or numpy) into a
kind and a host offset per unit and cached; a guest range then becomes runs
of units with the same kind and contiguous host offsets, computed with numpy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Dict, Iterator, Optional, Tuple

from ..lazyimport import numpy as np

from .. import native
from ..errors import CorruptImageError
from ..format.l2 import compressed_fields
from ..image import Image, Run
from ..native import COMPRESSED, DATA, UNALLOCATED_ALLOC, ZERO, ZERO_ALLOC



class _UnitTable:
    """One decoded L2 table: per-unit kind, host offset, compressed size, and with an
    external data file the sorted indices of the units whose host offset is not
    their guest offset (``misplaced``; None when there are none)."""

    __slots__ = ("kinds", "hosts", "csizes", "nbytes", "misplaced")

    def __init__(self, kinds: np.ndarray, hosts: np.ndarray, csizes: Optional[np.ndarray],
                 misplaced: Optional[np.ndarray] = None):
        self.kinds, self.hosts, self.csizes = kinds, hosts, csizes
        self.misplaced = misplaced
        self.nbytes = kinds.nbytes + hosts.nbytes + (csizes.nbytes if csizes is not None else 0)


class Qcow2Mapping(Image):
    """The L2 cache and the run arrays of one qcow2 layer (the reader's base)."""

    def _init_l2_cache(self, limit: int) -> None:
        self._cache: "OrderedDict[int, _UnitTable]" = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = limit
        self._cache_lock = threading.Lock()
        #: per L1 index, how often its decoded table was dropped (see _table)
        self._forgotten: Dict[int, int] = {}

    _empty: Optional[_UnitTable] = None

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
            misplaced = self._misplaced_units(l1_index, kinds, hosts) \
                if self.header.has_data_file else None
            t = _UnitTable(kinds, hosts, csizes, misplaced)
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

    def forget_tables(self) -> None:
        """Drop every decoded table (the L1 table was replaced: a snapshot selected,
        metadata reloaded)."""
        with self._cache_lock:
            for l1_index in self._cache:
                self._forgotten[l1_index] = self._forgotten.get(l1_index, 0) + 1
            self._cache.clear()
            self._cache_bytes = 0

    def _empty_table(self) -> _UnitTable:
        if self._empty is None:
            n = self.units_per_table
            kinds = np.zeros(n, dtype=np.uint8)      # all UNALLOCATED
            self._empty = _UnitTable(kinds, np.zeros(n, dtype=np.int64), None)
            self._empty.nbytes = 0
        return self._empty

    def _misplaced_units(self, l1_index: int, kinds: np.ndarray,
                         hosts: np.ndarray) -> Optional[np.ndarray]:
        """Units with a host offset other than their guest offset, in an image with an
        external data file (where the two must be equal).  They are not refused
        here but when a request touches them, as QEMU does: the other clusters of
        the table stay readable."""
        placed = (kinds == DATA) | (kinds == ZERO_ALLOC) | (kinds == UNALLOCATED_ALLOC)
        guest = (np.arange(kinds.size, dtype=np.int64) +
                 l1_index * self.units_per_table) << self.unit_bits
        bad = np.flatnonzero(placed & (hosts != guest))
        return bad if bad.size else None

    def check_placed(self, l1_index: int, tab: _UnitTable, a: int, b: int) -> None:
        """Refuse a request touching units ``[a, b)`` of a table if one of them is
        misplaced in the external data file (see :meth:`data_file_mismatch`)."""
        bad = tab.misplaced
        if bad is None:
            return
        j = int(np.searchsorted(bad, a))
        if j < bad.size and bad[j] < b:
            i = int(bad[j])
            cl_shift = self.cluster_bits - self.unit_bits
            host = (int(tab.hosts[i]) >> self.cluster_bits) << self.cluster_bits
            guest = ((l1_index * self.units_per_table + i) >> cl_shift) << self.cluster_bits
            self.data_file_mismatch(guest, host, i >> cl_shift)

    def data_file_mismatch(self, guest: int, host: int, l2_index: int) -> None:
        """An L2 entry maps a guest cluster elsewhere in the external data file: an
        I/O error for the request (QEMU's EIO).  The writer overrides this to also
        mark the image corrupt, as QEMU does on an image opened read-write."""
        raise CorruptImageError(self.data_file_mismatch_text(guest, host, l2_index))

    @staticmethod
    def data_file_mismatch_text(guest: int, host: int, l2_index: int) -> str:
        return (f"external data file host cluster offset {host:#x} does not match guest "
                f"cluster offset {guest:#x} (L2 index {l2_index:#x})")

    def _compressed_sizes(self, raw: bytes, kinds: np.ndarray, hosts: np.ndarray) -> np.ndarray:
        if self.header.has_data_file:
            raise CorruptImageError("compressed cluster in an image with an external data file")
        entries = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        if self.extended_l2:
            entries = np.repeat(entries[0::2], 32)
        nsect = compressed_fields(entries, self.cluster_bits)[1].astype(np.int64) + 1
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
            self.check_placed(t, tab, a, b)
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
