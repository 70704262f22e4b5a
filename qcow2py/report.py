"""``info`` and ``map`` in qemu-img's terms, and QEMU's JSON text layout.

qemu-img prints dictionaries in the iteration order of QEMU's QDict (a
512-bucket hash table keyed by the tdb hash of the key) with a 4-space
pretty printer; :func:`qemu_json` reproduces that layout so our output is
identical text, not just equal JSON.
"""

from __future__ import annotations

import json
import time
from typing import Iterable, List, Optional

from .errors import UnsupportedFeatureError
from .image import Image

_BUCKETS = 512


def _qdict_bucket(key: str) -> int:
    """Bucket of ``key`` in QEMU's QDict (the tdb hash, mod 512)."""
    b = key.encode()
    v = (0x238F13AF * len(b)) & 0xFFFFFFFF
    for i, c in enumerate(b):
        v = (v + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * v + 12345) & 0xFFFFFFFF) % _BUCKETS


def _qdict_order(d: dict) -> List[str]:
    # within a bucket QEMU inserts at the head: later keys come first
    keys = list(d)
    return sorted(keys, key=lambda k: (_qdict_bucket(k), -keys.index(k)))


def qemu_json(obj, indent: int = 0) -> str:
    """Serialise like QEMU's pretty JSON writer (key order as a QDict iterates)."""
    pad = "    " * (indent + 1)
    end = "    " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{\n" + end + "}"      # QEMU's writer breaks the line even when empty
        items = [f"{pad}{_qemu_str(k)}: {qemu_json(obj[k], indent + 1)}" for k in _qdict_order(obj)]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[\n" + end + "]"
        return "[\n" + ",\n".join(pad + qemu_json(v, indent + 1) for v in obj) + "\n" + end + "]"
    if isinstance(obj, str):
        return _qemu_str(obj)
    return json.dumps(obj)


_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n",
                  "\r": "\\r", "\t": "\\t"}


def _qemu_str(s: str) -> str:
    """A JSON string as QEMU writes it: printable ASCII as is (``/`` too), every
    other character as ``\\uXXXX`` with upper-case hex, surrogate pairs above the BMP."""
    out = ['"']
    for ch in s:
        c = ord(ch)
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif 0x20 <= c < 0x7F:
            out.append(ch)
        elif c > 0xFFFF:
            c -= 0x10000
            out.append(f"\\u{0xD800 + (c >> 10):04X}\\u{0xDC00 + (c & 0x3FF):04X}")
        else:
            if 0xD800 <= c < 0xE000:       # a lone surrogate (from undecodable bytes)
                c = 0xFFFD
            out.append(f"\\u{c:04X}")
    out.append('"')
    return "".join(out)


# ------------------------------------------------------------------ info, map
def image_info(img: Image) -> dict:
    """The fields of ``qemu-img info --output=json`` (QEMU 7.2 ImageInfo)."""
    return img.info()


def image_map(img: Image, start: int = 0, length: Optional[int] = None) -> List[dict]:
    """``qemu-img map --output=json`` entries, merged as qemu-img merges them."""
    return img.map(start, length)


def map_json(entries: List[dict]) -> str:
    """The text qemu-img prints for ``map --output=json``."""
    lines = []
    for e in entries:
        s = (f'{{ "start": {e["start"]}, "length": {e["length"]}, "depth": {e["depth"]},'
             f' "present": {_b(e["present"])}, "zero": {_b(e["zero"])}, "data": {_b(e["data"])}')
        if "offset" in e:
            s += f', "offset": {e["offset"]}'
        lines.append(s + "}")
    return "[" + ",\n".join(lines) + "]\n"


def map_human(img: Image, entries: List[dict]) -> str:
    """qemu-img's human ``map`` table (data ranges only)."""
    chain = img.chain()
    rows = ["Offset          Length          Mapped to       File"]
    for e in entries:
        if not e["data"]:
            continue
        if "offset" not in e:
            raise UnsupportedFeatureError("File contains external, encrypted or compressed "
                                          "clusters.")
        if e["zero"]:       # data that reads as zeros (a hole under preallocated metadata)
            continue
        layer = chain[e["depth"]]
        fname = getattr(layer, "data_file_path", None) or layer.filename
        rows.append(f"{_hex16(e['start'])}{_hex16(e['length'])}{_hex16(e['offset'])}{fname}")
    return "\n".join(rows) + "\n"


def _hex16(v: int) -> str:
    return f"{v:#x}".ljust(16) if v else "0".ljust(16)


def _b(v: bool) -> str:
    return "true" if v else "false"


# ------------------------------------------------------------------ snapshot table
# ``qemu-img info`` and ``qemu-img snapshot -l`` print one row per snapshot: ID, tag,
# VM state size, the creation date in local time, the VM clock as ``HH:MM:SS.mmm`` and
# the instruction count (blank when the entry has none).

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


SNAPSHOT_HEADER = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"


def snapshot_rows(snapshots: Iterable[dict]) -> List[str]:
    """The table's header and rows (``qemu-img snapshot -l`` without its first line),
    from SnapshotInfo dicts (``Snapshot.info()``, ``qemu-img info --output=json``)."""
    rows = [SNAPSHOT_HEADER]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        icount = str(s["icount"]) if s.get("icount") is not None else ""
        clock = s["vm-clock-sec"] * 1_000_000_000 + s["vm-clock-nsec"]
        rows.append(f"{s['id']:<9} {s['name']:<16} {_size_text(s['vm-state-size']):>8}"
                    f"{date:>20}{clock_text(clock):>13}{icount:>11}")
    return rows
