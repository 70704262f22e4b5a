"""The C functions and their pure-Python twins honour one contract."""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qcow2py import CorruptImageError, native
from qcow2py.native import backend_c, backend_pure



def test_native_module_is_built():
    # the package must ship its C module unless the pure twins were asked for
    assert native.HAVE_NATIVE


@settings(deadline=None)
@given(st.binary(max_size=300), st.integers(0, 299))
def test_is_zero_twins(data, pos):
    assert backend_c.is_zero(data) == backend_pure.is_zero(data) == (data.count(0) == len(data))
    z = bytearray(300)
    assert backend_c.is_zero(z) and backend_pure.is_zero(z)
    z[pos] = 1
    assert not backend_c.is_zero(z) and not backend_pure.is_zero(z)


def _entry_strategy(cluster_bits):
    cs = 1 << cluster_bits
    aligned = st.integers(0, (1 << 40) // cs).map(lambda c: c * cs)
    std = st.tuples(aligned, st.booleans(), st.booleans()).map(
        lambda t: t[0] | (t[1] << 63) | int(t[2]))
    compressed = st.integers(0, (1 << 62) - 1).map(lambda v: v | (1 << 62))
    junk = st.integers(0, (1 << 64) - 1)
    return st.one_of(std, std, compressed, junk)


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from([9, 12, 14, 16, 21]), st.booleans(), st.booleans())
def test_decode_l2_twins(data, cluster_bits, extended, external):
    if extended and cluster_bits < 14:
        extended = False
    n = data.draw(st.integers(1, 40))
    entries = data.draw(st.lists(_entry_strategy(cluster_bits), min_size=n, max_size=n))
    words = []
    for e in entries:
        words.append(e)
        if extended:
            words.append(data.draw(st.one_of(st.just(0), st.integers(0, (1 << 64) - 1),
                                             st.integers(0, 0xFFFFFFFF))))
    table = b"".join(w.to_bytes(8, "big") for w in words)
    results = []
    for fn in (backend_c.decode_l2, backend_pure.decode_l2):
        try:
            k, h = fn(table, cluster_bits, extended, external)
            results.append(("ok", k.tolist(), h.tolist()))
        except CorruptImageError as e:
            results.append(("err", str(e)))
    assert results[0] == results[1]


def test_decode_l2_kinds():
    cs_bits = 16
    table = b"".join(v.to_bytes(8, "big") for v in [
        0, 1, (5 << 16) | 1, (7 << 16) | (1 << 63), (1 << 62) | 12345])
    for fn in (backend_c.decode_l2, backend_pure.decode_l2):
        k, h = fn(table, cs_bits)
        assert k.tolist() == [native.UNALLOCATED, native.ZERO, native.ZERO_ALLOC, native.DATA,
                              native.COMPRESSED]
        assert h.tolist() == [0, 0, 5 << 16, 7 << 16, 12345]


@pytest.mark.parametrize("bad", [(1 << 62) | (1 << 63), 1 << 5, (3 << 16) | 0x1000, 1 << 60])
def test_decode_l2_rejects(bad):
    table = (0).to_bytes(8, "big") + bad.to_bytes(8, "big")
    for fn in (backend_c.decode_l2, backend_pure.decode_l2):
        with pytest.raises(CorruptImageError, match="L2 entry 1"):
            fn(table, 16)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 3000)), max_size=20))
def test_pread_runs_twins(tmp_path_factory, runs):
    path = tmp_path_factory.mktemp("runs") / "f"
    content = os.urandom(6000)
    path.write_bytes(content)
    buf_offs, host_offs, lens, pos = [], [], [], 0
    for host, n in runs:
        buf_offs.append(pos)
        host_offs.append(host)
        lens.append(n)
        pos += n
    fd = os.open(path, os.O_RDONLY)
    try:
        outs = []
        for fn in (backend_c.pread_runs, backend_pure.pread_runs):
            buf = bytearray(b"\xff" * pos)
            fn(fd, buf, np.array(buf_offs, np.int64), np.array(host_offs, np.int64),
               np.array(lens, np.int64))
            outs.append(bytes(buf))
        expect = b"".join(content[h:h + n].ljust(n, b"\0") for h, n in runs)
        assert outs[0] == outs[1] == expect
        with pytest.raises(ValueError):
            backend_c.pread_runs(fd, bytearray(10), np.array([5], np.int64),
                                     np.array([0], np.int64), np.array([6], np.int64))
    finally:
        os.close(fd)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_write_batch_twins(tmp_path_factory, data):
    """Pieces of a buffer (overlapping, out of order) written by target offset."""
    d = tmp_path_factory.mktemp("wbatch")
    buf = bytearray(b"".join(data.draw(st.lists(
        st.sampled_from([b"\0" * 512, b"\7" * 512, b"\0" * 100 + b"\3" + b"\0" * 411]),
        min_size=1, max_size=12))))
    n = data.draw(st.integers(0, 10))
    pieces = []
    for _ in range(n):
        off = data.draw(st.integers(0, len(buf)))
        pieces.append((off, data.draw(st.integers(0, len(buf) - off))))
    dst_off, pos = [0] * n, 5
    for i in data.draw(st.permutations(range(n))):      # laid out in some order
        dst_off[i] = pos
        pos += pieces[i][1] + data.draw(st.sampled_from([0, 0, 300]))   # some gather
    order = sorted(range(n), key=lambda i: dst_off[i])
    zero_chunk = data.draw(st.sampled_from([0, 512, 1024]))
    write_zeroes = data.draw(st.booleans())
    results = []
    for fn in (backend_c.write_batch, backend_pure.write_batch):
        dst = d / f"dst-{fn.__module__.rsplit('.', 1)[-1]}"
        dst.write_bytes(b"\xee" * (pos + 10))
        dfd = os.open(dst, os.O_RDWR)
        mark = bytearray(64)
        try:
            stats = fn([p[0] for p in pieces], dst_off, [p[1] for p in pieces], order, dfd,
                       buf, zero_chunk, write_zeroes, 0, 9, mark)
        finally:
            os.close(dfd)
        results.append((list(stats), dst.read_bytes(), bytes(mark)))
    assert results[0] == results[1]
    out = results[0][1]
    assert results[0][0][1] + results[0][0][2] == sum(p[1] for p in pieces)
    for (bo, ln), do in zip(pieces, dst_off):
        got, want = out[do:do + ln], bytes(buf[bo:bo + ln])
        if zero_chunk == 0 or write_zeroes:      # else a zero chunk keeps the old bytes
            assert got == want
    with pytest.raises(ValueError):
        backend_c.write_batch([len(buf)], [0], [1], [0], 1, buf)


# ---------------------------------------------------------------- bitmaps
def _bits_strategy(max_bits=700):
    """Bitmaps with long runs, random noise and word-boundary cases."""
    def build(args):
        n, chunks = args
        out = []
        for kind, ln in chunks:
            out += [kind == "one" or (kind == "mix" and (ln * 7 + len(out)) % 3 == 0)] * ln
        return (out + [False] * n)[:n]
    chunk = st.tuples(st.sampled_from(["one", "zero", "mix"]), st.integers(1, 130))
    structured = st.tuples(st.integers(0, max_bits), st.lists(chunk, max_size=12)).map(build)
    noise = st.lists(st.booleans(), max_size=max_bits)
    return st.one_of(structured, noise)


def _bitarray(bools):
    from bitarray import bitarray
    b = bitarray(len(bools), endian="little")
    b.setall(0)
    for i, v in enumerate(bools):
        b[i] = v
    return b


@settings(max_examples=300, deadline=None)
@given(_bits_strategy(), st.integers(-5, 720), st.one_of(st.none(), st.integers(-5, 720)))
def test_bitmap_scan_twins(bools, start, end):
    bits = _bitarray(bools)
    n = len(bools)
    a, b = max(0, start), (n if end is None else min(end, n))
    want = [i for i in range(a, b) if bools[i]]
    for count in (backend_c.bitmap_count, backend_pure.bitmap_count):
        assert count(bits, start, end) == len(want)
    runs = []
    for i in want:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    for fn in (backend_c.bitmap_runs, backend_pure.bitmap_runs):
        s, ln = fn(bits, start, end)
        assert [list(x) for x in zip(s.tolist(), ln.tolist())] == runs
    for value in (True, False):
        hits = [i for i in range(a, b) if bools[i] == value]
        expect = hits[0] if hits else -1
        assert backend_c.bitmap_next(bits, start, value, end) == expect
        assert backend_pure.bitmap_next(bits, start, value, end) == expect
    # a plain buffer with nbits: padding bits past nbits are ignored
    raw = bytearray(bits.tobytes())
    if raw and n % 8:
        raw[-1] |= 0xFF << (n % 8) & 0xFF
    for fn in (backend_c.bitmap_runs, backend_pure.bitmap_runs):
        s, ln = fn(raw, start, end, nbits=n)
        assert [list(x) for x in zip(s.tolist(), ln.tolist())] == runs
    assert backend_c.bitmap_count(raw, start, end, nbits=n) == len(want)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.data())
def test_bitmap_op_twins(a, data):
    b = data.draw(st.binary(min_size=len(a), max_size=len(a)))
    for op, f in (("and", lambda x, y: x & y), ("or", lambda x, y: x | y),
                  ("andnot", lambda x, y: x & ~y & 0xFF)):
        want = bytes(f(x, y) for x, y in zip(a, b))
        assert bytes(backend_c.bitmap_op(a, b, op)) == want
        assert bytes(backend_pure.bitmap_op(a, b, op)) == want
        inplace = bytearray(a)
        backend_c.bitmap_op(inplace, b, op, out=inplace)
        assert bytes(inplace) == want
    with pytest.raises(ValueError):
        backend_c.bitmap_op(a, b, "xor")
    with pytest.raises(ValueError):
        backend_c.bitmap_op(a + b"x", b, "or")


@settings(max_examples=200, deadline=None)
@given(_bits_strategy(300), st.sampled_from([1, 3, 512, 4096]), st.data())
def test_bitmap_mask_extents_twins(bools, gran, data):
    bits = _bitarray(bools)
    n = data.draw(st.integers(0, 8))
    guest, length, pos = [], [], 0
    for _ in range(n):
        pos += data.draw(st.integers(0, 3 * gran))
        ln = data.draw(st.integers(0, 40 * gran))
        guest.append(pos)
        length.append(ln)
        pos += ln
    outs = [fn(guest, length, bits, gran) for fn in
            (backend_c.bitmap_mask_extents, backend_pure.bitmap_mask_extents)]
    assert [o.tolist() for o in outs[0]] == [o.tolist() for o in outs[1]]
    # byte by byte: a byte is kept iff it lies in an extent and under a set bit
    keep = set()
    for g, ln in zip(guest, length):
        for x in range(g, g + ln):
            if x // gran < len(bools) and bools[x // gran]:
                keep.add(x)
    got = set()
    for g, ln in zip(outs[0][0].tolist(), outs[0][1].tolist()):
        assert ln > 0
        got.update(range(g, g + ln))
    assert got == keep
    with pytest.raises(ValueError):
        backend_c.bitmap_mask_extents([-1], [5], bits, gran)


def test_bitmap_rejects_big_endian_bitarrays():
    from bitarray import bitarray
    for fn in (backend_c.bitmap_runs, backend_pure.bitmap_runs):
        with pytest.raises(ValueError, match="little"):
            fn(bitarray(16, endian="big"))


@pytest.mark.parametrize("density", [0.0, 0.001, 0.01, 0.5, 0.99, 1.0])
def test_bitmap_scans_large_twins(density):
    from bitarray import bitarray
    rng = np.random.default_rng(int(density * 1000))
    n = 300_000 + 37                               # many words, a partial last byte
    bools = rng.random(n) < density
    bits = bitarray(endian="little")
    bits.frombytes(np.packbits(bools, bitorder="little").tobytes())
    del bits[n:]
    for start, end in ((0, None), (63, 64 * 4000 + 1), (5, n - 3), (n - 70, n)):
        a = [x.tolist() for x in backend_c.bitmap_runs(bits, start, end)]
        assert a == [x.tolist() for x in backend_pure.bitmap_runs(bits, start, end)]
        assert backend_c.bitmap_count(bits, start, end) == \
            backend_pure.bitmap_count(bits, start, end)
        for v in (True, False):
            assert backend_c.bitmap_next(bits, start, v, end) == \
                backend_pure.bitmap_next(bits, start, v, end)
    g = np.arange(0, n * 512, 3 << 20, dtype=np.int64)
    ln = np.full(g.size, 1 << 20, dtype=np.int64)
    x = backend_c.bitmap_mask_extents(g, ln, bits, 512)
    y = backend_pure.bitmap_mask_extents(g, ln, bits, 512)
    assert [v.tolist() for v in x] == [v.tolist() for v in y]
