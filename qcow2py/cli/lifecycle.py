"""``qcow2py compare|commit|rebase|measure|resize|snapshot|amend``.

qemu-img 7.2's syntax, messages and exit codes.

:func:`add_parsers` registers the subcommands on ``qcow2py``'s subparsers;
each ``run_*`` function returns the exit status.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ImageLockedError, Qcow2Error, ResizeError
from ..image import PREALLOCATION_MODES
from ..lazyimport import lazy_module
from ..opener import open as open_image
from ..report import qemu_json, snapshot_rows
from .options import parse_qemu_size

#: the engines, imported by the subcommand that runs them (not by ``qcow2py info``)
amending = lazy_module("qcow2py.jobs.amend")
committing = lazy_module("qcow2py.jobs.commit")
comparing = lazy_module("qcow2py.jobs.compare")
measuring = lazy_module("qcow2py.jobs.measure")
rebasing = lazy_module("qcow2py.jobs.rebase")

SHRINK_WARNING = ("warning: Shrinking an image will delete all data beyond the shrunken "
                  "image's end. Before performing such an operation, make sure there is no "
                  "important data there.")


def parse_resize(text: str, current: int) -> int:
    """``qemu-img resize``'s size argument: absolute, or ``+N``/``-N`` relative."""
    sign = text[:1] if text[:1] in "+-" else ""
    try:
        n = parse_qemu_size(text[1:] if sign else text)
    except ValueError:
        raise ResizeError("Parameter 'size' expects a non-negative number below 2^64\n"
                          "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                          "tera-, peta-\nand exabytes, respectively.") from None
    size = current + n if sign == "+" else current - n if sign == "-" else n
    if size < 0:
        raise ResizeError("New image size must be positive")
    return size


def _fail(cmd: str, msg: str, status: int = 1) -> int:
    print(f"qcow2py {cmd}: {msg}", file=sys.stderr)
    return status


def _say(args, line: str) -> None:
    if not getattr(args, "quiet", False):
        print(line)


def _one_line(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    def error(message: str):
        print(f"qcow2py {parser.prog.split()[-1]}: {message}", file=sys.stderr)
        sys.exit(1)
    parser.error = error
    return parser


# ------------------------------------------------------------------ compare
def run_compare(args) -> int:
    """Exit 0 identical, 1 different, 2 an image could not be opened, 4 a read failed."""
    try:
        a = open_image(args.filename1, format=args.f, force_share=args.force_share)
    except (Qcow2Error, OSError, ValueError) as e:
        return _fail("compare", f"Could not open '{args.filename1}': {e}", 2)
    try:
        try:
            b = open_image(args.filename2, format=args.F, force_share=args.force_share)
        except (Qcow2Error, OSError, ValueError) as e:
            return _fail("compare", f"Could not open '{args.filename2}': {e}", 2)
        with b:
            try:
                result = comparing.compare_nodes(a, b, strict=args.strict)
            except (Qcow2Error, OSError) as e:
                return _fail("compare", f"Error while reading: {e}", 4)
    finally:
        a.close()
    for line in result.messages():
        _say(args, line)
    return 0 if result.identical else 1


# ------------------------------------------------------------------ commit
class _Progress:
    """qemu-img's ``-p`` lines: ``    (NN.NN/100%)`` each ending in a carriage return."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.last = enabled, -1.0

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        if self.enabled and (pct - self.last >= 1.0 or (pct == 100.0 and self.last < 100.0)):
            self.last = pct
            sys.stdout.write(f"    ({pct:.2f}/100%)\r")
            sys.stdout.flush()

    def end(self) -> None:
        if self.enabled:
            self(1, 1)
            sys.stdout.write("\n")


def run_commit(args) -> int:
    progress = _Progress(args.progress and not args.quiet)
    try:
        committing.commit(args.filename, base=args.base, drop=args.drop, progress=progress,
               format=args.f)
    except FileNotFoundError as e:
        return _fail("commit", f"Could not open '{args.filename}': {e.strerror}")
    except (Qcow2Error, OSError, ValueError) as e:
        return _fail("commit", str(e))
    progress.end()
    _say(args, "Image committed.")
    return 0


# ------------------------------------------------------------------ rebase
def run_rebase(args) -> int:
    if args.backing is None and not args.unsafe:
        return _fail("rebase", "Must specify backing file (-b) or use unsafe mode (-u)")
    if args.backing is None:
        args.backing = ""
    progress = _Progress(args.progress and not args.quiet)
    try:
        rebasing.rebase(args.filename, args.backing, backing_format=args.F, unsafe=args.unsafe,
                        compress=args.compress, format=args.f, progress=progress,
                        force_share=args.force_share)
    except FileNotFoundError as e:
        return _fail("rebase", f"Could not open '{args.filename}': {e.strerror}")
    except (Qcow2Error, OSError, ValueError) as e:
        return _fail("rebase", str(e))
    progress.end()
    return 0


# ------------------------------------------------------------------ measure
_MEASURE_OPTIONS = {"cluster_size": "size", "refcount_bits": "int", "extended_l2": "bool",
                    "compat": "str", "preallocation": "str", "lazy_refcounts": "bool",
                    "backing_file": "str", "backing_fmt": "str", "data_file": "str",
                    "data_file_raw": "bool", "compression_type": "str", "size": "size",
                    "encryption": "bool"}


def measure_options(texts, keep_size: bool = False) -> dict:
    """``-o key=value,...`` of ``qemu-img measure``/``amend`` as keyword arguments of
    :func:`qcow2py.measure.measure` (",," stands for a comma in a value)."""
    out: dict = {}
    for text in texts or []:
        for item in text.replace(",,", "\0").split(","):
            key, eq, value = item.replace("\0", ",").partition("=")
            kind = _MEASURE_OPTIONS.get(key)
            if kind is None:
                raise ValueError(f"Invalid parameter '{key}'")
            if kind == "bool":
                if (value or "on") not in ("on", "off"):
                    raise ValueError(f"Parameter '{key}' expects 'on' or 'off'")
                out[key] = (value or "on") == "on"
            elif kind == "size":
                out[key] = parse_qemu_size(value)
            elif kind == "int":
                out[key] = int(value)
            else:
                out[key] = value
    if not keep_size:
        out.pop("size", None)      # qemu-img measure takes the size from --size or the file
    return out


def run_measure(args) -> int:
    try:
        opts = measure_options(args.o)
        size = None
        if args.size is not None:
            try:
                size = parse_qemu_size(args.size)
            except ValueError:
                return _fail("measure", "Invalid image size specified. Must be between 0 "
                                        "and 9223372036854775807.")
        result = measuring.measure(size, args.filename, format=args.O, source_format=args.f,
                                   force_share=args.force_share, **opts)
    except FileNotFoundError as e:
        return _fail("measure", f"Could not open '{args.filename}': {e.strerror}")
    except ImageLockedError as e:
        return _fail("measure", f"Could not open '{args.filename}': {e}")
    except (Qcow2Error, OSError, ValueError) as e:
        return _fail("measure", str(e))
    sys.stdout.write(qemu_json(result.to_json_dict()) + "\n" if args.output == "json"
                     else result.human())
    return 0


# ------------------------------------------------------------------ resize
def run_resize(args) -> int:
    prealloc = args.preallocation or "off"
    if prealloc not in PREALLOCATION_MODES:
        return _fail("resize", f"Invalid preallocation mode '{prealloc}'")
    try:
        with open_image(args.filename, "r+", format=args.f) as img:
            try:
                new_size = parse_resize(args.size, img.size)
                img.resize(new_size, shrink=args.shrink, preallocation=prealloc)
            except ResizeError as e:
                rc = _fail("resize", str(e))
                if "--shrink" in str(e):
                    print(f"qcow2py resize: {SHRINK_WARNING}", file=sys.stderr)
                return rc
    except FileNotFoundError as e:
        return _fail("resize", f"Could not open '{args.filename}': {e.strerror}")
    except (Qcow2Error, OSError, ValueError) as e:
        return _fail("resize", str(e))
    _say(args, "Image resized.")
    return 0


# ------------------------------------------------------------------ snapshot
def run_snapshot(args) -> int:
    acts = [(k, v) for k, v in (("c", args.create), ("a", args.apply), ("d", args.delete))
            if v is not None]
    if len(acts) + bool(args.list) > 1:
        return _fail("snapshot", "Cannot mix '-l', '-a', '-c', '-d'")
    try:
        with open_image(args.filename, "r" if not acts else "r+",
                        force_share=args.force_share) as img:
            if not acts:
                snaps = [s.info() for s in getattr(img, "snapshots", [])]
                if snaps:
                    _say(args, "Snapshot list:")
                    for row in snapshot_rows(snaps):
                        _say(args, row)
                return 0
            what, name = acts[0]
            try:
                {"c": img.create_snapshot, "a": img.apply_snapshot,
                 "d": img.delete_snapshot}[what](name)
            except Qcow2Error as e:
                msg = str(e)
                if what == "c" and not msg.startswith("Could not"):
                    msg = f"Could not create snapshot '{name}': {msg}"
                return _fail("snapshot", msg)
    except FileNotFoundError as e:
        return _fail("snapshot", f"Could not open '{args.filename}': {e.strerror}")
    except ImageLockedError as e:
        return _fail("snapshot", f"Could not open '{args.filename}': {e}")
    except (Qcow2Error, OSError, ValueError) as e:
        return _fail("snapshot", str(e))
    return 0


# ------------------------------------------------------------------ amend
def run_amend(args) -> int:
    if not args.o:
        return _fail("amend", "Must specify options (-o)")
    try:
        amending.amend(args.filename, format=args.f, **measure_options(args.o, keep_size=True))
    except FileNotFoundError as e:
        return _fail("amend", f"Could not open '{args.filename}': {e.strerror}")
    except (Qcow2Error, OSError, ValueError) as e:
        return _fail("amend", str(e))
    if args.progress and not args.quiet:
        sys.stdout.write("    (0.00/100%)\r    (100.00/100%)\r\n")
    return 0


def add_parsers(sub) -> None:
    """Add this module's subcommands to the ``qcow2py`` subparsers ``sub``."""
    fmts = ["qcow2", "raw"]
    c = _one_line(sub.add_parser(
        "compare", help="compare the guest content of two images (qemu-img compare)",
        usage="qcow2py compare [-f FMT] [-F FMT] [-p] [-q] [-s] [-U] FILENAME1 FILENAME2"))
    c.add_argument("-f", metavar="FMT", choices=fmts, help="format of FILENAME1")
    c.add_argument("-F", metavar="FMT", choices=fmts, help="format of FILENAME2")
    c.add_argument("-s", dest="strict", action="store_true",
                   help="strict: allocation must match too, and sizes must be equal")
    c.add_argument("-q", "--quiet", action="store_true")
    c.add_argument("-p", dest="progress", action="store_true", help="accepted, ignored")
    c.add_argument("-U", "--force-share", action="store_true",
                   help="accepted for compatibility (qcow2py takes no read lock)")
    c.add_argument("-T", dest="cache", help="accepted for compatibility, ignored")
    c.add_argument("filename1")
    c.add_argument("filename2")
    c.set_defaults(func=run_compare)

    m = _one_line(sub.add_parser(
        "commit", help="commit an overlay into its base (qemu-img commit)",
        usage="qcow2py commit [-q] [-f FMT] [-b BASE] [-d] [-p] FILENAME"))
    m.add_argument("-f", metavar="FMT", choices=fmts, help="format of FILENAME")
    m.add_argument("-b", dest="base", metavar="BASE",
                   help="commit into this image of the chain (implies -d)")
    m.add_argument("-d", dest="drop", action="store_true",
                   help="keep the overlay's data (do not empty it)")
    m.add_argument("-p", dest="progress", action="store_true", help="show progress")
    m.add_argument("-q", "--quiet", action="store_true")
    m.add_argument("-t", dest="cache", help="accepted for compatibility, ignored")
    m.add_argument("-r", dest="rate_limit", help="accepted for compatibility, ignored")
    m.add_argument("--object", action="append", help="accepted for compatibility, ignored")
    m.add_argument("filename")
    m.set_defaults(func=run_commit)

    r = _one_line(sub.add_parser(
        "rebase", help="change the backing file of an image (qemu-img rebase)",
        usage="qcow2py rebase [-q] [-f FMT] [-p] [-u | -c] -b BACKING_FILE [-F BACKING_FMT] "
              "FILENAME"))
    r.add_argument("-f", metavar="FMT", choices=["qcow2"], help="format of FILENAME")
    r.add_argument("-b", dest="backing", metavar="BACKING_FILE",
                   help='the new backing file ("" for none: the image is flattened)')
    r.add_argument("-F", metavar="BACKING_FMT", choices=fmts)
    r.add_argument("-u", dest="unsafe", action="store_true",
                   help="only rewrite the header (the old backing file is not opened)")
    r.add_argument("-c", dest="compress", action="store_true",
                   help="write the copied clusters compressed (qemu-img 8.2's rebase -c)")
    r.add_argument("-p", dest="progress", action="store_true", help="show progress")
    r.add_argument("-q", "--quiet", action="store_true")
    r.add_argument("-t", dest="cache", help="accepted for compatibility, ignored")
    r.add_argument("-T", dest="src_cache", help="accepted for compatibility, ignored")
    r.add_argument("-U", "--force-share", action="store_true",
                   help="read the old and new backing files without keeping others from "
                        "writing them")
    r.add_argument("--object", action="append", help="accepted for compatibility, ignored")
    r.add_argument("filename")
    r.set_defaults(func=run_rebase)

    e = _one_line(sub.add_parser(
        "measure", help="size a new image would take (qemu-img measure)",
        usage="qcow2py measure [--output=human|json] [-O FMT] [-o OPTIONS] "
              "[--size N | [-f FMT] FILENAME]"))
    e.add_argument("--output", choices=["human", "json"], default="human")
    e.add_argument("-O", metavar="FMT", choices=fmts, default="raw",
                   help="output format (default raw, as qemu-img)")
    e.add_argument("-o", action="append", metavar="OPTIONS",
                   help="create options: cluster_size, refcount_bits, extended_l2, compat, "
                        "preallocation (others accepted and ignored)")
    e.add_argument("--size", metavar="N", help="virtual size of a new image")
    e.add_argument("-f", metavar="FMT", choices=fmts, help="format of FILENAME")
    e.add_argument("-U", "--force-share", action="store_true",
                   help="open the source without keeping others from writing it")
    e.add_argument("--object", action="append", help="accepted for compatibility, ignored")
    e.add_argument("filename", nargs="?")
    e.set_defaults(func=run_measure)

    z = _one_line(sub.add_parser(
        "resize", help="change the virtual size of an image (qemu-img resize)",
        usage="qcow2py resize [-f FMT] [--preallocation=PREALLOC] [-q] [--shrink] FILENAME "
              "[+ | -]SIZE   (a negative SIZE after --)"))
    z.add_argument("-f", metavar="FMT", choices=fmts, help="format of FILENAME")
    z.add_argument("--preallocation", metavar="PREALLOC",
                   help="off, metadata, falloc or full (a grow only)")
    z.add_argument("--shrink", action="store_true", help="allow making the image smaller")
    z.add_argument("-q", "--quiet", action="store_true")
    z.add_argument("--object", action="append", help="accepted for compatibility, ignored")
    z.add_argument("filename")
    z.add_argument("size", help="new size, or +N / -N relative (k, M, G, T, P, E suffixes)")
    z.set_defaults(func=run_resize)

    n = _one_line(sub.add_parser(
        "snapshot", help="list, create, apply or delete internal snapshots (qemu-img snapshot)",
        usage="qcow2py snapshot [-q] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILENAME"))
    n.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    n.add_argument("-c", dest="create", metavar="SNAPSHOT", help="create a snapshot")
    n.add_argument("-a", dest="apply", metavar="SNAPSHOT", help="revert to a snapshot")
    n.add_argument("-d", dest="delete", metavar="SNAPSHOT", help="delete a snapshot")
    n.add_argument("-q", "--quiet", action="store_true")
    n.add_argument("-U", "--force-share", action="store_true",
                   help="list without keeping others from writing the image (-l only)")
    n.add_argument("--object", action="append", help="accepted for compatibility, ignored")
    n.add_argument("filename")
    n.set_defaults(func=run_snapshot)

    a = _one_line(sub.add_parser(
        "amend", help="change format options of an image (qemu-img amend)",
        usage="qcow2py amend [-p] [-q] [-f FMT] -o OPTIONS FILENAME"))
    a.add_argument("-o", action="append", metavar="OPTIONS",
                   help="compat=0.10|1.1, lazy_refcounts=on|off, refcount_bits=1..64")
    a.add_argument("-f", metavar="FMT", choices=["qcow2"], help="format of FILENAME")
    a.add_argument("-p", dest="progress", action="store_true", help="show progress")
    a.add_argument("-q", "--quiet", action="store_true")
    a.add_argument("-t", dest="cache", help="accepted for compatibility, ignored")
    a.add_argument("--force", action="store_true", help="accepted for compatibility")
    a.add_argument("--object", action="append", help="accepted for compatibility, ignored")
    a.add_argument("filename")
    a.set_defaults(func=run_amend)
