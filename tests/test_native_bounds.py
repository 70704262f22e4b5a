"""Bounds of the native entry points: edge values through both back-ends.

Every native function gets edge values (0, 1, huge, negative, granularities of
2^61..2^63, bit lengths that are not a multiple of 8) through the C back-end
and its pure twin: the same result, or the same error.  The reproducers of
issue #11 (a bitarray mark read as bytes, a granularity that overflowed)
are named tests.  CI also runs this file once on a build made with
``QCOW2PY_SANITIZE=1`` (ASan + UBSan), where an out-of-bounds access aborts.
"""

import errno
import os

import numpy as np
import pytest
from bitarray import bitarray, frozenbitarray
from hypothesis import HealthCheck, event, given, settings, strategies as st

from qcow2py import CorruptImageError
from qcow2py.native import backend_c, backend_pure

BACKENDS = (backend_c, backend_pure)
INT64_MAX = (1 << 63) - 1

#: integers that break careless bounds checks
EDGE = [0, 1, 2, 7, 8, 9, 63, 64, 65, 511, 512, 4096, (1 << 31) - 1, 1 << 31, 1 << 32,
        1 << 40, 1 << 61, 1 << 62, INT64_MAX - 1, INT64_MAX, 1 << 63, 1 << 64,
        -1, -2, -(1 << 63), -(1 << 63) - 1]
edge = st.one_of(st.sampled_from(EDGE), st.integers(-3, 300))
small = st.integers(0, 200)
GRANULARITIES = [1, 3, 512, 1 << 60, 1 << 61, (1 << 61) + 1, 1 << 62, (1 << 62) + 3,
                 INT64_MAX - 1, INT64_MAX]
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def outcome(fn, *args, **kw):
    """("ok", result) or ("err", kind, detail): what the twins must agree on."""
    try:
        return ("ok", normal(fn(*args, **kw)))
    except (ValueError, CorruptImageError) as e:
        return ("err", type(e).__name__, str(e))
    except OSError as e:
        return ("err", "OSError", e.errno)


def normal(r):
    if isinstance(r, tuple):
        return tuple(normal(x) for x in r)
    if isinstance(r, np.ndarray):
        return (str(r.dtype), r.tolist())
    if isinstance(r, (bytearray, memoryview)):
        return bytes(r)
    return r


def twins(name, make_args, **kw):
    """Call both back-ends on fresh copies of the arguments (some are written)."""
    results = []
    for be in BACKENDS:
        args = make_args()
        results.append((outcome(getattr(be, name), *args, **kw), args))
    assert results[0][0] == results[1][0], (name, results[0][0], results[1][0])
    event(f"{name}: {results[0][0][0]}")       # both outcomes must be exercised
    return results


def bits_of(n: int, fill: int, seed: int) -> bitarray:
    """n bits (any n, not only multiples of 8), a pattern picked by fill/seed."""
    rng = np.random.default_rng(seed)
    b = bitarray(n, endian="little")
    if fill == 0:
        b.setall(0)
    elif fill == 1:
        b.setall(1)
    else:
        b.setall(0)
        for i in np.flatnonzero(rng.random(n) < 0.4).tolist():
            b[i] = 1
    return b


bitmaps = st.builds(bits_of, st.one_of(st.sampled_from([0, 1, 7, 8, 9, 63, 64, 65, 130]),
                                       st.integers(0, 200)),
                    st.sampled_from([0, 1, 2]), st.integers(0, 1000))


# ------------------------------------------------------ the reproducers
@pytest.mark.parametrize("nbits", [1, 10, 800, 803])
def test_write_batch_bitarray_mark_is_a_length_in_bits(tmp_path, nbits):
    """Issue #11: ``len(bitarray)`` (bits) was handed to C as the mark's size in
    bytes: the marks ran past the bitarray's buffer (ASan: heap-buffer-overflow)."""
    buf = b"\1" * 8192
    out = []
    for be in BACKENDS:
        mark = bitarray(nbits, endian="little")
        mark.setall(0)
        fd = os.open(tmp_path / be.__name__, os.O_RDWR | os.O_CREAT)
        try:
            stats = be.write_batch([0], [0], [8192], [0], fd, buf, 0, False, 0, 0, mark)
        finally:
            os.close(fd)
        out.append((stats, mark.to01()))
        # every unit of the bitmap got data; the bitmap did not grow nor gain padding bits
        assert mark.all() and len(mark) == nbits
        assert len(mark.tobytes()) == (nbits + 7) // 8
    assert out[0] == out[1]


def test_write_batch_mark_stops_at_its_last_bit(tmp_path):
    """A byte mark of 2 bytes, units 0..99 touched: 16 bits set, nothing past."""
    for be in BACKENDS:
        backing = bytearray(b"\0" * 4)
        mark = memoryview(backing)[:2]
        fd = os.open(tmp_path / be.__name__, os.O_RDWR | os.O_CREAT)
        try:
            be.write_batch([0], [512], [100], [0], fd, b"\5" * 100, 0, False, 512, 0, mark)
        finally:
            os.close(fd)
        assert bytes(backing) == b"\xff\xff\0\0"


@pytest.mark.parametrize("gran", [1 << 61, 1 << 62, (1 << 62) + 3, INT64_MAX])
def test_mask_extents_granularity_near_2_63(gran):
    """Issue #11: the end of a bit's range (bit * granularity) overflowed int64
    for granularity >= 2^61 (UBSan; a negative piece length without -fwrapv)."""
    length = INT64_MAX - 10
    for be in BACKENDS:
        g, ln, idx = be.bitmap_mask_extents([5], [length], b"\xff", gran)
        assert (g.tolist(), ln.tolist(), idx.tolist()) == ([5], [length], [0])
        g, ln, idx = be.bitmap_mask_extents([5], [length], b"\x02", gran)   # bit 1 only
        if gran < length + 5:
            end = min(length + 5, 2 * gran)
            assert (g.tolist(), ln.tolist()) == ([gran], [end - gran])
        else:
            assert g.size == 0


# --------------------------------------------------------- C checks on its own
def _lib():
    from qcow2py._native import ffi, lib
    return ffi, lib


def _arr(*vals):
    return np.array(vals, dtype=np.int64)


def test_c_refuses_what_it_can_see(tmp_path):
    """Called without the wrapper, every C entry point refuses impossible
    arguments with its error code, before touching any buffer."""
    ffi, lib = _lib()
    i64 = lambda a: ffi.from_buffer("int64_t[]", a)   # noqa: E731
    EINVAL = -errno.EINVAL
    buf = bytearray(64)
    p = ffi.from_buffer(buf)
    stats = np.zeros(4, dtype=np.int64)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        # pread: a run whose end in the file passes INT64_MAX; a NULL buffer
        assert lib.qp_pread_runs(fd, p, 64, i64(_arr(0)), i64(_arr(INT64_MAX)), i64(_arr(2)),
                                 1) == EINVAL
        assert lib.qp_pread_runs(fd, ffi.NULL, 64, i64(_arr(0)), i64(_arr(0)), i64(_arr(2)),
                                 1) == EINVAL
        assert lib.qp_pread_runs(fd, p, 64, ffi.NULL, ffi.NULL, ffi.NULL, 1) == EINVAL

        def wb(dst=0, ln=8, base=0, shift=0, mark=ffi.NULL, nbits=0, zc=0, st=i64(stats)):
            return lib.qp_write_batch(1, i64(_arr(0)), i64(_arr(dst)), i64(_arr(ln)),
                                      i64(_arr(0)), fd, p, 64, zc, 0, base, shift, mark, nbits,
                                      st)
        assert wb(dst=INT64_MAX - 4) == EINVAL              # dst + len overflows
        assert wb(base=-1) == EINVAL                       # (dst - base) could overflow
        assert wb(shift=41) == EINVAL
        assert wb(shift=-1) == EINVAL
        assert wb(zc=-1) == EINVAL
        assert wb(nbits=-1) == EINVAL
        assert wb(nbits=8) == EINVAL                       # bits, but no mark
        assert wb(st=ffi.NULL) == EINVAL
        assert wb(ln=65) == EINVAL
        assert os.fstat(fd).st_size == 0                   # nothing was written
        mark = bytearray(4)
        assert wb(ln=64, shift=3, mark=ffi.from_buffer(mark), nbits=5) == 0
        assert bytes(mark) == b"\x1f\0\0\0"                # 8 units, 5 bits: the rest untouched
    finally:
        os.close(fd)

    bad = ffi.new("int64_t *")
    kinds, hosts = np.zeros(1, np.uint8), np.zeros(1, np.int64)
    assert lib.qp_decode_l2(ffi.NULL, 8, 16, 0, 0, ffi.from_buffer(kinds), i64(hosts), 1,
                            bad) == -1
    assert lib.qp_decode_l2(p, 8, 16, 0, 0, ffi.from_buffer(kinds), i64(hosts), 1,
                            ffi.NULL) == -1
    assert lib.qp_decode_l2(p, 8, 22, 0, 0, ffi.from_buffer(kinds), i64(hosts), 1, bad) == -1
    assert lib.qp_decode_l2(p, 12, 16, 0, 0, ffi.from_buffer(kinds), i64(hosts), 1, bad) == -1
    assert lib.qp_is_zero(ffi.NULL, 5) == -1 and lib.qp_is_zero(ffi.NULL, 0) == 1
    assert lib.qp_bitmap_count(ffi.NULL, 8, 0, 8) == -1
    assert lib.qp_bitmap_runs(ffi.NULL, 8, 0, 8, ffi.NULL, ffi.NULL, 0) == -1
    assert lib.qp_bitmap_next(ffi.NULL, 8, 0, 8, 1) == -1
    assert lib.qp_bitmap_op(ffi.NULL, p, p, 4, 0) == -1
    assert lib.qp_bitmap_op(p, p, p, 4, 3) == -1
    g, ln = _arr(INT64_MAX - 3), _arr(5)
    assert lib.qp_bitmap_mask_extents(i64(g), i64(ln), 1, p, 8, 512, ffi.NULL, ffi.NULL,
                                      ffi.NULL, 0) == -1
    assert lib.qp_bitmap_mask_extents(ffi.NULL, ffi.NULL, 1, p, 8, 512, ffi.NULL, ffi.NULL,
                                      ffi.NULL, 0) == -1
    assert lib.qp_bitmap_mask_extents(i64(_arr(0)), i64(_arr(1)), 1, p, 8, 0, ffi.NULL,
                                      ffi.NULL, ffi.NULL, 0) == -1
    assert lib.qp_start_writeback(0, INT64_MAX - 4, 5) == EINVAL
    assert lib.qp_start_writeback(-1, 0, 5) == EINVAL


def test_c_bitmap_scans_at_int64_max_bits():
    """nbits near INT64_MAX: the byte count and word masks must not overflow
    (only bits far below the end are read, so an 8-byte buffer is enough)."""
    ffi, lib = _lib()
    buf = bytearray(b"\x0f" + b"\0" * 7)
    p = ffi.from_buffer(buf)
    assert lib.qp_bitmap_count(p, INT64_MAX, 0, 64) == 4
    assert lib.qp_bitmap_next(p, INT64_MAX, 0, 64, 0) == 4
    starts, lens = np.zeros(2, np.int64), np.zeros(2, np.int64)
    assert lib.qp_bitmap_runs(p, INT64_MAX, 0, 64, ffi.from_buffer("int64_t[]", starts),
                              ffi.from_buffer("int64_t[]", lens), 2) == 1
    assert (starts[0], lens[0]) == (0, 4)


# ------------------------------------------------ the twins on edge values
entries = st.lists(st.one_of(st.sampled_from([0, 1, 1 << 63, 1 << 62, (1 << 64) - 1,
                                              0x10000, (1 << 63) | 0x10000, 1 << 56]),
                             st.integers(0, (1 << 64) - 1)).map(lambda v: v.to_bytes(8, "big")),
                   max_size=8).map(b"".join)


@SETTINGS
@given(st.one_of(entries, entries, st.binary(max_size=70)),
       st.sampled_from([9, 12, 16, 21, 9, 16, 21, 8, 22, 0, -1, 1 << 31, 1 << 64]),
       st.booleans(), st.booleans())
def test_decode_l2_edges(table, cluster_bits, extended, external):
    twins("decode_l2", lambda: (table, cluster_bits, extended, external))


@SETTINGS
@given(st.binary(max_size=70))
def test_is_zero_edges(data):
    twins("is_zero", lambda: (data,))
    twins("is_zero", lambda: (bytearray(len(data)),))


host = st.one_of(st.integers(0, 300), st.sampled_from([1 << 40, 1 << 62, INT64_MAX - 64]))


@SETTINGS
@given(st.data(), st.integers(0, 64), st.sampled_from(["file"] * 4 + [-1, 1 << 31, 1 << 63, "x"]),
       st.sampled_from([False, False, False, True]))
def test_pread_runs_edges(tmp_path_factory, data, buf_len, fd_kind, readonly):
    runs = []
    for _ in range(data.draw(st.integers(0, 4))):
        if data.draw(st.booleans()):                   # fits the buffer, any file offset
            bo = data.draw(st.integers(0, buf_len))
            runs.append((bo, data.draw(host), data.draw(st.integers(0, buf_len - bo))))
        else:
            runs.append((data.draw(edge), data.draw(edge), data.draw(edge)))
    path = tmp_path_factory.mktemp("pr") / "f"
    path.write_bytes(bytes(range(200)))
    fd = os.open(path, os.O_RDONLY)
    try:
        use_fd = fd if fd_kind == "file" else fd_kind
        b, h, n = ([r[i] for r in runs] for i in range(3))
        make = (lambda: (use_fd, bytes(buf_len), b, h, n)) if readonly else \
            (lambda: (use_fd, bytearray(b"\xee" * buf_len), b, h, n))
        results = twins("pread_runs", make)
        if results[0][0][0] == "ok":
            assert bytes(results[0][1][1]) == bytes(results[1][1][1])
    finally:
        os.close(fd)


def _mark(kind, nbits):
    if kind == "none":
        return None
    if kind == "bitarray":
        b = bitarray(nbits, endian="little")
        b.setall(0)
        return b
    if kind == "frozen":
        return frozenbitarray(nbits, endian="little")
    if kind == "big":
        return bitarray(nbits, endian="big")
    if kind == "bytes":
        return bytes((nbits + 7) // 8)
    return bytearray((nbits + 7) // 8)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_write_batch_edges(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("wb")
    buf_len = data.draw(st.integers(0, 80))
    n = data.draw(st.integers(0, 4))
    pieces = []
    for _ in range(n):
        sane = data.draw(st.booleans())
        if sane:                                      # inside the buffer, near edges
            bo = data.draw(st.integers(0, buf_len))
            ln = data.draw(st.integers(0, buf_len - bo))
            do = data.draw(st.one_of(st.integers(0, 300),
                                     st.sampled_from([INT64_MAX - ln, (1 << 40) - 3])))
        else:
            bo, do, ln = data.draw(edge), data.draw(edge), data.draw(edge)
        pieces.append((bo, do, ln))
    order = data.draw(st.one_of(st.permutations(range(n)),
                                st.lists(edge, min_size=n, max_size=n),
                                st.lists(st.integers(0, 5), max_size=5)))
    zero_chunk = data.draw(st.one_of(st.sampled_from([0, 1, 3, 512, -1, INT64_MAX, 1 << 63]),
                                     edge))
    write_zeroes = data.draw(st.booleans())
    mark_kind = data.draw(st.sampled_from(["none", "bitarray", "bitarray", "bytearray",
                                           "frozen", "big", "bytes"]))
    nbits = data.draw(st.one_of(st.integers(0, 70), st.sampled_from([0, 1, 7, 9, 63, 65])))
    mark_base = data.draw(st.one_of(st.integers(0, 100), edge))
    mark_shift = data.draw(st.one_of(st.integers(0, 9), st.sampled_from([40, 41, -1, 1 << 31,
                                                                         1 << 64])))
    content = bytes((i * 7 + 1) % 256 if i % 5 else 0 for i in range(buf_len))
    fd_kind = data.draw(st.sampled_from(["file"] * 6 + [-1, 1 << 31, "x"]))
    results = []
    for be in BACKENDS:
        path = d / be.__name__
        path.write_bytes(b"\xee" * 16)
        fd = os.open(path, os.O_RDWR)
        mark = _mark(mark_kind, nbits)
        try:
            res = outcome(be.write_batch, [p[0] for p in pieces], [p[1] for p in pieces],
                          [p[2] for p in pieces], order, fd if fd_kind == "file" else fd_kind,
                          content, zero_chunk, write_zeroes, mark_base, mark_shift, mark)
            size = os.fstat(fd).st_size
            if res[0] == "ok":   # what was written where (sparse: read only the pieces)
                res += (size, [os.pread(fd, min(p[2], 100), p[1]) for p in pieces],
                        None if mark is None else bytes(memoryview(mark).cast("B")))
        finally:
            os.close(fd)
            path.unlink()
        results.append(res)
    assert results[0] == results[1]
    event(f"write_batch: {results[0][0]}")


@SETTINGS
@given(bitmaps, edge, st.one_of(st.none(), edge), st.one_of(st.none(), edge),
       st.booleans())
def test_bitmap_scans_edges(bits, start, end, nbits, as_bytes):
    src = bits.tobytes() if as_bytes else bits
    for name in ("bitmap_count", "bitmap_runs"):
        twins(name, lambda: (src, start, end, nbits))
    for value in (True, False):
        twins("bitmap_next", lambda: (src, start, value, end, nbits))


@SETTINGS
@given(st.binary(max_size=40), st.integers(-1, 1), st.sampled_from(["and", "or", "andnot",
                                                                    "xor", 0]),
       st.sampled_from(["new", "same", "short", "readonly", "bitarray"]))
def test_bitmap_op_edges(a, delta, op, out_kind):
    b = bytes(reversed(a))[:max(len(a) + delta, 0)] + b"\1" * max(delta, 0)

    def make():
        out = {"new": None, "same": bytearray(len(a)), "short": bytearray(max(len(a) - 1, 0)),
               "readonly": bytes(len(a)), "bitarray": bitarray(8 * len(a), endian="little")}
        return (bytearray(a), b, op, out[out_kind])
    results = twins("bitmap_op", make)
    if results[0][0][0] == "ok":
        assert bytes(results[0][1][3] or b"") == bytes(results[1][1][3] or b"")


@SETTINGS
@given(bitmaps, st.lists(st.tuples(edge, edge), max_size=4),
       st.one_of(st.sampled_from(GRANULARITIES + [0, -1, 1 << 63, 1 << 64]), edge),
       st.one_of(st.none(), edge))
def test_mask_extents_edges(bits, extents, granularity, nbits):
    g, ln = [e[0] for e in extents], [e[1] for e in extents]
    results = twins("bitmap_mask_extents", lambda: (g, ln, bits, granularity, nbits))
    if results[0][0][0] == "ok":
        out_g, out_len, out_idx = (r[1] for r in results[0][0][1])
        for og, ol, oi in zip(out_g, out_len, out_idx):
            assert ol > 0 and g[oi] <= og and og + ol <= g[oi] + ln[oi]


@SETTINGS
@given(st.lists(st.integers(0, 1), min_size=1, max_size=12),
       st.sampled_from(GRANULARITIES), st.data())
def test_mask_extents_huge_granularity(bools, gran, data):
    """Granularities of 2^61..2^63-1 over extents up to INT64_MAX: every piece
    is exact (compared with Python's big integers), in both back-ends."""
    bits = bitarray(bools, endian="little")
    start = min(data.draw(st.sampled_from([0, 1, gran - 1, gran, INT64_MAX - 1])),
                INT64_MAX - 1)
    length = data.draw(st.sampled_from([1, gran, INT64_MAX - start]))
    length = max(1, min(length, INT64_MAX - start))
    expect = []
    for i, v in enumerate(bools):
        lo, hi = max(start, i * gran), min(start + length, (i + 1) * gran)
        if v and lo < hi:
            if expect and expect[-1][0] + expect[-1][1] == lo:
                expect[-1][1] += hi - lo
            else:
                expect.append([lo, hi - lo])
    for be in BACKENDS:
        g, ln, _ = be.bitmap_mask_extents([start], [length], bits, gran)
        assert [list(x) for x in zip(g.tolist(), ln.tolist())] == expect


@SETTINGS
@given(st.sampled_from(["file", -1, 1 << 31, 1 << 63, "x"]), edge, edge)
def test_start_writeback_edges(tmp_path_factory, fd_kind, offset, length):
    """A hint: never raises in either back-end, whatever the range, and changes
    no byte."""
    path = tmp_path_factory.mktemp("wbk") / "f"
    path.write_bytes(b"\x07" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        use_fd = fd if fd_kind == "file" else fd_kind
        twins("start_writeback", lambda: (use_fd, offset, length))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\x07" * 4096
