"""``qcow2py backup``: a push backup of a disk through fleecing.

``qcow2py backup --temp TEMP [--bitmap NAME] [--ram-cache SIZE]
[--order priority|host|guest] [--no-discard-source] [-O qcow2|raw] [-p] DISK TARGET``

The disk is opened read-write (so nothing else may be writing it), fleeced
into TEMP and the snapshot pushed to TARGET: the same code path an NBD
server runs while guests write.  Errors are worded as qemu-img words them;
the exit status is 0 or 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from .options import parse_size
from ..errors import Qcow2Error
from ..opener import open as open_image
from ..lazyimport import lazy_module

#: the backup engine, imported when ``qcow2py backup`` runs (building the parser for
#: another command must not import it, nor numpy)
backup_engine = lazy_module("qcow2py.jobs.backup")
push_orders = lazy_module("qcow2py.jobs.backup.push")


class _Orders:
    """The push orders for argparse's ``choices``, looked up when argparse first
    looks at them."""

    def __contains__(self, value) -> bool:
        return value in push_orders.ORDERS

    def __iter__(self):
        return iter(push_orders.ORDERS)


ORDERS = _Orders()


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``backup`` subcommand to an argparse subparsers object."""
    b = subparsers.add_parser(
        "backup", help="push backup of a disk through fleecing (copy-before-write to a "
                       "temp image, point-in-time snapshot pushed to the target)",
        usage="qcow2py backup --temp TEMP [--bitmap NAME] [--ram-cache SIZE] "
              "[--order priority|host|guest] [--no-discard-source] [-O qcow2|raw] [-p] "
              "DISK TARGET")
    b.add_argument("--temp", required=True, help="the temp qcow2 for copied-before-write "
                   "data (created; removed at the end)")
    b.add_argument("--bitmap", metavar="NAME", help="back up only the clusters this bitmap "
                   "of DISK marks dirty (incremental)")
    b.add_argument("--ram-cache", default="0", metavar="SIZE",
                   help="RAM for copied-before-write data before it spills to TEMP "
                        "(e.g. 256M; default 0)")
    b.add_argument("--order", choices=ORDERS, default="priority", metavar="ORDER",
                   help="read order: priority (RAM, then disk, then temp; the default), "
                        "host or guest")
    b.add_argument("--no-discard-source", dest="discard_source", action="store_false",
                   help="keep pushed data in TEMP (by default each pushed cluster is "
                        "discarded from the snapshot at once)")
    b.add_argument("-O", dest="out_fmt", choices=["qcow2", "raw"], default="qcow2",
                   help="target format (default qcow2)")
    b.add_argument("-f", dest="fmt", choices=["qcow2", "raw"], help="disk format (probed)")
    b.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    b.add_argument("disk", metavar="DISK")
    b.add_argument("target", metavar="TARGET")
    b.set_defaults(func=run)

    def error(message: str):            # usage errors: one line, status 1 (as qemu-img)
        print(f"qcow2py backup: {message}", file=sys.stderr)
        sys.exit(1)
    b.error = error
    return b


def _fail(msg: str) -> int:
    print(f"qcow2py backup: {msg}", file=sys.stderr)
    return 1


def run(args) -> int:
    """Run a parsed ``backup`` command; returns the exit status."""
    try:
        ram = parse_size(args.ram_cache)
    except ValueError:
        return _fail(f"Invalid RAM cache size '{args.ram_cache}'")
    for path in (args.temp, args.target):
        if os.path.exists(path):
            return _fail(f"Could not create '{path}': File exists")
    try:
        disk = open_image(args.disk, "r+", format=args.fmt)
    except FileNotFoundError:
        return _fail(f"Could not open '{args.disk}': No such file or directory")
    except (Qcow2Error, OSError, ValueError) as e:
        return _fail(f"Could not open '{args.disk}': {_reason(e)}")
    created = False
    bar = None
    try:
        with disk, backup_engine.fleece(disk, args.temp, bitmap=args.bitmap, ram_cache=ram) as fl:
            progress = None
            if args.progress:
                from tqdm import tqdm
                bar = tqdm(total=100, unit="%", file=sys.stderr, leave=False,
                           bar_format="    ({percentage:3.2f}/100%)")

                def progress(done: int, total: int) -> None:
                    bar.n = 100.0 * done / total if total else 100.0
                    bar.refresh()
            created = True
            backup_engine.push(fl.snapshot, args.target, target_format=args.out_fmt, order=args.order,
                 discard_source=args.discard_source, progress=progress)
    except KeyboardInterrupt:
        _remove(args.target if created else None)
        return _fail("interrupted")
    except (Qcow2Error, OSError, ValueError) as e:
        _remove(args.target if created else None)
        return _fail(_reason(e))
    finally:
        if bar is not None:
            bar.close()
    return 0


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


def _remove(path) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass
