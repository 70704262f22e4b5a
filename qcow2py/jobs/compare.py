"""Compare the guest content of two nodes, as ``qemu-img compare`` does.

The walk is guided by ``block_status``: ranges both sides report as zeros are
skipped without reading; everything else is read in large chunks (at most
:data:`CHUNK` bytes per side) and compared by numpy as 8-byte words, which
also locates the first differing byte.  Offsets are reported as qemu-img reports
them: the start of the first 512-byte sector that differs.

When the sizes differ the common part is compared first; then the tail of the
larger node must read as zeros (qemu-img's "Warning: Image size mismatch!").
``strict`` also compares allocation (qemu-img's block status flags) and refuses
different sizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

from ..lazyimport import numpy as np

from ..opener import open as open_image
from ..node import BlockKind, Extent, Node

SECTOR = 512
CHUNK = 4 << 20          #: bytes read per side per step
WINDOW = 1 << 30         #: guest bytes asked of block_status at once

# qemu-img's block status flags (include/block/block.h), compared in strict mode
_DATA, _ZERO, _OFFSET_VALID, _ALLOCATED, _EOF = 0x1, 0x2, 0x4, 0x8, 0x20


@dataclass(frozen=True)
class CompareResult:
    """What :func:`compare` found.

    ``identical`` is qemu-img's exit status 0.  Otherwise ``offset`` is the
    first mismatch and ``reason`` says which: ``"content"``, ``"status"``
    (strict: allocation differs), ``"tail"`` (the larger node's tail is not
    zero) or ``"size"`` (strict: sizes differ; offset None).  ``size_mismatch`` is set whenever the sizes differ (qemu-img then
    warns, and compares the larger node's tail with zeros).
    """

    identical: bool
    offset: Optional[int] = None
    reason: Optional[str] = None
    size_mismatch: bool = False

    def messages(self) -> List[str]:
        """The lines ``qemu-img compare`` prints for this result."""
        if self.reason == "size":
            return ["Strict mode: Image size mismatch!"]
        if self.reason == "status":
            return [f"Strict mode: Offset {self.offset} block status mismatch!"]
        out = []
        if self.size_mismatch and (self.identical or self.reason == "tail"):
            out.append("Warning: Image size mismatch!")
        if self.identical:
            out.append("Images are identical.")
        else:
            out.append(f"Content mismatch at offset {self.offset}!")
        return out


def status_flags(e: Extent) -> int:
    """qemu-img's block-status flags of an extent (what ``compare -s`` compares)."""
    if e.kind == BlockKind.UNALLOCATED:
        # an unallocated subcluster of an allocated cluster keeps its host offset
        return _ZERO | (_OFFSET_VALID if e.host_offset is not None else 0)
    flags = _ALLOCATED
    if e.kind == BlockKind.ZERO:
        flags |= _ZERO
    else:
        flags |= _DATA
        if e.known_zero:
            flags |= _ZERO
    if e.kind != BlockKind.COMPRESSED and e.host_offset is not None:
        flags |= _OFFSET_VALID
    return flags


def _slice(node: Node, depth: int) -> Optional[int]:
    """Guest bytes one block-status answer of QEMU covers at most (one L2 table of
    each qcow2 layer down to ``depth``); None when unbounded (raw)."""
    out = None
    img = node
    for _ in range(depth + 1):
        if img is None:
            break
        cs = getattr(img, "cluster_size", None)
        if cs and getattr(img, "format", "") == "qcow2":
            per = cs // (16 if getattr(img, "extended_l2", False) else 8)
            out = per * cs if out is None else min(out, per * cs)
        img = getattr(img, "backing", None)
    return out


def _strict_flags(node: Node, e: Extent, start: int) -> int:
    """:func:`status_flags` plus QEMU's EOF flag, which ``compare -s`` also compares:
    set when the answer for ``start`` reaches the end of the image."""
    flags = status_flags(e)
    if e.end == node.size:
        sl = _slice(node, e.depth)
        if sl is None or start // sl == (node.size - 1) // sl:
            flags |= _EOF
    return flags


def _extents(node: Node, start: int, end: int) -> Iterator[Extent]:
    pos = start
    while pos < end:
        n = min(WINDOW, end - pos)
        got = node.block_status(pos, n)
        if not got:
            return
        yield from got
        pos = got[-1].end


def _paired(a: Node, b: Node, end: int) -> Iterator[Tuple[int, int, Extent, Extent]]:
    """``(start, stop, extent_a, extent_b)`` over ``[0, end)``, split where either changes."""
    ia, ib = _extents(a, 0, end), _extents(b, 0, end)
    ea, eb = next(ia, None), next(ib, None)
    pos = 0
    while pos < end and ea is not None and eb is not None:
        stop = min(ea.end, eb.end)
        yield pos, stop, ea, eb
        pos = stop
        if ea.end == pos:
            ea = next(ia, None)
        if eb.end == pos:
            eb = next(ib, None)


def _split(segments, slices: List[int]):
    """Split segments at the boundaries of QEMU's block-status answers (strict mode:
    where the EOF flag may start to differ)."""
    if not slices:
        yield from segments
        return
    step = min(slices)
    for start, stop, ea, eb in segments:
        pos = start
        while pos < stop:
            nxt = min(stop, (pos // step + 1) * step)
            yield pos, nxt, ea, eb
            pos = nxt


def _first_diff(x: memoryview, y: memoryview) -> int:
    """Index of the first differing byte of two equal-length buffers, or -1."""
    n8 = len(x) // 8 * 8          # compare 8-byte words first (memoryview == is slow)
    wx = np.frombuffer(x[:n8], dtype=np.uint64)
    wy = np.frombuffer(y[:n8], dtype=np.uint64)
    if np.array_equal(wx, wy) and bytes(x[n8:]) == bytes(y[n8:]):
        return -1
    ax, ay = np.frombuffer(x, dtype=np.uint8), np.frombuffer(y, dtype=np.uint8)
    return int(np.flatnonzero(ax != ay)[0])


class _Reader:
    """Reads ranges of two nodes into reused buffers, chunk by chunk."""

    def __init__(self, a: Node, b: Optional[Node]) -> None:
        self.a, self.b = a, b
        self.buf_a, self.buf_b = bytearray(CHUNK), bytearray(CHUNK)

    def first_diff(self, start: int, stop: int) -> int:
        """First differing byte in ``[start, stop)`` (b None: first non-zero of a), or -1."""
        zeros = memoryview(bytes(min(CHUNK, stop - start))) if self.b is None else None
        for pos in range(start, stop, CHUNK):
            n = min(CHUNK, stop - pos)
            ma = memoryview(self.buf_a)[:n]
            self.a.read_into(ma, pos)
            if self.b is None:
                mb = zeros[:n]
            else:
                mb = memoryview(self.buf_b)[:n]
                self.b.read_into(mb, pos)
            d = _first_diff(ma, mb)
            if d >= 0:
                return pos + d
        return -1


def _sector(offset: int) -> int:
    return offset // SECTOR * SECTOR


def compare_nodes(a: Node, b: Node, *, strict: bool = False) -> CompareResult:
    """Compare two open nodes (see the module docstring)."""
    mismatch = a.size != b.size
    if strict and mismatch:
        return CompareResult(False, None, "size", True)
    common = min(a.size, b.size)
    reader = _Reader(a, b)
    pending: Optional[Tuple[int, int]] = None     # a range still to read, merged
    segments = _paired(a, b, common)
    if strict:
        segments = _split(segments, [x for x in (_slice(a, 64), _slice(b, 64)) if x])
    for start, stop, ea, eb in segments:
        if strict and _strict_flags(a, ea, start) != _strict_flags(b, eb, start):
            if pending is not None:
                d = reader.first_diff(*pending)
                if d >= 0:
                    return CompareResult(False, _sector(d), "content", mismatch)
            return CompareResult(False, start, "status", mismatch)
        if ea.zero and eb.zero:
            continue
        if pending is not None and pending[1] == start and stop - pending[0] <= CHUNK:
            pending = (pending[0], stop)
            continue
        if pending is not None:
            d = reader.first_diff(*pending)
            if d >= 0:
                return CompareResult(False, _sector(d), "content", mismatch)
        pending = (start, stop)
    if pending is not None:
        d = reader.first_diff(*pending)
        if d >= 0:
            return CompareResult(False, _sector(d), "content", mismatch)
    if mismatch:
        big = a if a.size > b.size else b
        tail = _Reader(big, None)
        for e in _extents(big, common, big.size):
            if e.present and not e.zero:
                d = tail.first_diff(e.offset, e.end)
                if d >= 0:
                    return CompareResult(False, _sector(d), "tail", True)
    return CompareResult(True, None, None, mismatch)


PathOrNode = Union[str, "os.PathLike[str]", Node]


def compare(a: PathOrNode, b: PathOrNode, *, strict: bool = False,
            format_a: Optional[str] = None, format_b: Optional[str] = None) -> CompareResult:
    """``qemu-img compare [-s]`` of two images (paths, opened read-only) or open nodes."""
    opened: List[Node] = []

    def node(x: PathOrNode, fmt: Optional[str]) -> Node:
        if isinstance(x, Node):
            return x
        opened.append(open_image(x, format=fmt))
        return opened[-1]

    try:
        return compare_nodes(node(a, format_a), node(b, format_b), strict=strict)
    finally:
        for n in opened:
            n.close()
