"""QEMU-compatible image locking with OFD byte-range locks.

QEMU's file driver expresses "I use permission P" as a shared lock on byte
100+P and "I do not let others use P" as a shared lock on byte 200+P
(P: 0 consistent read, 1 write, 2 write-unchanged, 3 resize).  Before taking
them it tests for conflicting holders.  Taking the same locks makes qcow2py
and QEMU (and two qcow2py writers) refuse to write one image at once.
"""

from __future__ import annotations

import fcntl
import os
import struct

from ..errors import Qcow2Error

PERM_BASE, SHARED_BASE = 100, 200
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 0, 1, 2, 3
_NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write", WRITE_UNCHANGED: "write unchanged",
          RESIZE: "resize"}
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("hh4xqqi4x")       # struct flock on 64-bit Linux


class ImageLockedError(Qcow2Error):
    """Another process (QEMU or qcow2py) holds a conflicting lock on the image."""


def _lock(fd: int, byte: int, kind: int, cmd: int) -> int:
    res = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
    return _FLOCK.unpack(res)[0]


def lock_for_write(fd: int, name: str) -> None:
    """Take a writer's locks: use read, write, resize; share read and write-unchanged."""
    perms = (CONSISTENT_READ, WRITE, RESIZE)
    unshared = (WRITE, RESIZE)
    for p in perms:
        if _lock(fd, SHARED_BASE + p, fcntl.F_WRLCK, _F_OFD_GETLK) != fcntl.F_UNLCK:
            raise ImageLockedError(f"{name}: failed to get \"{_NAMES[p]}\" lock: another "
                                   f"process does not allow it (is the image in use?)")
    for p in unshared:
        if _lock(fd, PERM_BASE + p, fcntl.F_WRLCK, _F_OFD_GETLK) != fcntl.F_UNLCK:
            raise ImageLockedError(f"{name}: failed to get shared \"{_NAMES[p]}\" lock: "
                                   f"another process is using the image")
    try:
        for p in perms:
            _lock(fd, PERM_BASE + p, fcntl.F_RDLCK, _F_OFD_SETLK)
        for p in unshared:
            _lock(fd, SHARED_BASE + p, fcntl.F_RDLCK, _F_OFD_SETLK)
    except OSError as e:
        raise ImageLockedError(f"{name}: cannot lock the image: {e.strerror}") from None


def unlock(fd: int) -> None:
    for base in (PERM_BASE, SHARED_BASE):
        for p in range(4):
            try:
                _lock(fd, base + p, fcntl.F_UNLCK, _F_OFD_SETLK)
            except OSError:
                pass
