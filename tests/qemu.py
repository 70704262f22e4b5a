"""Helpers to drive qemu-img / qemu-io, the oracle of the test-suite.

When the tools are missing a test that needs them is skipped, except under
``QCOW2PY_REQUIRE_QEMU=1`` (CI), where it fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from typing import List, Sequence

import pytest

REQUIRE = os.environ.get("QCOW2PY_REQUIRE_QEMU") == "1"


def unavailable(msg: str) -> None:
    """A test cannot run here: a skip, or a failure under QCOW2PY_REQUIRE_QEMU=1
    (CI), so a skip never passes for a pass there."""
    if REQUIRE:
        pytest.fail(msg + " and QCOW2PY_REQUIRE_QEMU=1")
    pytest.skip(msg)


def need(tool: str = "qemu-img") -> str:
    path = shutil.which(tool)
    if path is None:
        unavailable(f"{tool} is not installed")
    return path


def run(args: Sequence[str], cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    need(args[0])
    p = subprocess.run(list(args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n"
                             f"{p.stdout}\n{p.stderr}")
    return p


def qemu_img(*args, cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    return run(["qemu-img", *map(str, args)], cwd=cwd, check=check)


def qemu_io(image, *commands: str, fmt: str = "qcow2", cwd=None) -> None:
    """Run qemu-io commands (each one a ``-c`` string) against an image."""
    args: List[str] = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    args.append(str(image))
    p = run(args, cwd=cwd)
    for line in p.stdout.splitlines() + p.stderr.splitlines():
        if "error" in line.lower() or "failed" in line.lower():
            raise AssertionError(f"qemu-io reported: {line}")


def create(path, size, *opts: str, fmt: str = "qcow2", backing=None, backing_fmt=None,
           cwd=None) -> None:
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt or "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, str(path), str(size), cwd=cwd)


def info_json(path, *extra: str, cwd=None):
    return json.loads(qemu_img("info", "--output=json", *extra, str(path), cwd=cwd).stdout)


def map_json(path, cwd=None):
    return json.loads(qemu_img("map", "--output=json", str(path), cwd=cwd).stdout)


def raw_sha256(path, tmp_dir, cwd=None) -> str:
    """sha256 of the guest content, as ``qemu-img convert -O raw`` produces it."""
    out = os.path.join(str(tmp_dir), "reference.raw")
    qemu_img("convert", "-O", "raw", str(path), out, cwd=cwd)
    h = hashlib.sha256()
    with open(out, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    os.unlink(out)
    return h.hexdigest()
