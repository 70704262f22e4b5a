"""The command lines: argv in, calls into the engine out.

``qcow2py ...`` is :mod:`qcow2py.cli.img`, ``qcow2py-copy`` is :mod:`qcow2py.cli.copy`;
:mod:`qcow2py.cli.options` is the one qemu-style size and ``-o`` parser both use.
"""

from .img import main
from .options import parse_qemu_size

__all__ = ["main", "parse_qemu_size"]
