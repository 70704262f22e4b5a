"""CPU time of ``qcow2py commit|compare|rebase`` against ``qemu-img`` on the same images.

Builds (in a temporary folder) a base of SIZE with every cluster written and an
overlay with half of its clusters rewritten in shuffled order (64 KiB
clusters), then times, alternately, each tool on its own fresh copies:

* ``compare``: the overlay against a flattened copy of it (identical content);
* ``commit``:  the overlay into its base;
* ``rebase``:  the overlay onto "" (flatten in place).

Every result is checked with ``qemu-img compare`` against qemu-img's.

    python -m benchmarks.bench_lifecycle [--size 256M] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def sh(*args, cwd=None) -> None:
    subprocess.run(list(map(str, args)), check=True, cwd=cwd, stdout=subprocess.DEVNULL)


def build(d: Path, size: int) -> None:
    cs = 65536
    sh("qemu-img", "create", "-q", "-f", "qcow2", d / "base.qcow2", size)
    sh("qemu-io", "-c", f"write -P 1 0 {size}", d / "base.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
       d / "top.qcow2", cwd=d)
    clusters = list(range(size // cs))
    random.Random(1).shuffle(clusters)
    cmds = []
    for c in clusters[:len(clusters) // 2]:
        cmds += ["-c", f"write -P {c % 250 + 2} {c * cs} {cs}"]
    for i in range(0, len(cmds), 2000):
        sh("qemu-io", *cmds[i:i + 2000], d / "top.qcow2")
    sh("qemu-img", "convert", "-O", "qcow2", d / "top.qcow2", d / "flat.qcow2")


def timed(cmd, cwd) -> float:
    """CPU seconds (user + system) of the command: on a shared machine wall time
    mostly measures the other tenants."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=False, cwd=cwd, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="256M")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from qcow2py.cli import parse_qemu_size
    size = parse_qemu_size(a.size)
    me = [sys.executable, "-m", "qcow2py"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        build(src, size)
        print(f"{'operation':<10}{'qcow2py cpu s':>14}{'qemu-img cpu s':>15}{'ratio':>8}")
        for op, args in (("compare", ["compare", "top.qcow2", "flat.qcow2"]),
                         ("commit", ["commit", "top.qcow2"]),
                         ("rebase", ["rebase", "-b", "", "top.qcow2"])):
            times = {"qcow2py": [], "qemu-img": []}
            for r in range(a.rounds):
                for who, exe in (("qcow2py", me), ("qemu-img", ["qemu-img"])):
                    d = Path(tmp) / who
                    shutil.rmtree(d, ignore_errors=True)
                    shutil.copytree(src, d)
                    times[who].append(timed(exe + args, d))
                for name in ("base.qcow2", "top.qcow2"):
                    sh("qemu-img", "compare", Path(tmp) / "qcow2py" / name,
                       Path(tmp) / "qemu-img" / name)
            mine, theirs = (statistics.median(times[k]) for k in ("qcow2py", "qemu-img"))
            print(f"{op:<10}{mine:>14.3f}{theirs:>15.3f}{mine / theirs:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
