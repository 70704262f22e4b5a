"""The ``qcow2py`` command: qemu-img's syntax for the subcommands it shares."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from ..errors import BitmapError, ForceShareError, ImageLockedError, Qcow2Error
from ..opener import check_path, create_file, open as open_image
from ..qcow2.read import Qcow2Image
from ..report import map_human, map_json, qemu_json, snapshot_rows
from ..version import __version__
from .backup import add_parser as add_backup_parser
from .options import CREATE_OPTIONS, OptionError, parse_options, parse_qemu_size, parse_size
from ..native import HAVE_NATIVE, USE_NATIVE
from ..pipes import quiet_broken_pipe
from ..lazyimport import lazy_module
from . import lifecycle

#: imported by the command that uses it (not by qcow2py info)
checking = lazy_module("qcow2py.qcow2.check")


def _human_size(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    v, i = float(n), 0
    while v >= 1024 and i < len(units) - 1:
        v, i = v / 1024, i + 1
    if i == 0:
        return f"{n} B"
    return f"{v:.3g} {units[i]}"


def _info_human(info: dict) -> str:
    lines = [f"image: {info['filename']}", f"file format: {info['format']}",
             f"virtual size: {_human_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {_human_size(info['actual-size'])}"]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        lines.append(f"backing file: {info['backing-filename']}")
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines += snapshot_rows(info["snapshots"])
    spec = info.get("format-specific")
    if spec:
        lines.append("Format specific information:")
        # qemu-img prints these keys in its QDict's order, as in the JSON output
        for k, v in json.loads(qemu_json(spec["data"])).items():
            if k == "bitmaps":
                lines.append("    bitmaps:")
                for i, b in enumerate(v):
                    lines.append(f"        [{i}]:")
                    lines.append("            flags:")
                    for j, f in enumerate(b["flags"]):
                        lines.append(f"                [{j}]: {f}")
                    lines.append(f"            name: {b['name']}")
                    lines.append(f"            granularity: {b['granularity']}")
            else:
                val = str(v).lower() if isinstance(v, bool) else v
                lines.append(f"    {k.replace('-', ' ')}: {val}")
    return "\n".join(lines) + "\n"


def _cmd_info(args) -> int:
    # like qemu-img, plain info opens the image alone: its backing and data files
    # may be missing (or named by a protocol qcow2py refuses) without harm
    with open_image(args.filename, format=args.f, chain=args.backing_chain,
                    force_share=args.force_share) as img:
        if args.backing_chain:
            infos = img.info(backing_chain=True)
            if args.output == "json":
                sys.stdout.write(qemu_json(infos) + "\n")
            else:
                sys.stdout.write("\n".join(_info_human(i) for i in infos))
        else:
            info = img.info()
            sys.stdout.write(qemu_json(info) + "\n" if args.output == "json"
                             else _info_human(info))
    return 0


def _cmd_map(args) -> int:
    with open_image(args.filename, format=args.f, force_share=args.force_share) as img:
        start = args.start_offset
        entries = img.map(start, args.max_length)
        if args.output == "json":
            sys.stdout.write(map_json(entries))
        else:
            sys.stdout.write(map_human(img, entries))
    return 0


def _cmd_check(args) -> int:
    try:
        res = check_path(args.filename, args.f, args.repair, force_share=args.force_share)
    except checking.NotQcow2:
        print("qcow2py: This image format does not support checks", file=sys.stderr)
        return 63
    except (ImageLockedError, ForceShareError):
        raise                               # main() words them as qemu-img
    except Qcow2Error as e:
        print(f"qcow2py: Check failed: {e}", file=sys.stderr)
        return 1
    for m in res.messages:                  # qemu-img prints them in both formats
        print(m, file=sys.stderr)
    if res.messages_dropped:
        print(f"({res.messages_dropped} more messages left out)", file=sys.stderr)
    if args.output == "json":
        sys.stdout.write(qemu_json(res.to_json_dict()) + "\n")
    else:
        out = []
        if res.leaks_fixed or res.corruptions_fixed:
            out.append(f"The following inconsistencies were found and repaired:\n\n"
                       f"    {res.leaks_fixed} leaked clusters\n"
                       f"    {res.corruptions_fixed} corruptions\n\n"
                       f"Double checking the fixed image now...")
        if res.corruptions:
            out.append(f"\n{res.corruptions} errors were found on the image.\nData may be "
                       f"corrupted, or further writes to the image may corrupt it.")
        if res.leaks:
            out.append(f"\n{res.leaks} leaked clusters were found on the image.\nThis means "
                       f"waste of disk space, but no harm to data.")
        if not res.corruptions and not res.leaks and not res.check_errors:
            out.append("No errors were found on the image.")
        t = res.total_clusters or 1
        out.append(f"{res.allocated_clusters}/{res.total_clusters} = "
                   f"{100 * res.allocated_clusters / t:.2f}% allocated, "
                   f"{100 * res.fragmented_clusters / max(res.allocated_clusters, 1):.2f}% "
                   f"fragmented, {100 * res.compressed_clusters / max(res.allocated_clusters, 1):.2f}% "
                   f"compressed clusters")
        out.append(f"Image end offset: {res.image_end_offset}")
        print("\n".join(out))
    return res.exit_code


class _BitmapAction(argparse.Action):
    """Collects --add/--remove/... in command-line order (qemu-img applies them so)."""

    def __call__(self, parser, namespace, values, option_string=None):
        actions = list(getattr(namespace, "actions", None) or [])
        actions.append((self.const, values))
        namespace.actions = actions


_GRANULARITY_HELP = ("Invalid granularity specified. You may use k, M, G, T, P or E suffixes "
                     "for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")


def _bitmap_fail(msg: str) -> int:
    for line in msg.split("\n"):
        print(f"qcow2py: {line}", file=sys.stderr)
    return 1


def _open_for_bitmap(name: str, mode: str, fmt: Optional[str]):
    try:
        return open_image(name, mode, format=fmt)
    except FileNotFoundError:
        raise _OpenError(f"Could not open '{name}': Could not open '{name}': No such file or "
                         f"directory") from None
    except (Qcow2Error, OSError, ValueError) as e:
        raise _OpenError(f"Could not open '{name}': {e}") from None


class _OpenError(Exception):
    pass


def _cmd_bitmap(args) -> int:
    actions = args.actions or []
    ops = [op for op, _ in actions]
    if not actions:
        return _bitmap_fail("Need at least one of --add, --remove, --clear, --enable, "
                            "--disable, or --merge")
    granularity = None
    if args.granularity is not None:
        try:
            granularity = parse_size(args.granularity)
        except ValueError:
            return _bitmap_fail(_GRANULARITY_HELP)
        if "add" not in ops:
            return _bitmap_fail("granularity only supported with --add")
    if args.source_fmt and not args.source_file:
        return _bitmap_fail("-F only supported with -b")
    if args.source_file and "merge" not in ops:
        return _bitmap_fail("Merge bitmap source file only supported with --merge")
    if len(args.names) != 2:
        return _bitmap_fail("Expecting filename and bitmap name")
    filename, name = args.names
    try:
        img = _open_for_bitmap(filename, "r+", args.f)
    except _OpenError as e:
        return _bitmap_fail(str(e))
    rc = 0
    try:
        for op, value in actions:
            try:
                if not isinstance(img, Qcow2Image):
                    if op == "add":
                        raise BitmapError(f"Can't store persistent bitmaps to '{filename}': "
                                          f"Operation not supported")
                    raise BitmapError(f"Dirty bitmap '{value if op == 'merge' else name}' "
                                      f"not found")
                if op == "add":
                    # qemu-img hands the size over as a 32-bit value; 0 means the default
                    g = granularity & 0xFFFFFFFF if granularity else None
                    img.add_bitmap(name, g, enabled=True)
                elif op == "remove":
                    img.remove_bitmap(name)
                elif op == "merge":
                    _merge(img, name, value, args.source_file, args.source_fmt)
                else:
                    bm = img.find_bitmap(name)
                    getattr(bm, op)()
            except _OpenError as e:
                rc = _bitmap_fail(str(e))
                break
            except (Qcow2Error, ValueError) as e:
                rc = _bitmap_fail(f"Operation {op} on bitmap {name} failed: {e}")
                hint = getattr(e, "hint", None)
                if hint:
                    print(hint, file=sys.stderr)
                break
    finally:
        img.close()
    return rc


def _merge(img, name: str, source: str, source_file: Optional[str],
           source_fmt: Optional[str]) -> None:
    dest = img.find_bitmap(name)
    dest.check_modifiable()            # QEMU checks the destination first
    if source_file is None:
        dest.merge_from(img.find_bitmap(source))
        return
    with _open_for_bitmap(source_file, "r", source_fmt) as src:
        if not hasattr(src, "find_bitmap"):
            raise BitmapError(f"Dirty bitmap '{source}' not found")
        dest.merge_from(src.find_bitmap(source))


# ------------------------------------------------------------------ create
class _CreateFailure(Exception):
    """A create error: one line on stderr."""


_SIZE_HELP = ("Invalid image size specified. You may use k, M, G, T, P or E suffixes for "
              "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
_INT64_MAX = (1 << 63) - 1
#: the order in which qemu-img prints the options it formats with
_QCOW2_LINE = ("cluster_size", "extended_l2", "preallocation", "compression_type", "size",
               "compat", "backing_file", "backing_fmt", "data_file", "data_file_raw",
               "lazy_refcounts", "refcount_bits")
_QCOW2_DEFAULTS = {"cluster_size": 65536, "extended_l2": "off", "compression_type": "zlib",
                   "lazy_refcounts": "off", "refcount_bits": 16}


def _create_options(fmt: str, texts: List[str], name: str) -> dict:
    """-o lists into {option: (parsed value, text to print)}, later ones winning."""
    try:
        return parse_options(texts, CREATE_OPTIONS[fmt], name)
    except OptionError as e:
        raise _CreateFailure(str(e)) from None


def _cmd_create(args) -> int:
    try:
        return _create(args)
    except _CreateFailure as e:
        print(f"qcow2py: {e}", file=sys.stderr)
        return 1


def _create(args) -> int:
    name, fmt = args.filename, args.f or "raw"
    if fmt not in CREATE_OPTIONS:
        raise _CreateFailure(f"Unknown file format '{fmt}' (qcow2py creates qcow2 and raw)")
    if any(t.strip() in ("help", "?") for t in args.o or []):
        print(f"Supported {fmt} options:")
        for key in sorted(CREATE_OPTIONS[fmt]):
            print(f"  {key}=<{CREATE_OPTIONS[fmt][key]}>")
        return 0
    if name is None:
        raise _CreateFailure("Expecting image file name")
    opts = _create_options(fmt, args.o or [], name)
    if args.backing is not None:
        opts["backing_file"] = (args.backing, args.backing)
    if args.backing_fmt is not None:
        opts["backing_fmt"] = (args.backing_fmt, args.backing_fmt)
    size = None
    if args.size is not None:
        if "size" in opts:
            raise _CreateFailure(f"{name}: The image size must be specified only once")
        try:
            size = parse_qemu_size(args.size)
        except ValueError:
            raise _CreateFailure(_SIZE_HELP) from None
        if size > _INT64_MAX:
            raise _CreateFailure(f"Invalid image size specified. Must be between 0 and "
                                 f"{_INT64_MAX}.")
    elif "size" in opts:
        size = opts.pop("size")[0]
    backing = opts.get("backing_file", (None,))[0]
    backing_fmt = opts.get("backing_fmt", (None,))[0]
    if backing is not None:
        if fmt == "raw":
            raise _CreateFailure(f"{name}: Backing file not supported for file format 'raw'")
        if backing_fmt is None:
            raise _CreateFailure(f"{name}: Backing file specified without backing format")
        if not args.unsafe:
            # the backing file must open (and gives the size when none was given)
            path = backing if os.path.isabs(backing) else \
                os.path.join(os.path.dirname(name), backing)
            try:
                with open_image(path, format=backing_fmt) as b:
                    if size is None:
                        size = b.size
            except FileNotFoundError:
                raise _CreateFailure(f"{name}: Could not open '{path}': No such file or "
                                     f"directory") from None
            except (Qcow2Error, OSError, ValueError) as e:
                raise _CreateFailure(f"{name}: Could not open backing image '{path}': "
                                     f"{e}") from None
    if size is None:
        raise _CreateFailure(f"{name}: Image creation needs a size parameter")
    if not args.quiet:
        shown = {k: v[1] for k, v in opts.items()}
        shown["size"] = str(size)
        if fmt == "raw":
            keys, defaults = ("size", "preallocation"), {}
        else:
            keys, defaults = _QCOW2_LINE, _QCOW2_DEFAULTS
        words = [f"{k}={shown.get(k, defaults.get(k))}" for k in keys
                 if k in shown or k in defaults]
        print(f"Formatting '{name}', fmt={fmt} " + " ".join(words), flush=True)
    kw = {("backing_format" if k == "backing_fmt" else k): v[0] for k, v in opts.items()}
    try:
        create_file(name, size, format=fmt, **kw)
    except (Qcow2Error, OSError, ValueError) as e:
        msg = str(e)
        if isinstance(e, OSError) and e.strerror:
            msg = e.strerror
        raise _CreateFailure(msg if msg.startswith(f"{name}:") else f"{name}: {msg}") from None
    return 0


class _Version(argparse.Action):
    """``--version``, saying whether the C hot path or the pure-Python twins run
    (an install without a C compiler falls back to the twins)."""

    def __call__(self, parser, namespace, values, option_string=None):
        mode = ("C extension" if USE_NATIVE else
                "pure-Python twins: QCOW2PY_PURE is set" if HAVE_NATIVE
                else "pure-Python twins: the C extension was not built")
        parser.exit(message=f"qcow2py {__version__} ({mode})\n")


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Usage errors as one line on stderr and exit status 1 (as qemu-img)."""
    def error(message: str):
        print(f"qcow2py {parser.prog.split()[-1]}: {message}", file=sys.stderr)
        sys.exit(1)
    parser.error = error
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcow2py", description="qcow2 image tool "
                                "(qemu-img compatible where the subcommands overlap)")
    p.add_argument("--version", action=_Version, nargs=0,
                   help="show the version and whether the C extension is in use")
    sub = p.add_subparsers(dest="command", required=True)

    cr = _one_line_errors(sub.add_parser(
        "create", help="create a qcow2 or raw image (qemu-img create)",
        usage="qcow2py create [-q] [-f FMT] [-b BACKING_FILE [-F BACKING_FMT]] [-u] "
              "[-o OPTIONS] FILENAME [SIZE]"))
    cr.add_argument("-f", metavar="FMT", help="qcow2 or raw (default raw, as qemu-img)")
    cr.add_argument("-o", action="append", metavar="OPTIONS",
                    help="key=value,... (cluster_size, compat, refcount_bits, "
                         "lazy_refcounts, extended_l2, compression_type, preallocation, "
                         "backing_file, backing_fmt, data_file, data_file_raw, size); "
                         "'-o help' lists them")
    cr.add_argument("-b", dest="backing", metavar="BACKING_FILE")
    cr.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT")
    cr.add_argument("-u", dest="unsafe", action="store_true",
                    help="do not open the backing file (SIZE is then required)")
    cr.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    cr.add_argument("--object", action="append", help="accepted for compatibility, ignored")
    cr.add_argument("filename", nargs="?")
    cr.add_argument("size", nargs="?",
                    help="bytes, or with a k, M, G, T, P or E suffix (1024-based)")
    cr.set_defaults(func=_cmd_create)

    i = sub.add_parser("info", help="describe an image")
    i.add_argument("-f", metavar="FMT", choices=["qcow2", "raw"], help="image format")
    i.add_argument("--output", choices=["human", "json"], default="human")
    i.add_argument("--backing-chain", action="store_true")
    i.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE_HELP)
    i.add_argument("filename")
    i.set_defaults(func=_cmd_info)

    m = sub.add_parser("map", help="show how guest ranges are allocated")
    m.add_argument("-f", metavar="FMT", choices=["qcow2", "raw"], help="image format")
    m.add_argument("--output", choices=["human", "json"], default="human")
    m.add_argument("--start-offset", type=int, default=0)
    m.add_argument("--max-length", type=int, default=None)
    m.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE_HELP)
    m.add_argument("filename")
    m.set_defaults(func=_cmd_map)

    c = sub.add_parser("check", help="check refcounts and metadata (qemu-img check)")
    c.add_argument("-f", metavar="FMT", choices=["qcow2", "raw"], help="image format")
    c.add_argument("--output", choices=["human", "json"], default="human")
    c.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE_HELP)
    c.add_argument("-q", "--quiet", action="store_true")
    c.add_argument("-r", dest="repair", choices=["leaks", "all"],
                   help="repair leaks, or all errors (rebuilding refcounts if needed)")
    c.add_argument("filename")
    c.set_defaults(func=_cmd_check)

    b = sub.add_parser("bitmap", help="add, remove, clear, enable, disable or merge "
                       "persistent dirty bitmaps (qemu-img bitmap)",
                       usage="qcow2py bitmap (--merge SOURCE | --add | --remove | --clear | "
                             "--enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]] "
                             "[-g GRANULARITY] [-f FMT] [-q] FILENAME BITMAP")
    for flag in ("add", "remove", "clear", "enable", "disable"):
        b.add_argument(f"--{flag}", dest="actions", nargs=0, action=_BitmapAction, const=flag,
                       help=f"{flag} the bitmap")
    b.add_argument("--merge", dest="actions", metavar="SOURCE", action=_BitmapAction,
                   const="merge", help="merge the bitmap SOURCE into BITMAP")
    b.add_argument("-b", dest="source_file", metavar="SOURCE_FILE",
                   help="image holding the --merge source bitmap")
    b.add_argument("-F", dest="source_fmt", metavar="SOURCE_FMT", choices=["qcow2", "raw"])
    b.add_argument("-g", dest="granularity", metavar="GRANULARITY",
                   help="bytes per bit of a new bitmap (--add)")
    b.add_argument("-f", metavar="FMT", choices=["qcow2", "raw"], help="image format")
    b.add_argument("-q", "--quiet", action="store_true")
    b.add_argument("--object", action="append", help="accepted for compatibility, ignored")
    b.add_argument("names", nargs="*", metavar="FILENAME BITMAP")
    b.set_defaults(func=_cmd_bitmap, actions=None)
    add_backup_parser(sub)
    lifecycle.add_parsers(sub)
    return p


#: -U of every command that reads an image (qemu-img's)
_FORCE_SHARE_HELP = ("open the image read-only without keeping others from writing it "
                     "(the image may be in use)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) == "create":       # one line, status 1
            print(f"qcow2py create: unexpected argument: {extra[0]}", file=sys.stderr)
            return 1
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with quiet_broken_pipe():         # "| head -1": silent, as qemu-img
            return args.func(args)
    except (ImageLockedError, ForceShareError) as e:      # qemu-img's words
        print(f"qcow2py: Could not open '{getattr(args, 'filename', '')}': {e}", file=sys.stderr)
        return 1
    except (Qcow2Error, OSError, ValueError) as e:
        name = getattr(args, "filename", "")
        print(f"qcow2py: {name}: {e}" if name else f"qcow2py: {e}", file=sys.stderr)
        return 1
