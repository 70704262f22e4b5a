"""``qcow2py-nbd``: serve an image over NBD (options as qemu-nbd's where they overlap).

Runs in the foreground and serves clients as they come and go until SIGINT or
SIGTERM, then exits 0 with the image closed (bitmaps stored).
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
from typing import List, Optional

from ..errors import Qcow2Error
from .control import Control
from .server import Server

DEFAULT_PORT = 10809


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcow2py-nbd", description=(
        "Export a qcow2 or raw image over NBD (fixed newstyle, structured replies, "
        "base:allocation and qemu:dirty-bitmap:NAME meta contexts, multi-conn)."))
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
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
    p.add_argument("-v", "--verbose", action="store_true", help="log one line per connection")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="qcow2py-nbd: %(message)s", stream=sys.stderr)
    try:
        return _serve(args)
    except (Qcow2Error, OSError, ValueError, ssl.SSLError) as e:
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


def _serve(args) -> int:
    import qcow2py
    if args.shared < 1:
        raise ValueError("-e needs at least 1 connection")
    tls = _tls(args)
    img = qcow2py.open(args.image, "r" if args.read_only else "r+", format=args.format)
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
        server.add_export(args.export_name, img, readonly=args.read_only, bitmaps=bitmaps)
        if args.socket:
            server.listen_unix(args.socket)
        else:
            server.listen_tcp(args.bind, args.port)
        if args.control:
            server.add_unix_service(args.control, Control(server, server.stop_soon).handle)

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
        img.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
