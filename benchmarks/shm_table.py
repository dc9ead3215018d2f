"""Throughput of the shared inode table against a plain Python dict.

    python benchmarks/shm_table.py [--seconds 1.0]

Measures, per second: acquire+release (the per-request hot path), claim_or_insert+forget on an
existing entry (LOOKUP of a known inode, then FORGET), and insert+forget-to-removal (LOOKUP of a
new inode).  Runs 1 process and 2 processes (forked, sharing the segment; on distinct entries
and on the same entry), and prints each rate with its ratio to the dict store in one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shm_table import InodeTable  # noqa: E402
from shm_table._native import lib  # noqa: E402

BATCH = 2000


class DictStore:
    """What a single-process daemon would do: dicts and a Python int refcount."""

    def __init__(self) -> None:
        self.data: dict[int, list] = {}
        self.by_handle: dict[bytes, int] = {}
        self.by_ids: dict[tuple, int] = {}
        self.next = 2

    def claim_or_insert(self, ids: tuple, handle: bytes, fd: int) -> int:
        n = self.by_handle.get(handle)
        if n is None:
            n = self.by_ids.get(ids)
        if n is not None:
            e = self.data[n]
            if e[0]:
                e[0] += 1
                return n
        n = self.next
        self.next += 1
        self.data[n] = [1, fd, ids, handle]
        self.by_handle[handle] = n
        self.by_ids[ids] = n
        return n

    def acquire(self, n: int) -> int:
        e = self.data.get(n)
        if e is None or not e[0]:
            return -1
        e[0] += 1
        return e[1]

    def forget(self, n: int, k: int) -> int:
        e = self.data.get(n)
        if e is None:
            return -1
        e[0] = max(e[0] - k, 0)
        if e[0]:
            return -1
        del self.data[n]
        self.by_handle.pop(e[3], None)
        self.by_ids.pop(e[2], None)
        return e[1]


def rate(fn: Callable[[], None], seconds: float) -> tuple[float, float]:
    """(operations per wall second, operations per CPU second of this process).

    The CPU-time rate is what a worker can do per core and is robust against other load on
    the machine; the wall rate shows contention between processes."""
    fn()  # warm up
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n * BATCH / dt, n * BATCH / (time.process_time() - c0)


def in_procs(nprocs: int, make: Callable[[int], Callable[[], None]],
             seconds: float) -> tuple[float, float]:
    """`nprocs` forked processes running make(i)() concurrently: (aggregate wall rate, mean
    per-process CPU-second rate)."""
    pipes = []
    for i in range(nprocs):
        r, w = os.pipe()
        if os.fork() == 0:
            os.close(r)
            os.write(w, repr(rate(make(i), seconds)).encode())
            os._exit(0)
        os.close(w)
        pipes.append(r)
    wall = cpu = 0.0
    for r in pipes:
        with os.fdopen(r) as f:
            w_rate, c_rate = eval(f.read())  # noqa: S307 - our own repr of two floats
            wall += w_rate
            cpu += c_rate / nprocs
    for _ in pipes:
        os.wait()
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--capacity", type=int, default=1 << 20)
    args = ap.parse_args()
    secs = args.seconds

    t = InodeTable.create(f"/pyvfs-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}", args.capacity)
    t.close_fd = lambda fd: None
    try:
        t.insert_root((1, 1, 1), 3, 0o40755)
        keep = [t.claim_or_insert((100 + i, 1, 1), b"h%d" % i, 1, 10 + i, 0o100644)
                for i in range(4)]
        d = DictStore()
        dkeep = [d.claim_or_insert((100 + i, 1, 1), b"h%d" % i, 10 + i) for i in range(4)]
        rng = range(BATCH)

        def acq_rel(i: int) -> Callable[[], None]:
            nodeid = keep[i][0]
            acquire, release = t.acquire, t.release

            def run() -> None:
                for _ in rng:
                    slot, fd = acquire(nodeid)
                    release(slot)
            return run

        def acq_rel_raw(i: int) -> Callable[[], None]:
            nodeid, b = keep[i][0], t._b
            acquire, release = lib.it_acquire, lib.it_release

            def run() -> None:
                for _ in rng:
                    release(b, acquire(b, nodeid), 1)
            return run

        def claim_forget(i: int) -> Callable[[], None]:
            ids, h = (100 + i, 1, 1), b"h%d" % i
            claim, forget = t.claim_or_insert, t.forget

            def run() -> None:
                for _ in rng:
                    nodeid, _slot, _ins = claim(ids, h, 1, -1, 0o100644)
                    forget(nodeid, 1)
            return run

        def insert_remove(i: int) -> Callable[[], None]:
            claim, forget = t.claim_or_insert, t.forget
            ctr = [i << 40]

            def run() -> None:
                k = ctr[0]
                for j in rng:
                    nodeid, _slot, _ins = claim((k + j, 2, 2), b"n%d" % (k + j), 1, 5, 0o100644)
                    forget(nodeid, 1)
                ctr[0] = k + BATCH
            return run

        def d_acq_rel() -> None:
            n = dkeep[0]
            for _ in rng:
                d.acquire(n)
                d.forget(n, 1)

        def d_claim_forget() -> None:
            for _ in rng:
                d.forget(d.claim_or_insert((100, 1, 1), b"h0", -1), 1)

        ctr = [1 << 50]

        def d_insert_remove() -> None:
            k = ctr[0]
            for j in rng:
                d.forget(d.claim_or_insert((k + j, 2, 2), b"n%d" % (k + j), 5), 1)
            ctr[0] = k + BATCH

        rows = [
            ("acquire+release", d_acq_rel, [
                ("1 proc", lambda: rate(acq_rel(0), secs)),
                ("1 proc, raw lib calls", lambda: rate(acq_rel_raw(0), secs)),
                ("2 procs, distinct inodes", lambda: in_procs(2, acq_rel, secs)),
                ("2 procs, same inode", lambda: in_procs(2, lambda i: acq_rel(0), secs)),
            ]),
            ("claim_or_insert(existing)+forget", d_claim_forget, [
                ("1 proc", lambda: rate(claim_forget(0), secs)),
                ("2 procs, distinct inodes", lambda: in_procs(2, claim_forget, secs)),
            ]),
            ("claim_or_insert(new)+forget(remove)", d_insert_remove, [
                ("1 proc", lambda: rate(insert_remove(0), secs)),
                ("2 procs", lambda: in_procs(2, insert_remove, secs)),
            ]),
        ]
        print(f"shared inode table, capacity {args.capacity}; {os.cpu_count()} CPUs.\n"
              "Pairs per CPU-second of one process (ns of CPU per pair), ratio to a Python dict\n"
              "store in one process; [aggregate pairs per wall second].")
        for title, baseline, cases in rows:
            bw, base = rate(baseline, secs)
            print(f"\n{title}:\n  {'python dict, 1 proc':28s} {base:11,.0f}/s "
                  f"({1e9 / base:5.0f} ns)         [{bw:11,.0f}/s]")
            for label, run in cases:
                w, c = run()
                print(f"  {label:28s} {c:11,.0f}/s ({1e9 / c:5.0f} ns)  x{c / base:4.2f}"
                      f"  [{w:11,.0f}/s]")
        t.check()
        print("\nstats:", {k: v for k, v in t.stats().items()
                           if k in ("entries", "inserts", "removals", "rebuilds")})
    finally:
        t.unlink()
        t.detach()


if __name__ == "__main__":
    main()
