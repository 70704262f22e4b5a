"""Copy benchmark: ``qcow2py-copy`` against ``qemu-img convert`` on the same image.

On the fragmented image of ``tests.images`` (80% of 64 KiB clusters written
in shuffled order), each round runs, alternating, qcow2py-copy in host order,
qcow2py-copy in guest order and qemu-img convert, to qcow2 and to raw, as whole
commands (process start-up included on both sides), with the page cache warm.
Reports medians and the ratio qcow2py / qemu-img.  The outputs are compared
with ``qemu-img compare`` once.

The package's byte code is compiled first (``compileall``), as ``pip install``
does for a wheel: under ``PYTHONDONTWRITEBYTECODE=1`` (set on some CI and
sandbox machines) an editable install would otherwise recompile every module
on each start, about 50 ms per command, which is start-up cost no user pays.

    python -m benchmarks.bench_copy [--rounds 3] [--images a_frag,c_zlib]
    python -m pytest benchmarks/bench_copy.py --benchmark-only
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from tests.images import ensure_images

RUNNERS = {
    "qcow2py host": lambda src, dst, fmt: [sys.executable, "-m", "qcow2py.copy", "-O", fmt,
                                           "--order", "host", src, dst],
    "qcow2py guest": lambda src, dst, fmt: [sys.executable, "-m", "qcow2py.copy", "-O", fmt,
                                            "--order", "guest", src, dst],
    "qemu-img convert": lambda src, dst, fmt: ["qemu-img", "convert", "-O", fmt, src, dst],
}


def _timed(cmd: List[str], dst: str) -> float:
    if os.path.exists(dst):
        os.unlink(dst)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def compile_package() -> None:
    """Write the package's ``.pyc`` files, as an installed wheel has them."""
    import compileall

    import qcow2py
    compileall.compile_dir(os.path.dirname(qcow2py.__file__), quiet=1)


def measure(images: Dict[str, str], rounds: int, log=print) -> List[dict]:
    compile_package()
    rows = []
    tmp = tempfile.mkdtemp(prefix="qcow2py-bench-copy-")
    try:
        for name, src in images.items():
            for fmt in ("qcow2", "raw"):
                times: Dict[str, List[float]] = {k: [] for k in RUNNERS}
                for r in range(rounds + 1):          # round 0 warms the cache, not counted
                    for label, make in RUNNERS.items():
                        dst = os.path.join(tmp, f"out-{label.replace(' ', '_')}.{fmt}")
                        t = _timed(make(src, dst, fmt), dst)
                        if r:
                            times[label].append(t)
                        elif label.startswith("qcow2py"):
                            subprocess.run(["qemu-img", "compare", src, dst], check=True,
                                           stdout=subprocess.DEVNULL)
                med = {k: statistics.median(v) for k, v in times.items()}
                row = {"image": name, "format": fmt, **{k: round(v, 3) for k, v in med.items()},
                       "host/qemu": round(med["qcow2py host"] / med["qemu-img convert"], 2),
                       "guest/qemu": round(med["qcow2py guest"] / med["qemu-img convert"], 2)}
                log(row)
                rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def format_table(rows: List[dict]) -> str:
    cols = ["image", "format", "qcow2py host", "qcow2py guest", "qemu-img convert",
            "host/qemu", "guest/qemu"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join(str(r[c]) for c in cols))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", default="a_frag", help="comma-separated: a_frag,c_zlib,d_zstd")
    args = p.parse_args(argv)
    paths = ensure_images(log=lambda m: print(m, file=sys.stderr))
    chosen = {n: paths[n] for n in args.images.split(",")}
    rows = measure(chosen, args.rounds, log=lambda r: print(r, file=sys.stderr))
    print(format_table(rows))
    return 0


def test_copy_benchmark(benchmark):
    """pytest-benchmark entry: one qcow2py-copy host-order run to qcow2 on a_frag."""
    src = ensure_images()["a_frag"]
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "out.qcow2")
        benchmark.pedantic(_timed, args=(RUNNERS["qcow2py host"](src, dst, "qcow2"), dst),
                           rounds=3, iterations=1)


if __name__ == "__main__":
    raise SystemExit(main())
