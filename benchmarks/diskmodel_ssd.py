"""The SSD half of the disk model: per-request latency at a queue depth plus
bandwidth, with SATA and NVMe presets from their data sheets.  The requests
are those of :mod:`benchmarks.diskmodel`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .diskmodel import IO, MB


@dataclass
class SSDParams:
    """Per-request latency at a queue depth plus bandwidth (reads; writes alike)."""

    name: str
    read_bw: float              # bytes/s, sequential
    iops_qd1: float             # 4 KiB random reads, queue depth 1
    iops_max: float             # 4 KiB random reads, saturated (datasheet QD32)
    write_bw: float = 0.0
    write_iops_qd1: float = 0.0
    write_iops_max: float = 0.0


#: Samsung 870 EVO 1 TB (SATA 6 Gb/s) data sheet: sequential read up to 560 MB/s,
#: write 530 MB/s; 4 KB random read up to 13,000 IOPS at QD1 and 98,000 at QD32;
#: random write 36,000 (QD1) / 88,000 (QD32) IOPS.
SATA_SSD = SSDParams("SATA SSD (870 EVO class)", read_bw=560 * MB, iops_qd1=13_000,
                     iops_max=98_000, write_bw=530 * MB, write_iops_qd1=36_000,
                     write_iops_max=88_000)
#: Samsung 970 EVO Plus 1 TB (PCIe 3.0 x4 NVMe) data sheet: sequential read up to
#: 3,500 MB/s, write 3,300 MB/s; 4 KB random read 19,000 IOPS at QD1 and 600,000
#: at QD32; random write 60,000 (QD1) / 550,000 (QD32) IOPS.
NVME_SSD = SSDParams("NVMe SSD (970 EVO Plus class)", read_bw=3500 * MB, iops_qd1=19_000,
                     iops_max=600_000, write_bw=3300 * MB, write_iops_qd1=60_000,
                     write_iops_max=550_000)


class SSD:
    """Each request costs its share of the device's IOPS at the queue depth, plus bandwidth.

    At queue depth ``q`` a stream of 4 KiB reads runs at
    ``IOPS(q) = min(q * IOPS_QD1, IOPS_max)`` (a constant per-request latency
    until the device saturates: Little's law).  A request of ``n`` bytes costs
    ``1/IOPS(q) + (n - 4 KiB)/bandwidth``, never less than ``n/bandwidth``.
    Order does not matter to an SSD here, only the number and size of requests.
    """

    def __init__(self, params: SSDParams = SATA_SSD):
        self.p = params

    def simulate(self, ios: Sequence[IO], layout=None, qd: int = 1, **_) -> float:
        if not ios:
            return 0.0
        p = self.p
        q = max(1, int(qd))
        lengths = np.array([io.length for io in ios], dtype=np.float64)
        writes = np.array([io.write for io in ios], dtype=bool)
        total = 0.0
        for sel, bw, i1, imax in ((~writes, p.read_bw, p.iops_qd1, p.iops_max),
                                  (writes, p.write_bw or p.read_bw, p.write_iops_qd1 or p.iops_qd1,
                                   p.write_iops_max or p.iops_max)):
            n = lengths[sel]
            if not n.size:
                continue
            per = 1.0 / min(q * i1, imax)
            total += float(np.maximum(n / bw, per + (n - 4096) / bw).sum())
        return total

    def floor(self, nbytes: int) -> float:
        return nbytes / self.p.read_bw
