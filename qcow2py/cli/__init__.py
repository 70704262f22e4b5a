"""The command lines: argv in, calls into the engine out.

``qcow2py ...`` is :mod:`qcow2py.cli.img`, ``qcow2py-copy`` is :mod:`qcow2py.cli.copy`.
"""

from .img import main, parse_qemu_size

__all__ = ["main", "parse_qemu_size"]
