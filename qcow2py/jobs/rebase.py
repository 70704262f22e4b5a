"""Rebase an image onto another backing file (``qemu-img rebase``).

Safe mode keeps the image's guest content: wherever the image itself leaves
a range to its backing chain, the old chain's bytes are compared with the new
backing file's (zeros past its end) in 512-byte sectors, and the sectors that
differ are written into the image (the old content; through the image's own
write path, which fills partial clusters from the *old* chain, still open).
The ranges are cut where either side's block-status extents change; the pieces
are read in batches of up to 4 MiB taken in the old chain's host order (layer,
file, offset), and inside each batch the new backing file's pieces are read in
its own host order, so both files are read front to back rather than in guest
order.  Pieces both sides report as zeros are skipped without reading, and a
side that reads as zeros is not read; when the new backing file is a layer of
the old chain, ranges that the layers above it do not decide read the same
either way and are skipped too.  With ``compress`` every cluster holding a
differing sector is written whole and compressed (QEMU 8.2's ``rebase -c``).  Only then, with all
copies durable, is the header switched (one synced write of cluster 0), so a
crash leaves the old backing file named and the content unchanged.

Unsafe mode (``-u``) only rewrites the header.  A rebase onto ``""`` flattens
the image (the new "backing" reads as zeros everywhere).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

from ..lazyimport import numpy as np

from ..errors import Qcow2Error
from ..image import Image
from ..opener import open as open_image
from ..node import BlockKind, Extent

CHUNK = 4 << 20
SECTOR = 512
PathLike = Union[str, "os.PathLike[str]"]


class RebaseError(Qcow2Error):
    """The rebase cannot be done (no backing format, new backing file missing, ...)."""


@dataclass
class RebaseStats:
    bytes_compared: int = 0     #: bytes read from both chains and compared
    bytes_written: int = 0      #: bytes copied into the image (old content kept)


def _backing_path(img_path: str, name: str) -> str:
    """Where qemu-img looks for a relative backing name: next to the image."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(img_path), name)


def _layer_of(img: Image, path: str) -> Optional[int]:
    """Depth of the file ``path`` in ``img``'s chain, or None."""
    for depth, layer in enumerate(img.chain()):
        try:
            if depth and os.path.samefile(layer.storage.name, path):
                return depth
        except OSError:
            continue
    return None


def _old_extents(img: Image, skip_depth: Optional[int]) -> List[Extent]:
    """Extents the image leaves to its chain (whose content the new backing may change)."""
    out: List[Extent] = []
    window = 1 << 30
    for a in range(0, img.size, window):
        for e in img.block_status(a, min(window, img.size - a)):
            if e.depth == 0 and e.kind != BlockKind.UNALLOCATED:
                continue                       # the image decides: nothing changes
            if skip_depth is not None and (e.depth >= skip_depth or
                                           e.kind == BlockKind.UNALLOCATED):
                continue                       # read from the new backing file already
            out.append(e)
    return out


def _keys(extents: List[Extent]) -> Tuple[np.ndarray, ...]:
    """(start, end, zero, layer, file number, host offset or -1) of extents, as arrays."""
    files: dict = {}
    n = len(extents)
    return (np.fromiter((e.offset for e in extents), np.int64, n),
            np.fromiter((e.end for e in extents), np.int64, n),
            np.fromiter((e.zero for e in extents), bool, n),
            np.fromiter((e.depth for e in extents), np.int64, n),
            np.fromiter((files.setdefault(e.host_file, len(files)) for e in extents),
                        np.int64, n),
            np.fromiter((-1 if e.host_offset is None else e.host_offset for e in extents),
                        np.int64, n))


def _new_extents(new: Optional[Image], o_start: np.ndarray, o_end: np.ndarray) -> List[Extent]:
    """The new backing file's extents under the old ones (one call per continuous run)."""
    out: List[Extent] = []
    if new is None or not o_start.size:
        return out
    cut = np.r_[0, np.flatnonzero(o_start[1:] != o_end[:-1]) + 1, o_start.size]
    for a, b in zip(cut[:-1].tolist(), cut[1:].tolist()):
        lo, hi = int(o_start[a]), min(int(o_end[b - 1]), new.size)
        if lo < hi:
            out.extend(new.block_status(lo, hi - lo))
    return out


def _pieces(img: Image, new: Optional[Image], old: List[Extent]) -> Dict[str, np.ndarray]:
    """The comparison as arrays of pieces: guest ranges inside one extent of each side
    (and inside one CHUNK-aligned window), each side's host position (layer, file,
    offset; -1 when unknown) and whether it reads as zeros.  Pieces where both
    sides read as zeros are dropped."""
    o_start, o_end, o_zero, o_depth, o_fid, o_host = _keys(old)
    n_start, n_end, n_zero, n_depth, n_fid, n_host = _keys(_new_extents(new, o_start, o_end))
    bounds = np.unique(np.concatenate([o_start, o_end, n_start, n_end,
                                       np.arange(0, img.size, CHUNK, dtype=np.int64)]))
    p_start, p_end = bounds[:-1], bounds[1:]
    oi = np.searchsorted(o_start, p_start, side="right") - 1
    inside = (oi >= 0) & (p_start < o_end[np.maximum(oi, 0)]) if o_start.size else \
        np.zeros(p_start.size, bool)
    p_start, p_end, oi = p_start[inside], p_end[inside], oi[inside]
    if n_start.size:
        ni = np.searchsorted(n_start, p_start, side="right") - 1
        has_new = (ni >= 0) & (p_start < n_end[np.maximum(ni, 0)])
        ni = np.maximum(ni, 0)
        new_zero = ~has_new | n_zero[ni]
        new_key = (n_depth[ni], n_fid[ni],
                   np.where(has_new & (n_host[ni] >= 0), n_host[ni] + p_start - n_start[ni], -1))
    else:
        new_zero = np.ones(p_start.size, bool)
        new_key = (np.zeros(p_start.size, np.int64),) * 3
    old_key = (o_depth[oi], o_fid[oi],
               np.where(o_host[oi] >= 0, o_host[oi] + p_start - o_start[oi], -1))
    keep = ~(o_zero[oi] & new_zero)
    return {"start": p_start[keep], "length": (p_end - p_start)[keep],
            "old_zero": o_zero[oi][keep], "new_zero": new_zero[keep],
            "old_key": tuple(k[keep] for k in old_key),
            "new_key": tuple(k[keep] for k in new_key)}


def _read_side(node: Optional[Image], order: np.ndarray, start: np.ndarray,
               length: np.ndarray, pos: np.ndarray, zero: np.ndarray, buf: memoryview) -> None:
    """Read pieces ``order`` (in that order) of ``node`` into ``buf`` at ``pos``; pieces
    that read as zeros (or lie past the node's end) are filled without reading.
    Pieces that continue each other in guest space and in ``buf`` are read as one."""
    size = node.size if node is not None else 0
    for i in order[zero[order]].tolist():
        buf[pos[i]:pos[i] + length[i]] = bytes(int(length[i]))
    reads = order[~zero[order]]
    if not reads.size:
        return
    s, n, p = start[reads], length[reads], pos[reads]
    cont = np.r_[False, (s[1:] == s[:-1] + n[:-1]) & (p[1:] == p[:-1] + n[:-1])]
    heads = np.flatnonzero(~cont)
    run_len = np.add.reduceat(n, heads)
    for g, q, k in zip(s[heads].tolist(), p[heads].tolist(), run_len.tolist()):
        m = max(0, min(k, size - g))
        if m:
            node.read_into(buf[q:q + m], g)
        if m < k:
            buf[q + m:q + k] = bytes(k - m)


def _diff_runs(old: memoryview, new: memoryview, start: np.ndarray, room: np.ndarray,
               length: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Guest ranges (starts, lengths) of the 512-byte sectors that differ between the
    two buffers, which hold the pieces packed in order from 0, ``room`` bytes each
    (whole sectors; bytes past a piece's ``length`` are equal in both)."""
    total = int(room.sum())
    a = np.frombuffer(old, dtype=np.uint8, count=total)
    b = np.frombuffer(new, dtype=np.uint8, count=total)
    diff = (a != b).reshape(-1, SECTOR).any(axis=1)
    if not diff.any():
        z = np.zeros(0, np.int64)
        return z, z
    per = room // SECTOR
    piece = np.repeat(np.arange(start.size), per)
    first = np.r_[0, np.cumsum(per)[:-1]]
    guest = start[piece] + (np.arange(piece.size) - first[piece]) * SECTOR
    sec = np.flatnonzero(diff)
    g = guest[sec]
    e = np.minimum(g + SECTOR, (start + length)[piece[sec]])
    # a run continues while guest space *and* the buffer do (a short sector ends it)
    heads = np.flatnonzero(np.r_[True, (g[1:] != e[:-1]) | (sec[1:] != sec[:-1] + 1) |
                                 (e[:-1] - g[:-1] != SECTOR)])
    ends = np.r_[heads[1:], sec.size] - 1
    return g[heads], e[ends] - g[heads]


def _compare(img: Image, new: Optional[Image], pieces: Dict[str, np.ndarray],
             on_diff: Callable, progress, stats: "RebaseStats") -> None:
    """Read the pieces in batches (taken in the old chain's host order; inside a
    batch each side is read in its own host order) and call ``on_diff(starts,
    lengths, places in old_buf, old_buf)`` with each batch's differing sectors."""
    start, length = pieces["start"], pieces["length"]
    total = int(length.sum())
    done = 0
    if progress:
        progress(0, total)
    if not start.size:
        return
    od, of, oh = pieces["old_key"]
    nd, nf, nh = pieces["new_key"]
    order = np.lexsort((start, oh, of, od))
    # pieces sit at sector-aligned places (only the image's last piece may end inside
    # a sector); a batch holds at most 2 * CHUNK bytes, as pieces are at most CHUNK
    room = -(-length // SECTOR) * SECTOR
    cut = np.r_[0, np.flatnonzero(np.diff((np.cumsum(room[order]) - 1) // CHUNK)) + 1,
                order.size]
    old_buf, new_buf = bytearray(2 * CHUNK), bytearray(2 * CHUNK)
    mo, mn = memoryview(old_buf), memoryview(new_buf)
    pos = np.zeros(start.size, np.int64)
    for a, b in zip(cut[:-1].tolist(), cut[1:].tolist()):
        batch = order[a:b]
        pos[batch] = np.r_[0, np.cumsum(room[batch])[:-1]]
        _read_side(img, batch, start, length, pos, pieces["old_zero"], mo)
        by_new = batch[np.lexsort((start[batch], nh[batch], nf[batch], nd[batch]))]
        _read_side(new, by_new, start, length, pos, pieces["new_zero"], mn)
        for i in batch[room[batch] != length[batch]].tolist():     # the short last sector
            q, r = int(pos[i] + length[i]), int(pos[i] + room[i])
            mo[q:r] = mn[q:r] = bytes(r - q)
        n = int(length[batch].sum())
        stats.bytes_compared += n
        g, k = _diff_runs(mo, mn, start[batch], room[batch], length[batch])
        if g.size:
            # batch is in host order: map guest offsets back through a guest-sorted view
            srt = np.argsort(start[batch], kind="stable")
            idx = np.searchsorted(start[batch][srt], g, side="right") - 1
            piece = batch[srt][idx]
            on_diff(g, k, pos[piece] + g - start[piece], mo)
        done += n
        if progress:
            progress(done, total)


def _write_runs(img: Image, g: np.ndarray, k: np.ndarray, at: np.ndarray,
                old_buf: memoryview) -> None:
    """Write the old content of differing runs (zeros as zero writes)."""
    for x, n, p in zip(g.tolist(), k.tolist(), at.tolist()):
        piece = old_buf[p:p + n]
        if np.frombuffer(piece, np.uint8).any():
            img.write(x, piece)
        else:
            img.write_zeroes(x, n)


def _runs_clusters(g: np.ndarray, k: np.ndarray, cs: int) -> np.ndarray:
    """The clusters that guest runs (starts ``g``, lengths ``k``) touch."""
    first, last = g // cs, (g + k - 1) // cs
    n = last - first + 1
    return np.repeat(first - np.r_[0, np.cumsum(n)[:-1]], n) + np.arange(int(n.sum()))


def _write_compressed(img: Image, clusters: np.ndarray) -> None:
    """Write ``clusters`` (their content under the old chain) whole and compressed; an
    all-zero cluster becomes a zero cluster (qcow2 v3).  In guest order, one cluster a call
    (compression works cluster by cluster in any case)."""
    cs = img.cluster_size
    buf = bytearray(cs)
    zero_flag = img.header.version >= 3        # v2 has no zero clusters: compress zeros
    for c in clusters.tolist():
        n = min(cs, img.size - c * cs)
        mv = memoryview(buf)[:n]
        img.read_into(mv, c * cs)
        if not zero_flag or np.frombuffer(mv, np.uint8).any():
            img.write_compressed(c, mv)
        else:
            img.write_zeroes(c * cs, n)


def _check_compressible(img: Image) -> None:
    if not hasattr(img, "write_compressed"):
        raise RebaseError(f"Compression not supported for this file format ({img.format})")
    if getattr(img.header, "has_data_file", False):
        raise RebaseError("Compression is not supported with an external data file")


def rebase(img_path: PathLike, backing_file: str, *, backing_format: Optional[str] = None,
           unsafe: bool = False, compress: bool = False, format: Optional[str] = None,
           progress: Optional[Callable[[int, int], None]] = None,
           force_share: bool = False) -> RebaseStats:
    """Make ``backing_file`` (``""``: none) the backing file of the image at ``img_path``.

    Safe mode (the default) copies what the new backing file would change, so
    the guest content stays the same; ``unsafe`` only rewrites the header (the
    caller vouches that the content is the same).  ``backing_format`` is
    required for a non-empty ``backing_file``, as qemu-img 7.2 requires it.
    ``compress`` writes every cluster that holds a differing sector whole and
    compressed (``qemu-img rebase -c`` of QEMU 8.2; safe mode, qcow2 only).
    """
    path = os.fspath(img_path)
    if backing_file and backing_format is None:
        raise RebaseError(f"Could not change the backing file to '{backing_file}': "
                          f"backing format must be specified")
    if compress and unsafe:
        raise RebaseError("Compression is not supported in unsafe mode (-u)")
    stats = RebaseStats()
    if unsafe:       # the old backing file is not opened: it may be gone
        with open_image(path, "r+", format=format, chain=False) as img:
            _set_backing(img, backing_file, backing_format)
        return stats
    # -U (force_share): the old and new backing files are read without keeping
    # others from writing them, as qemu-img rebase -U; the image itself is written
    img = open_image(path, "r+", format=format, share_backing_write=force_share)
    try:
        if compress:
            _check_compressible(img)
        new = None
        if backing_file:
            where = _backing_path(path, backing_file)
            try:
                new = open_image(where, format=backing_format, force_share=force_share)
            except (Qcow2Error, OSError) as e:
                raise RebaseError(f"Could not open new backing file '{backing_file}': "
                                  f"{getattr(e, 'strerror', None) or e}") from e
        try:
            skip = _layer_of(img, new.storage.name) if new is not None else None
            pieces = _pieces(img, new, _old_extents(img, skip))
            clusters: List[np.ndarray] = []

            def on_diff(g, k, at, old_buf):
                stats.bytes_written += int(k.sum())
                if compress:         # whole clusters, written once all is compared
                    clusters.append(_runs_clusters(g, k, img.cluster_size))
                else:
                    _write_runs(img, g, k, at, old_buf)

            _compare(img, new, pieces, on_diff, progress, stats)
            if clusters:
                _write_compressed(img, np.unique(np.concatenate(clusters)))
        finally:
            if new is not None:
                new.close()
        _set_backing(img, backing_file, backing_format)
    finally:
        img.close()
    return stats


def _set_backing(img: Image, name: str, fmt: Optional[str]) -> None:
    setter = getattr(img, "set_backing", None)
    if setter is None:
        raise RebaseError(f"'{img.filename}' ({img.format}) cannot have a backing file")
    setter(name, fmt)
