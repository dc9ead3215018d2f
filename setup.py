"""setuptools entry point for the cffi extensions (pyproject.toml holds the metadata)."""

from setuptools import setup

setup(
    cffi_modules=[
        "shm_table/_native_build.py:ffibuilder",
        "daemon/_sys_build.py:ffibuilder",
    ],
)
