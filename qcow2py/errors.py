"""The exceptions qcow2py raises about images.

Everything wrong with an image is a :class:`Qcow2Error`, so a caller can catch
one class and know that the image (not the program) is at fault.  Operating
system errors pass through as :class:`OSError`.
"""

from __future__ import annotations


class Qcow2Error(Exception):
    """Base of every problem qcow2py reports about an image."""


class FormatError(Qcow2Error, ValueError):
    """A structure on disk is malformed (bad magic, field out of range, ...)."""


class UnsupportedFeatureError(Qcow2Error):
    """The image uses a feature qcow2py does not implement (named in the message)."""


class CorruptImageError(Qcow2Error):
    """Metadata found at run time contradicts itself (overlaps, bad entries)."""


class BackingChainError(Qcow2Error):
    """The backing chain loops, is too deep, is missing, or was refused by policy."""


class ImageClosedError(Qcow2Error, ValueError):
    """An operation was attempted on a closed image."""


class BitmapError(Qcow2Error, ValueError):
    """A persistent dirty bitmap operation was refused (the message is QEMU's):
    no such bitmap, a name taken, an inconsistent bitmap, sizes that differ...

    ``hint`` is the second line QEMU prints for some of them, or None.
    """

    def __init__(self, message: str, hint=None):
        super().__init__(message)
        self.hint = hint


class SnapshotAccessError(Qcow2Error, PermissionError):
    """A point-in-time snapshot read touched bytes the snapshot no longer holds
    (discarded after copy, outside its bitmap, or broken by a failed
    copy-before-write).  NBD answers it with EINVAL, as QEMU does."""


class ResizeError(Qcow2Error, ValueError):
    """qemu-img would refuse this resize (shrink without --shrink, bad size...)."""


class AmendError(Qcow2Error, ValueError):
    """An amendment qemu-img refuses (with its message)."""


class ImageLockedError(Qcow2Error):
    """Another process (QEMU or qcow2py) holds a conflicting lock on the image
    (see :mod:`qcow2py.io.locking`)."""


class ForceShareError(Qcow2Error, ValueError):
    """``force_share`` asked for an image opened read-write (qemu-img refuses it too)."""

    def __init__(self, msg: str = "force-share=on can only be used with read-only images"):
        super().__init__(msg)
