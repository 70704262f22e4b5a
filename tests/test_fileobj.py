"""Images as file objects: tarfile, shutil, hashlib and io.BufferedReader over as_file()."""

import hashlib
import io
import os
import random
import shutil
import tarfile

import pytest

import qcow2py
from qemu import create, qemu_io, raw_sha256

MiB = 1 << 20


@pytest.fixture
def chain(tmp_path):
    """A 4 MiB two-layer chain (512 B clusters on top) with data in both layers."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, 4 * MiB)
    qemu_io(base, "write -P 0x11 0 1M", "write -P 0x22 3M 512k")
    create(top, 4 * MiB, "cluster_size=512", backing=base)
    qemu_io(top, "write -P 0x33 1000 5000", "write -z 3M 4k")
    return top


def test_hash_and_copyfileobj_match_qemu(chain, tmp_path):
    want = raw_sha256(chain, tmp_path)
    with qcow2py.open(chain) as img:
        f = img.as_file()
        assert f.readable() and f.seekable() and not f.writable()
        h = hashlib.sha256()
        for block in iter(lambda: f.read(100_000), b""):     # odd-sized reads
            h.update(block)
        assert h.hexdigest() == want
        f.seek(0)
        out = io.BytesIO()
        shutil.copyfileobj(io.BufferedReader(f, 7777), out)
        assert hashlib.sha256(out.getvalue()).hexdigest() == want
        f.close()
        assert img.read(1000, 3) == b"\x33" * 3             # the image stays open


def test_seek_tell_and_short_reads(chain):
    with qcow2py.open(chain) as img, img.as_file() as f:
        assert f.seek(-10, os.SEEK_END) == img.size - 10
        assert f.read(100) == img.read(img.size - 10, 10)
        assert f.read(5) == b""
        assert f.seek(999) == 999 and f.tell() == 999
        assert f.read(3) == b"\x11\x33\x33"
        f.seek(2, os.SEEK_CUR)
        assert f.tell() == 1004
        with pytest.raises(OSError):
            f.seek(-1)
        buf = bytearray(10)
        f.seek(img.size - 4)
        assert f.readinto(buf) == 4


def test_read_only_file_refuses_writes(chain):
    with qcow2py.open(chain) as img, img.as_file() as f:
        with pytest.raises(OSError):          # io.UnsupportedOperation is both OSError and ValueError
            f.write(b"x")
        with pytest.raises(ValueError):
            img.as_file(writable=True)
    with pytest.raises(ValueError):
        f.read(1)                             # closed file


def test_random_writes_any_alignment(chain, tmp_path):
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    with qcow2py.open(chain) as img:
        model = bytearray(img.read(0, img.size))
    with qcow2py.open(chain, "r+") as img:
        f = img.as_file()
        assert f.writable()
        for _ in range(40):
            off = rnd.randrange(img.size - 9000)
            data = rnd.randbytes(rnd.randrange(1, 9000))
            f.seek(off)
            assert f.write(data) == len(data)
            model[off:off + len(data)] = data
        with pytest.raises(OSError):
            f.seek(img.size - 1)
            f.write(b"ab")                    # past the end of the disk
        f.close()
        img.write(0, b"still open")
        model[0:10] = b"still open"
    assert raw_sha256(chain, tmp_path) == hashlib.sha256(model).hexdigest(), f"seed {seed}"


def test_tarfile_roundtrip(tmp_path):
    """A tar archive written into a disk and read back from it with tarfile."""
    path = tmp_path / "disk.qcow2"
    payload = {"a.txt": b"hello\n", "big.bin": os.urandom(300_000)}
    with qcow2py.create(path, 4 * MiB) as img:
        with img.as_file() as f, tarfile.open(fileobj=f, mode="w") as tar:
            for name, data in payload.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    with qcow2py.open(path) as img, img.as_file() as f:
        with tarfile.open(fileobj=io.BufferedReader(f), mode="r") as tar:
            got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert got == payload
