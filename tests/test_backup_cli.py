"""``qcow2py backup``: results judged by qemu-img, errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import qcow2py

from qemu import need, qemu_img, qemu_io

MiB = 1 << 20


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qcow2py", "backup", *map(str, args)],
                          cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _disk(tmp_path):
    need("qemu-img")
    d = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", d, "32M")
    qemu_io(str(d), "write -P 0x5d 0 4M")
    qemu_img("bitmap", "--add", d, "b0")
    qemu_io(str(d), "write -P 0x6e 16M 1M")
    return d


def test_full_and_incremental(tmp_path):
    d = _disk(tmp_path)
    out, temp = tmp_path / "out.qcow2", tmp_path / "t.qcow2"
    r = _cli("--temp", temp, "-p", d, out)
    assert r.returncode == 0, r.stderr
    assert "100.00/100%" in r.stderr
    qemu_img("compare", d, out)
    qemu_img("check", out)
    qemu_img("check", d)
    assert not temp.exists()
    inc = tmp_path / "inc.raw"
    r = _cli("--temp", temp, "--bitmap", "b0", "-O", "raw", "--ram-cache", "8M",
             "--order", "host", "--no-discard-source", d, inc)
    assert r.returncode == 0, r.stderr
    m = json.loads(qemu_img("map", "-f", "raw", "--output=json", inc).stdout)
    assert [(e["start"], e["length"]) for e in m if e["data"]] == [(16 * MiB, MiB)]
    qemu_io(str(inc), "read -P 0x6e 16M 1M", fmt="raw")
    # the disk's bitmap is left as it was
    info = json.loads(qemu_img("info", "--output=json", d).stdout)
    assert info["format-specific"]["data"]["bitmaps"][0]["name"] == "b0"


def test_errors(tmp_path):
    d = _disk(tmp_path)
    out, temp = tmp_path / "out.qcow2", tmp_path / "t.qcow2"
    out.write_bytes(b"keep")
    r = _cli("--temp", temp, d, out)
    assert r.returncode == 1 and r.stderr == f"qcow2py backup: Could not create '{out}': " \
                                              f"File exists\n"
    assert out.read_bytes() == b"keep"
    r = _cli("--temp", temp, tmp_path / "nope.qcow2", tmp_path / "o2")
    assert r.returncode == 1
    assert "Could not open" in r.stderr and "No such file or directory" in r.stderr
    r = _cli("--temp", temp, "--bitmap", "zz", d, tmp_path / "o3")
    assert r.returncode == 1 and "Dirty bitmap 'zz' not found" in r.stderr
    assert not (tmp_path / "o3").exists() and not temp.exists()
    r = _cli(d, tmp_path / "o4")
    assert r.returncode == 1 and "--temp" in r.stderr
    r = _cli("--temp", temp, "--ram-cache", "lots", d, tmp_path / "o5")
    assert r.returncode == 1 and "Invalid RAM cache size" in r.stderr
    # a disk another writer holds is refused with the lock error
    with qcow2py.open(str(d), "r+"):
        r = _cli("--temp", temp, d, tmp_path / "o6")
    assert r.returncode == 1 and "lock" in r.stderr, r.stderr
    assert not (tmp_path / "o6").exists() and not temp.exists()
