"""Rebase an image onto another backing file (``qemu-img rebase``).

Safe mode keeps the image's guest content: wherever the image itself leaves
a range to its backing chain, the old chain's bytes are compared with the new
backing file's (zeros past its end) in 512-byte sectors, and the sectors that
differ are written into the image (the old content; through the image's own
write path, which fills partial clusters from the *old* chain, still open).
Ranges both chains report as zeros are skipped without reading; when the new
backing file is a layer of the old chain, ranges that the layers above it do
not decide read the same either way and are skipped too.  Only then, with all
copies durable, is the header switched (one synced write of cluster 0), so a
crash leaves the old backing file named and the content unchanged.

Unsafe mode (``-u``) only rewrites the header.  A rebase onto ``""`` flattens
the image (the new "backing" reads as zeros everywhere).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

from ..lazyimport import numpy as np

from ..errors import Qcow2Error
from ..image import Image
from ..opener import open as open_image
from ..node import BlockKind

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


def _todo(img: Image, new: Optional[Image], skip_depth: Optional[int]) -> List[Tuple[int, int]]:
    """Guest ranges the image leaves to its chain and whose old and new content may differ."""
    out: List[Tuple[int, int]] = []
    window = 1 << 30
    for a in range(0, img.size, window):
        for e in img.block_status(a, min(window, img.size - a)):
            if e.depth == 0 and e.kind != BlockKind.UNALLOCATED:
                continue                       # the image decides: nothing changes
            if skip_depth is not None and (e.depth >= skip_depth or
                                           e.kind == BlockKind.UNALLOCATED):
                continue                       # read from the new backing file already
            if e.zero and _new_is_zero(new, e.offset, e.end):
                continue
            if out and out[-1][0] + out[-1][1] == e.offset:
                out[-1] = (out[-1][0], out[-1][1] + e.length)
            else:
                out.append((e.offset, e.length))
    return out


def _new_is_zero(new: Optional[Image], start: int, end: int) -> bool:
    if new is None or start >= new.size:
        return True
    return all(x.zero for x in new.block_status(start, min(end, new.size) - start))


def _read_new(new: Optional[Image], mv: memoryview, offset: int) -> None:
    mv[:] = bytes(len(mv))
    if new is not None and offset < new.size:
        n = min(len(mv), new.size - offset)
        new.read_into(mv[:n], offset)


def _sector_runs(old: memoryview, new: memoryview) -> List[Tuple[int, int]]:
    """(start, length) of runs of 512-byte sectors that differ."""
    n = len(old)
    pad = -n % SECTOR
    a = np.frombuffer(old, dtype=np.uint8)
    b = np.frombuffer(new, dtype=np.uint8)
    if pad:
        a = np.concatenate([a, np.zeros(pad, np.uint8)])
        b = np.concatenate([b, np.zeros(pad, np.uint8)])
    diff = (a != b).reshape(-1, SECTOR).any(axis=1)
    if not diff.any():
        return []
    edges = np.flatnonzero(np.diff(np.r_[0, diff.view(np.int8), 0]))
    return [(int(s) * SECTOR, min(n, int(e) * SECTOR) - int(s) * SECTOR)
            for s, e in zip(edges[::2], edges[1::2])]


def rebase(img_path: PathLike, backing_file: str, *, backing_format: Optional[str] = None,
           unsafe: bool = False, format: Optional[str] = None,
           progress: Optional[Callable[[int, int], None]] = None,
           force_share: bool = False) -> RebaseStats:
    """Make ``backing_file`` (``""``: none) the backing file of the image at ``img_path``.

    Safe mode (the default) copies what the new backing file would change, so
    the guest content stays the same; ``unsafe`` only rewrites the header (the
    caller vouches that the content is the same).  ``backing_format`` is
    required for a non-empty ``backing_file``, as qemu-img 7.2 requires it.
    """
    path = os.fspath(img_path)
    if backing_file and backing_format is None:
        raise RebaseError(f"Could not change the backing file to '{backing_file}': "
                          f"backing format must be specified")
    stats = RebaseStats()
    if unsafe:       # the old backing file is not opened: it may be gone
        with open_image(path, "r+", format=format, chain=False) as img:
            _set_backing(img, backing_file, backing_format)
        return stats
    # -U (force_share): the old and new backing files are read without keeping
    # others from writing them, as qemu-img rebase -U; the image itself is written
    img = open_image(path, "r+", format=format, share_backing_write=force_share)
    try:
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
            todo = _todo(img, new, skip)
            total = sum(n for _, n in todo)
            done = 0
            if progress:
                progress(0, total)
            old_buf, new_buf = bytearray(CHUNK), bytearray(CHUNK)
            for start, length in todo:
                for pos in range(start, start + length, CHUNK):
                    n = min(CHUNK, start + length - pos)
                    mo, mn = memoryview(old_buf)[:n], memoryview(new_buf)[:n]
                    img.read_into(mo, pos)
                    _read_new(new, mn, pos)
                    stats.bytes_compared += n
                    for s, k in _sector_runs(mo, mn):
                        piece = mo[s:s + k]
                        if not any(piece):
                            img.write_zeroes(pos + s, k)
                        else:
                            img.write(pos + s, piece)
                        stats.bytes_written += k
                    done += n
                    if progress:
                        progress(done, total)
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
