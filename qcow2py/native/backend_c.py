"""The C back-end: thin cffi calls into ``csrc/`` (module ``qcow2py._native``;
cffi releases the GIL around each call).  Same contracts as
:mod:`backend_pure`; :data:`AVAILABLE` is False when the module was not built.
"""

from __future__ import annotations

import os
from typing import Tuple

from ..lazyimport import numpy as np

from .common import BITMAP_OPS, bitbuf, clip, l2_error, mask_args, runs_args

try:  # pragma: no cover - depends on the build
    from .._native import ffi as _ffi, lib as _lib
except ImportError:
    _ffi = _lib = None

#: True when the C module is built
AVAILABLE = _lib is not None


def is_zero(buf) -> bool:
    mv = memoryview(buf).cast("B")
    if len(mv) == 0:
        return True
    return bool(_lib.qp_is_zero(_ffi.from_buffer(mv), len(mv)))


def decode_l2(table, cluster_bits: int, extended: bool = False,
                     external_data: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    mv = memoryview(table).cast("B")
    entry = 16 if extended else 8
    n_units = (len(mv) // entry) * (32 if extended else 1)
    kinds = np.empty(n_units, dtype=np.uint8)
    hosts = np.empty(n_units, dtype=np.int64)
    bad = _ffi.new("int64_t *")
    rc = _lib.qp_decode_l2(_ffi.from_buffer(mv), len(mv), cluster_bits, int(extended),
                           int(external_data), _ffi.from_buffer(kinds),
                           _ffi.from_buffer("int64_t[]", hosts), n_units, bad)
    if rc == -1:
        raise ValueError("invalid arguments to decode_l2")
    if rc != 0:
        raise l2_error(rc, int(bad[0]), bytes(mv), extended)
    return kinds, hosts


def pread_runs(fd: int, buf, buf_offsets, host_offsets, lengths) -> None:
    b, h, n = runs_args(buf, buf_offsets, host_offsets, lengths)
    mv = memoryview(buf).cast("B")
    rc = _lib.qp_pread_runs(fd, _ffi.from_buffer(mv, require_writable=True), len(mv),
                            _ffi.from_buffer("int64_t[]", b), _ffi.from_buffer("int64_t[]", h),
                            _ffi.from_buffer("int64_t[]", n), len(b))
    if rc == -22:
        raise ValueError("run does not fit the buffer")
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))


def write_batch(buf_off, dst_off, lengths, write_order, dst_fd: int, buf,
                       zero_chunk: int = 0, write_zeroes: bool = False, mark_base: int = 0,
                       mark_shift: int = 0, mark=None):
    """Write pieces of ``buf`` in C (GIL released); returns [0, written, zero, 0]."""
    bo, do, ln, wo = (np.ascontiguousarray(a, dtype=np.int64)
                      for a in (buf_off, dst_off, lengths, write_order))
    if not (bo.size == do.size == ln.size == wo.size):
        raise ValueError("piece arrays must have the same length")
    stats = np.zeros(4, dtype=np.int64)
    mv = memoryview(buf).cast("B")
    mark_ptr = _ffi.from_buffer(mark) if mark is not None else _ffi.NULL
    rc = _lib.qp_write_batch(bo.size, _ffi.from_buffer("int64_t[]", bo),
                             _ffi.from_buffer("int64_t[]", do), _ffi.from_buffer("int64_t[]", ln),
                             _ffi.from_buffer("int64_t[]", wo), dst_fd, _ffi.from_buffer(mv),
                             len(mv), zero_chunk, int(write_zeroes), mark_base, mark_shift,
                             mark_ptr, len(mark) if mark is not None else 0,
                             _ffi.from_buffer("int64_t[]", stats))
    if rc == -22:
        raise ValueError("invalid arguments to write_batch")
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return stats.tolist()


def bitmap_count(bits, start: int = 0, end=None, nbits=None) -> int:
    mv, n = bitbuf(bits, nbits)
    a, b = clip(n, start, end)
    if a >= b:
        return 0
    return int(_lib.qp_bitmap_count(_ffi.from_buffer(mv), n, a, b))


def bitmap_next(bits, start: int = 0, value: bool = True, end=None, nbits=None) -> int:
    mv, n = bitbuf(bits, nbits)
    a, b = clip(n, start, end)
    if a >= b:
        return -1
    return int(_lib.qp_bitmap_next(_ffi.from_buffer(mv), n, a, b, 1 if value else 0))


def bitmap_runs(bits, start: int = 0, end=None,
                       nbits=None) -> Tuple[np.ndarray, np.ndarray]:
    mv, n = bitbuf(bits, nbits)
    a, b = clip(n, start, end)
    if a >= b:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy()
    shift = 0
    if not mv.readonly:
        # the count and fill passes must see the same bits, even if another thread
        # sets some meanwhile: scan a private copy of the bytes of the range
        first, last = a // 8, -(-b // 8)
        mv = memoryview(bytes(mv[first:last]))
        shift = first * 8
        n, a, b = min(n, last * 8) - shift, a - shift, b - shift
    buf = _ffi.from_buffer(mv)
    count = int(_lib.qp_bitmap_runs(buf, n, a, b, _ffi.NULL, _ffi.NULL, 0))
    starts = np.empty(count, dtype=np.int64)
    lens = np.empty(count, dtype=np.int64)
    if count:
        got = _lib.qp_bitmap_runs(buf, n, a, b, _ffi.from_buffer("int64_t[]", starts),
                                  _ffi.from_buffer("int64_t[]", lens), count)
        if got != count:
            raise RuntimeError("bitmap changed during a scan of a private copy")
        if shift:
            starts += shift
    return starts, lens


def bitmap_op(a, b, op: str, out=None):
    if op not in BITMAP_OPS:
        raise ValueError(f"unknown bitmap op {op!r}")
    ma, mb = memoryview(a).cast("B"), memoryview(b).cast("B")
    if len(ma) != len(mb):
        raise ValueError("bitmaps differ in size")
    if out is None:
        out = bytearray(len(ma))
    mo = memoryview(out).cast("B")
    if len(mo) != len(ma):
        raise ValueError("output differs in size")
    if len(ma):
        _lib.qp_bitmap_op(_ffi.from_buffer(ma), _ffi.from_buffer(mb),
                          _ffi.from_buffer(mo, require_writable=True), len(ma), BITMAP_OPS[op])
    return out


def bitmap_mask_extents(guest, length, bits, granularity: int, nbits=None):
    g, n = mask_args(guest, length, granularity)
    mv, nb = bitbuf(bits, nbits)
    buf = _ffi.from_buffer(mv) if len(mv) else _ffi.new("uint8_t[1]")
    gp, np_ = _ffi.from_buffer("int64_t[]", g), _ffi.from_buffer("int64_t[]", n)
    count = int(_lib.qp_bitmap_mask_extents(gp, np_, g.size, buf, nb, granularity,
                                            _ffi.NULL, _ffi.NULL, _ffi.NULL, 0))
    if count < 0:
        raise ValueError("invalid arguments to bitmap_mask_extents")
    out = [np.empty(count, dtype=np.int64) for _ in range(3)]
    if count:
        _lib.qp_bitmap_mask_extents(gp, np_, g.size, buf, nb, granularity,
                                    *(_ffi.from_buffer("int64_t[]", o) for o in out), count)
    return tuple(out)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing back ``[offset, offset+length)`` of ``fd``
    (a hint, see csrc: makes nothing durable); errors are ignored as hints are."""
    _lib.qp_start_writeback(fd, offset, length)
