"""Write speed of qcow2py against ``qemu-img bench -w``, in the same run.

Three workloads, each on a fresh image (``qemu-img create -f qcow2``, 64 KiB
clusters, ``QCOW2PY_BENCH_WRITE_SIZE`` bytes, default 1 GiB; made before every
timed run and not timed):

* **4k-scattered**: 16384 writes of 4 KiB at offsets ``k * S mod size``,
  ``S`` = 4 KiB × 40503.  ``S`` is an odd number of 4 KiB slots, so the
  offsets are distinct slots spread over the whole disk: nearly every write
  allocates a cluster and fills the rest of it (copy-on-write of zeros);
* **64k-scattered**: 8192 writes of 64 KiB at ``k * S mod size``,
  ``S`` = 64 KiB × 2531: every write allocates a whole cluster, half the
  clusters of the disk in scattered order;
* **1m-sequential**: 1 MiB writes from offset 0 to the end (1024 of them for
  1 GiB).

``qemu-img bench`` has no random mode: its requests start at an offset and
advance by a step (``-S``), wrapping at the end of the image.  So the
"random" workloads are that stepped sequence, and qcow2py writes exactly the
offsets qemu-img bench writes (a scattered permutation, not a random sample).

Two figures per writer, because qemu-img bench's own time leaves the final
flush out:

* **requests**: qcow2py, the ``write`` calls on an image already open "r+";
  qemu-img, the "Run completed in" time of ``qemu-img bench -w -c N -s SIZE
  -S STEP -d 1 --pattern=165 --flush-interval=N -f qcow2 IMG`` (queue depth 1,
  the default writeback cache).  That time stops when the last request
  completes: the flush that ``--flush-interval=N`` then issues, and the
  metadata written at close, run after it (traced with strace);
* **durable**: qcow2py, the writes plus ``flush()`` (L2 tables, refcounts and
  fsyncs: everything on disk); qemu-img, the wall time of the whole command
  (which ends with that flush and the close) minus the wall time of the same
  command with a single request on a fresh image (process start, open,
  close), the median of five, measured once per run.

Both write the byte 0xa5.  Ratios are median(qcow2py) / median(qemu-img) over
alternating rounds.  Before timing, one run of each workload is checked:
``qemu-img check`` of qcow2py's image is clean and ``qemu-img compare`` finds
it identical to qemu-img bench's.

Two ways to run it (neither is collected by the normal test run):

    python -m pytest benchmarks/bench_write.py --benchmark-only
    python -m benchmarks.bench_write [--rounds 5] [--workloads 4k-scattered] [--isolate]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

try:
    from ._runner import add_common_args, load_average, report, rerun_isolated
except ImportError:            # run as a plain file by pytest's rootdir-less import
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks._runner import add_common_args, load_average, report, rerun_isolated

KiB, MiB = 1 << 10, 1 << 20
TARGET_RATIO = 2.0
_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def bench_size() -> int:
    text = os.environ.get("QCOW2PY_BENCH_WRITE_SIZE", "1G").strip().upper()
    units = {"K": KiB, "M": MiB, "G": 1 << 30}
    size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    if size < 64 * MiB or size % MiB:
        raise ValueError("QCOW2PY_BENCH_WRITE_SIZE must be a multiple of 1 MiB, >= 64 MiB")
    return size


def workloads(size: int) -> Dict[str, Tuple[int, int, int]]:
    """name -> (request count, request size, step)."""
    return {
        "4k-scattered": (min(16384, size // (64 * KiB)), 4 * KiB, 4 * KiB * 40503),
        "64k-scattered": (size // (128 * KiB), 64 * KiB, 64 * KiB * 2531),
        "1m-sequential": (size // MiB, MiB, MiB),
    }


def fresh_image(path: str, size: int) -> None:
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)


def write_qcow2py(img, size: int, count: int, length: int, step: int,
                  times: Optional[list] = None) -> float:
    """The timed part: ``count`` writes, then a flush; seconds (both figures are
    appended to ``times`` as (requests, durable))."""
    buf = b"\xa5" * length
    write = img.write
    t0 = time.perf_counter()
    off = 0
    for _ in range(count):
        write(off, buf)
        off = (off + step) % size
    t1 = time.perf_counter()
    img.flush()
    t2 = time.perf_counter()
    if times is not None:
        times.append((t1 - t0, t2 - t0))
    return t2 - t0


def run_qcow2py(path: str, size: int, spec: Tuple[int, int, int]) -> Tuple[float, float]:
    """(requests, durable) seconds on a fresh image."""
    import qcow2py

    fresh_image(path, size)
    img = qcow2py.open(path, "r+")
    times: list = []
    try:
        write_qcow2py(img, size, *spec, times=times)
    finally:
        img.close()
    return times[0]


def run_qemu(path: str, size: int, spec: Tuple[int, int, int]) -> Tuple[float, float]:
    """(requests: "Run completed in", wall of the whole command) seconds, fresh image."""
    count, length, step = spec
    fresh_image(path, size)
    t0 = time.perf_counter()
    p = subprocess.run(["qemu-img", "bench", "-w", "-c", str(count), "-s", str(length),
                        "-S", str(step), "-d", "1", "--pattern=165",
                        f"--flush-interval={count}", "-f", "qcow2", path],
                       capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    m = _COMPLETED.search(p.stdout)
    if not m:
        raise RuntimeError(f"qemu-img bench printed no time: {p.stdout} {p.stderr}")
    return float(m.group(1)), wall


def qemu_overhead(folder: str, size: int) -> float:
    """Wall time of qemu-img bench around its requests: one 4 KiB request on a fresh
    image (process start, open, the request, flush, close); median of five."""
    path = os.path.join(folder, "overhead.qcow2")
    walls = [run_qemu(path, size, (1, 4 * KiB, 4 * KiB))[1] for _ in range(5)]
    os.unlink(path)
    return statistics.median(walls)


def verify(folder: str, size: int, name: str, spec) -> None:
    """qcow2py's result is clean and holds what qemu-img bench's holds."""
    ours, theirs = os.path.join(folder, "v-ours.qcow2"), os.path.join(folder, "v-qemu.qcow2")
    run_qcow2py(ours, size, spec)
    run_qemu(theirs, size, spec)
    subprocess.run(["qemu-img", "check", "-q", ours], check=True)
    c = subprocess.run(["qemu-img", "compare", "-q", ours, theirs])
    if c.returncode:
        raise AssertionError(f"{name}: qcow2py's image differs from qemu-img bench's")
    os.unlink(ours)
    os.unlink(theirs)


def _have_qemu() -> bool:
    return bool(shutil.which("qemu-img"))


# ------------------------------------------------------------------ pytest-benchmark
try:
    import pytest
except ImportError:  # pragma: no cover - main() does not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def bench_dir():
        if not _have_qemu():
            pytest.skip("qemu-img not installed")
        d = tempfile.mkdtemp(prefix="qcow2py-bench-write-")
        yield d
        shutil.rmtree(d, ignore_errors=True)

    @pytest.mark.parametrize("name", list(workloads(64 * MiB)))
    def test_write(benchmark, bench_dir, name):
        """qcow2py writes + flush, alternating round by round with ``qemu-img bench -w``."""
        import qcow2py

        size = bench_size()
        spec = workloads(size)[name]
        verify(bench_dir, size, name, spec)
        path = os.path.join(bench_dir, "ours.qcow2")
        qemu_path = os.path.join(bench_dir, "qemu.qcow2")
        overhead = qemu_overhead(bench_dir, size)
        qemu_times: List[Tuple[float, float]] = []
        ours_times: List[Tuple[float, float]] = []

        def setup():                    # untimed: qemu-img's round, then a fresh image
            qemu_times.append(run_qemu(qemu_path, size, spec))
            fresh_image(path, size)
            return (qcow2py.open(path, "r+"), size, *spec), {"times": ours_times}

        def teardown(img, *args, **kwargs):
            img.close()

        rounds = int(os.environ.get("QCOW2PY_BENCH_ROUNDS", "5"))
        benchmark.pedantic(write_qcow2py, setup=setup, teardown=teardown, rounds=rounds,
                           warmup_rounds=0, iterations=1)
        ours = benchmark.stats.stats.median                     # durable
        ours_req = statistics.median(t[0] for t in ours_times)
        qemu_req = statistics.median(t[0] for t in qemu_times)
        qemu = statistics.median(t[1] for t in qemu_times) - overhead
        benchmark.extra_info.update({
            "workload": name, "size": size, "requests": spec[0], "request_bytes": spec[1],
            "step": spec[2], "qemu_img_bench_requests_s": round(qemu_req, 4),
            "qcow2py_requests_s": round(ours_req, 4),
            "ratio_requests": round(ours_req / qemu_req, 3),
            "qemu_img_durable_s": round(qemu, 4), "qemu_img_overhead_s": round(overhead, 4),
            "ratio_durable": round(ours / qemu, 3)})
        print(f"\n{name}: requests qcow2py {ours_req:.3f}s / qemu-img {qemu_req:.3f}s = "
              f"{ours_req / qemu_req:.2f}; durable qcow2py {ours:.3f}s / qemu-img "
              f"{qemu:.3f}s = {ours / qemu:.2f}")
        if os.environ.get("QCOW2PY_BENCH_ASSERT"):
            assert ours / qemu <= TARGET_RATIO


# ------------------------------------------------------------------ table
def measure(names: List[str], rounds: int, log=print) -> List[dict]:
    size = bench_size()
    specs = workloads(size)
    folder = tempfile.mkdtemp(prefix="qcow2py-bench-write-")
    rows = []
    try:
        overhead = qemu_overhead(folder, size)
        for name in names:
            spec = specs[name]
            verify(folder, size, name, spec)
            ours: List[Tuple[float, float]] = []
            qemu: List[Tuple[float, float]] = []
            for _ in range(rounds):                 # alternate the writers
                qemu.append(run_qemu(os.path.join(folder, "qemu.qcow2"), size, spec))
                ours.append(run_qcow2py(os.path.join(folder, "ours.qcow2"), size, spec))
            row = {"workload": name, "requests": spec[0], "request_bytes": spec[1],
                   "qemu_requests": statistics.median(t[0] for t in qemu),
                   "qcow2py_requests": statistics.median(t[0] for t in ours),
                   "qemu_durable": statistics.median(t[1] for t in qemu) - overhead,
                   "qcow2py_durable": statistics.median(t[1] for t in ours),
                   "qemu_overhead": overhead, "qemu_runs": qemu, "qcow2py_runs": ours}
            row["ratio_requests"] = row["qcow2py_requests"] / row["qemu_requests"]
            row["ratio_durable"] = row["qcow2py_durable"] / row["qemu_durable"]
            rows.append(row)
            log(f"  {name}: done", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def format_table(rows: List[dict]) -> str:
    head = ["workload", "requests", "qemu-img requests s", "qcow2py requests s", "ratio",
            "qemu-img durable s", "qcow2py durable s", "ratio", "qcow2py µs/request"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["workload"], f"{r['requests']} × {r['request_bytes'] // KiB} KiB",
                 f"{r['qemu_requests']:.3f}", f"{r['qcow2py_requests']:.3f}",
                 f"{r['ratio_requests']:.2f}", f"{r['qemu_durable']:.3f}",
                 f"{r['qcow2py_durable']:.3f}", f"{r['ratio_durable']:.2f}",
                 f"{r['qcow2py_requests'] / r['requests'] * 1e6:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    names_all = list(workloads(64 * MiB))
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_write", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workloads", default=",".join(names_all),
                    help="comma-separated subset of " + ",".join(names_all))
    add_common_args(ap)
    args = ap.parse_args(argv)

    if args.isolate:
        code = rerun_isolated("benchmarks.bench_write", argv)
        if code is not None:
            return code

    if not _have_qemu():
        print("qemu-img not installed", file=sys.stderr)
        return 2
    names = [n for n in args.workloads.split(",") if n]
    unknown = set(names) - set(names_all)
    if unknown:
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    load_before = load_average()
    rows = measure(names, args.rounds, log=lambda *a, **k: print(*a, **k))
    size = bench_size()
    report(f"qcow2py writes (+ flush) vs qemu-img bench -w, median of {args.rounds} "
           f"alternating rounds, fresh {size // MiB} MiB qcow2 images (64 KiB clusters), "
           f"qemu-img overhead subtracted {rows[0]['qemu_overhead']:.3f} s", load_before,
           format_table(rows), rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
