"""qcow2py-nbd against real clients (qemu-io, qemu-img, nbdinfo, nbdcopy), with
qemu-nbd serving the same image as the reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time

import pytest

from nbdtest import RawClient, nbd, qcow2py_nbd, qemu_io_nbd, qemu_nbd
from qemu import create, need, qemu_img, qemu_io

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20

# operations a client does through the server and qemu-io does on the twin image
OPS = [
    "write -P 0x11 100k 300k",
    "write -P 0x22 63M 1M",
    "write -z 1M 64k",
    "write -z 5M 3M",
    "write -P 0x33 12M 4M",
    "discard 2M 128k",
    "discard 13M 1M",
    "write -P 0x44 13635584 8k",
    "flush",
]


def _check_clean(path) -> None:
    out = qemu_img("check", str(path)).stdout
    assert "No errors were found" in out, out


def _compare(a, b, fmt_b: str = "qcow2") -> None:
    p = qemu_img("compare", "-f", "qcow2", "-F", fmt_b, str(a), str(b), check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_plain_export_equals_qemu_io_twin(tmp_path):
    img, twin = tmp_path / "d.qcow2", tmp_path / "twin.qcow2"
    create(img, 64 * MiB)
    qemu_io(img, "write -P 0x5a 0 16M")
    shutil.copy(img, twin)
    with qcow2py_nbd(img, tmp_path) as srv:
        qemu_io_nbd(srv.uri(), *OPS)
        qemu_io_nbd(srv.uri(), "read -P 0x11 100k 300k", "read -P 0 1M 64k",
                    "read -P 0 5M 3M", "read -P 0x44 13635584 8k", "read -P 0x22 63M 1M",
                    "read -P 0x5a 0 100k", read_only=True)
        assert srv.stop() == 0
    qemu_io(twin, *OPS)
    _compare(img, twin)
    _check_clean(img)


def _chain(tmp_path):
    """A 2-deep chain with data, zero clusters, discards and a partial cluster."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, 32 * MiB)
    qemu_io(base, "write -P 0x01 0 4M", "write -P 0x02 8M 2M", "write -z 20M 1M")
    create(top, 32 * MiB, backing=base)
    qemu_io(top, "write -P 0x03 1M 512k", "write -z 8M 64k", "discard 9M 64k",
            "write -P 0x04 16778240 3k", "write -z 24M 2M", "write -P 0x05 31M 1M")
    return top


def test_map_equals_qemu_nbd(tmp_path):
    top = _chain(tmp_path)
    with qemu_nbd(top, tmp_path, "-r") as ref:
        want = nbd("nbdinfo", "--map", ref.uri())
        want_json = json.loads(nbd("nbdinfo", "--map", "--json", ref.uri()))
    with qcow2py_nbd(top, tmp_path, "-r") as srv:
        got = nbd("nbdinfo", "--map", srv.uri())
        got_json = json.loads(nbd("nbdinfo", "--map", "--json", srv.uri()))
        out = tmp_path / "out.raw"
        nbd("nbdcopy", srv.uri(), str(out))
    assert got == want
    assert got_json == want_json
    _compare(top, out, "raw")


def _bitmapped(tmp_path):
    img = tmp_path / "bm.qcow2"
    create(img, 64 * MiB)
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_img("bitmap", "--add", "-g", "1M", str(img), "b1")
    qemu_io(img, "write -P 0x07 0 64k", "write -P 0x08 5245952 200k", "write -z 40M 4M",
            "discard 50M 1M", "write -P 0x09 63M 1M")
    qemu_img("bitmap", "--disable", str(img), "b0")
    qemu_img("bitmap", "--disable", str(img), "b1")
    return img


def test_dirty_bitmap_map_equals_qemu_nbd(tmp_path):
    img = _bitmapped(tmp_path)
    with qemu_nbd(img, tmp_path, "-r", "-B", "b0", "-B", "b1") as ref:
        want = [nbd("nbdinfo", f"--map=qemu:dirty-bitmap:{b}", ref.uri()) for b in ("b0", "b1")]
        want_base = nbd("nbdinfo", "--map", ref.uri())
    with qcow2py_nbd(img, tmp_path, "-r", "-B", "b0", "-B", "b1") as srv:
        got = [nbd("nbdinfo", f"--map=qemu:dirty-bitmap:{b}", srv.uri()) for b in ("b0", "b1")]
        got_base = nbd("nbdinfo", "--map", srv.uri())
        listing = json.loads(nbd("nbdinfo", "--list", "--json", srv.uri()))
    assert got == want and "dirty" in got[0]
    assert got_base == want_base
    (exp,) = listing["exports"]
    assert exp["export-name"] == "" and exp["is_read_only"] and exp["can_multi_conn"]
    assert sorted(exp["contexts"]) == ["base:allocation", "qemu:dirty-bitmap:b0",
                                       "qemu:dirty-bitmap:b1"]


def test_enabled_bitmap_is_live_on_a_writable_export(tmp_path):
    img = tmp_path / "live.qcow2"
    create(img, 16 * MiB)
    qemu_img("bitmap", "--add", str(img), "b0")
    with qcow2py_nbd(img, tmp_path, "-B", "b0") as srv:
        qemu_io_nbd(srv.uri(), "write -P 0x12 3M 4k", "write -P 0x13 9498624 8k")
        got = nbd("nbdinfo", "--map=qemu:dirty-bitmap:b0", srv.uri())
        assert srv.stop() == 0
    # the bitmap was stored on exit: qemu-nbd serves the same bits
    qemu_img("bitmap", "--disable", str(img), "b0")
    with qemu_nbd(img, tmp_path, "-r", "-B", "b0") as ref:
        want = nbd("nbdinfo", "--map=qemu:dirty-bitmap:b0", ref.uri())
    assert got == want
    dirty = [tuple(map(int, ln.split()[:2])) for ln in got.splitlines() if "dirty" in ln]
    assert dirty == [(3 * MiB, 65536), (9 * MiB, 131072)]
    _check_clean(img)


def test_enabled_bitmap_refused_on_read_only_export(tmp_path):
    img = tmp_path / "en.qcow2"
    create(img, 4 * MiB)
    qemu_img("bitmap", "--add", str(img), "b0")
    p = subprocess.run([os.sys.executable, "-m", "qcow2py.nbd.cli", "-r", "-B", "b0", "-k",
                        str(tmp_path / "x.sock"), str(img)], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 1 and "Enabled bitmap 'b0' incompatible with readonly export" \
        in p.stderr


def test_nbdcopy_four_connections_both_ways(tmp_path):
    img = tmp_path / "c.qcow2"
    create(img, 48 * MiB)
    qemu_io(img, "write -P 0x31 0 7M", "write -P 0x32 20M 9M", "write -z 40M 2M")
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(48 * MiB))
    out = tmp_path / "out.raw"
    with qcow2py_nbd(img, tmp_path, "-r") as srv:
        nbd("nbdcopy", "--connections=4", "--requests=16", srv.uri(), str(out))
    _compare(img, out, "raw")
    dst = tmp_path / "dst.qcow2"
    create(dst, 48 * MiB)
    with qcow2py_nbd(dst, tmp_path) as srv:
        nbd("nbdcopy", "--connections=4", str(src), srv.uri())
        assert srv.stop() == 0
    _compare(dst, src, "raw")
    _check_clean(dst)


def test_four_qemu_io_clients_on_disjoint_regions(tmp_path):
    img, twin = tmp_path / "p.qcow2", tmp_path / "ptwin.qcow2"
    create(img, 64 * MiB)
    shutil.copy(img, twin)
    ops = {i: [f"write -P {0x40 + i} {i * 16}M 3M", f"write -z {i * 16 + 4}M 1M",
               f"write -P {0x50 + i} {(i * 16 + 6) * MiB + 512} 70k", f"discard {i * 16 + 1}M 1M",
               f"aio_write -P {0x60 + i} {i * 16 + 10}M 1M", "aio_flush"] for i in range(4)}
    with qcow2py_nbd(img, tmp_path) as srv:
        errors = []

        def client(i):
            try:
                qemu_io_nbd(srv.uri(), *ops[i])
            except AssertionError as e:   # reported by the main thread
                errors.append(e)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert srv.stop() == 0
    for i in range(4):
        qemu_io(twin, *ops[i])
    _compare(img, twin)
    _check_clean(img)


def test_sigterm_pid_file_and_verbose_log(tmp_path):
    img = tmp_path / "s.qcow2"
    create(img, 4 * MiB)
    qemu_img("bitmap", "--add", str(img), "b0")
    pid_file = tmp_path / "nbd.pid"
    with qcow2py_nbd(img, tmp_path, "-v", "--pid-file", str(pid_file)) as srv:
        assert int(pid_file.read_text()) == srv.proc.pid
        qemu_io_nbd(srv.uri(), "write -P 0x77 0 64k")
        nbd("nbdinfo", srv.uri())
        assert srv.stop() == 0
        log = srv.stderr()
    assert not pid_file.exists()
    # one line per connection (the first is the test's probe for the socket)
    lines = [ln for ln in log.splitlines() if "connection" in ln]
    assert len(lines) == 3 and all("requests" in ln for ln in lines), log
    assert sum("export '': " in ln and "client sent DISC" in ln for ln in lines) == 2, log
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    (bm,) = info["format-specific"]["data"]["bitmaps"]
    assert bm["name"] == "b0" and "in-use" not in bm["flags"]      # stored on exit
    _check_clean(img)


def test_connection_limit(tmp_path):
    img = tmp_path / "e.qcow2"
    create(img, 4 * MiB)
    with qcow2py_nbd(img, tmp_path, "-e", "1") as srv:
        for _ in range(100):              # until the helper's probe has left its slot
            first = RawClient(srv.sock)
            try:
                first.go("")
                break
            except ConnectionError:
                first.close()
                time.sleep(0.05)
        p = subprocess.run(["nbdinfo", srv.uri()], capture_output=True, text=True, timeout=30)
        assert p.returncode != 0
        first.request(2)                                    # DISC
        first.close()
        for _ in range(50):                                 # the slot frees at once
            p = subprocess.run(["nbdinfo", srv.uri()], capture_output=True, text=True,
                               timeout=30)
            if p.returncode == 0:
                break
        assert p.returncode == 0, p.stderr


def test_tcp_on_loopback(tmp_path):
    import socket
    img = tmp_path / "t.qcow2"
    create(img, 4 * MiB)
    qemu_io(img, "write -P 0x66 0 1M")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wait = tmp_path / "tcp.pid"
    with qcow2py_nbd(img, tmp_path, "-r", "-x", "disk", "-p", str(port), "--pid-file",
                     str(wait), wait_path=str(wait), tcp=True) as srv:
        qemu_io_nbd(f"nbd://127.0.0.1:{port}/disk", "read -P 0x66 0 1M", read_only=True)
        listing = json.loads(nbd("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}"))
        assert [e["export-name"] for e in listing["exports"]] == ["disk"]
        assert srv.stop() == 0


def test_starttls_with_self_signed_certificate(tmp_path):
    openssl = need("openssl")
    img = tmp_path / "tls.qcow2"
    create(img, 8 * MiB)
    qemu_io(img, "write -P 0x21 0 2M")
    d = tmp_path / "pki"
    d.mkdir()
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    shutil.copy(d / "cert.pem", d / "ca-cert.pem")
    with qcow2py_nbd(img, tmp_path, "-r", "--tls-cert", str(d / "cert.pem"),
                     "--tls-key", str(d / "key.pem")) as srv:
        url = srv.uri(tls=True) + f"&tls-certificates={d}"
        info = nbd("nbdinfo", url)
        assert "with TLS" in info
        assert nbd("nbdinfo", "--map", url) == \
            "         0     2097152    0  data\n   2097152     6291456    3  hole,zero\n"
        out = tmp_path / "tls.raw"
        nbd("nbdcopy", url, str(out))
        _compare(img, out, "raw")
        plain = subprocess.run(["nbdinfo", srv.uri()], capture_output=True, text=True,
                               timeout=30)
        assert plain.returncode != 0                        # TLS is required
        assert srv.stop() == 0


def test_starttls_refused_without_certificate(tmp_path):
    img = tmp_path / "n.qcow2"
    create(img, 1 * MiB)
    with qcow2py_nbd(img, tmp_path, "-r") as srv:
        p = subprocess.run(["nbdinfo", srv.uri(tls=True)], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode != 0
        assert "with TLS" not in p.stdout
        nbd("nbdinfo", srv.uri())                           # the server lives on


def test_sigterm_while_a_client_writes(tmp_path):
    img = tmp_path / "busy.qcow2"
    create(img, 64 * MiB)
    src = tmp_path / "busy.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(64 * MiB))
    with qcow2py_nbd(img, tmp_path) as srv:
        copy = subprocess.Popen(["nbdcopy", "--connections=4", str(src), srv.uri()],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        assert srv.stop() == 0
        copy.wait(60)
    _check_clean(img)
