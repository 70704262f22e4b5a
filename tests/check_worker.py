"""Worker process for tests/test_check_corrupt.py (not a test module).

Reads one JSON job per line on stdin: {"id", "case", "path", "repaired"}.
Builds the mutated image at ``path`` (tests/fuzz_worker.py's apply_case),
runs ``check`` on it, then ``check -r all`` on a copy at ``repaired``, and
prints one JSON result per line: the exit codes qemu-img would give, or
"bad" with a traceback when a non-Qcow2Error escaped.  Runs under
RLIMIT_AS (2 GiB by default): a huge allocation is a MemoryError, reported.

Usage: python check_worker.py AS_LIMIT_BYTES
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def exit_code(path: str, repair=None):
    """(exit code, detail) of ``qcow2py check [-r repair] path``."""
    from qcow2py.opener import check_path
    from qcow2py.qcow2.check import NotQcow2
    from qcow2py.errors import Qcow2Error
    try:
        res = check_path(path, None, repair)
    except NotQcow2:
        return 63, ""
    except Qcow2Error as e:
        return 1, f"{type(e).__name__}: {e}"
    except BaseException as e:          # noqa: B902 - everything else is a bug
        if isinstance(e, KeyboardInterrupt):
            raise
        return "bad", "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return res.exit_code, "\n".join(res.messages[:8])


def main() -> None:
    from fuzz_worker import apply_case
    import qcow2py.qcow2.check  # noqa: F401 - import before limiting the address space
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        t0 = time.monotonic()
        apply_case(job["case"], job["path"])
        code, detail = exit_code(job["path"])
        shutil.copyfile(job["path"], job["repaired"])
        rcode, rdetail = exit_code(job["repaired"], "all")
        print(json.dumps({"id": job["id"], "code": code, "detail": detail[-3000:],
                          "rcode": rcode, "rdetail": rdetail[-3000:],
                          "elapsed": time.monotonic() - t0}), flush=True)


if __name__ == "__main__":
    main()
