"""A crash at any instant may leak clusters, never corrupt, never lose a flushed write.

The image's storage journals every write and fsync.  For random crash points
we rebuild the file as the disk could have left it (everything before the
last fsync, plus a random subset of the later writes), then ask
``qemu-img check`` (leaks allowed, corruptions not) and read it back: every
byte written before the last completed flush, and not touched since, must be
there.
"""

import json
import random

import numpy as np
import pytest

import qcow2py
from qemu import create, qemu_img
from recording import Recorder


def _run(path, ops_seed, n_ops, size, backing_content=None):
    wrap = Recorder(path)

    rnd = random.Random(ops_seed)
    model = bytearray(backing_content if backing_content is not None else bytes(size))
    flushes = []            # (journal length after the flush, guest content then)
    img = qcow2py.open(path, "r+", storage_wrapper=wrap, lock=False)
    rec = wrap.rec
    cs = img.cluster_size
    for i in range(n_ops):
        op = rnd.choice("wwwzd")
        off = rnd.randrange(0, size - 1)
        n = rnd.randrange(1, min(5 * cs, size - off) + 1)
        if op == "w":
            data = bytes([rnd.randrange(1, 256)]) * n
            img.write(off, data)
            model[off:off + n] = data
        elif op == "z":
            img.write_zeroes(off, n)
            model[off:off + n] = bytes(n)
        else:
            c0, c1 = -(-off // cs), (off + n) // cs
            if c1 > c0 and (img.header.version >= 3 or img.backing is None):
                img.discard(off, n)
                model[c0 * cs:c1 * cs] = bytes((c1 - c0) * cs)
        if rnd.random() < 0.15:
            img.flush()
            flushes.append((len(rec.journal), bytes(model)))
    img.close()                      # close flushes: the last durable state
    flushes.append((len(rec.journal), bytes(model)))
    return rec, flushes


@pytest.mark.parametrize("opts,size", [
    ((), 4 << 20),
    (("cluster_size=512", "refcount_bits=1"), 1 << 20),    # refcount blocks and table grow
    (("compat=0.10",), 4 << 20),
    (("cluster_size=4096", "refcount_bits=64"), 2 << 20),
    (("extended_l2=on", "cluster_size=16k"), 2 << 20),
    (("lazy_refcounts=on",), 2 << 20),
])
def test_crash_points(tmp_path, opts, size):
    path = tmp_path / "img.qcow2"
    create(path, size, *opts)
    rec, flushes = _run(path, 7, 120, size)
    rnd = random.Random(11)
    # every instant just before an fsync (the most unsynced writes), plus random ones
    before_sync = [p - 1 for p in rec.sync_points()]
    points = sorted(set(before_sync) | set(rnd.sample(range(len(rec.journal) + 1), 20)))
    crashed = tmp_path / "crash.qcow2"
    for upto in points:
        durable = max([p for p in rec.sync_points() if p <= upto], default=0)
        after = list(range(durable, upto))
        survivors = [i for i in after if rnd.random() < 0.5]
        crashed.write_bytes(rec.crash_image(upto, survivors))
        p = qemu_img("check", "--output=json", crashed, check=False)
        assert p.returncode in (0, 3), f"crash at {upto}: {p.stdout} {p.stderr}"
        res = json.loads(p.stdout)
        assert not res.get("corruptions"), (upto, res)
        # the newest flush completed before the crash is fully readable
        done = [m for j, m in flushes if j <= durable]
        if done:
            # writes after that flush may or may not have landed: compare only
            # the bytes the later (unflushed) operations did not touch
            model = done[-1]
            later = [m for j, m in flushes if j > durable]
            with qcow2py.open(crashed) as img:
                got = np.frombuffer(img.read(0, size), dtype=np.uint8)
            want = np.frombuffer(model, dtype=np.uint8)
            stable = np.ones(size, dtype=bool)
            for m in later:
                stable &= want == np.frombuffer(m, dtype=np.uint8)
            bad = np.flatnonzero((got != want) & stable)
            assert bad.size == 0, f"crash at {upto}: flushed byte {bad[0]} lost"


def test_crash_with_backing(tmp_path):
    base = tmp_path / "base.qcow2"
    create(base, "2M")
    with qcow2py.open(base, "r+") as b:
        b.write(0, b"\x5a" * (2 << 20))
    top = tmp_path / "top.qcow2"
    create(top, "2M", backing=base.name, cwd=tmp_path)
    rec, flushes = _run(top, 3, 80, 2 << 20, backing_content=b"\x5a" * (2 << 20))
    rnd = random.Random(5)
    crashed = tmp_path / "crash.qcow2"
    points = {p - 1 for p in rec.sync_points()} | set(rnd.sample(range(len(rec.journal) + 1), 20))
    for upto in sorted(points):
        durable = max([p for p in rec.sync_points() if p <= upto], default=0)
        survivors = [i for i in range(durable, upto) if rnd.random() < 0.5]
        crashed.write_bytes(rec.crash_image(upto, survivors))
        p = qemu_img("check", "--output=json", crashed, check=False)
        assert p.returncode in (0, 3), (upto, p.stdout, p.stderr)
