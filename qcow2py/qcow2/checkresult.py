"""What a check found: :class:`CheckResult`, qemu-img check's numbers and messages.

Its own module so that the walk, the repair and the front (:mod:`qcow2py.qcow2.check`)
all fill or return it without importing one another in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

#: messages kept per check (a hostile image can produce one per cluster)
MAX_MESSAGES = 1000


@dataclass
class CheckResult:
    """What ``qemu-img check`` reports (its JSON keys via :meth:`to_json_dict`)."""

    filename: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    messages: List[str] = field(default_factory=list)
    leaks_fixed: int = 0
    corruptions_fixed: int = 0
    #: per-cluster (index, stored, computed) for every mismatch
    mismatches: List[tuple] = field(default_factory=list)
    #: messages left out past MAX_MESSAGES
    messages_dropped: int = 0

    def note(self, msg: str) -> None:
        """Record one ERROR/Leaked/Repairing line (bounded: hostile images have many)."""
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(msg)
        else:
            self.messages_dropped += 1

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit status: 0 clean, 1 check errors, 2 corruptions, 3 leaks."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json_dict(self, fmt: str = "qcow2") -> Dict[str, object]:
        """qemu-img check --output=json's object (zero counts left out, as QEMU does)."""
        d: Dict[str, object] = {"filename": self.filename, "format": fmt,
                                "check-errors": self.check_errors,
                                "image-end-offset": self.image_end_offset}
        for key, val in (("corruptions", self.corruptions), ("leaks", self.leaks),
                         ("corruptions-fixed", self.corruptions_fixed),
                         ("leaks-fixed", self.leaks_fixed),
                         ("total-clusters", self.total_clusters),
                         ("allocated-clusters", self.allocated_clusters),
                         ("fragmented-clusters", self.fragmented_clusters),
                         ("compressed-clusters", self.compressed_clusters)):
            if val:
                d[key] = val
        return d
