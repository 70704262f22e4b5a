"""``numpy`` imported on first use.

Importing numpy costs more than everything ``qcow2py info`` does (about 0.1 s
of CPU), and commands that only read a header never touch an array.  Modules
on that path write ``from .lazyimport import numpy as np``: the first
attribute looked up imports numpy and copies its namespace into the proxy, so
later lookups are plain attribute reads (no per-call indirection on hot paths).
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """A stand-in for a module, importing it on the first attribute access."""

    def __init__(self, name: str) -> None:
        self.__dict__["_lazy_name"] = name

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__dict__["_lazy_name"])
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__dict__['_lazy_name']!r}>"


numpy: Any = LazyModule("numpy")


def lazy_module(name: str) -> Any:
    """A qcow2py module imported on first use, for modules a command may not need
    (the writer, check, the jobs): declared at module level, where
    ``tests/test_layers.py`` checks it against the layer order like an import."""
    return LazyModule(name)
