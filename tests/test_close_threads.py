"""Threads against close() and against bitmap scans.

* ``close()`` while other threads still write and read: requests already in
  flight finish (and are durable after close), later ones raise
  :class:`ImageClosedError`, never ValueError ("storage is closed") or EBADF.
* ``bm.dirty_extents()`` while another thread writes: every scan is a
  consistent view of the bits (sorted, disjoint, aligned, growing), never an
  AssertionError or garbage from a half-counted scan.

Seeded; the seed is in the failure message.  Bounded in time.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

import qcow2py
from qcow2py.errors import ImageClosedError
from qemu import create, qemu_img
from test_write_threads import busy_switching  # noqa: F401  (autouse: threads switch often)

MiB = 1 << 20
CLUSTER = 65536


@pytest.mark.parametrize("seed", range(1, 7))
def test_close_waits_for_requests_in_flight(tmp_path, seed):
    path = tmp_path / "img.qcow2"
    create(path, "8M")
    img = qcow2py.open(str(path), "r+")
    rng = random.Random(seed)
    done = {}                     # offset -> the last pattern whose write returned
    errors = []
    lock = threading.Lock()
    start = threading.Barrier(5)

    def writer(t: int) -> None:
        r = random.Random(seed * 100 + t)
        start.wait()
        n = 0
        while True:
            n += 1
            # 8 KiB slots, each written by one thread only: no two offsets overlap
            off = (t * 32 + r.randrange(32)) * CLUSTER + r.randrange(8) * 8192
            pattern = bytes([(t * 50 + n) % 255 + 1]) * r.choice((512, 4096, 8192))
            try:
                if n % 5 == 0:
                    img.read(off, len(pattern))
                    continue
                img.write(off, pattern)
            except ImageClosedError:
                return
            except BaseException as e:           # anything else is the bug
                errors.append(repr(e))
                return
            with lock:
                done[off] = pattern

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    start.wait()
    time.sleep(rng.uniform(0.05, 0.2))
    img.close()
    for th in threads:
        th.join(timeout=30)
        assert not th.is_alive(), f"seed {seed}: a writer hangs"
    assert not errors, f"seed {seed}: {errors}"
    assert done, f"seed {seed}: no write went through before close"
    with pytest.raises(ImageClosedError):
        img.write(0, b"x")
    with pytest.raises(ImageClosedError):
        img.read(0, 1)
    # close flushed: every write that returned before it is in the image (the last
    # of each slot, written by one thread, is what the slot reads)
    assert qemu_img("check", path, check=False).returncode == 0
    with qcow2py.open(str(path)) as check:
        for off, pattern in sorted(done.items()):
            assert check.read(off, len(pattern)) == pattern, f"seed {seed}: {off}"


def test_close_from_two_threads_at_once(tmp_path):
    path = tmp_path / "img.qcow2"
    create(path, "1M")
    for _ in range(20):
        img = qcow2py.open(str(path), "r+")
        img.write(0, b"\x01" * 4096)
        errs = []

        def closer():
            try:
                img.close()
            except BaseException as e:
                errs.append(repr(e))
        ts = [threading.Thread(target=closer) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=30)
        assert not errs, errs
    assert qemu_img("check", path, check=False).returncode == 0


@pytest.mark.parametrize("seed", [7, 8])
def test_dirty_extents_while_writing(tmp_path, seed):
    path = tmp_path / "img.qcow2"
    create(path, "64M")
    img = qcow2py.open(str(path), "r+")
    bm = img.add_bitmap("b", granularity=65536)
    stop = threading.Event()
    errors = []

    def writer() -> None:
        r = random.Random(seed)
        try:
            while not stop.is_set():
                img.write(r.randrange(64 * MiB - 8192), b"\x05" * r.choice((1, 512, 8192)))
        except BaseException as e:
            errors.append(repr(e))

    th = threading.Thread(target=writer)
    th.start()
    try:
        deadline = time.monotonic() + 1.0
        last_total = 0
        scans = 0
        while time.monotonic() < deadline:
            ext = bm.dirty_extents()
            scans += 1
            prev_end = -1
            for off, n in ext:
                assert n > 0 and off > prev_end and off % 65536 == 0, (seed, off, n)
                assert off + n <= img.size and (off + n) % 65536 == 0, (seed, off, n)
                prev_end = off + n
            total = sum(n for _, n in ext)
            assert total >= last_total, f"seed {seed}: bits went missing"
            assert bm.count_dirty() >= total
            last_total = total
    finally:
        stop.set()
        th.join(timeout=30)
        img.close()
    assert not errors, f"seed {seed}: {errors}"
    assert scans > 1 and last_total > 0
