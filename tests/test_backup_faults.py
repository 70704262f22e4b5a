"""Failing and slow temps (on_cbw_error, cbw_timeout) and SIGKILL during fleecing."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import qcow2py
from qcow2py import backup
from qcow2py.storage import Storage
from qemu import need, qemu_img, qemu_io

K64 = 65536
SIZE = 4 << 20


class FaultyStorage(Storage):
    """Passes everything to ``inner``; while ``armed``, each pwrite first sleeps
    ``delay`` seconds and then fails with EIO if ``eio``."""

    def __init__(self, inner: Storage):
        self.inner = inner
        self.name = inner.name
        self.writable = inner.writable
        self.armed = False
        self.eio = False
        self.delay = 0.0
        self.failed = 0

    def size(self):
        return self.inner.size()

    def allocated_size(self):
        return self.inner.allocated_size()

    def pread_into(self, buf, offset):
        return self.inner.pread_into(buf, offset)

    def read_runs(self, buf, buf_offsets, host_offsets, lengths):
        self.inner.read_runs(buf, buf_offsets, host_offsets, lengths)

    def pwrite(self, data, offset):
        if self.armed:
            if self.delay:
                time.sleep(self.delay)
            if self.eio:
                self.failed += 1
                raise OSError(errno.EIO, "injected I/O error", self.name)
        self.inner.pwrite(data, offset)

    def fsync(self):
        self.inner.fsync()

    def truncate(self, size):
        self.inner.truncate(size)

    def allocation(self, offset, length):
        return self.inner.allocation(offset, length)

    def close(self):
        self.inner.close()


def _fleece(tmp_path, **kw):
    need("qemu-img")
    path = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-f", "qcow2", path, str(SIZE))
    qemu_io(path, f"write -P 0x11 0 {SIZE}")
    wrapped = []

    def wrap(st):
        f = FaultyStorage(st)
        wrapped.append(f)
        return f
    disk = qcow2py.open(path, "r+")
    fl = backup.fleece(disk, str(tmp_path / "temp.qcow2"), temp_storage_wrapper=wrap, **kw)
    return path, disk, fl, wrapped[0]


def test_break_guest_write_fails_the_write(tmp_path):
    path, disk, fl, faulty = _fleece(tmp_path)
    with disk, fl:
        faulty.armed = faulty.eio = True
        with pytest.raises(OSError) as ei:
            fl.disk.write(K64 + 100, b"\x22" * 1000)
        assert ei.value.errno == errno.EIO and faulty.failed
        assert disk.read(K64, K64) == b"\x11" * K64          # the guest write never happened
        assert fl.snapshot.read(K64, K64) == b"\x11" * K64   # the snapshot is intact
        faulty.armed = False
        fl.disk.write(K64 + 100, b"\x22" * 1000)            # works once the temp does
        assert fl.snapshot.read(K64, K64) == b"\x11" * K64
        res = backup.push(fl.snapshot, str(tmp_path / "t.qcow2"))
        assert res.bytes_total == SIZE
    qemu_img("check", path)


def test_break_snapshot_lets_the_write_through(tmp_path):
    path, disk, fl, faulty = _fleece(tmp_path, on_cbw_error="break-snapshot")
    with disk, fl:
        faulty.armed = faulty.eio = True
        fl.disk.write(K64 + 100, b"\x22" * 1000)
        assert disk.read(K64 + 100, 1000) == b"\x22" * 1000
        for off in (0, K64, 3 * K64):                         # every read fails now
            with pytest.raises(qcow2py.SnapshotAccessError):
                fl.snapshot.read(off, 1)
        with pytest.raises(qcow2py.SnapshotAccessError):
            backup.push(fl.snapshot, str(tmp_path / "t.qcow2"))
        fl.disk.write(5 * K64, b"\x33")                     # no more copies are tried
        assert faulty.failed == 1
    assert not (tmp_path / "temp.qcow2").exists()      # a failing temp did not stop the clean-up
    qemu_img("check", path)


def test_cbw_timeout(tmp_path):
    path, disk, fl, faulty = _fleece(tmp_path, cbw_timeout=0.15)
    with disk, fl:
        faulty.armed, faulty.delay = True, 0.8
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            fl.disk.write(0, b"\x22" * 10)
        assert time.monotonic() - t0 < 0.7
        assert disk.read(0, 10) == b"\x11" * 10
        assert fl.snapshot.read(0, K64) == b"\x11" * K64
        faulty.armed = False
    qemu_img("check", path)

    path, disk, fl, faulty = _fleece(tmp_path / "..", cbw_timeout=0.15,
                                     on_cbw_error="break-snapshot", overwrite_temp=True)
    with disk, fl:
        faulty.armed, faulty.delay = True, 0.8
        t0 = time.monotonic()
        fl.disk.write(0, b"\x22" * 10)
        assert time.monotonic() - t0 < 0.7
        assert disk.read(0, 10) == b"\x22" * 10
        with pytest.raises(qcow2py.SnapshotAccessError):
            fl.snapshot.read(2 * K64, 1)
        faulty.delay = 0
    qemu_img("check", path)


CHILD = textwrap.dedent("""
    import random, sys, threading
    import qcow2py
    from qcow2py import backup
    disk = qcow2py.open(sys.argv[1], "r+")
    fl = backup.fleece(disk, sys.argv[2], ram_cache=1 << 20)
    def work(t):
        rng = random.Random(t)
        i = 0
        while True:
            off = rng.randrange(0, disk.size - 70000)
            fl.disk.write(off, rng.randbytes(rng.randrange(1, 70000)))
            i += 1
            if i % 20 == 0:
                fl.disk.flush()
            if t == 0 and i == 30:
                print("go", flush=True)
    ths = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(4)]
    for th in ths:
        th.start()
    snap = fl.snapshot
    while True:
        snap.read(random.randrange(0, disk.size - 4096), 4096)
""")


@pytest.mark.parametrize("delay", [0.05, 0.3])
def test_sigkill_during_fleecing_leaves_the_disk_clean(tmp_path, delay):
    need("qemu-img")
    path, temp = str(tmp_path / "disk.qcow2"), str(tmp_path / "temp.qcow2")
    qemu_img("create", "-f", "qcow2", path, "16M")
    qemu_io(path, "write -P 0x5d 0 8M")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen([sys.executable, "-c", CHILD, path, temp], stdout=subprocess.PIPE,
                         env=env)
    try:
        assert p.stdout.readline().strip() == b"go"
        time.sleep(delay)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    r = qemu_img("check", "--output=json", path, check=False)
    report = json.loads(r.stdout)
    assert r.returncode in (0, 3), r.stderr           # 3: leaked clusters only
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0
    qemu_img("check", "-r", "leaks", path, check=False)
    qemu_img("check", path)
    assert os.path.exists(temp)                  # disposable: a new fleecing replaces it
    with qcow2py.open(path, "r+") as disk:
        with backup.fleece(disk, temp, overwrite_temp=True) as fl:
            fl.disk.write(0, b"x")
            assert fl.snapshot.read(0, 1) != b"x"
    qemu_img("check", path)
