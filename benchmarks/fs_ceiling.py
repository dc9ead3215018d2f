"""How far the host file system itself scales from 1 to 2 processes, with no daemon.

    python3 -m benchmarks.fs_ceiling [--seconds 2] [--rounds 3] [--shares tmpfs,disk]

The scaling targets for pyvirtiofsd (2 request queues on 2 cores, ≥ 1.7× one queue) assume
the file system under the share scales. This runs, on the same shares as
``benchmarks.run``, the system calls a worker makes for two workloads, from 1 and then 2
processes, in C (so the loop itself costs nothing), interleaved over rounds:

* ``create``: ``openat(O_CREAT|O_EXCL)``, ``fstat``, ``close``, ``unlinkat`` of a new name,
  each process in a directory of its own (as the CREATE workload does per queue);
* ``write_4k``: ``pwrite`` of 4 KiB at random offsets of the workloads' 64 MiB file, all
  processes on that one file (as the 4 KiB WRITE workload does).

A daemon cannot scale further than its file system; where this ratio is below 1.7, so is
any daemon's. Prints a markdown table; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
from pathlib import Path

from cffi import FFI

from benchmarks.loadgen import DATA_FILE, FILE_SIZE
from benchmarks.run import make_shares

CDEF = """
long fc_create(int dirfd, int tag, double seconds);
long fc_write(int fd, uint64_t file_size, uint64_t seed, double seconds);
"""

SOURCE = r"""
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

long fc_create(int dirfd, int tag, double seconds) {
    long n = 0;
    char name[64];
    struct stat st;
    double end = now() + seconds;
    while (now() < end) {
        for (int i = 0; i < 64; i++, n++) {
            snprintf(name, sizeof name, "c%d_%ld", tag, n);
            int fd = openat(dirfd, name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644);
            if (fd < 0) return -1;
            fstat(fd, &st);
            close(fd);
            if (unlinkat(dirfd, name, 0) < 0) return -1;
        }
    }
    return n;
}

long fc_write(int fd, uint64_t file_size, uint64_t seed, double seconds) {
    static char page[4096] __attribute__((aligned(4096)));
    uint64_t x = seed | 1, blocks = file_size / 4096;
    long n = 0;
    double end = now() + seconds;
    while (now() < end) {
        for (int i = 0; i < 256; i++, n++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            if (pwrite(fd, page, 4096, (off_t)(x % blocks) * 4096) != 4096) return -1;
        }
    }
    return n;
}
"""

_lib = None


def lib():  # noqa: ANN201 - a cffi module
    """The C loops, compiled on first use into a temporary directory."""
    global _lib
    if _lib is None:
        ffi = FFI()
        ffi.cdef(CDEF)
        with tempfile.TemporaryDirectory() as tmp:
            ffi.set_source("_fs_ceiling", SOURCE, extra_compile_args=["-O2"])
            so = ffi.compile(tmpdir=tmp, verbose=False)
            sys.path.insert(0, tmp)
            try:
                import _fs_ceiling  # type: ignore[import-not-found]
            finally:
                sys.path.remove(tmp)
            del so
        _lib = _fs_ceiling.lib
    return _lib


def _one(args: tuple[str, str, int, float]) -> float:
    workload, share, tag, seconds = args
    c = lib()
    if workload == "create":
        d = Path(share) / "fs-ceiling" / f"p{tag}"
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            n = c.fc_create(fd, tag, seconds)
        finally:
            os.close(fd)
    else:
        fd = os.open(Path(share) / DATA_FILE.decode(), os.O_WRONLY)
        try:
            n = c.fc_write(fd, FILE_SIZE, (0x9E3779B97F4A7C15 * (tag + 1)) & (2**64 - 1), seconds)
        finally:
            os.close(fd)
    if n < 0:
        raise OSError(f"{workload} on {share} failed")
    return n / seconds


def measure(pool: multiprocessing.pool.Pool, workload: str, share: str, procs: int,
            seconds: float) -> float:
    os.sync()
    return sum(pool.map(_one, [(workload, share, t, seconds) for t in range(procs)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shares", default="tmpfs,disk")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    shares = make_shares(args.shares.split(","))
    lib()  # compile once, before the workers fork
    results: dict[str, dict[str, list[float]]] = {}
    with multiprocessing.get_context("fork").Pool(2) as pool:
        for rnd in range(args.rounds):
            for name, share in shares.items():
                for workload in ("create", "write_4k"):
                    for procs in (1, 2):
                        ops = measure(pool, workload, str(share), procs, args.seconds)
                        results.setdefault(f"{name}|{workload}", {}).setdefault(
                            str(procs), []).append(ops)
                        print(f"round {rnd + 1}/{args.rounds} {name} {workload} {procs} "
                              f"process(es): {ops:,.0f} ops/s", file=sys.stderr)
    print("| share | workload | 1 process ops/s | 2 processes ops/s | scaling |")
    print("|---|---|---|---|---|")
    summary = {}
    for key, by in results.items():
        one, two = statistics.median(by["1"]), statistics.median(by["2"])
        share, workload = key.split("|")
        summary[key] = {"one": one, "two": two, "scaling": two / one, "rounds": by}
        print(f"| {share} | {workload} | {one:,.0f} | {two:,.0f} | ×{two / one:.2f} |")
    print(f"\n(medians of {args.rounds} rounds, {args.seconds:g} s each, interleaved; "
          f"{os.cpu_count()} cores, kernel {os.uname().release})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
