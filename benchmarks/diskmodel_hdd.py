"""The hard-disk half of the disk model: a 7200 rpm drive replaying a trace.

:class:`HDD` is the disk-drive model of Ruemmler & Wilkes ("An introduction to
disk drive modeling", IEEE Computer 27(3), March 1994): a seek time that grows
with the square root of the distance for short seeks and linearly for long
ones (:func:`fit_seek_curve` fits it to a datasheet), rotational position
tracked over time (a request waits for its sector to come round under the
head, not for a fixed half turn), a read-ahead track buffer (a short forward
hop is streamed through, not seeked), zoned recording (outer cylinders hold
more bytes per turn, so they transfer faster), a small segment cache, and a
command queue served in rotational-position order (shortest positioning time
first, as NCQ firmware does), so that parallel readers such as ``qemu-img
convert`` get the benefit of their queue depth.  The requests and the layout
are those of :mod:`benchmarks.diskmodel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .diskmodel import IO, MB, MiB, Layout


@dataclass
class HDDParams:
    """A 7200 rpm 3.5-inch SATA drive.  Every default names its source.

    Form of the model: Ruemmler & Wilkes 1994 (seek curve sqrt/linear, rotation,
    zoning, read-ahead, command queueing).  Numbers:

    * geometry, rotation and transfer rate: Seagate Constellation ES.3 product
      manual (ST4000NM0033, 3.5" 7200 rpm SATA; SAS twin ST4000NM0023, manual
      100671510 rev. C, section 4.1 "Internal drive characteristics"):
      10 heads, 320,800 tracks per surface, 7200 rpm (average rotational
      latency 4.16 ms), sustained transfer rate 83 to 175 MB/s (inner to outer);
    * average seek 8.5 ms (read, typical, without command overhead): Hitachi
      Deskstar 7K1000.C specification, table 9 (3.5" 7200 rpm SATA, two-disk
      models); HGST Ultrastar 7K4000 lists 8.2 ms;
    * single-track seek 0.5 ms and full-stroke seek 17.35 ms (read, typical,
      without controller overhead), controller overhead 0.2 ms (8.2 ms average
      with it, 8.0 ms without): Seagate Constellation SAS (ST9500430SS, 7200
      rpm) product manual rev. E, section 5.2.1 "Access time";
    * queue depth 32: SATA Native Command Queuing (AHCI/NCQ allows 32 tags);
    * read-ahead window (2 MiB) and read cache (32 segments, 16 MiB): modelling
      choices.  The Constellation ES.3 has a 128 MB buffer, shared with the write
      cache and segmented; the model keeps enough of it to serve re-reads of
      recent metadata and out-of-order neighbours, not a second pass over a file.
    """

    name: str = "HDD 7200 rpm (3.5in SATA)"
    rpm: float = 7200.0
    heads: int = 10
    cylinders: int = 320_800
    rate_outer: float = 175 * MB        # bytes/s, zone 0
    rate_inner: float = 83 * MB         # bytes/s, innermost zone
    track_to_track_ms: float = 0.5
    average_seek_ms: float = 8.5
    full_stroke_ms: float = 17.35
    overhead_ms: float = 0.2            # command processing, paid by every non-streamed request
    head_switch_ms: float = 0.5         # same cylinder, other surface (about a track-to-track)
    readahead: int = 2 * MiB            # forward hops up to this are streamed through
    cache_segments: int = 32            # recently read ranges kept in the buffer...
    cache_bytes: int = 16 * MiB         # ...at most this much of them (of a 128 MB buffer)
    interface_rate: float = 600 * MB    # SATA 6 Gb/s, for buffer hits
    ncq_depth: int = 32


class HDD:
    """Replays requests on a zoned, rotating disk with a command queue."""

    def __init__(self, params: Optional[HDDParams] = None, **overrides):
        p = params or HDDParams()
        if overrides:
            p = HDDParams(**{**p.__dict__, **overrides})
        self.p = p
        self.rps = p.rpm / 60.0
        self.rev = 1.0 / self.rps
        self.t_outer = p.rate_outer / self.rps          # bytes per track at cylinder 0
        self.t_inner = p.rate_inner / self.rps
        self.k = (self.t_outer - self.t_inner) / max(p.cylinders - 1, 1)
        self.capacity = int(self._cum(p.cylinders))
        self.debug: Optional[list] = None       # (request, kind, positioning, transfer, from)
        self.seek_params = fit_seek_curve(p.track_to_track_ms / 1e3, p.average_seek_ms / 1e3,
                                          p.full_stroke_ms / 1e3, p.cylinders - 1)

    # -- geometry (zoned: bytes per track fall linearly from the outer to the inner edge)
    def _cum(self, c):
        """Bytes before cylinder ``c`` (continuous)."""
        return self.p.heads * (self.t_outer * c - self.k * c * c / 2.0)

    def cylinder_of(self, addr):
        a = np.asarray(addr, dtype=np.float64)
        disc = np.maximum(self.t_outer ** 2 - 2.0 * self.k * a / self.p.heads, 0.0)
        c = (self.t_outer - np.sqrt(disc)) / self.k if self.k else a / (self.p.heads * self.t_outer)
        c = np.floor(c).astype(np.int64)
        # float rounding at cylinder edges
        c = np.clip(c, 0, self.p.cylinders - 1)
        c = np.where(self._cum(c + 1) <= a, c + 1, c)
        c = np.where(self._cum(c) > a, c - 1, c)
        return np.clip(c, 0, self.p.cylinders - 1)

    def geometry(self, addr):
        """Cylinder, surface, angle (fraction of a turn) and media rate of addresses."""
        addr = np.asarray(addr, dtype=np.int64)
        if addr.size and (addr.min() < 0 or addr.max() >= self.capacity):
            raise ValueError(f"address outside the modelled disk ({self.capacity} bytes)")
        c = self.cylinder_of(addr)
        base = self._cum(c)
        track = (self._cum(c + 1) - base) / self.p.heads
        within = addr - base
        surface = np.floor(within / track).astype(np.int64)
        angle = (within - surface * track) / track
        return c, surface, angle, track * self.rps

    def rate_at(self, addr: int) -> float:
        return float(self.geometry(np.array([addr]))[3][0])

    # -- mechanics
    def seek_time(self, distance) -> np.ndarray:
        """Seconds to move the arm ``distance`` cylinders (0 for none)."""
        a, b, x0, c, e = self.seek_params
        d = np.asarray(distance, dtype=np.float64)
        t = np.where(d < x0, a + b * np.sqrt(np.maximum(d, 0.0)), c + e * d)
        return np.where(d <= 0, 0.0, t)

    def _seek1(self, d: int) -> float:
        if d <= 0:
            return 0.0
        a, b, x0, c, e = self.seek_params
        return a + b * math.sqrt(d) if d < x0 else c + e * d

    def random_access_time(self) -> float:
        """Average positioning time of a random request (overhead, seek, half a turn)."""
        return self.p.overhead_ms / 1e3 + self.p.average_seek_ms / 1e3 + self.rev / 2

    def _where(self, addr: int) -> Tuple[int, int, float]:
        """Scalar :meth:`geometry`: cylinder, surface, media rate of one address."""
        h = self.p.heads
        disc = max(self.t_outer ** 2 - 2.0 * self.k * addr / h, 0.0)
        c = int((self.t_outer - math.sqrt(disc)) / self.k) if self.k else \
            int(addr // (h * self.t_outer))
        c = min(max(c, 0), self.p.cylinders - 1)
        while c + 1 < self.p.cylinders and self._cum(c + 1) <= addr:
            c += 1
        while c > 0 and self._cum(c) > addr:
            c -= 1
        base = self._cum(c)
        track = (self._cum(c + 1) - base) / h
        return c, int((addr - base) // track), track * self.rps

    def _locate(self, addr: int) -> Tuple[int, int, float]:
        """Cylinder, surface and angle of one address."""
        h = self.p.heads
        c, surface, _ = self._where(addr)
        base = self._cum(c)
        track = (self._cum(c + 1) - base) / h
        return c, surface, ((addr - base) - surface * track) / track

    # -- replay
    def simulate(self, ios: Sequence[IO], layout: Optional[Layout] = None, qd: int = 1,
                 addresses: Optional[np.ndarray] = None, detail: bool = False):
        """Seconds to serve ``ios`` with up to ``qd`` of them outstanding.

        The requests are issued in trace order; the drive holds at most
        ``min(qd, ncq_depth)`` and serves, each time it is free, the one it can
        reach soonest (buffer hit, streaming through a short forward hop, or
        command overhead + seek + rotational wait).  With ``qd=1`` that is
        plain trace order.  ``detail=True`` returns a dict with the time split
        (transfer, positioning) and the count of seeks, streamed requests and
        buffer hits.
        """
        p = self.p
        n = len(ios)
        if addresses is None:
            addresses = layout.addresses(ios) if layout is not None else \
                np.array([io.offset for io in ios], dtype=np.int64)
        lengths = np.array([io.length for io in ios], dtype=np.int64)
        if n == 0:
            return {"seconds": 0.0, "transfer": 0.0, "positioning": 0.0, "seeks": 0,
                    "streamed": 0, "hits": 0, "requests": 0} if detail else 0.0
        if int((addresses + lengths).max()) > self.capacity:
            raise ValueError(f"request past the end of the modelled disk ({self.capacity} bytes)")
        cyl, surf, ang, rate = self.geometry(addresses)
        addr_l, len_l = addresses.tolist(), lengths.tolist()
        cyl_l, surf_l, ang_l, rate_l = cyl.tolist(), surf.tolist(), ang.tolist(), rate.tolist()
        depth = max(1, min(int(qd), p.ncq_depth))
        overhead = p.overhead_ms / 1e3
        head_switch = p.head_switch_ms / 1e3
        rps, window = self.rps, p.readahead
        hit_rate = p.interface_rate
        cache = _SegmentCache(p.cache_segments, p.cache_bytes)
        # state: time, streaming position, arm cylinder/surface, media rate there
        t = 0.0
        pos, cur_c, cur_s, cur_rate = -1, 0, 0, rate_l[0]
        queue: List[int] = []
        nxt = 0
        t_transfer = t_position = 0.0
        hits = seeks = streams = 0
        seek1 = self._seek1
        while nxt < n or queue:
            while len(queue) < depth and nxt < n:
                queue.append(nxt)
                nxt += 1
            best, best_cost, best_kind, best_from = -1, math.inf, 0, 0
            for i in queue:
                a = addr_l[i]
                end = a + len_l[i]
                have = cache.end_covering(a)
                if have >= end:
                    best, best_cost, best_kind, best_from = i, 0.0, 1, a
                    break
                # the part already in the buffer is not read again
                start = have if have > a else a
                cost, kind = math.inf, 0
                gap = start - pos
                if pos >= 0 and 0 <= gap <= window:
                    cost, kind = gap / cur_rate, 2                  # streamed through
                if start == a:
                    c, sf, an = cyl_l[i], surf_l[i], ang_l[i]
                else:
                    c, sf, an = self._locate(start)
                d = c - cur_c
                if d:
                    mech = overhead + seek1(d if d > 0 else -d)
                else:
                    mech = overhead + (head_switch if sf != cur_s else 0.0)
                wait = ((an - (t + mech) * rps) % 1.0) / rps
                if mech + wait < cost:
                    cost, kind = mech + wait, 3
                if cost < best_cost:
                    best, best_cost, best_kind, best_from = i, cost, kind, start
            queue.remove(best)
            a, ln = addr_l[best], len_l[best]
            if best_kind == 1:
                xfer = ln / hit_rate
                hits += 1
            else:
                # media transfer of the new bytes; the buffered prefix at interface speed
                xfer = (a + ln - best_from) / rate_l[best] + (best_from - a) / hit_rate
                if best_kind == 2:
                    streams += 1
                    cache.add(pos, a + ln)
                else:
                    seeks += 1
                    cache.add(best_from, a + ln)
                pos = a + ln
                cur_c, cur_s, cur_rate = self._where(min(pos, self.capacity - 1))
            t += best_cost + xfer
            if self.debug is not None:
                self.debug.append((best, best_kind, best_cost, xfer, best_from))
            t_position += best_cost
            t_transfer += xfer
        if detail:
            return {"seconds": t, "transfer": t_transfer, "positioning": t_position,
                    "seeks": seeks, "streamed": streams, "hits": hits, "requests": n}
        return t

    def floor(self, bytes_by_address: Dict[int, int]) -> float:
        """Sequential transfer of ``bytes`` at each start address's zone rate (no seeks)."""
        return sum(b / self.rate_at(a) for a, b in bytes_by_address.items() if b > 0)


class _SegmentCache:
    """The drive's read buffer: the last ``n`` ranges read from the media, at most
    ``limit`` bytes in all (the oldest data goes first); a range that goes on
    where the newest one ends extends it."""

    def __init__(self, n: int, limit: int):
        self.n, self.limit = n, limit
        self.segs: List[List[int]] = []        # [start, end), oldest first
        self.total = 0

    def end_covering(self, a: int) -> int:
        """End of the buffered range holding byte ``a`` (-1 if none does)."""
        end = -1
        for s, e in self.segs:
            if s <= a < e and e > end:
                end = e
        return end

    def add(self, a: int, b: int) -> None:
        if self.n <= 0 or self.limit <= 0 or b <= a:
            return
        if self.segs and self.segs[-1][1] == a:
            self.segs[-1][1] = b                # the stream goes on
        else:
            self.segs.append([a, b])
            if len(self.segs) > self.n:
                s, e = self.segs.pop(0)
                self.total -= e - s
        self.total += b - a
        while self.total > self.limit:
            first = self.segs[0]
            cut = min(first[1] - first[0], self.total - self.limit)
            first[0] += cut
            self.total -= cut
            if first[0] >= first[1]:
                self.segs.pop(0)


def fit_seek_curve(t2t: float, avg: float, full: float, max_distance: int):
    """Ruemmler & Wilkes seek curve fitted to a datasheet's three figures.

    ``seek(d) = a + b*sqrt(d)`` below the knee ``x0`` and ``c + e*d`` above it,
    joined with equal value and slope; ``seek(1) = t2t``, ``seek(max) = full``,
    and the knee is placed so that the mean over all seek distances, weighted
    as the datasheets define their average (``(max + 1 - n)`` seeks of length
    ``n``), equals ``avg``.  Returns ``(a, b, x0, c, e)`` in seconds.
    """
    D = float(max_distance)
    d = np.linspace(1.0, D, 20001)
    w = D + 1.0 - d

    def build(x0):
        s0 = math.sqrt(x0)
        b = (full - t2t) / (s0 / 2.0 - 1.0 + D / (2.0 * s0))
        a = t2t - b
        e = b / (2.0 * s0)
        c = a + b * s0 - e * x0
        return a, b, x0, c, e

    def mean(params):
        a, b, x0, c, e = params
        t = np.where(d < x0, a + b * np.sqrt(d), c + e * d)
        return float((t * w).sum() / w.sum())

    lo, hi = 0.0, math.log(D)
    if avg <= mean(build(1.0)):
        return build(1.0)
    if avg >= mean(build(D)):
        return build(D)
    for _ in range(100):
        mid = (lo + hi) / 2
        if mean(build(math.exp(mid))) < avg:
            lo = mid
        else:
            hi = mid
    return build(math.exp((lo + hi) / 2))
