"""QEMU's permission locks, taken with OFD byte-range locks.

QEMU's file driver says "I use permission P" with a shared lock on byte
``100 + P`` and "I do not let anybody else use P" with a shared lock on byte
``200 + P`` (P: 0 consistent read, 1 write, 2 write unchanged, 3 resize).
Opening a file it first *takes* its bytes, then *tests* for other holders of
the bytes that conflict (another user's "not shared" byte for each permission
it uses, another user's "used" byte for each permission it does not share).
Taking before testing is what makes two openers racing for one file never
both succeed: each sees the other's bytes, so at least one fails.

Which bytes a file gets depends on its role in the chain, as in QEMU's
``bdrv_default_perms``: a qcow2 file (metadata) never shares write or resize;
a backing file is only read; an external data file does not share resize and
is resized along with writes; a raw file passes its user's permissions
through.  The numbers below were checked against ``/proc/locks`` while
qemu-io, qemu-nbd and qemu-img held images (see tests/test_locks_matrix.py).
OFD locks belong to the open file description, so they go away when the file
is closed, and two descriptors of one process conflict like two processes.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass

from ..errors import ForceShareError, ImageLockedError

__all__ = ["ImageLockedError", "ForceShareError", "Perms", "file_perms", "acquire", "release"]

PERM_BASE, SHARED_BASE = 100, 200
#: permission bits (QEMU's BLK_PERM_*); bit i is lock byte 100+i / 200+i
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 1, 2, 4, 8
ALL = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE
_NAMES = ("consistent read", "write", "write unchanged", "resize")
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("hh4xqqi4x")       # struct flock on 64-bit Linux

#: roles of a file in an open chain
TOP, BACKING, DATA = "top", "backing", "data"


@dataclass(frozen=True)
class Perms:
    """What one open file uses (``perm``) and lets others use (``shared``)."""

    perm: int
    shared: int


def file_perms(fmt: str, role: str, *, writable: bool = False, force_share: bool = False,
               no_io: bool = False, share_backing_write: bool = False) -> Perms:
    """The permissions QEMU's tools (qemu-img, qemu-io) take on one file of a chain.

    ``fmt`` is the format of the image stored in the file ("qcow2" or "raw"; a
    data file is raw by nature).  ``role``: TOP (the image opened), BACKING (a
    file under it) or DATA (the external data file of a qcow2 at the top when
    ``writable``, else anywhere).  ``no_io``: opened for metadata only
    (``qemu-img info``): no consistent read.  ``share_backing_write``: the
    backing files may change under this reader (a commit writing into them
    from the same process, a fleecing temp over its active disk).
    """
    if force_share and writable:
        raise ForceShareError()
    # what the tool's root asks of the image node: it shares everything
    perm = 0 if no_io else CONSISTENT_READ
    if writable and role != BACKING:
        perm |= WRITE
    shared = ALL
    if role == BACKING:
        # a backing file is only read; its parent accepts changes (it shares write)
        perm &= CONSISTENT_READ
        if fmt == "qcow2" and not share_backing_write:
            shared &= ~(WRITE | RESIZE)      # its metadata must not change under us
    elif role == DATA:
        shared &= ~RESIZE                    # its size is the guest's
        if perm & WRITE_UNCHANGED:
            perm |= WRITE
        if perm & WRITE:
            perm |= RESIZE                   # writes past the end grow it
    elif fmt == "qcow2":
        if writable:
            perm |= WRITE | RESIZE           # metadata is written, the file grows
        shared &= ~(WRITE | RESIZE)
    if force_share:
        shared = ALL
    return Perms(perm, shared)


def _fcntl(fd: int, cmd: int, kind: int, byte: int) -> int:
    res = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
    return _FLOCK.unpack(res)[0]


def _bits(mask: int):
    return [i for i in range(len(_NAMES)) if mask & (1 << i)]


def _lock_error(msg: str, name: str) -> ImageLockedError:
    return ImageLockedError(f"{msg}\nIs another process using the image [{name}]?")


def acquire(fd: int, name: str, perms: Perms) -> None:
    """Take the lock bytes of ``perms`` on ``fd``, then test for conflicting holders
    (QEMU's order: two racing openers never both pass).  On a conflict the bytes
    this call took are released and :class:`ImageLockedError` says which
    permission was refused, in qemu-img's words."""
    taken = []
    try:
        for byte in ([PERM_BASE + i for i in _bits(perms.perm)] +
                     [SHARED_BASE + i for i in _bits(ALL & ~perms.shared)]):
            try:
                _fcntl(fd, _F_OFD_SETLK, fcntl.F_RDLCK, byte)
            except OSError:
                raise _lock_error(f"Failed to lock byte {byte}", name) from None
            taken.append(byte)
        for i in _bits(perms.perm):              # does anybody refuse what we use?
            if _fcntl(fd, _F_OFD_GETLK, fcntl.F_WRLCK, SHARED_BASE + i) != fcntl.F_UNLCK:
                raise _lock_error(f'Failed to get "{_NAMES[i]}" lock', name)
        for i in _bits(ALL & ~perms.shared):     # does anybody use what we refuse?
            if _fcntl(fd, _F_OFD_GETLK, fcntl.F_WRLCK, PERM_BASE + i) != fcntl.F_UNLCK:
                raise _lock_error(f'Failed to get shared "{_NAMES[i]}" lock', name)
    except BaseException:
        for byte in taken:
            _unlock_byte(fd, byte)
        raise


def _unlock_byte(fd: int, byte: int) -> None:
    try:
        _fcntl(fd, _F_OFD_SETLK, fcntl.F_UNLCK, byte)
    except OSError:
        pass


def release(fd: int) -> None:
    """Drop every permission byte ``fd`` holds (closing the file does it too)."""
    for base in (PERM_BASE, SHARED_BASE):
        for i in range(len(_NAMES)):
            _unlock_byte(fd, base + i)


def lock_for_write(fd: int, name: str) -> None:
    """A qcow2 writer's locks (``qemu-io`` on a qcow2 file): what create checks before
    it truncates a file somebody uses."""
    acquire(fd, name, file_perms("qcow2", TOP, writable=True))
