"""Unit tests: one test per rule of the inode table (see docs/shm_table.md)."""

from __future__ import annotations

import logging
import mmap
import os
import signal

import posix_ipc
import pytest
from conftest import unique_name

from shm_table import (
    FUSE_ROOT_ID,
    HandleTable,
    InodeIds,
    InodeNotFound,
    InodeTable,
    InodeTableFull,
    SegmentInUse,
    SegmentLayoutError,
    ShmTableError,
)
from shm_table._native import lib

REG = 0o100644


def ids(n: int) -> tuple[int, int, int]:
    return (1000 + n, 7, 9)


def run_child(fn) -> int:
    """Run fn in a forked child; return the signal that killed it (0 if it exited)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


# ------------------------------------------------------------------ basics


def test_root_is_nodeid_1_and_never_removed(table: InodeTable) -> None:
    root = table.get(FUSE_ROOT_ID)
    assert root is not None and root.refcount == 1 and root.fd == 3
    assert table.forget(FUSE_ROOT_ID, 10) == -1
    assert table.refcount(FUSE_ROOT_ID) == 1
    assert table.release(root.slot, 5) == -1
    assert table.acquire(FUSE_ROOT_ID) == (root.slot, 3)
    assert table.refcount(FUSE_ROOT_ID) == 2
    with pytest.raises(ShmTableError):
        table.insert_root((1, 1, 1), 4, 0o40755)
    table.check()


def test_insert_then_claim_by_handle(table: InodeTable) -> None:
    nodeid, slot, inserted = table.claim_or_insert(ids(1), b"h1", 1, 10, REG, 1, "a")
    assert inserted and nodeid == (1 << 32) | slot  # generation 1 of its slot
    # same handle, different ids: found by handle
    assert table.claim_or_insert(ids(2), b"h1", 1, 11, REG, 1, "b") == (nodeid, slot, False)
    assert table.claim_or_insert(ids(3), bytearray(b"h1"), 1, 12, REG)[2] is False
    e = table.get(nodeid)
    assert e is not None
    assert (e.refcount, e.fd, e.handle, e.handle_type, e.name) == (3, 10, b"h1", 1, b"a")
    assert e.ids == InodeIds(*ids(1)) and e.parent == 1 and e.mode == REG
    table.check()


def test_handle_type_and_mount_are_part_of_the_key(table: InodeTable) -> None:
    a = table.claim_or_insert(ids(1), b"h", 1, -1, REG)
    b = table.claim_or_insert(ids(1), b"h", 2, -1, REG)
    c = table.claim_or_insert(ids(1), b"h", 1, -1, REG, handle_mnt_id=99)
    assert len({a[0], b[0], c[0]}) == 3 and a[2] and b[2] and c[2]
    table.check()


def test_claim_by_ids_needs_an_fd(table: InodeTable) -> None:
    # an entry without an fd is not found by ids: the inode number may have been reused
    n1, _, ins1 = table.claim_or_insert(ids(1), b"old", 1, -1, REG)
    n2, _, ins2 = table.claim_or_insert(ids(1), b"new", 1, 20, REG)
    assert ins1 and ins2 and n1 != n2
    # now an entry with an fd exists for these ids: found by ids (no handle / unknown handle)
    assert table.claim_or_insert(ids(1), None, 0, 21, REG)[:3:2] == (n2, False)
    assert table.claim_or_insert(ids(1), b"other", 1, 22, REG)[:3:2] == (n2, False)
    assert table.refcount(n2) == 3 and table.refcount(n1) == 1
    table.check()


def test_claim_without_handle_uses_ids(table: InodeTable) -> None:
    n, s, ins = table.claim_or_insert(ids(5), None, 0, 30, REG)
    assert ins
    assert table.claim_or_insert(ids(5), None, 0, 31, REG) == (n, s, False)
    assert table.get(n).handle is None
    table.check()


def test_nodeids_are_never_reused(table: InodeTable) -> None:
    seen = set()
    for i in range(300):
        n, slot, ins = table.claim_or_insert(ids(i), b"x%d" % i, 1, 40, REG)
        assert ins and n not in seen
        seen.add(n)
        assert table.release(slot) == 40  # removed: its fd comes back
    # the freed slot is reused at once; its next generation makes the new nodeid
    assert len({n & 0xFFFFFFFF for n in seen}) == 1
    assert sorted(n >> 32 for n in seen) == list(range(1, 301))
    assert table.stats()["next_nodeid"] == 302
    assert table.stats()["rebuilds"] > 0  # tombstones forced index rebuilds
    table.check()


def test_nodeid_names_slot_and_generation(table: InodeTable) -> None:
    n, slot, _ = table.claim_or_insert(ids(1), None, 0, 41, REG)
    assert n == (1 << 32) | slot
    for forged in (0, 2, 3, (2 << 32) | slot, (1 << 32) | (slot + 1), 1 << 32,
                   (1 << 32) | 0xFFFFFFFF, (1 << 64) - 1):
        assert table.acquire(forged) is None and table.get(forged) is None
        assert table.forget(forged, 1) == -1
    assert table.refcount(n) == 1
    table.check()


def test_slot_with_used_up_generations_is_retired(make_table) -> None:
    """A slot whose 32-bit generation reached its maximum is never reused, so no nodeid is
    handed out twice."""
    table = make_table()
    n, slot, _ = table.claim_or_insert(ids(1), None, 0, 42, REG)
    gen_off = 4096 + 512 * slot + 108  # islot_t.gen
    table._mm[gen_off:gen_off + 4] = (0xFFFFFFFE).to_bytes(4, "little")
    n = (0xFFFFFFFE << 32) | slot  # what the slot now names (the test forged the field)
    table._mm[4096 + 512 * slot + 16:4096 + 512 * slot + 24] = n.to_bytes(8, "little")
    assert table.release(slot) == 42
    n1, s1, _ = table.claim_or_insert(ids(2), None, 0, 43, REG)
    assert (n1, s1) == ((0xFFFFFFFF << 32) | slot, slot)
    assert table.release(s1) == 43
    assert table.stats()["retired"] == 1
    table.check()
    n2, s2, _ = table.claim_or_insert(ids(3), None, 0, 44, REG)
    assert s2 != slot and n2 not in (n, n1)
    table.check()


def test_key_indexes_grow_with_high_water_mark(make_table) -> None:
    """The ids/handle indexes use 2 x high-water-mark buckets (at least 512), not the room
    reserved for the capacity, so their resident pages follow the live entries."""
    table = make_table(capacity=1 << 16)
    assert table.stats()["index_size"] == 512
    held = [table.claim_or_insert(ids(i), b"g%d" % i, 1, 50, REG)[1] for i in range(600)]
    assert table.stats()["index_size"] == 2048
    table.check()
    for s in held:
        table.release(s)
    for i in range(5000):  # churn: the index stays at its size
        _, s, _ = table.claim_or_insert(ids(10_000 + i), b"c%d" % i, 1, 51, REG)
        table.release(s)
    assert table.stats()["index_size"] == 2048
    table.check()


# ------------------------------------------------------------------ refcounts


def test_acquire_and_release(table: InodeTable) -> None:
    n, slot, _ = table.claim_or_insert(ids(1), b"h", 1, 50, REG)
    assert table.acquire(n) == (slot, 50)
    assert table.acquire_slot(n) == slot and table.fd_of(slot) == 50
    assert table.refcount(n) == 3
    assert table.release(slot) == -1
    assert table.release(slot) == -1
    assert table.release(slot) == 50
    assert table.get(n) is None and table.acquire(n) is None


def test_forget_saturates(table: InodeTable) -> None:
    n, _, _ = table.claim_or_insert(ids(1), b"h", 1, 51, REG)
    table.acquire(n)
    assert table.forget(n, 2**64 - 1) == 51
    assert table.get(n) is None
    assert table.forget(n, 1) == -1  # unknown: no-op
    n2, s2, _ = table.claim_or_insert(ids(2), b"h2", 1, 52, REG)
    assert table.forget(n2, 2**70) == 52  # more than u64: clamped
    assert table.release(s2) == -1  # already 0: saturating, no second removal
    table.check()


def test_forget_partial(table: InodeTable) -> None:
    n, s, _ = table.claim_or_insert(ids(1), b"h", 1, 53, REG)
    for _ in range(4):
        table.claim_or_insert(ids(1), b"h", 1, 99, REG)
    assert table.refcount(n) == 5
    assert table.forget(n, 3) == -1 and table.refcount(n) == 2
    assert table.forget(n, 0) == -1 and table.refcount(n) == 2
    assert table.forget(n, 2) == 53
    table.check()


def test_removal_clears_both_key_indexes(table: InodeTable) -> None:
    n, s, _ = table.claim_or_insert(ids(1), b"h", 1, 60, REG)
    assert table.release(s) == 60
    st = table.stats()
    assert st["entries"] == 1 and st["tombstones_nodeid"] == 0  # no nodeid index
    assert st["tombstones_ids"] == 1 and st["tombstones_handle"] == 1
    assert table.acquire(n) is None  # the slot no longer holds that nodeid
    n2, _, ins = table.claim_or_insert(ids(1), None, 0, 61, REG)  # ids index
    assert ins and n2 != n
    n3, _, ins = table.claim_or_insert(ids(2), b"h", 1, 62, REG)  # handle index
    assert ins and n3 not in (n, n2)
    table.check()


def test_zero_refcount_is_never_raised(make_table) -> None:
    """Freeze a removal right after its refcount hit 0 (the remover dies holding the lock):
    lock-free acquire must refuse the still-indexed entry."""
    table = make_table()
    n, s, _ = table.claim_or_insert(ids(1), b"h", 1, 70, REG)

    def die_after_commit() -> None:
        lib.seg_debug_crash_after(2)  # 1: intent written, 2: refcount CAS'ed to 0
        table.release(s)

    assert run_child(die_after_commit) == signal.SIGKILL
    assert table.lock_owner != 0  # the dead child still "holds" the lock
    assert lib.it_refcount(table._b, s) == 0 and lib.it_nodeid(table._b, s) == n
    assert table.acquire(n) is None
    assert table.forget(n, 1) == -1
    # a writer takes the lock over, finishes the removal and hands the fd to the supervisor
    n2, _, ins = table.claim_or_insert(ids(1), b"h", 1, 71, REG)
    assert ins and n2 != n
    assert table.take_orphaned_fds() == [70]
    assert table.stats()["lock_takeovers"] == 1
    table.check()


def test_strong_ref(table: InodeTable) -> None:
    closed: list[int] = []
    table.close_fd = closed.append
    n, s, _ = table.claim_or_insert(ids(1), b"h", 1, 80, REG)
    with table.strong_ref(n) as ref:
        assert (ref.slot, ref.fd, ref.nodeid, ref.held) == (s, 80, n, True)
        assert table.refcount(n) == 2
        assert table.forget(n, 1) == -1  # the guest forgets while we still use it
    assert closed == [80] and not ref.held and table.get(n) is None
    assert ref.release() == -1  # idempotent
    ref2 = table.strong_ref(FUSE_ROOT_ID)
    assert ref2.release() == -1 and ref2.release() == -1
    assert table.refcount(FUSE_ROOT_ID) == 1
    with pytest.raises(InodeNotFound):
        table.strong_ref(n)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("nodeid", [0, 3, 12345, 2**32 + 2, 2**64 - 1, -1, 2**64, 2**100])
def test_forged_nodeids_are_rejected(table: InodeTable, nodeid: int) -> None:
    table.claim_or_insert(ids(1), b"h", 1, 90, REG)  # nodeid 2 exists
    before = table.stats()["entries"]
    assert table.acquire(nodeid) is None
    assert table.acquire_slot(nodeid) == -1
    assert table.get(nodeid) is None
    assert table.forget(nodeid, 1) == -1
    assert table.stats()["entries"] == before
    table.check()


def test_release_of_bad_slot_is_harmless(table: InodeTable) -> None:
    assert table.release(10**6) == -1
    assert table.release(50) == -1  # never used
    table.check()


def test_argument_limits(table: InodeTable) -> None:
    with pytest.raises(ValueError):
        table.claim_or_insert(ids(1), b"x" * 129, 1, -1, REG)
    with pytest.raises(ValueError):
        table.claim_or_insert(ids(1), None, 0, -1, REG, 1, "n" * 256)
    n, s, _ = table.claim_or_insert(ids(1), b"x" * 128, 1, -1, REG, 1, "n" * 255)
    e = table.get(n)
    assert e.handle == b"x" * 128 and e.name == b"n" * 255
    table.check()


# ------------------------------------------------------------------ full table


def test_table_full(make_table) -> None:
    table = make_table(capacity=8)
    held = [table.claim_or_insert(ids(i), b"%d" % i, 1, 100 + i, REG) for i in range(7)]
    with pytest.raises(InodeTableFull):
        table.claim_or_insert(ids(99), b"99", 1, 199, REG)
    # existing entries are still found (no new slot needed) and nothing broke
    assert table.claim_or_insert(ids(3), b"3", 1, 5, REG)[2] is False
    table.check()
    assert table.stats()["full_errors"] == 1
    assert table.release(held[0][1]) == 100
    n, slot, ins = table.claim_or_insert(ids(99), b"99", 1, 199, REG)
    assert ins and slot == held[0][1] and n == (2 << 32) | slot  # the slot's 2nd generation
    table.check()


# ------------------------------------------------------------------ migration info, iteration


def test_set_migration_info(table: InodeTable) -> None:
    n, s, _ = table.claim_or_insert(ids(1), b"h", 1, -1, REG, 1, "first")
    table.set_migration_info(s, 7, b"second")
    e = table.get(n)
    assert (e.parent, e.name) == (7, b"second")
    table.set_migration_info(s, 8, "")
    assert table.get(n).name == b""
    table.release(s)
    with pytest.raises(InodeNotFound):
        table.set_migration_info(s, 1, "gone")
    with pytest.raises(ValueError):
        table.set_migration_info(s, 1, "x" * 256)


def test_iter_entries(table: InodeTable) -> None:
    made = {table.claim_or_insert(ids(i), b"%d" % i, 1, i, REG)[0] for i in range(20)}
    for n in list(made)[:5]:
        table.forget(n, 1)
        made.discard(n)
    got = {e.nodeid: e for e in table.iter_entries()}
    assert set(got) == made | {FUSE_ROOT_ID}
    assert all(e.refcount == 1 for e in got.values())
    # iterating while entries are removed and added terminates and yields only live ones
    it = table.iter_entries()
    first = next(it)
    for n in list(made)[:5]:
        table.forget(n, 1)
    table.claim_or_insert(ids(500), b"new", 1, 5, REG)
    rest = list(it)
    assert first.nodeid == FUSE_ROOT_ID and all(e.refcount >= 1 for e in rest)
    assert len(table) == len(made) - 5 + 2


def test_stats(table: InodeTable) -> None:
    n, s, _ = table.claim_or_insert(ids(1), b"h", 1, 5, REG)
    table.claim_or_insert(ids(1), b"h", 1, 5, REG)
    table.forget(n, 2)
    st = table.stats()
    assert st["capacity"] == 64 and st["entries"] == 1 and st["inserts"] == 2
    assert st["lookups"] == 1 and st["removals"] == 1 and st["tombstones"] == 2  # ids, handle
    assert st["load_factor"] == pytest.approx(1 / 64)


# ------------------------------------------------------------------ segments


def test_attach_sees_the_same_table(table: InodeTable) -> None:
    n, s, _ = table.claim_or_insert(ids(1), b"h", 1, 5, REG)
    other = InodeTable.attach(table.name)
    try:
        assert other.acquire(n) == (s, 5)
        assert table.refcount(n) == 2
        other.check()
    finally:
        other.close()
    with pytest.raises(SegmentLayoutError):
        HandleTable.attach(table.name)


def test_create_replaces_stale_segment_of_dead_owner(caplog) -> None:
    name = unique_name("stale")

    def make_and_leave() -> None:
        t = InodeTable.create(name, 16)
        t.insert_root((1, 1, 1), 3, 0o40755)

    assert run_child(make_and_leave) == 0
    with caplog.at_level(logging.WARNING, "pyvirtiofsd.shm_table"):
        t = InodeTable.create(name, 16)
    try:
        assert "stale" in caplog.text and "owner pid" in caplog.text
        assert t.get(FUSE_ROOT_ID) is None and len(t) == 0  # fresh, not reused
    finally:
        t.unlink()
        t.detach()


def test_create_replaces_segment_whose_owner_pid_was_reused(caplog) -> None:
    """A daemon restarted with the same PID (fresh container) finds its predecessor's
    segment: same PID, alive (it is us), but a different start time."""
    name = unique_name("reuse")
    old = InodeTable.create(name, 16)
    old._mm[208:216] = (12345).to_bytes(8, "little")  # owner_start of "another" process
    try:
        with caplog.at_level(logging.WARNING, "pyvirtiofsd.shm_table"):
            new = InodeTable.create(name, 16)
        assert "stale" in caplog.text
        new.unlink()
        new.detach()
    finally:
        old.detach()


def test_create_replaces_foreign_segment(caplog) -> None:
    name = unique_name("foreign")
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=8192)
    with mmap.mmap(shm.fd, 8192) as mm:
        mm[:16] = b"not a table at all"[:16]
    shm.close_fd()
    with caplog.at_level(logging.WARNING, "pyvirtiofsd.shm_table"):
        t = InodeTable.create(name, 16)
    try:
        assert "stale" in caplog.text and "not a pyvirtiofsd inode table" in caplog.text
        t.check()
    finally:
        t.unlink()
        t.detach()


def test_create_refuses_live_segment(table: InodeTable) -> None:
    with pytest.raises(SegmentInUse):
        InodeTable.create(table.name, 16)
    assert table.get(FUSE_ROOT_ID) is not None


def test_capacity_bounds() -> None:
    with pytest.raises(ValueError):
        InodeTable.create(unique_name("cap"), 0)
