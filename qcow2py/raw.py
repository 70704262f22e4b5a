"""Raw images: guest offset == file offset."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .image import Image, Run
from .storage import Storage


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
