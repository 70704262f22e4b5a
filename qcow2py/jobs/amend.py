"""``qcow2py.amend``: ``qemu-img amend -o`` on a file name or an open image (the
work itself is the qcow2 driver's :meth:`amend`, :mod:`qcow2py.qcow2.amend`)."""

from __future__ import annotations

import os
from typing import Optional, Union

from ..errors import AmendError
from ..image import Image
from ..opener import open as open_image
from ..qcow2.amend import check_options

__all__ = ["AmendError", "amend"]


def amend(path: Union[str, "os.PathLike[str]", Image], *, compat: Optional[str] = None,
          lazy_refcounts: Optional[bool] = None, refcount_bits: Optional[int] = None,
          format: Optional[str] = None, **unsupported) -> None:
    """``qemu-img amend -o compat=...,lazy_refcounts=...,refcount_bits=...`` on ``path``
    (a file name, or an image opened "r+", which stays usable)."""
    check_options(compat, refcount_bits, unsupported)
    options = {"compat": compat, "lazy_refcounts": lazy_refcounts,
               "refcount_bits": refcount_bits}
    if isinstance(path, Image):
        path.amend(**options)
        return
    with open_image(path, "r+", format=format) as img:
        img.amend(**options)
