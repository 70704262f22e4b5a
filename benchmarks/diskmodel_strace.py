"""The requests of a process, read out of an ``strace -f -y`` log, as the
:class:`~benchmarks.diskmodel.IO` trace the disk models replay.

Record with :data:`STRACE_ARGS` (``strace -f -y`` on the positional read and
write calls, strings cut short); :func:`parse_strace_calls` gives every call
with what it asked for and got, :func:`parse_strace` the transfers as
:class:`~benchmarks.diskmodel.IO`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from .diskmodel import IO


#: how to record a process's requests for :func:`parse_strace`
STRACE_ARGS = ["strace", "-f", "-y", "-s", "8", "-e",
               "trace=pread64,preadv,preadv2,pwrite64,pwritev,pwritev2", "-o"]

_SYSCALLS = {"pread64": False, "preadv": False, "preadv2": False,
             "pwrite64": True, "pwritev": True, "pwritev2": True}
_PID = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>\s?(.*)$")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"(?:\.\.\.)?')
_CALL = re.compile(r"^(\w+)\((\d+)(?:<(.*?)>)?, (.*)\)\s+=\s+(-?\d+)")


@dataclass
class StraceRequest:
    """One parsed call: the bytes asked for (``requested``, from the count or the
    iovec lengths, None if strace abbreviated the iovec array) and transferred
    (``result``)."""

    pid: int
    syscall: str
    file: str
    offset: int
    requested: Optional[int]
    result: int


def parse_strace_calls(lines: Iterable[str]) -> List[StraceRequest]:
    """The positional read/write calls of an ``strace -f -y`` log, in issue order.

    Handles ``<unfinished ...>`` / ``<... resumed>`` pairs of concurrent threads
    (a call interrupted that way keeps the place where it started) and the
    iovec arrays of ``preadv``/``pwritev`` (their ``iov_len`` summed).
    """
    out: List[Optional[StraceRequest]] = []
    pending: Dict[int, Tuple[str, int]] = {}
    for line in lines:
        line = line.rstrip("\n")
        m = _PID.match(line)
        if m:
            pid, rest = int(m.group(1)), m.group(2)
        else:
            pid, rest = 0, line
        if rest.endswith("<unfinished ...>"):
            # keep the call's place: requests are listed in the order they were issued
            pending[pid] = (rest[:-len("<unfinished ...>")].rstrip(), len(out))
            out.append(None)
            continue
        slot = None
        r = _RESUMED.match(rest)
        if r:
            if pid not in pending:
                continue
            head, slot = pending.pop(pid)
            rest = head + (" " if head.endswith(",") else "") + r.group(2)
        name = rest.split("(", 1)[0]
        if name not in _SYSCALLS:
            continue
        # strings can hold anything: blank them before splitting the arguments
        flat = _STRING.sub('""', rest)
        c = _CALL.match(flat)
        if not c:
            continue
        fd, path, args, ret = c.group(2), c.group(3), c.group(4), int(c.group(5))
        if name in ("preadv", "preadv2", "pwritev", "pwritev2"):
            if "[" in args:
                arr, tail = args.rsplit("]", 1)
                lens = [int(x) for x in re.findall(r"iov_len=(\d+)", arr)]
                truncated = arr.rstrip().endswith("...")
                requested = None if truncated else sum(lens)
            else:
                tail, requested = args, None
            nums = [x.strip() for x in tail.split(",") if x.strip()]
            offset = int(nums[1])              # iovcnt, offset[, flags]
        else:
            nums = [x.strip() for x in args.split(",")]
            requested, offset = int(nums[-2]), int(nums[-1])
        req = StraceRequest(pid, name, path if path is not None else f"fd{fd}", offset,
                            requested, ret)
        if slot is None:
            out.append(req)
        else:
            out[slot] = req
    return [r for r in out if r is not None]


def parse_strace(lines: Iterable[str], files: Optional[Iterable[str]] = None) -> List[IO]:
    """The requests of an ``strace -f -y`` log as :class:`IO` (bytes transferred).

    Failed calls and zero-length transfers (end of file) are dropped.  With
    ``files``, only requests on those paths are kept.
    """
    keep = set(files) if files is not None else None
    ios = []
    for r in parse_strace_calls(lines):
        if r.result <= 0 or (keep is not None and r.file not in keep):
            continue
        ios.append(IO(r.file, r.offset, r.result, _SYSCALLS[r.syscall], r.pid))
    return ios
