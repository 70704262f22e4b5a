"""The C back-end: thin cffi calls into ``csrc/`` (module ``qcow2py._native``;
cffi releases the GIL around each call).  Same contracts as
:mod:`backend_pure`; :data:`AVAILABLE` is False when the module was not built.
"""

from __future__ import annotations

import os
from typing import Tuple

from ..lazyimport import numpy as np

from .common import (BITMAP_OPS, FD_MAX, batch_args, bitbuf, bytes_of, clip, int_arg, l2_args,
                     l2_error, mask_args, op_args, runs_args, writeback_range)

try:  # pragma: no cover - depends on the build
    from .._native import ffi as _ffi, lib as _lib
except ImportError:
    _ffi = _lib = None

#: True when the C module is built
AVAILABLE = _lib is not None


def _i64(arr: np.ndarray):
    return _ffi.from_buffer("int64_t[]", arr)


def is_zero(buf) -> bool:
    mv = bytes_of(buf)
    if len(mv) == 0:
        return True
    rc = _lib.qp_is_zero(_ffi.from_buffer(mv), len(mv))
    if rc < 0:
        raise ValueError("invalid arguments to is_zero")
    return bool(rc)


def decode_l2(table, cluster_bits: int, extended: bool = False,
              external_data: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    mv, cluster_bits = l2_args(table, cluster_bits, extended)
    entry = 16 if extended else 8
    n_units = (len(mv) // entry) * (32 if extended else 1)
    kinds = np.empty(n_units, dtype=np.uint8)
    hosts = np.empty(n_units, dtype=np.int64)
    bad = _ffi.new("int64_t *")
    rc = _lib.qp_decode_l2(_ffi.from_buffer(mv), len(mv), cluster_bits, int(bool(extended)),
                           int(bool(external_data)), _ffi.from_buffer(kinds), _i64(hosts),
                           n_units, bad)
    if rc == -1:
        raise ValueError("invalid arguments to decode_l2")
    if rc != 0:
        raise l2_error(rc, int(bad[0]), bytes(mv), extended)
    return kinds, hosts


def pread_runs(fd: int, buf, buf_offsets, host_offsets, lengths) -> None:
    mv, b, h, n = runs_args(fd, buf, buf_offsets, host_offsets, lengths)
    rc = _lib.qp_pread_runs(fd, _ffi.from_buffer(mv, require_writable=True), len(mv),
                            _i64(b), _i64(h), _i64(n), b.size)
    if rc < 0:       # -EINVAL included: the arguments were checked, so the kernel said it
        raise OSError(-rc, os.strerror(-rc))


def write_batch(buf_off, dst_off, lengths, write_order, dst_fd: int, buf,
                zero_chunk: int = 0, write_zeroes: bool = False, mark_base: int = 0,
                mark_shift: int = 0, mark=None):
    """Write pieces of ``buf`` in C (GIL released); returns [0, written, zero, 0]."""
    dst_fd = int_arg(dst_fd, "dst_fd", 0, FD_MAX)
    a = batch_args(buf, buf_off, dst_off, lengths, write_order, zero_chunk, mark_base,
                   mark_shift, mark)
    stats = np.zeros(4, dtype=np.int64)
    mark_ptr = (_ffi.from_buffer(a.mark, require_writable=True) if a.mark is not None
                else _ffi.NULL)
    rc = _lib.qp_write_batch(a.buf_off.size, _i64(a.buf_off), _i64(a.dst_off), _i64(a.lengths),
                             _i64(a.write_order), dst_fd, _ffi.from_buffer(a.buf), len(a.buf),
                             a.zero_chunk, int(bool(write_zeroes)), a.mark_base, a.mark_shift,
                             mark_ptr, a.mark_nbits, _i64(stats))
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return stats.tolist()


def bitmap_count(bits, start: int = 0, end=None, nbits=None) -> int:
    mv, n = bitbuf(bits, nbits)
    a, b = clip(n, start, end)
    if a >= b:
        return 0
    count = int(_lib.qp_bitmap_count(_ffi.from_buffer(mv), n, a, b))
    if count < 0:
        raise ValueError("invalid arguments to bitmap_count")
    return count


def bitmap_next(bits, start: int = 0, value: bool = True, end=None, nbits=None) -> int:
    mv, n = bitbuf(bits, nbits)
    a, b = clip(n, start, end)
    if a >= b:
        return -1
    return int(_lib.qp_bitmap_next(_ffi.from_buffer(mv), n, a, b, 1 if value else 0))


def bitmap_runs(bits, start: int = 0, end=None, nbits=None) -> Tuple[np.ndarray, np.ndarray]:
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
    if count < 0:
        raise ValueError("invalid arguments to bitmap_runs")
    starts = np.empty(count, dtype=np.int64)
    lens = np.empty(count, dtype=np.int64)
    if count:
        got = _lib.qp_bitmap_runs(buf, n, a, b, _i64(starts), _i64(lens), count)
        if got != count:
            raise RuntimeError("bitmap changed during a scan of a private copy")
        if shift:
            starts += shift
    return starts, lens


def bitmap_op(a, b, op: str, out=None):
    ma, mb, mo, out = op_args(a, b, op, out)
    if len(ma):
        rc = _lib.qp_bitmap_op(_ffi.from_buffer(ma), _ffi.from_buffer(mb),
                               _ffi.from_buffer(mo, require_writable=True), len(ma),
                               BITMAP_OPS[op])
        if rc:
            raise ValueError(f"invalid arguments to bitmap_op {op!r}")
    return out


def bitmap_mask_extents(guest, length, bits, granularity: int, nbits=None):
    g, n, granularity = mask_args(guest, length, granularity)
    mv, nb = bitbuf(bits, nbits)
    buf = _ffi.from_buffer(mv) if len(mv) else _ffi.new("uint8_t[1]")
    gp, np_ = _i64(g), _i64(n)
    count = 0
    while True:
        # count, then fill; a writable bitmap may gain bits in between (another
        # thread): keep what the fill pass saw, or go again with room for more
        out = [np.empty(count, dtype=np.int64) for _ in range(3)]
        got = int(_lib.qp_bitmap_mask_extents(gp, np_, g.size, buf, nb, granularity,
                                              *(_i64(o) if count else _ffi.NULL for o in out),
                                              count))
        if got < 0:
            raise ValueError("invalid arguments to bitmap_mask_extents")
        if got <= count:
            return tuple(o[:got] for o in out)
        count = got


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing back ``[offset, offset+length)`` of ``fd``
    (a hint, see csrc: makes nothing durable); errors are ignored as hints are,
    and a range C cannot hold is not even asked for (as the pure twin does nothing)."""
    if writeback_range(fd, offset, length):
        _lib.qp_start_writeback(fd, offset, length)
