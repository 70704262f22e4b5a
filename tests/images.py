"""Build (and cache) the benchmark images.

The images follow the recipe of the reference measurements: a virtual disk of
``QCOW2PY_BENCH_SIZE`` (default 1G) with 64 KiB clusters and refcount_bits=16,
80% of whose clusters are written by one ``qemu-io`` process in shuffled order
(seeded), plus two compressed copies made with ``qemu-img convert -c``:

* ``a_frag``  -- uncompressed, almost every cluster out of place on the host;
* ``c_zlib``  -- ``qemu-img convert -c -O qcow2 a_frag`` (deflate);
* ``d_zstd``  -- the same with ``-o compression_type=zstd``.

Each written cluster gets one of 64 pattern blocks (16 random, 32
base64-of-random, 16 text-like, so the compressed images compress like real
data) plus a 4 KiB ``write -P`` stamp whose position and byte depend on the
cluster: every cluster is distinct, so a mis-mapped cluster or a wrong offset
inside a cluster changes the image hash.

Images are cached in ``QCOW2PY_BENCH_DIR`` (default ``benchmarks/.cache``,
git-ignored) under a folder named after the size; a ``.done`` marker holding
the recipe version makes a rebuild happen only when the recipe changes.

Run ``python -m tests.images`` to build them ahead of time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

from tests.qemu import create, qemu_img, qemu_io

RECIPE = 1
SEED = 20240501
CLUSTER = 64 << 10
FILL = 0.80
IMAGES = ("a_frag", "c_zlib", "d_zstd")
#: the cache lives with the benchmarks (they build the big images)
CACHE_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks", ".cache")

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"1G"``, ``"256M"``, ``"1073741824"`` -> bytes."""
    t = text.strip().upper().rstrip("IB").rstrip("B")
    if t and t[-1] in _UNITS:
        return int(float(t[:-1]) * _UNITS[t[-1]])
    return int(t)


def bench_size() -> int:
    size = parse_size(os.environ.get("QCOW2PY_BENCH_SIZE", "1G"))
    if size < (1 << 20) or size % (1 << 20):
        raise ValueError("QCOW2PY_BENCH_SIZE must be a positive multiple of 1 MiB")
    return size


def size_label(size: int) -> str:
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def cache_dir(size: Optional[int] = None) -> str:
    base = os.environ.get("QCOW2PY_BENCH_DIR") or CACHE_ROOT
    return os.path.join(base, size_label(size or bench_size()))


def _run(args: List[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def patterns(folder: str, rng: random.Random) -> List[str]:
    """64 pattern files of one cluster each: random, base64 text, English-like text."""
    words = ("the of and to in is was for on that with as by at from disk image cluster "
             "table offset block guest host read write sector zero data file qcow2 map "
             "refcount header snapshot backing chain extent copy").split()
    paths = []
    for i in range(64):
        if i < 16:
            data = rng.randbytes(CLUSTER)
        elif i < 48:
            data = base64.b64encode(rng.randbytes(CLUSTER * 3 // 4 + 3))[:CLUSTER]
        else:
            out = bytearray()
            while len(out) < CLUSTER:
                out += " ".join(rng.choice(words) for _ in range(12)).encode() + b".\n"
            data = bytes(out[:CLUSTER])
        path = os.path.join(folder, f"pat{i:02d}.bin")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def _commands(size: int, patterns: List[str], rng: random.Random) -> str:
    """qemu-io commands filling FILL of the clusters in shuffled order."""
    n = size // CLUSTER
    clusters = rng.sample(range(n), int(n * FILL))       # shuffled, distinct
    lines = []
    for c in clusters:
        off = c * CLUSTER
        pat = patterns[rng.randrange(len(patterns))]
        stamp = off + ((c * 7) % (CLUSTER // 4096)) * 4096
        lines.append(f"write -q -s {pat} {off} 64k")
        lines.append(f"write -q -P {c % 251 + 1} {stamp} 4k")
    return "\n".join(lines) + "\n"


def _qemu_io_script(img: str, script: str) -> None:
    p = subprocess.run(["qemu-io", "-f", "qcow2", img], input=script, capture_output=True,
                       text=True, check=True)
    noise = p.stdout.replace("qemu-io>", "").strip()
    if noise or p.stderr.strip():
        raise RuntimeError(f"qemu-io reported: {(noise + p.stderr)[:2000]}")


def _check(img: str) -> None:
    _run(["qemu-img", "check", "-q", img])


def _build(folder: str, size: int, log) -> None:
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rng = random.Random(SEED)
    pats = patterns(tmp, rng)
    script = _commands(size, pats, rng)

    t = time.monotonic()
    a = os.path.join(tmp, "a_frag.qcow2")
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
          "cluster_size=65536,refcount_bits=16", a, str(size)])
    _qemu_io_script(a, script)
    _check(a)
    log(f"a_frag built in {time.monotonic() - t:.1f}s")

    # the two compressions are independent: run them side by side (2 cores)
    t = time.monotonic()
    c = os.path.join(tmp, "c_zlib.qcow2")
    d = os.path.join(tmp, "d_zstd.qcow2")
    procs = [subprocess.Popen(["qemu-img", "convert", "-c", "-O", "qcow2", "-o",
                               f"cluster_size=65536,refcount_bits=16,compression_type={ct}",
                               a, dst], stderr=subprocess.PIPE)
             for ct, dst in (("zlib", c), ("zstd", d))]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"qemu-img convert failed: {err.decode(errors='replace')}")
    _check(c)
    _check(d)
    log(f"c_zlib and d_zstd built in {time.monotonic() - t:.1f}s")

    for p in pats:
        os.unlink(p)
    with open(os.path.join(tmp, ".done"), "w") as f:
        json.dump({"recipe": RECIPE, "size": size, "seed": SEED}, f)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)


def ensure_images(size: Optional[int] = None, log=None) -> Dict[str, str]:
    """Paths of the benchmark images, built first if the cache lacks them."""
    size = size or bench_size()
    log = log or (lambda msg: print(f"[images] {msg}", file=sys.stderr, flush=True))
    folder = cache_dir(size)
    paths = {name: os.path.join(folder, f"{name}.qcow2") for name in IMAGES}
    marker = os.path.join(folder, ".done")
    try:
        with open(marker) as f:
            ok = json.load(f) == {"recipe": RECIPE, "size": size, "seed": SEED}
    except (OSError, ValueError):
        ok = False
    if not ok or not all(os.path.exists(p) for p in paths.values()):
        if not shutil.which("qemu-io") or not shutil.which("qemu-img"):
            raise RuntimeError("building the benchmark images needs qemu-img and qemu-io "
                               "(apt-get install qemu-utils)")
        log(f"building {size_label(size)} images in {folder} ...")
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        _build(folder, size, log)
    return paths


def reference_sha256(path: str) -> str:
    """sha256 of ``qemu-img convert -O raw`` of the image (cached next to it)."""
    memo = path + ".sha256"
    st = os.stat(path)
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    try:
        with open(memo) as f:
            saved_stamp, digest = f.read().split()
        if saved_stamp == stamp:
            return digest
    except (OSError, ValueError):
        pass
    raw = path + ".raw.tmp"
    try:
        _run(["qemu-img", "convert", "-O", "raw", path, raw])
        h = hashlib.sha256()
        with open(raw, "rb") as f:
            while True:
                block = f.read(1 << 22)
                if not block:
                    break
                h.update(block)
        digest = h.hexdigest()
    finally:
        if os.path.exists(raw):
            os.unlink(raw)
    with open(memo, "w") as f:
        f.write(f"{stamp} {digest}\n")
    return digest




# ---------------------------------------------------------------- small copy sources
# (tests: a few MiB each, every shape the copy paths treat differently)
def shuffled_writes(path, n_clusters, cs=65536, seed=1, fill=0.7, fmt="qcow2"):
    rnd = random.Random(seed)
    order = list(range(n_clusters))
    rnd.shuffle(order)
    k = int(n_clusters * fill)
    cmds = [f"write -P {c % 250 + 1} {c * cs} {cs}" for c in order[:k]]
    cmds += [f"write -z {c * cs} {cs}" for c in order[k:k + 8]]
    cmds += [f"write -P 0 {c * cs} {cs}" for c in order[k + 8:k + 16]]   # zero data
    qemu_io(path, *cmds, fmt=fmt)


def build(shape, d):
    """Source images of several shapes; returns the path of the top image."""
    top = d / "src.qcow2"
    if shape == "fragmented":
        create(top, "16M")
        shuffled_writes(top, 256)
    elif shape == "v2":
        create(top, "16M", "compat=0.10")
        shuffled_writes(top, 256)
    elif shape == "small-clusters":
        create(top, "4M", "cluster_size=512")
        shuffled_writes(top, 2048, cs=512, fill=0.3)
    elif shape == "2M-clusters":
        create(top, "16M", "cluster_size=2M")
        qemu_io(top, "write -P 3 100k 3M", "write -P 4 9M 1k")
    elif shape in ("zlib", "zstd"):
        plain = d / "plain.qcow2"
        create(plain, "16M")
        shuffled_writes(plain, 256)
        qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={shape}", plain, top)
    elif shape == "chain":
        base = d / "base.raw"
        create(base, "16M", fmt="raw")
        qemu_io(base, "write -P 9 0 6M", fmt="raw")
        mid = d / "mid.qcow2"
        create(mid, "16M", backing="base.raw", backing_fmt="raw", cwd=d)
        shuffled_writes(mid, 256, fill=0.3, seed=2)
        create(top, "24M", backing="mid.qcow2", cwd=d)           # longer than its backing
        qemu_io(top, "write -P 7 1M 300k", "write -z 5M 1M", "write -P 8 20M 64k")
    elif shape == "extended-l2":
        base = d / "base.qcow2"
        create(base, "16M")
        qemu_io(base, "write -P 1 0 16M")
        create(top, "16M", "extended_l2=on", backing="base.qcow2", cwd=d)
        qemu_io(top, "write -P 2 4k 6k", "write -z 70k 2k", "write -P 3 8M 130k")
    elif shape == "data-file":
        # an absolute name: QEMU 7.2 resolves a relative data file against its cwd
        create(top, "16M", f"data_file={d / 'src.data'}")
        shuffled_writes(top, 256, fill=0.4)
    elif shape == "raw":
        top = d / "src.raw"
        create(top, "16M", fmt="raw")
        shuffled_writes(top, 256, fill=0.4, fmt="raw")
    return top


SHAPES = ["fragmented", "v2", "small-clusters", "2M-clusters", "zlib", "zstd", "chain",
          "extended-l2", "data-file", "raw"]


if __name__ == "__main__":
    for name, p in ensure_images().items():
        print(f"{name}: {p} ({os.path.getsize(p) / 1e6:.0f} MB)")
