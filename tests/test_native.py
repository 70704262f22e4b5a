"""The C functions and their pure-Python twins honour one contract."""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qcow2py import CorruptImageError, native

pytestmark = pytest.mark.skipif(not native.HAVE_NATIVE and not os.environ.get("QCOW2PY_PURE"),
                                reason="native module not built")


def test_native_module_is_built():
    # the package must ship its C module unless the pure twins were asked for
    assert native.HAVE_NATIVE or os.environ.get("QCOW2PY_PURE")


@given(st.binary(max_size=300), st.integers(0, 299))
def test_is_zero_twins(data, pos):
    assert native.is_zero_native(data) == native.is_zero_pure(data) == (data.count(0) == len(data))
    z = bytearray(300)
    assert native.is_zero_native(z) and native.is_zero_pure(z)
    z[pos] = 1
    assert not native.is_zero_native(z) and not native.is_zero_pure(z)


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
    for fn in (native.decode_l2_native, native.decode_l2_pure):
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
    for fn in (native.decode_l2_native, native.decode_l2_pure):
        k, h = fn(table, cs_bits)
        assert k.tolist() == [native.UNALLOCATED, native.ZERO, native.ZERO_ALLOC, native.DATA,
                              native.COMPRESSED]
        assert h.tolist() == [0, 0, 5 << 16, 7 << 16, 12345]


@pytest.mark.parametrize("bad", [(1 << 62) | (1 << 63), 1 << 5, (3 << 16) | 0x1000, 1 << 60])
def test_decode_l2_rejects(bad):
    table = (0).to_bytes(8, "big") + bad.to_bytes(8, "big")
    for fn in (native.decode_l2_native, native.decode_l2_pure):
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
        for fn in (native.pread_runs_native, native.pread_runs_pure):
            buf = bytearray(b"\xff" * pos)
            fn(fd, buf, np.array(buf_offs, np.int64), np.array(host_offs, np.int64),
               np.array(lens, np.int64))
            outs.append(bytes(buf))
        expect = b"".join(content[h:h + n].ljust(n, b"\0") for h, n in runs)
        assert outs[0] == outs[1] == expect
        with pytest.raises(ValueError):
            native.pread_runs_native(fd, bytearray(10), np.array([5], np.int64),
                                     np.array([0], np.int64), np.array([6], np.int64))
    finally:
        os.close(fd)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_copy_extents_twins(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("copy")
    src = d / "src"
    blocks = data.draw(st.lists(st.sampled_from([b"\0" * 512, b"\x07" * 512, b"\0" * 100 + b"\1" + b"\0" * 411]),
                                min_size=4, max_size=40))
    content = b"".join(blocks)
    src.write_bytes(content)
    n = data.draw(st.integers(0, 8))
    exts = [(data.draw(st.integers(0, len(content) + 600)), data.draw(st.integers(0, 3000)))
            for _ in range(n)]
    zero_chunk = data.draw(st.sampled_from([0, 512, 4096]))
    write_zeroes = data.draw(st.booleans())
    buf_len = data.draw(st.sampled_from([512, 1000, 65536]))
    dst_off, pos = [], 7
    for _, ln in exts:
        dst_off.append(pos)
        pos += ln + data.draw(st.integers(0, 1000))
    results = []
    for fn in (native.copy_extents_native, native.copy_extents_pure):
        dst = d / f"dst-{fn.__name__}"
        dst.write_bytes(b"\xee" * pos)
        sfd = os.open(src, os.O_RDONLY)
        dfd = os.open(dst, os.O_RDWR)
        mark = bytearray(8)
        try:
            stats = fn([sfd] * n, [e[0] for e in exts], dst_off, [e[1] for e in exts], dfd,
                       buf_len, zero_chunk, write_zeroes, 0, 9, mark)
        finally:
            os.close(sfd)
            os.close(dfd)
        results.append((list(stats), dst.read_bytes(), bytes(mark)))
    assert results[0] == results[1]
    # the target holds the source bytes, except zero chunks that were skipped
    out = results[0][1]
    for (so, ln), do in zip(exts, dst_off):
        want = content[so:so + ln].ljust(ln, b"\0")
        got = out[do:do + ln]
        if zero_chunk == 0 or write_zeroes:
            assert got == want
        else:
            assert all(g == w or (w == 0 and g == 0xEE) for g, w in zip(got, want))
