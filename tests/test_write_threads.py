"""Four threads writing, zeroing, discarding and reading one "r+" image at once.

Two ways to make the expected content well defined while the threads race:

* **owned stripes** -- the first half of the disk is cut into stripes that do
  not line up with clusters (so neighbouring threads share clusters, and
  copy-on-write, allocation and zero-cluster decisions race), the second half
  into whole-cluster blocks (where discard and unmap act).  Each thread
  changes only its own stripes and blocks, checks every read of its own
  ranges byte for byte, and reads the other threads' stripes too: those must
  show one whole write (a stripe is always written whole, with one byte
  value), never a mix of two;
* **overlapping ranges** -- every thread works anywhere, but holds test-side
  locks on the 256 KiB buckets its request touches while it issues the
  request and updates the model, so requests to one bucket are ordered and
  requests to different buckets run in parallel.

At the end: flush, close, ``qemu-img check`` clean, and the guest content
(qemu-img convert and qcow2py) equals the model.
"""

from __future__ import annotations

import random
import sys
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List

import pytest

import qcow2py
from qemu import create as qemu_create, need, qemu_img, qemu_io

KiB = 1 << 10
MiB = 1 << 20
THREADS = 4

CONFIGS = {
    "c64k": dict(size=16 * MiB),
    "c4k-refcount64": dict(size=16 * MiB, cluster_size=4096, refcount_bits=64),
    "c512": dict(size=4 * MiB, cluster_size=512),
    "extended-l2": dict(size=16 * MiB, extended_l2=True),
    "lazy-refcounts": dict(size=16 * MiB, lazy_refcounts=True),
    "v2": dict(size=16 * MiB, compat="0.10"),
    "backing": dict(size=16 * MiB, backing=True),
}


@pytest.fixture(autouse=True)
def busy_switching():
    """Switch threads often, so the requests interleave at many more points."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def make_image(tmp_path: Path, cfg: dict):
    cfg = dict(cfg)
    size = cfg.pop("size")
    initial = bytearray(size)
    if cfg.pop("backing", False):
        need("qemu-io")
        base = tmp_path / "base.qcow2"
        qemu_create(base, size)
        qemu_io(base, "write -P 0x5a 0 3M", "write -P 0x6b 6M 5M", "write -z 7M 64k")
        initial[0:3 * MiB] = b"\x5a" * (3 * MiB)
        initial[6 * MiB:11 * MiB] = b"\x6b" * (5 * MiB)
        initial[7 * MiB:7 * MiB + 64 * KiB] = bytes(64 * KiB)
        cfg.update(backing_file=base.name, backing_format="qcow2")
    img = qcow2py.create(str(tmp_path / "img.qcow2"), size, **cfg)
    return img, initial


def finish(img, tmp_path: Path, model: bytearray) -> None:
    img.flush()
    img.close()
    path = tmp_path / "img.qcow2"
    chk = qemu_img("check", path, check=False)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    out = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", path, out)
    got = out.read_bytes()
    if got != bytes(model):
        i = next(i for i in range(len(model)) if got[i] != model[i])
        pytest.fail(f"qemu-img convert differs from the model at byte {i}")
    with qcow2py.open(str(path)) as again:
        assert again.read(0, again.size) == bytes(model)


def run_threads(work) -> None:
    errors: List[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def body(t: int) -> None:
        try:
            barrier.wait()
            work(t)
        except BaseException as e:          # reported after join
            errors.append(e)

    threads = [threading.Thread(target=body, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread hangs (deadlock?)"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_owned_stripes(tmp_path, name):
    need("qemu-img")
    img, model = make_image(tmp_path, CONFIGS[name])
    cs = img.cluster_size
    size = img.size
    half = size // 2
    stripe = cs * 3 // 4 + 512 * 3 if cs >= 4096 else cs * 3 + 512   # never cluster aligned
    stripes = [(a, min(stripe, half - a)) for a in range(0, half, stripe)]
    block = 4 * cs
    blocks = [(a, block) for a in range(half, size - block + 1, block)]
    # every byte a stripe ever held, per stripe: what other threads may see there
    seen_values: Dict[int, set] = {i: set() for i in range(len(stripes))}
    initial = {i: bytes(model[a:a + n]) for i, (a, n) in enumerate(stripes)}
    v2_backing = img.header.version < 3 and img.backing is not None

    def work(t: int) -> None:
        rnd = random.Random(f"{name}-{t}")
        mine = [i for i in range(len(stripes)) if i % THREADS == t]
        my_blocks = [b for j, b in enumerate(blocks) if j % THREADS == t]
        others = [i for i in range(len(stripes)) if i % THREADS != t]
        for _ in range(150):
            r = rnd.random()
            if r < 0.35:                                  # a whole stripe, one value
                i = rnd.choice(mine)
                a, n = stripes[i]
                v = rnd.randrange(1, 256)
                seen_values[i].add(v)
                img.write(a, bytes([v]) * n)
                model[a:a + n] = bytes([v]) * n
            elif r < 0.45:                                # a stripe zeroed whole
                i = rnd.choice(mine)
                a, n = stripes[i]
                seen_values[i].add(0)
                img.write_zeroes(a, n, unmap=rnd.random() < 0.5)
                model[a:a + n] = bytes(n)
            elif r < 0.65:                                # bytes inside an own block
                a, n = rnd.choice(my_blocks)
                off = a + rnd.randrange(n)
                ln = rnd.randint(1, a + n - off)
                kind = rnd.random()
                if kind < 0.6:
                    data = bytes([rnd.randrange(256)]) * ln
                    img.write(off, data)
                    model[off:off + ln] = data
                elif kind < 0.8:
                    img.write_zeroes(off, ln, unmap=rnd.random() < 0.5)
                    model[off:off + ln] = bytes(ln)
                else:
                    img.discard(off, ln)
                    first, last = -(-off // cs), (off + ln) // cs
                    if last > first and not v2_backing:
                        model[first * cs:last * cs] = bytes((last - first) * cs)
            elif r < 0.8:                                 # read own ranges: exact
                a, n = rnd.choice([stripes[i] for i in mine] + my_blocks)
                off = a + rnd.randrange(n)
                ln = rnd.randint(1, a + n - off)
                got = img.read(off, ln)
                assert got == bytes(model[off:off + ln]), (t, off, ln)
            elif r < 0.97:                                # read another's stripe: whole
                i = rnd.choice(others)
                a, n = stripes[i]
                got = img.read(a, n)
                values = set(got)
                assert got == initial[i] or (len(values) == 1 and values <= seen_values[i]), \
                    (t, i, a, sorted(values)[:5])
            else:
                img.flush()

    run_threads(work)
    finish(img, tmp_path, model)


@pytest.mark.parametrize("name", ["c64k", "c4k-refcount64", "extended-l2", "backing"])
def test_overlapping_ranges_ordered_by_bucket_locks(tmp_path, name):
    need("qemu-img")
    img, model = make_image(tmp_path, CONFIGS[name])
    cs = img.cluster_size
    size = img.size
    bucket = 256 * KiB
    locks = [threading.Lock() for _ in range(-(-size // bucket))]
    v2_backing = img.header.version < 3 and img.backing is not None

    def work(t: int) -> None:
        rnd = random.Random(f"overlap-{name}-{t}")
        for _ in range(150):
            off = rnd.randrange(size)
            ln = rnd.randint(1, min(size - off, rnd.choice((4 * KiB, 100 * KiB, 600 * KiB))))
            kind = rnd.choices("wzudr", weights=(50, 15, 10, 10, 15))[0]
            with ExitStack() as stack:
                for b in range(off // bucket, (off + ln - 1) // bucket + 1):
                    stack.enter_context(locks[b])
                if kind == "w":
                    data = bytes([rnd.randrange(256)]) * ln
                    img.write(off, data)
                    model[off:off + ln] = data
                elif kind in "zu":
                    img.write_zeroes(off, ln, unmap=kind == "u")
                    model[off:off + ln] = bytes(ln)
                elif kind == "d":
                    img.discard(off, ln)
                    first, last = -(-off // cs), (off + ln) // cs
                    if last > first and not v2_backing:
                        model[first * cs:last * cs] = bytes((last - first) * cs)
                else:
                    assert img.read(off, ln) == bytes(model[off:off + ln]), (t, off, ln)

    run_threads(work)
    finish(img, tmp_path, model)
