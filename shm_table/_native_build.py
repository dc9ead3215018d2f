"""cffi (API mode) builder for ``shm_table._native``.

The C lives in ``native.c``/``native.h`` next to this file; API mode lets the compiler check
the declarations below against the real definitions.  Build in place with
``python shm_table/_native_build.py`` or through setup.py's ``cffi_modules``.
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _cdef() -> str:
    """The declarations between the BEGIN/END CDEF markers of native.h."""
    with open(os.path.join(HERE, "native.h")) as f:
        text = f.read()
    return text.split("/* BEGIN CDEF */", 1)[1].split("/* END CDEF */", 1)[0]


def _source() -> str:
    with open(os.path.join(HERE, "native.c")) as f:
        return f.read()


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "shm_table._native",
    _source(),
    include_dirs=[HERE],
    # relative to the project root, so setuptools also ships them in the sdist
    depends=["shm_table/native.c", "shm_table/native.h"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wno-unused-function",
                        "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    # Build next to the package so `import shm_table._native` works from the repo root.
    root = os.path.dirname(HERE)
    os.chdir(root)
    sys.path.insert(0, root)
    ffibuilder.compile(tmpdir=root, verbose=False)
