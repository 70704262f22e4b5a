"""``qcow2py-nbd``: serve an image over NBD (options as qemu-nbd's where they overlap).

Runs in the foreground and serves clients as they come and go until SIGINT or
SIGTERM, then exits 0 with the image closed (bitmaps stored).  With
``--fleece TEMP`` it also serves a pull backup: the point in time is taken at
start-up, the snapshot is exported beside the disk (see
:mod:`qcow2py.nbd.fleece`) and TEMP is removed on exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
from typing import List, Optional

from ..errors import Qcow2Error
from ..opener import open as open_image
from .control import CommandError, Control
from .fleece import DEFAULT_SNAPSHOT_NAME, PullBackup, SwitchableNode, parse_size
from .server import Server

DEFAULT_PORT = 10809


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcow2py-nbd", description=(
        "Export a qcow2 or raw image over NBD (fixed newstyle, structured replies, "
        "base:allocation and qemu:dirty-bitmap:NAME meta contexts, multi-conn)."))
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="with -r: do not keep others from writing the image (qemu-nbd's)")
    p.add_argument("-x", "--export-name", default="", metavar="NAME",
                   help='export name (default "")')
    p.add_argument("-B", "--bitmap", action="append", default=[], metavar="BITMAP",
                   help="serve the persistent bitmap as qemu:dirty-bitmap:BITMAP (repeatable)")
    p.add_argument("-k", "--socket", metavar="SOCKET", help="listen on this Unix socket")
    p.add_argument("-b", "--bind", default="127.0.0.1", metavar="ADDR",
                   help="TCP address (default 127.0.0.1)")
    p.add_argument("-p", "--port", type=int, default=DEFAULT_PORT, metavar="PORT",
                   help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("-e", "--shared", type=int, default=16, metavar="CONNECTIONS",
                   help="at most this many clients at once (default 16)")
    p.add_argument("-t", "--persistent", action="store_true",
                   help="accepted for qemu-nbd compatibility (always persistent)")
    p.add_argument("-f", "--format", choices=("qcow2", "raw"), help="image format (probed)")
    p.add_argument("--control", metavar="SOCKET", help="JSON control socket (QMP-shaped)")
    p.add_argument("--pid-file", metavar="FILE", help="write the server's pid here")
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS (STARTTLS) with this cert")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    g = p.add_argument_group("pull backup (fleecing)")
    g.add_argument("--fleece", metavar="TEMP",
                   help="take a point-in-time snapshot now and export it; TEMP (must not "
                        "exist) holds the old data of clusters the guest overwrites and is "
                        "removed on exit")
    g.add_argument("--fleece-bitmap", metavar="NAME",
                   help="snapshot only the clusters this bitmap marks dirty now; served as "
                        "qemu:dirty-bitmap:NAME on the snapshot export")
    g.add_argument("--ram-cache", type=_size, default=0, metavar="SIZE",
                   help="RAM that holds copies before they spill to TEMP (e.g. 256M)")
    g.add_argument("--snapshot-name", default=DEFAULT_SNAPSHOT_NAME, metavar="NAME",
                   help=f'export name of the snapshot (default "{DEFAULT_SNAPSHOT_NAME}")')
    p.add_argument("-v", "--verbose", action="store_true", help="log one line per connection")
    return p


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="qcow2py-nbd: %(message)s", stream=sys.stderr)
    try:
        return _serve(args)
    except (Qcow2Error, OSError, ValueError, ssl.SSLError, CommandError) as e:
        print(f"qcow2py-nbd: {e}", file=sys.stderr)
        return 1


def _tls(args) -> Optional[ssl.SSLContext]:
    if not args.tls_cert and not args.tls_key:
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    return ctx


def _check_fleece_args(args) -> None:
    if args.fleece is None:
        if args.fleece_bitmap or args.ram_cache or args.snapshot_name != DEFAULT_SNAPSHOT_NAME:
            raise ValueError("--fleece-bitmap, --ram-cache and --snapshot-name need --fleece")
        return
    if args.read_only:
        raise ValueError("--fleece needs a writable disk (no -r)")
    if os.path.exists(args.fleece):
        raise ValueError(f"--fleece: {args.fleece!r} already exists")
    if args.snapshot_name == args.export_name:
        raise ValueError("--snapshot-name must differ from the disk's export name")


def _serve(args) -> int:
    if args.shared < 1:
        raise ValueError("-e needs at least 1 connection")
    _check_fleece_args(args)
    tls = _tls(args)
    img = open_image(args.image, "r" if args.read_only else "r+", format=args.format,
                     force_share=args.force_share)
    pull: Optional[PullBackup] = None
    try:
        bitmaps = []
        for name in args.bitmap:
            bm = img.find_bitmap(name)
            if args.read_only and bm.enabled:
                raise ValueError(f"Enabled bitmap '{name}' incompatible with readonly export")
            if bm.inconsistent:
                raise ValueError(f"Bitmap '{name}' is inconsistent and cannot be used")
            bitmaps.append(bm)
        server = Server(max_connections=args.shared, tls=tls)
        # a writable disk is served through a switchable node: a fleecing started at
        # runtime puts its copy-before-write filter in front of the image there
        node = img if args.read_only else SwitchableNode(img)
        server.add_export(args.export_name, node, readonly=args.read_only, bitmaps=bitmaps)
        if not args.read_only:
            pull = PullBackup(server, args.export_name)
        if args.fleece:
            pull.start(args.fleece, bitmap=args.fleece_bitmap, ram_cache=args.ram_cache,
                       snapshot_name=args.snapshot_name)
        if args.control:            # listening first: once the export's socket
            control = Control(server, server.stop_soon)     # exists, so does this one
            if pull is not None:
                control.commands.update(pull.commands())
            server.add_unix_service(args.control, control.handle)
        if args.socket:
            server.listen_unix(args.socket)
        else:
            server.listen_tcp(args.bind, args.port)

        def ready() -> None:
            if args.pid_file:
                with open(args.pid_file, "w") as f:
                    f.write(f"{os.getpid()}\n")
            logging.getLogger("qcow2py.nbd").info(
                "serving %r on %s", args.image, server.addresses)

        try:
            server.serve_forever(handle_signals=True, ready=ready)
        finally:
            if args.pid_file:
                try:
                    os.unlink(args.pid_file)
                except OSError:
                    pass
    finally:
        try:
            if pull is not None:
                pull.close()            # the temp is removed
        finally:
            img.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
