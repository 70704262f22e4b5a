"""Hostile and broken clients, driven with raw socket bytes: each gets the
protocol's error or its connection closed, every other client is served on,
and the image is check-clean once the server has stopped."""

from __future__ import annotations

import struct

import pytest

import qcow2py
from qcow2py.nbd import Server
from nbdtest import RawClient, qemu_io_nbd, uri
from qemu import create, qemu_img, qemu_io

pytestmark = pytest.mark.timeout(120)

EPERM, EINVAL, ENOSPC = 1, 22, 28
SIZE = 8 << 20
MAX = 32 << 20
MiB = 1 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nbdbad")
    rw, ro = tmp / "rw.qcow2", tmp / "ro.qcow2"
    create(rw, SIZE)
    create(ro, SIZE)
    qemu_io(rw, "write -P 0x61 0 1M")
    qemu_io(ro, "write -P 0x62 0 1M")
    img_rw, img_ro = qcow2py.open(rw, "r+"), qcow2py.open(ro)
    sock = str(tmp / "s.sock")
    srv = Server()
    srv.add_export("", img_rw)
    srv.add_export("ro", img_ro)
    srv.listen_unix(sock)
    srv.start()
    yield sock
    srv.close()
    img_rw.close()
    img_ro.close()
    for img in (rw, ro):
        out = qemu_img("check", str(img)).stdout
        assert "No errors were found" in out, out


@pytest.fixture
def bystander(served):
    """A well-behaved client connected for the whole test, checked afterwards."""
    c = RawClient(served)
    c.go("ro")
    yield c
    c.request(0, 0, 4096, cookie=77)
    flags, rtype, cookie, data = c.chunk()
    assert cookie == 77 and rtype == 1 and data[8:] == b"\x62" * 4096
    c.close()
    assert "0x62" not in qemu_io_nbd(uri(served, "ro"), "read -P 0x62 0 4k", read_only=True)


def test_garbage_instead_of_client_flags(served, bystander):
    c = RawClient(served)
    c.recv_exactly(18)
    c.s.sendall(b"\xff" * 64)                   # unknown client flags, then noise
    assert c.closed_by_server()


def test_wrong_option_magic(served, bystander):
    c = RawClient(served)
    c.greet()
    c.s.sendall(b"NOTMAGIC" + struct.pack(">II", 7, 0))
    assert c.closed_by_server()


def test_unknown_option_is_unsupported_and_negotiation_goes_on(served, bystander):
    c = RawClient(served)
    c.greet()
    c.option(0x1234, b"whatever")
    opt, rtype, _ = c.option_reply()
    assert (opt, rtype) == (0x1234, (1 << 31) + 1)          # ERR_UNSUP
    c.option(3)                                               # LIST still works
    replies = c.replies_until_final()
    names = sorted(d[4:4 + struct.unpack(">I", d[:4])[0]].decode()
                   for _o, t, d in replies if t == 2)
    assert names == ["", "ro"] and replies[-1][1] == 1
    c.option(5)                                               # STARTTLS without TLS
    assert c.option_reply()[1] == (1 << 31) + 2               # ERR_POLICY
    c.option(7, struct.pack(">I", 7) + b"missing" + b"\0\0")  # GO to a missing export
    assert c.option_reply()[1] == (1 << 31) + 6               # ERR_UNKNOWN
    c.option(10, b"\0\0")                                     # SET_META_CONTEXT, no structured
    assert c.option_reply()[1] == (1 << 31) + 3               # ERR_INVALID
    c.option(8)
    assert c.option_reply()[1] == 1
    c.option(10, struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", 9999))
    assert c.option_reply()[1] == (1 << 31) + 3               # query longer than the option
    c.option(7, struct.pack(">I", 0) + b"\0\0")              # GO "" after all that
    final = c.replies_until_final()
    assert final[-1][1] == 1
    c.request(0, 0, 512)
    assert c.chunk()[1] == 1
    c.close()


def test_hostile_option_length_is_not_allocated(served, bystander):
    c = RawClient(served)
    c.greet()
    c.s.sendall(b"IHAVEOPT" + struct.pack(">II", 6, 0xFFFFFFF0))   # 4 GiB INFO
    c.s.sendall(b"x" * 4096)
    c.s.close()                                                      # and vanish


def test_unknown_command_and_flags(served, bystander):
    c = RawClient(served)
    c.go("")
    c.request(42, 0, 0, cookie=5)
    assert c.simple_reply() == (EINVAL, 5)
    c.request(3, 0, 0, flags=0x40, cookie=6)                  # FLUSH with a bad flag
    assert c.simple_reply() == (EINVAL, 6)
    c.request(3, cookie=7)
    assert c.simple_reply() == (0, 7)


def test_past_the_end(served, bystander):
    c = RawClient(served)
    size, _ = c.go("")
    assert size == SIZE
    c.request(0, SIZE - 512, 1024, cookie=1)                  # READ
    assert c.structured_error() == EINVAL
    c.request(4, SIZE, 4096, cookie=2)                        # TRIM
    assert c.simple_reply() == (EINVAL, 2)
    c.request(1, SIZE - 512, 1024, cookie=3, payload=b"z" * 1024)   # WRITE
    assert c.simple_reply() == (ENOSPC, 3)
    c.request(0, 0, 4096, cookie=4)                           # and the connection lives
    assert c.chunk()[3][8:] == b"\x61" * 4096


def test_request_over_32_mib(served, bystander):
    c = RawClient(served)
    c.go("")
    c.request(0, 0, MAX + 1, cookie=1)
    assert c.structured_error() == EINVAL
    payload = b"w" * (MAX + 4096)
    c.request(1, 0, len(payload), cookie=2, payload=payload)  # payload read and dropped
    assert c.simple_reply() == (EINVAL, 2)
    c.request(0, 0, 4096, cookie=3)
    flags, rtype, cookie, data = c.chunk()
    assert cookie == 3 and data[8:] == b"\x61" * 4096         # nothing was written


def test_write_to_read_only_export(served, bystander):
    c = RawClient(served)
    _size, flags = c.go("ro")
    assert flags & 2                                          # READ_ONLY
    c.request(1, 0, 4096, cookie=1, payload=b"q" * 4096)
    assert c.simple_reply() == (EPERM, 1)
    c.request(6, 0, 4096, cookie=2)                           # WRITE_ZEROES
    assert c.simple_reply() == (EPERM, 2)
    c.request(0, 0, 4096, cookie=3)
    assert c.chunk()[3][8:] == b"\x62" * 4096


def test_disconnect_mid_request(served, bystander):
    c = RawClient(served)
    c.go("")
    c.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 9, 0, 1 << 20) + b"y" * 1000)
    c.close()                                                 # write payload cut short
    c = RawClient(served)
    c.go("")
    c.s.sendall(struct.pack(">IHHQ", 0x25609513, 0, 0, 1))    # header cut short
    c.close()
    c = RawClient(served)
    c.go("")
    for i in range(32):                                       # reads in flight, then gone
        c.request(0, i * 65536, 65536, cookie=i)
    c.close()
    c = RawClient(served)
    c.go("")
    c.request(0, 0, 4096, cookie=1)
    assert c.chunk()[3][8:] == b"\x61" * 4096                 # nothing torn


def test_wrong_request_magic_closes(served, bystander):
    c = RawClient(served)
    c.go("")
    c.s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    assert c.closed_by_server()


def test_block_status_without_context_and_zero_length(served, bystander):
    c = RawClient(served)
    c.go("")
    c.request(7, 0, 4096, cookie=1)
    assert c.structured_error() == EINVAL
    c.request(7, 0, 0, cookie=2)
    assert c.structured_error() == EINVAL


def _meta_request(name: str, queries) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q)) + q.encode()
    return body


def test_export_name_option_and_no_zeroes(served):
    for flags, tail in ((3, 0), (1, 124)):
        c = RawClient(served)
        c.greet(flags)
        c.option(1, b"ro")                                    # NBD_OPT_EXPORT_NAME
        size, tflags = struct.unpack(">QH", c.recv_exactly(10))
        assert size == SIZE and tflags & 2 and tflags & (1 << 8)
        assert c.recv_exactly(tail) == bytes(tail)
        c.request(0, 0, 512, cookie=4)                        # no structured replies
        assert c.simple_reply() == (0, 4)
        assert c.recv_exactly(512) == b"\x62" * 512
        c.close()


def test_meta_contexts_list_set_and_block_status(tmp_path):
    img = tmp_path / "m.qcow2"
    create(img, SIZE)
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_io(img, "write -P 1 64k 64k")
    sock = str(tmp_path / "m.sock")
    with qcow2py.open(img, "r+") as image:
        srv = Server()
        srv.add_export("", image, bitmaps=[image.find_bitmap("b0")])
        srv.listen_unix(sock)
        srv.start()
        try:
            c = RawClient(sock)
            c.greet()
            c.option(8)
            c.option_reply()
            for queries, want in (([], ["base:allocation", "qemu:dirty-bitmap:b0"]),
                                  (["qemu:dirty-bitmap:"], ["qemu:dirty-bitmap:b0"]),
                                  (["base:"], ["base:allocation"]),
                                  (["nope:x", "qemu:dirty-bitmap:zz"], [])):
                c.option(9, _meta_request("", queries))
                got = [d[4:].decode() for _o, t, d in c.replies_until_final() if t == 4]
                assert got == want, queries
            c.option(10, _meta_request("", ["qemu:dirty-bitmap:b0", "base:allocation"]))
            ids = {d[4:].decode(): struct.unpack(">I", d[:4])[0]
                   for _o, t, d in c.replies_until_final() if t == 4}
            assert set(ids) == {"base:allocation", "qemu:dirty-bitmap:b0"}
            c.option(7, struct.pack(">I", 0) + b"\0\0")
            c.replies_until_final()
            c.request(7, 0, 256 << 10, cookie=9)
            seen = {}
            while True:
                flags, rtype, cookie, data = c.chunk()
                assert rtype == 5 and cookie == 9
                cid = struct.unpack(">I", data[:4])[0]
                seen[cid] = [struct.unpack(">II", data[i:i + 8]) for i in range(4, len(data), 8)]
                if flags & 1:
                    break
            assert seen[ids["qemu:dirty-bitmap:b0"]] == [(65536, 0), (65536, 1), (131072, 0)]
            assert seen[ids["base:allocation"]] == [(65536, 3), (65536, 0), (131072, 3)]
            c.request(7, 0, 256 << 10, flags=8, cookie=10)     # REQ_ONE: one extent each
            for _ in range(2):
                flags, rtype, cookie, data = c.chunk()
                assert len(data) == 12 and struct.unpack(">I", data[4:8])[0] == 65536
            assert flags & 1
            c.close()
        finally:
            srv.close()


def test_pipelined_requests_beyond_the_budget(served, bystander):
    """160 MiB of reads sent before any reply is read (the server holds at most its
    budget and stops reading): every reply arrives whole, each once."""
    c = RawClient(served, timeout=60)
    c.go("")
    n = 160
    sender = __import__("threading").Thread(
        target=lambda: [c.request(0, 0, MiB, cookie=1000 + i) for i in range(n)])
    sender.start()
    seen = set()
    while len(seen) < n:
        flags, rtype, cookie, data = c.chunk()
        assert rtype == 1 and flags & 1 and cookie not in seen
        assert data[8:] == b"\x61" * MiB
        seen.add(cookie)
    sender.join(30)
    c.close()
