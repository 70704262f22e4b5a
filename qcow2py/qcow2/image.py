"""The writable qcow2 driver's façade: :class:`WritableQcow2Image` (opening "r+":
locks, the journal, repair of a dirty image, bitmaps; flush and close).

Locks (always taken in this order)
----------------------------------
1. ``_ranges``: a shared/exclusive lock on guest cluster ranges.  A write
   holds its clusters exclusively from planning to commit, so two writes to
   one cluster never interleave into a torn allocation; a read holds its
   clusters shared, so they cannot be freed and reused under it.
2. ``_lock``: one re-entrant lock serialising every metadata change (L1/L2,
   refcounts, flush).  A plain write takes it twice, briefly: to plan
   (classify clusters, allocate) and to commit its L2 entries; the data moves
   in between without it, so writes to different clusters run in parallel
   (the GIL is released in the system calls).  write_zeroes, discard and
   writes to extended-L2 images hold it throughout.
3. the reader's L2 cache lock (``_cache_lock``), innermost.

Persistent dirty bitmaps
------------------------
Opening "r+" marks every consistent bitmap *in_use* in the image (the
directory rewritten in place between a clear and a set of autoclear bit 0,
each synced); every write, write_zeroes and discard then marks the enabled
bitmaps in memory.  ``close`` stores them (see :mod:`qcow2py.bitmaps`): data,
tables and a new directory to new clusters, the metadata flush above, one
synced header switch, then the old clusters are freed like any other
decrement (step 5).  A crash before the switch leaves the bitmaps in_use:
inconsistent for QEMU and for qcow2py, as they should be.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import List, Optional, Set

from ..lazyimport import numpy as np
from bitarray import bitarray, frozenbitarray

from ..errors import BitmapError, CorruptImageError, ImageClosedError
from ..format.header import (AUTOCLEAR_KNOWN, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT,
                             INCOMPAT_DIRTY, Header)
from ..io.rangelock import RangeLock
from ..io.storage import Storage
from . import bitmap_store
from .bitmaps import Bitmap, load_bits
from .checkresult import CheckResult
from .repair import check_storage, repair_storage
from .journal import Journal
from .overlap import NAMES, Kind, OverlapTemplate, header_structures
from .refcounts import RefcountManager
from . import amend as amending, snapshots
from .resize import Resizing


class WritableQcow2Image(Resizing):
    """A qcow2 image opened "r+"."""

    def __init__(self, storage: Storage, filename: str, ctx) -> None:
        super().__init__(storage, filename, ctx)
        h = self.header
        try:
            self._refuse_unsupported(ctx.repair)
            if not ctx.repair:
                self._refuse_truncated()
            if h.incompatible_features & INCOMPAT_DIRTY and not ctx.repair:
                # refcounts may lag after a crash with lazy refcounts: repair first,
                # on the file alone, before any writer state exists
                self._repair_dirty()
                h = self.header
        except BaseException:
            self.close()
            raise
        #: every durable ordering of this file (flush steps, header, feature bits)
        self.journal = Journal(storage, h, lazy=bool(h.compatible_features &
                                                     COMPAT_LAZY_REFCOUNTS))
        self._lock = threading.RLock()
        self._ranges = RangeLock()
        self.journal.data_storage = self.data_storage
        self._external = h.has_data_file
        self.refcounts = RefcountManager(self.journal)
        raw = storage.pread(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
        self._l1_raw = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        self._l2: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._dirty_l2: Set[int] = set()
        self._dirty_l1 = False
        # every metadata write is checked against the others (QEMU's overlap check)
        self.journal.template = OverlapTemplate(self)
        self.journal.filename = filename
        if h.autoclear_features & ~AUTOCLEAR_KNOWN:
            # a program that does not know a feature must clear its autoclear bit (spec)
            h.autoclear_features &= AUTOCLEAR_KNOWN
            self.journal.write_header()
        self.bitmaps_attached = False       # this writer keeps the bitmaps up to date
        self.bitmaps_dirty = False          # they must be stored on close
        self._tracking: List[Bitmap] = []   # the enabled, consistent ones
        if not ctx.repair:                  # check -r leaves bitmaps as they are
            try:
                bitmap_store.attach(self)
            except BaseException:
                self.bitmaps_attached = self.bitmaps_dirty = False
                self.close()
                raise
            self.bitmaps_changed_state()

    def _refuse_unsupported(self, repair: bool) -> None:
        h = self.header
        if h.incompatible_features & INCOMPAT_CORRUPT and not repair:
            raise CorruptImageError(f"{self.filename}: image is marked corrupt; it can only be "
                                    f"opened read-only (or repaired with check -r all)")

    def _refuse_truncated(self) -> None:
        """A truncated image (tables past the end of the file) is read as QEMU reads
        it, with zeros past the end; writing to it would build on those zeros (new
        metadata over clusters its tables still claim), so "r+" refuses it."""
        h, size, cs = self.header, self._file_size, self.cluster_size
        # (the snapshot table: at least its fixed part, 40 bytes an entry)
        spans = [(NAMES[kind], off, n)
                 for kind, off, n in header_structures(h, 40 * h.nb_snapshots)
                 if kind != Kind.HEADER and
                 (kind != Kind.BITMAP_DIRECTORY or self.bitmap_directory)]
        problem = next((f"{what} at {off:#x} (+{n}) extends past the end of the file"
                        for what, off, n in spans if n and off + n > size), None)
        if problem is None:
            l1 = self._l1
            past = np.flatnonzero((l1 != 0) & (l1 + cs > size))
            if past.size:
                i = int(past[0])
                problem = (f"L1 entry {i}: L2 table at {int(l1[i]):#x} lies past the end of "
                           f"the file")
        if problem is not None:
            raise CorruptImageError(f"{self.filename}: {problem} ({size} bytes): the image "
                                    f"is truncated; it can be opened read-only (past the end "
                                    f"reads as zeros) or repaired with check -r all")

    # ------------------------------------------------------------ bitmaps
    def add_bitmap(self, name: str, granularity: Optional[int] = None,
                   enabled: bool = True) -> Bitmap:
        """Add an empty persistent bitmap (stored when the image is closed).

        ``granularity``: bytes per bit, a power of two from 512 to 2 GiB
        (default: the cluster size clamped to [4 KiB, 64 KiB], as QEMU).
        Refusals raise :class:`~qcow2py.errors.BitmapError` with QEMU's message.
        """
        self._check_bitmaps_attached()
        with self._lock:
            gbits = bitmap_store.check_new(self, name, granularity)
            bm = Bitmap.empty(self, name, gbits, enabled)
            self.bitmaps.append(bm)
            self.bitmaps_dirty = True
            self.bitmaps_changed_state()
        return bm

    def remove_bitmap(self, name: str) -> None:
        """Remove a persistent bitmap (an inconsistent one too); its clusters are
        freed when the image is closed."""
        self._check_bitmaps_attached()
        with self._lock:
            bm = self.find_bitmap(name)
            self.bitmaps.remove(bm)
            bm.mark_removed()
            self.bitmaps_dirty = True
            self.bitmaps_changed_state()

    def _check_bitmaps_attached(self) -> None:
        if self._closed:
            raise ImageClosedError(f"image {self.filename!r} is closed")
        if not self.bitmaps_attached:
            raise ValueError(f"image {self.filename!r} was opened for repair: its bitmaps "
                             f"cannot be changed")

    def check_bitmap_writable(self, bm: Bitmap) -> None:
        self._check_bitmaps_attached()
        if bm.removed or all(b is not bm for b in self.bitmaps):
            raise BitmapError(f"Dirty bitmap '{bm.name}' not found")

    def load_bitmap_bits(self, bm: Bitmap):
        if self._closed:
            raise ImageClosedError(f"image {self.filename!r} is closed")
        if bm.entry is None:
            bits = bitarray(bm.nbits, endian="little")
            bits.setall(0)
            return bits
        # the clusters read here stay allocated until close has stored the bitmap anew
        bits = load_bits(self.storage, bm.entry, self.size, self.cluster_size,
                         self.storage.size())
        return bits if self.bitmaps_attached else frozenbitarray(bits)

    def bitmaps_changed_state(self) -> None:
        self._tracking = [b for b in self.bitmaps if b.enabled and not b.inconsistent]

    # ------------------------------------------------------------ header
    # ------------------------------------------------------------ lifecycle
    def create_snapshot(self, name: str):
        """``qemu-img snapshot -c`` (see :mod:`qcow2py.qcow2.snapshots`)."""
        return snapshots.create_snapshot(self, name)

    def apply_snapshot(self, name: str) -> None:
        """``qemu-img snapshot -a``: the active state becomes the snapshot's."""
        snapshots.apply_snapshot(self, name)

    def delete_snapshot(self, name: str) -> None:
        """``qemu-img snapshot -d``."""
        snapshots.delete_snapshot(self, name)

    def amend(self, **options) -> None:
        """``qemu-img amend -o``: compat, lazy_refcounts, refcount_bits
        (see :mod:`qcow2py.qcow2.amend`)."""
        amending.amend_image(self, **options)

    # ------------------------------------------------------------ check
    def check(self, repair: Optional[str] = None) -> CheckResult:
        """``qemu-img check`` on this image; ``repair`` is None, "leaks" or "all".

        Everything is flushed first; a repair works on the file (as ``check -r``
        on a path does), then every cached table is read anew."""
        with self._lock:
            self.flush_metadata()
            if repair is None:
                return check_storage(self.storage, self.filename)
            try:
                return repair_storage(self.storage, self.filename, repair)
            finally:
                self._reload_after_repair()

    def _repair_dirty(self) -> None:
        result = repair_storage(self.storage, self.filename, "all")
        if result.corruptions or result.check_errors:
            raise CorruptImageError(f"{self.filename}: could not repair dirty image "
                                    f"({result.corruptions} corruptions left)")
        self._reread_header()
        # the reader's view (opened before the repair) is read anew
        self._l1 = self._read_l1()
        self.forget_tables()
        self.snapshots = self._read_snapshots()

    def _reread_header(self) -> None:
        self._file_size = self.storage.size()
        self.header = Header.parse(self.storage.pread(0, self.cluster_size), self._file_size)

    def _reload_after_repair(self) -> None:
        """After a repair on the file: the header, the refcounts and every cached
        table are read anew (nothing was dirty: the repair ran after a flush)."""
        self._reread_header()
        self.journal.header = self.header
        self.journal.marked_dirty = False
        self.refcounts = RefcountManager(self.journal)
        self.reload_tables()


    def flush(self) -> None:
        """Make every write issued so far durable (fsync included)."""
        if self._closed:
            raise ImageClosedError(f"image {self.filename!r} is closed")
        with self._lock:
            self.flush_metadata()

    def _close_layer(self) -> None:
        """QEMU's durability order: the data path (data, L2 tables, refcounts) is
        committed first, and only then are the bitmaps stored.  A failure while
        storing them (ENOSPC, EIO) therefore never loses a completed write: the
        bitmaps merely stay *in_use* (inconsistent) in the file, and the clusters
        the store had taken leak.  Whatever fails, the files are closed and their
        locks dropped."""
        try:
            if hasattr(self, "_lock") and not self.journal.corrupt_reason:
                with self._lock:
                    self.flush_metadata()
                    if self.bitmaps_dirty:
                        bitmap_store.store(self)
                    self.journal.clear_dirty()
        finally:
            super()._close_layer()      # closing the files drops their locks
