"""External data files: an L2 entry whose host offset is not its guest offset
(issue #11).  QEMU 7.2, the oracle here, answers a read of such a cluster with
EIO, and marks the image corrupt when it is opened read-write; the other
clusters of the same L2 table stay readable; ``qemu-img map`` and ``convert``
fail, ``qemu-img check`` finds nothing.  qcow2py does the same, and refuses a
write to the cluster too (QEMU 7.2 writes a COPIED cluster in place, over the
data of the guest cluster the entry points at)."""

import struct
import subprocess
import sys

import pytest

import qcow2py
from qcow2py.errors import CorruptImageError, Qcow2Error
from qemu import info_json, need, qemu_img, run

KiB = 1 << 10
CS = 64 * KiB


def _patch_l2(path, index: int, value: int, extended: bool) -> int:
    """Overwrite the L2 entry ``index`` of the first L2 table; return the old one."""
    with open(path, "r+b") as f:
        head = f.read(48)
        f.seek(struct.unpack(">Q", head[40:48])[0])
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        pos = l2 + index * (16 if extended else 8)
        f.seek(pos)
        old = struct.unpack(">Q", f.read(8))[0]
        f.seek(pos)
        f.write(struct.pack(">Q", value))
    return old


@pytest.fixture(params=[False, True], ids=["l2", "extended-l2"])
def misplaced(request, tmp_path):
    """An image whose guest cluster 1 maps to host cluster 0 of its data file."""
    need("qemu-io")
    extended = request.param
    img, raw = tmp_path / "t.qcow2", tmp_path / "d.raw"
    opts = f"data_file={raw}" + (",extended_l2=on" if extended else "")
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, img.name, "4M", cwd=tmp_path)
    run(["qemu-io", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 64k 64k", str(img)])
    old = _patch_l2(img, 1, (1 << 63) | 0, extended)
    assert old == (1 << 63) | CS
    return img, raw


def _qemu_io(img, *cmds, ro=False):
    args = ["qemu-io"] + (["-r"] if ro else [])
    for c in cmds:
        args += ["-c", c]
    p = run(args + [str(img)], check=False)
    return p.stdout + p.stderr


def _cli(prog, *args):
    code = f"import sys; from {prog} import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True)


def test_read_only_read_fails_and_leaves_the_image_as_it_is(misplaced, tmp_path):
    img, _ = misplaced
    out = _qemu_io(img, "read -P 0x11 0 64k", "read 64k 4k", ro=True)
    assert "read failed: Input/output error" in out and out.count("read 65536/65536") == 1
    assert info_json(img)["format-specific"]["data"]["corrupt"] is False
    with qcow2py.open(img) as r:
        assert r.read(0, CS) == b"\x11" * CS          # the rest of the table reads
        for off, n in ((CS, 4096), (CS - 512, 1024), (0, 4 * CS), (CS + 100, 1)):
            with pytest.raises(CorruptImageError, match="does not match guest"):
                r.read(off, n)
    assert info_json(img)["format-specific"]["data"]["corrupt"] is False


def test_read_write_read_fails_and_marks_corrupt(misplaced, tmp_path):
    img, _ = misplaced
    theirs = tmp_path / "theirs.qcow2"
    theirs.write_bytes(img.read_bytes())
    out = _qemu_io(theirs, "read 64k 4k")
    assert "read failed: Input/output error" in out
    assert info_json(theirs)["format-specific"]["data"]["corrupt"] is True
    with qcow2py.open(img, "r+") as w:
        assert w.read(0, 512) == b"\x11" * 512
        with pytest.raises(CorruptImageError, match="marking image as corrupt"):
            w.read(CS, 4096)
        with pytest.raises(CorruptImageError):
            w.write(2 * CS, b"z")                      # the image is corrupt now
    assert info_json(img)["format-specific"]["data"]["corrupt"] is True


@pytest.mark.parametrize("off,n", [(CS, CS), (CS + 512, 512), (0, 2 * CS), (CS // 2, CS)],
                         ids=["whole", "partial", "two-clusters", "straddling"])
def test_write_is_refused_and_never_lands_on_another_cluster(misplaced, off, n):
    img, raw = misplaced
    # bytes for guest cluster 0 are 0x33 (a legal write), those for cluster 1 are 0x44
    data = b"\x33" * max(0, min(n, CS - off)) + b"\x44" * (n - max(0, min(n, CS - off)))
    with qcow2py.open(img, "r+") as w:
        with pytest.raises(CorruptImageError, match="does not match guest"):
            w.write(off, data)
    assert b"\x44" not in raw.read_bytes()[:CS]       # nothing landed on host cluster 0
    assert info_json(img)["format-specific"]["data"]["corrupt"] is True


def test_map_convert_and_check_agree_with_qemu_img(misplaced, tmp_path):
    img, _ = misplaced
    for args in (["map", "--output=json"], ["check"], ["info"]):
        theirs = qemu_img(*args, img, check=False)
        ours = _cli("qcow2py.cli.img", *args, img)
        assert ours.returncode == theirs.returncode, (args, ours.stderr, theirs.stderr)
        assert "Traceback" not in ours.stderr
    theirs = qemu_img("convert", "-O", "raw", img, tmp_path / "q.raw", check=False)
    ours = _cli("qcow2py.cli.copy", "-O", "raw", img, tmp_path / "o.raw")
    assert theirs.returncode == 1 and ours.returncode == 1, ours.stderr
    assert "does not match guest" in ours.stderr and "Traceback" not in ours.stderr
    with qcow2py.open(img) as r, pytest.raises(Qcow2Error):
        list(r.block_status(0, r.size))
