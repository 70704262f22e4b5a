"""The ``qcow2py`` command: qemu-img's syntax for the subcommands it shares."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__
from .errors import Qcow2Error
from .image import open as open_image
from .report import map_human, map_json, qemu_json


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
        lines.append("ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT")
        for s in info["snapshots"]:
            lines.append(f"{s['id']:<10}{s['name']:<18}{_human_size(s['vm-state-size']):>7}  "
                         f"{s['date-sec']:>10}  {s['vm-clock-sec']:>10}  {s.get('icount', '')}")
    spec = info.get("format-specific")
    if spec:
        lines.append("Format specific information:")
        for k, v in spec["data"].items():
            if k == "bitmaps":
                lines.append("    bitmaps:")
                for i, b in enumerate(v):
                    lines.append(f"        [{i}]:")
                    lines.append(f"            flags:")
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
    with open_image(args.filename, format=args.f, chain=args.backing_chain) as img:
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
    with open_image(args.filename, format=args.f) as img:
        start = args.start_offset
        entries = img.map(start, args.max_length)
        if args.output == "json":
            sys.stdout.write(map_json(entries))
        else:
            sys.stdout.write(map_human(img, entries))
    return 0


def _cmd_check(args) -> int:
    from .check import check_image
    from .qcow2 import Qcow2Image
    mode = "r+" if args.repair else "r"
    with open_image(args.filename, mode, format=args.f, repair=bool(args.repair)) as img:
        if not isinstance(img, Qcow2Image):
            print("qcow2py: This image format does not support checks", file=sys.stderr)
            return 63
        try:
            res = img.check(repair=args.repair) if args.repair else check_image(img)
        except Qcow2Error as e:
            print(f"qcow2py: Check failed: {e}", file=sys.stderr)
            return 1
    if args.output == "json":
        sys.stdout.write(qemu_json(res.to_json_dict()) + "\n")
    else:
        for m in res.messages:
            print(m, file=sys.stderr)
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
    from .copy.cli import parse_size
    from .errors import BitmapError
    from .qcow2 import Qcow2Image
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
    from .errors import BitmapError
    dest = img.find_bitmap(name)
    dest._check_modifiable()            # QEMU checks the destination first
    if source_file is None:
        dest.merge_from(img.find_bitmap(source))
        return
    with _open_for_bitmap(source_file, "r", source_fmt) as src:
        if not hasattr(src, "find_bitmap"):
            raise BitmapError(f"Dirty bitmap '{source}' not found")
        dest.merge_from(src.find_bitmap(source))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcow2py", description="qcow2 image tool "
                                "(qemu-img compatible where the subcommands overlap)")
    p.add_argument("--version", action="version", version=f"qcow2py {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    i = sub.add_parser("info", help="describe an image")
    i.add_argument("-f", metavar="FMT", choices=["qcow2", "raw"], help="image format")
    i.add_argument("--output", choices=["human", "json"], default="human")
    i.add_argument("--backing-chain", action="store_true")
    i.add_argument("-U", "--force-share", action="store_true", help="accepted for "
                   "compatibility (qcow2py takes no read lock)")
    i.add_argument("filename")
    i.set_defaults(func=_cmd_info)

    m = sub.add_parser("map", help="show how guest ranges are allocated")
    m.add_argument("-f", metavar="FMT", choices=["qcow2", "raw"], help="image format")
    m.add_argument("--output", choices=["human", "json"], default="human")
    m.add_argument("--start-offset", type=int, default=0)
    m.add_argument("--max-length", type=int, default=None)
    m.add_argument("-U", "--force-share", action="store_true")
    m.add_argument("filename")
    m.set_defaults(func=_cmd_map)

    c = sub.add_parser("check", help="check refcounts and metadata (qemu-img check)")
    c.add_argument("-f", metavar="FMT", choices=["qcow2", "raw"], help="image format")
    c.add_argument("--output", choices=["human", "json"], default="human")
    c.add_argument("-U", "--force-share", action="store_true")
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
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (Qcow2Error, OSError, ValueError) as e:
        name = getattr(args, "filename", "")
        print(f"qcow2py: {name}: {e}" if name else f"qcow2py: {e}", file=sys.stderr)
        return 1
