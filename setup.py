"""setuptools entry point for the cffi extensions (pyproject.toml holds the metadata)."""

from setuptools import setup

setup(
    cffi_modules=[
        "shm_table/_native_build.py:ffibuilder",
        "daemon/native/build.py:ffibuilder",
    ],
)
