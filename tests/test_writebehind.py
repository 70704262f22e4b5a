"""Write-behind (io/writebehind.py): a stream of contiguous writes starts its
writeback every window; scattered writes never do; the hint changes no byte.

The kernel call itself is seen with strace (``sync_file_range`` on the image's
descriptor while a 32 MiB stream is written, none for 4 KiB scattered writes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

import qcow2py
from qcow2py import native
from qcow2py.io import directio
from qcow2py.io.storage import FileStorage
from qcow2py.io.writebehind import WriteBehind

from qemu import need, qemu_img

MiB = 1 << 20


@pytest.fixture
def kicks(monkeypatch):
    """Every start_writeback call, as (fd, offset, length)."""
    seen = []
    real = native.start_writeback

    def record(fd, offset, length):
        seen.append((fd, offset, length))
        real(fd, offset, length)
    monkeypatch.setattr(native, "start_writeback", record)
    return seen


def test_contiguous_stream_kicks_every_window(kicks):
    wb = WriteBehind(window=4096)
    for off in range(0, 16384, 1024):
        wb.wrote(7, off, 1024)
    assert [(o, n) for _, o, n in kicks] == [(0, 4096), (4096, 4096), (8192, 4096),
                                            (12288, 4096)]


def test_a_jump_starts_a_new_stream(kicks):
    wb = WriteBehind(window=4096)
    wb.wrote(7, 0, 3072)
    wb.wrote(7, 100000, 3072)          # not a continuation: the 3 KiB before are dropped
    wb.wrote(7, 103072, 1024)
    assert [(o, n) for _, o, n in kicks] == [(100000, 4096)]


def test_scattered_writes_never_kick(kicks):
    wb = WriteBehind(window=4096)
    for k in range(200):
        wb.wrote(7, (k * 40503 % 997) * 8192, 1024)     # each under the window
    assert kicks == []


def test_threads_writing_one_stream_kick_only_valid_ranges(kicks, tmp_path):
    p = tmp_path / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT)
    try:
        wb = WriteBehind(window=64 * 1024)

        def run(t):
            for k in range(t, 512, 4):
                wb.wrote(fd, k * 4096, 4096)
        ts = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        os.close(fd)
    assert all(o >= 0 and n > 0 for _, o, n in kicks), kicks


def test_image_stream_kicks_and_scattered_does_not(tmp_path, kicks):
    p = str(tmp_path / "a.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", p, "256M")
    with qcow2py.open(p, "r+") as img:
        for off in range(0, 32 * MiB, MiB):
            img.write(off, bytes([0x5a]) * MiB)
        streamed = list(kicks)
        del kicks[:]
        for k in range(64):
            img.write(64 * MiB + (k * 40503 % 4000) * 16384, b"\x11" * 4096)
        scattered = list(kicks)
    assert sum(n for _, _, n in streamed) >= 24 * MiB, streamed
    assert scattered == []
    qemu_img("check", "-q", p)
    raw = tmp_path / "a.raw"
    qemu_img("convert", "-O", "raw", p, str(raw))
    with open(raw, "rb") as f:
        assert f.read(32 * MiB) == bytes([0x5a]) * (32 * MiB)


def test_no_write_behind_without_page_cache_or_flushes(tmp_path, kicks):
    p = str(tmp_path / "f.raw")
    with open(p, "wb") as f:
        f.truncate(64 * MiB)
    for cache in ("unsafe", "writethrough"):
        st = directio.open_storage(p, writable=True, cache=cache)
        try:
            for off in range(0, 32 * MiB, MiB):
                st.pwrite(b"\x01" * MiB, off)
        finally:
            st.close()
    assert kicks == []
    st = FileStorage(p, writable=True)
    try:
        for off in range(0, 32 * MiB, MiB):
            st.pwrite(b"\x02" * MiB, off)
    finally:
        st.close()
    assert kicks, "a plain writable file storage starts writeback of a stream"


@pytest.mark.parametrize("backend", ["c", "pure"])
def test_start_writeback_accepts_any_range_and_changes_nothing(tmp_path, backend):
    from qcow2py.native import backend_c, backend_pure
    if backend == "c" and not backend_c.AVAILABLE:
        pytest.fail("the C extension is not built")
    mod = backend_c if backend == "c" else backend_pure
    p = tmp_path / "f"
    p.write_bytes(b"\x07" * 8192)
    fd = os.open(p, os.O_RDWR)
    try:
        for off, n in ((0, 8192), (0, 0), (4096, 1 << 40), (-1, 10), (0, -5)):
            assert mod.start_writeback(fd, off, n) is None     # a hint: never raises
    finally:
        os.close(fd)
    assert p.read_bytes() == b"\x07" * 8192


def test_strace_sees_sync_file_range_for_a_stream(tmp_path):
    need("strace")
    if not native.USE_NATIVE:
        pytest.fail("the C extension is not built (QCOW2PY_PURE set?)")
    p = str(tmp_path / "s.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", p, "64M")
    log = tmp_path / "trace"
    code = ("import qcow2py, sys\n"
            "with qcow2py.open(sys.argv[1], 'r+') as img:\n"
            "    for off in range(0, 32 << 20, 1 << 20):\n"
            "        img.write(off, b'\\x33' * (1 << 20))\n")
    subprocess.run(["strace", "-f", "-e", "trace=sync_file_range", "-o", str(log),
                    sys.executable, "-c", code, p], check=True)
    calls = [ln for ln in log.read_text().splitlines() if "sync_file_range(" in ln]
    assert len(calls) >= 3, calls
    assert all("SYNC_FILE_RANGE_WRITE" in ln and "= 0" in ln for ln in calls), calls
