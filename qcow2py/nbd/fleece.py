"""The pull backup of ``qcow2py-nbd``: fleecing served over NBD.

While a fleecing runs, every guest write to the disk export must go through
the copy-before-write filter, and the point-in-time snapshot is a second
export.  The disk export's node is therefore a :class:`SwitchableNode`: a
thin node that forwards each call to its current target (the image, or the
fleecing's filter) and counts the calls in flight, so that starting or
stopping a fleecing can *quiesce* the export -- hold new requests, wait for
the running ones, switch the target, let requests go on.  The point in time
is taken inside that quiet moment, so no write can slip past the filter
half-way through a switch.

:class:`PullBackup` owns the fleecing of one disk export and gives the
control socket its commands (``fleece-start``, ``fleece-stop``,
``query-fleece``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional

from ..backup import Fleecing, fleece
from ..node import Extent, Node
from .control import CommandError
from .server import Server

log = logging.getLogger("qcow2py.nbd")

DEFAULT_SNAPSHOT_NAME = "snapshot"


class SwitchableNode(Node):
    """A node whose target can be swapped while clients use it.

    ``image`` is the node the export was made for (the owner of bitmaps and
    the default target).  Each data call holds the gate for its duration;
    :meth:`switch` closes the gate, waits for the calls in flight and runs
    its function with no call in flight.
    """

    def __init__(self, image) -> None:
        self.image = image
        self.target = image
        self._cond = threading.Condition()
        self._inflight = 0
        self._held = False

    # -- the gate ---------------------------------------------------------------
    @contextmanager
    def _call(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._held)
            self._inflight += 1
            target = self.target
        try:
            yield target
        finally:
            with self._cond:
                self._inflight -= 1
                if self._inflight == 0:
                    self._cond.notify_all()

    def switch(self, fn: Callable[[], Any]) -> Any:
        """Quiesce, then ``target = fn()`` (a raising ``fn`` leaves the target
        as it was), then release waiting calls.  Returns the new target."""
        with self._cond:
            self._cond.wait_for(lambda: not self._held)
            self._held = True
            try:
                self._cond.wait_for(lambda: self._inflight == 0)
                self.target = fn()
                return self.target
            finally:
                self._held = False
                self._cond.notify_all()

    # -- facts of the image -----------------------------------------------------
    @property
    def size(self) -> int:          # type: ignore[override]
        return self.image.size

    @property
    def read_only(self) -> bool:
        return self.image.read_only

    @property
    def cluster_size(self) -> Optional[int]:
        return getattr(self.image, "cluster_size", None)

    @property
    def format(self) -> str:
        return getattr(self.image, "format", "")

    # -- the node protocol, forwarded ------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        with self._call() as t:
            return t.read(offset, length)

    def read_into(self, buf, offset: int) -> None:
        with self._call() as t:
            t.read_into(buf, offset)

    def write(self, offset: int, data) -> None:
        with self._call() as t:
            t.write(offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        with self._call() as t:
            t.write_zeroes(offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        with self._call() as t:
            t.discard(offset, length)

    def flush(self) -> None:
        with self._call() as t:
            t.flush()

    def block_status(self, offset: int, length: int) -> List[Extent]:
        with self._call() as t:
            return t.block_status(offset, length)

    def close(self) -> None:
        """The image belongs to whoever opened it."""


def fleece_stats(fl: Fleecing) -> Dict[str, Any]:
    return dataclasses.asdict(fl.stats)


class PullBackup:
    """The fleecing of one disk export of a :class:`Server`, started and
    stopped at will (at start-up by ``--fleece``, or from the control socket).

    ``disk_export`` names an export whose node is a :class:`SwitchableNode`
    over an Image opened "r+"."""

    def __init__(self, server: Server, disk_export: str) -> None:
        self.server = server
        self.disk_export = disk_export
        self.fleecing: Optional[Fleecing] = None
        self.snapshot_name: Optional[str] = None
        self._lock = threading.Lock()

    @property
    def gate(self) -> SwitchableNode:
        node = self.server.exports[self.disk_export].node
        if not isinstance(node, SwitchableNode):
            raise CommandError(f"export {self.disk_export!r} cannot be fleeced")
        return node

    def start(self, temp: str, *, bitmap: Optional[str] = None, ram_cache: int = 0,
              snapshot_name: str = DEFAULT_SNAPSHOT_NAME) -> Fleecing:
        """Take the point in time now and export the snapshot."""
        with self._lock:
            if self.fleecing is not None:
                raise CommandError(f"a fleecing is already running (temp "
                                   f"{self.fleecing.temp_filename!r})")
            if snapshot_name in self.server.exports:
                raise CommandError(f"export {snapshot_name!r} already exists")
            gate = self.gate
            if gate.image.read_only:
                raise CommandError("the disk is exported read-only: nothing to fleece")
            if os.path.exists(temp):
                raise CommandError(f"temp image {temp!r} already exists")
            holder: List[Fleecing] = []

            def begin():
                holder.append(fleece(gate.image, temp, bitmap=bitmap, ram_cache=ram_cache))
                return holder[0].disk
            gate.switch(begin)                          # the point in time
            fl = holder[0]
            try:
                self.server.add_export(snapshot_name, fl.snapshot, readonly=False,
                                       bitmaps=[fl.bitmap] if fl.bitmap else [],
                                       description="point-in-time snapshot of "
                                                   f"{self.disk_export!r}")
            except BaseException:
                self._end(fl)
                raise
            self.fleecing, self.snapshot_name = fl, snapshot_name
            log.info("fleecing %r into %r: snapshot exported as %r", gate.image.filename,
                     temp, snapshot_name)
            return fl

    def _end(self, fl: Fleecing) -> None:
        """Close the fleecing with the disk export quiet, then let writes go
        straight to the image again."""
        gate = self.gate

        def finish():
            try:
                fl.close()
            finally:                # a failing close still gives the disk back
                gate.target = gate.image
            return gate.image
        gate.switch(finish)

    def stop(self) -> Dict[str, Any]:
        """Remove the snapshot export, close the fleecing, remove the temp;
        returns the final stats."""
        with self._lock:
            fl, name = self.fleecing, self.snapshot_name
            if fl is None:
                raise CommandError("no fleecing is running")
            if self.server.exports.get(name) is not None:
                self.server.remove_export(name)
            stats = fleece_stats(fl)
            try:
                self._end(fl)
            finally:
                self.fleecing = self.snapshot_name = None
            log.info("fleecing ended: %s", stats)
            return stats

    def close(self) -> None:
        """At exit: end a running fleecing (the temp is removed)."""
        if self.fleecing is not None:
            self.stop()

    def query(self) -> Dict[str, Any]:
        fl = self.fleecing
        if fl is None:
            return {"active": False}
        out: Dict[str, Any] = {"active": True, "temp": fl.temp_filename,
                               "snapshot-export": self.snapshot_name,
                               "disk-export": self.disk_export,
                               "bitmap": fl.bitmap.name if fl.bitmap else None}
        out.update(fleece_stats(fl))
        return out

    # -- control-socket commands -------------------------------------------------
    def commands(self) -> Dict[str, Callable[[dict], Any]]:
        return {"fleece-start": self._cmd_start, "fleece-stop": lambda a: self.stop(),
                "query-fleece": lambda a: self.query()}

    def _cmd_start(self, args: dict) -> dict:
        temp = args.get("temp")
        if not isinstance(temp, str) or not temp:
            raise CommandError("Parameter 'temp' is missing")
        bitmap = args.get("bitmap")
        if bitmap is not None and not isinstance(bitmap, str):
            raise CommandError("Parameter 'bitmap' expects a string")
        ram = args.get("ram-cache", 0)
        if isinstance(ram, str):
            try:
                ram = parse_size(ram)
            except ValueError as e:
                raise CommandError(str(e)) from None
        if not isinstance(ram, int) or isinstance(ram, bool) or ram < 0:
            raise CommandError("Parameter 'ram-cache' expects a size in bytes")
        name = args.get("snapshot-name", DEFAULT_SNAPSHOT_NAME)
        if not isinstance(name, str):
            raise CommandError("Parameter 'snapshot-name' expects a string")
        fl = self.start(temp, bitmap=bitmap, ram_cache=ram, snapshot_name=name)
        return {"temp": fl.temp_filename, "snapshot-export": name}


_UNITS = "kmgtpe"


def parse_size(text: str) -> int:
    """``SIZE`` as qemu's tools take it: bytes, or a K/M/G/T/P/E suffix (1024s)."""
    t = text.strip().lower().rstrip("b") or "x"
    scale = 1
    if t[-1] in _UNITS:
        scale = 1 << (10 * (_UNITS.index(t[-1]) + 1))
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"invalid size {text!r}") from None
    if value < 0:
        raise ValueError(f"invalid size {text!r}")
    return int(value * scale)
