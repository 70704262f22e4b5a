"""``qcow2py check`` and ``check -r all`` against ``qemu-img check`` on corrupt images.

The differential test mutates the metadata of QEMU-made images (the bases and
mutations of tests/test_fuzz.py: all cluster sizes, v2/v3, extended L2,
compressed, snapshots, bitmaps, a 2 MiB-cluster 1-bit-refcount image) with
seeds of its own, and requires for every case:

* ``qcow2py check`` exits with ``qemu-img check``'s code (0/1/2/3/63);
* when ``qemu-img check -r all`` leaves its copy clean, ``qcow2py check -r all``
  leaves ours clean by ``qemu-img check``;
* nothing but a Qcow2Error escapes, under a 2 GiB address-space limit and
  20 s per image (subprocess workers: tests/check_worker.py).

Reproduce a case: ``QCOW2PY_CHECK_SEED=<seed> pytest tests/test_check_corrupt.py -k <image>``
(the failure message names the case, its seed and its mutations).
``QCOW2PY_CHECK_CASES=<n>`` sets the cases per image (default 24: 240 in all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import List, Optional

import pytest

from test_fuzz import BASE_NAMES, bases, make_case, read_line, run_pool  # noqa: F401 - bases is a fixture
from fuzz_worker import apply_case
from qemu import need

SEED = int(os.environ.get("QCOW2PY_CHECK_SEED", "20261207"))
CASES = int(os.environ.get("QCOW2PY_CHECK_CASES", "24"))
AS_LIMIT = 2 << 30
CASE_TIMEOUT = 20.0
QEMU_REPAIR_TIMEOUT = float(os.environ.get("QCOW2PY_CHECK_QEMU_TIMEOUT", "3"))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "check_worker.py")


class _Worker:
    """One check_worker.py process; restarted after a timeout or a crash."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.buf = b""

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, WORKER, str(AS_LIMIT)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL,
                                     env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.buf = b""
        line = self._readline(60.0)
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError("check worker did not start")

    def _readline(self, timeout: float) -> Optional[bytes]:
        line, self.buf = read_line(self.proc.stdout.fileno(), self.buf, timeout)
        return line

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
            self.proc.stdout.close()
            self.proc = None

    def run(self, job: dict) -> dict:
        if self.proc is None:
            self._start()
        t0 = time.monotonic()
        self.proc.stdin.write(json.dumps(job).encode() + b"\n")
        self.proc.stdin.flush()
        line = self._readline(CASE_TIMEOUT)
        if line:
            return json.loads(line)
        self.close()
        what = "timeout" if line is None else "worker died"
        return {"id": job["id"], "code": "bad", "rcode": "bad",
                "detail": f"{what} after {time.monotonic() - t0:.1f} s", "rdetail": "",
                "elapsed": time.monotonic() - t0}


def _qemu_code(path: str, *args: str) -> int:
    need("qemu-img")
    return subprocess.run(["qemu-img", "check", *args, path], capture_output=True).returncode


def _judge(job: dict, r: dict) -> dict:
    """Compare one worker result with qemu-img on a copy of the same image."""
    case = job["case"]
    qpath = job["path"] + ".q"
    apply_case(case, qpath)
    r["qcode"] = _qemu_code(qpath)
    try:
        # qemu-img itself is slow on a few hostile images: those are left out of
        # the repair comparison (counted as "qemu-img's repair not clean")
        subprocess.run(["qemu-img", "check", "-r", "all", qpath], capture_output=True,
                       timeout=QEMU_REPAIR_TIMEOUT)
        r["q_clean"] = _qemu_code(qpath) == 0
    except subprocess.TimeoutExpired:
        r["q_clean"] = False
    r["ours_clean"] = r["rcode"] != "bad" and _qemu_code(job["repaired"]) == 0
    for p in (qpath, job["path"], job["repaired"]):
        if os.path.exists(p):
            os.unlink(p)
    return r


def run_jobs(jobs: List[dict]) -> List[dict]:
    def handle(w: _Worker, j: dict) -> dict:
        r = _judge(j, w.run(j))
        r["job"] = j
        return r

    return run_pool(jobs, lambda _wid: _Worker(), handle)


def _describe(r: dict) -> str:
    c = r["job"]["case"]
    return (f"case {r['id']} (QCOW2PY_CHECK_SEED={SEED}): qcow2py check {r['code']}, "
            f"qemu-img {r['qcode']}; after -r all: qemu clean {r['q_clean']}, "
            f"ours clean {r['ours_clean']} (repair exit {r['rcode']})\n"
            f"  mutations: {'; '.join(c['desc'])}\n  {r['detail'][-600:]}\n"
            f"  repair: {r['rdetail'][-400:]}")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", BASE_NAMES)
def test_check_agrees_with_qemu(bases, name):
    need("qemu-img")
    b = bases(name)
    n = CASES // 2 if name == "big" else CASES
    jobs = []
    for i in range(n):
        case = make_case(b, SEED * 1000 + i)
        case["id"] = f"check-{name}-{i}"
        p = os.path.join(bases.folder, f"{case['id']}.qcow2")
        jobs.append({"id": case["id"], "case": case, "path": p, "repaired": p + ".r"})
    t0 = time.monotonic()
    res = run_jobs(jobs)
    assert len(res) == len(jobs)
    agree = sum(r["code"] == r["qcode"] for r in res)
    qclean = [r for r in res if r["q_clean"]]
    fixed = sum(r["ours_clean"] for r in qclean)
    print(f"\ncheck {name}: {len(res)} cases in {time.monotonic() - t0:.1f} s: exit code "
          f"agrees {agree}/{len(res)}; repaired clean {fixed}/{len(qclean)} where qemu-img's is; "
          f"slowest qcow2py case {max(r['elapsed'] for r in res):.2f} s "
          f"({max(res, key=lambda r: r['elapsed'])['id']})")
    bad = [r for r in res if r["code"] != r["qcode"] or "bad" in (r["code"], r["rcode"])
           or (r["q_clean"] and not r["ours_clean"])]
    assert not bad, f"{len(bad)} of {len(res)} cases disagree:\n\n" + \
        "\n\n".join(_describe(r) for r in bad[:10])
