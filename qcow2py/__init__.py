"""qcow2py: a qcow2 disk-image engine for Python, with a small C hot path.

>>> import qcow2py
>>> with qcow2py.open("disk.qcow2") as img:         # doctest: +SKIP
...     data = img.read(0, 65536)
"""

from .backing import DEFAULT_POLICY, NO_BACKING, BackingPolicy
from .errors import (BackingChainError, BitmapError, CorruptImageError, FormatError,
                     ImageClosedError, Qcow2Error, SnapshotAccessError,
                     UnsupportedFeatureError)
from .create import CreateError, create
from .image import Image, Run, open
from .node import BlockKind, Extent, Node
from .bitmaps import Bitmap
from .locking import ImageLockedError
from .copy.blockcopy import BlockCopy, CopyStats
from . import backup
from .backup import BackupCancelled, Fleecing, FleecingStats, PushResult, fleece, push
from .compare import CompareResult, compare
from .jobs.commit import CommitError, commit
from .jobs.rebase import RebaseError, rebase
from .measure import MeasureResult, measure
from .amend import AmendError, amend

__version__ = "0.1.0"

__all__ = [
    "open", "create", "CreateError", "ImageLockedError", "Image", "Run", "BackingPolicy",
    "DEFAULT_POLICY", "NO_BACKING", "BlockCopy", "CopyStats",
    "Qcow2Error", "FormatError", "UnsupportedFeatureError", "CorruptImageError",
    "BackingChainError", "ImageClosedError", "BitmapError", "Bitmap", "SnapshotAccessError",
    "Node", "Extent", "BlockKind", "__version__",
    "backup", "fleece", "push", "Fleecing", "FleecingStats", "PushResult", "BackupCancelled",
    "compare", "CompareResult",
    "commit", "CommitError", "rebase", "RebaseError",
    "measure", "MeasureResult", "amend", "AmendError",
]
