"""Internal snapshot table entries (pure parse/encode)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional

from ..errors import FormatError

_ENTRY = struct.Struct(">QIHHIIQII")      # 40 bytes
MAX_EXTRA_DATA = 1024
MAX_TABLE_BYTES = 1024 * 65536


@dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: Optional[int]
    icount: Optional[int]
    extra_data: bytes

    def info(self) -> dict:
        """The entry as ``qemu-img info`` reports it (SnapshotInfo)."""
        d = {
            "id": self.id, "name": self.name, "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec, "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount is not None:
            d["icount"] = self.icount
        return d


def parse_snapshot_table(buf: bytes, count: int) -> List[Snapshot]:
    """Parse ``count`` entries from the start of ``buf``."""
    out: List[Snapshot] = []
    pos = 0
    for i in range(count):
        if pos + _ENTRY.size > len(buf):
            raise FormatError(f"snapshot table entry {i} runs past the table")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmss32,
         extra_size) = _ENTRY.unpack_from(buf, pos)
        if extra_size > MAX_EXTRA_DATA:
            raise FormatError(f"snapshot {i} has too much extra data ({extra_size} bytes)")
        pos += _ENTRY.size
        end = pos + extra_size + id_len + name_len
        if end > len(buf):
            raise FormatError(f"snapshot table entry {i} runs past the table")
        extra = bytes(buf[pos:pos + extra_size])
        pos += extra_size
        # QEMU keeps id and name as C strings: each ends at its first NUL (a table
        # read past the end of the file holds zeros there)
        sid = bytes(buf[pos:pos + id_len]).split(b"\0", 1)[0].decode("utf-8", "replace")
        pos += id_len
        name = bytes(buf[pos:pos + name_len]).split(b"\0", 1)[0].decode("utf-8", "replace")
        pos += name_len
        pos += -pos % 8
        vmss = struct.unpack_from(">Q", extra)[0] if extra_size >= 8 else vmss32
        disk = struct.unpack_from(">Q", extra, 8)[0] if extra_size >= 16 else None
        icount = struct.unpack_from(">Q", extra, 16)[0] if extra_size >= 24 else None
        if icount == (1 << 64) - 1:
            icount = None
        out.append(Snapshot(l1_off, l1_size, sid, name, dsec, dnsec, clock, vmss,
                            disk, icount, extra))
    return out


def encode_snapshot_table(snapshots: List[Snapshot]) -> bytes:
    """The snapshot table as the format lays it out (each entry 8-byte aligned)."""
    out = bytearray()
    for s in snapshots:
        sid, name = s.id.encode(), s.name.encode()
        vmss32 = s.vm_state_size if s.vm_state_size < 1 << 32 else 0
        out += _ENTRY.pack(s.l1_table_offset, s.l1_size, len(sid), len(name), s.date_sec,
                           s.date_nsec, s.vm_clock_nsec, vmss32, len(s.extra_data))
        out += s.extra_data + sid + name
        out += bytes(-len(out) % 8)
    return bytes(out)


def snapshot_table_size(snapshots: List[Snapshot]) -> int:
    """Bytes :func:`encode_snapshot_table` makes of ``snapshots``, without making them."""
    return sum(-(-(_ENTRY.size + len(s.extra_data) + len(s.id.encode()) +
                   len(s.name.encode())) // 8) * 8 for s in snapshots)


def snapshot_table_bytes_upper_bound(count: int) -> int:
    """Largest table ``count`` entries may occupy (for bounded reads)."""
    return min(MAX_TABLE_BYTES, count * (_ENTRY.size + MAX_EXTRA_DATA + 2 * 65535 + 8))
