"""Standard output into a pipe whose reader went away (``qcow2py check IMG | head -1``).

qemu-img ignores SIGPIPE and the failed writes: it stays silent and exits with
the status of its command.  Python raises BrokenPipeError instead, which the
command-line tools used to report as an error of the *image* (status 1).
:func:`quiet_broken_pipe` makes stdout behave as qemu-img's: after the first
broken-pipe write the descriptor is pointed at ``/dev/null``, later output is
dropped, and the command's own exit status stands.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


class _QuietStdout:
    """A stdout stand-in that drops output once the pipe is broken."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _drop(self) -> None:
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, self._stream.fileno())     # the buffered rest goes nowhere
            os.close(fd)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def quiet_broken_pipe() -> Iterator[None]:
    """Run a command with qemu-img's behaviour on a closed stdout pipe."""
    original = sys.stdout
    sys.stdout = quiet = _QuietStdout(original)
    try:
        yield
    finally:
        quiet.flush()
        sys.stdout = original
