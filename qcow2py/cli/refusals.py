"""What ``qemu-img convert`` refuses, refused by ``qcow2py-copy`` with its words.

A combination qemu-img refuses is one whose result would not be what the user
asked for (``-O raw -B base`` would silently write only the top layer), so each
refusal here is a guard against quiet data loss; the messages are qemu-img's,
so scripts and people that know one tool read the other.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from ..errors import BackingChainError
from ..image import Image
from ..opener import CreateError, open as open_image

def before_create(args, opts: dict) -> Optional[str]:
    """The refusal qemu-img convert makes from its options alone, or None."""
    if args.out_fmt == "raw" and args.backing:
        return "Backing file not supported for file format 'raw'"
    if ("backing_file" in opts or args.backing) and not (args.backing_fmt
                                                          or "backing_format" in opts):
        return "Use of backing file requires explicit backing format"
    if args.compress and opts.get("preallocation", "off") != "off":
        return "Compression and preallocation not supported at the same time"
    return None


@contextlib.contextmanager
def open_source(path: str, fmt: Optional[str],
                snapshot: Optional[str] = None) -> Iterator[Image]:
    """Open the source (or its internal ``snapshot``); a missing file is reported
    as qemu-img reports it."""
    try:
        img = open_image(path, format=fmt, snapshot=snapshot)
    except FileNotFoundError:
        raise CreateError(f"Could not open '{path}': Could not open '{path}': No such file "
                          f"or directory") from None
    with img:
        yield img


@contextlib.contextmanager
def creating(target: str, fmt: str) -> Iterator[None]:
    """Creating the target: its refusals carry qemu-img convert's prefix."""
    try:
        yield
    except BackingChainError as e:
        raise CreateError(f"Could not open '{target}': Could not open backing file: "
                          f"{e}") from None
    except CreateError as e:
        raise CreateError(f"{target}: error while converting {fmt}: {e}") from None
