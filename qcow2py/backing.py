"""How files named inside an image (backing files, data files) get opened.

An image is untrusted input: its header may name any path, or a QEMU
protocol string such as ``nbd:`` or ``json:{...}``.  qcow2py opens such names
only through a :class:`BackingPolicy` that the caller controls.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Optional

from .errors import BackingChainError

_PROTOCOL = re.compile(r"^[^:/\\]+:")

#: default maximum chain depth (the top image is depth 0)
DEFAULT_MAX_DEPTH = 64


@dataclass(frozen=True)
class BackingPolicy:
    """Rules for opening files named by an image.

    ``allow_files``: open plain paths (relative names resolve against the
    folder of the image that names them, as QEMU does).
    QEMU protocol strings (``nbd:``, ``json:`` ...) are always refused with a
    :class:`BackingChainError` saying so: qcow2py opens files only.
    ``max_depth``: longest chain accepted, to stop hostile or accidental
    chains early.
    """

    allow_files: bool = True
    max_depth: int = DEFAULT_MAX_DEPTH

    def resolve(self, name: str, parent_path: Optional[str], what: str = "backing file") -> str:
        """The host path for ``name`` as named by the image at ``parent_path``."""
        if not name:
            raise BackingChainError(f"empty {what} name")
        if "\0" in name:
            raise BackingChainError(f"{what} name contains a NUL byte")
        if name.startswith("file:"):
            name = name[len("file:"):]
        elif _PROTOCOL.match(name):
            proto = name.split(":", 1)[0]
            raise BackingChainError(f"{what} {name[:80]!r} uses protocol {proto!r}, "
                                    f"which the backing policy refuses")
        if not self.allow_files:
            raise BackingChainError(f"{what} {name!r} refused by the backing policy")
        if os.path.isabs(name) or parent_path is None:
            path = name
        else:
            path = os.path.join(os.path.dirname(parent_path), name)
        _check_file_type(path, what)
        return path


def _check_file_type(path: str, what: str) -> None:
    """Refuse names of directories, FIFOs, sockets and character devices.

    Opening a FIFO blocks until a writer appears and a directory fails on the
    first read, so an image naming ``.`` or ``/dev/stdin`` must be refused
    before anything is opened.  A missing file is left to the caller.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        raise BackingChainError(f"{what} {path!r} cannot be examined: {e.strerror}") from None
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a character device"
            if stat.S_ISCHR(mode) else "not a regular file")
    raise BackingChainError(f"{what} {path!r} is {kind}, not a regular file or block device")


DEFAULT_POLICY = BackingPolicy()
#: refuses every file named inside an image
NO_BACKING = BackingPolicy(allow_files=False)
