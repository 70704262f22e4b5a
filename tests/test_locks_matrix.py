"""qcow2py's permission locks against QEMU's, cell by cell.

The oracle is QEMU against itself, measured live: a QEMU process holds a file
(qemu-io at its prompt, or qemu-nbd on a socket) read-write, read-only or
read-only with -U, and a second QEMU opens a related file "r", "r+" or with
-U.  Every cell must come out the same when qcow2py is the second opener, and
when qcow2py holds the file and QEMU opens.  The relations ("where"): the
same image, the held file as the backing file of the opened overlay, the held
file as the external data file of the opened image, and the reverse of the
last two (QEMU holds the overlay / data-file image, the other opens its
backing / data file alone).  A second test compares the lock bytes themselves
(``/proc/locks``) while qcow2py and qemu-io hold the same files.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import qcow2py
from qemu import create, need, qemu_img, qemu_io
from test_write_locks import QemuHolder

MODES = ("rw", "ro", "U")
#: where -> (held file, its format, opened file, its format)
WHERES = {
    "image": ("ov.qcow2", "qcow2", "ov.qcow2", "qcow2"),
    "backing": ("base.qcow2", "qcow2", "ov.qcow2", "qcow2"),
    "data file": ("d.raw", "raw", "df.qcow2", "qcow2"),
    "overlay of": ("ov.qcow2", "qcow2", "base.qcow2", "qcow2"),
    "image of data file": ("df.qcow2", "qcow2", "d.raw", "raw"),
}
_QEMU_FLAGS = {"rw": [], "ro": ["-r"], "U": ["-r", "-U"]}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("locks")
    create(d / "base.qcow2", "1M")
    qemu_io(d / "base.qcow2", "write -P 1 0 64k")
    create(d / "ov.qcow2", "1M", backing="base.qcow2", cwd=d)
    create(d / "df.qcow2", "1M", f"data_file={d / 'd.raw'}")
    return d


def _qemu_holder(kind: str, d: Path, name: str, fmt: str, mode: str) -> QemuHolder:
    if kind == "qemu-io":
        return QemuHolder(["qemu-io", *_QEMU_FLAGS[mode], "-f", fmt, str(d / name)],
                          lambda out: b"qemu-io>" in out)
    sock = d / "nbd.sock"
    if sock.exists():
        sock.unlink()
    return QemuHolder(["qemu-nbd", "--persistent", *(["-r"] if mode == "ro" else []),
                       "-f", fmt, "-k", str(sock), str(d / name)],
                      lambda out: sock.exists(), stop_by_eof=False)


def _qemu_opens(d: Path, name: str, fmt: str, mode: str) -> bool:
    p = subprocess.run(["qemu-io", *_QEMU_FLAGS[mode], "-f", fmt, "-c", "read 0 512",
                        str(d / name)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, cwd=d)
    ok = p.returncode == 0 and "read 512/512" in p.stdout
    assert ok or "lock" in p.stderr, p        # refused for a lock, not for another reason
    return ok


def _ours(d: Path, name: str, fmt: str, mode: str):
    return qcow2py.open(str(d / name), "r+" if mode == "rw" else "r", format=fmt,
                        force_share=mode == "U")


def _ours_opens(d: Path, name: str, fmt: str, mode: str) -> bool:
    try:
        img = _ours(d, name, fmt, mode)
    except qcow2py.ImageLockedError:
        return False
    img.close()
    return True


def _table(rows: List[Tuple]) -> str:
    return "\n".join("  ".join(f"{c!s:>18}" for c in r) for r in rows)


def _matrix(files: Path, kind: str) -> Dict[Tuple[str, str, str], bool]:
    """QEMU vs QEMU (the oracle) and QEMU vs qcow2py for one holder kind."""
    oracle, bad = {}, []
    modes = MODES if kind == "qemu-io" else ("rw", "ro")      # qemu-nbd has no -U
    for where, (held, hfmt, opened, ofmt) in WHERES.items():
        for hmode in modes:
            holder = _qemu_holder(kind, files, held, hfmt, hmode)
            try:
                for omode in MODES:
                    want = _qemu_opens(files, opened, ofmt, omode)
                    got = _ours_opens(files, opened, ofmt, omode)
                    oracle[where, hmode, omode] = want
                    if want != got:
                        bad.append((kind, where, hmode, omode, want, got))
            finally:
                holder.close()
    assert not bad, "holder, where, held, opened, QEMU, qcow2py:\n" + _table(bad)
    return oracle


def test_matrix_qemu_io_and_qcow2py_both_ways(files):
    need("qemu-io")
    t0 = time.monotonic()
    oracle = _matrix(files, "qemu-io")
    # the oracle is not trivial: cells that pass and cells that fail (a raw qemu-io
    # and a data file share all that the other needs: those rows pass throughout)
    for where in ("image", "backing", "overlay of"):
        cells = [v for (w, _, _), v in oracle.items() if w == where]
        assert True in cells and False in cells, (where, cells)
    # now qcow2py holds and QEMU opens: the same answers as qemu-io holding
    bad = []
    for where, (held, hfmt, opened, ofmt) in WHERES.items():
        for hmode in MODES:
            img = _ours(files, held, hfmt, hmode)
            try:
                for omode in MODES:
                    got = _qemu_opens(files, opened, ofmt, omode)
                    if got != oracle[where, hmode, omode]:
                        bad.append(("qcow2py", where, hmode, omode,
                                    oracle[where, hmode, omode], got))
            finally:
                img.close()
    assert not bad, "holder, where, held, opened, QEMU, QEMU under qcow2py:\n" + _table(bad)
    assert time.monotonic() - t0 < 120


def test_matrix_qemu_nbd(files):
    need("qemu-nbd")
    oracle = _matrix(files, "qemu-nbd")
    assert oracle["image", "rw", "ro"] is False and oracle["image", "ro", "ro"] is True
    # qemu-nbd serving the data file does not share resize: no writer through the image
    assert oracle["data file", "rw", "rw"] is False and oracle["data file", "rw", "ro"] is True


def _lock_bytes(paths: List[Path]) -> Dict[str, List[int]]:
    """OFD lock bytes held on each file (from /proc/locks, by inode)."""
    inodes = {os.stat(p).st_ino: p.name for p in paths}
    out: Dict[str, List[int]] = {p.name: [] for p in paths}
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 8 or parts[1] != "OFDLCK":
                continue
            ino = int(parts[5].split(":")[2])
            if ino in inodes:
                out[inodes[ino]] += range(int(parts[6]), int(parts[7]) + 1)
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.parametrize("name,fmt", [("ov.qcow2", "qcow2"), ("df.qcow2", "qcow2"),
                                      ("d.raw", "raw")])
def test_same_lock_bytes_as_qemu_io(files, name, fmt):
    """The bytes themselves: qcow2py takes what qemu-io takes on every file of the chain."""
    need("qemu-io")
    chain = [files / n for n in ("ov.qcow2", "base.qcow2", "df.qcow2", "d.raw")]
    for mode in MODES:
        holder = _qemu_holder("qemu-io", files, name, fmt, mode)
        try:
            theirs = _lock_bytes(chain)
        finally:
            holder.close()
        with _ours(files, name, fmt, mode):
            ours = _lock_bytes(chain)
        assert ours == theirs, (name, mode)
    assert any(_lock_bytes(chain).values()) is False       # all released on close


def test_chain_false_locks_as_qemu_img_info(files):
    """``qcow2py info`` (chain=False) takes qemu-img info's locks: no consistent read, so
    it works where a reader would not... and it still refuses an image being written."""
    need("qemu-io")
    holder = _qemu_holder("qemu-io", files, "ov.qcow2", "qcow2", "rw")
    try:
        theirs = qemu_img("info", files / "ov.qcow2", check=False)
        with pytest.raises(qcow2py.ImageLockedError, match='shared "write" lock'):
            qcow2py.open(str(files / "ov.qcow2"), chain=False)
        assert theirs.returncode == 1 and 'Failed to get shared "write" lock' in theirs.stderr
        with qcow2py.open(str(files / "ov.qcow2"), chain=False, force_share=True) as img:
            assert img.info()["virtual-size"] == 1 << 20
    finally:
        holder.close()
