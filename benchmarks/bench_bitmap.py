"""Bitmap scans: qcow2py's C against bitarray's own functions, in the same run.

The bitmap has 16 M bits (2 MiB: a 1 TiB disk at 64 KiB granularity, or
8 GiB at 512 B), in two shapes:

* **1% dirty**: 1% of the bits set, at random;
* **50% random**: every bit set with probability 1/2 (the worst case for
  run extraction: ~4 M runs).

For each shape and round, alternately:

* **runs** (the scan behind ``Bitmap.dirty_extents``): qcow2py
  ``native.bitmap_runs`` (C: merged runs of set bits into two int64 numpy
  arrays) against ``bitarray.util.intervals`` keeping the runs of ones (the
  closest thing bitarray has); the numpy twin (``bitmap_runs_pure``) is timed
  too;
* **count**: ``native.bitmap_count`` against ``bitarray.count()``;
* **or**: ``native.bitmap_op(a, b, "or", out=a)`` against ``a |= b``.

Before timing, the C runs are checked against bitarray's intervals.  Targets
(C runs): <= 2 ms at 1%, <= 60 ms at 50%.

    python -m pytest benchmarks/bench_bitmap.py --benchmark-only
    python -m benchmarks.bench_bitmap [--rounds 30] [--json FILE]

Neither is collected by the normal test run.  ``QCOW2PY_BENCH_ASSERT=1``
makes the pytest run fail when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import numpy as np
from bitarray import bitarray
from bitarray.util import intervals

try:
    from qcow2py import native
    from qcow2py.native import backend_pure
except ImportError:            # run as a plain file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from qcow2py import native
    from qcow2py.native import backend_pure

NBITS = 1 << 24
SHAPES = {"1% dirty": 0.01, "50% random": 0.5}
#: milliseconds the C runs scan may take (median)
TARGETS_MS = {"1% dirty": 2.0, "50% random": 60.0}


def make_bitmap(density: float, seed: int = 1) -> bitarray:
    bools = np.random.default_rng(seed).random(NBITS) < density
    b = bitarray(endian="little")
    b.frombytes(np.packbits(bools, bitorder="little").tobytes())
    return b


def bitarray_runs(b: bitarray) -> List[tuple]:
    return [(s, e) for v, s, e in intervals(b) if v]


def check(b: bitarray) -> None:
    starts, lens = native.bitmap_runs(b)
    want = bitarray_runs(b)
    got = list(zip(starts.tolist(), (starts + lens).tolist()))
    if got != want:
        raise AssertionError("native.bitmap_runs disagrees with bitarray.util.intervals")
    if native.bitmap_count(b) != b.count():
        raise AssertionError("native.bitmap_count disagrees with bitarray.count")


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cases(b: bitarray, other: bitarray) -> Dict[str, Dict[str, Callable[[], object]]]:
    scratch = bitarray(b)
    return {
        "runs": {"qcow2py C": lambda: native.bitmap_runs(b),
                 "numpy twin": lambda: backend_pure.bitmap_runs(b),
                 "bitarray": lambda: bitarray_runs(b)},
        "count": {"qcow2py C": lambda: native.bitmap_count(b),
                  "bitarray": lambda: b.count()},
        "or": {"qcow2py C": lambda: native.bitmap_op(scratch, other, "or", out=scratch),
               "bitarray": lambda: scratch.__ior__(other)},
    }


def measure(rounds: int, slow_rounds: int = 3) -> Dict[str, Dict[str, Dict[str, List[float]]]]:
    """{shape: {op: {who: [seconds]}}}, the contenders alternating round by round.

    The slow Python contenders (bitarray's intervals, the numpy twin) run
    ``slow_rounds`` times only."""
    out: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    for shape, density in SHAPES.items():
        b = make_bitmap(density, 1)
        other = make_bitmap(density, 2)
        check(b)
        ops = cases(b, other)
        res = out[shape] = {op: {who: [] for who in fns} for op, fns in ops.items()}
        for r in range(rounds):
            for op, fns in ops.items():
                for who, fn in fns.items():
                    slow = op == "runs" and who != "qcow2py C"
                    if slow and r >= slow_rounds:
                        continue
                    res[op][who].append(timed(fn))
    return out


def table(results) -> str:
    lines = [f"{'bitmap (16 M bits)':<20}{'op':<7}{'contender':<12}{'min ms':>9}{'median ms':>11}"
             f"{'vs C':>9}  target"]
    for shape, ops in results.items():
        for op, whos in ops.items():
            c = statistics.median(whos["qcow2py C"])
            for who, ts in whos.items():
                med = statistics.median(ts)
                target = ""
                if op == "runs" and who == "qcow2py C":
                    ok = med * 1e3 <= TARGETS_MS[shape]
                    target = f"<= {TARGETS_MS[shape]:g} ms {'ok' if ok else 'MISSED'}"
                ratio = "" if who == "qcow2py C" else f"{med / c:8.1f}x"
                lines.append(f"{shape:<20}{op:<7}{who:<12}{min(ts) * 1e3:9.2f}{med * 1e3:11.2f}"
                             f"{ratio:>9}  {target}")
    return "\n".join(lines)


# ------------------------------------------------------------------ pytest-benchmark
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module", params=list(SHAPES))
    def shape_bits(request):
        b = make_bitmap(SHAPES[request.param], 1)
        check(b)
        return request.param, b, make_bitmap(SHAPES[request.param], 2)

    @pytest.mark.parametrize("who", ["qcow2py C", "bitarray"])
    def test_runs(benchmark, shape_bits, who):
        shape, b, other = shape_bits
        fn = cases(b, other)["runs"][who]
        rounds = 30 if who == "qcow2py C" else 3
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        med_ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info.update({"shape": shape, "median_ms": med_ms})
        if who == "qcow2py C":
            benchmark.extra_info["target_ms"] = TARGETS_MS[shape]
            benchmark.extra_info["target_met"] = med_ms <= TARGETS_MS[shape]
            if os.environ.get("QCOW2PY_BENCH_ASSERT") == "1":
                assert med_ms <= TARGETS_MS[shape], f"{shape}: {med_ms:.2f} ms"

    @pytest.mark.parametrize("op", ["count", "or"])
    @pytest.mark.parametrize("who", ["qcow2py C", "bitarray"])
    def test_word_ops(benchmark, shape_bits, op, who):
        shape, b, other = shape_bits
        benchmark.pedantic(cases(b, other)[op][who], rounds=30, iterations=1, warmup_rounds=1)
        benchmark.extra_info["shape"] = shape


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_bitmap",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="rounds of the fast contenders")
    p.add_argument("--json", help="also write the raw times (seconds) to this file")
    args = p.parse_args(argv)
    print(f"native module: {'C' if native.HAVE_NATIVE else 'MISSING (pure twins)'}")
    results = measure(args.rounds)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    missed = [s for s in SHAPES
              if statistics.median(results[s]["runs"]["qcow2py C"]) * 1e3 > TARGETS_MS[s]]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
