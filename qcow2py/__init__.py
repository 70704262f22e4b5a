"""qcow2py: a qcow2 disk-image engine for Python, with a small C hot path.

>>> import qcow2py
>>> with qcow2py.open("disk.qcow2") as img:         # doctest: +SKIP
...     data = img.read(0, 65536)

The names below are imported on first use (PEP 562), so that ``import qcow2py``
and the command-line tools load only the modules a command needs.
"""

from __future__ import annotations

import importlib
from .errors import (BackingChainError, BitmapError, CorruptImageError, FormatError,
                     ImageClosedError, Qcow2Error, SnapshotAccessError,
                     UnsupportedFeatureError)
from .version import __version__

#: public name -> the module that defines it
_LAZY = {
    "DEFAULT_POLICY": ".backing", "NO_BACKING": ".backing", "BackingPolicy": ".backing",
    "Image": ".image", "Run": ".image",
    "open": ".opener", "create": ".opener", "CreateError": ".opener",
    "check_path": ".opener", "CheckResult": ".qcow2.checkresult",
    "BlockKind": ".node", "Extent": ".node", "Node": ".node",
    "Bitmap": ".qcow2.bitmaps",
    "ImageLockedError": ".errors", "ForceShareError": ".errors",
    "BlockCopy": ".jobs.blockcopy", "CopyStats": ".jobs.blockcopy",
    "fleece": ".backup", "push": ".backup", "Fleecing": ".backup",
    "FleecingStats": ".backup", "PushResult": ".backup", "BackupCancelled": ".backup",
    "commit": ".jobs.commit", "CommitError": ".jobs.commit",
    "rebase": ".jobs.rebase", "RebaseError": ".jobs.rebase",
    "compare": ".jobs.compare", "CompareResult": ".jobs.compare",
    "measure": ".jobs.measure", "MeasureResult": ".jobs.measure",
    "amend": ".jobs.amend", "AmendError": ".errors", "ResizeError": ".errors",
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


__all__ = [
    "open", "create", "CreateError", "check_path", "CheckResult", "ImageLockedError",
    "ForceShareError", "Image", "Run", "BackingPolicy", "DEFAULT_POLICY", "NO_BACKING",
    "BlockCopy", "CopyStats",
    "Qcow2Error", "FormatError", "UnsupportedFeatureError", "CorruptImageError",
    "BackingChainError", "ImageClosedError", "BitmapError", "Bitmap", "SnapshotAccessError",
    "Node", "Extent", "BlockKind", "__version__",
    "backup", "fleece", "push", "Fleecing", "FleecingStats", "PushResult", "BackupCancelled",
    "compare", "CompareResult", "commit", "CommitError", "rebase", "RebaseError",
    "measure", "MeasureResult", "amend", "AmendError", "ResizeError",
]
