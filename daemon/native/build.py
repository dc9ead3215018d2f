"""cffi builder for ``daemon.native._sys``: the daemon's C core (system calls Python's standard
library lacks, guest memory and descriptor chains, the requests answered in C, the serve
loop). The C lives in the .c files next to this one; their interface, ``pyvfs.h``, is also
what cffi reads, so the declarations Python sees are the ones the compiler checks
(daemon/native/README.md)."""

from __future__ import annotations

import os
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HEADER = "pyvfs.h"
PRIVATE_HEADER = "internal.h"
# one per concern, see README.md; relative to the project root (setuptools builds there)
C_FILES = ["syscalls.c", "memory.c", "chain.c", "fd_cache.c", "fuse_common.c", "fuse_ops.c",
           "fuse_meta.c", "stats.c", "ring.c", "inflight.c", "serve.c", "migrate.c",
           "sandbox.c"]
SOURCES = [f"daemon/native/{name}" for name in C_FILES]
# setuptools rebuilds when any of these changes
DEPENDS = [*SOURCES, f"daemon/native/{HEADER}", f"daemon/native/{PRIVATE_HEADER}",
           "shm_table/native.h"]
EXTRA_COMPILE_ARGS = ["-Wall", "-Wextra", "-Werror", "-O3", "-flto"]
# link-time optimisation: the ring loop, chain walker, fd cache and the ops answered in C
# live in separate files but still inline into each other as when they were one file
# -z now: every symbol bound at load; the processes that wait around the sandbox (sandbox.c)
# drop the dynamic linker's heap data that binding a symbol later would need
EXTRA_LINK_ARGS = ["-O3", "-flto", "-Wl,-z,now"]
INCLUDE_DIRS = [HERE, os.path.join(ROOT, "shm_table")]

_INT_LITERAL = re.compile(r"-?(0x[0-9a-f]+|[0-9]+)[ul]*", re.IGNORECASE)


def cdef_text(header: str | None = None) -> str:
    """The part of pyvfs.h between its BEGIN/END CDEF markers, in the form cffi's cdef takes:
    a ``#define`` whose value is not a plain integer becomes ``...`` (cffi then takes the value
    from the compiler), and any other preprocessor line is refused, so that the header the C
    files include and what cffi reads stay the same text."""
    if header is None:
        with open(os.path.join(HERE, HEADER)) as f:
            header = f.read()
    body = header.split("/* BEGIN CDEF */", 1)[1].split("/* END CDEF */", 1)[0]
    lines = []
    for line in body.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            m = re.fullmatch(r"#\s*define\s+(\w+)\s+(.*?)\s*(/\*.*\*/)?", stripped)
            if m is None:
                raise ValueError(f"{HEADER}: cffi cannot read {stripped!r} between the markers")
            if not _INT_LITERAL.fullmatch(m.group(2)):
                line = f"#define {m.group(1)} ..."
        lines.append(line)
    return "\n".join(lines)


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "daemon.native._sys",
    f'#include "{HEADER}"\n',
    sources=SOURCES,
    depends=DEPENDS,
    include_dirs=INCLUDE_DIRS,
    extra_compile_args=EXTRA_COMPILE_ARGS,
    extra_link_args=EXTRA_LINK_ARGS,
)

if __name__ == "__main__":
    # the sources are named relative to the project root
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    ffibuilder.compile(verbose=False)
