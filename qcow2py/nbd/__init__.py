"""qcow2py's NBD server: ``qcow2py-nbd`` and :class:`Server` for programs that
embed it (see :mod:`qcow2py.nbd.server`)."""

from .engine import errno_of
from .fleece import PullBackup, SwitchableNode
from .server import Export, Server

__all__ = ["Server", "Export", "errno_of", "PullBackup", "SwitchableNode"]
