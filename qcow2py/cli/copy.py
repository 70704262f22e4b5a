"""``qcow2py-copy``: image conversion with qemu-img convert's options, reading in host order."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from ..errors import Qcow2Error
from ..jobs.blockcopy import BlockCopy, ORDERS
from ..opener import CreateError, create
from ..pipes import quiet_broken_pipe
from ..version import __version__
from . import refusals
from .options import CREATE_OPTIONS, OptionError, parse_options, parse_size

#: qemu-img's cache modes (-t, -T)
CACHE_CHOICES = ["unsafe", "writeback", "none", "directsync", "writethrough"]

#: the -o keys qcow2py-copy takes (the target's size is the source's)
_CREATE_KINDS = {k: v for k, v in CREATE_OPTIONS["qcow2"].items() if k != "size"}


def parse_create_options(text: Optional[str], fmt: str = "qcow2") -> dict:
    """``-o key=value,key=value`` into create() keyword arguments (a raw
    output takes only preallocation, as qemu-img)."""
    if not text:
        return {}
    kinds = _CREATE_KINDS if fmt != "raw" else \
        {k: v for k, v in CREATE_OPTIONS["raw"].items() if k != "size"}
    try:
        parsed = parse_options([text], kinds)
    except OptionError as e:
        raise CreateError(str(e)) from None
    out = {key: value for key, (value, _text) in parsed.items()}
    if "backing_fmt" in out:
        out["backing_format"] = out.pop("backing_fmt")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcow2py-copy",
        description="Convert/copy a disk image (qcow2 or raw), reading the source in the "
                    "order its clusters lie on disk. Options as qemu-img convert.")
    p.add_argument("--version", action="version", version=f"qcow2py-copy {__version__}")
    p.add_argument("-f", dest="src_fmt", choices=["qcow2", "raw"], help="source format (probed)")
    p.add_argument("-O", dest="out_fmt", choices=["qcow2", "raw"], default="raw",
                   help="output format (default raw)")
    p.add_argument("-o", dest="options", help="create options, e.g. cluster_size=64k,compat=1.1")
    p.add_argument("-B", dest="backing", help="backing file of the output: copy only the "
                   "source's top layer")
    p.add_argument("-F", dest="backing_fmt", choices=["qcow2", "raw"], help="backing file format")
    p.add_argument("-c", dest="compress", action="store_true", help="compressed output")
    p.add_argument("-S", dest="sparse", default="4k",
                   help="minimum run of zeros left sparse (default 4k; 0: fully allocate)")
    p.add_argument("-n", dest="no_create", action="store_true",
                   help="write into an existing target instead of creating it")
    p.add_argument("--target-is-zero", action="store_true",
                   help="with -n: the target reads as zeros already")
    p.add_argument("-m", dest="workers", type=int, default=2, help="parallel copy workers")
    p.add_argument("--memory", default="128M",
                   help="buffer memory for the copy (default 128M; larger batches write the "
                        "target in longer runs)")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-t", dest="cache", default="unsafe", choices=CACHE_CHOICES,
                   help="target cache mode, as qemu-img: 'unsafe' (the default) skips fsync; "
                        "'writeback' page cache + fsync at the end; 'none' O_DIRECT + fsync; "
                        "'directsync' O_DIRECT + O_DSYNC; 'writethrough' O_DSYNC")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT_PARAM",
                   help="copy an internal snapshot: snapshot.name=NAME, snapshot.id=ID or NAME")
    p.add_argument("-T", dest="src_cache", default="writeback", choices=CACHE_CHOICES,
                   help="source cache mode: 'none' or 'directsync' read with O_DIRECT "
                        "(bypassing the page cache), the others through it")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the source without keeping others from writing it")
    p.add_argument("--order", choices=ORDERS, default="auto",
                   help="read order: host (front to back per file), guest, or auto")
    p.add_argument("--bitmap", help="copy only clusters dirty in this persistent bitmap of "
                   "the source (incremental backup onto an existing target with -n)")
    p.add_argument("--bitmaps", action="store_true", help="copy the persistent bitmaps of the "
                   "source's top layer to the (qcow2) target, as qemu-img convert --bitmaps")
    p.add_argument("--skip-broken-bitmaps", action="store_true",
                   help="with --bitmaps: skip inconsistent bitmaps instead of failing")
    p.add_argument("--stats", nargs="?", const="text", choices=["text", "json"],
                   help="print what was read, in how many requests, how many backward seeks")
    p.add_argument("source")
    p.add_argument("target")
    return p


def _fail(msg: str) -> int:
    print(f"qcow2py-copy: {msg}", file=sys.stderr)
    return 1


def main(argv: Optional[List[str]] = None) -> int:
    with quiet_broken_pipe():           # "| head": silent, as qemu-img
        return _main(argv)


def _main(argv: Optional[List[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # "--stats" alone must not swallow the next argument: only "--stats=json" takes a value
    argv = ["--stats=text" if a == "--stats" else a for a in argv]
    args = build_parser().parse_args(argv)
    try:
        sparse = parse_size(args.sparse)
    except ValueError:
        sparse = -1
    if sparse < 0 or sparse % 512 or sparse > (16 << 20):
        return _fail("Invalid buffer size for sparse output specified. Valid sizes are multiples "
                     "of 512 up to 16777216. Select 0 to disable sparse detection (fully "
                     "allocates output).")
    if args.target_is_zero and not args.no_create:
        return _fail("--target-is-zero requires use of -n flag")
    if args.no_create and args.options:
        return _fail("-o has no effect when skipping image creation")
    if args.compress and args.out_fmt != "qcow2":
        return _fail("Compression not supported for this file format")
    if args.compress and sparse == 0:
        return _fail("Cannot enable compression and disable sparse detection at the same time"
                     " (-c and -S 0)")
    if args.skip_broken_bitmaps and not args.bitmaps:
        return _fail("Use of --skip-broken-bitmaps requires --bitmaps")
    if args.workers < 1 or args.workers > 16:
        return _fail("Invalid number of coroutines. Allowed number of coroutines is between "
                     "1 and 16")
    created = False
    try:
        opts = parse_create_options(args.options, args.out_fmt)
        refused = refusals.before_create(args, opts)
        if refused:
            return _fail(refused)
        snap = args.snapshot
        if snap is not None:
            snap = snap.split("=", 1)[1] if snap.startswith(("snapshot.name=",
                                                               "snapshot.id=")) else snap
        with refusals.open_source(args.source, args.src_fmt, snapshot=snap,
                                  force_share=args.force_share, cache=args.src_cache) as src:
            if args.bitmaps or args.bitmap:
                if not hasattr(src, "find_bitmap"):
                    return _fail("Source lacks bitmap support")
            if args.bitmaps:
                for bm in reversed(src.bitmaps):          # QEMU's order (newest first)
                    if not bm.inconsistent:
                        continue
                    if not args.skip_broken_bitmaps:
                        return _fail(f"Cannot copy inconsistent bitmap '{bm.name}'\nTry "
                                     f"--skip-broken-bitmaps, or use 'qemu-img bitmap "
                                     f"--remove' to delete it")
                    print(f"qcow2py-copy: warning: Skipping inconsistent bitmap '{bm.name}'",
                          file=sys.stderr)
            dirty = None
            if args.bitmap:
                bm = src.find_bitmap(args.bitmap)
                dirty = (bm.bits, bm.granularity)
            if args.no_create:
                tgt = refusals.open_target(args.target, args.out_fmt, args.cache)
                if tgt.size < src.size:
                    tgt.close()
                    return _fail("output file is smaller than input file")
                if args.target_is_zero and tgt.backing is not None:
                    tgt.close()
                    return _fail("--target-is-zero cannot be used with a target that has a "
                                 "backing file")
            else:
                if os.path.exists(args.target):
                    return _fail(f"target {args.target!r} exists; use -n to write into it, or "
                                 f"remove it first")
                if args.backing:
                    opts["backing_file"] = args.backing
                if args.backing_fmt:
                    opts["backing_format"] = args.backing_fmt
                with refusals.creating(args.target, args.out_fmt):
                    tgt = create(args.target, src.size, format=args.out_fmt,
                                 cache=args.cache, **opts)
                created = True
            if args.bitmaps and not (hasattr(tgt, "add_bitmap") and tgt.header.version >= 3):
                tgt.close()
                raise Qcow2Error(f"Format driver '{tgt.format}' does not support bitmaps")
            depth = 1 if (args.backing or opts.get("backing_file")) else None
            bar = None
            progress = None
            if args.progress and not args.quiet:
                from tqdm import tqdm
                bar = tqdm(total=100, unit="%", file=sys.stderr, leave=False,
                           bar_format="    ({percentage:3.2f}/100%)")

                def progress(done: int, total: int) -> None:
                    bar.n = 100.0 * done / total if total else 100.0
                    bar.refresh()
            try:
                job = BlockCopy(src, tgt, order=args.order, sparse_size=sparse,
                                memory_limit=parse_size(args.memory),
                                compress=args.compress,
                                workers=args.workers, progress=progress, base_depth=depth,
                                target_is_zero=not args.no_create or args.target_is_zero,
                                bitmap=dirty[0] if dirty else None,
                                bitmap_granularity=dirty[1] if dirty else 65536)
                stats = job.run()
                if args.bitmaps:
                    _copy_bitmaps(src, tgt)
            finally:
                if bar is not None:
                    bar.close()
                tgt.close()
    except KeyboardInterrupt:
        if created:
            _remove(args.target)
        return _fail("interrupted")
    except (Qcow2Error, OSError, ValueError) as e:
        if created:
            _remove(args.target)
        return _fail(str(e))
    if args.stats == "json":
        print(json.dumps(stats.as_dict(), sort_keys=True))
    elif args.stats:
        d = stats.as_dict()
        print(f"order {d['order']}: read {d['bytes_read']} bytes in {d['read_requests']} "
              f"requests, {d['backward_seeks']} backward seeks (guest order: "
              f"{d['guest_order_backward_seeks']}); wrote {d['bytes_written']} bytes, "
              f"{d['bytes_zero']} zero bytes; {d['seconds']:.3f} s")
    return 0


def _copy_bitmaps(src, tgt) -> None:
    """The source's consistent bitmaps into the target, as qemu-img convert --bitmaps
    (after the data, so that the copy itself dirties nothing)."""
    for bm in reversed(src.bitmaps):      # QEMU's order; the target stores them in source order
        if bm.inconsistent:
            continue
        try:
            new = tgt.add_bitmap(bm.name, bm.granularity, enabled=bm.enabled)
        except Qcow2Error as e:
            raise Qcow2Error(f"Failed to create bitmap {bm.name}: {e}") from None
        try:
            new.merge_from(bm)
        except Qcow2Error as e:
            raise Qcow2Error(f"Failed to populate bitmap {bm.name}: {e}") from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
