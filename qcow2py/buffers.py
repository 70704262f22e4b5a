"""Result buffers for ``Image.read``: one zeroed allocation, filled in place.

``read()`` returns ``bytes``.  Filling a ``bytearray`` and then copying it into
``bytes`` costs a second allocation and a copy of every byte, and for 1 MiB
requests the two fresh allocations dominate the read (the kernel maps, faults
in and zeroes each one).  Instead :func:`zeroed_bytes` allocates the result
once, as ``bytes(n)`` (which CPython gets from ``calloc``: pages that are
already zero), and hands back a writable view of it, through cffi, for the
reader to fill before anyone else sees the object.  Small results (where
CPython may hand out shared, cached objects) take the copying path.
"""

from __future__ import annotations

from typing import Optional, Tuple

#: below this size the copy is cheap and ``bytes(n)`` may be a shared object
IN_PLACE_MIN = 4096

_ffi = None


def _cffi():
    global _ffi
    if _ffi is None:
        try:
            import cffi
            _ffi = cffi.FFI()
        except ImportError:        # pragma: no cover - cffi is a dependency
            _ffi = False
    return _ffi


def zeroed_bytes(n: int) -> Tuple[object, memoryview]:
    """``(result, view)``: a zero-filled result of ``n`` bytes and a writable view
    of its memory.  ``result`` is a fresh ``bytes`` object nobody else holds when
    ``n >= IN_PLACE_MIN`` (fill it through ``view``, then return it), else a
    ``bytearray`` for :func:`finish` to turn into ``bytes``."""
    ffi = _cffi() if n >= IN_PLACE_MIN else None
    if ffi:
        out = bytes(n)
        return out, memoryview(ffi.buffer(ffi.from_buffer(out), n))
    buf = bytearray(n)
    return buf, memoryview(buf)


def finish(result: object) -> bytes:
    """The ``bytes`` to hand to the caller (a copy only for the small path)."""
    return result if type(result) is bytes else bytes(result)


def zero_fill(view: memoryview, np: Optional[object] = None) -> None:
    """Zero a writable buffer in place (no temporary of its size)."""
    if len(view) < IN_PLACE_MIN or np is None:
        view[:] = bytes(len(view))
    else:
        np.frombuffer(view, dtype=np.uint8).fill(0)
