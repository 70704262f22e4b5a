"""Persistent dirty bitmap directory entries (pure parse/encode)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List

from ..errors import FormatError

_ENTRY = struct.Struct(">QIIBBHI")        # 24 bytes
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
MAX_NAME = 1023
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * 65535


@dataclass
class BitmapEntry:
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data: bytes = b""

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)

    def info(self) -> dict:
        """As ``qemu-img info`` lists it."""
        flags = []
        if self.in_use:
            flags.append("in-use")
        if self.auto:
            flags.append("auto")
        return {"name": self.name, "granularity": self.granularity, "flags": flags}


def parse_bitmap_directory(buf: bytes, count: int) -> List[BitmapEntry]:
    if count > MAX_BITMAPS:
        raise FormatError(f"too many bitmaps ({count})")
    out: List[BitmapEntry] = []
    pos = 0
    for i in range(count):
        if pos + _ENTRY.size > len(buf):
            raise FormatError(f"bitmap directory entry {i} runs past the directory")
        (toff, tsize, flags, btype, gbits, name_size, extra_size) = _ENTRY.unpack_from(buf, pos)
        pos += _ENTRY.size
        if name_size == 0 or name_size > MAX_NAME:
            raise FormatError(f"bitmap directory entry {i}: bad name size {name_size}")
        if pos + extra_size + name_size > len(buf):
            raise FormatError(f"bitmap directory entry {i} runs past the directory")
        extra = bytes(buf[pos:pos + extra_size])
        pos += extra_size
        name = bytes(buf[pos:pos + name_size]).decode("utf-8", "replace")
        pos += name_size
        pos += -pos % 8
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise FormatError(f"bitmap {name!r}: granularity bits {gbits} out of range")
        out.append(BitmapEntry(toff, tsize, flags, btype, gbits, name, extra))
    return out
