"""qcow2py: a qcow2 disk-image engine for Python, with a small C hot path.

>>> import qcow2py
>>> with qcow2py.open("disk.qcow2") as img:         # doctest: +SKIP
...     data = img.read(0, 65536)
"""

from .backing import DEFAULT_POLICY, NO_BACKING, BackingPolicy
from .errors import (BackingChainError, BitmapError, CorruptImageError, FormatError,
                     ImageClosedError, Qcow2Error, SnapshotAccessError,
                     UnsupportedFeatureError)
from .image import Image, Run
from .io.locking import ImageLockedError
from .jobs.blockcopy import BlockCopy, CopyStats
from .node import BlockKind, Extent, Node
from .opener import CreateError, create, open
from . import backup
from .backup import BackupCancelled, Fleecing, FleecingStats, PushResult, fleece, push
from .qcow2.bitmaps import Bitmap
from .version import __version__

__all__ = [
    "open", "create", "CreateError", "ImageLockedError", "Image", "Run", "BackingPolicy",
    "DEFAULT_POLICY", "NO_BACKING", "BlockCopy", "CopyStats",
    "Qcow2Error", "FormatError", "UnsupportedFeatureError", "CorruptImageError",
    "BackingChainError", "ImageClosedError", "BitmapError", "Bitmap", "SnapshotAccessError",
    "Node", "Extent", "BlockKind", "__version__",
    "backup", "fleece", "push", "Fleecing", "FleecingStats", "PushResult", "BackupCancelled",
]
