"""close() keeps QEMU's durability order under faults (issue #11): the data path
(data, L2 tables, refcounts) is committed before the persistent bitmaps are
stored, so ENOSPC or EIO while storing them never brings old data back; and a
failing close still closes the files and drops their locks."""

import errno

import pytest

import qcow2py
from qcow2py.io.wrappers import FaultStorage, ForwardingStorage
from qemu import qemu_img

MiB = 1 << 20


def _image_with_bitmap(tmp_path):
    p = tmp_path / "b.qcow2"
    qcow2py.create(p, 4 * MiB).close()
    with qcow2py.open(p, "r+") as img:
        img.write(0, b"\xaa" * MiB)
        img.add_bitmap("b0")
    return p


def _open_faulty(p):
    holder = {}

    def wrap(st):
        holder["f"] = FaultStorage(st)
        return holder["f"]

    img = qcow2py.open(p, "r+", storage_wrapper=wrap)
    return img, holder["f"]


def _writes_of_flush(tmp_path) -> int:
    """How many writes the data path's flush takes after the workload below."""
    img, f = _open_faulty(_image_with_bitmap(tmp_path))
    img.write_zeroes(0, MiB)
    counter = f.fail("write", errno.EIO, after=1 << 40)      # never fires: counts
    img.flush()
    n = counter.seen
    img.close()
    return n


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
def test_failed_bitmap_store_keeps_a_completed_write_zeroes(tmp_path, error):
    probe = tmp_path / "probe"
    probe.mkdir()
    flush_writes = _writes_of_flush(probe)
    assert flush_writes >= 1
    failures = inconsistent = 0
    for n in range(flush_writes, flush_writes + 12):
        d = tmp_path / f"n{n}"
        d.mkdir()
        p = _image_with_bitmap(d)
        img, f = _open_faulty(p)
        img.write_zeroes(0, MiB)
        rule = f.fail("write", error, after=n, count=None)
        try:
            img.close()
        except OSError as e:
            assert e.errno == error, f"fault after write {n}: {e}"
            failures += 1
        assert img.closed
        # the write_zeroes completed before close: it must survive the failed store
        with qcow2py.open(p) as r:
            assert r.read(0, MiB) == bytes(MiB), f"fault after write {n}: old data is back"
            # before the header switch the bitmap stays in_use (inconsistent), after
            # it the new one is in place: either way it is there, never half-stored
            assert [b.name for b in r.bitmaps] == ["b0"], f"fault after write {n}"
            inconsistent += bool(r.bitmaps[0].inconsistent)
        rc = qemu_img("check", p, check=False)
        assert rc.returncode in (0, 3), f"fault after write {n}:\n{rc.stdout}{rc.stderr}"
        with qcow2py.open(p, "r+") as again:     # the failed close dropped its locks
            assert again.read(MiB, 64) == bytes(64)
        if rule.fired == 0:
            break
    assert failures >= 2 and inconsistent >= 1, \
        "faults hardly hit the bitmap store: the test exercised nothing"


def test_failed_data_flush_in_close_still_closes_and_stays_consistent(tmp_path):
    """A fault in the data path's own flush: close reports it, still closes the
    files and drops the locks, and the image is consistent (old data or new, and
    qemu-img check clean or with leaks only)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    flush_writes = _writes_of_flush(probe)
    for n in range(flush_writes):
        d = tmp_path / f"n{n}"
        d.mkdir()
        p = _image_with_bitmap(d)
        img, f = _open_faulty(p)
        img.write_zeroes(0, MiB)
        f.fail("write", errno.ENOSPC, after=n, count=None)
        with pytest.raises(OSError):
            img.close()
        assert img.closed
        with qcow2py.open(p, "r+") as again:
            data = again.read(0, MiB)
            assert data in (bytes(MiB), b"\xaa" * MiB), f"fault after write {n}: torn"
        rc = qemu_img("check", p, check=False)
        assert rc.returncode in (0, 3), f"fault after write {n}:\n{rc.stdout}{rc.stderr}"


class _FailingClose(ForwardingStorage):
    """A file whose close fails after closing it (as a close reporting a late
    write-back error does)."""

    def close(self) -> None:
        self.inner.close()
        raise OSError(errno.EIO, "close failed", self.name)


@pytest.mark.parametrize("failing", ["data file", "backing file"])
def test_a_failing_close_below_still_closes_the_image(tmp_path, failing):
    """The external data file's or the backing file's close failing: the error
    reaches the caller, and the image's own file is closed and unlocked anyway."""
    base, top, raw = tmp_path / "base.qcow2", tmp_path / "top.qcow2", tmp_path / "d.raw"
    if failing == "data file":
        qcow2py.create(top, MiB, data_file=str(raw)).close()
    else:
        qcow2py.create(base, MiB).close()
        qcow2py.create(top, MiB, backing_file=str(base), backing_format="qcow2").close()

    def wrap(st):
        victim = raw if failing == "data file" else base
        return _FailingClose(st) if st.name == str(victim) else st

    img = qcow2py.open(top, "r+", storage_wrapper=wrap, wrap_chain=True)
    img.write(0, b"w" * 4096)
    with pytest.raises(OSError, match="close failed"):
        img.close()
    assert img.closed
    with qcow2py.open(top, "r+") as again:          # locks dropped, data flushed
        assert again.read(0, 4096) == b"w" * 4096
