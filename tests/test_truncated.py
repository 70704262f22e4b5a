"""Truncated images read as QEMU reads them (issue #11): past the end of the file,
zeros.  A differential test: QEMU-made images cut at seeded random points inside
each of their structures (header, refcount table, refcount block, L1, L2, data,
compressed cluster); ``qcow2py info``, ``map``, ``check`` and ``qcow2py-copy``
must answer as ``qemu-img info``, ``map``, ``check`` and ``convert -O raw`` do:
the same exit codes, the same map and check results, the same raw content; and
where ``qemu-img check -r all`` makes its copy clean, ours makes ours clean.
Failures print the image, the seed and the cut."""

from __future__ import annotations

import json
import os
import random
import struct

import pytest

import qcow2py
from qcow2py.cli import copy as copy_cli
from qcow2py.cli import img as img_cli
from qemu import create, qemu_img, qemu_io

MiB = 1 << 20
SEED = int(os.environ.get("QCOW2PY_TRUNCATE_SEED", "1107"))

#: name -> (create options, qemu-io commands, then qemu-img commands)
IMAGES = {
    "snapshot-bitmap": ((), ("write -P 0x21 0 128k",),
                        (("snapshot", "-c", "s1", "{}"), ("bitmap", "--add", "{}", "b0"))),
    "v3-64k": ((), ("write -P 0x11 0 192k", "write -c -P 0x22 1M 64k",
                    "write -P 0x33 2M 64k", "write -z 3M 64k")),
    "v2-4k": (("compat=0.10", "cluster_size=4096"),
              ("write -P 0x44 0 40k", "write -c -P 0x55 1M 4k", "write -P 0x66 3M 8k")),
    "extl2-32k": (("extended_l2=on", "cluster_size=32768"),
                  ("write -P 0x77 0 20k", "write -P 0x78 100k 70k", "write -c -P 0x79 2M 32k")),
    "rc1-512": (("refcount_bits=1", "cluster_size=512"),
                ("write -P 0x12 0 3k", "write -c -P 0x13 64k 512", "write -P 0x14 1M 2k")),
}


def _structures(path):
    """(name, start, length) of each structure of the image, as cut targets."""
    with open(path, "rb") as f:
        data = f.read()
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    version = struct.unpack_from(">I", data, 4)[0]
    hlen = struct.unpack_from(">I", data, 100)[0] if version == 3 else 72
    l1_size, l1_off, rt_off = struct.unpack_from(">IQQ", data, 36)
    rt_clusters = struct.unpack_from(">I", data, 56)[0]
    out = [("header", 4, hlen + 8 - 4),
           ("refcount table", rt_off, rt_clusters * cs),
           ("L1", l1_off, l1_size * 8)]
    rb = struct.unpack_from(">Q", data, rt_off)[0]
    out.append(("refcount block", rb, cs))
    ext = version == 3 and bool(struct.unpack_from(">Q", data, 72)[0] & 16)
    l2 = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    out.append(("L2", l2, cs))
    step = 16 if ext else 8
    for i in range(cs // step):
        e = struct.unpack_from(">Q", data, l2 + i * step)[0]
        if e & (1 << 62):
            bits = 62 - (struct.unpack_from(">I", data, 20)[0] - 8)
            off = e & ((1 << bits) - 1)
            out.append(("compressed", off, 512 - off % 512))
        elif e & 0x00FFFFFFFFFFFE00:
            out.append(("data", e & 0x00FFFFFFFFFFFE00, cs))
    nb_snap, snap_off = struct.unpack_from(">IQ", data, 60)
    if nb_snap:
        out.append(("snapshot table", snap_off, 64))
    pos = hlen
    while pos + 8 <= cs:
        magic, length = struct.unpack_from(">II", data, pos)
        if magic == 0:
            break
        if magic == 0x23852875:
            dir_size, dir_off = struct.unpack_from(">QQ", data, pos + 16)
            out.append(("bitmap directory", dir_off, dir_size))
            toff = struct.unpack_from(">Q", data, dir_off)[0]
            out.append(("bitmap table", toff, 8))
        pos += 8 + ((length + 7) & ~7)
    out.append(("end", len(data) - 1, 1))
    return out


def _ours(main, args, capsys):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    got = capsys.readouterr()
    return rc, got.out, got.err


def _without_actual_size(text):
    d = json.loads(text)
    d.pop("actual-size", None)
    return d


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_truncated_images_behave_as_with_qemu_img(name, tmp_path, capsys):
    opts, writes, *then = IMAGES[name]
    base = tmp_path / "base.qcow2"
    create(base, "4M", *opts)
    qemu_io(base, *writes)
    for cmd in (then[0] if then else ()):
        qemu_img(*(a.format(base) for a in cmd))
    rng = random.Random(f"{SEED}-{name}")
    cuts = []
    for what, start, length in _structures(base):
        for _ in range(2):
            cuts.append((what, start + rng.randrange(max(length, 1))))
    cuts.append(("header", rng.randrange(4, 104)))
    blob = base.read_bytes()
    opened = repaired = 0
    for what, cut in cuts:
        where = f"image {name}, seed {SEED}, cut {cut} (inside the {what})"
        p = tmp_path / "cut.qcow2"
        p.write_bytes(blob[:cut])
        q_info = qemu_img("info", "--output=json", p, check=False)
        o_info = _ours(img_cli.main, ["info", "--output=json", p], capsys)
        assert o_info[0] == q_info.returncode, f"{where}: info: {o_info[2]} / {q_info.stderr}"
        if q_info.returncode == 0:
            opened += 1
            assert _without_actual_size(o_info[1]) == _without_actual_size(q_info.stdout), where
        q_map = qemu_img("map", "--output=json", p, check=False)
        o_map = _ours(img_cli.main, ["map", "--output=json", p], capsys)
        assert o_map[0] == q_map.returncode, f"{where}: map: {o_map[2]} / {q_map.stderr}"
        if q_map.returncode == 0:
            assert json.loads(o_map[1]) == json.loads(q_map.stdout), where
        q_check = qemu_img("check", "--output=json", p, check=False)
        o_check = _ours(img_cli.main, ["check", "--output=json", p], capsys)
        assert o_check[0] == q_check.returncode, f"{where}: check: {o_check[2]} / " \
                                                 f"{q_check.stderr}"
        if q_check.returncode in (0, 2, 3):
            assert json.loads(o_check[1]) == json.loads(q_check.stdout), f"{where}: check"
        q_raw, o_raw = tmp_path / "q.raw", tmp_path / "o.raw"
        for f in (q_raw, o_raw):
            if f.exists():
                f.unlink()
        q_conv = qemu_img("convert", "-O", "raw", p, q_raw, check=False)
        o_conv = _ours(copy_cli.main, ["-O", "raw", p, o_raw], capsys)
        assert o_conv[0] == q_conv.returncode, f"{where}: convert: {o_conv[2]} / " \
                                               f"{q_conv.stderr}"
        if q_conv.returncode == 0:
            assert o_raw.read_bytes() == q_raw.read_bytes(), f"{where}: converted data"
        # check -r all: where qemu-img makes its copy clean, ours makes ours clean
        q_fix, o_fix = tmp_path / "q-fix.qcow2", tmp_path / "o-fix.qcow2"
        q_fix.write_bytes(blob[:cut])
        o_fix.write_bytes(blob[:cut])
        qemu_img("check", "-r", "all", q_fix, check=False)
        o_rep = _ours(img_cli.main, ["check", "-r", "all", o_fix], capsys)
        if qemu_img("check", q_fix, check=False).returncode == 0:
            repaired += 1
            after = qemu_img("check", o_fix, check=False)
            assert after.returncode == 0, f"{where}: check -r all: {after.stdout}"
        for out in (o_info, o_map, o_check, o_conv, o_rep):
            assert "Traceback" not in out[2], where
    # (an image whose bitmap directory is cut away is refused: QEMU reads it as zeros)
    assert opened >= 2, f"image {name}: too few cuts opened; little was tested"
    assert repaired >= 1, f"image {name}: no cut that QEMU repairs; the repair leg tested nothing"


def test_reads_past_the_end_are_zeros_and_writers_refuse(tmp_path):
    """Through the API: the cut data reads as zeros; "r+" refuses an image whose
    tables are cut (it would build new metadata over the zeros), with a clear error."""
    p = tmp_path / "t.qcow2"
    create(p, "4M")
    qemu_io(p, "write -P 0x11 0 192k")
    with open(p, "rb") as f:
        l1_off = struct.unpack_from(">Q", f.read(48), 40)[0]
    size = os.path.getsize(p)
    os.truncate(p, size - 65536 - 100)         # the last data cluster and a bit more
    with qcow2py.open(p) as img:
        got = img.read(0, 192 << 10)
    assert got[:65536 * 2 - 100] == b"\x11" * (65536 * 2 - 100)
    assert got[65536 * 2 - 100:] == bytes(65536 + 100)
    # only data is cut: "r+" works as with QEMU (the clusters read as zeros, a write
    # in place extends the file over them) and leaves qemu-img check clean
    with qcow2py.open(p, "r+") as img:
        img.write(65536 * 2, b"m" * 100)
        img.write(3 * MiB, b"n" * 65536)
    with qcow2py.open(p) as img:
        assert img.read(65536 * 2, 101) == b"m" * 100 + b"\0"
        assert img.read(3 * MiB, 65536) == b"n" * 65536
    qemu_img("check", p)
    os.truncate(p, l1_off + 4)
    with qcow2py.open(p) as img:
        assert img.read(0, 65536) == bytes(65536)
    with pytest.raises(qcow2py.CorruptImageError, match="L1 table.*past the end"):
        qcow2py.open(p, "r+")


@pytest.mark.parametrize("cut", [4096, 65536, 131072])
def test_repair_never_places_the_new_refcounts_on_a_table_past_the_end(tmp_path, capsys, cut):
    """Cut before the L1 table (which then lies past the end of the file, counted by
    no reference): the rebuilt refcount structures used to land on it, so the
    refcount table and the L1 table became one cluster.  QEMU's rebuild puts its
    blocks there too and its overlap check stops it ("Check failed"); ours go
    after every structure the header names and count those the file now reaches."""
    p = tmp_path / "t.qcow2"
    create(p, 4 * MiB)
    qemu_io(p, "write -P 0x11 0 128k", "write -c -P 3 1M 64k")
    before = struct.unpack(">Q", p.read_bytes()[40:48])[0]          # L1 table offset
    assert before >= cut, "the cut must leave the L1 table past the end"
    os.truncate(p, cut)
    rc, _, err = _ours(img_cli.main, ["check", "-r", "all", p], capsys)
    assert rc == 0, err
    raw = p.read_bytes()
    l1, reftable = struct.unpack(">Q", raw[40:48])[0], struct.unpack(">Q", raw[48:56])[0]
    assert l1 == before and reftable >= before + 65536, (hex(l1), hex(reftable))
    assert qemu_img("check", p, check=False).returncode == 0
