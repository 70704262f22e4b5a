"""Commit an overlay into its base (``qemu-img commit``).

Order of work, chosen so that a crash at any instant is harmless:

1. plan from the overlay's ``block_status``: every range some layer above the
   base decides (data, compressed or zero);
2. copy the data ranges into the base *in host order of the layers they are
   read from* (sorted by host file and offset, read in runs of up to
   :data:`RUN` bytes), then zero the zero ranges; the base's own write path
   keeps its metadata crash-ordered;
3. flush the base: from now on it holds the committed content durably;
4. only then empty the overlay (unless ``drop``): its clusters become
   unallocated and are freed through the overlay's crash-ordered flush.

Interrupted before 3, the base reads old or new data per cluster and the
overlay still reads its own data (it was not touched); interrupted during 4,
any overlay cluster reads either its own data or the base's, which is the
same.  The chain above the overlay therefore keeps reading what it read.

With ``base`` an image deeper than the overlay's backing file, every layer
above it is committed and nothing is emptied (qemu-img: ``-b`` implies ``-d``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

from ..lazyimport import numpy as np

from ..errors import Qcow2Error
from ..image import Image
from ..opener import open as open_image
from ..node import BlockKind, Extent

RUN = 4 << 20          #: bytes read and written per request
PathLike = Union[str, "os.PathLike[str]"]


class CommitError(Qcow2Error):
    """The commit cannot be done (no backing file, base not in the chain, ...)."""


@dataclass
class CommitStats:
    bytes_copied: int = 0        #: data bytes read from the overlay side and written
    bytes_zeroed: int = 0        #: bytes made zero in the base
    clusters_emptied: int = 0    #: overlay clusters made unallocated
    read_requests: int = 0


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def find_layer(top: Image, base: PathLike) -> int:
    """Depth of ``base`` in ``top``'s chain (1 = its backing file)."""
    want = os.fspath(base)
    for depth, layer in enumerate(top.chain()):
        if depth and (layer.filename == want or _same_file(layer.storage.name, want)):
            return depth
    raise CommitError(f"Did not find '{want}' in the backing chain of '{top.filename}'")


def plan_commit(top: Image, depth: int) -> Tuple[List[Extent], List[Extent]]:
    """(data extents in host order, zero extents in guest order) decided above ``depth``."""
    data: List[Extent] = []
    zeros: List[Extent] = []
    window = 1 << 30
    for a in range(0, top.size, window):
        for e in top.block_status(a, min(window, top.size - a)):
            if e.kind == BlockKind.UNALLOCATED or e.depth >= depth:
                continue
            (zeros if e.kind == BlockKind.ZERO or e.known_zero else data).append(e)
    data.sort(key=lambda e: (e.depth, e.host_file or "", -1 if e.host_offset is None
                             else e.host_offset, e.offset))
    return data, zeros


def _runs(data: List[Extent]) -> List[Tuple[int, int]]:
    """Guest ranges to read, each at most RUN bytes, in the order of ``data``; extents
    that continue each other in guest *and* host space are read together."""
    out: List[Tuple[int, int]] = []
    for e in data:
        pos = e.offset
        if out and out[-1][0] + out[-1][1] == pos and e.kind == BlockKind.DATA:
            take = min(RUN - out[-1][1], e.length)
            if take > 0:
                out[-1] = (out[-1][0], out[-1][1] + take)
                pos += take
        while pos < e.end:
            n = min(RUN, e.end - pos)
            out.append((pos, n))
            pos += n
    return out


def _grow_base(base: Image, size: int) -> None:
    """QEMU grows a smaller base to the overlay's size before committing."""
    if base.size >= size:
        return
    if base.format == "raw":
        base.storage.truncate(size)
        base.size = size
        return
    resize = getattr(base, "resize", None)
    if resize is None:
        raise CommitError(f"base '{base.filename}' ({base.size} bytes) is smaller than the "
                          f"image committed into it ({size} bytes) and cannot be resized")
    resize(size)


def commit(top: PathLike, *, base: Optional[PathLike] = None, drop: bool = False,
           progress: Optional[Callable[[int, int], None]] = None,
           format: Optional[str] = None,
           storage_wrapper: Optional[Callable] = None) -> CommitStats:
    """Commit ``top`` (a path) into ``base`` (default: its backing file).

    ``drop`` keeps the overlay's data (qemu-img ``-d``); a ``base`` deeper than
    the backing file implies it.  ``progress(done, total)`` is called as bytes
    are committed.  ``storage_wrapper`` wraps the storage of both images written
    (the overlay and the base; see :func:`qcow2py.open`).  Raises :class:`CommitError` when there is nothing to commit
    into.  See the module docstring for the crash-safety argument.
    """
    stats = CommitStats()
    with open_image(top, format=format) as ro:
        if ro.backing is None:
            raise CommitError("Image does not have a backing file")
        depth = 1 if base is None else find_layer(ro, base)
        keep = drop or depth > 1 or base is not None
        base_layer = ro.chain()[depth]
        base_path, base_fmt = base_layer.storage.name, base_layer.format
    # the base changes under this reader (we write it): its backing files share write
    img = open_image(top, "r" if keep else "r+", format=format,
                     storage_wrapper=None if keep else storage_wrapper, share_backing_write=True)
    try:
        data, zeros = plan_commit(img, depth)
        total = sum(e.length for e in data) + sum(e.length for e in zeros)
        done = 0
        if progress:
            progress(0, total)
        with open_image(base_path, "r+", format=base_fmt,
                        storage_wrapper=storage_wrapper) as dst:
            _grow_base(dst, img.size)
            buf = bytearray(min(RUN, max([n for _, n in _runs(data)], default=0)))
            for off, n in _runs(data):
                mv = memoryview(buf)[:n]
                img.read_into(mv, off)
                dst.write(off, mv)
                stats.bytes_copied += n
                stats.read_requests += 1
                done += n
                if progress:
                    progress(done, total)
            for e in zeros:
                dst.write_zeroes(e.offset, e.length, unmap=True)
                stats.bytes_zeroed += e.length
                done += e.length
                if progress:
                    progress(done, total)
            dst.flush()                    # 3: the base holds everything durably
        if not keep:
            stats.clusters_emptied = empty_image(img)
    finally:
        img.close()
    return stats


def empty_image(img: Image) -> int:
    """Make every cluster of ``img`` (a writable qcow2 layer) unallocated, as QEMU's
    make_empty does; returns how many clusters it released."""
    unmap = getattr(img, "unmap_clusters", None)
    if unmap is None:
        raise CommitError(f"'{img.filename}' cannot be emptied (format {img.format})")
    cb = img.cluster_size.bit_length() - 1
    parts = []
    window = 1 << 30
    for a in range(0, img.size, window):
        for r in img.layer_runs(a, min(window, img.size - a)):
            if r.allocated or r.offset is not None:
                parts.append(np.arange(r.start >> cb, ((r.start + r.length - 1) >> cb) + 1,
                                       dtype=np.int64))
    if not parts:
        img.flush()
        return 0
    clusters = np.unique(np.concatenate(parts))
    unmap(clusters, zero=False)
    img.flush()
    return int(clusters.size)
