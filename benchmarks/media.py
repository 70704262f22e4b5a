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
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

try:
    from . import diskmodel as dm
    from tests.images import parse_size, patterns as write_patterns, size_label
except ImportError:                      # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import diskmodel as dm
    from tests.images import parse_size, patterns as write_patterns, size_label

HERE = os.path.dirname(os.path.abspath(__file__))
#: where results go unless --update-tracked (ignored by git)
OUT_DIR = os.path.join(HERE, ".out")
RECIPE = 3                   # 3: compressed written cluster by cluster in shuffled order
SEED = 20240611
CLUSTER = 64 << 10
SHAPES = ("shuffled", "longlived", "compressed", "chain")
READERS = ("qcow2py guest", "qcow2py host", "qcow2py-copy host, strace", "qemu-img")
QDS = (1, 32)                # queue depths of the SSD models (and the chart)
HDD_QDS = (1, 2, 32)         # ... of the HDD model: 2 is qcow2py-copy's two worker threads
#: the targets of the report
TARGET_FLOOR = 1.05          # host order on the HDD within this factor of the floor
TARGET_VS_QEMU = 5.0         # host order at least this much faster than qemu-img at QD 32
COMPARE = True               # check every traced copy with qemu-img compare (--no-compare)


def log(msg: str) -> None:
    print(f"[media] {msg}", file=sys.stderr, flush=True)


def _run(args: List[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def _qemu_io(img: str, lines: List[str]) -> None:
    p = subprocess.run(["qemu-io", "-f", "qcow2", img], input="\n".join(lines) + "\n",
                       capture_output=True, text=True, check=True)
    noise = p.stdout.replace("qemu-io>", "").strip()
    if noise or p.stderr.strip():
        raise RuntimeError(f"qemu-io on {img}: {(noise + p.stderr)[:2000]}")


# ---------------------------------------------------------------------------- images
def cache_dir(size: int) -> str:
    base = os.environ.get("QCOW2PY_BENCH_DIR") or os.path.join(HERE, ".cache")
    return os.path.join(base, f"media-{size_label(size)}")


def _create(path: str, size: int, backing: Optional[str] = None) -> None:
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    _run(args + [path, str(size)])


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
            _run(["qemu-img", "check", "-q", os.path.join(tmp, name)])
        for name in FILES[shape]:
            os.rename(os.path.join(tmp, name), os.path.join(folder, name))
        with open(_stamp_path(size, shape), "w") as f:
            json.dump(_stamp(size, shape), f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{shape} built in {time.monotonic() - t:.1f}s, {shape_bytes(size, shape) / 1e9:.2f} GB")
    return top


# ---------------------------------------------------------------------------- traces
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
        _run(["qemu-img", "compare", "-q", src, dst])
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
    _run(dm.STRACE_ARGS + [logf] + cmd + [src, dst], cwd=os.path.dirname(HERE))
    seconds = time.perf_counter() - t
    if COMPARE:
        _run(["qemu-img", "compare", "-q", src, dst])
    files = chain_files(src)
    with open(logf) as f:
        ios = [io for io in dm.parse_strace(f, files=files) if not io.write]
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
def model_reader(ios: List[dm.IO], layout: dm.Layout, hdd: dm.HDD, ssds: Dict[str, dm.SSD]):
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
    hdd = dm.HDD()
    ssds = {"sata": dm.SSD(dm.SATA_SSD), "nvme": dm.SSD(dm.NVME_SSD)}
    result = {"size": size, "shapes": {}, "models": {
        "hdd": hdd.p.__dict__, "sata": dm.SATA_SSD.__dict__, "nvme": dm.NVME_SSD.__dict__},
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


def measure_shape(shape: str, src: str, tmp: str, hdd: dm.HDD, ssds: Dict[str, dm.SSD], rounds: int,
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


def targets(readers: Dict, floor: Dict) -> Dict:
    host, guest, qemu = readers["qcow2py host"], readers["qcow2py guest"], readers["qemu-img"]
    host_hdd = host["hdd_qd1"]          # the traced copy issues one request at a time
    t = {"host_over_floor": host_hdd / floor["hdd"],
         "span_over_allocated": floor["span_bytes"] / floor["bytes"],
         "sorted_extents_over_floor": floor["sorted_extents_hdd"] / floor["hdd"],
         "host_over_sorted_extents": host_hdd / floor["sorted_extents_hdd"],
         "qemu_qd32_over_host": qemu["hdd_qd32"] / host_hdd,
         "qemu_qd32_over_floor": qemu["hdd_qd32"] / floor["hdd"],
         "ssd_host_le_guest": all(host[f"{k}_qd{q}"] <= guest[f"{k}_qd{q}"] * (1 + 1e-9)
                                  for k in ("sata", "nvme") for q in QDS)}
    t["floor_met"] = t["host_over_floor"] <= TARGET_FLOOR
    t["qemu_met"] = t["qemu_qd32_over_host"] >= TARGET_VS_QEMU
    return t


def footprint_sensitivity(hdd: dm.HDD, n: int = 2000) -> List[Dict]:
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


def format_table(result: Dict) -> str:
    head = ["image", "reader", "reads", "MiB", "HDD QD1 s", "HDD QD2 s", "HDD QD32 s",
            "QD1 ÷ floor",
            "SATA SSD QD1 s", "SATA SSD QD32 s", "NVMe QD1 s", "NVMe QD32 s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, s in result["shapes"].items():
        f = s["floor"]
        lines.append("| " + " | ".join([
            shape, "*floor* (allocated bytes, sequential)", "", f"{f['bytes'] / 2**20:.0f}",
            f"{f['hdd']:.2f}", "", "", "1.00", f"{f['sata']:.3f}",
            f"{f['sata']:.3f}", f"{f['nvme']:.3f}", f"{f['nvme']:.3f}", ""]) + " |")
        lines.append("| " + " | ".join([
            shape, "*data span* (first to last data byte, sequential)", "",
            f"{f['span_bytes'] / 2**20:.0f}", f"{f['span_hdd']:.2f}", "", "",
            f"{f['span_hdd'] / f['hdd']:.2f}", "", "", "", "", ""]) + " |")
        lines.append("| " + " | ".join([
            shape, "*sorted extents* (one sweep of what must be read)", "",
            f"{f['visible_bytes'] / 2**20:.0f}", f"{f['sorted_extents_hdd']:.2f}", "", "",
            f"{f['sorted_extents_hdd'] / f['hdd']:.2f}", "", "", "", "", ""]) + " |")
        for label in READERS:
            r = s["readers"][label]
            lines.append("| " + " | ".join([
                shape, label, str(r["requests"]), f"{r['bytes'] / 2**20:.0f}",
                f"{r['hdd_qd1']:.2f}", f"{r['hdd_qd2']:.2f}", f"{r['hdd_qd32']:.2f}",
                f"{r['hdd_qd1'] / f['hdd']:.2f}",
                f"{r['sata_qd1']:.3f}", f"{r['sata_qd32']:.3f}", f"{r['nvme_qd1']:.3f}",
                f"{r['nvme_qd32']:.3f}", f"{r['wall']:.2f}" if "wall" in r else "–"]) + " |")
    return "\n".join(lines)


def format_targets(result: Dict) -> str:
    lines = ["| image | host ÷ floor (HDD) | span ÷ allocated | sorted extents ÷ floor "
             "| host ÷ sorted extents | qemu-img QD32 ÷ host (HDD) "
             "| qemu-img QD32 ÷ floor | host ≤ guest (SSD) |", "|---|---|---|---|---|---|---|---|"]
    for shape, s in result["shapes"].items():
        t = s["targets"]
        lines.append(f"| {shape} | {t['host_over_floor']:.3f} "
                     f"({'met' if t['floor_met'] else 'MISSED'}, ≤ {TARGET_FLOOR}) | "
                     f"{t['span_over_allocated']:.3f} | {t['sorted_extents_over_floor']:.3f} | "
                     f"{t['host_over_sorted_extents']:.3f} | "
                     f"{t['qemu_qd32_over_host']:.1f}× "
                     f"({'met' if t['qemu_met'] else 'MISSED'}, ≥ {TARGET_VS_QEMU:g}) | "
                     f"{t['qemu_qd32_over_floor']:.1f}× | "
                     f"{'yes' if t['ssd_host_le_guest'] else 'NO'} |")
    rows = result.get("footprint")
    if rows:
        lines.append("")
        lines.append("Random 64 KiB reads over a span ÷ the same bytes read sequentially "
                     "(HDD model; the most a host-order copy can gain on a shuffled image "
                     "of that size):")
        lines.append("| span | QD1 | QD32 |")
        lines.append("|---|---|---|")
        for r in rows:
            lines.append(f"| {r['span'] / 2**30:g} GiB | {r['qd1']:.1f}× | {r['qd32']:.1f}× |")
    return "\n".join(lines)


def visible_floor(result: Dict, shape: str, key: str) -> float:
    """The time to read, sequentially, the bytes a copy of ``shape`` must read on
    disk model ``key`` (results written before this floor was recorded: derived
    from the visible bytes and the model's rate)."""
    f = result["shapes"][shape]["floor"]
    if f"visible_{key}" in f:
        return f[f"visible_{key}"]
    if key == "hdd":
        return f["hdd"] * f["visible_bytes"] / f["bytes"]
    return f["visible_bytes"] / result["models"][key]["read_bw"]


def chart(result: Dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no chart")
        return False
    shapes = list(result["shapes"])
    colors = {"qcow2py guest": "#9e9e9e", "qcow2py host": "#1f77b4", "qemu-img": "#d62728"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), dpi=80)
    panels = (("hdd", "7200 rpm HDD model (log scale)", True),
              ("sata", "SATA SSD model", False), ("nvme", "NVMe SSD model", False))
    for ax, (key, title, log_scale) in zip(axes, panels):
        x = np.arange(len(shapes))
        w = 0.13
        k = 0
        for label in ("qcow2py guest", "qcow2py host", "qemu-img"):
            for qd in QDS:
                vals = [result["shapes"][s]["readers"][label][f"{key}_qd{qd}"] for s in shapes]
                ax.bar(x + (k - 2.5) * w, vals, w, color=colors[label],
                       alpha=1.0 if qd == 1 else 0.55, hatch="" if qd == 1 else "//",
                       label=f"{label} QD{qd}", edgecolor="white", linewidth=0.3)
                k += 1
        floors = [visible_floor(result, s, key) for s in shapes]
        lowest = [min(r[f"{key}_qd{qd}"] for r in result["shapes"][s]["readers"].values()
                      for qd in QDS if f"{key}_qd{qd}" in r) for s in shapes]
        for s, fl, lo in zip(shapes, floors, lowest):
            if lo < fl * (1 - 1e-6):
                log(f"chart: a {key} bar of {s} ({lo:.4f} s) lies under its floor ({fl:.4f} s)")
        ax.hlines(floors, x - 3 * w, x + 3 * w, colors="black", linewidth=1.5,
                  label="floor: the bytes a copy must read, read sequentially")
        ax.set_xticks(x)
        ax.set_xticklabels(shapes)
        if log_scale:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, None)
        ax.set_ylabel("seconds")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Disk model: time to read the source when copying "
                 f"{size_label(result['size'])} fragmented images (modelled from real "
                 f"request traces, not measured on a disk)", fontsize=10)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


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
        try:
            from . import device
        except ImportError:              # run as a file
            from benchmarks import device
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
