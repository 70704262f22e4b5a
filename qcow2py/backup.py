"""Backup of a disk that keeps being written: fleecing and push.

>>> import qcow2py                                           # doctest: +SKIP
>>> from qcow2py import backup
>>> disk = qcow2py.open("disk.qcow2", "r+")
>>> with backup.fleece(disk, "temp.qcow2", ram_cache=256 << 20) as fl:
...     res = backup.push(fl.snapshot, "target.qcow2", discard_source=True)

The implementation lives in :mod:`qcow2py.jobs.backup`; this module is its
public face.
"""

from .errors import SnapshotAccessError
from .jobs.backup import (BackupCancelled, CopyBeforeWrite, Fleecing, FleecingStats,
                          FrozenBitmap, PushResult, SnapshotView, fleece, push)
from .jobs.backup.push import ORDERS
from .jobs.backup.cbw import ON_CBW_ERROR

__all__ = ["fleece", "push", "Fleecing", "FleecingStats", "PushResult", "BackupCancelled",
           "SnapshotView", "CopyBeforeWrite", "FrozenBitmap", "SnapshotAccessError",
           "ORDERS", "ON_CBW_ERROR"]
