"""Build qcow2py._native (cffi, out-of-line API mode) from csrc/.

Run by setuptools through ``cffi_modules`` in setup.py; ``python build_ffi.py``
also builds it in place for development.
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
#: the header cffi includes; its #include list names the area headers, in order
UMBRELLA = "qcow2py_native.h"


def _cdef_from_header(path: str) -> str:
    """A header is the declaration of its area's C API: reuse it as the cdef."""
    with open(path) as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = [ln for ln in text.splitlines()
             if not ln.startswith("#") or ln.startswith("#define QP_")]
    return "\n".join(lines)


def area_headers(csrc: str = CSRC) -> list[str]:
    """The area headers, in the order the umbrella header includes them (the one
    place that lists them); a header of csrc/ it does not include is an error,
    as its functions would silently be missing from the module."""
    with open(os.path.join(csrc, UMBRELLA)) as f:
        names = re.findall(r'^#include\s+"([^"]+)"', f.read(), re.M)
    present = {f for f in os.listdir(csrc) if f.endswith(".h")} - {UMBRELLA}
    if set(names) != present or len(names) != len(present):
        raise RuntimeError(f"csrc/{UMBRELLA} must #include each header of csrc/ once: "
                           f"it includes {names}, csrc/ holds {sorted(present)}")
    return names


def cdef_text(csrc: str = CSRC) -> str:
    """The cffi declarations: every area header's text, in the umbrella's order."""
    return "\n".join(_cdef_from_header(os.path.join(csrc, h)) for h in area_headers(csrc))


def c_sources(csrc: str = CSRC) -> list[str]:
    """Every .c file of csrc/, relative to this directory (as setuptools wants)."""
    return [os.path.relpath(os.path.join(csrc, f), HERE)
            for f in sorted(os.listdir(csrc)) if f.endswith(".c")]


#: ``QCOW2PY_SANITIZE=1``: build with AddressSanitizer and UndefinedBehaviorSanitizer,
#: every report fatal (CI runs the native tests once so; load it with
#: ``LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0``).
#: ``-fno-wrapv`` undoes Python's ``-fwrapv`` so signed overflow is reported.
SANITIZE = os.environ.get("QCOW2PY_SANITIZE", "") not in ("", "0")
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
COMPILE_ARGS = ["-O2", "-std=c99", "-Wall"]
LINK_ARGS = []
if SANITIZE:
    COMPILE_ARGS = ["-O1", "-g", "-std=c99", "-Wall", "-fno-omit-frame-pointer", "-fno-wrapv",
                    *SANITIZE_FLAGS]
    LINK_ARGS = SANITIZE_FLAGS

ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "qcow2py._native",
    f'#include "{UMBRELLA}"',
    sources=c_sources(),
    include_dirs=[os.path.relpath(CSRC, HERE)],
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=LINK_ARGS,
)

if __name__ == "__main__":
    os.chdir(HERE)
    ffibuilder.compile(tmpdir=HERE, verbose=False)
