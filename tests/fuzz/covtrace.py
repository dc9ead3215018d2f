"""Line and edge coverage of the daemon's processes, in a shared-memory map.

atheris instruments Python in its own process only, while the daemon answers requests in
a supervisor and one cloned worker per queue. So the daemon is started under
``tests.fuzz.covd``, which installs this C trace function (``PyEval_SetTrace``) before
the daemon starts: every clone inherits it, and every line the daemon's own modules run
(daemon/, workers/, shm_table/, supervisor.py) marks

* an edge ``loc(previous line) >> 1 ^ loc(line)`` in a 64 KiB map of saturating 8-bit
  hit counts (AFL's scheme, per process), and
* the line itself in a 256 Ki-entry map, keyed so that the fuzzer can name the lines.

The map is a file in /dev/shm that both sides map MAP_SHARED; the fuzzer clears it before
an input and folds it into libFuzzer's counters afterwards (``tests.fuzz.run``).
A C trace function costs ~0.1 us per line (a Python one ~1 us), and lines of other
modules (asyncio, logging) are skipped after one pointer lookup.

The extension is compiled on first use into tests/fuzz/build/ (git-ignored).
"""

from __future__ import annotations

import hashlib
import importlib.util
import mmap
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = Path(__file__).resolve().parent / "build"
EDGE_BITS = 16
LINE_BITS = 18
EDGES = 1 << EDGE_BITS
LINES = 1 << LINE_BITS
C_EDGES = 1 << 16  # edges of daemon/native/_sys (its .c files), see below
MAP_SIZE = EDGES + LINES + C_EDGES
# the daemon's own code: what coverage is measured on
TRACED = [str(REPO / d) + "/" for d in ("daemon", "workers", "shm_table")] + [
    str(REPO / "supervisor.py")]

CDEF = """
int covtrace_start(uintptr_t map, const char *prefixes);
void covtrace_stop(void);
uint32_t covtrace_loc(const char *filename, int line);
"""

SOURCE = r"""
#include <Python.h>
#include <frameobject.h>
#include <string.h>
#include <stdint.h>

#define EDGE_MASK ((1u << @EDGE_BITS@) - 1)
#define LINE_MASK ((1u << @LINE_BITS@) - 1)
#define CACHE_SIZE 65536

static unsigned char *edges, *lines;
static char prefixes[4096];
static uint32_t prev;
static struct { PyObject *code; uint32_t h; int keep; } cache[CACHE_SIZE];

static uint32_t fnv(const char *s) {
    uint32_t h = 2166136261u;
    for (; *s; s++) { h ^= (unsigned char)*s; h *= 16777619u; }
    return h;
}

static uint32_t mix(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
}

uint32_t covtrace_loc(const char *filename, int line) {
    return mix(fnv(filename) + (uint32_t)line * 0x9e3779b1u);
}

static int wanted(const char *filename) {
    const char *p = prefixes;
    while (*p) {
        size_t n = strlen(p);
        if (strncmp(filename, p, n) == 0) return 1;
        p += n + 1;
    }
    return 0;
}

static int classify(PyCodeObject *co, uint32_t *h) {
    size_t i = ((uintptr_t)co >> 4) & (CACHE_SIZE - 1);
    for (int probe = 0; probe < 64; probe++, i = (i + 1) & (CACHE_SIZE - 1)) {
        if (cache[i].code == (PyObject *)co) { *h = cache[i].h; return cache[i].keep; }
        if (cache[i].code == NULL) {
            const char *name = PyUnicode_AsUTF8(co->co_filename);
            int keep = 0;
            if (name == NULL) PyErr_Clear();
            else keep = wanted(name);
            Py_INCREF(co);  /* pinned: its address can never name another code object */
            cache[i].code = (PyObject *)co;
            cache[i].keep = keep;
            cache[i].h = keep ? fnv(name) : 0;
            *h = cache[i].h;
            return keep;
        }
    }
    /* cache full around here: decide without caching */
    const char *name = PyUnicode_AsUTF8(co->co_filename);
    if (name == NULL) { PyErr_Clear(); return 0; }
    *h = fnv(name);
    return wanted(name);
}

static int tracer(PyObject *obj, PyFrameObject *frame, int what, PyObject *arg) {
    if (what != PyTrace_LINE) return 0;
    PyCodeObject *co = PyFrame_GetCode(frame);
    uint32_t h;
    int keep = classify(co, &h);
    Py_DECREF(co);
    if (!keep) return 0;
    uint32_t loc = mix(h + (uint32_t)PyFrame_GetLineNumber(frame) * 0x9e3779b1u);
    uint32_t e = (loc ^ prev) & EDGE_MASK;
    if (edges[e] != 255) edges[e]++;
    lines[loc & LINE_MASK] = 1;
    prev = loc >> 1;
    return 0;
}

int covtrace_start(uintptr_t map, const char *pfx) {
    size_t n = 0;
    while (pfx[n] || pfx[n + 1]) n++;  /* NUL-separated, ends with two NULs */
    if (n + 2 > sizeof prefixes) return -1;
    memcpy(prefixes, pfx, n + 2);
    edges = (unsigned char *)map;
    lines = edges + (EDGE_MASK + 1);
    PyGILState_STATE g = PyGILState_Ensure();
    PyEval_SetTrace(tracer, NULL);
    PyGILState_Release(g);
    return 0;
}

void covtrace_stop(void) {
    PyGILState_STATE g = PyGILState_Ensure();
    PyEval_SetTrace(NULL, NULL);
    PyGILState_Release(g);
}
""".replace("@EDGE_BITS@", str(EDGE_BITS)).replace("@LINE_BITS@", str(LINE_BITS))


def _module_name() -> str:
    digest = hashlib.sha256((CDEF + SOURCE + sys.version).encode()).hexdigest()[:12]
    return f"_covtrace_{digest}"


def load() -> types.ModuleType:
    """The compiled tracer (built once per source version into tests/fuzz/build/)."""
    name = _module_name()
    BUILD.mkdir(exist_ok=True)
    for path in BUILD.glob(f"{name}*.so"):
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(name, SOURCE, py_limited_api=False, extra_compile_args=["-O2"],
                   define_macros=[("_CFFI_NO_LIMITED_API", None)])
    built = ffi.compile(tmpdir=str(BUILD), verbose=False)
    spec = importlib.util.spec_from_file_location(name, built)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class CoverageMap:
    """The shared map, from either side: created by the fuzzer, mapped by the daemon."""

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, MAP_SIZE)
            self.mem = mmap.mmap(fd, MAP_SIZE)
        finally:
            os.close(fd)  # the mapping stays; no fd of ours in the daemon's table
        self.view = memoryview(self.mem)

    def edges(self) -> bytes:
        return bytes(self.view[:EDGES])

    def lines(self) -> bytes:
        return bytes(self.view[EDGES : EDGES + LINES])

    def c_edges(self) -> bytes:
        return bytes(self.view[EDGES + LINES :])

    def clear_edges(self) -> None:
        self.mem[:EDGES] = bytes(EDGES)
        self.mem[EDGES + LINES :] = bytes(C_EDGES)

    def close(self) -> None:
        self.view.release()
        self.mem.close()

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


_KEEP: list[CoverageMap] = []


def start_tracing(path: str) -> CoverageMap:
    """In the daemon, before it starts: map the shared map and trace every line."""
    mod = load()
    cov = CoverageMap(path)
    address = int(mod.ffi.cast("uintptr_t", mod.ffi.from_buffer(cov.mem)))
    prefixes = b"".join(p.encode() + b"\0" for p in TRACED) + b"\0"
    if mod.lib.covtrace_start(address, prefixes) != 0:
        raise RuntimeError("covtrace: prefix list too long")
    _KEEP.append(cov)  # the tracer writes into it until the process ends
    return cov


def executable_lines() -> dict[str, set[int]]:
    """Every line of the traced modules that can raise a line event, by file."""
    out: dict[str, set[int]] = {}
    # rglob: the layers are folders (daemon/fs/ops, daemon/protocol, ...), all traced
    files = [p for d in ("daemon", "workers", "shm_table")
             for p in sorted((REPO / d).rglob("*.py"))]
    files.append(REPO / "supervisor.py")
    for path in files:
        try:
            code = compile(path.read_text(), str(path), "exec")
        except SyntaxError:
            continue
        found: set[int] = set()
        stack = [code]
        while stack:
            co = stack.pop()
            found.update(line for _, _, line in co.co_lines() if line is not None)
            stack.extend(c for c in co.co_consts if hasattr(c, "co_lines"))
        out[str(path)] = found
    return out


def lines_covered(line_map: bytes, table: dict[str, set[int]]) -> tuple[int, int]:
    """(lines whose key is marked in the map, executable lines) over the traced files."""
    mod = load()
    hit = total = 0
    for filename, numbers in table.items():
        enc = filename.encode()
        for line in numbers:
            total += 1
            if line_map[mod.lib.covtrace_loc(enc, line) & (LINES - 1)]:
                hit += 1
    return hit, total


# ----- C coverage: daemon/native/_sys built again with gcc's -fsanitize-coverage=trace-pc --------

C_HOOK = r"""
static unsigned char *pyvfs_cov_edges;
static __thread uint32_t pyvfs_cov_prev;

__attribute__((no_sanitize_coverage)) void pyvfs_cov_set(uintptr_t map) {
    pyvfs_cov_edges = (unsigned char *)map;
}

/* gcc calls this at every basic block of the instrumented code: an AFL-style edge from
 * the block's address, taken relative to the module so every process agrees */
__attribute__((no_sanitize_coverage)) void __sanitizer_cov_trace_pc(void) {
    unsigned char *m = pyvfs_cov_edges;
    if (m == NULL) return;
    uint32_t x = (uint32_t)((uintptr_t)__builtin_return_address(0) - (uintptr_t)&pyvfs_cov_set);
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    uint32_t e = (x ^ pyvfs_cov_prev) & 0xFFFFu;
    if (m[e] != 255) m[e]++;
    pyvfs_cov_prev = x >> 1;
}
"""


def load_instrumented_sys() -> types.ModuleType:
    """daemon.native._sys compiled by the same builder (daemon/native/build.py: its cdef,
    sources, include directories and flags) with every basic block of its .c files reporting
    to ``__sanitizer_cov_trace_pc``; built once per source version into tests/fuzz/build/."""
    from cffi import FFI

    from daemon.native import build as native_build

    base = native_build.ffibuilder
    module_name, source, _ext, kwds = base._assigned_source
    cdefs = list(base._cdefsources)
    sources = [str(REPO / s) for s in kwds["sources"]]
    depends = [str(REPO / d) for d in kwds.get("depends", [])]
    # without link-time optimisation: its code generation at link time would not instrument
    compile_args = [a for a in kwds.get("extra_compile_args", []) if a != "-flto"]
    compile_args.append("-fsanitize-coverage=trace-pc")
    texts = [Path(path).read_text() for path in dict.fromkeys(sources + depends)]
    digest = hashlib.sha256("\n".join([*cdefs, source, C_HOOK, *compile_args, *texts,
                                       sys.version]).encode()).hexdigest()[:12]
    out_dir = BUILD / f"csys-{digest}"
    found = list(out_dir.glob("**/_sys*.so")) if out_dir.exists() else []
    if not found:
        ffi = FFI()
        for text in cdefs:
            ffi.cdef(text)
        ffi.cdef("void pyvfs_cov_set(uintptr_t map);")
        ffi.set_source(module_name, source + C_HOOK, sources=sources, depends=depends,
                       include_dirs=kwds.get("include_dirs", []),
                       extra_compile_args=compile_args)
        out_dir.mkdir(parents=True, exist_ok=True)
        found = [Path(ffi.compile(tmpdir=str(out_dir), verbose=False))]
    spec = importlib.util.spec_from_file_location(module_name, found[0])
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def install_c_coverage(cov: CoverageMap) -> None:
    """In the daemon, before anything imports daemon.native._sys: the instrumented build takes
    its place, writing its edges into the map's C part."""
    import daemon

    mod = load_instrumented_sys()
    sys.modules["daemon.native._sys"] = mod
    daemon.native._sys = mod  # type: ignore[attr-defined]
    address = int(mod.ffi.cast("uintptr_t", mod.ffi.from_buffer(cov.mem))) + EDGES + LINES
    _KEEP.append(cov)  # the hook writes into it until the process ends
    mod.lib.pyvfs_cov_set(address)
