"""Rotating versus SSD media: copying fragmented images, modelled from real traces.

On a warm page cache every copy reads memory, so a wall-clock benchmark on a
developer machine cannot show what the read order costs on a disk.  This
report records the *requests* each copier issues and replays them on the disk
models of :mod:`benchmarks.diskmodel` (a 7200 rpm SATA hard disk, a SATA SSD,
an NVMe SSD):

* **qcow2py guest** / **qcow2py host**: ``BlockCopy`` (order ``guest`` or
  ``host``) to a new qcow2 target, the source opened with a
  :class:`qcow2py.io.wrappers.TraceLog` on every file of its chain (the traced
  storages have no file descriptor, so the copy takes its Python I/O path, one
  batch at a time, and every request goes through the log);
* **qcow2py-copy host, strace**: the real command (``qcow2py-copy --order
  host``, C copier, its default two worker threads) under ``strace``, as a
  check that the traced copy issues the same requests;
* **qemu-img**: ``qemu-img convert -O qcow2`` under ``strace -f -y``, its
  ``pread64``/``preadv`` calls parsed from the log.

Only reads of the source files are modelled (the target is assumed to sit on
another device).  The files of a chain are laid out one after another from the
outer edge of the disk, each on a 1 GiB boundary.  Each trace is replayed at
queue depth 1 (trace order, one request at a time), 2 (qcow2py-copy's two
threads) and 32 (NCQ: the drive picks among the next 32 requests by
rotational position; qemu-img convert keeps that many in flight).  The
**floor** is the sequential transfer of the allocated bytes (every data
cluster of every file of the chain as stored, compressed clusters at their
stored length) at the zone rate where they lie; **sorted extents** is one
sweep over just what must be read (the visible extents in file order,
skipping what lies between them as cheaply as the drive can), i.e. the best
any reader could do on that layout.  The **wall** column is measured on this
machine with the whole commands (process start included), untraced,
alternating, on a warm page cache, so it shows CPU cost, not media cost.

The images (shuffled, longlived, compressed, chain) are built and cached by
:mod:`benchmarks.media_shapes`; :mod:`benchmarks.media_report` holds the
targets, the tables and the chart; this module traces and models the copies
and runs the command.

The **data span** of a file runs from its first data byte to the end of its
last one; ``span ÷ allocated`` above 1 means free clusters (or packing slack)
lie between the data, which a head reading the data in one sweep must pass
over: the floor is then out of any reader's reach, and *sorted extents* is
the bound.

Run ``python -m benchmarks.media`` (``--size 256M``, ``--rounds 3``,
``--images shuffled,chain``, ``--no-wall``, ``--no-compare``,
``--one-at-a-time``, ``--name``).  It prints the table and writes
``media.json`` (``media-SIZE.json`` for sizes other than 256M) and, with
matplotlib (``pip install -e ".[bench]"``), the chart next to it, into
``benchmarks/.out`` (``--out DIR`` or ``$QCOW2PY_BENCH_OUT``);
``--update-tracked`` writes the published ``benchmarks/media*.json``/``.png``
instead, and ``--chart-only FILE.json`` redraws a chart from saved results.
Needs ``qemu-img``, ``qemu-io`` and ``strace``.  A large run, e.g.
``--size 16G --one-at-a-time --no-wall --no-compare``, builds, measures and
deletes one image at a time: it needs the space of one image and one copy of
it (about 1.7 times the virtual size), not of all four.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

if not __package__:                      # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import device  # noqa: E402
from benchmarks import diskmodel as dm  # noqa: E402
from benchmarks.diskmodel_hdd import HDD  # noqa: E402
from benchmarks.diskmodel_ssd import NVME_SSD, SATA_SSD, SSD  # noqa: E402
from benchmarks.diskmodel_strace import STRACE_ARGS, parse_strace  # noqa: E402
from benchmarks.media_report import (HDD_QDS, QDS, READERS, chart, format_table,  # noqa: E402
                                     format_targets, targets)
from benchmarks.media_shapes import (CLUSTER, SEED, SHAPES, build_shape,  # noqa: E402
                                     chain_files, delete_shape, log, run_checked, shape_bytes)
from tests.images import parse_size, size_label  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
#: where results go unless --update-tracked (ignored by git)
OUT_DIR = os.path.join(HERE, ".out")
COMPARE = True               # check every traced copy with qemu-img compare (--no-compare)


# ---------------------------------------------------------------------------- traces
def trace_qcow2py(src: str, order: str, tmp: str) -> Dict:
    """Copy with BlockCopy, every read of the source chain recorded; checks the copy."""
    import qcow2py
    from qcow2py.jobs.blockcopy.blockcopy import BlockCopy
    from qcow2py.io.wrappers import TraceLog, UnsafeStorage

    dst = os.path.join(tmp, f"traced-{order}.qcow2")
    if os.path.exists(dst):
        os.unlink(dst)
    trace = TraceLog()
    t = time.perf_counter()
    with qcow2py.open(src, storage_wrapper=trace.wrap, wrap_chain=True) as img:
        tgt = qcow2py.create(dst, img.size, format="qcow2", storage_wrapper=UnsafeStorage)
        try:
            stats = BlockCopy(img, tgt, order=order).run()
        finally:
            tgt.close()
    seconds = time.perf_counter() - t
    if COMPARE:
        run_checked(["qemu-img", "compare", "-q", src, dst])
    os.unlink(dst)
    ios = [dm.IO(os.path.realpath(name), req.offset, req.length, False, thread)
           for name, req, thread in trace.entries if req.kind == "read" and req.length > 0]
    return {"ios": ios, "traced_seconds": seconds, "stats": stats.as_dict()}


def trace_command(cmd: List[str], src: str, tmp: str) -> Dict:
    """A copy command (``cmd + [src, dst]``) under strace; its reads of the source chain."""
    if not shutil.which("strace"):
        raise RuntimeError("strace is needed (apt-get install strace)")
    dst = os.path.join(tmp, "traced-cmd.qcow2")
    logf = os.path.join(tmp, "cmd.strace")
    for p in (dst, logf):
        if os.path.exists(p):
            os.unlink(p)
    t = time.perf_counter()
    run_checked(STRACE_ARGS + [logf] + cmd + [src, dst], cwd=os.path.dirname(HERE))
    seconds = time.perf_counter() - t
    if COMPARE:
        run_checked(["qemu-img", "compare", "-q", src, dst])
    files = chain_files(src)
    with open(logf) as f:
        ios = [io for io in parse_strace(f, files=files) if not io.write]
    os.unlink(dst)
    os.unlink(logf)
    return {"ios": ios, "traced_seconds": seconds}


def sorted_extents(src: str) -> List[dm.IO]:
    """What a copy must read, each file front to back, touching ranges merged: the
    best single sweep the layout allows (no metadata reads)."""
    import qcow2py
    from qcow2py.jobs.blockcopy.plan import P_COMPRESSED, P_DATA, plan_copy

    with qcow2py.open(src) as img:
        chain = img.chain()
        names = [os.path.realpath(getattr(layer, "data_file_path", None) or layer.storage.name)
                 for layer in chain]
        plan = plan_copy(chain)
    sel = (plan.kind == P_DATA) | (plan.kind == P_COMPRESSED)
    layer, host = plan.layer[sel], plan.host[sel]
    length = np.where(plan.kind[sel] == P_DATA, plan.length[sel], plan.csize[sel])
    order = np.lexsort((host, layer))
    ios: List[dm.IO] = []
    for li, h, n in zip(layer[order].tolist(), host[order].tolist(), length[order].tolist()):
        if ios and ios[-1].file == names[li] and h <= ios[-1].offset + ios[-1].length:
            last = ios[-1]
            ios[-1] = dm.IO(last.file, last.offset, max(last.length, h + n - last.offset))
        else:
            ios.append(dm.IO(names[li], h, n))
    return ios


def allocated_bytes(src: str):
    """Bytes stored in each file of the chain, the part of them a copy must read,
    and where the data lies.

    ``allocated``: every data cluster of every layer as stored (compressed
    streams at their stored length); ``visible``: only what the guest sees
    (data not hidden by an upper layer); ``spans``: per file, the first data
    byte and the end of the last one (metadata and free clusters between
    them included: what a head sweeping the data passes over).
    """
    import qcow2py
    from qcow2py.jobs.blockcopy.plan import P_COMPRESSED, P_DATA, layer_arrays, plan_copy
    from qcow2py.native import COMPRESSED, DATA

    def stored(kinds, lengths, hosts, csizes, i_comp):
        b = int(lengths[kinds == DATA].sum())
        if i_comp.any():
            _, first = np.unique(hosts[i_comp], return_index=True)
            b += int(csizes[i_comp][first].sum())
        return b

    with qcow2py.open(src) as img:
        chain = img.chain()
        names = [os.path.realpath(getattr(layer, "data_file_path", None) or layer.storage.name)
                 for layer in chain]
        allocated, spans = {}, {}
        for name, layer in zip(names, chain):
            s, n, k, h, c = layer_arrays(layer, 0, layer.size)
            allocated[name] = stored(k, n, h, c, k == COMPRESSED)
            data = (k == DATA) | (k == COMPRESSED)
            ends = h + np.where(k == DATA, n, c)
            spans[name] = (int(h[data].min()), int(ends[data].max())) if data.any() else (0, 0)
        plan = plan_copy(chain)
    visible = {}
    for i, name in enumerate(names):
        sel = plan.layer == i
        visible[name] = stored(np.where(plan.kind[sel] == P_DATA, DATA, 0), plan.length[sel],
                               plan.host[sel], plan.csize[sel], plan.kind[sel] == P_COMPRESSED)
    return allocated, visible, spans


# ---------------------------------------------------------------------------- wall time
def wall_times(src: str, tmp: str, rounds: int) -> Dict[str, float]:
    """Median seconds of the whole, untraced commands; alternating; round 0 warms up."""
    cmds = {
        "qcow2py guest": [sys.executable, "-m", "qcow2py.copy", "-O", "qcow2", "--order", "guest"],
        "qcow2py host": [sys.executable, "-m", "qcow2py.copy", "-O", "qcow2", "--order", "host"],
        "qemu-img": ["qemu-img", "convert", "-O", "qcow2"],
    }
    times: Dict[str, List[float]] = {k: [] for k in cmds}
    dst = os.path.join(tmp, "wall.qcow2")
    for r in range(rounds + 1):
        for label, cmd in cmds.items():
            if os.path.exists(dst):
                os.unlink(dst)
            t = time.perf_counter()
            subprocess.run(cmd + [src, dst], check=True, stdout=subprocess.DEVNULL,
                           cwd=os.path.dirname(HERE))
            if r:
                times[label].append(time.perf_counter() - t)
    if os.path.exists(dst):
        os.unlink(dst)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------- the report
def model_reader(ios: List[dm.IO], layout: dm.Layout, hdd: HDD, ssds: Dict[str, SSD]):
    out = {"requests": len(ios), "bytes": dm.total_bytes(ios)}
    addresses = layout.addresses(ios)
    for qd in HDD_QDS:
        d = hdd.simulate(ios, qd=qd, addresses=addresses, detail=True)
        out[f"hdd_qd{qd}"] = d["seconds"]
        out[f"hdd_qd{qd}_detail"] = {k: (round(v, 6) if isinstance(v, float) else v)
                                     for k, v in d.items()}
    for qd in QDS:
        for key, ssd in ssds.items():
            out[f"{key}_qd{qd}"] = ssd.simulate(ios, qd=qd)
    return out


def measure(shapes: List[str], size: int, rounds: int, wall: bool,
            one_at_a_time: bool = False) -> Dict:
    """Build, trace and model each shape.  ``one_at_a_time``: build a shape just
    before it is measured and delete it after (a large run then needs the disk
    space of one shape and one copy of it, not of all four)."""
    hdd = HDD()
    ssds = {"sata": SSD(SATA_SSD), "nvme": SSD(NVME_SSD)}
    result = {"size": size, "shapes": {}, "models": {
        "hdd": hdd.p.__dict__, "sata": SATA_SSD.__dict__, "nvme": NVME_SSD.__dict__},
        "load_average_before": os.getloadavg()[0], "cpus": os.cpu_count(),
        "one_at_a_time": one_at_a_time, "compared": COMPARE}
    if not one_at_a_time:
        for shape in shapes:
            build_shape(size, shape)
    tmp = tempfile.mkdtemp(prefix="qcow2py-media-", dir=os.environ.get("QCOW2PY_MEDIA_TMP"))
    try:
        for shape in shapes:
            t_shape = time.monotonic()
            src = build_shape(size, shape)
            t_built = time.monotonic()
            on_disk = shape_bytes(size, shape)
            try:
                result["shapes"][shape] = measure_shape(shape, src, tmp, hdd, ssds, rounds, wall)
            finally:
                if one_at_a_time:
                    delete_shape(size, shape)
            result["shapes"][shape]["seconds"] = {
                "build": round(t_built - t_shape, 1),
                "measure": round(time.monotonic() - t_built, 1)}
            result["shapes"][shape]["disk_bytes"] = on_disk
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["footprint"] = footprint_sensitivity(hdd)
    return result


def measure_shape(shape: str, src: str, tmp: str, hdd: HDD, ssds: Dict[str, SSD], rounds: int,
                  wall: bool) -> Dict:
    files = chain_files(src)
    layout = dm.Layout.contiguous({f: os.path.getsize(f) for f in files}, base=0)
    alloc, visible, spans = allocated_bytes(src)
    total = sum(alloc.values())
    span = sum(b - a for a, b in spans.values())
    floor = {"bytes": total, "visible_bytes": sum(visible.values()), "span_bytes": span,
             "hdd": hdd.floor({layout.starts[f]: b for f, b in alloc.items()}),
             "span_hdd": hdd.floor({layout.starts[f] + spans[f][0]: spans[f][1] - spans[f][0]
                                    for f in files}),
             **{k: s.floor(total) for k, s in ssds.items()}}
    # what every reader must read (the chain's visible data): no reader can beat it
    floor["visible_hdd"] = hdd.floor({layout.starts[f]: b for f, b in visible.items()})
    floor.update({f"visible_{k}": s.floor(sum(visible.values())) for k, s in ssds.items()})
    bound_ios = sorted_extents(src)
    floor["sorted_extents_hdd"] = hdd.simulate(bound_ios, layout)
    log(f"{shape}: tracing the copies")
    traces = {}
    for label in READERS:
        t = time.monotonic()
        if label == "qcow2py guest":
            traces[label] = trace_qcow2py(src, "guest", tmp)
        elif label == "qcow2py host":
            traces[label] = trace_qcow2py(src, "host", tmp)
        elif label == "qcow2py-copy host, strace":
            traces[label] = trace_command(
                [sys.executable, "-m", "qcow2py.copy", "-O", "qcow2", "--order", "host"], src, tmp)
        else:
            traces[label] = trace_command(["qemu-img", "convert", "-O", "qcow2"], src, tmp)
        log(f"{shape}: {label}: {len(traces[label]['ios'])} reads, "
            f"{time.monotonic() - t:.1f}s")
    log(f"{shape}: modelling")
    readers = {}
    for label, tr in traces.items():
        t = time.monotonic()
        readers[label] = model_reader(tr["ios"], layout, hdd, ssds)
        readers[label]["traced_seconds"] = round(tr["traced_seconds"], 3)
        if "stats" in tr:
            readers[label]["copy_stats"] = tr["stats"]
        log(f"{shape}: {label}: modelled in {time.monotonic() - t:.1f}s")
    if wall:
        log(f"{shape}: wall time, {rounds} alternating rounds")
        for label, s in wall_times(src, tmp, rounds).items():
            readers[label]["wall"] = s
    return {"files": [os.path.basename(f) for f in files],
            "file_bytes": [os.path.getsize(f) for f in files],
            "data_spans": [list(spans[f]) for f in files],
            "floor": floor, "readers": readers, "targets": targets(readers, floor)}


def footprint_sensitivity(hdd: HDD, n: int = 2000) -> List[Dict]:
    """Random 64 KiB reads (a shuffled image's guest order) over growing spans, at QD 1
    and 32, against reading the same bytes sequentially: the ceiling of any
    host-order speed-up over a guest-order reader on an image of that size."""
    rng = np.random.default_rng(SEED)
    rows = []
    # 16 GiB (the large run) was added last: drawn after the others, which keep their samples
    for span in (256 << 20, 4 << 30, 64 << 30, 1 << 40, 16 << 30):
        clusters = span // CLUSTER
        idx = rng.permutation(clusters)[:n] if clusters <= 1 << 24 else \
            rng.choice(clusters, n, replace=False)
        ios = [dm.IO("f", int(c) * CLUSTER, CLUSTER) for c in idx]
        seq = n * CLUSTER / hdd.rate_at(0)
        rows.append({"span": span, "qd1": hdd.simulate(ios, qd=1) / seq,
                     "qd32": hdd.simulate(ios, qd=32) / seq})
    return sorted(rows, key=lambda r: r["span"])


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float):
        return round(o, 6)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return round(float(o), 6)
    return o


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.media",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--size", default=os.environ.get("QCOW2PY_BENCH_SIZE", "256M"),
                    help="virtual size of each image (default 256M)")
    ap.add_argument("--rounds", type=int, default=3, help="wall-time rounds (default 3)")
    ap.add_argument("--images", default=",".join(SHAPES), help=",".join(SHAPES))
    ap.add_argument("--no-wall", action="store_true", help="skip the wall-time measurement")
    ap.add_argument("--out", default=os.environ.get("QCOW2PY_BENCH_OUT") or OUT_DIR,
                    help="folder for the json and the chart (default benchmarks/.out, or "
                         "$QCOW2PY_BENCH_OUT; the files under version control are not touched)")
    ap.add_argument("--update-tracked", action="store_true",
                    help="write benchmarks/media*.json and .png, the published results "
                         "(instead of --out)")
    ap.add_argument("--chart-only", metavar="JSON",
                    help="redraw the chart of a results file (next to it) and exit")
    ap.add_argument("--name", default=None,
                    help="file name of the json and chart, without extension (default "
                         "media for 256M, media-SIZE for other sizes)")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="build each image just before it is measured and delete it after "
                         "(a large run needs the space of one image and one copy)")
    ap.add_argument("--no-compare", action="store_true",
                    help="do not check the traced copies with qemu-img compare (saves "
                         "reading the image and its copy once per reader on a large run)")
    ap.add_argument("--device", metavar="PATH",
                    help="real-device mode: build the images in a folder on PATH's disk and "
                         "time qcow2py-copy (host and guest order) against qemu-img convert, "
                         "both with -T none -t none (O_DIRECT), cold cache (benchmarks/device.py)")
    ap.add_argument("--device-target", metavar="DIR",
                    help="with --device: write the copies in DIR (default: next to the images)")
    args = ap.parse_args(argv)
    if args.chart_only:
        with open(args.chart_only) as f:
            png = os.path.splitext(args.chart_only)[0] + ".png"
            return 0 if chart(json.load(f), png) else 1
    if args.update_tracked:
        args.out = HERE
    global COMPARE
    COMPARE = not args.no_compare
    size = parse_size(args.size)
    if size < (16 << 20) or size % (1 << 20):
        ap.error("--size must be a multiple of 1 MiB, at least 16M")
    shapes = [s for s in args.images.split(",") if s]
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        ap.error(f"unknown images: {', '.join(sorted(unknown))}")
    if args.device:
        return device.run(args, size, shapes, args.out, args.name)
    name = args.name or ("media" if size == 256 << 20 else f"media-{size_label(size)}")
    t0 = time.monotonic()
    result = measure(shapes, size, args.rounds, not args.no_wall, args.one_at_a_time)
    result["seconds"] = round(time.monotonic() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, name + ".json")
    with open(out, "w") as f:
        json.dump(_jsonable(result), f, indent=1, sort_keys=True)
        f.write("\n")
    png = os.path.join(args.out, name + ".png")
    drew = chart(result, png)
    print(f"Copy of {size_label(size)} images; modelled seconds of the source reads "
          f"({result['models']['hdd']['name']}; SATA and NVMe SSD presets); "
          f"wall = measured here, {args.rounds} rounds, warm cache, "
          f"{os.cpu_count()} CPUs, load before {result['load_average_before']:.1f}")
    print(format_table(result))
    print()
    print(format_targets(result))
    print(f"\nwrote {out}" + (f" and {png}" if drew else "")
          + f" in {result['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
