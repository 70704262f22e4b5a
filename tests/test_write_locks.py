"""qcow2py's write locks against QEMU's (and its own).

qcow2py takes QEMU's OFD byte-range locks on every open, so a QEMU process
and qcow2py (or two qcow2py writers) never write one image at once, and
``qemu-img info`` without ``-U`` refuses an image qcow2py writes, as it
refuses one a VM writes.  A read-only open does not share "write" (as
qemu-img's): it is refused while QEMU writes, unless ``force_share``.
The full matrix against QEMU is tests/test_locks_matrix.py.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path

import pytest

import qcow2py
from qemu import create, need, qemu_img, qemu_io

LOCK_MSG = "lock"


class QemuHolder:
    """A QEMU process holding an image open (qemu-io at its prompt, or qemu-nbd)."""

    def __init__(self, args, ready, stop_by_eof: bool = True) -> None:
        need(args[0])
        self.stop_by_eof = stop_by_eof
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        out = b""
        while not ready(out):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"{args[0]} did not open the image: {out!r}")
            r, _, _ = select.select([self.proc.stdout], [], [], 0.05)
            if r:
                out += os.read(self.proc.stdout.fileno(), 4096)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                if not self.stop_by_eof:
                    raise subprocess.TimeoutExpired(self.proc.args, 0)
                self.proc.stdin.close()            # qemu-io quits at EOF
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    # a loaded machine (2 cores, parallel suites) can take seconds here
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=30)
        for f in (self.proc.stdin, self.proc.stdout):
            if not f.closed:
                f.close()


def qemu_io_holding(path: Path, *extra: str) -> QemuHolder:
    """``qemu-io`` with the image open, sitting at its prompt (stdin is a pipe)."""
    return QemuHolder(["qemu-io", *extra, "-f", "qcow2", str(path)],
                      lambda out: b"qemu-io>" in out)


def _write_locked(path: Path) -> bool:
    """QEMU's own view: another process holds the image's write permission."""
    p = qemu_img("info", path, check=False)
    return p.returncode != 0 and 'Failed to get shared "write" lock' in p.stderr


def qemu_nbd_holding(path: Path, sock: Path) -> QemuHolder:
    """``qemu-nbd --persistent`` serving the image read-write on a unix socket; ready
    once QEMU itself sees the write lock (the socket may appear before the lock)."""
    return QemuHolder(["qemu-nbd", "--persistent", "-f", "qcow2", "-k", str(sock), str(path)],
                      lambda out: sock.exists() and _write_locked(path), stop_by_eof=False)


def qemu_io_write(path: Path) -> subprocess.CompletedProcess:
    need("qemu-io")
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 512", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "img.qcow2"
    create(path, "4M")
    qemu_io(path, "write -P 1 0 64k")
    return path


def test_qemu_io_writer_locks_out_qcow2py(image):
    holder = qemu_io_holding(image)
    try:
        with pytest.raises(qcow2py.ImageLockedError, match="lock"):
            qcow2py.open(str(image), "r+")
        # reading is refused as qemu-img refuses it; force_share (-U) reads anyway
        with pytest.raises(qcow2py.ImageLockedError, match='shared "write" lock'):
            qcow2py.open(str(image))
        with qcow2py.open(str(image), force_share=True) as img:
            assert img.read(0, 512) == b"\x01" * 512
    finally:
        holder.close()
    with qcow2py.open(str(image), "r+") as img:       # free again
        img.write(0, b"\x02" * 512)
    assert qemu_img("check", image, check=False).returncode == 0


def test_qemu_io_reader_locks_out_qcow2py_writer(image):
    """``qemu-io -r`` does not share "write": qcow2py may not write under it."""
    holder = qemu_io_holding(image, "-r")
    try:
        with pytest.raises(qcow2py.ImageLockedError):
            qcow2py.open(str(image), "r+")
    finally:
        holder.close()


def test_qemu_nbd_locks_out_qcow2py(image, tmp_path):
    holder = qemu_nbd_holding(image, tmp_path / "nbd.sock")
    try:
        with pytest.raises(qcow2py.ImageLockedError):
            qcow2py.open(str(image), "r+")
        with pytest.raises(qcow2py.ImageLockedError):
            qcow2py.open(str(image))
        with qcow2py.open(str(image), force_share=True) as img:
            assert img.read(0, 512) == b"\x01" * 512
    finally:
        holder.close()
    with qcow2py.open(str(image), "r+"):
        pass


def test_qcow2py_writer_locks_out_qemu(image):
    img = qcow2py.open(str(image), "r+")
    try:
        img.write(0, b"\x03" * 4096)
        p = qemu_io_write(image)
        assert p.returncode != 0 or "wrote" not in p.stdout, p
        assert 'Failed to get "write" lock' in p.stderr, p.stderr
        info = qemu_img("info", image, check=False)
        assert info.returncode != 0 and 'Failed to get shared "write" lock' in info.stderr, info
        shared = qemu_img("info", "-U", "--output=json", image, check=False)
        assert shared.returncode == 0 and '"virtual-size": 4194304' in shared.stdout, shared
        # a read-only qemu-io without -U is refused as well; with -U it reads
        ro = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 1 8k 512",
                             str(image)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
        assert ro.returncode == 0 and "read 512/512" in ro.stdout, ro
    finally:
        img.close()
    # after close everything works again
    p = qemu_io_write(image)
    assert p.returncode == 0 and "wrote 512/512" in p.stdout, p
    assert qemu_img("info", image, check=False).returncode == 0
    with qcow2py.open(str(image)) as img:
        assert img.read(0, 512) == b"\x07" * 512
        assert img.read(512, 512) == b"\x03" * 512
    assert qemu_img("check", image, check=False).returncode == 0


def test_image_from_create_is_locked(tmp_path):
    path = tmp_path / "new.qcow2"
    img = qcow2py.create(str(path), 1 << 20)
    try:
        assert 'Failed to get "write" lock' in qemu_io_write(path).stderr
        with pytest.raises(qcow2py.ImageLockedError):
            qcow2py.open(str(path), "r+")
    finally:
        img.close()
    assert qemu_io_write(path).returncode == 0


def test_two_qcow2py_writers(image):
    first = qcow2py.open(str(image), "r+")
    try:
        with pytest.raises(qcow2py.ImageLockedError):
            qcow2py.open(str(image), "r+")
        # the failed open left the first writer's locks alone
        assert 'Failed to get "write" lock' in qemu_io_write(image).stderr
        first.write(0, b"\x05" * 512)
        # a second writer that opts out of locking is the caller's business
        with qcow2py.open(str(image), "r+", lock=False) as unlocked:
            assert unlocked.read(64 * 1024, 512) == bytes(512)
    finally:
        first.close()
    second = qcow2py.open(str(image), "r+")
    try:
        assert second.read(0, 512) == b"\x05" * 512
    finally:
        second.close()


def test_readers_share_with_readers_not_writers(image):
    """Read-only opens lock as qemu-img's: many readers at once, no writer under them;
    force_share readers keep nobody out."""
    readers = [qcow2py.open(str(image)) for _ in range(2)]
    try:
        p = qemu_io_write(image)
        assert p.returncode != 0 and 'Failed to get "write" lock' in p.stderr, p
        assert qemu_img("info", image, check=False).returncode == 0
        assert qemu_img("check", image, check=False).returncode == 0
        with pytest.raises(qcow2py.ImageLockedError, match='Failed to get "write" lock'):
            qcow2py.open(str(image), "r+")
    finally:
        for r in readers:
            r.close()
    shared = qcow2py.open(str(image), force_share=True)
    try:
        with qcow2py.open(str(image), "r+") as w:
            w.write(4096, b"\x09" * 512)
        p = qemu_io_write(image)
        assert p.returncode == 0 and "wrote 512/512" in p.stdout, p
    finally:
        shared.close()
    with pytest.raises(qcow2py.ForceShareError, match="force-share=on can only be used"):
        qcow2py.open(str(image), "r+", force_share=True)
    assert qemu_img("check", image, check=False).returncode == 0


def test_create_does_not_truncate_an_image_in_use(image, tmp_path):
    """qemu-img create refuses to overwrite an image a QEMU process holds; so does
    qcow2py.create (for the image and for its external data file)."""
    before = image.read_bytes()
    holder = qemu_io_holding(image)
    try:
        for fmt in ("qcow2", "raw"):
            with pytest.raises(qcow2py.ImageLockedError):
                qcow2py.create(str(image), 1 << 20, format=fmt)
        with pytest.raises(qcow2py.ImageLockedError):
            qcow2py.create(str(tmp_path / "other.qcow2"), 1 << 20, data_file=image.name)
    finally:
        holder.close()
    assert image.read_bytes() == before
    with qcow2py.open(str(image), "r+"):              # a qcow2py writer counts too
        with pytest.raises(qcow2py.ImageLockedError):
            qcow2py.create(str(image), 1 << 20)
    assert image.read_bytes() == before
    qcow2py.create(str(image), 1 << 20).close()       # nobody holds it: overwritten
    assert qemu_img("info", "--output=json", image).stdout.count('"virtual-size": 1048576')
