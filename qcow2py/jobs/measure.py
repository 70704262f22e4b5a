"""How big a new image would be (``qemu-img measure``).

``fully_allocated`` is a qcow2 file holding every cluster of the virtual disk:
header, L2 tables, L1 table, the refcount structure counting all of them
(found as a fixed point: refcount blocks count themselves), plus the data.
``required`` keeps that metadata estimate (a conservative upper bound, as
QEMU's) but counts data only for target clusters the source stores data in;
without a source, no data (or all of it with preallocation=falloc/full).
``bitmaps`` (qcow2 v3 targets of a v3 qcow2 source) is the room its persistent
bitmaps would take: data clusters, bitmap tables and the directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

from ..lazyimport import numpy as np

from ..errors import Qcow2Error
from ..format.header import MAX_L1_BYTES
from ..opener import open as open_image
from ..node import BlockKind, Node

L1E, REFTABLE_ENTRY, BITMAP_TABLE_ENTRY, BITMAP_DIR_ENTRY = 8, 8, 8, 24


class MeasureError(Qcow2Error, ValueError):
    """Bad measure options (no size and no source, both, an invalid cluster size...)."""


@dataclass(frozen=True)
class MeasureResult:
    required: int
    fully_allocated: int
    bitmaps: Optional[int] = None     #: None: qemu-img prints no bitmaps line

    def to_json_dict(self) -> dict:
        out = {}
        if self.bitmaps is not None:
            out["bitmaps"] = self.bitmaps
        out["required"] = self.required
        out["fully-allocated"] = self.fully_allocated
        return out

    def human(self) -> str:
        text = f"required size: {self.required}\nfully allocated size: {self.fully_allocated}\n"
        if self.bitmaps is not None:
            text += f"bitmaps size: {self.bitmaps}\n"
        return text


def _up(n: int, m: int) -> int:
    return -(-n // m) * m


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_bits: int) -> int:
    """Bytes of refcount table and blocks needed to count ``clusters`` clusters and
    themselves (iterated to the fixed point)."""
    per_block = cluster_size * 8 // refcount_bits
    per_table_cluster = cluster_size // REFTABLE_ENTRY
    blocks = table = 0
    n, last = clusters, -1
    while n != last:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
    return (blocks + table) * cluster_size


def prealloc_size(size: int, cluster_size: int, refcount_bits: int, extended_l2: bool) -> int:
    """File size of a fully allocated qcow2 image of virtual ``size`` bytes."""
    aligned = _up(size, cluster_size)
    l2e = 16 if extended_l2 else 8
    meta = cluster_size                                   # header
    nl2e = _up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e                                    # L2 tables
    nl1e = _up(nl2e * l2e // cluster_size, cluster_size // L1E)
    meta += nl1e * L1E                                    # L1 table
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                   refcount_bits)
    return meta + aligned


def data_clusters(node: Node, cluster_size: int) -> int:
    """Target clusters holding at least one stored (non-zero) byte of ``node``."""
    starts, ends = [], []
    window = 1 << 30
    for a in range(0, node.size, window):
        for e in node.block_status(a, min(window, node.size - a)):
            if e.kind in (BlockKind.DATA, BlockKind.COMPRESSED) and not e.known_zero:
                starts.append(e.offset // cluster_size)
                ends.append(-(-e.end // cluster_size))
    if not starts:
        return 0
    s, e = np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)
    # ranges are in guest order: a range starting inside the previous one's last cluster
    # must not count that cluster twice
    prev_end = np.maximum.accumulate(np.r_[0, e[:-1]])
    return int(np.maximum(0, e - np.maximum(s, prev_end)).sum())


def bitmaps_size(node: Node, cluster_size: int) -> int:
    """Room the persistent bitmaps of ``node`` take in a target of ``cluster_size``."""
    total, directory = 0, 0
    for bm in getattr(node, "bitmaps", []) or []:
        nbytes = -(-(-(-node.size // bm.granularity)) // 8)
        clusters = -(-nbytes // cluster_size)
        total += clusters * cluster_size + _up(clusters * BITMAP_TABLE_ENTRY, cluster_size)
        directory += _up(BITMAP_DIR_ENTRY + len(bm.name.encode()), 8)
    return total + _up(directory, cluster_size)


def measure(size: Optional[int] = None, source: Union[None, str, "os.PathLike[str]", Node] = None,
            *, format: str = "qcow2", source_format: Optional[str] = None,
            cluster_size: int = 65536, refcount_bits: int = 16, extended_l2: bool = False,
            compat: str = "1.1", preallocation: str = "off", force_share: bool = False,
            **ignored) -> MeasureResult:
    """``qemu-img measure``: the size of a new ``format`` image of ``size`` bytes, or
    holding a copy of ``source`` (a path or an open node).  Other create options
    (``lazy_refcounts``, ``backing_file``, ``data_file``...) do not change it."""
    if (size is None) == (source is None):
        raise MeasureError("Either --size N or one filename must be specified." if size is None
                           else "--size N cannot be used together with a filename.")
    if format not in ("qcow2", "raw"):
        raise MeasureError(f"unknown output format {format!r} (qcow2 or raw)")
    if cluster_size < 512 or cluster_size > 2 << 20 or cluster_size & (cluster_size - 1):
        raise MeasureError("Cluster size must be a power of two between 512 and 2048k")
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise MeasureError("Refcount width must be a power of two and may not exceed 64 bits")
    if preallocation not in ("off", "metadata", "falloc", "full"):
        raise MeasureError(f"Invalid parameter '{preallocation}'")
    node, opened = source, None
    if source is not None and not isinstance(source, Node):
        node = opened = open_image(source, format=source_format, force_share=force_share)
    try:
        vsize = node.size if node is not None else int(size)
        if format == "raw":
            return MeasureResult(vsize, vsize)
        if preallocation in ("falloc", "full"):
            data = _up(vsize, cluster_size)
        elif node is not None:
            data = data_clusters(node, cluster_size) * cluster_size
        else:
            data = 0
        per_l2 = cluster_size // (16 if extended_l2 else 8)
        if -(-vsize // (cluster_size * per_l2)) * L1E > MAX_L1_BYTES:
            raise MeasureError("The image size is too large (try using a larger cluster size)")
        full = prealloc_size(vsize, cluster_size, refcount_bits, extended_l2)
        required = full - _up(vsize, cluster_size) + data
        bitmaps = None
        if (node is not None and compat not in ("0.10", "v2")
                and getattr(node, "format", None) == "qcow2"
                and getattr(getattr(node, "header", None), "version", 0) >= 3):
            bitmaps = bitmaps_size(node, cluster_size)
        return MeasureResult(required, full, bitmaps)
    finally:
        if opened is not None:
            opened.close()
