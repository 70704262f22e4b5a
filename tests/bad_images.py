"""Bad images for the bad-input tests (test_bad_input*.py): a real image made
with qemu-img/qemu-io, big-endian values poked at known header offsets or
table entries (offsets from the spec, see the reference section 1.1), and the
checks that opening or reading it fails with the right Qcow2Error and message.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct

import pytest

import qcow2py
from qcow2py import Qcow2Error
from qcow2py.cli import copy as copy_cli, img as img_cli
from qcow2py.format.header import Header

from qemu import create, qemu_img, qemu_io

# header field offsets (spec; reference 1.1)
VERSION, BF_OFF, BF_SIZE, CLUSTER_BITS, SIZE, CRYPT = 4, 8, 16, 20, 24, 32
L1_SIZE, L1_OFF, RT_OFF, RT_CLUSTERS, NB_SNAP, SNAP_OFF = 36, 40, 48, 56, 60, 64
INCOMPAT, COMPAT, AUTOCLEAR, REFCOUNT_ORDER, HEADER_LENGTH = 72, 80, 88, 96, 100
COMPRESSION_TYPE = 104

COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def poke(path, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">" + fmt, *values))


def peek(path, offset: int, fmt: str):
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(struct.calcsize(">" + fmt))
    v = struct.unpack(">" + fmt, data)
    return v[0] if len(v) == 1 else v


def header(path) -> Header:
    with open(path, "rb") as f:
        data = f.read(2 << 20)
    cs = 1 << struct.unpack_from(">I", data, CLUSTER_BITS)[0]
    return Header.parse(data[:cs], os.path.getsize(path))


def image(tmp_path, name="t.qcow2", size="4M", *opts, writes=("write -P 0x11 0 128k",),
          backing=None, backing_fmt=None):
    """A qemu-made image with some data in it."""
    path = tmp_path / name
    create(path, size, *opts, backing=backing, backing_fmt=backing_fmt)
    if writes:
        qemu_io(path, *writes)
    return path


def l1_entry_offset(path, index=0) -> int:
    return header(path).l1_table_offset + 8 * index


def l2_entry_offset(path, guest_cluster=0) -> int:
    """File offset of the L2 entry (first word) mapping ``guest_cluster``."""
    h = header(path)
    per = h.l2_entries
    l1e = peek(path, h.l1_table_offset + 8 * (guest_cluster // per), "Q")
    l2 = l1e & OFFSET_MASK
    assert l2, "guest cluster has no L2 table"
    return l2 + (guest_cluster % per) * h.l2_entry_size


def check_msg(err: BaseException, *fragments: str) -> None:
    msg = str(err)
    for frag in fragments:
        assert frag.lower() in msg.lower(), f"{frag!r} not in message {msg!r}"


def open_fails(path, exc, *fragments, **kw):
    with pytest.raises(exc) as ei:
        qcow2py.open(path, **kw).close()
    assert isinstance(ei.value, Qcow2Error)
    check_msg(ei.value, *fragments)
    return ei.value


def read_fails(path, exc, *fragments, offset=0, length=65536, **kw):
    with qcow2py.open(path, **kw) as img:
        with pytest.raises(exc) as ei:
            img.read(offset, length)
    assert isinstance(ei.value, Qcow2Error)
    check_msg(ei.value, *fragments)
    return ei.value


def walk_extensions(path):
    """[(offset_of_ext_header, magic, length)] of cluster 0, end marker excluded."""
    h = header(path)
    pos = h.header_length if h.version == 3 else 72
    out = []
    with open(path, "rb") as f:
        data = f.read(h.cluster_size)
    while True:
        magic, length = struct.unpack_from(">II", data, pos)
        if magic == 0:
            return out, pos
        out.append((pos, magic, length))
        pos += 8 + ((length + 7) & ~7)


def insert_in_cluster0(path, at: int, blob: bytes) -> None:
    """Insert ``blob`` at ``at`` in cluster 0, shifting the rest of the cluster down."""
    cs = header(path).cluster_size
    with open(path, "r+b") as f:
        c0 = f.read(cs)
        assert c0[cs - len(blob):] == bytes(len(blob))
        c0 = c0[:at] + blob + c0[at:cs - len(blob)]
        f.seek(0)
        f.write(c0)


def backed(tmp_path):
    """A qcow2 overlay ``top.qcow2`` over a qcow2 ``base.qcow2`` with some data."""
    image(tmp_path, "base.qcow2")
    return image(tmp_path, "top.qcow2", writes=(), backing="base.qcow2", backing_fmt="qcow2")


def cli_run(main, *args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    assert "Traceback" not in err.getvalue()
    return rc, out.getvalue(), err.getvalue()


def _info_json(text):
    d = json.loads(text)
    d.pop("actual-size", None)
    return d


def opens_as_qemu(path, tmp_path, converts: bool = True) -> None:
    """QEMU opens this image, reading zeros past the end of the file: qcow2py gives
    the same info and map, and converts it to the same bytes (or both fail to)."""
    q = qemu_img("info", "--output=json", path)
    rc, out, err = cli_run(img_cli.main, "info", "--output=json", path)
    assert rc == 0 and _info_json(out) == _info_json(q.stdout), err
    q = qemu_img("map", "--output=json", path)
    rc, out, err = cli_run(img_cli.main, "map", "--output=json", path)
    assert rc == 0 and json.loads(out) == json.loads(q.stdout), err
    qraw, oraw = tmp_path / "q.raw", tmp_path / "o.raw"
    q = qemu_img("convert", "-O", "raw", path, qraw, check=False)
    rc, out, err = cli_run(copy_cli.main, "-O", "raw", path, oraw)
    assert (q.returncode, rc) == ((0, 0) if converts else (1, 1)), (q.stderr, err)
    if converts:
        assert oraw.read_bytes() == qraw.read_bytes()
