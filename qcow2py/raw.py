"""Raw images: guest offset == file offset."""

from __future__ import annotations

from typing import Iterator

from .lazyimport import numpy as np

from .errors import ResizeError
from .image import Image, Run
from .io.storage import Storage


class RawImage(Image):
    """A raw file; holes (SEEK_HOLE) are reported as zeros by ``map()``."""

    format = "raw"

    def __init__(self, storage: Storage, filename: str) -> None:
        super().__init__()
        self.storage = storage
        self.filename = filename
        # QEMU counts whole 512-byte sectors: a file with a partial last sector has
        # its size rounded up, and the bytes past the end of the file read as zeros
        self.size = -(-storage.size() // 512) * 512

    def _read_zeroed(self, mv: memoryview, offset: int) -> None:
        self._check_open()
        one = np.array([0], dtype=np.int64)
        self.storage.read_runs(mv, one, one + offset, np.array([len(mv)], dtype=np.int64))

    def layer_runs(self, offset: int, length: int) -> Iterator[Run]:
        end = min(offset + length, self.size)
        for start, n, is_data in self.storage.allocation(offset, end - offset):
            yield Run(start, n, is_data, not is_data, start)

    # ------------------------------------------------------------ writing
    def _check_write(self, offset: int, length: int) -> None:
        self._check_open()
        if not self.storage.writable:
            raise ValueError(f"image {self.filename!r} is open read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"write of {length} bytes at {offset} is outside the image "
                             f"({self.size} bytes)")

    def write(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        self._check_write(offset, len(mv))
        self.storage.pwrite(mv, offset)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zero a range (holes where the range is already sparse are kept)."""
        self._check_write(offset, length)
        for start, n, is_data in self.storage.allocation(offset, length):
            if is_data:
                self.storage.write_zeros(start, n)

    def discard(self, offset: int, length: int) -> None:
        """Discarded ranges of a raw file read as zeros afterwards."""
        self.write_zeroes(offset, length)

    def set_size(self, new_size: int, *, shrink: bool = False,
                 preallocation: str = "off") -> None:
        """Resize: the file is truncated or extended (a sparse tail reads as zeros;
        "falloc" reserves it, "full" writes it)."""
        new_size = self.check_resize(new_size, shrink)
        if preallocation == "metadata":
            raise ResizeError("Unsupported preallocation mode: metadata")
        old = self.size
        self.storage.truncate(new_size)
        self.storage.preallocate(old, new_size - old, preallocation)
        self.size = new_size

    def flush(self) -> None:
        self._check_open()
        self.storage.fsync()
