"""Throughput of the shared inode table against a plain Python dict.

    python benchmarks/shm_table.py [--seconds 1.0]

Measures, per second: pin+unpin (the per-request hot path: a request pins the nodeid it
serves), claim_or_insert+forget on an existing entry (LOOKUP of a known inode, then FORGET),
and insert+forget-to-removal (LOOKUP of a new inode).  Runs 1 process and 2 processes (forked,
sharing the segment; on distinct entries and on the same entry), and prints each rate with its
ratio to the dict store in one process.  Entries hold no fd (-1): a freed entry's fd would be
closed for real, and the rates are the table's own.
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
    """What a single-process daemon would do: dicts, the guest's lookup count and a count of
    requests in flight per entry."""

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
        self.data[n] = [1, fd, ids, handle, 0]
        self.by_handle[handle] = n
        self.by_ids[ids] = n
        return n

    def pin(self, n: int) -> int:
        e = self.data.get(n)
        if e is None or not e[0]:
            return -1
        e[4] += 1
        return e[1]

    def unpin(self, n: int) -> None:
        e = self.data[n]
        e[4] -= 1
        if not e[0] and not e[4]:
            del self.data[n]

    def forget(self, n: int, k: int) -> bool:
        e = self.data.get(n)
        if e is None or not e[0]:
            return False
        e[0] = max(e[0] - k, 0)
        if e[0]:
            return False
        self.by_handle.pop(e[3], None)
        self.by_ids.pop(e[2], None)
        if not e[4]:
            del self.data[n]
        return True


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
    try:
        t.insert_root((1, 1, 1), -1, 0o40755)
        keep = [t.claim_or_insert((100 + i, 1, 1), b"h%d" % i, 1, -1, 0o100644)
                for i in range(4)]
        d = DictStore()
        dkeep = [d.claim_or_insert((100 + i, 1, 1), b"h%d" % i, -1) for i in range(4)]
        rng = range(BATCH)

        def pin_unpin(i: int) -> Callable[[], None]:
            nodeid = keep[i][0]
            pin, unpin = t.pin, t.unpin

            def run() -> None:
                for _ in rng:
                    _slot, _fd = pin(nodeid)
                    unpin(nodeid)
            return run

        def pin_unpin_raw(i: int) -> Callable[[], None]:
            nodeid, b = keep[i][0], t._b
            pin, unpin = lib.it_pin, lib.it_unpin

            def run() -> None:
                for _ in rng:
                    pin(b, nodeid)
                    unpin(b, nodeid)
            return run

        def claim_forget(i: int) -> Callable[[], None]:
            ids, h = (100 + i, 1, 1), b"h%d" % i
            claim, forget = t.claim_or_insert, t.forget

            def run() -> None:
                for _ in rng:
                    nodeid, _ins = claim(ids, h, 1, -1, 0o100644)
                    forget(nodeid, 1)
            return run

        def insert_remove(i: int) -> Callable[[], None]:
            claim, forget = t.claim_or_insert, t.forget
            ctr = [i << 40]

            def run() -> None:
                k = ctr[0]
                for j in rng:
                    nodeid, _ins = claim((k + j, 2, 2), b"n%d" % (k + j), 1, -1, 0o100644)
                    forget(nodeid, 1)
                ctr[0] = k + BATCH
            return run

        def d_pin_unpin() -> None:
            n = dkeep[0]
            for _ in rng:
                d.pin(n)
                d.unpin(n)

        def d_claim_forget() -> None:
            for _ in rng:
                d.forget(d.claim_or_insert((100, 1, 1), b"h0", -1), 1)

        ctr = [1 << 50]

        def d_insert_remove() -> None:
            k = ctr[0]
            for j in rng:
                d.forget(d.claim_or_insert((k + j, 2, 2), b"n%d" % (k + j), -1), 1)
            ctr[0] = k + BATCH

        rows = [
            ("pin+unpin", d_pin_unpin, [
                ("1 proc", lambda: rate(pin_unpin(0), secs)),
                ("1 proc, raw lib calls", lambda: rate(pin_unpin_raw(0), secs)),
                ("2 procs, distinct inodes", lambda: in_procs(2, pin_unpin, secs)),
                ("2 procs, same inode", lambda: in_procs(2, lambda i: pin_unpin(0), secs)),
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
                           if k in ("entries", "inserts", "removals", "rebuilds", "pin_rows")})
        assert t.pins_held() == 0
    finally:
        t.unlink()
        t.detach()


if __name__ == "__main__":
    main()
