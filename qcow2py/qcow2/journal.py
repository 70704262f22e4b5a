"""Every durable ordering of a qcow2 file, in one place (and the only fsync of it).

Crash safety
------------
Guest data goes straight to the file; metadata (L2 tables, the L1 table,
refcount blocks, the refcount table) is kept in memory and written back by
:meth:`Journal.commit` in this order, each step made durable (:meth:`barrier`)
before the next one starts:

1. refcount blocks (increments only) — together with all data written so far
   (and the file extended over new clusters past its old end: a partial write
   into such a cluster writes only its own bytes, the rest reads as zeros);
2. the refcount table (entries for new refcount blocks);
3. L2 tables (they may now point at the new data and the new clusters are
   already counted);
4. L1 entries (pointing at new L2 tables, which are on disk by now);
5. refcount *decrements* for references the steps above removed (deferred
   frees); only now do freed clusters become reusable.

A crash at any instant therefore leaves references that are all counted:
it may leak clusters, never corrupt.  With lazy refcounts the dirty bit is
made durable before the first L2 write.

The other orderings live here too: the header switch (whole header, synced),
the dirty and corrupt bits, the refcount-table move (blocks, table, then the
header fields), and the bitmaps' in-use protocol (autoclear bit cleared,
directory rewritten, bit set again, each synced).

Repair (``check -r``, :mod:`qcow2py.qcow2.repair`) works on the file without a
writer, through a Journal of the leniently read header, and keeps this order,
one :meth:`Journal.barrier` (or synced field write) after each step:

a. header fields QEMU's open itself repairs: a refused snapshot table offset
   (no snapshots) cleared, a snapshot count past the limit cut;
b. a rewritten snapshot table, after the end of the file, then the header
   fields pointing at it;
c. unaligned preallocated L2 entries turned into zero clusters;
d. refcounts: counts rewritten in place, or new blocks and table after the end
   of the file and then :meth:`Journal.switch_reftable`;
e. COPIED flags: the L2 tables, then the L1 table;
f. the dirty and corrupt bits cleared (:meth:`Journal.clear_problem_bits`),
   only when the check that follows finds nothing left to fix.

Each step only adds references that are already counted or removes counts
nothing durable uses, so an interruption leaves leaks at worst.

Overlap checks
--------------
Every metadata write of a writer goes through :meth:`Journal.write_metadata`,
which first asks the writer's overlap template (:mod:`qcow2py.qcow2.overlap`,
QEMU's ``overlap-check=cached``) whether the write would land on other
metadata; if so, the corrupt bit is set and the write refused, as QEMU refuses
it with EIO.  Two in-place writes are not checked, as QEMU 7.2 does not check
them (tested: tests/test_metadata_overlap.py): the header (:meth:`write_header`,
:meth:`set_fields`; a snapshot L1 table claimed at offset 0 stops neither
``qemu-img resize`` nor ``snapshot -c``) and the refcount table rewritten where
it is (new refcount blocks hooked up; a snapshot L1 table claimed on it does
not stop a write).  Whatever else claims those clusters already reads the
header's or the table's bytes.  Repair (:mod:`qcow2py.qcow2.repair`)
and create (:mod:`qcow2py.qcow2.create`) use a Journal without a template:
repair rewrites structures it has just found broken, from a full walk of the
metadata, and create lays out a file that holds nothing else yet.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional

from ..errors import CorruptImageError
from ..format.header import INCOMPAT_CORRUPT, INCOMPAT_DIRTY, AUTOCLEAR_BITMAPS, Header, \
    encode_fields
from ..io.storage import Storage
from .overlap import Kind, OverlapTemplate, first_name


class Journal:
    """The durable side of one open qcow2 file: header writes, feature bits,
    write barriers and the metadata commit order."""

    def __init__(self, storage: Storage, header: Header, lazy: bool = False) -> None:
        self.storage = storage
        self.header = header
        #: the external data file when there is one (synced before metadata)
        self.data_storage: Storage = storage
        self.lazy = lazy                  # lazy refcounts: dirty bit instead of ordering
        self.marked_dirty = False         # this writer set the dirty bit
        self.corrupt_reason: Optional[str] = None
        #: the writer's overlap template (None: writes are not checked, see above)
        self.template: Optional[OverlapTemplate] = None
        #: the file name used in error messages
        self.filename = "image"

    # ------------------------------------------------------------ barriers
    def barrier(self) -> None:
        """Everything written to the image file so far is durable before anything after."""
        self.storage.fsync()

    def sync_data(self) -> None:
        """Make the external data file durable (before metadata that points into it)."""
        if self.data_storage is not self.storage:
            self.data_storage.fsync()

    # ------------------------------------------------------------ header
    def write_header(self) -> None:
        """The header switch: the whole of cluster 0's header, synced."""
        self.storage.pwrite(self.header.encode(), 0)
        self.barrier()
        self._header_changed()

    def set_fields(self, *names_values) -> None:
        """Rewrite adjacent header fields in one write, synced, then update the header."""
        at, data = encode_fields(*names_values)
        self.storage.pwrite(data, at)
        self.barrier()
        for name, value in names_values:
            setattr(self.header, name, value)
        self._header_changed()

    def _header_changed(self) -> None:
        if self.template is not None:
            self.template.invalidate()

    # ------------------------------------------------------------ overlap checks
    def check_write(self, kind: Kind, offset: int, length: int) -> None:
        """Refuse a write of ``length`` bytes at ``offset`` (a structure of ``kind``;
        :attr:`Kind.OTHER` for guest data, bitmap data and tables) that would land
        on other metadata: the corrupt bit is set and CorruptImageError raised, as
        QEMU's overlap check answers EIO.  Once the image is corrupt, every write
        is refused (QEMU stops using the image)."""
        if self.corrupt_reason is not None:
            raise CorruptImageError(f"{self.filename}: image was marked corrupt: "
                                    f"{self.corrupt_reason}")
        if self.template is None or length <= 0:
            return
        hit = self.template.overlap(offset, length, kind)
        if hit:
            why = f"Preventing invalid write on metadata (overlaps with {first_name(hit)})"
            self.set_corrupt(f"{why} at {offset:#x}+{length}")
            raise CorruptImageError(f"{self.filename}: {why}; image marked as corrupt")

    def write_metadata(self, kind: Kind, offset: int, data, checked: bool = True) -> None:
        """Write one structure of ``kind`` (see :meth:`check_write`).  ``checked=False``
        only for the writes QEMU does not check either (the refcount table
        rewritten in place); they are refused too once the image is corrupt."""
        self.check_write(kind, offset, len(data) if checked else 0)
        self.storage.pwrite(data, offset)

    def write_metadata_many(self, kind: Kind, length: int, offsets: List[int],
                            datas: Iterable[bytes]) -> None:
        """Write several structures of one kind, ``length`` bytes each, at ``offsets``:
        all are checked, in one search, before the first is written; ``datas``
        yields their bytes in the same order (made one by one as they are written)."""
        if self.corrupt_reason is None and self.template is not None:
            i = self.template.first_overlap(offsets, length, kind)
            if i >= 0:
                self.check_write(kind, offsets[i], length)        # refuses it
        self.check_write(kind, 0, 0)                              # corrupt: refused
        for offset, data in zip(offsets, datas):
            self.storage.pwrite(data, offset)

    def set_incompat(self, bit: int, on: bool) -> None:
        h = self.header
        value = (h.incompatible_features | bit) if on else (h.incompatible_features & ~bit)
        self.set_fields(("incompatible_features", value))

    def clear_dirty(self) -> None:
        """On a clean close: the dirty bit this writer set goes."""
        if self.marked_dirty:
            self.set_incompat(INCOMPAT_DIRTY, False)
            self.marked_dirty = False

    def clear_problem_bits(self) -> None:
        """After a successful full repair: clear the corrupt and dirty bits."""
        if self.header.incompatible_features & (INCOMPAT_CORRUPT | INCOMPAT_DIRTY):
            self.set_incompat(INCOMPAT_CORRUPT | INCOMPAT_DIRTY, False)
        self.marked_dirty = False

    def set_corrupt(self, why: str) -> None:
        """Set the corrupt bit (synced) and remember why: nothing is written after."""
        try:
            self.set_incompat(INCOMPAT_CORRUPT, True)
        finally:
            self.corrupt_reason = why

    def mark_corrupt(self, filename: str, why: str) -> None:
        """Set the corrupt bit (synced), remember why, and raise (QEMU's EIO with
        "Marking image as corrupt")."""
        self.set_corrupt(why)
        raise CorruptImageError(f"{filename}: marking image as corrupt: {why}")

    def switch_reftable(self, offset: int, clusters: int) -> None:
        """Point the header at a new refcount table (its blocks and table durable first)."""
        self.barrier()
        self.set_fields(("refcount_table_offset", offset), ("refcount_table_clusters", clusters))

    def bitmaps_in_use(self, write_directory: Callable[[], None]) -> None:
        """Rewrite the bitmap directory in place under the autoclear protocol: a crash
        in the middle leaves the extension stale (dropped by QEMU), never half-written."""
        h = self.header
        h.autoclear_features &= ~AUTOCLEAR_BITMAPS
        self.write_header()
        write_directory()
        self.barrier()
        h.autoclear_features |= AUTOCLEAR_BITMAPS
        self.write_header()

    # ------------------------------------------------------------ metadata commit
    def commit(self, refcounts, write_l2: Optional[Callable[[], None]],
               write_l1: Optional[Callable[[], None]], file_size: Optional[int]) -> None:
        """Steps 1-5 of the module docstring.  ``write_l2`` / ``write_l1`` write the
        dirty tables (None: nothing dirty); ``file_size`` is where the file must reach
        before step 1 (None with an external data file)."""
        st, rc = self.storage, refcounts
        if write_l2 is None and write_l1 is None and not rc.dirty:
            self.barrier()
            return
        if self.lazy and not self.marked_dirty and (write_l2 or write_l1):
            self.set_incompat(INCOMPAT_DIRTY, True)
            self.marked_dirty = True
        self.sync_data()
        # 1: refcount increments, together with every data write so far
        if file_size is not None and st.size() < file_size:
            st.truncate(file_size)
        if rc.dirty_blocks:
            rc.write_dirty_blocks()
        self.barrier()
        # 2: refcount table entries for new refcount blocks
        if rc.dirty_reftable:
            rc.write_reftable()
            self.barrier()
        # 3: L2 tables
        if write_l2 is not None:
            write_l2()
            self.barrier()
        # 4: L1 table
        if write_l1 is not None:
            write_l1()
            self.barrier()
        # 5: decrements, now that no durable metadata refers to the freed clusters
        if rc.pending:
            rc.apply_frees()
            rc.write_dirty_blocks()
            self.barrier()
