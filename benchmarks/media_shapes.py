"""The fragmented images of the media benchmark: their recipes, built with
``qemu-img``/``qemu-io``, cached between runs.

Images (``QCOW2PY_BENCH_DIR``, default ``benchmarks/.cache``, folder
``media-SIZE``; 64 KiB clusters):

* **shuffled** — 80% of the clusters written by one ``qemu-io`` in shuffled
  order: nearly every cluster out of place;
* **longlived** — 60% written front to back, then rounds of discarding random
  extents and writing new ones, which land in the freed holes;
* **compressed** — 80% of the clusters written compressed (``qemu-io write
  -c``), one at a time in shuffled order, from the same patterns: QEMU packs
  each stream at the next free byte, so the file is in write order, not guest
  order (the random patterns do not compress and are stored plain, as
  ``qemu-img convert -c`` would store them);
* **chain** — three qcow2 layers (50%, 25%, 12% of the clusters, each shuffled).

Every shape comes from one random stream (:data:`SEED`) in a fixed order, so a
shape is the same image whether it is built alone or with the others.  A
built shape carries a stamp (``.done-SHAPE``: recipe, size, seed); a shape
whose stamp is missing or of an older :data:`RECIPE` is built again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

from tests.images import patterns as write_patterns, size_label

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = 3                   # 3: compressed written cluster by cluster in shuffled order
SEED = 20240611
CLUSTER = 64 << 10
SHAPES = ("shuffled", "longlived", "compressed", "chain")


def log(msg: str) -> None:
    print(f"[media] {msg}", file=sys.stderr, flush=True)


def run_checked(args: List[str], **kw) -> subprocess.CompletedProcess:
    """Run a tool, its output captured; raise if it fails."""
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def _qemu_io(img: str, lines: List[str]) -> None:
    p = subprocess.run(["qemu-io", "-f", "qcow2", img], input="\n".join(lines) + "\n",
                       capture_output=True, text=True, check=True)
    noise = p.stdout.replace("qemu-io>", "").strip()
    if noise or p.stderr.strip():
        raise RuntimeError(f"qemu-io on {img}: {(noise + p.stderr)[:2000]}")


def cache_dir(size: int) -> str:
    base = os.environ.get("QCOW2PY_BENCH_DIR") or os.path.join(HERE, ".cache")
    return os.path.join(base, f"media-{size_label(size)}")


def _create(path: str, size: int, backing: Optional[str] = None) -> None:
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    run_checked(args + [path, str(size)])


def _shuffled_writes(rng: random.Random, n: int, fill: float, patterns: List[str]) -> List[str]:
    return [f"write -q -s {patterns[rng.randrange(len(patterns))]} {c * CLUSTER} 64k"
            for c in rng.sample(range(n), int(n * fill))]


def _longlived_script(rng: random.Random, n: int, rounds: int = 8) -> List[str]:
    """An install written front to back, then years of deleting and rewriting files.

    Each round discards random extents (deleted files; a guest that discards
    frees their host clusters) and writes as much again: half of it rewrites
    ranges deleted earlier, the rest lands anywhere.  Mostly small files (1-4
    clusters), a few big ones.  A write to an unallocated range takes the
    lowest free host clusters that fit, i.e. the holes the deletes left.
    """
    lines = []
    first = int(n * 0.6)
    for c in range(0, first, 16):                       # 1 MiB writes
        k = min(16, first - c)
        lines.append(f"write -q -P {rng.randrange(1, 256)} {c * CLUSTER} {k * CLUSTER}")

    def extent() -> int:
        return rng.randint(1, 4) if rng.random() < 0.8 else rng.randint(5, 32)

    deleted: List[int] = []
    for _ in range(rounds):
        budget = n // 16
        while budget > 0:                               # delete files
            k = min(extent(), budget)
            c = rng.randrange(0, n - k)
            lines.append(f"discard -q {c * CLUSTER} {k * CLUSTER}")
            deleted.append(c)
            budget -= k
        budget = n // 16
        while budget > 0:                               # write files
            k = min(extent(), budget)
            c = rng.choice(deleted) if deleted and rng.random() < 0.5 else rng.randrange(0, n)
            c = min(c, n - k)
            lines.append(f"write -q -P {rng.randrange(1, 256)} {c * CLUSTER} {k * CLUSTER}")
            budget -= k
    return lines


#: the files of each shape, top of the chain last
FILES = {"shuffled": ("shuffled.qcow2",), "longlived": ("longlived.qcow2",),
         "compressed": ("compressed.qcow2",),
         "chain": ("chain-base.qcow2", "chain-mid.qcow2", "chain-top.qcow2")}
CHAIN_FILL = (("chain-base", 0.50), ("chain-mid", 0.25), ("chain-top", 0.12))


def _scripts(size: int, folder: str):
    """The pattern files (written to ``folder``) and the qemu-io script of every file.

    All scripts come from one random stream in a fixed order, so every shape
    is the same image whether it is built alone or with the others (and
    shuffled, longlived and chain are those of recipe 2).
    """
    rng = random.Random(SEED)
    patterns = write_patterns(folder, rng)
    n = size // CLUSTER
    scripts = {"shuffled": _shuffled_writes(rng, n, 0.80, patterns),
               "longlived": _longlived_script(rng, n)}
    for name, fill in CHAIN_FILL:
        scripts[name] = _shuffled_writes(rng, n, fill, patterns)
    # compressed clusters written one at a time in shuffled guest order: QEMU packs
    # each stream at the next free byte, so the file is in write order, not guest order
    scripts["compressed"] = [line.replace("write -q", "write -c -q")
                             for line in _shuffled_writes(rng, n, 0.80, patterns)]
    return patterns, scripts


def _stamp(size: int, shape: str) -> Dict:
    return {"recipe": RECIPE, "size": size, "seed": SEED, "shape": shape}


def _stamp_path(size: int, shape: str) -> str:
    return os.path.join(cache_dir(size), f".done-{shape}")


def image_path(size: int, shape: str) -> str:
    """The top file of a shape's chain."""
    return os.path.join(cache_dir(size), FILES[shape][-1])


def shape_bytes(size: int, shape: str) -> int:
    """Bytes the files of a built shape take on disk (0 if not built)."""
    total = 0
    for name in FILES[shape]:
        try:
            total += os.stat(os.path.join(cache_dir(size), name)).st_blocks * 512
        except OSError:
            pass
    return total


def delete_shape(size: int, shape: str) -> None:
    for name in FILES[shape] + (os.path.basename(_stamp_path(size, shape)),):
        try:
            os.unlink(os.path.join(cache_dir(size), name))
        except FileNotFoundError:
            pass


def build_shape(size: int, shape: str) -> str:
    """Top image of a shape, built in the cache if missing or of an older recipe."""
    folder = cache_dir(size)
    top = image_path(size, shape)
    try:
        with open(_stamp_path(size, shape)) as f:
            if json.load(f) == _stamp(size, shape) and \
                    all(os.path.exists(os.path.join(folder, n)) for n in FILES[shape]):
                return top
    except (OSError, ValueError):
        pass
    for tool in ("qemu-img", "qemu-io"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} is needed (apt-get install qemu-utils)")
    os.makedirs(folder, exist_ok=True)
    try:
        os.unlink(os.path.join(folder, ".done"))       # recipe 2 kept one stamp for all
    except FileNotFoundError:
        pass
    delete_shape(size, shape)
    log(f"building {shape} ({size_label(size)}) in {folder} ...")
    tmp = os.path.join(folder, f".tmp-{shape}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t = time.monotonic()
    try:
        patterns, scripts = _scripts(size, tmp)
        if shape == "chain":
            below = None
            for name, _ in CHAIN_FILL:
                p = os.path.join(tmp, name + ".qcow2")
                _create(p, size, backing=below)
                _qemu_io(p, scripts[name])
                below = name + ".qcow2"
        else:
            p = os.path.join(tmp, FILES[shape][0])
            _create(p, size)
            _qemu_io(p, scripts[shape])
        for name in FILES[shape]:
            run_checked(["qemu-img", "check", "-q", os.path.join(tmp, name)])
        for name in FILES[shape]:
            os.rename(os.path.join(tmp, name), os.path.join(folder, name))
        with open(_stamp_path(size, shape), "w") as f:
            json.dump(_stamp(size, shape), f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{shape} built in {time.monotonic() - t:.1f}s, {shape_bytes(size, shape) / 1e9:.2f} GB")
    return top


def chain_files(path: str) -> List[str]:
    """Real paths of the files of the chain, base first (the order they were made)."""
    import qcow2py
    with qcow2py.open(path) as img:
        files = []
        for layer in img.chain():
            files.append(os.path.realpath(layer.storage.name))
            data = getattr(layer, "data_file_path", None)
            if data:
                files.append(os.path.realpath(data))
    return files[::-1]
