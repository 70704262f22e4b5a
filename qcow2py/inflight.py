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
from typing import Callable, TypeVar

from .errors import ImageClosedError

F = TypeVar("F", bound=Callable)


class RequestGate:
    """A counter of requests in flight that can be shut and drained."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._shut = False
        self._claimed = False              # one close() does the closing
        self._mine = threading.local()     # this thread's nesting depth

    def enter(self, name: str) -> None:
        depth = getattr(self._mine, "depth", 0)
        with self._cond:
            if self._shut and depth == 0:
                raise ImageClosedError(f"image {name!r} is closed")
            self._active += 1
        self._mine.depth = depth + 1

    def exit(self) -> None:
        self._mine.depth -= 1
        with self._cond:
            self._active -= 1
            if self._active <= 1:
                self._cond.notify_all()

    def shut_and_drain(self) -> bool:
        """Refuse new requests, then wait for those of other threads to finish;
        True for the first caller only (the one that closes)."""
        own = getattr(self._mine, "depth", 0)
        with self._cond:
            self._shut = True
            while self._active > own:
                self._cond.wait()
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
