"""``qcow2py create`` against ``qemu-img create``: the same command line gives the
same "Formatting ..." line, the same files byte for byte, and the same refusals
(one line on stderr, exit status 1)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from qcow2py import cli
from qcow2py.cli import parse_qemu_size
from qemu import create, need, qemu_img

KiB = 1 << 10
MiB = 1 << 20


def ours(d: Path, args, capsys, monkeypatch):
    monkeypatch.chdir(d)
    capsys.readouterr()
    try:
        code = cli.main(["create", *args])
    except SystemExit as e:             # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def theirs(d: Path, args):
    p = qemu_img("create", *args, cwd=d, check=False)
    return p.returncode, p.stdout, p.stderr


def setup_dirs(tmp_path: Path):
    dirs = []
    for name in ("ours", "qemu"):
        d = tmp_path / name
        d.mkdir()
        create(d / "base.qcow2", "24M")
        dirs.append(d)
    return dirs


SAME = [
    "-f qcow2 a.qcow2 64M",
    "-f qcow2 -o compat=0.10 a.qcow2 1G",
    "-f qcow2 -o cluster_size=4k,refcount_bits=64,lazy_refcounts=on,compression_type=zstd "
    "a.qcow2 10M",
    "-f qcow2 -o cluster_size=32k,extended_l2=on,preallocation=metadata a.qcow2 1.5M",
    "-f qcow2 -o preallocation=off,refcount_bits=16 a.qcow2 1k",
    "-f qcow2 -b base.qcow2 -F qcow2 a.qcow2",
    "-f qcow2 -b base.qcow2 -F qcow2 a.qcow2 128M",
    "-f qcow2 -u -b missing.qcow2 -F qcow2 a.qcow2 1M",
    "-f qcow2 -o backing_file=base.qcow2,backing_fmt=qcow2 a.qcow2",
    "-f qcow2 -b base.qcow2 -F raw a.qcow2",
    "-f qcow2 -o data_file=a.data,data_file_raw=on a.qcow2 1M",
    "-f qcow2 -o compression_type=zstd,compat=1.1,data_file=a.data a.qcow2 3M",
    "-f qcow2 -o lazy_refcounts=yes,compat=v3 -o refcount_bits=010 a.qcow2 0x100000",
    "-f qcow2 -o lazy_refcounts,extended_l2=off,data_file_raw=off a.qcow2 12345",
    "-f qcow2 -o cluster_size=65536,cluster_size=512 a.qcow2 1.5G",
    "-f qcow2 -o size=2M a.qcow2",
    "-f qcow2 a.qcow2 0",
    "-q -f qcow2 a.qcow2 1M",
    "-f raw a.raw 1M",
    "-f raw -o preallocation=falloc a.raw 12345",
    "-f raw -o size=4M a.raw",
    "a.raw 1t",
]


@pytest.mark.parametrize("line", SAME)
def test_same_output_and_files(tmp_path, capsys, monkeypatch, line):
    need("qemu-img")
    mine, qdir = setup_dirs(tmp_path)
    args = shlex.split(line)
    code, out, err = ours(mine, args, capsys, monkeypatch)
    qcode, qout, qerr = theirs(qdir, args)
    assert qcode == 0, qerr
    assert (code, err) == (0, ""), err
    assert out == qout.replace("\r", ""), (out, qout)
    names = sorted(p.name for p in qdir.iterdir())
    assert sorted(p.name for p in mine.iterdir()) == names
    for n in names:
        if (qdir / n).stat().st_size > 64 * MiB:          # a big sparse raw file
            assert (mine / n).stat().st_size == (qdir / n).stat().st_size, n
            continue
        a, b = (mine / n).read_bytes(), (qdir / n).read_bytes()
        assert a == b, f"{n} differs from qemu-img's"


# (command line, compare the message text too)
REFUSED = [
    ("-f qcow2 a.qcow2 abc", True),
    ("-f qcow2 a.qcow2 1.5", True),
    ("-f qcow2 a.qcow2 1KiB", True),
    ("-f qcow2 a.qcow2 9223372036854775808", True),
    ("-f qcow2 a.qcow2 8192P", True),
    ("-f qcow2 -o foo=bar a.qcow2 1M", True),
    ("-f qcow2 -o lazy_refcounts=maybe a.qcow2 1M", True),
    ("-f qcow2 -o lazy_refcounts=ON a.qcow2 1M", True),
    ("-f qcow2 -o cluster_size=abc a.qcow2 1M", True),
    ("-f qcow2 -o refcount_bits=16k a.qcow2 1M", True),
    ("-f qcow2 a.qcow2", True),
    ("-f qcow2 -u -b base.qcow2 -F qcow2 a.qcow2", True),
    ("-f qcow2 -b base.qcow2 a.qcow2", True),
    ("-f qcow2 -b missing.qcow2 -F qcow2 a.qcow2 1M", True),
    ("-f qcow2 -o size=4M a.qcow2 1M", True),
    ("-f raw -o cluster_size=64k a.raw 1M", True),
    ("-f raw -b base.qcow2 -F qcow2 a.raw 1M", True),
    ("-f qcow2 -F qcow2 a.qcow2 1M", True),
    ("-f qcow2 -o cluster_size=1.5k a.qcow2 1M", True),
    ("-f qcow2 -o cluster_size=4M a.qcow2 1M", True),
    ("-f qcow2 -o refcount_bits=3 a.qcow2 1M", True),
    ("-f qcow2 -o compat=0.10,lazy_refcounts=on a.qcow2 1M", True),
    ("-f qcow2 -o compat=0.10,compression_type=zstd a.qcow2 1M", True),
    ("-f qcow2 -o extended_l2=on,cluster_size=8k a.qcow2 1M", True),
    ("-f qcow2 -o data_file_raw=on a.qcow2 1M", True),
    ("-f qcow2 -o preallocation=full -b base.qcow2 -F qcow2 a.qcow2 1M", True),
    ("-f qcow2 -o preallocation=sparse a.qcow2 1M", True),
    ("-f qcow2 -o compat=1.2 a.qcow2 1M", True),
    ("-f qcow2 -o compression_type=lzo a.qcow2 1M", True),
    ("-f qcow2 a.qcow2 1E", True),
    ("-f qcow2 -o , a.qcow2 1M", True),
    ("-f qcow2", True),
    ("-f qcow2 a.qcow2 1M extra", False),
    ("-f qcow2 --bogus a.qcow2 1M", False),
    ("-f vmdk-not-a-format a.vmdk 1M", False),
]


def _qemu_message(qerr: str) -> str:
    """qemu-img's message without its prefixes; the size help's two lines as one."""
    lines = [ln[len("qemu-img: "):] if ln.startswith("qemu-img: ") else ln
             for ln in qerr.strip().splitlines()]
    if lines and lines[0].startswith("Invalid image size specified. You may use"):
        return " ".join(lines[:2])
    return lines[0] if lines else ""


@pytest.mark.parametrize("line,same_text", REFUSED, ids=[r[0] for r in REFUSED])
def test_same_refusals(tmp_path, capsys, monkeypatch, line, same_text):
    need("qemu-img")
    mine, qdir = setup_dirs(tmp_path)
    args = shlex.split(line)
    code, out, err = ours(mine, args, capsys, monkeypatch)
    qcode, qout, qerr = theirs(qdir, args)
    assert qcode == 1, (qout, qerr)
    assert code == 1, (out, err)
    assert len(err.splitlines()) == 1 and err.startswith("qcow2py"), err
    assert out == qout, (out, qout)           # a "Formatting" line when qemu-img prints one
    if same_text:
        msg = err.strip()[len("qcow2py: "):]
        assert msg == _qemu_message(qerr), (msg, qerr)
    # neither left an image behind
    assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in qdir.iterdir())


def test_refuses_an_image_in_use(tmp_path, capsys, monkeypatch):
    """Like qemu-img create, never truncate an image that a QEMU process has open."""
    need("qemu-io")
    img = tmp_path / "held.qcow2"
    create(img, "4M")
    before = img.read_bytes()
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert holder.stdout.read(8) == b"qemu-io>"           # the image is open
        qcode, _, qerr = theirs(tmp_path, ["-f", "qcow2", img.name, "1M"])
        assert qcode == 1 and 'Failed to get "write" lock' in qerr
        for fmt in ("qcow2", "raw"):
            code, out, err = ours(tmp_path, ["-f", fmt, img.name, "1M"], capsys, monkeypatch)
            # qemu-img's two lines: the refusal and "Is another process using the image"
            assert code == 1 and err.replace("qcow2py:", "qemu-img:") == qerr, (err, qerr)
            assert out.startswith(f"Formatting '{img.name}', fmt={fmt} ")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert img.read_bytes() == before
    code, _, _ = ours(tmp_path, ["-q", "-f", "qcow2", img.name, "1M"], capsys, monkeypatch)
    assert code == 0 and qemu_img("info", img).returncode == 0


def test_entry_point_and_help(tmp_path):
    """The installed command path: ``python -m qcow2py create``."""
    r = subprocess.run([sys.executable, "-m", "qcow2py", "create", "-f", "qcow2", "-o",
                        "cluster_size=4k", "x.qcow2", "2M"], cwd=str(tmp_path),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 0 and r.stdout.startswith("Formatting 'x.qcow2', fmt=qcow2 "
                                                     "cluster_size=4096 "), r
    r = subprocess.run([sys.executable, "-m", "qcow2py", "create", "-f", "qcow2", "-o", "help"],
                       cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    assert r.returncode == 0 and "refcount_bits=<number>" in r.stdout
    r = subprocess.run([sys.executable, "-m", "qcow2py", "create", "-f", "qcow2", "y.qcow2",
                        "2Q"], cwd=str(tmp_path), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and r.stdout == ""


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("512", 512), ("010", 10), (" 1M", MiB), ("1k", KiB), ("1K", KiB),
    ("1b", 1), ("1B", 1), ("1.5k", 1536), ("1.0", 1), ("1.", 1), ("1.k", KiB),
    ("1.0000000001k", KiB), ("0.0001k", 0), ("1g", 1 << 30), ("1T", 1 << 40),
    ("1P", 1 << 50), ("1E", 1 << 60), ("0x10", 16), ("0x10k", 16 * KiB),
])
def test_size_syntax(text, value):
    assert parse_qemu_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1.5", "1.5b", ".5k", "1M ", "1kB", "1KiB",
                                  "0x1.8k", "-1", "1Q"])
def test_size_syntax_refused(text):
    with pytest.raises(ValueError):
        parse_qemu_size(text)
