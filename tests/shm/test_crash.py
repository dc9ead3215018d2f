"""Writers SIGKILLed at random points (a few hundred times) while survivors keep working.

Victims die either at a random instrumented step inside the C code (most of those are inside
the writer lock) or from an outside SIGKILL at a random moment.  Survivors keep an exact model
of their own entries: afterwards no entry of theirs may be lost or duplicated and every
refcount must match; the whole table must pass its consistency check and the lock must work.
"""

from __future__ import annotations

import os
import random
import select
import signal
import time
import traceback

from procs import Child

from shm_table import FUSE_ROOT_ID, HandleTable, InodeTable
from shm_table._native import lib

KILLS = 300
SURVIVOR_OPS = 20_000


def victim(table: InodeTable, ht: HandleTable, seed: int, crash_after: int) -> None:
    """Churn on a key pool shared by all victims until killed (by the parent, or by itself at
    the crash_after-th instrumented step inside the C code, all of which hold the lock)."""
    rng = random.Random(seed)
    table.close_fd = ht.close_fd = lambda fd: None
    lib.seg_debug_crash_after(crash_after)
    held: list[int] = []
    fhs: list[int] = []
    while True:
        op = rng.random()
        k = rng.randrange(64)
        if op < 0.35:
            _, slot, _ = table.claim_or_insert((10**6 + k, 2, 2), b"victim-%d" % (k % 40), 1,
                                               2000 + k, 0o100644, 1, b"v")
            held.append(slot)
        elif op < 0.6:
            if held:
                table.release(held.pop(rng.randrange(len(held))))
        elif op < 0.7:
            if held:
                table.set_migration_info(held[0], 1, b"moved-%d" % k)
        elif op < 0.85:
            if len(fhs) < 8:
                fhs.append(ht.open(3, 3000 + k, 0))
        elif fhs:
            fh = fhs.pop(rng.randrange(len(fhs)))
            slot = ht.acquire_slot(fh)
            ht.close(fh)
            if slot >= 0:
                ht.release_ref(slot)


def survivor(table: InodeTable, ht: HandleTable, me: int, stop: int, stop_w: int) -> dict:
    """Exact model of this process's own keys; asserts lookups stay consistent.  Runs at least
    SURVIVOR_OPS operations and until `stop` (a pipe) becomes readable."""
    os.close(stop_w)  # else we would keep our own stop pipe open
    rng = random.Random(1000 + me)
    table.close_fd = ht.close_fd = lambda fd: None
    held: dict[int, list[int]] = {}  # key -> [nodeid, slot, refs]
    fhs: dict[int, int] = {}  # fh -> fd
    ops = 0
    while ops < SURVIVOR_OPS or not select.select([stop], [], [], 0)[0]:
        ops += 1
        op = rng.random()
        k = rng.randrange(32)
        if op < 0.4:
            nodeid, slot, inserted = table.claim_or_insert(
                (me * 1000 + k, 1, 1), b"surv-%d-%d" % (me, k), 1, 100 + k, 0o100644, 1, b"s")
            if k in held:
                assert not inserted and held[k][:2] == [nodeid, slot], "entry lost/duplicated"
                held[k][2] += 1
            else:
                assert inserted, "entry should have been removed"
                held[k] = [nodeid, slot, 1]
        elif op < 0.55:
            if k in held:
                assert table.acquire(held[k][0]) == (held[k][1], 100 + k)
                held[k][2] += 1
        elif op < 0.8:
            if k in held:
                n = rng.randint(1, held[k][2])
                fd = table.forget(held[k][0], n)
                held[k][2] -= n
                if held[k][2] == 0:
                    assert fd == 100 + k
                    del held[k]
                else:
                    assert fd == -1
        elif op < 0.9:
            if len(fhs) < 64:
                fd = 5000 + me * 100 + k
                fhs[ht.open(4, fd, 0)] = fd
        elif fhs:
            fh = rng.choice(list(fhs))
            slot = ht.acquire_slot(fh)
            assert slot >= 0 and ht.fd_of(slot) == fhs[fh]
            assert ht.close(fh) == -1
            assert ht.release_ref(slot) == fhs.pop(fh)
    return {"inodes": {v[0]: v[2] for v in held.values()}, "fhs": fhs, "ops": ops}


def test_writers_killed_at_random_points(make_table) -> None:
    table = make_table(capacity=512)
    ht = HandleTable.create(table.name + "-h", 8192)
    ht.close_fd = lambda fd: None
    try:
        stop_r, stop_w = os.pipe()
        survivors = [Child(lambda m=m: survivor(table, ht, m, stop_r, stop_w)) for m in (1, 2)]
        os.close(stop_r)
        rng = random.Random(7)
        self_kills = 0
        for _ in range(KILLS):
            seed = rng.randrange(2**32)
            crash_after = rng.randint(1, 150) if rng.random() < 0.7 else 0
            pid = os.fork()
            if pid == 0:
                try:
                    victim(table, ht, seed, crash_after)
                except BaseException:  # noqa: BLE001
                    traceback.print_exc()
                finally:
                    os._exit(0)
            if crash_after:
                deadline = time.monotonic() + 5
                while os.waitpid(pid, os.WNOHANG) == (0, 0):
                    if time.monotonic() > deadline:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        raise AssertionError("victim never reached its crash point")
                    time.sleep(0.0002)
                self_kills += 1
            else:
                time.sleep(rng.random() * 0.003)
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                assert os.WIFSIGNALED(status), "victim exited on its own (it raised?)"
        os.close(stop_w)
        results = [s.result() for s in survivors]
        print("survivor ops:", [r["ops"] for r in results], "stats:", table.stats(), ht.stats())

        table.check()
        ht.check()
        live = {e.nodeid: e for e in table.iter_entries()}
        for r in results:
            for nodeid, refs in r["inodes"].items():
                assert live[nodeid].refcount == refs  # not lost, not duplicated, exact count
        handles = {e.fh: e for e in ht.iter_handles()}
        for r in results:
            for fh, fd in r["fhs"].items():
                assert handles[fh].fd == fd and handles[fh].refcount == 1
        # every victim that died at a crash point died holding a lock: someone took it over
        takeovers = table.stats()["lock_takeovers"] + ht.stats()["lock_takeovers"]
        assert takeovers >= self_kills > KILLS // 2
        # the lock is not stuck and the tables still work
        assert table.lock_owner == 0 or table.check() is None
        n, s, ins = table.claim_or_insert((7, 7, 7), b"after", 1, 9, 0o100644)
        assert ins and table.release(s) == 9
        assert table.refcount(FUSE_ROOT_ID) >= 1
        table.take_orphaned_fds()
        fh = ht.open(1, 1, 0)
        assert ht.close(fh) == 1
        table.check()
        ht.check()
    finally:
        ht.unlink()
        ht.detach()
