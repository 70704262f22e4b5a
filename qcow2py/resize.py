"""Resize images (``qemu-img resize``): sizes as qemu-img parses them, its refusals.

The qcow2 work (L1 growth, crash-safe switch, releasing a shrunk tail) is the
writable image's :meth:`~qcow2py.writer.WritableQcow2Image.set_size`; this
module holds what is format-independent: parsing ``+64M``/``-8M``, the checks
qemu-img makes before it resizes, raw files, and zero-filling the new area of
an overlay whose backing file is longer than the old size (it would show
through otherwise, as QEMU's block layer also prevents).
"""

from __future__ import annotations


from .errors import Qcow2Error, UnsupportedFeatureError
from .image import Image

SHRINK_WARNING = ("warning: Shrinking an image will delete all data beyond the shrunken "
                  "image's end. Before performing such an operation, make sure there is no "
                  "important data there.")


class ResizeError(Qcow2Error, ValueError):
    """qemu-img would refuse this resize (shrink without --shrink, bad size...)."""


def parse_resize(text: str, current: int) -> int:
    """``qemu-img resize``'s size argument: absolute, or ``+N``/``-N`` relative."""
    from .cli import parse_qemu_size
    sign = text[:1] if text[:1] in "+-" else ""
    try:
        n = parse_qemu_size(text[1:] if sign else text)
    except ValueError:
        raise ResizeError("Parameter 'size' expects a non-negative number below 2^64\n"
                          "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                          "tera-, peta-\nand exabytes, respectively.") from None
    size = current + n if sign == "+" else current - n if sign == "-" else n
    if size < 0:
        raise ResizeError("New image size must be positive")
    return size


def check_resize(img: Image, new_size: int, shrink: bool) -> int:
    """The size the image will have, or the refusal qemu-img gives."""
    new_size = int(new_size)
    if new_size < img.size and not shrink:
        raise ResizeError("Use the --shrink option to perform a shrink operation.")
    if img.format == "qcow2" and new_size % 512:
        raise ResizeError("The new size must be a multiple of 512")
    if getattr(img, "bitmaps", None):
        raise UnsupportedFeatureError(f"{img.filename}: resizing an image with persistent "
                                      f"bitmaps is not supported by qcow2py yet")
    if new_size < img.size and getattr(img, "snapshots", None):
        raise ResizeError("Can't shrink an image which has snapshots")
    return new_size


def resize(img: Image, new_size: int, *, shrink: bool = False) -> None:
    """Resize an image opened "r+" (qcow2 or raw) to ``new_size`` bytes."""
    if img.read_only:
        raise ValueError(f"image {img.filename!r} is open read-only (use mode 'r+')")
    old = img.size
    if img.format == "raw":
        new_size = check_resize(img, new_size, shrink)
        img.storage.truncate(new_size)
        img.size = new_size
        return
    method = getattr(img, "set_size", None)
    if method is None:
        raise UnsupportedFeatureError(f"{img.filename}: format {img.format} cannot be resized")
    method(new_size, shrink=shrink)
    b = img.backing
    if b is not None and img.size > old and b.size > old:
        # the backing file would show through the new area: it must read as zeros
        img.write_zeroes(old, min(img.size, b.size) - old)
        img.flush()
