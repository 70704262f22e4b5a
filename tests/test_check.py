"""qcow2py's check agrees with ``qemu-img check`` (JSON and exit code)."""

import json
import random
import struct
import subprocess
import sys

import pytest

import qcow2py
from qcow2py.check import check_image
from qcow2py.format import refcount as rc
from qcow2py.format.header import Header
from qemu import create, qemu_img, qemu_io


def qemu_check(path):
    p = qemu_img("check", "--output=json", path, check=False)
    return json.loads(p.stdout), p.returncode


def ours(path):
    with qcow2py.open(path) as img:
        r = check_image(img)
    return r


def assert_same(path):
    want, code = qemu_check(path)
    r = ours(path)
    got = r.to_json_dict()
    assert got == want, (got, want, r.messages)
    assert r.exit_code == code
    # the CLI prints the same JSON text and exit code
    p = subprocess.run([sys.executable, "-m", "qcow2py", "check", "--output=json", str(path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.returncode == code and json.loads(p.stdout) == want
    return r


def fragmented(path, *opts, n=40, seed=1, compressed=False):
    create(path, "32M", *opts)
    rnd = random.Random(seed)
    clusters = list(range(256))
    rnd.shuffle(clusters)
    cmds = [f"write {'-c ' if compressed else ''}-P {c % 250 + 1} {c * 65536} 65536"
            for c in clusters[:n]]
    cmds += [f"write -z {c * 65536} 65536" for c in clusters[n:n + 5]]
    qemu_io(path, *cmds)


@pytest.mark.parametrize("opts", [
    (), ("compat=0.10",), ("cluster_size=512",), ("cluster_size=2M",), ("refcount_bits=1",),
    ("refcount_bits=64",), ("extended_l2=on",), ("lazy_refcounts=on",),
])
def test_clean_images(tmp_path, opts):
    path = tmp_path / "a.qcow2"
    fragmented(path, *opts)
    r = assert_same(path)
    assert r.exit_code == 0 and r.allocated_clusters > 0


def test_compressed_and_snapshots_and_bitmaps(tmp_path):
    path = tmp_path / "c.qcow2"
    fragmented(path, compressed=True)
    qemu_img("snapshot", "-c", "s1", path)
    qemu_io(path, "write -P 9 0 1M")
    qemu_img("bitmap", "--add", path, "b0")
    qemu_io(path, "write -P 7 2M 64k")
    r = assert_same(path)
    assert r.compressed_clusters > 0


def _poke_refcount(path, cluster, value):
    raw = bytearray(path.read_bytes())
    h = Header.parse(bytes(raw[:1 << 21]))
    table = rc.decode_table(raw[h.refcount_table_offset:h.refcount_table_offset + h.cluster_size])
    per = rc.entries_per_block(h.cluster_size, h.refcount_order)
    block_off = int(table[cluster // per])
    counts = rc.decode_block(raw[block_off:block_off + h.cluster_size], h.refcount_order)
    counts[cluster % per] = value
    raw[block_off:block_off + h.cluster_size] = rc.encode_block(counts, h.refcount_order)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("cluster,value,code", [(0, 2, 3), (5, 0, 2), (5, 2, 2), (200, 1, 3)])
def test_corruptions_and_leaks(tmp_path, cluster, value, code):
    path = tmp_path / "p.qcow2"
    create(path, "64M")
    qemu_io(path, "write -P 1 0 128k", "write -P 2 4M 64k")
    qemu_img("resize", path, "128M")
    if cluster == 200:   # a leak needs the cluster inside the file
        with open(path, "r+b") as f:
            f.truncate(201 * 65536)
    _poke_refcount(path, cluster, value)
    r = assert_same(path)
    assert r.exit_code == code


def test_dirty_lazy_refcount_image(tmp_path):
    path = tmp_path / "lz.qcow2"
    create(path, "16M", "lazy_refcounts=on")
    subprocess.run(["qemu-io", "-c", "write -P 3 0 128k", "-c", "abort", str(path)],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    r = assert_same(path)
    assert r.exit_code == 2 and r.corruptions >= 2
