"""io/wrappers.py: the forwarding base and fault injection (EIO, ENOSPC, delays)
through a real image, so the error paths a backup job will meet are exercised."""

import errno
import time

import pytest

import qcow2py
from qcow2py.io.storage import FileStorage, MemoryStorage
from qcow2py.io.wrappers import FaultStorage, ForwardingStorage, UnsafeStorage


def _fresh(tmp_path, size=1 << 20):
    p = tmp_path / "t.qcow2"
    qcow2py.create(p, size).close()
    return p


def test_forwarding_hides_the_descriptor_unless_asked(tmp_path):
    st = FileStorage(str(_fresh(tmp_path)))
    try:
        assert ForwardingStorage(st).fileno() is None and not ForwardingStorage(st).native_io
        assert UnsafeStorage(st).fileno() == st.fileno() and UnsafeStorage(st).native_io
    finally:
        st.close()


def test_eio_on_a_data_write_reaches_the_caller(tmp_path):
    p = _fresh(tmp_path)
    holder = {}

    def wrap(st):
        holder["f"] = FaultStorage(st)
        return holder["f"]

    with qcow2py.open(p, "r+", storage_wrapper=wrap) as img:
        rule = holder["f"].fail("write", errno.EIO)
        with pytest.raises(OSError) as e:
            img.write(0, b"x" * 65536)
        assert e.value.errno == errno.EIO and rule.fired == 1
        img.write(0, b"y" * 65536)              # the rule fired once: writes work again
        img.flush()
    with qcow2py.open(p) as img:
        assert img.read(0, 65536) == b"y" * 65536


def test_enospc_after_n_writes_and_on_fsync(tmp_path):
    st = FaultStorage(MemoryStorage())
    st.fail("write", errno.ENOSPC, after=2, count=None)
    st.pwrite(b"a", 0)
    st.pwrite(b"b", 1)
    for _ in range(3):
        with pytest.raises(OSError) as e:
            st.pwrite(b"c", 2)
        assert e.value.errno == errno.ENOSPC
    assert st.pread(0, 3) == b"ab\0"
    st.fail("fsync", errno.EIO)
    with pytest.raises(OSError):
        st.fsync()
    st.fsync()


def test_range_and_delay_rules(tmp_path):
    st = FaultStorage(MemoryStorage(bytes(8192)))
    st.fail("read", errno.EIO, offset=4096, length=512)
    assert st.pread(0, 4096) == bytes(4096)          # outside the range
    with pytest.raises(OSError):
        st.pread(4000, 200)                          # overlaps it
    slow = st.fail("read", None, delay=0.05)
    t = time.perf_counter()
    assert st.pread(0, 16) == bytes(16)
    assert time.perf_counter() - t >= 0.05 and slow.fired == 1
    with pytest.raises(ValueError):
        st.fail("flush")
