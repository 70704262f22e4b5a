"""Packaging a user can rely on: the sdist carries what its tests need, the
install works without a C compiler (pure-Python twins, and it says so), and the
metadata says what the project is (SPDX license, full license text, typed).

These build from the source tree with the interpreter's own setuptools and no
network (``--no-build-isolation``), into temporary directories.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _have_build_tools():
    try:
        import setuptools
        import cffi  # noqa: F401
    except ImportError:
        pytest.fail("setuptools/cffi not importable: install the test extra (pip install -e '.[test]')")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.fail(f"setuptools {setuptools.__version__} < 77 (SPDX license strings): the test "
                    f"extra asks for setuptools>=77 (pip install -e '.[test]')")


def _run(cmd, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    assert p.returncode == 0, p.stdout[-4000:]
    return p.stdout


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    _have_build_tools()
    out = tmp_path_factory.mktemp("sdist")
    # build from a private copy: setuptools writes qcow2py.egg-info into the tree it
    # builds, and two test workers building in the checkout at once race on it
    import shutil
    tree = tmp_path_factory.mktemp("tree") / "qcow2py-src"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "*.egg-info", "build", "dist", "__pycache__", ".cache", ".out",
        "*.so", ".pytest_cache", "*.qcow2.tmp"))
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
          "print(b.build_sdist(sys.argv[1]))", str(out)], cwd=tree)
    (path,) = out.glob("qcow2py-*.tar.gz")
    return path


def test_sdist_ships_what_the_tests_need(sdist, tmp_path):
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        tf.extractall(tmp_path, filter="data") if hasattr(tarfile, "data_filter") \
            else tf.extractall(tmp_path)
    csrc = sorted(f"csrc/{p.name}" for p in (ROOT / "csrc").iterdir()
                  if p.suffix in (".c", ".h"))
    assert "csrc/qcow2py_native.h" in csrc and any(n.endswith(".c") for n in csrc), csrc
    for need in ("tests/images.py", "tests/qemu.py", "tests/data/example.qcow2",
                 "tests/data/example-base.qcow2", "LICENSE", "qcow2py/py.typed",
                 *csrc, "build_ffi.py", "setup.py"):
        assert need in names, need
    assert not any("__pycache__" in n or n.endswith(".so") for n in names)
    # the test-suite runs from the unpacked sdist (pure twins: nothing is compiled there)
    src = tmp_path / sdist.name[:-len(".tar.gz")]
    env = dict(os.environ, QCOW2PY_PURE="1", PYTHONDONTWRITEBYTECODE="1")
    out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                "no:xdist", "tests/test_example_image.py", "-k", "read_whole_chain"],
               cwd=src, env=env)
    assert "1 passed" in out, out


def test_metadata(sdist):
    with tarfile.open(sdist) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("/PKG-INFO")
                      and m.name.count("/") == 1)
        meta = tf.extractfile(member).read().decode()
        lic = tf.extractfile(next(m for m in tf.getmembers()
                                  if m.name.endswith("/LICENSE"))).read().decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "Classifier: Operating System :: POSIX :: Linux" in meta
    assert "Project-URL:" in meta
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in lic
    assert "END OF TERMS AND CONDITIONS" in lic


def _wheel(tmp_path: Path, sdist: Path, env: dict) -> tuple:
    """pip wheel from the sdist (unpacked in a fresh temporary directory, so no
    build/ left in the source tree can stand in for a compile)."""
    out = tmp_path / "wheel"
    log = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                "--no-index", "-w", str(out), str(sdist)], env=env)
    (whl,) = out.glob("qcow2py-*.whl")
    return whl, log


def test_install_without_a_c_compiler_uses_the_pure_twins(tmp_path, sdist):
    """``CC=false pip install .``: the install succeeds, says why it is pure, and
    the installed package works (and says so in ``--version``)."""
    _have_build_tools()
    env = dict(os.environ, CC="false", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("QCOW2PY_PURE", None)
    whl, log = _wheel(tmp_path, sdist, env)
    assert "installing the pure-Python twins" in log, log[-3000:]
    with zipfile.ZipFile(whl) as zf:
        names = zf.namelist()
    assert not any(n.endswith(".so") for n in names), names
    assert "qcow2py/py.typed" in names
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
          "--target", str(target), str(whl)], env=env)
    code = ("import qcow2py, qcow2py.native as n, sys; assert not n.HAVE_NATIVE; "
            "img = qcow2py.create(sys.argv[1], 1 << 20); img.write(4096, b'x' * 70000); "
            "img.close(); img = qcow2py.open(sys.argv[1]); "
            "assert img.read(4096, 70000) == b'x' * 70000; print(qcow2py.__file__)")
    # -S: no .pth files, so a development (editable) install of qcow2py cannot lend
    # its compiled module; the dependencies come from this interpreter's site-packages
    import sysconfig
    run_env = dict(env, PYTHONPATH=os.pathsep.join([str(target),
                                                    sysconfig.get_paths()["purelib"],
                                                    sysconfig.get_paths()["platlib"]]))
    where = _run([sys.executable, "-S", "-c", code, str(tmp_path / "t.qcow2")], env=run_env,
                 cwd=tmp_path)
    assert where.strip().startswith(str(target)), where
    version = _run([sys.executable, "-S", "-m", "qcow2py", "--version"], env=run_env,
                   cwd=tmp_path)
    assert "pure-Python twins: the C extension was not built" in version


def test_wheel_with_the_extension_is_abi3(tmp_path, sdist):
    """cffi builds the module for the limited API; the wheel says so (one wheel
    serves every CPython >= 3.9)."""
    _have_build_tools()
    import shutil
    if not (shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")):
        pytest.fail("no C compiler (the abi3 wheel cannot be checked)")
    whl, _ = _wheel(tmp_path, sdist, dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert whl.name.endswith("-cp39-abi3-linux_x86_64.whl") or "-abi3-" in whl.name, whl.name
    with zipfile.ZipFile(whl) as zf:
        sos = [n for n in zf.namelist() if n.endswith(".so")]
    assert sos == ["qcow2py/_native.abi3.so"], sos
