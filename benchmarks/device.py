"""Real-device mode of the media benchmark: the copies timed on a disk you have.

``python -m benchmarks.media --device PATH`` builds the media images in a
folder on PATH's file system (``PATH/qcow2py-media/media-SIZE``, kept for
later runs), then, round after round, alternating the copiers, times the real
commands with a cold cache:

* **qcow2py-copy guest** / **qcow2py-copy host**: ``qcow2py-copy -O qcow2 -T none
  -t none --order guest|host`` (source read and target written with O_DIRECT);
* **qemu-img**: ``qemu-img convert -O qcow2 -T none -t none`` (the same).

Before each command every file of the source chain is fsynced and dropped
from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``), and the
previous target is deleted, so what the command reads comes from the device.
The target is written next to the images (same device; ``--device-target DIR``
puts it elsewhere).  The first round only warms the programs (their own
files, not the images) and is not counted; each copy of the first counted
round is checked with ``qemu-img compare``.  Times are whole commands
(process start included), as a user would time them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

from tests.images import size_label

from .media_shapes import build_shape, chain_files, log

HERE = os.path.dirname(os.path.abspath(__file__))

#: label -> command without source and target
COPIERS = {
    "qcow2py-copy guest": [sys.executable, "-m", "qcow2py.copy", "-O", "qcow2", "-T", "none",
                           "-t", "none", "--order", "guest", "--stats=json"],
    "qcow2py-copy host": [sys.executable, "-m", "qcow2py.copy", "-O", "qcow2", "-T", "none",
                          "-t", "none", "--order", "host", "--stats=json"],
    "qemu-img": ["qemu-img", "convert", "-O", "qcow2", "-T", "none", "-t", "none"],
}


def device_folder(path: str) -> str:
    """The folder that holds the images on PATH's device: PATH/qcow2py-media when PATH is
    a folder, else beside the file PATH names."""
    base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(base):
        raise SystemExit(f"--device {path}: no such folder")
    return os.path.join(base, "qcow2py-media")


def drop_cache(files: List[str]) -> None:
    """Write back and evict each file's pages (the next read comes from the device)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def filesystem(path: str) -> str:
    """``df -T`` of the folder: device and file system type, for the report."""
    p = subprocess.run(["df", "-T", path], capture_output=True, text=True)
    lines = p.stdout.split("\n")
    if p.returncode or len(lines) < 2:
        return "?"
    cols = lines[1].split()
    return f"{cols[0]} ({cols[1]})"


def time_copies(src: str, files: List[str], target_dir: str, rounds: int,
                compare: bool = True) -> Dict[str, Dict]:
    """Per copier: median, min and max seconds over ``rounds`` cold-cache runs, and the
    copy statistics qcow2py-copy printed."""
    dst = os.path.join(target_dir, "device-copy.qcow2")
    times: Dict[str, List[float]] = {k: [] for k in COPIERS}
    engine: Dict[str, List[float]] = {k: [] for k in COPIERS}    # the copy, process start excluded
    stats: Dict[str, Dict] = {}
    for r in range(rounds + 1):
        for label, cmd in COPIERS.items():
            if os.path.exists(dst):
                os.unlink(dst)
            drop_cache(files)
            t = time.perf_counter()
            p = subprocess.run(cmd + [src, dst], capture_output=True, text=True,
                               cwd=os.path.dirname(HERE))
            elapsed = time.perf_counter() - t
            if p.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip()}")
            if label.startswith("qcow2py") and p.stdout.strip():
                stats[label] = json.loads(p.stdout.strip().splitlines()[-1])
            if r == 0:
                continue                   # warm-up of the programs, not counted
            times[label].append(elapsed)
            if label in stats:
                engine[label].append(stats[label]["seconds"])
            if r == 1 and compare:
                c = subprocess.run(["qemu-img", "compare", "-q", src, dst])
                if c.returncode:
                    raise RuntimeError(f"{label}: the copy differs from {src}")
    if os.path.exists(dst):
        os.unlink(dst)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v),
                **({"stats": stats[k], "engine_median": statistics.median(engine[k])}
                   if engine[k] else {})} for k, v in times.items()}


def measure_device(path: str, shapes: List[str], size: int, rounds: int,
                   target_dir: Optional[str] = None, compare: bool = True) -> Dict:
    """Build the images on PATH's device and time the copies there (see the module doc)."""
    folder = device_folder(path)
    os.makedirs(folder, exist_ok=True)
    os.environ["QCOW2PY_BENCH_DIR"] = folder        # build_shape builds there
    target_dir = target_dir or folder
    result = {"size": size, "device": os.path.abspath(path), "folder": folder,
              "filesystem": filesystem(folder), "target_filesystem": filesystem(target_dir),
              "rounds": rounds, "cpus": os.cpu_count(),
              "load_average_before": os.getloadavg()[0], "shapes": {}}
    for shape in shapes:
        src = build_shape(size, shape)
        files = chain_files(src)
        log(f"{shape}: timing the copies on {result['filesystem']}, cold cache, "
            f"{rounds} rounds")
        result["shapes"][shape] = {
            "files": [os.path.basename(f) for f in files],
            "file_bytes": [os.path.getsize(f) for f in files],
            "readers": time_copies(src, files, target_dir, rounds, compare)}
    return result


def format_device_table(result: Dict) -> str:
    """The model's table form: one row per image and reader, wall times side by side."""
    head = ["image", "reader", "reads", "MiB", "device s (median)", "min s", "max s",
            "÷ qemu-img", "copy s (--stats)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, s in result["shapes"].items():
        qemu = s["readers"]["qemu-img"]["median"]
        for label, r in s["readers"].items():
            st = r.get("stats", {})
            lines.append("| " + " | ".join([
                shape, label, str(st.get("read_requests", "–")),
                f"{st['bytes_read'] / 2**20:.0f}" if "bytes_read" in st else "–",
                f"{r['median']:.2f}", f"{r['min']:.2f}", f"{r['max']:.2f}",
                f"{r['median'] / qemu:.2f}",
                f"{r['engine_median']:.2f}" if "engine_median" in r else "–"]) + " |")
    return "\n".join(lines)


def run(args, size: int, shapes: List[str], out_dir: str, name: Optional[str]) -> int:
    """``--device`` from media.main: measure, print the table, write the json."""
    t0 = time.monotonic()
    result = measure_device(args.device, shapes, size, args.rounds, args.device_target,
                            compare=not args.no_compare)
    result["seconds"] = round(time.monotonic() - t0, 1)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, (name or f"media-device-{size_label(size)}") + ".json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"Copy of {size_label(size)} images on {result['filesystem']} "
          f"(target on {result['target_filesystem']}); whole commands, source and target "
          f"with O_DIRECT, page cache dropped before each; median of {args.rounds} "
          f"alternating rounds; {result['cpus']} CPUs, load before "
          f"{result['load_average_before']:.1f}")
    print(format_device_table(result))
    print(f"\nwrote {out} in {result['seconds']:.0f}s; the images stay in "
          f"{result['folder']} for later runs (delete it when done)")
    return 0
