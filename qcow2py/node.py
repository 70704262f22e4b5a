"""The node protocol: what every holder of guest data implements.

A node is anything a job or a server reads guest bytes from or writes them
to: a qcow2 or raw image (with its backing chain), a copy-before-write
filter, a point-in-time snapshot view, an NBD export's object.  Jobs
(block-copy, backup, commit) and servers speak only this protocol; only the
drivers know qcow2.

``block_status`` is the protocol's map: it tells, for a guest range, which
bytes are data, zeros, compressed or unallocated, at which depth of the chain
they were found and where they lie in which host file.  Planners order their
reads by ``(host_file, host_offset)`` from it; the NBD server builds
``base:allocation`` from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum
from typing import List, Optional


class BlockKind(IntEnum):
    """What a guest range holds, as a node sees it."""

    DATA = 0          #: data bytes stored at ``host_offset`` of ``host_file`` (when known)
    ZERO = 1          #: allocated, reads as zeros
    COMPRESSED = 2    #: data stored compressed (no plain host range to read)
    UNALLOCATED = 3   #: nothing in the whole chain: reads as zeros


@dataclass(frozen=True)
class Extent:
    """One run of ``block_status``.

    ``depth`` is the chain layer that decides the content (0 = the node
    itself); for UNALLOCATED it is the deepest layer looked at.
    ``known_zero`` marks DATA whose host bytes are a hole (preallocated
    metadata), which QEMU reports as data *and* zero.
    """

    offset: int
    length: int
    kind: BlockKind
    depth: int = 0
    host_offset: Optional[int] = None
    host_file: Optional[str] = None
    known_zero: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def present(self) -> bool:
        """Allocated somewhere in the chain (``qemu-img map``'s "present")."""
        return self.kind != BlockKind.UNALLOCATED

    @property
    def data(self) -> bool:
        """Stored bytes (``qemu-img map``'s "data"; NBD: not a hole)."""
        return self.kind in (BlockKind.DATA, BlockKind.COMPRESSED)

    @property
    def zero(self) -> bool:
        """Known to read as zeros (``qemu-img map``'s "zero"; NBD: ZERO)."""
        return self.kind in (BlockKind.ZERO, BlockKind.UNALLOCATED) or self.known_zero

    def joins(self, other: "Extent") -> bool:
        """True when ``other`` starts where this ends and continues it exactly."""
        if (self.end != other.offset or self.kind != other.kind or self.depth != other.depth
                or self.host_file != other.host_file or self.known_zero != other.known_zero):
            return False
        if (self.host_offset is None) != (other.host_offset is None):
            return False
        return self.host_offset is None or self.host_offset + self.length == other.host_offset


def merge_extents(extents) -> List[Extent]:
    """Coalesce adjacent extents that continue each other (as qemu-img map merges)."""
    out: List[Extent] = []
    for e in extents:
        if out and out[-1].joins(e):
            last = out[-1]
            out[-1] = Extent(last.offset, last.length + e.length, last.kind, last.depth,
                             last.host_offset, last.host_file, last.known_zero)
        else:
            out.append(e)
    return out


class Node(ABC):
    """The protocol.  Offsets and lengths are guest bytes; any alignment.

    Read-only nodes raise from the writing methods (``PermissionError`` or
    ``ValueError`` as the concrete class documents); a closed node raises
    :class:`~qcow2py.errors.ImageClosedError` or ``ValueError``.
    """

    size: int = 0

    @property
    def read_only(self) -> bool:
        """True when ``write``/``write_zeroes`` are refused."""
        return True

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset+length)``."""

    @abstractmethod
    def read_into(self, buf, offset: int) -> None:
        """Fill the writable buffer ``buf`` with guest bytes from ``offset``."""

    @abstractmethod
    def write(self, offset: int, data) -> None:
        """Store ``data`` at ``offset``."""

    @abstractmethod
    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make the range read as zeros (``unmap``: may free what held it)."""

    @abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """The caller no longer needs the range (whole clusters inside it are freed)."""

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    @abstractmethod
    def block_status(self, offset: int, length: int) -> List[Extent]:
        """Extents covering exactly ``[offset, offset+length)`` (clipped to ``size``),
        in guest order, adjacent equal ones merged."""

    @abstractmethod
    def close(self) -> None:
        """Release the node (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
