"""Where copied-before-write clusters go: a bounded RAM cache in front of the
temp image.

A copy lands in RAM while the cache has room; when it overflows, the oldest
clusters spill to the temp image (written in runs), so a backup that pushes
RAM first (``order="priority"``) reads most copies straight from memory and
the temp sees only what did not fit.  With no cache (or a copy larger than
the whole cache) copies go straight to the temp.

Spilled clusters stay readable in ``spilling`` until their temp write
finished; only then does ``loc`` say TEMP.  All bookkeeping is done under the
shared :class:`~.state.CopyState` condition.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

from ...lazyimport import numpy as np

from ...image import Image
from .state import RAM, TEMP, CopyState, index_runs


class CopyStore:
    """The RAM cache (``ram_limit`` bytes, 0 = none) and the temp image."""

    def __init__(self, state: CopyState, temp: Image, ram_limit: int) -> None:
        self.state = state
        self.temp = temp
        self.ram_limit = max(0, int(ram_limit))
        self.ram: "OrderedDict[int, bytes]" = OrderedDict()     # oldest first
        self.spilling: Dict[int, bytes] = {}
        self.in_spill = np.zeros(state.nclusters, dtype=bool)
        self.ram_bytes = 0
        self.temp_bytes_written = 0          # cumulative bytes written to the temp

    # ------------------------------------------------------------ saving
    def save(self, a: int, b: int, data: bytes) -> None:
        """Keep the copy of clusters ``[a, b)`` and record where it went."""
        st = self.state
        if self.ram_limit and len(data) <= self.ram_limit:
            cs = st.cluster_size
            with st.cond:
                for i, c in enumerate(range(a, b)):
                    self.ram[c] = data[i * cs:(i + 1) * cs]
                self.ram_bytes += len(data)
                st.place(a, b, RAM)
                victims = self._pick_victims()
            if victims:
                self._spill(victims)
            return
        lo, _ = st.byte_range(a, b)
        self.temp.write(lo, data)
        with st.cond:
            self.temp_bytes_written += len(data)
            st.place(a, b, TEMP)

    def _pick_victims(self) -> List[int]:
        """Oldest RAM clusters to move to the temp until the cache fits (``cond`` held)."""
        victims = []
        while self.ram_bytes > self.ram_limit and self.ram:
            c, d = self.ram.popitem(last=False)
            self.ram_bytes -= len(d)
            self.spilling[c] = d
            victims.append(c)
        if victims:
            self.in_spill[victims] = True
        return victims

    def _spill(self, victims: List[int]) -> None:
        st = self.state
        idx = np.array(sorted(victims), dtype=np.int64)
        written: List[int] = []
        try:
            for a, b in index_runs(idx):
                data = b"".join(self.spilling[c] for c in range(a, b))
                lo, _ = st.byte_range(a, b)
                self.temp.write(lo, data)
                written.extend(range(a, b))
        finally:
            with st.cond:
                done = set(written)
                for c in idx.tolist():
                    d = self.spilling.pop(c)
                    if c in done:
                        st.loc[c] = TEMP
                        self.temp_bytes_written += len(d)
                    else:                       # the temp failed: keep the copy in RAM
                        self.ram[c] = d
                        self.ram_bytes += len(d)
                self.in_spill[idx] = False
                st.cond.notify_all()

    # ------------------------------------------------------------ reading / dropping
    def lookup(self, c: int) -> Optional[bytes]:
        """The RAM copy of cluster ``c`` (``cond`` held)."""
        d = self.ram.get(c)
        return d if d is not None else self.spilling.get(c)

    def drop_ram(self, idx: np.ndarray) -> int:
        """Forget the RAM copies of ``idx`` (``cond`` held, none spilling); bytes freed."""
        freed = 0
        for c in idx.tolist():
            d = self.ram.pop(c, None)
            if d is not None:
                freed += len(d)
        self.ram_bytes -= freed
        return freed

    def clear(self) -> None:
        with self.state.cond:
            self.ram.clear()
            self.spilling.clear()
            self.ram_bytes = 0
