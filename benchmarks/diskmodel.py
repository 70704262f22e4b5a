"""A trace-driven disk model: what a recorded request stream costs on a 7200 rpm
hard disk or on an SSD.

The page cache makes every copy on a developer machine look the same; what
separates a host-order copy from a guest-order one is what the *device* does
with the requests.  This module replays a trace of ``(file, offset, length,
read/write)`` requests against

* :class:`~benchmarks.diskmodel_hdd.HDD` (``diskmodel_hdd.py``) — the
  disk-drive model of Ruemmler & Wilkes (1994) of a 7200 rpm SATA drive: seek
  curve, rotational position, read-ahead, zoned recording, segment cache and
  an NCQ command queue (that module says what each part does and where its
  numbers come from);
* :class:`~benchmarks.diskmodel_ssd.SSD` (``diskmodel_ssd.py``) — per-request
  latency at a queue depth plus bandwidth, with SATA and NVMe presets.

Files are mapped to the disk by a :class:`Layout` (each file contiguous from a
start address); this module holds the vocabulary both models share (the
request :class:`IO`, the :class:`Layout`, the units).
:func:`~benchmarks.diskmodel_strace.parse_strace` (``diskmodel_strace.py``)
reads the requests of a process out of an ``strace -f -y`` log; qcow2py's own
requests come from :class:`qcow2py.io.wrappers.TraceLog`.

What the model leaves out (on purpose): the host's own time between requests
(think time is zero: a request is issued the moment the previous one completes,
which favours every reader alike), the kernel's readahead and request merging
(traces are taken at the system-call level), write caching, and the file
system's placement (a file is one contiguous extent, holes included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np

MB = 1_000_000          # datasheets count in decimal megabytes
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@dataclass(frozen=True)
class IO:
    """One request of a trace."""

    file: str
    offset: int
    length: int
    write: bool = False
    stream: int = 0             # issuing thread (pid in strace logs), informational


# ---------------------------------------------------------------------------- layout
class Layout:
    """Where each file lies on the device: contiguously from a start address (bytes)."""

    def __init__(self, starts: Dict[str, int]):
        self.starts = dict(starts)

    @classmethod
    def contiguous(cls, sizes: Dict[str, int], base: int = 0, align: int = GiB) -> "Layout":
        """Files one after another from ``base``, each starting on an ``align`` boundary."""
        starts, pos = {}, base
        for name, size in sizes.items():
            pos = -(-pos // align) * align
            starts[name] = pos
            pos += max(int(size), 1)
        return cls(starts)

    def addresses(self, ios: Sequence[IO]) -> np.ndarray:
        try:
            return np.array([self.starts[io.file] + io.offset for io in ios], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"file {e.args[0]!r} is not in the layout") from None


def total_bytes(ios: Sequence[IO]) -> int:
    return sum(io.length for io in ios)
