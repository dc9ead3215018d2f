"""Real processes sharing one fd table (as the daemon's workers do) race on real segments.

The guest's side LOOKUPs files and FORGETs them with counts far above what it looked up
(over-count FORGET, DESTROY), or RELEASEs open files, also twice; requests on other queues
pin the same nodeids and fhs meanwhile, some briefly, some parked for the whole run, and use
the fd while they hold the pin: it must always name the file recorded at insert (a fd closed
under a request would soon name another file, as the fd table is shared and busy).  At the
end every entry still there names its file, check() passes, no pin is left, and after the
guest's DESTROY the fd table is exactly what it was: every fd of a freed entry was closed.

Each test runs in its own forked process (procs.isolated), whose fd table is the one the
workers share: pytest's own fds stay out of reach.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter

from conftest import U64, Tables
from procs import Board, Child, Gate, Signal, isolated
from realfds import Files, Ids, names, open_fds

from shm_table import FUSE_ROOT_ID, HandleTable, InodeTable
from shm_table._native import lib

KEYS = 12
GUEST_OPS = 4000
MIN_REQUEST_OPS = 2000
REOPENS = 800
REG = 0o100644


# ------------------------------------------------------------------ inode table


def _inode_race(t: InodeTable, files: Files) -> dict[str, int]:
    names_ = [f"k{k}" for k in range(KEYS)]
    ids = [files.make(n) for n in names_]
    key_of_ids = {i: k for k, i in enumerate(ids)}
    published = Board(KEYS)
    baseline = open_fds()
    start, guests_done, parked_gate = Gate(), Gate(), Gate()
    parked = Signal()

    def handle_of(k: int) -> bytes | None:
        return None if k % 3 == 0 else b"key-%d" % k

    def guest(seed: int) -> dict[str, int]:
        """LOOKUPs and over-count FORGETs (of its own lookups, and of nodeids it only saw)."""
        rng = random.Random(seed)
        mine: Counter[int] = Counter()
        st = Counter()
        start.wait()
        for _ in range(GUEST_OPS):
            k = rng.randrange(KEYS)
            if rng.random() < 0.55:
                fd, fids = files.open(names_[k], os.O_PATH)
                assert fids == ids[k]
                nodeid, inserted = t.claim_or_insert(fids, handle_of(k), 1, fd, REG,
                                                     FUSE_ROOT_ID, names_[k])
                if not inserted:
                    assert names(fd) == ids[k]  # still ours: the table did not take it
                    os.close(fd)
                published.v[k] = nodeid
                mine[nodeid] += 1
                st["inserted" if inserted else "claimed"] += 1
            else:
                if mine and rng.random() < 0.7:
                    nodeid = rng.choice(list(mine))
                else:
                    nodeid = published.v[k]  # looked up by the other guest
                n = mine.pop(nodeid, 0) + rng.choice([1, 2, 1000, U64])
                st["forgot last" if t.forget(nodeid, n) else "forgot"] += 1
        return dict(st)

    def request(seed: int) -> dict[str, int]:
        """Pins published (often just forgotten) and stale nodeids, uses their fds."""
        rng = random.Random(100 + seed)
        held: list[tuple[int, int, int, int]] = []  # nodeid, slot, fd, key
        seen: list[tuple[int, int]] = []
        st = Counter()
        start.wait()
        ops = 0
        while ops < MIN_REQUEST_OPS or not (ops % 32 == 0 and guests_done.is_open()):
            ops += 1
            if len(held) < 3 and rng.random() < 0.6:
                if seen and rng.random() < 0.2:
                    nodeid, k = rng.choice(seen)  # stale: forgotten long ago, maybe
                else:
                    k = rng.randrange(KEYS)
                    nodeid = published.v[k]
                r = t.pin(nodeid)
                if r is None:
                    st["refused"] += 1
                    continue
                slot, fd = r
                assert lib.it_nodeid(t._b, slot) == nodeid and t.fd_of(slot) == fd
                assert names(fd) == ids[k], f"pinned {nodeid:#x}: fd {fd} is not {names_[k]}"
                held.append((nodeid, slot, fd, k))
                seen.append((nodeid, k))
                del seen[:-64]
                st["pinned"] += 1
            elif held:
                nodeid, slot, fd, k = held.pop(rng.randrange(len(held)))
                # still the same entry and file, however much the guest forgot meanwhile
                assert lib.it_nodeid(t._b, slot) == nodeid and t.fd_of(slot) == fd
                assert names(fd) == ids[k], f"fd {fd} of {nodeid:#x} closed under a request"
                t.unpin(nodeid)
        for nodeid, _, fd, k in held:
            assert names(fd) == ids[k]
            t.unpin(nodeid)
        assert t.my_pins() == 0
        st["ops"] = ops
        return dict(st)

    def parked_request() -> dict[str, int]:
        """Three requests parked (think SETLKW, a slow READ) across the whole race."""
        held = []
        k = 0
        while len(held) < 3:
            k = (k + 1) % KEYS
            r = t.pin(published.v[k])
            if r is not None:
                held.append((published.v[k], r[1], k))
        parked.post()
        parked_gate.wait()
        for nodeid, fd, k in held:
            assert names(fd) == ids[k]
            t.unpin(nodeid)
        return {"parked": len(held)}

    # every key looked up once before the race, so there is something to pin
    for k in range(KEYS):
        fd, fids = files.open(names_[k], os.O_PATH)
        published.v[k] = t.claim_or_insert(fids, handle_of(k), 1, fd, REG)[0]
    park = Child(parked_request, shared_fds=True)
    parked.take()
    for k in range(KEYS):  # DESTROY-like: the parked requests' entries lose every lookup
        t.forget(published.v[k], U64)
    guests = [Child(lambda s=s: guest(s), shared_fds=True) for s in (0, 1)]
    requests = [Child(lambda s=s: request(s), shared_fds=True) for s in (0, 1)]
    start.open()
    stats: Counter[str] = Counter()
    for c in guests:
        stats.update(c.result())
    guests_done.open()
    for c in requests:
        stats.update(c.result())
    parked_gate.open()
    stats.update(park.result())
    for g in (start, guests_done, parked_gate, parked):
        g.close()

    # what is left: live entries only, each with its own file, at most one per file
    t.check()
    assert t.pins_held() == 0 and t.stats()["dying"] == 0
    assert t.take_orphaned_fds() == []
    live = [e for e in t.iter_entries() if e.nodeid != FUSE_ROOT_ID]
    assert len({e.ids for e in live}) == len(live)
    for e in live:
        assert tuple(e.ids) in key_of_ids and names(e.fd) == tuple(e.ids)
    assert open_fds() == baseline | {e.fd for e in live}
    for e in live:  # DESTROY
        assert t.forget(e.nodeid, U64)
    assert open_fds() == baseline  # every fd of a freed entry closed
    st = t.stats()
    stats.update(dying_seen=st["deferred"], removals=st["removals"])
    return dict(stats)


def test_overcount_forget_races_pins(tables: Tables, files: Files) -> None:
    t = tables.inode(capacity=256)
    st = isolated(lambda: _inode_race(t, files))
    print(st)
    # the race did happen: entries were forgotten while pinned, and pins were refused
    assert st["dying_seen"] > 0 and st["refused"] > 0 and st["pinned"] > 100
    assert st["parked"] == 3 and st["forgot last"] > 100


# ------------------------------------------------------------------ handle table


def _handle_race(ht: HandleTable, files: Files) -> dict[str, int]:
    """Slot j of the board always holds an fh of file f<j>: an opener replaces released
    ones, a guest RELEASEs (some twice, from two queues), requests READ with pins."""
    n = 8
    names_ = [f"f{j}" for j in range(n)]
    for nm in names_:
        files.make(nm)
    pub = Board(n)
    progress = Board(2)  # reads so far by each reader: the opener goes on until both read
    baseline = open_fds()
    start, done, parked_gate = Gate(), Gate(), Gate()
    parked = Signal()
    opened: list[int] = []
    for j in range(n):
        fd, _ = files.open(names_[j])
        pub.v[j] = ht.open(j, fd, 0)
        opened.append(pub.v[j])

    def opener() -> list[int]:
        """Replaces released fhs of the board by new opens of the same files, REOPENS
        times."""
        rng = random.Random(7)
        made: list[int] = []
        start.wait()
        # on a loaded machine the readers may be scheduled late: keep replacing released
        # files until each reader has read some (else nothing raced), for at most 60 s
        until = time.monotonic() + 60
        while len(made) < REOPENS or (min(progress.v[0], progress.v[1]) < 64
                                      and time.monotonic() < until):
            j = rng.randrange(n)
            if ht.get(pub.v[j]) is None:
                fd, _ = files.open(names_[j])
                pub.v[j] = fh = ht.open(j, fd, 0)
                made.append(fh)
        done.open()
        return made

    def releaser(seed: int) -> list[int]:
        """RELEASEs: the same fh may come from both releasers; True once per fh."""
        rng = random.Random(seed)
        released = []
        start.wait()
        while not done.is_open():
            for _ in range(16):
                fh = pub.v[rng.randrange(n)]
                if ht.close(fh):
                    released.append(fh)
        return released

    def reader(seed: int) -> int:
        rng = random.Random(50 + seed)
        held: list[tuple[int, int, int]] = []
        reads = 0
        start.wait()
        ops = 0
        while ops < MIN_REQUEST_OPS or not (ops % 32 == 0 and done.is_open()):
            ops += 1
            if len(held) < 3 and rng.random() < 0.6:
                j = rng.randrange(n)
                fh = pub.v[j]
                r = ht.pin(fh)
                if r is not None:
                    files.assert_reads(r[1], names_[j])
                    held.append((fh, r[1], j))
            elif held:
                fh, fd, j = held.pop(rng.randrange(len(held)))
                files.assert_reads(fd, names_[j])  # RELEASE may have come: still the file
                ht.unpin(fh)
                reads += 1
                progress.v[seed - 1] = reads
        for fh, fd, j in held:
            files.assert_reads(fd, names_[j])
            ht.unpin(fh)
        return reads

    def parked_reader() -> int:
        held = []
        for j in range(3):
            fh = pub.v[j]
            r = ht.pin(fh)
            assert r is not None  # nothing released before the gate opens
            held.append((fh, r[1], j))
        parked.post()
        parked_gate.wait()
        for fh, fd, j in held:
            files.assert_reads(fd, names_[j])
            ht.unpin(fh)
        return len(held)

    park = Child(parked_reader, shared_fds=True)
    parked.take()  # parked before anything is released
    children = [Child(fn, shared_fds=True) for fn in (
        opener, lambda: releaser(1), lambda: releaser(2), lambda: reader(1),
        lambda: reader(2))]
    start.open()
    made = children[0].result()
    released = children[1].result() + children[2].result()
    reads = children[3].result() + children[4].result()
    parked_gate.open()
    assert park.result() == 3
    for g in (start, done, parked_gate, parked):
        g.close()
    opened += made
    assert len(set(opened)) == len(opened)  # an fh is never handed out twice
    assert len(set(released)) == len(released)  # each RELEASE dropped the open once
    ht.check()
    assert ht.pins_held() == 0 and ht.stats()["dying"] == 0
    left = {e.fh: e for e in ht.iter_handles()}
    assert set(left) | set(released) == set(opened) and not set(left) & set(released)
    for e in left.values():
        files.assert_reads(e.fd, names_[e.nodeid])
    assert open_fds() == baseline | {e.fd for e in left.values()}
    for fh in left:  # DESTROY
        assert ht.close(fh)
    assert open_fds() == baseline
    return {"opened": len(opened), "released": len(released), "reads": reads,
            "deferred": ht.stats()["deferred"]}


def test_release_races_read_pins(tables: Tables, files: Files) -> None:
    ht = tables.handles(64)
    st = isolated(lambda: _handle_race(ht, files))
    print(st)
    # the race did happen: files were released while a READ pinned them
    assert st["released"] >= REOPENS and st["reads"] > 100 and st["deferred"] > 0


# ------------------------------------------------------------------ threads


def test_threads_share_the_lock_and_pin_rows(tables: Tables, files: Files) -> None:
    """The lock word and the pin rows name threads, so threads of one process exclude each
    other too (cffi releases the GIL during every call, so they really run concurrently in
    C), and one thread's FORGET never takes another's pin."""
    t = tables.inode(capacity=256)
    ids: list[Ids] = [files.make(f"t{k}") for k in range(8)]
    errors: list[BaseException] = []
    go = threading.Barrier(4)

    def work(me: int) -> None:
        try:
            rng = random.Random(me)
            go.wait()
            for _ in range(3000):
                k = rng.randrange(8)
                fd, _ = files.open(f"t{k}", os.O_PATH)
                nodeid, inserted = t.claim_or_insert(ids[k], b"t%d" % k, 1, fd, REG)
                if not inserted:
                    os.close(fd)
                r = t.pin(nodeid)
                if r is not None:  # another thread's FORGET may have been first
                    assert names(r[1]) == ids[k]
                t.forget(nodeid, rng.choice([1, U64]))
                if r is not None:
                    assert names(r[1]) == ids[k]  # our pin held it
                    t.unpin(nodeid)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    t.check()
    assert t.pins_held() == 0 and t.stats()["dying"] == 0
    for e in t.iter_entries():
        if e.nodeid != FUSE_ROOT_ID:
            assert names(e.fd) == tuple(e.ids)
