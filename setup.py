"""setuptools needs this file only for cffi_modules (the native extension)."""

from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"])
