"""NBD benchmark: ``qcow2py-nbd`` against ``qemu-nbd`` serving the same image.

Reads: ``nbdcopy --connections=4`` of the whole image to ``null:`` over a Unix
socket (multi-conn, page cache warm), read-only export on both sides; the
median of the rounds, alternating servers.  Writes: ``qemu-img bench -w``
(4 KiB requests, queue depth 32, a 1 MiB step so every request lands in
another cluster: allocation on every write, as random writes do) against a
fresh writable export of a fresh image on each side.  Reports throughput,
IOPS and the ratio qcow2py / qemu-nbd.

    python -m benchmarks.bench_nbd [--size 1G] [--rounds 3] [--writes 20000] [--isolate]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from ._runner import add_common_args, load_average, report, rerun_isolated

SERVERS = {
    "qcow2py-nbd": lambda sock, img, ro: [sys.executable, "-m", "qcow2py.nbd.cli", "-e", "16",
                                          *(["-r"] if ro else []), "-k", sock, img],
    "qemu-nbd": lambda sock, img, ro: ["qemu-nbd", "-t", "-e", "16", "-f", "qcow2",
                                       *(["-r"] if ro else []), "-k", sock, img],
}


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


class _Serving:
    def __init__(self, cmd: List[str], sock: str):
        self.sock = sock
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited: {self.proc.stderr.read().decode()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{cmd} did not listen")

    def url(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def make_image(path: str, size: int) -> None:
    """A qcow2 image with 7/8 of it data (one pattern per 64 MiB), the rest unallocated."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    step = 64 << 20
    cmds = []
    for i, off in enumerate(range(0, size * 7 // 8, step)):
        cmds += ["-c", f"write -P {i % 250 + 1} {off} {min(step, size * 7 // 8 - off)}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], check=True,
                   stdout=subprocess.DEVNULL)


def read_rate(server: str, img: str, tmp: str, rounds: int) -> float:
    """Median seconds of ``nbdcopy --connections=4 URL null:``."""
    sock = os.path.join(tmp, f"{server}.sock")
    srv = _Serving(SERVERS[server](sock, img, True), sock)
    try:
        times = []
        subprocess.run(["nbdcopy", srv.url(), "null:"], check=True)     # warm
        for _ in range(rounds):
            t = time.perf_counter()
            subprocess.run(["nbdcopy", "--connections=4", srv.url(), "null:"], check=True)
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        srv.stop()


def write_iops(server: str, size: int, tmp: str, count: int) -> float:
    img = os.path.join(tmp, f"w-{server}.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(size)], check=True)
    sock = os.path.join(tmp, f"w-{server}.sock")
    srv = _Serving(SERVERS[server](sock, img, False), sock)
    try:
        t = time.perf_counter()
        subprocess.run(["qemu-img", "bench", "-w", "-f", "raw", "-c", str(count), "-d", "32",
                        "-s", "4k", "-S", "1M", srv.url()], check=True,
                       stdout=subprocess.DEVNULL)
        return count / (time.perf_counter() - t)
    finally:
        srv.stop()
        os.unlink(img)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="256M", help="image size (default 256M; the report: 1G)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--writes", type=int, default=20000, help="qemu-img bench -c")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.isolate:
        rc = rerun_isolated("benchmarks.bench_nbd", argv)
        if rc is not None:
            return rc
    load = load_average()
    size = _size(args.size)
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        img = os.path.join(tmp, "src.qcow2")
        make_image(img, size)
        secs = {}
        for server in SERVERS:
            secs[server] = read_rate(server, img, tmp, args.rounds)
        iops = {server: write_iops(server, size, tmp, args.writes) for server in SERVERS}
    for server in SERVERS:
        rows.append({"server": server, "read_seconds": round(secs[server], 3),
                     "read_MiB_s": round(size / secs[server] / (1 << 20)),
                     "write_4k_iops": round(iops[server])})
    ratio_r = secs["qemu-nbd"] / secs["qcow2py-nbd"]
    ratio_w = iops["qcow2py-nbd"] / iops["qemu-nbd"]
    lines = [f"{'server':<12} {'nbdcopy read':>14} {'MiB/s':>8} {'4k write IOPS':>14}"]
    for r in rows:
        lines.append(f"{r['server']:<12} {r['read_seconds']:>13.3f}s {r['read_MiB_s']:>8} "
                     f"{r['write_4k_iops']:>14}")
    lines.append(f"ratio qcow2py/qemu-nbd: reads {ratio_r:.2f}x, writes {ratio_w:.2f}x")
    rows.append({"read_ratio": round(ratio_r, 3), "write_ratio": round(ratio_w, 3)})
    report(f"bench_nbd: {args.size} image, nbdcopy --connections=4 to null:, "
           f"qemu-img bench -w -d 32 -s 4k -S 1M -c {args.writes}",
           load, "\n".join(lines), rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
