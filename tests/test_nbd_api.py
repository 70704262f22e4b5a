"""qcow2py.nbd.Server from a program, and the control socket."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import time

import pytest

import qcow2py
from qcow2py.errors import SnapshotAccessError
from qcow2py.nbd import Server
from qcow2py.node import BlockKind, Extent, Node
from nbdtest import RawClient, nbd, qcow2py_nbd, qemu_io_nbd, uri
from qemu import create, qemu_img, qemu_io

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


class FaultyNode(Node):
    """A node whose ranges fail as a snapshot view, a full disk or a broken one would."""

    size = 4 * MiB

    def __init__(self):
        self.data = bytearray(self.size)
        self.data[:MiB] = b"\x42" * MiB

    @property
    def read_only(self):
        return False

    def _fail(self, offset):
        if offset >= 3 * MiB:
            raise SnapshotAccessError("discarded from the snapshot")
        if offset >= 2 * MiB:
            raise OSError(errno.EIO, "bad sector")

    def read(self, offset, length):
        self._fail(offset)
        return bytes(self.data[offset:offset + length])

    def read_into(self, buf, offset):
        self._fail(offset)
        mv = memoryview(buf)
        mv[:] = self.data[offset:offset + len(mv)]

    def write(self, offset, data):
        if offset >= MiB:
            raise PermissionError("snapshot is read-only")
        if offset >= MiB // 2:
            raise OSError(errno.ENOSPC, "no space left")
        self.data[offset:offset + len(data)] = data

    def write_zeroes(self, offset, length, *, unmap=False):
        self.write(offset, bytes(length))

    def discard(self, offset, length):
        pass

    def flush(self):
        pass

    def block_status(self, offset, length):
        end = min(offset + length, self.size)
        out = []
        if offset < MiB:
            out.append(Extent(offset, min(end, MiB) - offset, BlockKind.DATA))
        if end > MiB:
            s = max(offset, MiB)
            out.append(Extent(s, end - s, BlockKind.DATA))
        return out

    def close(self):
        pass


class FrozenBitmap:
    """What the fleecing snapshot will expose: name, granularity, dirty_extents."""

    name = "frozen"
    granularity = 65536

    def dirty_extents(self, start=0, length=None):
        return [(s, n) for s, n in [(65536, 131072), (MiB, 65536)]
                if s < start + length and s + n > start]


def test_any_node_errors_map_to_nbd(tmp_path):
    sock = str(tmp_path / "n.sock")
    srv = Server()
    srv.add_export("snap", FaultyNode(), bitmaps=[FrozenBitmap()])
    srv.listen_unix(sock)
    srv.start()
    try:
        c = RawClient(sock)
        c.go("snap")
        c.request(0, 3 * MiB, 4096, cookie=1)
        assert c.structured_error() == 22            # SnapshotAccessError: EINVAL
        c.request(0, 2 * MiB, 4096, cookie=2)
        assert c.structured_error() == 5             # other OSError: EIO
        c.request(1, 2 * MiB, 512, cookie=3, payload=b"a" * 512)
        assert c.simple_reply() == (1, 3)            # PermissionError: EPERM
        c.request(1, MiB // 2, 512, cookie=4, payload=b"a" * 512)
        assert c.simple_reply() == (28, 4)           # ENOSPC
        c.request(0, 0, 4096, cookie=5)
        assert c.chunk()[3][8:] == b"\x42" * 4096    # still served
        c.close()
        got = nbd("nbdinfo", "--map=qemu:dirty-bitmap:frozen", uri(sock, "snap"))
        assert [ln.split()[:3] for ln in got.splitlines()] == [
            ["0", "65536", "0"], ["65536", "131072", "1"], ["196608", "851968", "0"],
            ["1048576", "65536", "1"], ["1114112", "3080192", "0"]]
    finally:
        srv.close()


def test_server_in_a_program_that_writes_too(tmp_path):
    path = tmp_path / "prog.qcow2"
    create(path, 16 * MiB)
    sock = str(tmp_path / "p.sock")
    with qcow2py.open(path, "r+") as img:
        srv = Server(max_connections=4)
        srv.add_export("disk", img)
        srv.listen_unix(sock)
        srv.start()
        try:
            img.write(0, b"\x10" * MiB)                            # the program writes...
            qemu_io_nbd(uri(sock, "disk"), "read -P 0x10 0 1M",    # ...clients see it
                        "write -P 0x20 1M 1M", "flush")
            assert img.read(MiB, 4) == b"\x20" * 4                 # and the other way
            srv.add_export("second", img, readonly=True)           # while serving
            qemu_io_nbd(uri(sock, "second"), "read -P 0x20 1M 1M", read_only=True)
            c = RawClient(sock)
            c.go("second")
            srv.remove_export("second")                            # connected client dropped
            assert c.closed_by_server()
            p = subprocess.run(["nbdinfo", uri(sock, "second")], capture_output=True,
                               timeout=30)
            assert p.returncode != 0
        finally:
            srv.close()
    out = qemu_img("check", str(path)).stdout
    assert "No errors were found" in out


class QMP:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(20)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self.greeting = json.loads(self.f.readline())

    def cmd(self, execute, **arguments):
        self.f.write(json.dumps({"execute": execute, "arguments": arguments}).encode() + b"\n")
        self.f.flush()
        return json.loads(self.f.readline())

    def raw(self, line: bytes):
        self.f.write(line + b"\n")
        self.f.flush()
        return json.loads(self.f.readline())


def test_control_socket(tmp_path):
    img = tmp_path / "ctl.qcow2"
    create(img, 8 * MiB)
    qemu_img("bitmap", "--add", str(img), "b0")
    ctl = str(tmp_path / "ctl.sock")
    with qcow2py_nbd(img, tmp_path, "-B", "b0", "--control", ctl) as srv:
        q = QMP(ctl)
        assert "QMP" in q.greeting
        assert q.cmd("qmp_capabilities") == {"return": {}}
        qemu_io_nbd(srv.uri(), "write -P 1 0 64k")              # a writer connected...
        c = RawClient(srv.sock)
        c.go("")
        for _ in range(100):            # qemu-io's connection may still be closing
            (exp,) = q.cmd("query-exports")["return"]
            if exp["connections"] == 1:
                break
            time.sleep(0.05)
        assert exp["name"] == "" and exp["size"] == 8 * MiB and not exp["read-only"]
        assert exp["connections"] == 1
        assert exp["bitmaps"] == [{"name": "b0", "granularity": 65536, "count": 65536}]
        assert q.cmd("bitmap-add", name="b1", granularity=131072) == {"return": {}}
        assert q.cmd("bitmap-add", name="b1")["error"]["class"] == "GenericError"
        c.request(1, 3 * MiB, 512, cookie=1, payload=b"x" * 512)   # ...keeps writing
        assert c.simple_reply() == (0, 1)
        assert q.cmd("bitmap-disable", name="b1") == {"return": {}}
        assert q.cmd("bitmap-clear", name="b0") == {"return": {}}
        assert q.cmd("query-exports")["return"][0]["bitmaps"][0]["count"] == 0
        err = q.cmd("bitmap-remove", name="b0")["error"]          # served: refused
        assert "in use" in err["desc"]
        assert q.cmd("bitmap-add", name="gone") == {"return": {}}
        assert q.cmd("bitmap-remove", name="gone") == {"return": {}}
        assert q.cmd("no-such-thing")["error"]["class"] == "CommandNotFound"
        assert q.raw(b"{not json")["error"]["class"] == "GenericError"
        assert q.cmd("bitmap-clear", name="nope")["error"]["desc"] == \
            "Dirty bitmap 'nope' not found"
        assert q.cmd("quit") == {"return": {}}
        c.close()
        srv.proc.wait(30)
        assert srv.proc.returncode == 0
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    bms = {b["name"]: b for b in info["format-specific"]["data"]["bitmaps"]}
    assert set(bms) == {"b0", "b1"}
    assert bms["b1"]["granularity"] == 131072 and "auto" not in bms["b1"]["flags"]
    assert "auto" in bms["b0"]["flags"]
    out = qemu_img("check", str(img)).stdout
    assert "No errors were found" in out
    # b1 was created after the 64k write, disabled after the 512-byte one: it holds
    # the 512-byte write only; b0 was cleared after both
    qemu_img("bitmap", "--disable", str(img), "b0")
    with qcow2py_nbd(img, tmp_path, "-r", "-B", "b1", "-B", "b0") as srv:
        m1 = nbd("nbdinfo", "--map=qemu:dirty-bitmap:b1", srv.uri())
        m0 = nbd("nbdinfo", "--map=qemu:dirty-bitmap:b0", srv.uri())
    assert [ln.split()[:3] for ln in m1.splitlines()] == [
        ["0", str(3 * MiB), "0"], [str(3 * MiB), "131072", "1"],
        [str(3 * MiB + 131072), str(5 * MiB - 131072), "0"]]
    assert "dirty" not in m0


def test_direct_reads_equal_node_reads(tmp_path):
    """Reads from the chain's files by the map (preadv; sendfile ranges) give the
    bytes the node reads, compressed clusters and a backing file included."""
    import random
    from qcow2py.nbd.engine import direct_reads, read_chunks
    from qcow2py.nbd.sockout import FileRange, pread_full
    plain, base, top = tmp_path / "p.qcow2", tmp_path / "b.qcow2", tmp_path / "t.qcow2"
    create(plain, 8 * MiB)
    qemu_io(plain, "write -P 0x31 0 3M", "write -P 0x32 5M 1M")
    qemu_img("convert", "-c", "-O", "qcow2", str(plain), str(base))
    create(top, 8 * MiB, backing=base)
    qemu_io(top, "write -P 0x33 1M 64k", "write -z 2M 64k", f"write -P 0x34 {7 * MiB + 512} 4k")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    with qcow2py.open(top) as img:
        host = direct_reads(img)
        assert len(host.fds) == 2
        for _ in range(60):
            off = rng.randrange(8 * MiB)
            n = rng.randrange(1, min(2 * MiB, 8 * MiB - off) + 1)
            for files in (False, True):
                buf = bytearray(n)
                chunks = read_chunks(img, off, n, False, buf, host, files=files)
                got = bytearray(n)
                for start, length, pieces in chunks:
                    pos = start - off
                    for p in pieces or []:
                        if isinstance(p, FileRange):
                            pread_full(p.fd, memoryview(got)[pos:pos + p.length], p.offset)
                            pos += p.length
                        else:
                            got[pos:pos + len(p)] = p
                            pos += len(p)
                assert bytes(got) == img.read(off, n), f"seed {seed}: {off}+{n} files={files}"
