"""What every benchmark command shares: ``--isolate``, ``--json`` and the report header.

On a shared machine other processes decide a timing unless the benchmark
runs at top priority in a scheduler autogroup of its own; ``--isolate``
re-runs the command so (as root), and the header says what priority the run
had and how loaded the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import List, Optional

ISOLATED_ENV = "QCOW2PY_BENCH_ISOLATED"


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--isolate", action="store_true",
                    help="run in a new session (its own scheduler autogroup) at nice -19, so "
                         "other load on a shared machine does not decide the result (root)")


def raise_priority() -> None:
    """In the new session's child: top priority for its autogroup and itself (needs root)."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write("-19")
        os.nice(-19 - os.nice(0))
    except OSError:
        pass        # not root, or no autogroups: run as is (the header says so)


def priority() -> str:
    try:
        with open("/proc/self/autogroup") as f:
            group = f.read().split()[-1]
    except (OSError, IndexError):
        group = "?"
    return f"nice {os.nice(0)}, autogroup nice {group}"


def rerun_isolated(module: str, argv: Optional[List[str]]) -> Optional[int]:
    """With ``--isolate``: run ``python -m module`` again in its own session at top
    priority and return its exit code; None when this already is that run."""
    if os.environ.get(ISOLATED_ENV):
        return None
    rest = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--isolate"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", module, *rest], cwd=root,
                       env=dict(os.environ, **{ISOLATED_ENV: "1"}),
                       start_new_session=True, preexec_fn=raise_priority)
    return p.returncode


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def report(header: str, load_before: str, table: str, rows, json_path: Optional[str]) -> None:
    """Print the header (with the machine's load and the run's priority) and the table;
    write the rows as JSON when asked."""
    print(f"{header}, {os.cpu_count()} CPUs, load average before: {load_before}, {priority()}")
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
