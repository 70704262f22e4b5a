"""setuptools needs this file only for the optional native extension (cffi).

The extension is optional: where it cannot be compiled (no C compiler, no
Python headers) the install goes on with the pure-Python twins of every native
function, and says so.  The module is built for CPython's limited API, so the
wheel is tagged abi3 (one wheel for every CPython >= 3.9).
"""

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

LIMITED_API_TAG = "cp39"


class OptionalBuildExt(build_ext):
    """Build qcow2py._native if possible; otherwise warn and install without it."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any failure to compile means: go pure
            self._fallback(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._fallback(e)

    def _fallback(self, error):
        msg = ("qcow2py: the C extension qcow2py._native could not be built "
               f"({type(error).__name__}: {error}); installing the pure-Python "
               "twins instead (same results, slower). Install a C compiler and the "
               "Python headers (e.g. gcc and python3-dev) and reinstall for the fast path.")
        self.warn(msg)
        print(msg, file=sys.stderr)


setup(cffi_modules=["build_ffi.py:ffibuilder"],
      cmdclass={"build_ext": OptionalBuildExt},
      options={"bdist_wheel": {"py_limited_api": LIMITED_API_TAG}})
