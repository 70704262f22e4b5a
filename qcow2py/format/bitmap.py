"""Persistent dirty bitmap directory entries (pure parse/encode)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List

from ..errors import FormatError

#: bitmap table entries: host offset of a data cluster, reserved bits, and bit 0
#: ("all ones") for a cluster that is not stored
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_ALL_ONES = 1

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
    #: the name as stored (kept verbatim when the entry is written back)
    raw_name: bytes = b""

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
        return bitmap_info(self.name, self.granularity, self.in_use, self.auto)


def bitmap_info(name: str, granularity: int, in_use: bool, auto: bool) -> dict:
    """One bitmap as ``qemu-img info`` lists it (flags in QEMU's order)."""
    flags = (["in-use"] if in_use else []) + (["auto"] if auto else [])
    return {"name": name, "granularity": granularity, "flags": flags}


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
        raw_name = bytes(buf[pos:pos + name_size])
        # a C string in QEMU: the name ends at its first NUL (zeros past the end of
        # a truncated file, for one)
        name = raw_name.split(b"\0", 1)[0].decode("utf-8", "replace")
        pos += name_size
        pos += -pos % 8
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise FormatError(f"bitmap {name!r}: granularity bits {gbits} out of range")
        out.append(BitmapEntry(toff, tsize, flags, btype, gbits, name, extra, raw_name))
    return out


def entry_size(entry: BitmapEntry) -> int:
    """Bytes the entry takes in the directory (padded to 8)."""
    n = _ENTRY.size + len(entry.extra_data) + len(entry.raw_name or entry.name.encode())
    return n + (-n % 8)


def encode_bitmap_directory(entries: List[BitmapEntry]) -> bytes:
    """The directory holding ``entries``, in order (names as stored, zero padding)."""
    out = bytearray()
    for e in entries:
        name = e.raw_name or e.name.encode()
        out += _ENTRY.pack(e.table_offset, e.table_size, e.flags, e.type, e.granularity_bits,
                           len(name), len(e.extra_data))
        out += e.extra_data
        out += name
        out += bytes(-len(out) % 8)
    return bytes(out)


def set_directory_flags(buf: bytes, flags: List[int]) -> bytes:
    """``buf`` (a directory) with the flags of its entries replaced, byte for byte
    otherwise: how QEMU updates a directory in place."""
    out = bytearray(buf)
    pos = 0
    for f in flags:
        (_, _, _, _, _, name_size, extra_size) = _ENTRY.unpack_from(out, pos)
        struct.pack_into(">I", out, pos + 12, f)
        pos += _ENTRY.size + extra_size + name_size
        pos += -pos % 8
    return bytes(out)
