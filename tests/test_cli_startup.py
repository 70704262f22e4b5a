"""The command line as a user first meets it: start-up cost and a closed pipe.

* ``qcow2py info`` must not import numpy, the copy engine, the writer or check (they
  cost more than the whole command: numpy alone ~0.1 s of CPU);
* ``qcow2py check IMG | head -1``: when the reader of stdout goes away,
  qemu-img stays silent and exits with its command's status; so must we.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qemu import create, need, qemu_io


def _imported_by_info(path) -> set:
    code = ("import sys; sys.argv = ['qcow2py', 'info', %r]; "
            "from qcow2py.cli import main; main(sys.argv[1:]); "
            "import json; print(json.dumps(sorted(sys.modules)), file=sys.stderr)" % str(path))
    p = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, check=True)
    return set(json.loads(p.stderr.strip().splitlines()[-1]))


def test_info_imports_neither_numpy_nor_engines(tmp_path):
    need("qemu-img")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, "4M")
    create(top, "4M", backing=str(base), backing_fmt="qcow2")
    mods = _imported_by_info(top)
    heavy = {"numpy", "qcow2py.jobs.blockcopy.blockcopy", "qcow2py.qcow2.image",
             "qcow2py.qcow2.write", "qcow2py.qcow2.check", "concurrent.futures"}
    assert not mods & heavy, sorted(mods & heavy)
    assert "qcow2py.qcow2.read" in mods                  # it did open the image


def test_lazy_package_names_still_resolve():
    import importlib
    import pkgutil
    import types

    import qcow2py
    # importing every submodule must not rebind a public name to a module
    # (``import qcow2py.create`` sets the attribute ``create`` of the package)
    for info in pkgutil.walk_packages(qcow2py.__path__, "qcow2py."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in qcow2py.__all__:
        value = getattr(qcow2py, name)
        is_module = isinstance(value, types.ModuleType)
        assert value is not None and is_module == (name == "backup"), name
    assert callable(qcow2py.create) and callable(qcow2py.open)
    with pytest.raises(AttributeError):
        qcow2py.no_such_name


def _closed_pipe_run(cmd, cwd):
    """Run ``cmd`` with stdout a pipe whose read end is already closed."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run(cmd, stdout=w, stderr=subprocess.PIPE, text=True, cwd=cwd)
    finally:
        os.close(w)
    return p.returncode, p.stderr


@pytest.mark.parametrize("args", [["check"], ["info"], ["map"], ["map", "--output=json"],
                                  ["check", "--output=json"]])
@pytest.mark.parametrize("leaky", [False, True])
def test_closed_stdout_pipe_like_qemu_img(tmp_path, args, leaky):
    need("qemu-img")
    img = tmp_path / "a.qcow2"
    create(img, "8M")
    qemu_io(img, "write -P 0x11 0 1M")
    if leaky:          # a leaked cluster: check exits 3, and must still do so
        raw = bytearray(img.read_bytes())
        hdr_rt = int.from_bytes(raw[48:56], "big")
        rb = int.from_bytes(raw[hdr_rt:hdr_rt + 8], "big")
        end = len(raw) // 65536
        raw[rb + 2 * end:rb + 2 * end + 2] = (1).to_bytes(2, "big")
        raw += bytes(65536)
        img.write_bytes(bytes(raw))
    theirs = _closed_pipe_run(["qemu-img", *args, img.name], tmp_path)
    ours = _closed_pipe_run([sys.executable, "-m", "qcow2py", *args, img.name], tmp_path)
    assert ours[0] == theirs[0], (ours, theirs)          # the command's own status
    assert "pipe" not in ours[1].lower() and "qcow2py:" not in ours[1], ours
    if not leaky:
        assert ours[1] == theirs[1] == ""


def test_head_of_check_is_quiet(tmp_path):
    """The exact command of the report: ``qcow2py check IMG | head -1``."""
    need("qemu-img")
    img = tmp_path / "a.qcow2"
    create(img, "8M")
    p = subprocess.run(f"{sys.executable} -m qcow2py check {img.name} | head -1; "
                       f"echo status=${{PIPESTATUS[0]}}", shell=True, executable="/bin/bash",
                       cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stderr == "" and p.stdout.endswith("status=0\n"), p
