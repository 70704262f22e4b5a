"""Shared/exclusive locks on ranges of guest clusters.

Writers hold their clusters exclusively while they allocate, copy and write,
so two writes to one cluster never interleave; readers hold theirs shared,
so a cluster cannot be freed and reused under a read in flight.  Requests on
different clusters proceed in parallel.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, List, Tuple


class RangeLock:
    """A set of held ranges ``[start, end)``; exclusive ones conflict with any overlap."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: List[Tuple[int, int, bool]] = []

    def _conflicts(self, start: int, end: int, exclusive: bool) -> bool:
        for s, e, x in self._held:
            if s < end and start < e and (x or exclusive):
                return True
        return False

    @contextmanager
    def hold(self, start: int, end: int, exclusive: bool) -> Iterator[None]:
        entry = (start, end, exclusive)
        with self._cond:
            while self._conflicts(start, end, exclusive):
                self._cond.wait()
            self._held.append(entry)
        try:
            yield
        finally:
            with self._cond:
                self._held.remove(entry)
                self._cond.notify_all()
