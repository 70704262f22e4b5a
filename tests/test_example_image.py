"""The shipped example images (made by qemu-img/qemu-io 7.2), checked without QEMU.

example-base.qcow2: 4 KiB clusters, 0x11 at [0, 64k), a compressed 8 KiB of 0x22 at 1M.
example.qcow2: overlay with 0x33 at [32k, 48k), a zero cluster at 1M, bitmap "backup0".
"""

import hashlib
import os
import subprocess
import sys

import qcow2py

DATA = os.path.join(os.path.dirname(__file__), "data")
TOP = os.path.join(DATA, "example.qcow2")


def expected_content() -> bytes:
    buf = bytearray(16 << 20)
    buf[0:65536] = b"\x11" * 65536
    buf[32768:49152] = b"\x33" * 16384
    buf[(1 << 20) + 4096:(1 << 20) + 8192] = b"\x22" * 4096
    return bytes(buf)


def test_read_whole_chain():
    with qcow2py.open(TOP) as img:
        assert (img.format, img.size, img.cluster_size) == ("qcow2", 16 << 20, 4096)
        assert img.backing is not None and img.backing.format == "qcow2"
        got = img.read(0, img.size)
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected_content()).digest()


def test_unaligned_reads():
    want = expected_content()
    with qcow2py.open(TOP) as img:
        for off, n in [(1, 1), (32767, 2), (49151, 3), (65535, 4097), ((1 << 20) - 5, 9000),
                       ((1 << 20) + 4097, 100), ((16 << 20) - 1, 1)]:
            assert img.read(off, n) == want[off:off + n], (off, n)


def test_map_matches_qemu():
    with qcow2py.open(TOP) as img:
        entries = img.map()
    assert entries == [
        {"start": 0, "length": 32768, "depth": 1, "present": True, "zero": False, "data": True, "offset": 20480},
        {"start": 32768, "length": 16384, "depth": 0, "present": True, "zero": False, "data": True, "offset": 20480},
        {"start": 49152, "length": 16384, "depth": 1, "present": True, "zero": False, "data": True, "offset": 69632},
        {"start": 65536, "length": 983040, "depth": 1, "present": False, "zero": True, "data": False},
        {"start": 1048576, "length": 4096, "depth": 0, "present": True, "zero": True, "data": False},
        {"start": 1052672, "length": 4096, "depth": 1, "present": True, "zero": False, "data": True},
        {"start": 1056768, "length": 15720448, "depth": 1, "present": False, "zero": True, "data": False},
    ]


def test_info_fields():
    with qcow2py.open(TOP) as img:
        info = img.info()
    assert info["backing-filename"] == "example-base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["format-specific"]["data"]["bitmaps"] == [
        {"name": "backup0", "granularity": 4096, "flags": ["auto"]}]


def test_cli_runs_as_module():
    p = subprocess.run([sys.executable, "-m", "qcow2py", "map", "--output=json", TOP],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith('[{ "start": 0, "length": 32768, "depth": 1,')
    p = subprocess.run([sys.executable, "-m", "qcow2py", "info", os.path.join(DATA, "nope")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.returncode == 1 and "No such file" in p.stderr
