"""Full-image read speed of qcow2py against ``qemu-img bench``, in the same run.

For each image (see ``tests/images.py``) and each round, alternately:

* **qcow2py read()**: ``qcow2py.open(img)``, then ``read(offset, 1 MiB)`` until
  the end (a new ``bytes`` per call); the timed figure is the open plus every
  read (and the close);
* **qcow2py read_into()**: the same with ``read_into(buf, offset)`` into one
  reused 1 MiB buffer;
* **qemu-img bench**: ``qemu-img bench -f qcow2 -c N -s 1M -d 1 IMG`` with
  N = size / 1 MiB (pure sequential read, queue depth 1, into memory); the
  figure is the "Run completed in" time qemu-img prints, which leaves out its
  process start and image open, so the comparison is strict.

The ratio is median(qcow2py) / median(qemu-img).  Before timing, one full
qcow2py read of every image is hashed and must equal the sha256 of
``qemu-img convert -O raw`` (cached next to the image).

Two ways to run it (neither is collected by the normal test run):

    python -m pytest benchmarks/bench_read.py --benchmark-only
    python -m benchmarks.bench_read [--rounds 5] [--pure] [--images a_frag,c_zlib]

The second prints a table; ``--pure`` adds the pure-Python mode
(``QCOW2PY_PURE=1``), measured in a child process in the same alternation.
``QCOW2PY_BENCH_SIZE`` (e.g. 256M) selects smaller images for a quick run;
``QCOW2PY_BENCH_ROUNDS`` sets the pytest rounds (default 5) and
``QCOW2PY_BENCH_ASSERT=1`` makes the pytest run fail when a target is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

try:
    from ._runner import add_common_args, load_average, report, rerun_isolated
    from tests.images import IMAGES, bench_size, ensure_images, reference_sha256, size_label
except ImportError:            # run as a plain file by pytest's rootdir-less import
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks._runner import add_common_args, load_average, report, rerun_isolated
    from tests.images import IMAGES, bench_size, ensure_images, reference_sha256, size_label

CHUNK = 1 << 20
#: ratio qcow2py / qemu-img bench that each image must not exceed
TARGETS: Dict[str, float] = {"a_frag": 2.0, "c_zlib": 1.0, "d_zstd": 1.0}


# ------------------------------------------------------------------ the two readers
def read_qcow2py(path: str, digest=None) -> float:
    """Open ``path`` and read it to the end in 1 MiB requests; wall seconds.

    With ``digest`` (a hashlib object) every chunk is also hashed; hashing is
    not part of the returned time.
    """
    import qcow2py

    hashing = 0.0
    t0 = time.perf_counter()
    with qcow2py.open(path) as img:
        size = img.size
        read = img.read
        pos = 0
        while pos < size:
            n = min(CHUNK, size - pos)
            data = read(pos, n)
            if digest is not None:
                h0 = time.perf_counter()
                digest.update(data)
                hashing += time.perf_counter() - h0
            pos += n
    return time.perf_counter() - t0 - hashing


def read_into_qcow2py(path: str) -> float:
    """As :func:`read_qcow2py` with ``read_into`` and one reused 1 MiB buffer (the
    loop the README recommends); wall seconds."""
    import qcow2py

    t0 = time.perf_counter()
    with qcow2py.open(path) as img:
        size = img.size
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        read_into = img.read_into
        pos = 0
        while pos < size:
            n = min(CHUNK, size - pos)
            read_into(view if n == CHUNK else view[:n], pos)
            pos += n
    return time.perf_counter() - t0


_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def qemu_img_bench(path: str, size: int) -> float:
    """``qemu-img bench`` pure sequential read of the whole image; seconds."""
    count = size // CHUNK
    t0 = time.perf_counter()
    p = subprocess.run(["qemu-img", "bench", "-f", "qcow2", "-c", str(count), "-s", "1M",
                        "-d", "1", path], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    m = _COMPLETED.search(p.stdout)
    return float(m.group(1)) if m else wall


def verify(path: str) -> str:
    """Full qcow2py read hashed and compared with ``qemu-img convert -O raw``."""
    h = hashlib.sha256()
    read_qcow2py(path, h)
    got, want = h.hexdigest(), reference_sha256(path)
    if got != want:
        raise AssertionError(f"{os.path.basename(path)}: qcow2py sha256 {got} != "
                             f"qemu-img {want}")
    return got


def _pure_child(path: str, check: bool) -> float:
    """Time one read in a fresh process with ``QCOW2PY_PURE=1``."""
    env = dict(os.environ, QCOW2PY_PURE="1")
    args = [sys.executable, "-m", "benchmarks.bench_read", "--child", path]
    if check:
        args.append("--check")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(args, env=env, capture_output=True, text=True, cwd=root)
    if p.returncode:
        raise RuntimeError(f"pure-mode child failed:\n{p.stderr}")
    return json.loads(p.stdout)["seconds"]


def _have_qemu() -> bool:
    return bool(shutil.which("qemu-img") and shutil.which("qemu-io"))


# ------------------------------------------------------------------ pytest-benchmark
try:
    import pytest
except ImportError:  # pragma: no cover - main() does not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def bench_images():
        if not _have_qemu():
            pytest.skip("qemu-img/qemu-io not installed")
        return ensure_images()

    @pytest.mark.parametrize("name", IMAGES)
    def test_read(benchmark, bench_images, name):
        """qcow2py full read, alternating round by round with ``qemu-img bench``."""
        from qcow2py import native

        path = bench_images[name]
        size = bench_size()
        verify(path)                                   # correctness, and warms the cache
        qemu_times: List[float] = []

        def setup():                                   # untimed, before every round
            qemu_times.append(qemu_img_bench(path, size))

        rounds = int(os.environ.get("QCOW2PY_BENCH_ROUNDS", "5"))
        benchmark.pedantic(read_qcow2py, args=(path,), setup=setup, rounds=rounds,
                           warmup_rounds=0, iterations=1)
        ours = benchmark.stats.stats.median
        qemu = statistics.median(qemu_times)
        ratio = ours / qemu
        benchmark.extra_info.update({
            "image": name, "size": size_label(size),
            "mode": "native" if native.HAVE_NATIVE else "pure",
            "qemu_img_bench_median_s": round(qemu, 4),
            "qemu_img_bench_runs_s": [round(t, 4) for t in qemu_times],
            "ratio": round(ratio, 3), "target_ratio": TARGETS[name],
            "target_met": ratio <= TARGETS[name]})
        print(f"\n{name}: qcow2py {ours:.3f}s, qemu-img bench {qemu:.3f}s, "
              f"ratio {ratio:.2f} (target <= {TARGETS[name]})")
        if os.environ.get("QCOW2PY_BENCH_ASSERT"):
            assert ratio <= TARGETS[name]


# ------------------------------------------------------------------ table
def measure(names: List[str], rounds: int, pure: bool, log=print) -> List[dict]:
    from qcow2py import native

    paths = ensure_images()
    size = bench_size()
    rows = []
    for name in names:
        path = paths[name]
        verify(path)
        if pure:
            _pure_child(path, check=True)
        q: List[float] = []
        ours: List[float] = []
        ours_into: List[float] = []
        ours_pure: List[float] = []
        for _ in range(rounds):                        # alternate the readers
            q.append(qemu_img_bench(path, size))
            ours.append(read_qcow2py(path))
            ours_into.append(read_into_qcow2py(path))
            if pure:
                ours_pure.append(_pure_child(path, check=False))
        row = {"image": name, "size": size_label(size), "rounds": rounds,
               "qemu_img_bench": statistics.median(q), "qcow2py": statistics.median(ours),
               "native": native.HAVE_NATIVE, "target": TARGETS[name]}
        row["ratio"] = row["qcow2py"] / row["qemu_img_bench"]
        row["qcow2py_read_into"] = statistics.median(ours_into)
        row["ratio_read_into"] = row["qcow2py_read_into"] / row["qemu_img_bench"]
        if pure:
            row["qcow2py_pure"] = statistics.median(ours_pure)
            row["ratio_pure"] = row["qcow2py_pure"] / row["qemu_img_bench"]
        rows.append(row)
        log(f"  {name}: done", file=sys.stderr)
    return rows


def format_table(rows: List[dict]) -> str:
    pure = any("qcow2py_pure" in r for r in rows)
    head = ["image", "qemu-img bench s", "read() s", "ratio", "read_into() s", "ratio"]
    if pure:
        head += ["pure read() s", "pure ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['image']} ({r['size']})", f"{r['qemu_img_bench']:.3f}",
                 f"{r['qcow2py']:.3f}", f"{r['ratio']:.2f}",
                 f"{r['qcow2py_read_into']:.3f}", f"{r['ratio_read_into']:.2f}"]
        if pure:
            cells += [f"{r['qcow2py_pure']:.3f}", f"{r['ratio_pure']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_read", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", default=",".join(IMAGES),
                    help="comma-separated subset of " + ",".join(IMAGES))
    ap.add_argument("--pure", action="store_true",
                    help="also time the pure-Python mode (QCOW2PY_PURE=1, child process)")
    add_common_args(ap)
    ap.add_argument("--child", metavar="IMG", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.isolate:
        code = rerun_isolated("benchmarks.bench_read", argv)
        if code is not None:
            return code

    if args.child:
        if args.check:
            verify(args.child)
        print(json.dumps({"seconds": read_qcow2py(args.child)}))
        return 0

    if not _have_qemu():
        print("qemu-img/qemu-io not installed", file=sys.stderr)
        return 2
    names = [n for n in args.images.split(",") if n]
    unknown = set(names) - set(IMAGES)
    if unknown:
        ap.error(f"unknown images: {', '.join(sorted(unknown))}")
    load_before = load_average()
    rows = measure(names, args.rounds, args.pure,
                   log=lambda *a, **k: print(*a, **k))
    from qcow2py import native
    report(f"qcow2py read vs qemu-img bench, median of {args.rounds} alternating rounds, "
           f"{size_label(bench_size())} images, native module: "
           f"{'yes' if native.HAVE_NATIVE else 'no (pure)'}", load_before, format_table(rows),
           rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
