"""The control socket: JSON commands in QMP's shape, one per line.

``{"execute": "bitmap-add", "arguments": {"name": "b0"}}`` is answered with
``{"return": {...}}`` or ``{"error": {"class": ..., "desc": ...}}``, so an
orchestrator can manage bitmaps and stop the server while guests stay
connected.  A greeting ``{"QMP": {...}}`` opens every session and
``qmp_capabilities`` is accepted, so QMP clients work unchanged.

Commands act on the node of an export (``"export"``, default: the only one,
or ""); the bitmap commands need a node with qcow2py's bitmap API (an image
opened "r+").  Engine calls run on the server's worker pool.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Dict, Tuple

from .server import Server

log = logging.getLogger("qcow2py.nbd")

MAX_LINE = 1 << 20


class CommandError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.cls, self.desc = cls, desc


class Control:
    """The command table over one :class:`Server`."""

    def __init__(self, server: Server, on_quit: Callable[[], None]):
        self.server = server
        self.on_quit = on_quit
        self.commands: Dict[str, Callable[[dict], Any]] = {
            "qmp_capabilities": lambda a: {},
            "query-exports": self.query_exports,
            "bitmap-add": self.bitmap_add,
            "bitmap-remove": self.bitmap_remove,
            "bitmap-clear": self.bitmap_clear,
            "bitmap-disable": self.bitmap_disable,
            "quit": lambda a: {},    # handle() stops the server once the reply is out
        }

    # -- commands (run on a worker thread) --------------------------------------
    def _export(self, args: dict):
        exps = self.server.exports
        name = args.get("export")
        if name is None:
            name = next(iter(exps)) if len(exps) == 1 else ""
        if name not in exps:
            raise CommandError(f"Export '{name}' is not found", "DeviceNotFound")
        return exps[name]

    def _image(self, args: dict):
        node = self._export(args).node
        node = getattr(node, "image", node)         # a disk export that can be fleeced
        if not hasattr(node, "add_bitmap"):
            raise CommandError("this export's node has no persistent bitmaps")
        return node

    @staticmethod
    def _name(args: dict) -> str:
        name = args.get("name")
        if not isinstance(name, str) or not name:
            raise CommandError("Parameter 'name' is missing")
        return name

    def query_exports(self, args: dict):
        return [e.info() for e in list(self.server.exports.values())]

    def bitmap_add(self, args: dict):
        img = self._image(args)
        gran = args.get("granularity")
        if gran is not None and not isinstance(gran, int):
            raise CommandError("Parameter 'granularity' expects an integer")
        img.add_bitmap(self._name(args), gran, enabled=not args.get("disabled", False))
        return {}

    def _served(self, name: str) -> bool:
        return any(b.name == name for e in self.server.exports.values() for b in e.bitmaps)

    def bitmap_remove(self, args: dict):
        img, name = self._image(args), self._name(args)
        if self._served(name):
            raise CommandError(f"Bitmap '{name}' is currently in use by an export")
        img.remove_bitmap(name)
        return {}

    def bitmap_clear(self, args: dict):
        self._image(args).find_bitmap(self._name(args)).clear()
        return {}

    def bitmap_disable(self, args: dict):
        self._image(args).find_bitmap(self._name(args)).disable()
        return {}

    # -- the line protocol -------------------------------------------------------
    async def execute(self, line: bytes) -> dict:
        """The reply to one command line (``quit`` only answers: see :meth:`handle`)."""
        return (await self._run(line))[0]

    async def _run(self, line: bytes) -> Tuple[dict, bool]:
        """(reply, whether the command was a successful ``quit``)."""
        try:
            msg = json.loads(line)
        except ValueError as e:
            return _error("GenericError", f"JSON parse error: {e}"), False
        if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
            return _error("GenericError", "Expected a JSON object with 'execute'"), False
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            return _error("GenericError", "'arguments' must be an object"), False
        fn = self.commands.get(msg["execute"])
        if fn is None:
            return _error("CommandNotFound",
                          f"The command {msg['execute']} has not been found"), False
        try:
            result = await self.server.run_in_pool(fn, args)
        except CommandError as e:
            return _error(e.cls, e.desc), False
        except Exception as e:      # noqa: BLE001 - every refusal is an error reply
            return _error("GenericError", str(e)), False
        out: Dict[str, Any] = {"return": result}
        if "id" in msg:
            out["id"] = msg["id"]
        return out, msg["execute"] == "quit"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One control client: greeting, then a reply line per command line."""
        writer.write(_line({"QMP": {"version": {"package": "qcow2py-nbd"},
                                    "capabilities": []}}))
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    writer.write(_line(_error("GenericError", "command line too long")))
                    break
                if line.strip():
                    reply, quitting = await self._run(line)
                    writer.write(_line(reply))
                    await writer.drain()
                    if quitting:
                        # only now: stopping first could close this connection
                        # before the reply has left it
                        transport = writer.transport
                        while transport.get_write_buffer_size() and not transport.is_closing():
                            await asyncio.sleep(0.01)
                        self.on_quit()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _error(cls: str, desc: str) -> dict:
    return {"error": {"class": cls, "desc": desc}}


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"
