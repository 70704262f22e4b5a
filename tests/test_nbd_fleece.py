"""Pull backup through qcow2py-nbd (--fleece and the control socket's fleece-*
commands) against real clients: qemu-io, qemu-img, nbdinfo, nbdcopy, and
qemu-nbd on a copy of the image as the reference."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from nbdtest import RawClient, nbd, qcow2py_nbd, qemu_io_nbd, qemu_nbd
from qemu import create, need, qemu_img, qemu_io

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
KiB = 1 << 10


def _check_clean(path) -> None:
    out = qemu_img("check", str(path)).stdout
    assert "No errors were found" in out, out


def _compare(a, b, fmt_a: str = "qcow2", fmt_b: str = "qcow2") -> None:
    p = qemu_img("compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b), check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def _qemu_io_raw(url: str, *commands: str) -> str:
    """qemu-io over NBD, returning its output whatever it says (for expected errors)."""
    need("qemu-io")
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    p = subprocess.run(args + [url], capture_output=True, text=True, timeout=60)
    return p.stdout + p.stderr


class Qmp:
    """A client of the control socket."""

    def __init__(self, path: str):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(30)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        assert "QMP" in json.loads(self.f.readline())

    def __call__(self, command: str, **arguments) -> dict:
        self.f.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.f.flush()
        return json.loads(self.f.readline())

    def ok(self, command: str, **arguments):
        reply = self(command, **arguments)
        assert "return" in reply, reply
        return reply["return"]

    def close(self) -> None:
        self.f.close()
        self.s.close()


def _exports(qmp: Qmp) -> list:
    return sorted(e["name"] for e in qmp.ok("query-exports"))


# -- QEMU's image-fleecing scenario over NBD -------------------------------------------
PATTERNS = [("0x5d", "0", "64k"), ("0xd5", "1M", "64k"), ("0xdc", "32M", "64k"),
            ("0xcd", "0x3ff0000", "64k")]
OVERWRITES = [("0xab", "0", "64k"), ("0xad", "0x00f8000", "64k"),
              ("0x1d", "0x2008000", "64k"), ("0xea", "0x3fe0000", "64k")]
ZEROS_AROUND = [("0", "0x00f8000", "32k"), ("0", "0x2010000", "32k"),
                ("0", "0x3fe0000", "64k")]


def _reads(triples):
    return [f"read -P {p} {o} {n}" for p, o, n in triples]


def test_image_fleecing_scenario(tmp_path):
    img, temp = tmp_path / "disk.qcow2", tmp_path / "temp.qcow2"
    create(img, 64 * MiB)
    qemu_io(img, *[f"write -P {p} {o} {n}" for p, o, n in PATTERNS])
    before = tmp_path / "before.qcow2"
    shutil.copy(img, before)
    with qcow2py_nbd(img, tmp_path, "--fleece", str(temp), "--ram-cache", "128k") as srv:
        assert temp.exists()
        qemu_io_nbd(srv.uri(), *[f"write -P {p} {o} {n}" for p, o, n in OVERWRITES])
        snap = srv.uri("snapshot")
        qemu_io_nbd(snap, *_reads(PATTERNS), *_reads(ZEROS_AROUND), read_only=True)
        qemu_io_nbd(srv.uri(), *_reads(OVERWRITES), read_only=True)
        # the snapshot export is writable on the wire (TRIM allowed), writes are EPERM
        listing = {e["export-name"]: e for e in
                   json.loads(nbd("nbdinfo", "--list", "--json", srv.uri()))["exports"]}
        assert not listing["snapshot"]["is_read_only"] and not listing[""]["is_read_only"]
        out = _qemu_io_raw(snap, "write -P 0x11 0 4k", "write -z 1M 64k")
        assert out.count("Operation not permitted") == 2, out
        # base:allocation of the snapshot: copied clusters are data, never holes
        assert nbd("nbdinfo", "--map", snap) == (
            "         0       65536    0  data\n"
            "     65536      917504    3  hole,zero\n"
            "    983040      131072    0  data\n"
            "   1114112    32440320    3  hole,zero\n"
            "  33554432      131072    0  data\n"
            "  33685504    33292288    3  hole,zero\n"
            "  66977792      131072    0  data\n")
        backup = tmp_path / "backup.qcow2"
        nbd("qemu-img", "convert", "-f", "raw", "-O", "qcow2", snap, str(backup))
        assert srv.stop() == 0
    _compare(backup, before)
    assert not temp.exists()
    qemu_io(img, *_reads(OVERWRITES))
    _check_clean(img)


# -- a pull backup while guests write ---------------------------------------------------
def _writer_ops(i: int) -> list:
    base = 8 + i * 24                     # MiB: each writer its own region
    ops = []
    for k in range(12):
        ops += [f"write -P {0x40 + i * 16 + k} {base + k}M 512k",
                f"write -P {0x80 + k} {(base + k) * MiB + 700 * KiB} 9k"]
    return ops + [f"write -z {base + 12}M 1M", f"discard {base + 14}M 2M",
                  f"aio_write -P 0x9{i} {base + 17}M 1M", "aio_flush"]


def test_pull_backup_while_guests_write(tmp_path):
    img, temp = tmp_path / "disk.qcow2", tmp_path / "temp.qcow2"
    create(img, 64 * MiB)
    qemu_io(img, "write -P 0x21 0 20M", "write -P 0x22 30M 6M", "write -z 40M 2M",
            "write -P 0x23 50M 14M")
    before, twin = tmp_path / "before.qcow2", tmp_path / "twin.qcow2"
    shutil.copy(img, before)
    shutil.copy(img, twin)
    backup = tmp_path / "backup.raw"
    with qcow2py_nbd(img, tmp_path, "--fleece", str(temp)) as srv:
        errors = []

        def writer(i):
            try:
                qemu_io_nbd(srv.uri(), *_writer_ops(i))
            except AssertionError as e:        # reported by the main thread
                errors.append(e)
        writers = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        for t in writers:
            t.start()
        nbd("nbdcopy", "--connections=4", "--requests=16", srv.uri("snapshot"), str(backup))
        for t in writers:
            t.join(120)
        assert not errors, errors
        nbd("nbdcopy", srv.uri("snapshot"), str(tmp_path / "again.raw"))     # after the writes
        assert srv.stop() == 0
    _compare(before, backup, fmt_b="raw")
    _compare(before, tmp_path / "again.raw", fmt_b="raw")
    for i in range(2):
        qemu_io(twin, *_writer_ops(i))
    _compare(img, twin)
    _check_clean(img)
    assert not temp.exists()


# -- discard-after-copy -------------------------------------------------------------------
def _temp_data_bytes(temp) -> int:
    """Bytes the temp itself holds (depth 0 data), by qemu-img's map of it (the
    temp's metadata is written at each snapshot discard)."""
    out = qemu_img("map", "-U", "--output=json", str(temp)).stdout
    return sum(e["length"] for e in json.loads(out) if e["depth"] == 0 and e["data"])


def test_trim_on_snapshot_frees_temp_and_later_reads_fail(tmp_path):
    img, temp = tmp_path / "disk.qcow2", tmp_path / "temp.qcow2"
    create(img, 16 * MiB)
    qemu_io(img, "write -P 0x31 0 4M")
    ctl = str(tmp_path / "ctl.sock")
    with qcow2py_nbd(img, tmp_path, "--fleece", str(temp), "--control", ctl) as srv:
        qmp = Qmp(ctl)
        qemu_io_nbd(srv.uri(), "write -P 0x32 0 2M")          # 2 MiB of copies in the temp
        st = qmp.ok("query-fleece")
        assert st["bytes_in_temp"] == 2 * MiB and st["cbw_bytes"] == 2 * MiB
        size_full = temp.stat().st_size
        assert size_full >= 2 * MiB
        snap = srv.uri("snapshot")
        # the backup client has 0..1M+4k: whole clusters inside go (0..1M), not 1M..1M+64k
        qemu_io_nbd(snap, "read -P 0x31 0 1028k", "discard 0 1028k")
        st = qmp.ok("query-fleece")
        assert st["bytes_in_temp"] == 1 * MiB and st["bytes_discarded"] == 1 * MiB
        assert _temp_data_bytes(temp) == 1 * MiB
        out = _qemu_io_raw(snap, "read 0 4k", "read 1020k 8k", "read -P 0x31 1M 64k")
        assert out.count("read failed: Invalid argument") == 2, out
        assert "read 65536/65536 bytes at offset 1048576" in out, out
        # guest writes there copy nothing any more; the map of the gone range is data
        qemu_io_nbd(srv.uri(), "write -P 0x33 0 1M")
        assert qmp.ok("query-fleece")["cbw_bytes"] == 2 * MiB
        assert nbd("nbdinfo", "--map", snap).splitlines()[0].split()[3] == "data"
        # the freed temp clusters take the next 1 MiB of copies: the temp does not grow
        qemu_io_nbd(srv.uri(), "write -P 0x34 2M 1M")
        st = qmp.ok("query-fleece")
        assert st["cbw_bytes"] == 3 * MiB and st["bytes_in_temp"] == 2 * MiB
        assert temp.stat().st_size == size_full
        qemu_io_nbd(snap, "read -P 0x31 2M 1M", read_only=True)
        qmp.close()
        os.kill(srv.proc.pid, signal.SIGINT)
        assert srv.proc.wait(30) == 0
    assert not temp.exists()
    qemu_io(img, "read -P 0x33 0 1M", "read -P 0x32 1M 1M", "read -P 0x34 2M 1M",
            "read -P 0x31 3M 1M")
    _check_clean(img)


# -- incremental: the frozen bitmap -------------------------------------------------------
DIRTY = [("0x41", 1 * MiB, 64 * KiB), ("0x42", 5 * MiB + 4 * KiB, 200 * KiB),
         ("0x43", 12 * MiB, 1 * MiB)]


def test_incremental_pull_backup_reads_only_dirty_extents(tmp_path):
    img, temp = tmp_path / "disk.qcow2", tmp_path / "temp.qcow2"
    create(img, 16 * MiB)
    qemu_io(img, "write -P 0x40 0 16M")
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_io(img, *[f"write -P {p} {o} {n}" for p, o, n in DIRTY])
    ref = tmp_path / "ref.qcow2"                      # the point in time, for qemu-nbd
    shutil.copy(img, ref)
    qemu_img("bitmap", "--disable", str(ref), "b0")
    with qemu_nbd(ref, tmp_path, "-r", "-B", "b0") as q:
        want = nbd("nbdinfo", "--map=qemu:dirty-bitmap:b0", q.uri())
    with qcow2py_nbd(img, tmp_path, "--fleece", str(temp), "--fleece-bitmap", "b0",
                     "-B", "b0") as srv:
        snap = srv.uri("snapshot")
        # the guest overwrites dirty and clean clusters alike
        qemu_io_nbd(srv.uri(), "write -P 0x50 1M 2M", "write -P 0x51 12M 128k",
                    "write -P 0x52 8M 64k")
        got = nbd("nbdinfo", "--map=qemu:dirty-bitmap:b0", snap)
        assert got == want
        extents = [tuple(map(int, ln.split()[:2])) for ln in got.splitlines()
                   if "dirty" in ln]
        assert extents == [(1 * MiB, 64 * KiB), (5 * MiB, 256 * KiB), (12 * MiB, 1 * MiB)]
        # reading only the dirty extents gives exactly the changed data of the point in time
        reads = []
        for off, n in extents:
            for p, o, ln in DIRTY:
                lo, hi = max(off, o), min(off + n, o + ln)
                if lo < hi:
                    reads.append(f"read -P {p} {lo} {hi - lo}")
        reads.append(f"read -P 0x40 {5 * MiB} {4 * KiB}")        # the cluster's clean rest
        qemu_io_nbd(snap, *reads, read_only=True)
        out = _qemu_io_raw(snap, "read 0 4k", f"read {2 * MiB} 64k", f"read {8 * MiB} 4k")
        assert out.count("read failed: Invalid argument") == 3, out
        # the image's own bitmap goes on tracking: served live on the disk export
        live = nbd("nbdinfo", "--map=qemu:dirty-bitmap:b0", srv.uri())
        dirty_now = [tuple(map(int, ln.split()[:2])) for ln in live.splitlines()
                     if "dirty" in ln]
        assert dirty_now == [(1 * MiB, 2 * MiB), (5 * MiB, 256 * KiB), (8 * MiB, 64 * KiB),
                             (12 * MiB, 1 * MiB)]
        listing = {e["export-name"]: e for e in
                   json.loads(nbd("nbdinfo", "--list", "--json", srv.uri()))["exports"]}
        assert "qemu:dirty-bitmap:b0" in listing["snapshot"]["contexts"]
        assert srv.stop() == 0
    assert not temp.exists()
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    (bm,) = info["format-specific"]["data"]["bitmaps"]
    assert bm["name"] == "b0" and "in-use" not in bm["flags"]          # stored on exit
    _check_clean(img)


# -- the control socket -------------------------------------------------------------------
def test_control_fleece_start_stop_while_a_writer_is_connected(tmp_path):
    img, temp = tmp_path / "disk.qcow2", tmp_path / "temp.qcow2"
    create(img, 8 * MiB)
    qemu_io(img, "write -P 0x61 0 8M")
    ctl = str(tmp_path / "ctl.sock")
    with qcow2py_nbd(img, tmp_path, "--control", ctl) as srv:
        qmp = Qmp(ctl)
        assert qmp.ok("query-fleece") == {"active": False}
        writer = RawClient(srv.sock)
        writer.go("")

        def write(off: int, byte: int, n: int = 64 * KiB):
            writer.request(1, off, n, cookie=off, payload=bytes([byte]) * n)
            assert writer.simple_reply() == (0, off)
        write(0, 0x62)                                   # before the point in time
        r = qmp.ok("fleece-start", temp=str(temp), **{"snapshot-name": "snap",
                                                       "ram-cache": "64k"})
        assert r["snapshot-export"] == "snap" and temp.exists()
        assert _exports(qmp) == ["", "snap"]
        write(0, 0x63)                                   # one cluster to RAM...
        write(1 * MiB, 0x64)                             # ...the next spills to the temp
        st = qmp.ok("query-fleece")
        assert st["active"] and st["temp"] == str(temp) and st["cbw_copies"] == 2
        assert st["cbw_bytes"] == 128 * KiB and st["bytes_in_ram"] + st["bytes_in_temp"] \
            == 128 * KiB and st["bytes_in_ram"] == 64 * KiB
        qemu_io_nbd(srv.uri("snap"), "read -P 0x62 0 64k", "read -P 0x61 64k 8128k",
                    read_only=True)
        err = qmp("fleece-start", temp=str(tmp_path / "other.qcow2"))
        assert err["error"]["class"] == "GenericError" and "already" in err["error"]["desc"]
        assert not (tmp_path / "other.qcow2").exists()
        stats = qmp.ok("fleece-stop")
        assert stats["cbw_copies"] == 2
        assert not temp.exists() and _exports(qmp) == [""]
        listing = json.loads(nbd("nbdinfo", "--list", "--json", srv.uri()))
        assert [e["export-name"] for e in listing["exports"]] == [""]
        err = qmp("fleece-stop")
        assert err["error"]["class"] == "GenericError" and "no fleecing" in err["error"]["desc"]
        assert qmp.ok("query-fleece") == {"active": False}
        write(2 * MiB, 0x65)                             # the writer was never cut off
        # bad arguments: QMP's error shape, nothing created
        for args in ({}, {"temp": str(temp), "ram-cache": "lots"},
                     {"temp": str(temp), "bitmap": "nope"},
                     {"temp": str(temp), "snapshot-name": ""}):
            err = qmp("fleece-start", **args)
            assert set(err) == {"error"} and set(err["error"]) == {"class", "desc"}, err
            assert not temp.exists()
        assert qmp.ok("query-fleece") == {"active": False}
        writer.request(2)
        writer.close()
        qmp.close()
        assert srv.stop() == 0
    qemu_io(img, "read -P 0x63 0 64k", "read -P 0x64 1M 64k", "read -P 0x65 2M 64k")
    _check_clean(img)


def test_start_up_refusals(tmp_path):
    img, temp = tmp_path / "disk.qcow2", tmp_path / "temp.qcow2"
    create(img, 1 * MiB)
    temp.write_bytes(b"mine")
    cli = [sys.executable, "-m", "qcow2py.nbd.cli", "-k", str(tmp_path / "x.sock")]
    for extra, msg in ((["--fleece", str(temp)], "already exists"),
                       (["-r", "--fleece", str(tmp_path / "t2")], "writable"),
                       (["--fleece-bitmap", "b0"], "need --fleece"),
                       (["--fleece", str(tmp_path / "t3"), "--snapshot-name", ""],
                        "must differ")):
        p = subprocess.run(cli + extra + [str(img)], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 1 and msg in p.stderr, (extra, p.stderr)
    assert temp.read_bytes() == b"mine"
    assert not (tmp_path / "t2").exists() and not (tmp_path / "t3").exists()


# -- switching the disk export's node under a continuous writer ------------------------
BLOCK = 4096
NBLOCKS = 2048          # an 8 MiB disk


def _pattern(stamp: int, first: int, n: int) -> bytes:
    vals = (stamp << 20) | np.arange(first, first + n, dtype=np.uint64)
    return np.repeat(vals.astype("<u8"), BLOCK // 8).tobytes()


def _stamps_of(data: bytes) -> np.ndarray:
    """The stamp of every block (0: never written), each block checked whole."""
    words = np.frombuffer(data, dtype="<u8").reshape(NBLOCKS, BLOCK // 8)
    first = words[:, 0]
    assert (words == first[:, None]).all(), "a block mixes two writes"
    stamps = first >> np.uint64(20)
    idx = first & np.uint64((1 << 20) - 1)
    written = first != 0
    assert (idx[written] == np.arange(NBLOCKS, dtype=np.uint64)[written]).all()
    return stamps.astype(np.int64)


def _model(log, upto: int) -> np.ndarray:
    stamps = np.zeros(NBLOCKS, dtype=np.int64)
    for stamp, first, n in log[:upto]:
        stamps[first:first + n] = stamp
    return stamps


def test_fleece_start_stop_under_a_continuous_writer(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    img = tmp_path / "disk.qcow2"
    create(img, NBLOCKS * BLOCK)
    ctl = str(tmp_path / "ctl.sock")
    log = []                     # (stamp, first block, blocks), stamp = index + 1
    stop = threading.Event()
    failure = []
    with qcow2py_nbd(img, tmp_path, "--control", ctl) as srv:
        qmp = Qmp(ctl)
        client = RawClient(srv.sock)
        client.go("")

        def writer():
            try:
                while not stop.is_set():
                    n = rng.randint(1, 20)
                    first = rng.randrange(NBLOCKS - n + 1)
                    stamp = len(log) + 1
                    client.request(1, first * BLOCK, n * BLOCK, cookie=stamp,
                                   payload=_pattern(stamp, first, n))
                    assert client.simple_reply() == (0, stamp)
                    log.append((stamp, first, n))
            except BaseException as e:      # reported by the main thread
                failure.append(e)
        t = threading.Thread(target=writer)
        t.start()
        try:
            for cycle in range(3):
                time.sleep(0.15)
                temp = tmp_path / f"t{cycle}.qcow2"
                done_before = len(log)
                qmp.ok("fleece-start", temp=str(temp), **{"ram-cache": "256k"})
                sent_after = len(log) + 1
                snap = tmp_path / f"snap{cycle}.raw"
                nbd("nbdcopy", srv.uri("snapshot"), str(snap))        # while writes go on
                qmp.ok("fleece-stop")
                assert not temp.exists()
                got = _stamps_of(snap.read_bytes())
                k = int(got.max())
                assert done_before <= k <= sent_after, (seed, done_before, k, sent_after)
                assert (got == _model(log, k)).all(), f"seed {seed}: cycle {cycle}, k={k}"
        finally:
            stop.set()
            t.join(30)
        assert not failure, (seed, failure)
        assert len(log) > 30, len(log)
        client.request(2)
        client.close()
        qmp.close()
        assert srv.stop() == 0
    final = tmp_path / "final.raw"
    qemu_img("convert", "-O", "raw", str(img), str(final))
    assert (_stamps_of(final.read_bytes()) == _model(log, len(log))).all(), f"seed {seed}"
    _check_clean(img)


class _SlowNode:
    """A target whose writes wait for a go-ahead (to hold a call in flight)."""

    size, read_only, format, cluster_size = 1 << 20, False, "raw", None

    def __init__(self, name: str):
        self.name, self.calls = name, []
        self.go = threading.Event()
        self.entered = threading.Event()

    def write(self, offset, data):
        self.entered.set()
        assert self.go.wait(10)
        self.calls.append(("write", offset))


def test_switchable_node_switches_only_with_no_call_in_flight():
    from qcow2py.nbd.fleece import SwitchableNode
    old, new = _SlowNode("old"), _SlowNode("new")
    new.go.set()
    gate = SwitchableNode(old)
    t_write = threading.Thread(target=gate.write, args=(0, b"x"))
    t_write.start()
    assert old.entered.wait(10)                     # a write is in flight on the old target
    switched = []
    t_switch = threading.Thread(target=lambda: switched.append(gate.switch(lambda: new)))
    t_switch.start()
    time.sleep(0.1)
    assert not switched and gate.target is old      # the switch waits for the write
    t_late = threading.Thread(target=gate.write, args=(4096, b"y"))
    t_late.start()                                  # a call arriving now is held...
    time.sleep(0.1)
    assert old.calls == [] and new.calls == []
    old.go.set()
    for t in (t_write, t_switch, t_late):
        t.join(10)
    assert switched == [new]
    assert old.calls == [("write", 0)]
    assert new.calls == [("write", 4096)]           # ...and goes to the new target
    # a failing switch leaves the target as it was and lets calls through
    with pytest.raises(RuntimeError):
        gate.switch(lambda: (_ for _ in ()).throw(RuntimeError("no")))
    assert gate.target is new
    gate.write(8192, b"z")
    assert new.calls[-1] == ("write", 8192)
