"""``read()`` allocates its result once and fills it in place; ``read_into`` allocates
nothing of the request's size.  A copy (bytearray then bytes) or a temporary of the
request's size doubles the memory traffic and the page faults of every large read."""

from __future__ import annotations

import tracemalloc

import pytest

import qcow2py

MiB = 1 << 20
N = 8 * MiB


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        keep = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
        del keep
    finally:
        tracemalloc.stop()
    return peak


@pytest.fixture(params=["qcow2", "raw"])
def image(tmp_path, request):
    path = tmp_path / f"a.{request.param}"
    img = qcow2py.create(path, 16 * MiB, format=request.param)
    img.write(MiB, bytes(range(256)) * (3 * MiB // 256))       # data, then a hole
    img.close()
    with qcow2py.open(path) as img:
        yield img


def test_read_allocates_its_result_once(image):
    expected = image.read(0, N)
    assert type(expected) is bytes and len(expected) == N
    assert expected[MiB:MiB + 256] == bytes(range(256)) and expected[5 * MiB:] == bytes(3 * MiB)
    peak = _peak(lambda: image.read(0, N))
    assert peak < 1.25 * N, f"read({N}) peaked at {peak / N:.2f}x its size"


def test_read_into_allocates_nothing_of_its_size(image):
    buf = bytearray(b"\xff" * N)
    image.read_into(buf, 0)                       # warm up (decoded tables, numpy import)
    assert bytes(buf) == image.read(0, N)         # the hole reads as zeros, not the old 0xff
    peak = _peak(lambda: image.read_into(buf, 0))
    assert peak < 0.25 * N, f"read_into of {N} bytes peaked at {peak / N:.2f}x its size"


def test_small_reads_are_fresh_objects(image):
    """Below the in-place size the result is an ordinary copy: never a shared
    (cached) bytes object that the reader would write into."""
    pattern = bytes(range(256)) * 16
    for n in (0, 1, 2, 100, 4095):
        assert image.read(MiB, n) == pattern[:n]
    assert bytes(1) == b"\x00" and bytes(2) == b"\x00\x00" and bytes(0) == b""
