"""In-flight requests of an image, so that ``close()`` never pulls a file from
under a request another thread is still running.

Each public I/O method of an :class:`~qcow2py.image.Image` runs inside the
image's :class:`RequestGate`.  ``close()`` first shuts the gate (new requests
raise :class:`~qcow2py.errors.ImageClosedError`), then waits for the requests
already inside to finish, and only then flushes and closes the files.  A
request that calls another public method of the same image (a write that
reads, ``close()`` from inside a callback) is counted once per thread, so it
neither deadlocks nor fails half-way.
"""

from __future__ import annotations

import functools
import threading
from threading import get_ident
from typing import Callable, Dict, TypeVar

from ..errors import ImageClosedError

F = TypeVar("F", bound=Callable)


class RequestGate:
    """A counter of requests in flight that can be shut and drained."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._depth: Dict[int, int] = {}   # thread id -> requests it has inside
        self._active = 0
        self._shut = False
        self._claimed = False              # one close() does the closing

    def enter(self, name: str) -> None:
        me = get_ident()
        with self._lock:
            depth = self._depth.get(me, 0)
            if self._shut and not depth:
                raise ImageClosedError(f"image {name!r} is closed")
            self._depth[me] = depth + 1
            self._active += 1

    def exit(self) -> None:
        me = get_ident()
        with self._lock:
            depth = self._depth[me] - 1
            if depth:
                self._depth[me] = depth
            else:
                del self._depth[me]
            self._active -= 1
            if self._shut:
                self._drained.notify_all()

    def shut_and_drain(self) -> bool:
        """Refuse new requests, then wait for those of other threads to finish;
        True for the first caller only (the one that closes)."""
        with self._lock:
            self._shut = True
            while self._active > self._depth.get(get_ident(), 0):
                self._drained.wait()
            first, self._claimed = not self._claimed, True
            return first


def gated(method: F) -> F:
    """Run ``method`` (of an object with ``_gate`` and ``filename``) as a request."""
    if getattr(method, "_gated", False):
        return method

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        gate = self.__dict__.get("_gate")
        if gate is None:                 # not initialised (or a foreign subclass)
            return method(self, *args, **kwargs)
        gate.enter(self.filename)
        try:
            return method(self, *args, **kwargs)
        finally:
            gate.exit()

    run._gated = True                    # type: ignore[attr-defined]
    return run                           # type: ignore[return-value]
