"""Persistent dirty bitmaps: ``img.bitmaps``, loading, in-use marking and storing.

A :class:`Bitmap` is one named bitmap of a qcow2 image.  Bit ``n`` covers guest
bytes ``[n*g, (n+1)*g)`` (``g``, the granularity, a power of two from 512 B to
2 GiB) and is set when those bytes were written (or zeroed, or discarded)
since the bitmap was last cleared.  The bits live in a
``bitarray(endian="little")``: LSB first within each byte, exactly as qcow2
stores them, so loading and storing are byte copies, and the C scans of
:mod:`qcow2py.native` work on the bitarray's buffer directly.  Bits are read
from the image the first time they are needed.

Lifecycle (QEMU's, so that both programs can share an image):

* opened read-only, nothing is written; a bitmap whose *in_use* flag is set
  was not saved properly (a crash, or a program still has it open): it is
  *inconsistent* and refuses every use but removal;
* opened "r+", every consistent bitmap gets *in_use* set in the image at once,
  the directory rewritten in place with the autoclear-bit protocol: clear
  autoclear bit 0 (sync), rewrite the directory (sync), set the bit (sync).  A
  crash in between leaves the extension stale (QEMU and qcow2py then ignore
  the bitmaps: their clusters leak), never a consistent-looking stale bitmap;
* writes, zero writes and discards mark every enabled bitmap;
* on close the bitmaps are stored: data clusters and tables to *new*
  clusters (all-zero clusters stay table entries of 0; all-ones entries are
  read but never written), then a new directory, then the writer's metadata
  flush, then one synced header switch (autoclear bit set) to the new
  directory, and only then are the old directory, tables and data freed
  (``RefcountManager.free_later`` + flush).  A crash before the switch leaves
  the old directory with in_use set (and leaked clusters).  Inconsistent
  bitmaps keep their old entry and clusters as they are.
"""

from __future__ import annotations

import threading
from typing import List, Optional, Tuple

from ..lazyimport import numpy as np
from bitarray import bitarray

from .. import native
from ..errors import (BitmapError, CorruptImageError, FormatError, Qcow2Error,
                     UnsupportedFeatureError)
from ..format.bitmap import (FLAG_AUTO, FLAG_IN_USE, TABLE_ALL_ONES, TABLE_OFFSET_MASK,
                             TABLE_RESERVED_MASK, BitmapEntry, bitmap_info)
# the qcow2 driver (read.py, which imports this module) is typed by its base class
from ..image import Image as Qcow2Image

MAX_TABLE_SIZE = 0x8000000            # entries (QEMU's BME_MAX_TABLE_SIZE)
MAX_PHYS_SIZE = 0x20000000            # bytes of bitmap data (BME_MAX_PHYS_SIZE)
TYPE_DIRTY_TRACKING = 1

INCONSISTENT_HINT = "Try block-dirty-bitmap-remove to delete this bitmap from disk"


def geometry(size: int, granularity_bits: int, cluster_size: int) -> Tuple[int, int, int]:
    """``(bits, bytes, table entries)`` of a bitmap over ``size`` guest bytes."""
    nbits = -(-size // (1 << granularity_bits))
    nbytes = -(-nbits // 8)
    return nbits, nbytes, -(-nbytes // cluster_size)


def default_granularity(cluster_size: Optional[int]) -> int:
    """QEMU's default: the cluster size, clamped to [4 KiB, 64 KiB]."""
    if not cluster_size:
        return 65536
    return min(max(cluster_size, 4096), 65536)


def entry_problem(entry: BitmapEntry, size: int, cluster_size: int,
                  file_size: int) -> Optional[Qcow2Error]:
    """What QEMU refuses in a directory entry, as an exception (None: usable)."""
    name = entry.name
    if entry.flags & ~(FLAG_IN_USE | FLAG_AUTO):
        return UnsupportedFeatureError(f"bitmap '{name}' has unknown flags {entry.flags:#x}")
    if entry.type != TYPE_DIRTY_TRACKING:
        return UnsupportedFeatureError(f"bitmap '{name}' has unsupported type {entry.type}")
    if entry.extra_data:
        return UnsupportedFeatureError(f"bitmap '{name}': Bitmap extra data is not supported")
    if entry.table_offset == 0 or entry.table_offset % cluster_size:
        return FormatError(f"bitmap '{name}': table offset {entry.table_offset:#x} is not a "
                           f"cluster-aligned offset above 0")
    if entry.table_size == 0 or entry.table_size > MAX_TABLE_SIZE:
        return FormatError(f"bitmap '{name}': table size {entry.table_size} is out of range")
    if entry.table_offset + entry.table_size * 8 > file_size:
        return FormatError(f"bitmap '{name}': table at {entry.table_offset:#x} "
                           f"(+{entry.table_size * 8}) extends past the end of the file")
    if not entry.in_use:
        _, _, need = geometry(size, entry.granularity_bits, cluster_size)
        if entry.table_size != need:
            return FormatError(f"bitmap '{name}': table has {entry.table_size} entries, "
                               f"{need} needed for {size} bytes at granularity "
                               f"{entry.granularity}")
    return None


def read_table(storage, entry: BitmapEntry, cluster_size: int,
               file_size: int) -> np.ndarray:
    """The bitmap table as uint64 entries, checked (reserved bits, alignment, EOF)."""
    raw = storage.pread(entry.table_offset, entry.table_size * 8)
    if len(raw) < entry.table_size * 8:
        raise CorruptImageError(f"bitmap '{entry.name}': table extends past the end of the file")
    t = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
    bad = np.flatnonzero(t & np.uint64(TABLE_RESERVED_MASK))
    if bad.size:
        i = int(bad[0])
        raise CorruptImageError(f"bitmap '{entry.name}': table entry {i} ({int(t[i]):#x}) has "
                                f"reserved bits set")
    offs = t & np.uint64(TABLE_OFFSET_MASK)
    bad = np.flatnonzero(offs & np.uint64(cluster_size - 1))
    if bad.size:
        i = int(bad[0])
        raise CorruptImageError(f"bitmap '{entry.name}': table entry {i}: data offset "
                                f"{int(offs[i]):#x} is not cluster aligned")
    bad = np.flatnonzero((offs != 0) & (offs + np.uint64(cluster_size) > np.uint64(file_size)))
    if bad.size:
        i = int(bad[0])
        raise CorruptImageError(f"bitmap '{entry.name}': table entry {i}: data cluster at "
                                f"{int(offs[i]):#x} lies past the end of the file")
    return t


def load_bits(storage, entry: BitmapEntry, size: int, cluster_size: int,
              file_size: int) -> bitarray:
    """Read a bitmap's bits from the image (a new little-endian bitarray)."""
    err = entry_problem(entry, size, cluster_size, file_size)
    if err is not None:
        raise err
    cs = cluster_size
    nbits, nbytes, need = geometry(size, entry.granularity_bits, cs)
    t = read_table(storage, entry, cs, file_size)[:need]
    offs = (t & np.uint64(TABLE_OFFSET_MASK)).astype(np.int64)
    buf = bytearray(need * cs)
    data = np.flatnonzero(offs)
    if data.size:
        storage.read_runs(memoryview(buf), data.astype(np.int64) * cs, offs[data],
                          np.full(data.size, cs, dtype=np.int64))
    ones = np.flatnonzero((offs == 0) & ((t & np.uint64(TABLE_ALL_ONES)) != 0))
    if ones.size:
        full = b"\xff" * cs
        for i in ones.tolist():
            buf[i * cs:(i + 1) * cs] = full
    bits = bitarray(endian="little")
    bits.frombytes(memoryview(buf)[:nbytes])
    del bits[nbits:]
    return bits


def little_endian_bits(bits) -> bitarray:
    """``bits`` (a bitarray of either bit order, or anything numpy takes as an
    array of booleans) as a little-endian bitarray, the layout the C scans read."""
    if isinstance(bits, bitarray):
        e = bits.endian() if callable(bits.endian) else bits.endian
        return bits if e == "little" else bitarray(bits, endian="little")
    arr = np.asarray(bits, dtype=bool).reshape(-1)
    out = bitarray(endian="little")
    out.frombytes(np.packbits(arr, bitorder="little").tobytes())
    del out[arr.size:]
    return out


class Bitmap:
    """One persistent dirty bitmap of an image (see the module docstring).

    ``name``, ``granularity`` (bytes a bit covers), ``enabled`` (tracks
    writes: QEMU's "auto" flag), ``in_use`` (the flag in the image now),
    ``inconsistent`` (in use when the image was opened: its bits cannot be
    trusted, and only :meth:`~qcow2py.qcow2.image.WritableQcow2Image.remove_bitmap`
    works on it).  ``entry`` is the directory entry on disk (None for a bitmap
    added since the image was opened).
    """

    def __init__(self, image: Qcow2Image, name: str, granularity_bits: int, enabled: bool,
                 entry: Optional[BitmapEntry] = None, inconsistent: bool = False,
                 bits: Optional[bitarray] = None) -> None:
        self._image = image
        self.name = name
        self.granularity_bits = granularity_bits
        self._enabled = bool(enabled)
        self.entry = entry
        self.inconsistent = inconsistent
        self._in_use = bool(entry is not None and entry.in_use)
        self._bits = bits
        self._load_lock = threading.Lock()
        #: held while the bits change or are scanned, so a scan sees one state of them
        #: (a writer's thread marks bits while another thread lists dirty extents)
        self._bits_lock = threading.RLock()
        self._removed = False

    @classmethod
    def from_entry(cls, image: Qcow2Image, entry: BitmapEntry) -> "Bitmap":
        return cls(image, entry.name, entry.granularity_bits, entry.auto, entry,
                   inconsistent=entry.in_use)

    @classmethod
    def empty(cls, image: Qcow2Image, name: str, granularity_bits: int,
              enabled: bool) -> "Bitmap":
        """A new bitmap with every bit clear (not stored yet)."""
        b = cls(image, name, granularity_bits, enabled)
        bits = bitarray(b.nbits, endian="little")
        bits.setall(0)
        b._bits = bits
        return b

    def mark_removed(self) -> None:
        """The image dropped this bitmap: every later use raises BitmapError."""
        self._removed = True

    @property
    def removed(self) -> bool:
        return self._removed

    # ------------------------------------------------------------ facts
    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def in_use(self) -> bool:
        return self._in_use

    @property
    def size(self) -> int:
        """Guest bytes the bitmap covers (the image's virtual size)."""
        return self._image.size

    @property
    def nbits(self) -> int:
        return -(-self.size // self.granularity)

    # the directory entry's fields, as the format module names them
    @property
    def table_offset(self) -> int:
        return self.entry.table_offset if self.entry is not None else 0

    @property
    def table_size(self) -> int:
        return self.entry.table_size if self.entry is not None else 0

    @property
    def flags(self) -> int:
        return (FLAG_IN_USE if self._in_use else 0) | (FLAG_AUTO if self._enabled else 0)

    @property
    def extra_data(self) -> bytes:
        return self.entry.extra_data if self.entry is not None else b""

    @property
    def auto(self) -> bool:
        return self._enabled

    def info(self) -> dict:
        """As ``qemu-img info`` lists it."""
        return bitmap_info(self.name, self.granularity, self._in_use, self._enabled)

    def __repr__(self) -> str:
        state = "inconsistent" if self.inconsistent else \
            ("enabled" if self._enabled else "disabled")
        return f"<Bitmap {self.name!r} granularity={self.granularity} {state}>"

    def loaded_bits(self) -> Optional[bitarray]:
        """The bits if they are in memory already (None: never loaded)."""
        return self._bits

    def set_in_use(self, in_use: bool) -> None:
        """Record the image's *in_use* flag for this bitmap (the writer sets it)."""
        self._in_use = in_use

    # ------------------------------------------------------------ bits
    def _check_usable(self) -> None:
        if self._removed:
            raise BitmapError(f"Dirty bitmap '{self.name}' not found")
        if self.inconsistent:
            raise BitmapError(f"Bitmap '{self.name}' is inconsistent and cannot be used",
                              INCONSISTENT_HINT)

    @property
    def bits(self) -> bitarray:
        """The bits (little-endian bitarray, one bit per granule, loaded on first use).

        On an image opened "r+" this is the live bitmap: changes to it are
        stored on close.  Read-only images give a frozenbitarray.
        """
        self._check_usable()
        if self._bits is None:
            with self._load_lock:
                if self._bits is None:
                    self._bits = self._image.load_bitmap_bits(self)
        return self._bits

    def _bit_range(self, start: int, length: Optional[int]) -> Tuple[int, int]:
        if start < 0 or (length is not None and length < 0):
            raise ValueError("start and length must be non-negative")
        end = self.size if length is None else min(self.size, start + length)
        return start, max(start, end)

    def dirty_extent_arrays(self, start: int = 0,
                            length: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`dirty_extents` as two int64 arrays ``(offsets, lengths)``."""
        bits = self.bits
        a, b = self._bit_range(start, length)
        g = self.granularity
        if a >= b:
            z = np.zeros(0, dtype=np.int64)
            return z, z.copy()
        with self._bits_lock:
            s, n = native.bitmap_runs(bits, a // g, -(-b // g))
        lo = np.maximum(s * g, a)
        hi = np.minimum((s + n) * g, b)
        return lo, hi - lo

    def dirty_extents(self, start: int = 0,
                      length: Optional[int] = None) -> List[Tuple[int, int]]:
        """Dirty guest ranges ``[(offset, length)]`` in ``[start, start+length)``,
        merged, clipped to the range and to the image size."""
        lo, n = self.dirty_extent_arrays(start, length)
        return list(zip(lo.tolist(), n.tolist()))

    def count_dirty(self, start: int = 0, length: Optional[int] = None) -> int:
        """Dirty guest bytes in the range (the sum of :meth:`dirty_extents`' lengths)."""
        bits = self.bits
        a, b = self._bit_range(start, length)
        if a >= b:
            return 0
        g = self.granularity
        b0, b1 = a // g, -(-b // g)
        with self._bits_lock:
            total = native.bitmap_count(bits, b0, b1) * g
            if bits[b0]:
                total -= a - b0 * g
            if bits[b1 - 1]:
                total -= b1 * g - b
        return total

    def next_dirty(self, offset: int = 0) -> Optional[int]:
        """The first dirty guest offset at or after ``offset``, or None."""
        return self._next(offset, True)

    def next_clean(self, offset: int = 0) -> Optional[int]:
        """The first clean guest offset at or after ``offset``, or None."""
        return self._next(offset, False)

    def _next(self, offset: int, value: bool) -> Optional[int]:
        bits = self.bits
        if offset < 0:
            raise ValueError("offset must be non-negative")
        if offset >= self.size:
            return None
        g = self.granularity
        with self._bits_lock:
            i = native.bitmap_next(bits, offset // g, value)
        return None if i < 0 else max(offset, i * g)

    # ------------------------------------------------------------ changes (image opened "r+")
    def check_modifiable(self) -> None:
        self._image.check_bitmap_writable(self)
        self._check_usable()

    def clear(self) -> None:
        """Clear every bit."""
        self.check_modifiable()
        bits = self.bits
        with self._bits_lock:
            bits.setall(0)

    def enable(self) -> None:
        """Track writes from now on (stored as QEMU's "auto" flag)."""
        self.check_modifiable()
        self._enabled = True
        self._image.bitmaps_changed_state()

    def disable(self) -> None:
        """Stop tracking writes; the bits stay as they are."""
        self.check_modifiable()
        self._enabled = False
        self._image.bitmaps_changed_state()

    def merge_from(self, other: "Bitmap") -> None:
        """Set every bit that covers a byte dirty in ``other`` (a bitmap of this
        image or of another one of the same size, any granularity)."""
        self.check_modifiable()
        other._check_usable()
        if other.size != self.size:
            raise BitmapError(f"Bitmaps are of different sizes (destination size is "
                              f"{self.size}, source size is {other.size}) and can't be merged")
        bits = self.bits
        if other.granularity == self.granularity:
            with other._bits_lock:
                src = other.bits.copy()        # one state of the source, then no lock on it
            with self._bits_lock:
                native.bitmap_op(bits, src, "or", out=bits)
            return
        g = self.granularity
        lo, n = other.dirty_extent_arrays()
        with self._bits_lock:
            for a, b in zip((lo // g).tolist(), (-(-(lo + n) // g)).tolist()):
                bits[a:b] = 1

    def mark(self, offset: int, length: int) -> None:
        """Mark guest bytes dirty (the writer calls this for every change)."""
        g = self.granularity
        bits = self.bits
        with self._bits_lock:
            bits[offset // g:-(-(offset + length) // g)] = 1
