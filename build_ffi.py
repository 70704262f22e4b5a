"""Build qcow2py._native (cffi, out-of-line API mode) from csrc/.

Run by setuptools through ``cffi_modules`` in setup.py; ``python build_ffi.py``
also builds it in place for development.
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _cdef_from_header(path: str) -> str:
    """The header is the single declaration of the C API: reuse it as the cdef."""
    with open(path) as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = [ln for ln in text.splitlines()
             if not ln.startswith("#") or ln.startswith("#define QP_")]
    return "\n".join(lines)


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
ffibuilder.cdef(_cdef_from_header(os.path.join(CSRC, "qcow2py_native.h")))
ffibuilder.set_source(
    "qcow2py._native",
    '#include "qcow2py_native.h"',
    sources=[os.path.relpath(os.path.join(CSRC, "qcow2py_native.c"), HERE)],
    include_dirs=[os.path.relpath(CSRC, HERE)],
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=LINK_ARGS,
)

if __name__ == "__main__":
    os.chdir(HERE)
    ffibuilder.compile(tmpdir=HERE, verbose=False)
