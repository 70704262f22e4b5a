"""Images as Python file objects (:func:`as_file`).

Code that takes a file object (``tarfile``, ``shutil.copyfileobj``,
``hashlib.file_digest``, ``io.BufferedReader``) can read a guest disk through
an :class:`ImageFile`: an :class:`io.RawIOBase` over any
:class:`~qcow2py.node.Node`, reading and writing at any offset and length.
Closing it leaves the node open: the caller owns the image.
"""

from __future__ import annotations

import io
import os

from .node import Node


class ImageFile(io.RawIOBase):
    """A seekable raw file over a node's guest bytes; its length is the node's size.

    Reads stop at the end of the disk (a short read, as at the end of a file);
    writes past the end raise ``OSError`` (a disk does not grow by writing).
    A read-only node gives a read-only file: ``write`` raises
    :class:`io.UnsupportedOperation`, as on a file opened ``"rb"``.
    """

    def __init__(self, node: Node, *, writable: bool | None = None) -> None:
        super().__init__()
        self._node = node
        self._pos = 0
        self._writable = (not node.read_only) if writable is None else writable
        if self._writable and node.read_only:
            raise ValueError("the image is read-only: its file cannot be writable")

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    @property
    def node(self) -> Node:
        return self._node

    # -- capabilities -----------------------------------------------------
    def readable(self) -> bool:
        self._check_open()
        return True

    def writable(self) -> bool:
        self._check_open()
        return self._writable

    def seekable(self) -> bool:
        self._check_open()
        return True

    # -- position ---------------------------------------------------------
    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check_open()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._node.size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise OSError(22, f"negative seek position {pos}")
        self._pos = pos
        return pos

    # -- data -------------------------------------------------------------
    def readinto(self, buf) -> int:
        self._check_open()
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self._node.size - self._pos))
        if n:
            self._node.read_into(mv[:n], self._pos)
            self._pos += n
        return n

    def readall(self) -> bytes:
        self._check_open()
        n = max(0, self._node.size - self._pos)
        data = self._node.read(self._pos, n) if n else b""
        self._pos += n
        return data

    def write(self, data) -> int:
        self._check_open()
        if not self._writable:
            raise io.UnsupportedOperation("write: the image is open read-only")
        mv = memoryview(data).cast("B")
        if not len(mv):
            return 0
        if self._pos + len(mv) > self._node.size:
            raise OSError(28, f"write of {len(mv)} bytes at {self._pos} goes past the end "
                              f"of the disk ({self._node.size} bytes)")
        self._node.write(self._pos, mv)
        self._pos += len(mv)
        return len(mv)

    def truncate(self, size=None):
        raise io.UnsupportedOperation("truncate: a disk image is resized with resize()")

    def flush(self) -> None:
        """Make written data durable, as ``os.fsync`` on a file would."""
        if not self.closed and self._writable:
            self._node.flush()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("an image file has no single descriptor")

    def close(self) -> None:
        """Close the file object only; the image stays open."""
        if not self.closed:
            try:
                self.flush()
            finally:
                super().close()


def as_file(node: Node, *, writable: bool | None = None) -> ImageFile:
    """An :class:`ImageFile` over ``node`` (writable when the node is, unless told)."""
    return ImageFile(node, writable=writable)
