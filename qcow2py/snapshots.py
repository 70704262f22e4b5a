"""Internal snapshots as qemu-img shows them: the ``Snapshot list:`` table.

``qemu-img info`` and ``qemu-img snapshot -l`` print one row per snapshot:
ID, tag, VM state size, the creation date in local time, the VM clock as
``HH:MM:SS.mmm`` and the instruction count (blank when the entry has none).
"""

from __future__ import annotations

import time
from typing import Iterable, List


def _size_text(n: int) -> str:
    """QEMU's size_to_str: "0 B", "1.5 KiB", "512 MiB" (three significant digits)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    v, i = float(n), 0
    while v >= 1024 and i < len(units) - 1:
        v, i = v / 1024, i + 1
    return f"{n} B" if i == 0 else f"{v:0.3g} {units[i]}"


def clock_text(vm_clock_nsec: int) -> str:
    secs = vm_clock_nsec // 1_000_000_000
    return (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
            f"{vm_clock_nsec // 1_000_000 % 1000:03d}")


HEADER = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"


def snapshot_rows(snapshots: Iterable[dict]) -> List[str]:
    """The table's header and rows (``qemu-img snapshot -l`` without its first line),
    from SnapshotInfo dicts (``Snapshot.info()``, ``qemu-img info --output=json``)."""
    rows = [HEADER]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        icount = str(s["icount"]) if s.get("icount") is not None else ""
        clock = s["vm-clock-sec"] * 1_000_000_000 + s["vm-clock-nsec"]
        rows.append(f"{s['id']:<9} {s['name']:<16} {_size_text(s['vm-state-size']):>8}"
                    f"{date:>20}{clock_text(clock):>13}{icount:>11}")
    return rows
