"""Option combinations qemu-img refuses, refused the same way by qcow2py.

Each row of the tables runs live: ``qemu-img convert`` against ``qcow2py-copy``
(and ``qemu-img create`` against :func:`qcow2py.create`), in two copies of the
same directory.  Both must fail with exit status 1, print qemu-img's message
(first line, without the program prefix) and leave no output file behind.  A
refusal that qcow2py misses here is silent data loss (``-O raw -B base`` used
to write only the top layer and exit 0).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import qcow2py
from qcow2py.opener import CreateError
from qemu import create, need, qemu_img

MiB = 1 << 20

# qemu-img convert's refusals for the options qcow2py-copy shares with it
CONVERT = [
    "-O raw -B base.qcow2 -F qcow2 top.qcow2 out.raw",
    "-O raw -o backing_file=base.qcow2,backing_fmt=qcow2 top.qcow2 out.raw",
    "-O raw -o backing_fmt=qcow2 top.qcow2 out.raw",
    "-O raw -o cluster_size=64k top.qcow2 out.raw",
    "-O raw -o compat=1.1 top.qcow2 out.raw",
    "-O raw -o data_file=x top.qcow2 out.raw",
    "-O raw -o preallocation=metadata top.qcow2 out.raw",
    "-O raw -o preallocation=bogus top.qcow2 out.raw",
    "-O raw -c top.qcow2 out.raw",
    "-O raw --bitmaps top.qcow2 out.raw",
    "-O qcow2 -B missing.qcow2 -F qcow2 top.qcow2 out.qcow2",
    "-O qcow2 -B base.qcow2 top.qcow2 out.qcow2",
    "-O qcow2 -o backing_file=base.qcow2 top.qcow2 out.qcow2",
    "-O qcow2 -F qcow2 top.qcow2 out.qcow2",
    "-O qcow2 -o preallocation=metadata -B base.qcow2 -F qcow2 top.qcow2 out.qcow2",
    "-O qcow2 -c -o preallocation=metadata top.qcow2 out.qcow2",
    "-O qcow2 -c -o preallocation=falloc top.qcow2 out.qcow2",
    "-O qcow2 -o compat=0.10,lazy_refcounts=on top.qcow2 out.qcow2",
    "-O qcow2 -o compat=0.10,data_file=d top.qcow2 out.qcow2",
    "-O qcow2 -o cluster_size=3k top.qcow2 out.qcow2",
    "-O qcow2 -o cluster_size=abc top.qcow2 out.qcow2",
    "-O qcow2 -o extended_l2=on,cluster_size=4k top.qcow2 out.qcow2",
    "-O qcow2 -o data_file_raw=on top.qcow2 out.qcow2",
    "-O qcow2 -o lazy_refcounts=maybe top.qcow2 out.qcow2",
    "-O qcow2 -o foo=bar top.qcow2 out.qcow2",
    "-O qcow2 -o compat=0.10 --bitmaps top.qcow2 out.qcow2",
    "-f raw -O qcow2 --bitmaps top.qcow2 out.qcow2",
    "-O qcow2 -n -o cluster_size=4k top.qcow2 base.qcow2",
    "-O qcow2 --target-is-zero top.qcow2 out.qcow2",
    "-O qcow2 --skip-broken-bitmaps top.qcow2 out.qcow2",
    "-O qcow2 -m 17 top.qcow2 out.qcow2",
    "-O qcow2 -S 1000 top.qcow2 out.qcow2",
    "-O qcow2 missing.qcow2 out.qcow2",
]


def _message(err: str, prefix: str) -> str:
    """The first line of a refusal without the program's prefix."""
    first = err.strip().splitlines()[0] if err.strip() else ""
    return first[len(prefix):] if first.startswith(prefix) else first


def _dirs(tmp_path: Path):
    dirs = []
    for name in ("ours", "qemu"):
        d = tmp_path / name
        d.mkdir()
        create(d / "base.qcow2", "1M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 "top.qcow2", cwd=d)
        dirs.append(d)
    return dirs


@pytest.mark.parametrize("line", CONVERT)
def test_convert_refusals_match_qemu_img(tmp_path, line):
    need("qemu-img")
    mine, theirs = _dirs(tmp_path)
    args = shlex.split(line)
    q = qemu_img("convert", *args, cwd=theirs, check=False)
    p = subprocess.run([sys.executable, "-m", "qcow2py.copy", *args], cwd=mine,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    want = _message(q.stderr, "qemu-img: ")
    got = _message(p.stderr, "qcow2py-copy: ")
    assert (p.returncode, got) == (q.returncode, want), (line, p.stderr, q.stderr)
    assert q.returncode == 1
    # nothing left behind that qemu-img would not leave (it keeps some half-made outputs)
    assert set(os.listdir(mine)) <= set(os.listdir(theirs))


# (keyword arguments of qcow2py.create, the same refusal as qemu-img create options)
CREATE = [
    (dict(format="raw", backing_file="base.qcow2", backing_format="qcow2"),
     "-f raw -b base.qcow2 -F qcow2 x.img 1M"),
    (dict(format="raw", backing_file="base.qcow2"), "-f raw -b base.qcow2 x.img 1M"),
    (dict(format="raw", backing_format="qcow2"), "-f raw -o backing_fmt=qcow2 x.img 1M"),
    (dict(format="raw", cluster_size=4096), "-f raw -o cluster_size=4k x.img 1M"),
    (dict(format="raw", compat="0.10"), "-f raw -o compat=0.10 x.img 1M"),
    (dict(format="raw", refcount_bits=8), "-f raw -o refcount_bits=8 x.img 1M"),
    (dict(format="raw", extended_l2=True), "-f raw -o extended_l2=on x.img 1M"),
    (dict(format="raw", lazy_refcounts=True), "-f raw -o lazy_refcounts=on x.img 1M"),
    (dict(format="raw", compression_type="zstd"),
     "-f raw -o compression_type=zstd x.img 1M"),
    (dict(format="raw", data_file="d.raw"), "-f raw -o data_file=d.raw x.img 1M"),
    (dict(format="raw", data_file_raw=True), "-f raw -o data_file_raw=on x.img 1M"),
    (dict(format="raw", preallocation="metadata"),
     "-f raw -o preallocation=metadata x.img 1M"),
]


@pytest.mark.parametrize("kw,line", CREATE, ids=[c[1] for c in CREATE])
def test_create_refusals_match_qemu_img(tmp_path, monkeypatch, kw, line):
    need("qemu-img")
    mine, theirs = _dirs(tmp_path)
    q = qemu_img("create", *shlex.split(line), cwd=theirs, check=False)
    assert q.returncode == 1
    want = _message(q.stderr, "qemu-img: x.img: ")
    monkeypatch.chdir(mine)
    with pytest.raises(CreateError) as e:
        qcow2py.create("x.img", MiB, **kw)
    assert str(e.value) == want
    # nothing left behind that qemu-img would not leave (it keeps some half-made outputs)
    assert set(os.listdir(mine)) <= set(os.listdir(theirs))


def test_copy_raw_with_backing_no_longer_drops_the_base(tmp_path):
    """The silent-data-loss case of issue 15, end to end: refused, nothing written."""
    need("qemu-img")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, "2M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(base)],
                   check=True, stdout=subprocess.DEVNULL)
    p = subprocess.run([sys.executable, "-m", "qcow2py.copy", "-O", "raw", "-B", str(base),
                        "-F", "qcow2", str(top), str(tmp_path / "out.raw")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.returncode == 1
    assert p.stderr == "qcow2py-copy: Backing file not supported for file format 'raw'\n"
    assert not (tmp_path / "out.raw").exists()


@pytest.mark.parametrize("size", [MiB, None])
def test_create_with_missing_backing_raises_backing_chain_error(tmp_path, monkeypatch, size):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(qcow2py.BackingChainError) as e:
        qcow2py.create("x.qcow2", size, backing_file="missing.qcow2", backing_format="qcow2")
    assert "missing.qcow2" in str(e.value) and "No such file or directory" in str(e.value)
    with pytest.raises(qcow2py.BackingChainError):
        qcow2py.create("x.qcow2", size, backing_file="missing.qcow2")
    assert not (tmp_path / "x.qcow2").exists()


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_info_and_map_after_close_raise_image_closed(tmp_path, fmt):
    path = tmp_path / f"x.{fmt}"
    qcow2py.create(path, MiB, format=fmt).close()
    img = qcow2py.open(path)
    img.close()
    for call in (img.info, img.map, lambda: img.info(backing_chain=True),
                 lambda: img.read(0, 512)):
        with pytest.raises(qcow2py.ImageClosedError):
            call()
