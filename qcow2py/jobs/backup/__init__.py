"""The backup engine: copy-before-write fleecing, a point-in-time snapshot view,
a bounded RAM cache in front of the temp image, and push backup.

Public names are re-exported by :mod:`qcow2py.backup`.
"""

from .fleece import Fleecing, FleecingStats, fleece
from .push import BackupCancelled, PushResult, push
from .snapshot import SnapshotView
from .cbw import CopyBeforeWrite
from .state import FrozenBitmap

__all__ = ["fleece", "Fleecing", "FleecingStats", "push", "PushResult", "BackupCancelled",
           "SnapshotView", "CopyBeforeWrite", "FrozenBitmap"]
