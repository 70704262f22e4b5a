"""Copy plans: what every guest range of a chain holds, as numpy arrays.

A plan is built from metadata alone (no data is read): each layer of the
source chain describes a guest window as coalesced runs, and the runs of all
layers are resolved at once with interval arithmetic — the first layer that
allocates a segment decides it, a layer shorter than the window reads as
zeros past its end, and with a ``base`` (``-B``) the layers below the
topmost ``depth`` ones are not consulted (their ranges are ``BACKING``).

Everything is vectorised: the cost is a few numpy passes per window, not a
Python step per cluster, so a fragmented image plans as fast as a tidy one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from ...lazyimport import numpy as np

from ... import native
from ...image import Image
from ...native import COMPRESSED, DATA, ZERO, ZERO_ALLOC
from ...qcow2.bitmaps import little_endian_bits
from ...qcow2.read import Qcow2Image

# plan kinds
P_DATA = 1          # copy bytes from (layer, host)
P_ZERO = 2          # reads as zeros
P_COMPRESSED = 3    # decompress the cluster at (layer, host=coff, csize), take [within:]
P_BACKING = 4       # left to the target's backing file (-B)

KIND_NAMES = {P_DATA: "data", P_ZERO: "zero", P_COMPRESSED: "compressed", P_BACKING: "backing"}


@dataclass
class Plan:
    """Parallel arrays, one entry per extent, in guest order."""

    guest: np.ndarray       # int64 guest offset
    length: np.ndarray      # int64 bytes
    kind: np.ndarray        # uint8 P_*
    layer: np.ndarray       # int16 index into the chain (top = 0), -1 for zeros
    host: np.ndarray        # int64 host offset in that layer's data file (or compressed offset)
    csize: np.ndarray       # int64 compressed stream length (compressed extents only)

    def __len__(self) -> int:
        return int(self.guest.size)

    @classmethod
    def concat(cls, plans: Sequence["Plan"]) -> "Plan":
        if not plans:
            return empty_plan()
        return cls(*(np.concatenate([getattr(p, f) for p in plans]) for f in
                     ("guest", "length", "kind", "layer", "host", "csize")))

    def select(self, mask: np.ndarray) -> "Plan":
        return Plan(self.guest[mask], self.length[mask], self.kind[mask], self.layer[mask],
                    self.host[mask], self.csize[mask])

    def bytes_of(self, kind: int) -> int:
        return int(self.length[self.kind == kind].sum())


def empty_plan() -> Plan:
    z = np.zeros(0, dtype=np.int64)
    return Plan(z, z, np.zeros(0, np.uint8), np.zeros(0, np.int16), z, z)


def layer_arrays(img: Image, start: int, end: int):
    """One layer's runs over ``[start, end)`` (clipped to its size) as arrays.

    Returns ``(starts, lengths, kinds, hosts, csizes)`` with the qcow2 unit
    kinds of :mod:`qcow2py.native` (raw files: DATA, or ZERO for holes).
    """
    end = min(end, img.size)
    if end <= start:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.uint8), z, z
    if isinstance(img, Qcow2Image):
        s, n, k, h, c = img.run_arrays(start, end - start)
        return s, n, k, h, (c if c is not None else np.zeros(s.size, np.int64))
    runs = img.storage.allocation(start, end - start)
    s = np.array([r[0] for r in runs], dtype=np.int64)
    n = np.array([r[1] for r in runs], dtype=np.int64)
    k = np.array([DATA if r[2] else ZERO for r in runs], dtype=np.uint8)
    return s, n, k, s.copy(), np.zeros(s.size, np.int64)


def plan_window(chain: List[Image], start: int, end: int,
                depth: Optional[int] = None, cluster_bits: Optional[List[int]] = None) -> Plan:
    """Resolve ``[start, end)`` over ``chain`` (top first) into a plan.

    ``depth``: only the top ``depth`` layers are copied; what none of them
    allocates becomes ``P_BACKING`` (for ``-B``).  Without it, ranges that no
    layer allocates read as zeros.
    """
    layers = chain if depth is None else chain[:depth]
    per = [layer_arrays(img, start, end) for img in layers]
    bounds = [np.array([start, end], dtype=np.int64)]
    for img, (s, n, _, _, _) in zip(layers, per):
        bounds.append(s)
        bounds.append(s + n)
        if start < img.size < end:
            bounds.append(np.array([img.size], dtype=np.int64))
    b = np.unique(np.concatenate(bounds))
    b = b[(b >= start) & (b <= end)]
    seg = b[:-1]
    seg_len = np.diff(b)
    nseg = seg.size
    kind = np.full(nseg, P_ZERO if depth is None else P_BACKING, dtype=np.uint8)
    layer = np.full(nseg, -1, dtype=np.int16)
    host = np.zeros(nseg, dtype=np.int64)
    csize = np.zeros(nseg, dtype=np.int64)
    undecided = np.ones(nseg, dtype=bool)
    for li, (img, (s, n, k, h, c)) in enumerate(zip(layers, per)):
        if not undecided.any():
            break
        # past this layer's end everything reads as zeros, and lower layers are not asked
        past = undecided & (seg >= img.size)
        kind[past] = P_ZERO
        undecided &= ~past
        if s.size == 0:
            continue
        i = np.searchsorted(s, seg, side="right") - 1
        i = np.clip(i, 0, s.size - 1)
        inside = undecided & (seg >= s[i]) & (seg < s[i] + n[i])
        ki = k[i]
        decided = inside & ((ki == DATA) | (ki == ZERO) | (ki == ZERO_ALLOC) | (ki == COMPRESSED))
        if not decided.any():
            continue
        d_data = decided & (ki == DATA)
        d_zero = decided & ((ki == ZERO) | (ki == ZERO_ALLOC))
        d_comp = decided & (ki == COMPRESSED)
        kind[d_data] = P_DATA
        kind[d_zero] = P_ZERO
        kind[d_comp] = P_COMPRESSED
        layer[d_data | d_comp] = li
        host[d_data] = h[i[d_data]] + (seg[d_data] - s[i[d_data]])
        host[d_comp] = h[i[d_comp]]
        csize[d_comp] = c[i[d_comp]]
        undecided &= ~decided
    plan = Plan(seg, seg_len, kind, layer, host, csize)
    return coalesce(plan)


def coalesce(plan: Plan) -> Plan:
    """Merge neighbours with the same kind and layer whose host ranges continue."""
    n = len(plan)
    if n < 2:
        return plan
    k, l, h, g, ln = plan.kind, plan.layer, plan.host, plan.guest, plan.length
    same = (k[1:] == k[:-1]) & (l[1:] == l[:-1]) & (g[1:] == g[:-1] + ln[:-1])
    positional = k[1:] == P_DATA
    contiguous = np.where(positional, h[1:] == h[:-1] + ln[:-1], True)
    merge = same & contiguous & (k[1:] != P_COMPRESSED)
    first = np.flatnonzero(np.r_[True, ~merge])
    ends = np.r_[first[1:], n]
    lengths = np.add.reduceat(ln, first) if first.size else ln
    return Plan(g[first], lengths, k[first], l[first], h[first], plan.csize[first])


def plan_copy(chain: List[Image], start: int = 0, end: Optional[int] = None,
              depth: Optional[int] = None, window: int = 1 << 30) -> Plan:
    """The whole plan of ``[start, end)``, built window by window."""
    end = chain[0].size if end is None else end
    parts = []
    for a in range(start, end, window):
        parts.append(plan_window(chain, a, min(end, a + window), depth))
    return coalesce(Plan.concat(parts))


def mask_plan(plan: Plan, bitmap, granularity: int) -> Plan:
    """Keep only the parts of the plan under dirty bits (in C: one pass over the bits)."""
    bits = little_endian_bits(bitmap)
    g, n, i = native.bitmap_mask_extents(plan.guest, plan.length, bits, granularity)
    if not g.size:
        return empty_plan()
    delta = g - plan.guest[i]
    host = np.where(plan.kind[i] == P_DATA, plan.host[i] + delta, plan.host[i])
    return Plan(g, n, plan.kind[i], plan.layer[i], host, plan.csize[i])


def clip_plan(p: Plan, start: int, end: int) -> Plan:
    """The part of a guest-ordered plan inside ``[start, end)``."""
    if not len(p):
        return p
    g0 = np.maximum(p.guest, start)
    g1 = np.minimum(p.guest + p.length, end)
    delta = g0 - p.guest
    host = np.where(p.kind == P_DATA, p.host + delta, p.host)
    return Plan(g0, g1 - g0, p.kind, p.layer, host, p.csize)


def split_extents(p: Plan, dst: np.ndarray, limit: int):
    """Data extents longer than ``limit`` cut into pieces of at most ``limit`` bytes
    (other kinds are kept whole); returns the plan and the pieces' target offsets."""
    n_pieces = np.where(p.kind == P_DATA, -(-p.length // limit), 1)
    idx = np.repeat(np.arange(len(p)), n_pieces)
    within = (np.arange(idx.size) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)) * limit
    q = p.select(idx)
    is_data = q.kind == P_DATA
    length = np.where(is_data, np.minimum(q.length - within, limit), q.length)
    host = np.where(is_data, q.host + within, q.host)
    return Plan(q.guest + within, length, q.kind, q.layer, host, q.csize), dst[idx] + within


def clusters_of(guest: np.ndarray, length: np.ndarray, cb: int) -> np.ndarray:
    """Sorted unique cluster indexes touched by the extents."""
    if not guest.size:
        return np.zeros(0, dtype=np.int64)
    first = guest >> cb
    last = (guest + length - 1) >> cb
    span = last - first + 1
    total = int(span.sum())
    idx = np.repeat(first - np.cumsum(span) + span, span) + np.arange(total, dtype=np.int64)
    return np.unique(idx)
