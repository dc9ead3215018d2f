"""Real processes racing on one real segment; afterwards every refcount must equal the sum of
the references the processes say they hold."""

from __future__ import annotations

import random
import threading
from collections import Counter

from procs import Child

from shm_table import FUSE_ROOT_ID, HandleTable, InodeTable

PROCS = 4
OPS = 100_000
KEYS = 48


def inode_worker(table: InodeTable, seed: int) -> dict[int, int]:
    """Mixed ops on a key pool shared with the other workers.  Returns {nodeid: refs held}."""
    rng = random.Random(seed)
    held: dict[int, int] = {}   # nodeid -> references this process holds
    slots: dict[int, int] = {}  # nodeid -> slot (stable while held)
    max_seen = 2
    total = 0
    for _ in range(OPS):
        op = rng.random()
        if total > 150:
            op = 0.7 + op * 0.3  # shed references
        if op < 0.3:
            k = rng.randrange(KEYS)
            handle = None if k % 3 == 0 else b"key-%d" % k
            nodeid, slot, inserted = table.claim_or_insert(
                (k, 1, 1), handle, 1, 1000 + k, 0o100644, FUSE_ROOT_ID, b"n%d" % k)
            assert lib_nodeid_ok(table, slot, nodeid)
            held[nodeid] = held.get(nodeid, 0) + 1
            slots[nodeid] = slot
            max_seen = max(max_seen, nodeid)
            total += 1
        elif op < 0.55:
            if held and rng.random() < 0.5:
                nodeid = rng.choice(list(held))
            else:
                nodeid = rng.randrange(1, max_seen + 4)  # often stale: races with removal
            slot = table.acquire_slot(nodeid)
            if slot >= 0:
                assert lib_nodeid_ok(table, slot, nodeid)
                held[nodeid] = held.get(nodeid, 0) + 1
                slots[nodeid] = slot
                total += 1
            else:
                assert nodeid not in held
        elif op < 0.6:
            assert table.acquire(rng.getrandbits(64) | (1 << 40)) is None
        elif op < 0.85:
            if held:
                nodeid = rng.choice(list(held))
                table.release(slots[nodeid])
                total -= 1
                held[nodeid] -= 1
                if held[nodeid] == 0:
                    del held[nodeid], slots[nodeid]
        else:
            if held:
                nodeid = rng.choice(list(held))
                n = rng.randint(1, held[nodeid])
                table.forget(nodeid, n)
                total -= n
                held[nodeid] -= n
                if held[nodeid] == 0:
                    del held[nodeid], slots[nodeid]
    return held


def lib_nodeid_ok(table: InodeTable, slot: int, nodeid: int) -> bool:
    from shm_table._native import lib

    return lib.it_nodeid(table._b, slot) == nodeid


def test_inode_refcounts_under_races(make_table) -> None:
    table = make_table(capacity=1024)
    children = [Child(lambda s=s: inode_worker(table, s)) for s in range(PROCS)]
    total: Counter[int] = Counter()
    for c in children:
        total.update(c.result())
    table.check()
    live = {e.nodeid: e.refcount for e in table.iter_entries()}
    expect = {n: c for n, c in total.items() if c > 0}
    expect[FUSE_ROOT_ID] = expect.get(FUSE_ROOT_ID, 0) + 1
    assert live == expect
    st = table.stats()
    assert st["inserts"] > KEYS and st["removals"] > 0


def handle_worker(ht: HandleTable, fhs: list[int], fds: dict[int, int], mine: list[int],
                  seed: int) -> list[int]:
    """Readers on every fh; this worker also sends the guest RELEASE for the fhs in `mine`.
    Returns the fds that came back for closing."""
    rng = random.Random(seed)
    held: list[tuple[int, int]] = []
    closed: list[int] = []
    to_close = {rng.randrange(OPS // 2): fh for fh in mine}
    for i in range(OPS // 2):
        if i in to_close:
            fd = ht.close(to_close[i])
            if fd >= 0:
                closed.append(fd)
            continue
        op = rng.random()
        if op < 0.45 or not held:
            fh = rng.choice(fhs)
            slot = ht.acquire_slot(fh)
            if slot >= 0:
                assert ht.fd_of(slot) == fds[fh]  # never cleared under a reader
                held.append((fh, slot))
        elif op < 0.5:
            assert ht.acquire(rng.getrandbits(64)) is None
        else:
            fh, slot = held.pop(rng.randrange(len(held)))
            assert ht.fd_of(slot) == fds[fh]
            fd = ht.release_ref(slot)
            if fd >= 0:
                closed.append(fd)
    for _fh, slot in held:
        fd = ht.release_ref(slot)
        if fd >= 0:
            closed.append(fd)
    return closed


def test_handle_release_racing_reads(handles: HandleTable) -> None:
    fhs = [handles.open(2, 500 + i, 0) for i in range(12)]
    fds = {fh: 500 + i for i, fh in enumerate(fhs)}
    mine = [fhs[i::PROCS][:2] for i in range(PROCS)]  # 8 of 12 get a guest RELEASE
    children = [Child(lambda s=s: handle_worker(handles, fhs, fds, mine[s], s))
                for s in range(PROCS)]
    returned = Counter()
    for c in children:
        returned.update(c.result())
    released = {fds[fh] for m in mine for fh in m}
    assert returned == Counter(released)  # each closed exactly once, nothing else
    left = {e.fh: e.refcount for e in handles.iter_handles()}
    assert left == {fh: 1 for fh in fhs if fds[fh] not in released}
    handles.check()


def test_threads_share_the_lock(make_table) -> None:
    """The lock word holds a TID, so threads of one process exclude each other too (cffi
    releases the GIL during every call, so they really run concurrently in C)."""
    table = make_table(capacity=256)
    errors: list[BaseException] = []

    def work(me: int) -> None:
        try:
            rng = random.Random(me)
            for _ in range(20_000):
                k = rng.randrange(16)
                nodeid, slot, _ = table.claim_or_insert((k, 3, 3), b"t%d" % k, 1, 7, 0o100644)
                if rng.random() < 0.5:
                    assert table.acquire(nodeid) == (slot, 7)
                    table.release(slot)
                table.forget(nodeid, 1)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    table.check()
    assert {e.nodeid for e in table.iter_entries()} == {FUSE_ROOT_ID}
