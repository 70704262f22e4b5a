"""Helpers of the NBD tests: start qcow2py-nbd / qemu-nbd on a Unix socket in a
temporary directory, speak raw NBD from a socket, build images."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import List, Optional

from qemu import need

STARTUP_TIMEOUT = 20.0


def uri(sock: str, name: str = "", tls: bool = False) -> str:
    scheme = "nbds+unix" if tls else "nbd+unix"
    return f"{scheme}:///{name}?socket={sock}"


def _wait_socket(path: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"server exited with {proc.returncode}:\n{out}\n{err}")
        if os.path.isfile(path) and os.path.getsize(path):
            return
        if os.path.exists(path) and not os.path.isfile(path):
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(path)
                return
            except OSError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server did not listen on {path} within {STARTUP_TIMEOUT}s")


class Served:
    """A running server process; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(self, proc: subprocess.Popen, sock: str):
        self.proc, self.sock = proc, sock

    def uri(self, name: str = "", tls: bool = False) -> str:
        return uri(self.sock, name, tls)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("server did not stop within its timeout after SIGTERM")
        return self.proc.returncode

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr else ""


@contextmanager
def qcow2py_nbd(image, tmp_path, *args: str, sock: Optional[str] = None,
                wait_path: Optional[str] = None, tcp: bool = False):
    """Run ``qcow2py-nbd ARGS -k SOCK IMAGE`` (``tcp``: no -k, and ``wait_path``
    is a file to wait for); yields :class:`Served`; always stopped."""
    sock = sock or os.path.join(str(tmp_path), "q.sock")
    where = [] if tcp else ["-k", sock]
    cmd = [sys.executable, "-m", "qcow2py.nbd.cli", *args, *where, str(image)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    served = Served(proc, sock)
    try:
        _wait_socket(wait_path or sock, proc)
        yield served
    finally:
        if proc.poll() is None:
            served.stop()


@contextmanager
def qemu_nbd(image, tmp_path, *args: str, fmt: str = "qcow2"):
    """The reference server on the same image."""
    need("qemu-nbd")
    sock = os.path.join(str(tmp_path), "ref.sock")
    cmd = ["qemu-nbd", "-t", "-f", fmt, "-k", sock, *args, str(image)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    served = Served(proc, sock)
    try:
        _wait_socket(sock, proc)
        yield served
    finally:
        if proc.poll() is None:
            served.stop()


def nbd(*args: str, timeout: float = 60.0) -> str:
    """Run an NBD client tool (nbdinfo, nbdcopy, qemu-io, qemu-img); its stdout."""
    need(args[0])
    p = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


def qemu_io_nbd(url: str, *commands: str, read_only: bool = False) -> str:
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in commands:
        args += ["-c", c]
    out = nbd(*args, url)
    for line in out.splitlines():
        if "error" in line.lower() or "failed" in line.lower() or "mismatch" in line.lower():
            raise AssertionError(f"qemu-io reported: {line}")
    return out


# -- a raw client, written from the protocol's numbers (not from the server) ---------
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9


class RawClient:
    """Just enough NBD to send hostile bytes and read what comes back."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)

    def close(self) -> None:
        self.s.close()

    def recv_exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def closed_by_server(self) -> bool:
        """True when the server closes the connection (EOF or reset) within the timeout."""
        try:
            while True:
                if not self.s.recv(4096):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def greet(self, flags: int = 3) -> int:
        hello = self.recv_exactly(18)
        assert hello[:8] == NBDMAGIC and hello[8:16] == IHAVEOPT
        self.s.sendall(struct.pack(">I", flags))
        return struct.unpack(">H", hello[16:])[0]

    def option(self, opt: int, data: bytes = b"") -> None:
        self.s.sendall(IHAVEOPT + struct.pack(">II", opt, len(data)) + data)

    def option_reply(self):
        magic, opt, rtype, n = struct.unpack(">QIII", self.recv_exactly(20))
        assert magic == REPLY_MAGIC
        return opt, rtype, self.recv_exactly(n)

    def replies_until_final(self) -> List[tuple]:
        out = []
        while True:
            r = self.option_reply()
            out.append(r)
            if r[1] == 1 or r[1] & (1 << 31):
                return out

    def go(self, name: str = "", structured: bool = True) -> tuple:
        """Negotiate into transmission: ``(size, flags)``."""
        self.greet()
        if structured:
            self.option(8)
            assert self.option_reply()[1] == 1
        raw = name.encode()
        self.option(7, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        size = flags = None
        for _opt, rtype, data in self.replies_until_final():
            assert rtype in (1, 3), f"GO refused: {rtype:#x} {data!r}"
            if rtype == 3 and struct.unpack(">H", data[:2])[0] == 0:
                size, flags = struct.unpack(">QH", data[2:12])
        return size, flags

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                cookie: int = 1, payload: bytes = b"") -> None:
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length)
                       + payload)

    def simple_reply(self) -> tuple:
        magic, err, cookie = struct.unpack(">IIQ", self.recv_exactly(16))
        assert magic == 0x67446698, hex(magic)
        return err, cookie

    def chunk(self) -> tuple:
        """One structured reply chunk: ``(flags, type, cookie, payload)``."""
        magic, flags, rtype, cookie, n = struct.unpack(">IHHQI", self.recv_exactly(20))
        assert magic == 0x668E33EF, hex(magic)
        return flags, rtype, cookie, self.recv_exactly(n)

    def structured_error(self) -> int:
        flags, rtype, _cookie, data = self.chunk()
        assert rtype & 0x8000 and flags & 1, (flags, rtype)
        return struct.unpack(">I", data[:4])[0]
