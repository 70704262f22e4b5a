"""What fleecing, the RAM cache and copy priority buy a guest during a backup.

**Part 1, guest writes during a backup to a slow target** (wall clock).  A
disk of ``--size`` random data (qcow2, 64 KiB clusters) is backed up in full
to a target whose writes are throttled to ``--target-mbps`` (a token bucket in
a storage wrapper), while ``--threads`` guest threads write 4 KiB at random
offsets, paced at ``--iops`` each (open loop: a slow write delays the next
one, so slowness shows as lower throughput and higher latency).  Four setups:

* **no backup**: the guest alone;
* **CBW to target**: QEMU's backup job: copies before write go to the backup
  target itself, so they share the target's bandwidth with the job's copies
  (modelled as a fleecing whose temp sits behind the same throttle);
* **fleecing**: copies go to a local temp; the push (guest order, as QEMU's
  job) drains the snapshot to the slow target with discard-source;
* **fleecing + RAM**: the same with a ``--ram-cache`` RAM cache and
  ``order="priority"``.

For each: guest write latency p50/p99 (ms), guest throughput (writes/s),
the backup's duration, bytes copied before write and bytes written to temp.

**Part 2, push order on a modelled disk.**  A disk whose clusters were
written in shuffled order (so host order differs from guest order) is
fleeced with a small RAM cache after a burst of guest writes to half of its
clusters (1/32 of the disk stays in RAM, the rest spills to temp), then
pushed in guest, host and priority order with discard-source while the guest
keeps writing (deterministically: a batch of
writes at each 1 MiB of progress, from the push's progress callback, one
worker).  Every request to the disk and temp files is traced and replayed on
the 7200 rpm HDD and SATA SSD models of :mod:`benchmarks.diskmodel_hdd` and
:mod:`benchmarks.diskmodel_ssd`; the table gives the modelled seconds and how
many bytes the guest's writes had to copy during the push.

    python -m benchmarks.bench_backup [--size 128M] [--json FILE] [--isolate]

Images live in a temporary folder (``--dir`` to choose), nothing tracked is
written.  About a minute with the defaults.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

import numpy as np

try:
    from ._runner import add_common_args, load_average, report, rerun_isolated
    from . import diskmodel
    from .diskmodel_hdd import HDD
    from .diskmodel_ssd import SATA_SSD, SSD
except ImportError:            # run as a plain file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks._runner import add_common_args, load_average, report, rerun_isolated
    from benchmarks import diskmodel
    from benchmarks.diskmodel_hdd import HDD
    from benchmarks.diskmodel_ssd import SATA_SSD, SSD

import qcow2py
from qcow2py import backup
from qcow2py.cli.options import parse_size
from qcow2py.io.storage import Storage
from qcow2py.io.wrappers import TraceLog

KiB, MiB = 1 << 10, 1 << 20


class Throttle:
    """A shared token bucket: callers of :meth:`take` get ``rate`` bytes/s in all."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.next = time.monotonic()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + n / self.rate
            wait = self.next - now
        if wait > 0:
            time.sleep(wait)


class ThrottledStorage(Storage):
    """Writes pass only as fast as the throttle allows (reads are free)."""

    def __init__(self, inner: Storage, throttle: Throttle) -> None:
        self.inner, self.throttle = inner, throttle
        self.name, self.writable = inner.name, inner.writable

    def size(self):
        return self.inner.size()

    def pread_into(self, buf, offset):
        return self.inner.pread_into(buf, offset)

    def pwrite(self, data, offset):
        self.throttle.take(len(memoryview(data).cast("B")))
        self.inner.pwrite(data, offset)

    def fsync(self):
        pass

    def truncate(self, size):
        self.inner.truncate(size)

    def close(self):
        self.inner.close()


# ---------------------------------------------------------------------------- part 1
def make_disk(path: str, size: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    with qcow2py.create(path, size) as img:
        for off in range(0, size, 4 * MiB):
            n = min(4 * MiB, size - off)
            img.write(off, rng.integers(0, 256, n, dtype=np.uint8).tobytes())


def guest(node, size: int, iops: float, stop: threading.Event, lat: List[float],
          seed: int) -> None:
    rng = random.Random(seed)
    data = bytes(4096)
    period = 1.0 / iops
    due = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        off = rng.randrange(0, size // 4096) * 4096
        t0 = time.monotonic()
        node.write(off, data)
        lat.append(time.monotonic() - t0)
        due = max(due + period, time.monotonic() - 10 * period)


def run_setup(name: str, folder: str, size: int, args) -> dict:
    disk_path = os.path.join(folder, "disk.qcow2")
    make_disk(disk_path, size)
    temp, target = os.path.join(folder, "temp.qcow2"), os.path.join(folder, "target.qcow2")
    for p in (temp, target):
        if os.path.exists(p):
            os.unlink(p)
    throttle = Throttle(args.target_mbps * 1e6)
    lat: List[float] = []
    stop = threading.Event()
    row = {"setup": name}
    with qcow2py.open(disk_path, "r+") as disk:
        if name == "no backup":
            node, fl = disk, None
        else:
            fl = backup.fleece(
                disk, temp, ram_cache=args.ram_cache if name == "fleecing + RAM" else 0,
                temp_storage_wrapper=(lambda s: ThrottledStorage(s, throttle))
                if name == "CBW to target" else None)
            node = fl.disk
        threads = [threading.Thread(target=guest, args=(node, size, args.iops, stop, lat, t))
                   for t in range(args.threads)]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        try:
            if fl is None:
                time.sleep(args.idle_seconds)
            else:
                tgt = qcow2py.create(target, size, storage_wrapper=lambda s: ThrottledStorage(
                    s, throttle))
                with tgt:
                    res = backup.push(fl.snapshot, tgt, discard_source=True,
                                      order="priority" if name == "fleecing + RAM" else "guest")
                row["backup_s"] = round(time.monotonic() - t0, 2)
                row["read_from"] = (f"ram {res.bytes_from_ram // MiB} / disk "
                                    f"{res.bytes_from_disk // MiB} / temp "
                                    f"{res.bytes_from_temp // MiB} MiB")
        finally:
            stop.set()
            for th in threads:
                th.join()
        elapsed = time.monotonic() - t0
        if fl is not None:
            st = fl.stats
            row["cbw_MiB"] = round(st.cbw_bytes / MiB, 1)
            row["temp_written_MiB"] = round(st.temp_bytes_written / MiB, 1) \
                if name != "CBW to target" else "(target)"
            fl.close()
    ms = np.array(lat) * 1e3
    row.update(writes_per_s=round(len(lat) / elapsed), p50_ms=round(float(np.percentile(ms, 50)), 3),
               p99_ms=round(float(np.percentile(ms, 99)), 3))
    return row


# ---------------------------------------------------------------------------- part 2
def make_shuffled_disk(path: str, size: int, seed: int = 2) -> None:
    rng = np.random.default_rng(seed)
    clusters = rng.permutation(size // (64 * KiB))
    with qcow2py.create(path, size) as img:
        for c in clusters.tolist():
            img.write(c * 64 * KiB, rng.integers(0, 256, 64 * KiB, dtype=np.uint8).tobytes())


def run_order(order: str, folder: str, size: int, base: str, args) -> dict:
    disk_path = os.path.join(folder, "disk2.qcow2")
    shutil.copyfile(base, disk_path)
    temp, target = os.path.join(folder, "temp2.qcow2"), os.path.join(folder, "target2.qcow2")
    for p in (temp, target):
        if os.path.exists(p):
            os.unlink(p)
    log = TraceLog()
    rng = random.Random(7)
    ncl = size // (64 * KiB)
    with qcow2py.open(disk_path, "r+", storage_wrapper=log.wrap) as disk:
        with backup.fleece(disk, temp, ram_cache=size // 32,
                           temp_storage_wrapper=log.wrap) as fl:
            for c in rng.sample(range(ncl), ncl // 2):           # a burst before the push
                fl.disk.write(c * 64 * KiB + 512, b"\x01" * 4096)
            before = fl.stats.cbw_bytes
            mark = {"next": 0}

            def progress(done: int, total: int) -> None:         # the guest keeps writing
                while mark["next"] <= done:
                    mark["next"] += MiB
                    for _ in range(4):
                        c = rng.randrange(ncl)
                        fl.disk.write(c * 64 * KiB + 1024, b"\x02" * 4096)
            n0 = len(log.entries)
            res = backup.push(fl.snapshot, target, order=order, discard_source=True,
                              workers=1, progress=progress)
            entries = log.entries[n0:]
            cbw_during = fl.stats.cbw_bytes - before
    ios = [diskmodel.IO(os.path.basename(name), r.offset, r.length, r.kind == "write")
           for name, r, _ in entries if r.kind in ("read", "write")]
    layout = diskmodel.Layout.contiguous({"disk2.qcow2": size * 2, "temp2.qcow2": size * 2})
    hdd = HDD().simulate(ios, layout)
    ssd = SSD(SATA_SSD).simulate(ios)
    return {"order": order, "hdd_s": round(hdd, 2), "ssd_s": round(ssd, 3),
            "requests": len(ios), "cbw_during_push_MiB": round(cbw_during / MiB, 1),
            "phases": phase_summary(res.phases)}


def phase_summary(phases) -> str:
    """``ram 8.0M, disk 60.0M, temp 60.0M (21 phases)``: totals in order of first run."""
    totals: Dict[str, int] = {}
    for p, n in phases:
        totals[p] = totals.get(p, 0) + n
    s = ", ".join(f"{p} {n / MiB:.1f}M" for p, n in totals.items())
    return s + (f" ({len(phases)} phases)" if len(phases) > len(totals) else "")


def table(rows: List[dict], keys: List[str]) -> str:
    w = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    lines = ["| " + " | ".join(k.ljust(w[k]) for k in keys) + " |",
             "|" + "|".join("-" * (w[k] + 2) for k in keys) + "|"]
    lines += ["| " + " | ".join(str(r.get(k, "")).ljust(w[k]) for k in keys) + " |"
              for r in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_backup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="128M", help="disk size (default 128M)")
    ap.add_argument("--target-mbps", type=float, default=50.0,
                    help="target write throttle, MB/s (default 50)")
    ap.add_argument("--iops", type=float, default=250.0,
                    help="paced 4 KiB writes per second per guest thread (default 250)")
    ap.add_argument("--threads", type=int, default=2, help="guest threads (default 2)")
    ap.add_argument("--ram-cache", default="64M", help="RAM cache of the last setup")
    ap.add_argument("--idle-seconds", type=float, default=3.0,
                    help="how long the no-backup guest runs (default 3)")
    ap.add_argument("--dir", help="folder for the images (default: a temporary one)")
    ap.add_argument("--parts", default="1,2", help="which parts to run (1, 2 or 1,2)")
    add_common_args(ap)
    args = ap.parse_args(argv)
    if args.isolate:
        code = rerun_isolated("benchmarks.bench_backup", argv)
        if code is not None:
            return code
    size = parse_size(args.size)
    args.ram_cache = parse_size(args.ram_cache)
    parts = set(args.parts.split(","))
    load_before = load_average()
    folder = args.dir or tempfile.mkdtemp(prefix="bench_backup-")
    out: Dict[str, list] = {}
    try:
        if "1" in parts:
            rows = [run_setup(n, folder, size, args) for n in
                    ("no backup", "CBW to target", "fleecing", "fleecing + RAM")]
            out["guest"] = rows
            report(f"guest writes during a full backup of a {size // MiB} MiB disk to a "
                   f"target throttled to {args.target_mbps:g} MB/s; {args.threads} guest "
                   f"threads x {args.iops:g} paced 4 KiB writes/s; RAM cache "
                   f"{args.ram_cache // MiB} MiB", load_before,
                   table(rows, ["setup", "writes_per_s", "p50_ms", "p99_ms", "backup_s",
                                "cbw_MiB", "temp_written_MiB", "read_from"]), rows, None)
        if "2" in parts:
            base = os.path.join(folder, "shuffled.qcow2")
            make_shuffled_disk(base, size)
            rows = [run_order(o, folder, size, base, args) for o in ("guest", "host", "priority")]
            out["orders"] = rows
            print()
            report(f"push of a {size // MiB} MiB disk written in shuffled cluster order, RAM "
                   f"cache {size // 32 // MiB} MiB, guest writing during the push; disk and "
                   f"temp requests replayed on the disk models", load_average(),
                   table(rows, ["order", "hdd_s", "ssd_s", "requests", "cbw_during_push_MiB",
                                "phases"]), rows, None)
        if args.json:
            import json
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
