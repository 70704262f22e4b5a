"""Step 2 of a copy: the order in which the data extents are read.

"guest" is QEMU's order; "host" sorts by (file, host offset), so each file is
read front to back whatever the guest layout; "auto" takes host order when
enough of the extents are out of order.  A plan too big to sort at once is
sorted window by window (one jump back per window).
"""

from __future__ import annotations

from ...lazyimport import numpy as np

from .plan import Plan

ORDERS = ("host", "guest", "auto")


def backward_seeks(files: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> int:
    """Reads, in the given order, that start before the previous read of the same file ended."""
    count = 0
    for f in np.unique(files).tolist():
        sel = files == f
        o, n = offsets[sel], lengths[sel]
        if o.size > 1:
            count += int(np.count_nonzero(o[1:] < o[:-1] + n[:-1]))
    return count


def choose_order(data: Plan, order: str, auto_threshold: float) -> str:
    """``order``, or for "auto" host order when more than ``auto_threshold`` of the
    stored extents (guest order) start before the previous one in the same file."""
    if order != "auto":
        return order
    if len(data) < 2:
        return "guest"
    same = data.layer[1:] == data.layer[:-1]
    out_of_order = same & (data.host[1:] < data.host[:-1])
    return "host" if out_of_order.mean() > auto_threshold else "guest"


def order_extents(data: Plan, order: str, window_extents: int = 0) -> Plan:
    """The extents in read order; ``window_extents`` > 0 sorts inside windows of that
    many extents (guest space), to bound the sort's memory."""
    if order == "guest":
        return data
    if window_extents:
        w = window_extents
        idx = np.concatenate([
            a + np.lexsort((data.host[a:a + w], data.layer[a:a + w]))
            for a in range(0, len(data), w)])
    else:
        idx = np.lexsort((data.host, data.layer))
    return data.select(idx)
