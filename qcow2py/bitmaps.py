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
from typing import TYPE_CHECKING, List, Optional, Tuple

from .lazyimport import numpy as np
from bitarray import bitarray

from . import native
from .errors import (BitmapError, CorruptImageError, FormatError, Qcow2Error,
                     UnsupportedFeatureError)
from .format.bitmap import (bitmap_info, FLAG_AUTO, FLAG_IN_USE, MAX_BITMAPS, MAX_DIRECTORY_SIZE,
                            MAX_GRANULARITY_BITS, MAX_NAME, BitmapEntry, encode_bitmap_directory,
                            entry_size, set_directory_flags)
from .format.header import AUTOCLEAR_BITMAPS, BitmapsExtension

if TYPE_CHECKING:  # pragma: no cover
    from .qcow2 import Qcow2Image

TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_ALL_ONES = 1
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
    trusted, and only :meth:`~qcow2py.writer.WritableQcow2Image.remove_bitmap`
    works on it).  ``entry`` is the directory entry on disk (None for a bitmap
    added since the image was opened).
    """

    def __init__(self, image: "Qcow2Image", name: str, granularity_bits: int, enabled: bool,
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
    def from_entry(cls, image: "Qcow2Image", entry: BitmapEntry) -> "Bitmap":
        return cls(image, entry.name, entry.granularity_bits, entry.auto, entry,
                   inconsistent=entry.in_use)

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
                    self._bits = self._image._load_bitmap_bits(self)
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
    def _check_modifiable(self) -> None:
        self._image._check_bitmap_writable(self)
        self._check_usable()

    def clear(self) -> None:
        """Clear every bit."""
        self._check_modifiable()
        bits = self.bits
        with self._bits_lock:
            bits.setall(0)

    def enable(self) -> None:
        """Track writes from now on (stored as QEMU's "auto" flag)."""
        self._check_modifiable()
        self._enabled = True
        self._image._bitmaps_changed_state()

    def disable(self) -> None:
        """Stop tracking writes; the bits stay as they are."""
        self._check_modifiable()
        self._enabled = False
        self._image._bitmaps_changed_state()

    def merge_from(self, other: "Bitmap") -> None:
        """Set every bit that covers a byte dirty in ``other`` (a bitmap of this
        image or of another one of the same size, any granularity)."""
        self._check_modifiable()
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

    def _mark(self, offset: int, length: int) -> None:
        """Mark guest bytes dirty (the writer calls this for every change)."""
        g = self.granularity
        bits = self.bits
        with self._bits_lock:
            bits[offset // g:-(-(offset + length) // g)] = 1


# ---------------------------------------------------------------- the writer's side
def attach(img) -> None:
    """Take charge of the bitmaps of an image opened "r+" (see the module docstring)."""
    h = img.header
    if h.bitmaps is not None and not (h.autoclear_features & AUTOCLEAR_BITMAPS):
        # a program without bitmap support wrote the image: the extension is stale,
        # and QEMU drops it (its clusters leak until check -r)
        h.bitmaps = None
        img._write_header()
    img._bitmaps_attached = True
    cs = img.cluster_size
    file_size = img.storage.size()
    for e in img.bitmap_directory:
        err = entry_problem(e, img.size, cs, file_size)
        if err is not None:
            raise err
    consistent = [b for b in img.bitmaps if not b.inconsistent]
    if not consistent:
        return
    ext = h.bitmaps
    raw = img.storage.pread(ext.directory_offset, ext.directory_size)
    flags = [e.flags | FLAG_IN_USE for e in img.bitmap_directory]
    # the autoclear-bit protocol: a crash in the middle leaves a stale extension
    h.autoclear_features &= ~AUTOCLEAR_BITMAPS
    img._write_header()
    img.storage.pwrite(set_directory_flags(raw, flags), ext.directory_offset)
    img.storage.fsync()
    h.autoclear_features |= AUTOCLEAR_BITMAPS
    img._write_header()
    for e, f in zip(img.bitmap_directory, flags):
        e.flags = f
    for b in consistent:
        b._in_use = True
    img._bitmaps_dirty = True


def check_new(img, name: str, granularity: Optional[int]) -> int:
    """QEMU's checks for a new persistent bitmap, in its order; returns granularity bits."""
    if not name:
        raise BitmapError("Bitmap name cannot be empty")
    if granularity is None:
        granularity = default_granularity(img.cluster_size)
    if granularity < 512 or granularity & (granularity - 1):
        raise BitmapError("Granularity must be power of 2 and at least 512")
    if any(b.name == name for b in img.bitmaps):
        raise BitmapError(f"Bitmap already exists: {name}")
    prefix = f"Can't make bitmap '{name}' persistent in '{img.filename}': "
    if img.header.version < 3:
        raise BitmapError(prefix + "Cannot store dirty bitmaps in qcow2 v2 files")
    gbits = granularity.bit_length() - 1
    if gbits > MAX_GRANULARITY_BITS:
        raise BitmapError(prefix + f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} "
                                   f"bytes)")
    _, nbytes, tsize = geometry(img.size, gbits, img.cluster_size)
    if tsize > MAX_TABLE_SIZE or tsize * img.cluster_size > MAX_PHYS_SIZE:
        raise BitmapError(prefix + "Too much space will be occupied by the bitmap. Use larger "
                                   "granularity")
    raw_name = name.encode()
    if len(raw_name) > MAX_NAME:
        raise BitmapError(prefix + f"Name length exceeds maximum ({MAX_NAME} characters)")
    if len(img.bitmaps) >= MAX_BITMAPS:
        raise BitmapError(prefix + "Maximum number of persistent bitmaps is already reached")
    size = sum(entry_size(_entry_of(b)) for b in img.bitmaps)
    if size + entry_size(BitmapEntry(0, 0, 0, 1, gbits, name, b"", raw_name)) > \
            MAX_DIRECTORY_SIZE:
        raise BitmapError(prefix + "Not enough space in the bitmap directory")
    return gbits


def _entry_of(b: Bitmap) -> BitmapEntry:
    if b.entry is not None:
        return b.entry
    return BitmapEntry(0, 0, 0, TYPE_DIRTY_TRACKING, b.granularity_bits, b.name)


def store(img) -> None:
    """Write the bitmaps to new clusters and switch the header to them (crash-safe)."""
    h = img.header
    cs = img.cluster_size
    st = img.storage
    file_size = st.size()
    entries: List[BitmapEntry] = []
    # QEMU's order: the bitmaps already stored keep their places; new ones follow,
    # the latest added first (QEMU keeps its in-memory bitmaps newest first)
    order = [b for b in img.bitmaps if b.entry is not None] + \
        [b for b in reversed(img.bitmaps) if b.entry is None]
    for b in order:
        if b.inconsistent:
            entries.append(b.entry)           # kept as found, clusters and all
            continue
        bits = b._bits
        if bits is None:            # never loaded: store what the image holds
            bits = load_bits(st, b.entry, img.size, cs, file_size)
        nbits, nbytes, tsize = geometry(img.size, b.granularity_bits, cs)
        if len(bits) != nbits:
            raise ValueError(f"bitmap '{b.name}' has {len(bits)} bits, {nbits} expected")
        data = np.zeros(tsize * cs, dtype=np.uint8)
        data[:nbytes] = np.frombuffer(bits.tobytes(), dtype=np.uint8)[:nbytes]
        clusters = data.reshape(tsize, cs)
        used = np.flatnonzero(clusters.any(axis=1))
        table = np.zeros(tsize, dtype=np.uint64)
        if used.size:
            host = img._allocate(int(used.size))
            st.pwrite(clusters[used].tobytes(), host)
            table[used] = (host + np.arange(used.size, dtype=np.int64) * cs).astype(np.uint64)
        traw = table.astype(">u8").tobytes()
        toff = img._allocate(-(-len(traw) // cs))
        st.pwrite(traw, toff)
        raw_name = b.entry.raw_name if b.entry is not None and b.entry.name == b.name else b""
        entries.append(BitmapEntry(toff, tsize, FLAG_AUTO if b.enabled else 0,
                                   TYPE_DIRTY_TRACKING, b.granularity_bits, b.name, b"",
                                   raw_name))
    # everything the old directory holds that is not kept goes once the switch is durable
    kept = {id(e) for e in entries}
    old: List[np.ndarray] = []
    ext = h.bitmaps
    if ext is not None and img.bitmap_directory:
        old.append(np.arange(ext.directory_offset // cs,
                             -(-(ext.directory_offset + ext.directory_size) // cs),
                             dtype=np.int64))
        for e in img.bitmap_directory:
            if id(e) in kept:
                continue
            old.append(np.arange(e.table_offset // cs,
                                 -(-(e.table_offset + e.table_size * 8) // cs), dtype=np.int64))
            t = read_table(st, e, cs, file_size) & np.uint64(TABLE_OFFSET_MASK)
            old.append((t[t != 0] // np.uint64(cs)).astype(np.int64))
    directory = encode_bitmap_directory(entries)
    doff = img._allocate(-(-len(directory) // cs)) if entries else 0
    if entries:
        st.pwrite(directory, doff)
    img._flush_metadata()           # data, tables, directory and their refcounts: durable
    if entries:
        h.bitmaps = BitmapsExtension(len(entries), len(directory), doff)
        h.autoclear_features |= AUTOCLEAR_BITMAPS
    else:
        h.bitmaps = None
        h.autoclear_features &= ~AUTOCLEAR_BITMAPS
    img._write_header()             # the switch (synced)
    img._metadata_map = None
    if old:
        img.refcounts.free_later(np.concatenate(old))
    img._flush_metadata()
    img.bitmap_directory = entries
    for b, e in zip(order, entries):
        b.entry = e
        b._in_use = e.in_use
    img.bitmaps[:] = order
    img._bitmaps_dirty = False
