"""The writer's side of persistent bitmaps (see :mod:`.bitmaps` for the lifecycle):
taking charge of them on an "r+" open (in_use set through the journal's autoclear
protocol), QEMU's checks for a new bitmap, and storing them on close (new
clusters, the metadata commit, one header switch, then the old clusters freed).
"""

from __future__ import annotations

from typing import List, Optional

from ..lazyimport import numpy as np

from ..errors import BitmapError
from ..format.bitmap import (FLAG_AUTO, FLAG_IN_USE, MAX_BITMAPS, MAX_DIRECTORY_SIZE,
                             MAX_GRANULARITY_BITS, MAX_NAME, TABLE_OFFSET_MASK, BitmapEntry,
                             encode_bitmap_directory, entry_size, set_directory_flags)
from ..format.header import AUTOCLEAR_BITMAPS, BitmapsExtension
from .overlap import Kind
from .bitmaps import (MAX_PHYS_SIZE, MAX_TABLE_SIZE, TYPE_DIRTY_TRACKING, Bitmap,
                      default_granularity, entry_problem, geometry, load_bits, read_table)


def attach(img) -> None:
    """Take charge of the bitmaps of an image opened "r+" (see the module docstring)."""
    h = img.header
    if h.bitmaps is not None and not (h.autoclear_features & AUTOCLEAR_BITMAPS):
        # a program without bitmap support wrote the image: the extension is stale,
        # and QEMU drops it (its clusters leak until check -r)
        h.bitmaps = None
        img.journal.write_header()
    img.bitmaps_attached = True
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
    img.journal.bitmaps_in_use(
        lambda: img.journal.write_metadata(Kind.BITMAP_DIRECTORY, ext.directory_offset,
                                           set_directory_flags(raw, flags)))
    for e, f in zip(img.bitmap_directory, flags):
        e.flags = f
    for b in consistent:
        b.set_in_use(True)
    img.bitmaps_dirty = True


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
        bits = b.loaded_bits()
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
            host = img.allocate(int(used.size))
            img.journal.write_metadata(Kind.OTHER, host, clusters[used].tobytes())
            table[used] = (host + np.arange(used.size, dtype=np.int64) * cs).astype(np.uint64)
        traw = table.astype(">u8").tobytes()
        toff = img.allocate(-(-len(traw) // cs))
        img.journal.write_metadata(Kind.OTHER, toff, traw)
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
    doff = img.allocate(-(-len(directory) // cs)) if entries else 0
    if entries:
        img.journal.write_metadata(Kind.BITMAP_DIRECTORY, doff, directory)
    img.flush_metadata()           # data, tables, directory and their refcounts: durable
    if entries:
        h.bitmaps = BitmapsExtension(len(entries), len(directory), doff)
        h.autoclear_features |= AUTOCLEAR_BITMAPS
    else:
        h.bitmaps = None
        h.autoclear_features &= ~AUTOCLEAR_BITMAPS
    img.journal.write_header()             # the switch (synced)
    img.metadata_moved()
    if old:
        img.refcounts.free_later(np.concatenate(old))
    img.flush_metadata()
    img.bitmap_directory = entries
    for b, e in zip(order, entries):
        b.entry = e
        b.set_in_use(e.in_use)
    img.bitmaps[:] = order
    img.bitmaps_dirty = False
