"""Worker process for tests/test_fuzz.py (not a test module).

Reads one JSON case per line on stdin, builds the mutated image, then
opens it and runs info(), map() and reads the guest data; then check(),
check -r all and an "r+" write workload (check_case).  Prints one JSON
result per line.  The process runs under RLIMIT_AS (a huge allocation
becomes a MemoryError, reported as a failure) and the parent kills it on a
timeout; a segfault shows up as the process dying.

Usage: python fuzz_worker.py SCRATCH_DIR WORKER_ID HEADROOM_BYTES
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import sys
import time
import traceback

MiB = 1 << 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")            # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def read_plan(size: int):
    """1 MiB chunks over the whole image, or a bounded sample of a huge one."""
    if size <= 0:
        return []
    plan = []
    if size <= 64 * MiB:
        plan = [(o, min(MiB, size - o)) for o in range(0, size, MiB)]
    else:
        plan = [(o, MiB) for o in range(0, 8 * MiB, MiB)]
        plan += [((size * k // 9) & ~(MiB - 1), MiB) for k in range(1, 9)]
        plan.append((size - MiB, MiB))
    odd = min(12345, size - 1)
    plan.append((odd, min(5000, size - odd)))
    return plan


def _selftest(kind: str) -> None:
    """Misbehave on purpose, so the test can prove the harness notices."""
    if kind == "raise":
        raise IndexError("selftest")
    if kind == "segv":
        import signal
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "hang":
        time.sleep(3600)
    if kind == "alloc":
        bytearray(8 << 30)
    if kind == "rss":
        b = b"\x01" * (300 << 20)            # memset: every page touched
        del b


def run_case(path: str, selftest: str = ""):
    """(status, stage, detail): status is ok, rejected or bad."""
    import qcow2py
    from qcow2py.report import map_json, qemu_json

    stage = "open"
    try:
        if selftest:
            _selftest(selftest)
        img = qcow2py.open(path)
        with img:
            stage = "info"
            qemu_json(img.info())
            img.info(backing_chain=True)
            stage = "map"
            map_json(img.map())
            stage = "read"
            for off, n in read_plan(img.size):
                data = img.read(off, n)
                if len(data) != n:
                    return "bad", stage, f"read({off}, {n}) returned {len(data)} bytes"
    except qcow2py.Qcow2Error as e:
        msg = str(e)
        if len(msg.strip()) < 10:
            return "bad", stage, f"{type(e).__name__} with a vague message: {msg!r}"
        return "rejected", stage, f"{type(e).__name__}: {msg}"
    except BaseException as e:          # noqa: B902 - everything else is a bug
        if isinstance(e, KeyboardInterrupt):
            raise
        return "bad", stage, "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return "ok", stage, ""


def check_case(path: str, scratch: str, case_id: str):
    """check, check -r all and an "r+" write workload on copies of the image.

    Returns (status, stage, detail, written): status "bad" when anything but a
    Qcow2Error escapes, or when an image our check (== qemu-img check's verdict,
    see tests/test_check_corrupt.py) finds clean is corrupt after our writes;
    ``written`` is the written copy of a clean image (the parent runs qemu-img
    check on it), else None."""
    import qcow2py
    from qcow2py.opener import check_path
    from qcow2py.qcow2.check import NotQcow2

    def verdict(p, repair=None):
        try:
            return check_path(p, None, repair).exit_code
        except NotQcow2:
            return 63
        except qcow2py.Qcow2Error:
            return 1

    stage = "check"
    written = None
    try:
        before = verdict(path)
        stage = "repair"
        copy = os.path.join(scratch, f"repair-{case_id}.qcow2")
        shutil.copyfile(path, copy)
        verdict(copy, "all")
        stage = "write"
        shutil.copyfile(path, copy)
        with open(copy, "rb") as f:
            f.seek(20)
            cluster_bits = int.from_bytes(f.read(4), "big")
        if cluster_bits > 16:
            # the writer decodes a whole refcount block into uint64 (128 MiB for a
            # 2 MiB cluster of 1-bit refcounts): past PEAK_LIMIT, a known limit
            return "ok", stage, "", None
        try:
            with qcow2py.open(copy, "r+", format="qcow2") as img:
                img.write(0, b"\x5a" * min(65536, img.size))
                if img.size > 1 << 20:
                    img.write(img.size - 4096, b"\xa5" * 4096)
                    img.write_zeroes(img.size // 2 & ~65535, 65536)
                img.flush()
        except qcow2py.Qcow2Error:
            pass
        except OSError as e:
            # a data cluster the image places beyond what the file system allows
            # (QEMU's write fails with the same EFBIG)
            if e.errno != errno.EFBIG:
                raise
        if before == 0:
            stage = "check after write"
            after = verdict(copy)
            if after in (1, 2):
                return "bad", stage, f"clean image made corrupt by writes: check {after}", None
            written = os.path.join(scratch, f"written-{case_id}.qcow2")
            os.replace(copy, written)
    except qcow2py.Qcow2Error:
        pass
    except BaseException as e:          # noqa: B902 - everything else is a bug
        if isinstance(e, KeyboardInterrupt):
            raise
        return "bad", stage, "".join(traceback.format_exception(type(e), e, e.__traceback__)), \
            None
    finally:
        if os.path.exists(os.path.join(scratch, f"repair-{case_id}.qcow2")):
            os.unlink(os.path.join(scratch, f"repair-{case_id}.qcow2"))
    return "ok", stage, "", written


def apply_case(case: dict, path: str) -> None:
    shutil.copyfile(case["base"], path)
    with open(path, "r+b") as f:
        for off, hexdata in case["edits"]:
            f.seek(off)
            f.write(bytes.fromhex(hexdata))
        if case.get("truncate") is not None:
            f.truncate(case["truncate"])


def main() -> None:
    scratch, wid, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import qcow2py  # noqa: F401 - import everything before measuring
    import qcow2py.report  # noqa: F401
    # start the decompression threads now, so their stacks count in the baseline
    from qcow2py.qcow2.decompress import pool as _pool
    list(_pool().map(time.sleep, [0.01] * 2 * (os.cpu_count() or 2)))
    base_as = _status_kib("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (base_as + headroom, resource.RLIM_INFINITY))
    path = os.path.join(scratch, f"case-w{wid}.qcow2")
    print(json.dumps({"ready": True, "vmsize": base_as}), flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        apply_case(case, path)
        rss0 = _status_kib("VmRSS") * 1024
        _reset_peak_rss()
        t0 = time.monotonic()
        status, stage, detail = run_case(path, case.get("selftest", ""))
        written = None
        if status != "bad" and not case.get("selftest") and case.get("check", True):
            st2, stage2, detail2, written = check_case(path, scratch, case["id"])
            if st2 == "bad":
                status, stage, detail = st2, stage2, detail2
        elapsed = time.monotonic() - t0
        peak = _status_kib("VmHWM") * 1024 - rss0
        saved = None
        if status == "bad":
            saved = os.path.join(scratch, f"fail-{case['id']}.qcow2")
            apply_case(case, saved)
        print(json.dumps({"id": case["id"], "status": status, "stage": stage,
                          "detail": detail[-3000:], "elapsed": elapsed, "peak": peak,
                          "saved": saved, "written": written}), flush=True)


if __name__ == "__main__":
    main()
