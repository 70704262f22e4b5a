"""qcow2py: a qcow2 disk-image engine for Python, with a small C hot path.

>>> import qcow2py
>>> with qcow2py.open("disk.qcow2") as img:         # doctest: +SKIP
...     data = img.read(0, 65536)

The names below are imported on first use (PEP 562), so that ``import qcow2py``
and the command-line tools load only the modules a command needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (BackingChainError, BitmapError, CorruptImageError, FormatError,
                     ImageClosedError, Qcow2Error, SnapshotAccessError,
                     UnsupportedFeatureError)
# eager: importing the submodule qcow2py.create (compare, measure, amend) would
# otherwise bind the name to the module (numpy stays unimported: they use it lazily)
from .create import CreateError, create
from .compare import CompareResult, compare
from .measure import MeasureResult, measure
from .amend import AmendError, amend

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "DEFAULT_POLICY": ".backing", "NO_BACKING": ".backing", "BackingPolicy": ".backing",
    "Image": ".image", "Run": ".image", "open": ".image",
    "BlockKind": ".node", "Extent": ".node", "Node": ".node",
    "Bitmap": ".bitmaps",
    "ImageLockedError": ".errors", "ForceShareError": ".errors",
    "BlockCopy": ".copy.blockcopy", "CopyStats": ".copy.blockcopy",
    "fleece": ".backup", "push": ".backup", "Fleecing": ".backup",
    "FleecingStats": ".backup", "PushResult": ".backup", "BackupCancelled": ".backup",
    "commit": ".jobs.commit", "CommitError": ".jobs.commit",
    "rebase": ".jobs.rebase", "RebaseError": ".jobs.rebase",
}
#: public names that are submodules
_SUBMODULES = {"backup"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qcow2py' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from . import backup
    from .backing import DEFAULT_POLICY, NO_BACKING, BackingPolicy
    from .backup import BackupCancelled, Fleecing, FleecingStats, PushResult, fleece, push
    from .bitmaps import Bitmap
    from .copy.blockcopy import BlockCopy, CopyStats
    from .image import Image, Run, open
    from .jobs.commit import CommitError, commit
    from .jobs.rebase import RebaseError, rebase
    from .errors import ForceShareError, ImageLockedError
    from .node import BlockKind, Extent, Node

__all__ = [
    "open", "create", "CreateError", "ImageLockedError", "ForceShareError", "Image", "Run",
    "BackingPolicy", "DEFAULT_POLICY", "NO_BACKING", "BlockCopy", "CopyStats",
    "Qcow2Error", "FormatError", "UnsupportedFeatureError", "CorruptImageError",
    "BackingChainError", "ImageClosedError", "BitmapError", "Bitmap", "SnapshotAccessError",
    "Node", "Extent", "BlockKind", "__version__",
    "backup", "fleece", "push", "Fleecing", "FleecingStats", "PushResult", "BackupCancelled",
    "compare", "CompareResult", "commit", "CommitError", "rebase", "RebaseError",
    "measure", "MeasureResult", "amend", "AmendError",
]
