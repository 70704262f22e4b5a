"""Refcount block packing at every width, and against blocks QEMU wrote."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qcow2py.format import refcount
from qcow2py.format.header import Header
from qemu import create, qemu_io


@pytest.mark.parametrize("order", range(7))
@given(seed=st.integers(0, 2**32 - 1), edge=st.booleans())
@settings(deadline=None)       # wall time on a loaded 2-core CI machine is not the property
def test_round_trip(order, seed, edge):
    bits = 1 << order
    n = 4096 * 8 // bits
    top = (1 << bits) - 1
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, top, size=n, dtype=np.uint64, endpoint=True)
    if edge:
        arr[::7] = top
    vals = arr.tolist()
    block = refcount.encode_block(arr, order)
    assert len(block) == 4096
    assert refcount.decode_block(block, order).tolist() == vals


def test_sub_byte_packing_is_lsb_first():
    # 1-bit refcounts: entry i is bit i%8 of byte i//8
    assert refcount.decode_block(b"\x05", 0).tolist() == [1, 0, 1, 0, 0, 0, 0, 0]
    assert refcount.decode_block(b"\x1b", 1).tolist() == [3, 2, 1, 0]
    assert refcount.encode_block(np.array([1, 0, 1, 0, 0, 0, 0, 0]), 0) == b"\x05"


def test_value_too_wide():
    with pytest.raises(Exception, match="does not fit"):
        refcount.encode_block(np.array([2] * 8), 0)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_qemu_refcounts(tmp_path, bits):
    """A fresh QEMU image: clusters 0-3 (header, reftable, refblock, L1) + L2 + data are 1."""
    path = tmp_path / "r.qcow2"
    create(path, "16M", f"refcount_bits={bits}")
    qemu_io(path, "write -P 1 0 64k")
    raw = path.read_bytes()
    h = Header.parse(raw[:65536])
    table = refcount.decode_table(raw[h.refcount_table_offset:
                                      h.refcount_table_offset + h.cluster_size])
    block = raw[table[0]:table[0] + h.cluster_size]
    counts = refcount.decode_block(block, h.refcount_order)
    used = len(raw) // h.cluster_size
    assert counts[:used].tolist() == [1] * used
    assert not counts[used:].any()
