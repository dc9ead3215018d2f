"""Unit tests: one test per rule of the inode table, on real fds.

The rules (see the top of shm_table/native.c): the guest's lookups are one count, which
FORGET drops at most to 0 (the root to 1); a request in flight pins the entry instead; an
entry the guest forgot leaves the indexes at once and is freed, its fd closed once, by
whoever drops the last of {guest reference, pins}; unpin names a nodeid, never a slot.
"""

from __future__ import annotations

import logging
import mmap
import os

import posix_ipc
import pytest
from conftest import U64, Tables, assert_quiet, unique_name
from procs import Child, Gate, Signal
from realfds import Files, is_open

from shm_table import (
    FUSE_ROOT_ID,
    HandleTable,
    InodeIds,
    InodeNotFound,
    InodeTable,
    InodeTableFull,
    NotPinned,
    PinsExhausted,
    SegmentInUse,
    SegmentLayoutError,
    ShmTableError,
)

REG = 0o100644
DIR = 0o40755
SLOTS_OFF = 8192  # header + pin board (docs/shm_table.md)
SLOT_SIZE = 512


def lookup(table: InodeTable, files: Files, name: str, handle: bytes | None = None,
           handle_type: int = 1, parent: int = FUSE_ROOT_ID, **kw: object) -> tuple[int, bool, int]:
    """A LOOKUP as the daemon does it: open the file, then claim_or_insert with its ids.
    Returns (nodeid, inserted, fd); the fd is the table's when inserted, else it was the
    caller's, checked open (the table must not take or close it) and closed here."""
    fd, ids = files.open(name, os.O_PATH)
    nodeid, inserted = table.claim_or_insert(ids, handle, handle_type, fd, REG, parent, name,
                                             **kw)
    if not inserted:
        files.assert_names(fd, ids)
        os.close(fd)
    return nodeid, inserted, fd


def slot_of(nodeid: int) -> int:
    return nodeid & 0xFFFFFFFF


# ------------------------------------------------------------------ basics


def test_root_is_nodeid_1_and_never_freed(table: InodeTable, tables: Tables,
                                           files: Files) -> None:
    rfd, rids = tables.root_fds[0], tables.root_ids()
    root = table.get(FUSE_ROOT_ID)
    assert root is not None and (root.lookups, root.fd, root.ids) == (1, rfd, rids)
    assert table.forget(FUSE_ROOT_ID, 10) is False
    assert table.lookups(FUSE_ROOT_ID) == 1
    # a LOOKUP of the shared directory itself finds the root by its ids
    fd = os.open(files.root, os.O_PATH | os.O_CLOEXEC)
    assert table.claim_or_insert(rids, None, 0, fd, DIR) == (FUSE_ROOT_ID, False)
    os.close(fd)
    assert table.lookups(FUSE_ROOT_ID) == 2
    assert table.forget(FUSE_ROOT_ID, U64) is False  # never below 1
    assert table.lookups(FUSE_ROOT_ID) == 1
    assert table.pin(FUSE_ROOT_ID) == (root.slot, rfd)
    table.unpin(FUSE_ROOT_ID)
    with pytest.raises(ShmTableError):
        table.insert_root(rids, rfd, DIR)
    files.assert_names(rfd, rids)
    assert_quiet(table)


def test_insert_then_claim_by_handle(table: InodeTable, files: Files) -> None:
    nodeid, inserted, fd = lookup(table, files, "a", b"h1", 1)
    assert inserted and nodeid >> 32 == 1  # generation 1 of its slot
    # same handle, another file (ids): found by handle, the caller keeps its fd
    assert lookup(table, files, "b", b"h1", 1)[:2] == (nodeid, False)
    fd3, ids3 = files.open("c", os.O_PATH)
    assert table.claim_or_insert(ids3, bytearray(b"h1"), 1, fd3, REG) == (nodeid, False)
    os.close(fd3)
    e = table.get(nodeid)
    assert e is not None and e.slot == slot_of(nodeid)
    assert (e.lookups, e.fd, e.handle, e.handle_type, e.name) == (3, fd, b"h1", 1, b"a")
    assert e.ids == InodeIds(*files.ids("a")) and e.parent == 1 and e.mode == REG
    files.assert_names(fd, files.ids("a"))
    table.check()


def test_handle_type_and_mount_are_part_of_the_key(table: InodeTable, files: Files) -> None:
    # entries without an fd (kept by handle only) are never found by their ids
    ids = files.make("a")
    a = table.claim_or_insert(ids, b"h", 1, -1, REG)
    b = table.claim_or_insert(ids, b"h", 2, -1, REG)
    c = table.claim_or_insert(ids, b"h", 1, -1, REG, handle_mnt_id=99)
    assert len({a[0], b[0], c[0]}) == 3 and a[1] and b[1] and c[1]
    assert table.claim_or_insert(ids, b"h", 2, -1, REG) == (b[0], False)
    table.check()


def test_claim_by_ids_needs_an_fd(table: InodeTable, files: Files) -> None:
    """An entry without an fd is not found by ids: the inode number may have been reused."""
    ids = files.make("a")
    n1, ins1 = table.claim_or_insert(ids, b"old", 1, -1, REG)
    n2, ins2, fd2 = lookup(table, files, "a", b"new", 1)
    assert ins1 and ins2 and n1 != n2
    # now an entry with an fd exists for these ids: found by ids (no or unknown handle)
    assert lookup(table, files, "a", None, 0)[:2] == (n2, False)
    assert lookup(table, files, "a", b"other", 1)[:2] == (n2, False)
    assert (table.lookups(n2), table.lookups(n1)) == (3, 1)
    files.assert_names(fd2, ids)
    table.check()


def test_claim_without_handle_uses_ids(table: InodeTable, files: Files) -> None:
    n, ins, fd = lookup(table, files, "a", None, 0)
    assert ins
    assert lookup(table, files, "a", None, 0)[:2] == (n, False)
    e = table.get(n)
    assert e is not None and e.handle is None and e.fd == fd
    table.check()


def test_nodeids_are_never_reused(table: InodeTable, files: Files) -> None:
    seen: set[int] = set()
    for i in range(300):
        n, ins, fd = lookup(table, files, f"n{i}", b"x%d" % i, 1)
        assert ins and n not in seen
        seen.add(n)
        assert table.forget(n, 1) is True
        assert not is_open(fd)  # freed: its fd closed (the next open takes the number)
    # the freed slot is reused at once; its next generation makes the new nodeid
    assert len({slot_of(n) for n in seen}) == 1
    assert sorted(n >> 32 for n in seen) == list(range(1, 301))
    assert table.stats()["next_nodeid"] == 302
    assert table.stats()["rebuilds"] > 0  # tombstones forced index rebuilds
    table.check()


def test_nodeid_names_slot_and_generation(table: InodeTable, files: Files) -> None:
    n, _, fd = lookup(table, files, "a")
    slot = slot_of(n)
    assert n == (1 << 32) | slot
    for forged in (0, 2, 3, (2 << 32) | slot, (1 << 32) | (slot + 1), 1 << 32,
                   (1 << 32) | 0xFFFFFFFF, U64):
        assert table.pin(forged) is None and table.get(forged) is None
        assert table.forget(forged, 1) is False
        with pytest.raises(NotPinned):
            table.unpin(forged)
    assert table.lookups(n) == 1
    files.assert_names(fd, files.ids("a"))
    table.check()


def test_slot_with_used_up_generations_is_retired(table: InodeTable, files: Files) -> None:
    """A slot whose 32-bit generation reached its maximum is never reused, so no nodeid is
    handed out twice."""
    n, _, fd = lookup(table, files, "a")
    slot = slot_of(n)
    base = SLOTS_OFF + SLOT_SIZE * slot
    table._mm[base + 108:base + 112] = (0xFFFFFFFE).to_bytes(4, "little")  # islot_t.gen
    n = (0xFFFFFFFE << 32) | slot  # what the slot now names (the test forged the field)
    table._mm[base + 16:base + 24] = n.to_bytes(8, "little")  # islot_t.nodeid
    assert table.forget(n, 1) and not is_open(fd)
    n1, _, fd1 = lookup(table, files, "b")
    assert n1 == (0xFFFFFFFF << 32) | slot
    assert table.forget(n1, 1) and not is_open(fd1)
    assert table.stats()["retired"] == 1
    table.check()
    n2, _, _ = lookup(table, files, "c")
    assert slot_of(n2) != slot and n2 not in (n, n1)
    table.check()


def test_key_indexes_grow_with_high_water_mark(make_table, files: Files) -> None:
    """The ids/handle indexes use 2 x high-water-mark buckets (at least 512), not the room
    reserved for the capacity, so their resident pages follow the live entries."""
    table = make_table(capacity=1 << 16)
    assert table.stats()["index_size"] == 512
    held = [lookup(table, files, f"g{i}", b"g%d" % i)[0] for i in range(600)]
    assert table.stats()["index_size"] == 2048
    table.check()
    for n in held:
        assert table.forget(n, 1)
    for i in range(3000):  # churn: the index stays at its size
        n, _, fd = lookup(table, files, "churn", b"c%d" % i)
        assert table.forget(n, 1) and not is_open(fd)
    assert table.stats()["index_size"] == 2048
    table.check()


# ------------------------------------------------------------------ lookups and pins


def test_pins_are_not_lookups(table: InodeTable, files: Files) -> None:
    n, _, fd = lookup(table, files, "a")
    assert table.pin(n) == (slot_of(n), fd)
    assert table.pin(n) == (slot_of(n), fd)  # a request may pin an inode twice
    assert table.lookups(n) == 1 and table.my_pins() == 2 and table.pins_held() == 2
    assert table.fd_of(slot_of(n)) == fd
    table.unpin(n)
    table.unpin(n)
    assert table.my_pins() == 0 and table.lookups(n) == 1
    files.assert_names(fd, files.ids("a"))
    with pytest.raises(NotPinned):
        table.unpin(n)
    assert table.lookups(n) == 1 and table.get(n) is not None
    table.check()


def test_overcount_forget_drops_only_the_guests_lookups(table: InodeTable,
                                                        files: Files) -> None:
    """FORGET/DESTROY with a count above the guest's lookups takes what the guest holds and
    no more: a request in flight that pins the inode keeps its fd open and usable until it
    unpins; then the fd is closed, once."""
    n, _, fd = lookup(table, files, "a")
    lookup(table, files, "a")
    assert table.lookups(n) == 2
    assert table.pin(n) == (slot_of(n), fd)
    assert table.forget(n, U64) is True  # the guest's 2 go, our pin stays
    assert table.get(n) is None and table.lookups(n) == 0
    dying = [e for e in table.iter_entries(dying=True) if e.nodeid == n]
    assert len(dying) == 1 and dying[0].lookups == 0 and dying[0].fd == fd
    st = table.stats()
    assert (st["dying"], st["deferred"]) == (1, 1)
    files.assert_names(fd, files.ids("a"))
    assert os.fstat(fd).st_mode & 0o170000 == 0o100000  # usable, it is the file
    # the guest forgot it: no new pin, no second FORGET; a LOOKUP makes a NEW entry
    assert table.pin(n) is None
    assert table.forget(n, 1) is False
    n2, ins2, fd2 = lookup(table, files, "a")
    assert ins2 and n2 != n
    files.assert_names(fd, files.ids("a"))
    table.check()
    table.unpin(n)  # the last holder: the entry is freed, its fd closed here
    files.assert_closed(fd)
    assert table.stats()["dying"] == 0 and table.lookups(n2) == 1
    files.assert_names(fd2, files.ids("a"))
    assert table.forget(n2, 2**70) is True  # more than 64 bits: clamped
    files.assert_closed(fd2)
    table.check()


def test_overcount_forget_while_another_process_pins(table: InodeTable, files: Files) -> None:
    """The same with the pin held by another worker sharing the fd table: the fd stays open
    while it is parked, and it is closed by that worker when it unpins."""
    n, _, fd = lookup(table, files, "a")
    ids = files.ids("a")
    pinned, go = Signal(), Gate()

    def worker() -> None:
        assert table.pin(n) == (slot_of(n), fd)
        pinned.post()
        go.wait()  # parked while the guest forgets
        files.assert_names(fd, ids)
        table.unpin(n)  # frees the entry: this process closes the fd, for both

    child = Child(worker, shared_fds=True)
    pinned.take()
    assert table.forget(n, U64) is True
    assert table.pin(n) is None
    files.assert_names(fd, ids)
    assert table.pins_held() == 1 and table.my_pins() == 0
    go.open()
    child.result()
    files.assert_closed(fd)
    assert table.stats()["dying"] == 0
    pinned.close()
    go.close()
    table.check()


def test_forget_partial(table: InodeTable, files: Files) -> None:
    n, _, fd = lookup(table, files, "a", b"h")
    for _ in range(4):
        lookup(table, files, "a", b"h")
    assert table.lookups(n) == 5
    assert table.forget(n, 3) is False and table.lookups(n) == 2
    assert table.forget(n, 0) is False and table.lookups(n) == 2
    files.assert_names(fd, files.ids("a"))
    assert table.forget(n, 2) is True
    files.assert_closed(fd)
    table.check()


def test_pin_of_a_forgotten_nodeid_fails(table: InodeTable, files: Files) -> None:
    n, _, fd = lookup(table, files, "a")
    assert table.pin(n) is not None
    assert table.forget(n, 1) is True
    misses = table.stats()["acquire_misses"]
    assert table.pin(n) is None  # dying: the guest no longer holds it
    with pytest.raises(InodeNotFound):
        table.strong_ref(n)
    assert table.stats()["acquire_misses"] == misses + 2
    table.unpin(n)
    files.assert_closed(fd)
    assert table.pin(n) is None
    table.check()


def test_unpin_never_touches_a_later_occupant(table: InodeTable, files: Files) -> None:
    """unpin names the nodeid: a stale or double unpin raises NotPinned and changes nothing,
    even when the slot already holds the next generation."""
    n1, _, fd1 = lookup(table, files, "a")
    assert table.pin(n1) is not None
    assert table.forget(n1, 1) is True
    table.unpin(n1)
    files.assert_closed(fd1)
    n2, _, fd2 = lookup(table, files, "b")
    assert slot_of(n2) == slot_of(n1) and n2 >> 32 == 2  # the slot's next generation
    with pytest.raises(NotPinned):
        table.unpin(n1)
    assert table.pin(n2) == (slot_of(n2), fd2)
    with pytest.raises(NotPinned):
        table.unpin(n1)
    assert table.my_pins() == 1 and table.lookups(n2) == 1
    assert table.forget(n2, 1) is True  # still pinned by us
    with pytest.raises(NotPinned):
        table.unpin(n1)
    files.assert_names(fd2, files.ids("b"))
    table.unpin(n2)
    files.assert_closed(fd2)
    with pytest.raises(NotPinned):
        table.unpin(n2)  # a second unpin
    table.check()


def test_forged_nodeid_of_the_next_generation(table: InodeTable, files: Files) -> None:
    n1, _, fd1 = lookup(table, files, "a")
    forged = n1 + (1 << 32)
    assert table.pin(forged) is None and table.get(forged) is None
    assert table.forget(forged, U64) is False
    with pytest.raises(InodeNotFound):
        table.set_migration_info(forged, 1, "x")
    assert table.lookups(n1) == 1
    files.assert_names(fd1, files.ids("a"))
    assert table.forget(n1, 1) is True
    files.assert_closed(fd1)
    assert table.pin(forged) is None  # the slot is free: nothing to find
    n2, _, fd2 = lookup(table, files, "b")
    assert n2 == forged  # only now does it name an entry
    assert table.pin(n2) == (slot_of(n2), fd2)
    table.unpin(n2)
    table.check()


def test_pins_exhausted(table: InodeTable, files: Files) -> None:
    """A thread holds at most 7 pins (a request needs 3 at most): more is a leak."""
    nodeids = [lookup(table, files, f"f{i}")[0] for i in range(4)]
    for i in range(7):
        assert table.pin(nodeids[i % 4]) is not None
    with pytest.raises(PinsExhausted):
        table.pin(nodeids[0])
    with pytest.raises(PinsExhausted):
        table.forget(nodeids[1], U64)  # FORGET needs a pin of its own too
    assert table.lookups(nodeids[1]) == 1
    assert table.stats()["pins_refused"] == 2
    assert table.my_pins() == 7
    table.unpin(nodeids[0])
    assert table.forget(nodeids[1], U64) is True  # pinned twice more: deferred
    assert table.pin(nodeids[0]) is not None
    for i in range(7):
        table.unpin(nodeids[i % 4])
    assert table.my_pins() == 0 and table.stats()["dying"] == 0
    table.check()


def test_removal_clears_both_key_indexes(table: InodeTable, files: Files) -> None:
    n, _, fd = lookup(table, files, "a", b"h")
    assert table.forget(n, 1) is True
    files.assert_closed(fd)
    st = table.stats()
    assert st["entries"] == 1 and st["tombstones_nodeid"] == 0  # no nodeid index
    assert st["tombstones_ids"] == 1 and st["tombstones_handle"] == 1
    assert table.pin(n) is None  # the slot no longer holds that nodeid
    n2, ins, _ = lookup(table, files, "a", None, 0)  # ids index
    assert ins and n2 != n
    n3, ins, _ = lookup(table, files, "b", b"h")  # handle index
    assert ins and n3 not in (n, n2)
    table.check()


def test_forgotten_entry_leaves_the_indexes_at_once(table: InodeTable, files: Files) -> None:
    """A LOOKUP of a file whose entry the guest forgot, while a request still pins it,
    inserts a new entry: the dying one is never found (or revived) again."""
    n, _, fd = lookup(table, files, "a", b"h")
    assert table.pin(n) is not None
    assert table.forget(n, 1) is True
    n2, ins, fd2 = lookup(table, files, "a", b"h")
    n3, ins3, _ = lookup(table, files, "a", b"h")
    assert ins and not ins3 and n2 == n3 != n
    assert table.lookups(n) == 0 and table.lookups(n2) == 2
    st = table.stats()
    assert (st["entries"], st["dying"]) == (3, 1)
    table.check()
    table.unpin(n)
    files.assert_closed(fd)
    files.assert_names(fd2, files.ids("a"))
    table.check()


def test_strong_ref(table: InodeTable, files: Files) -> None:
    n, _, fd = lookup(table, files, "a", b"h")
    with table.strong_ref(n) as ref:
        assert (ref.slot, ref.fd, ref.nodeid, ref.held) == (slot_of(n), fd, n, True)
        assert table.lookups(n) == 1 and table.my_pins() == 1
        assert table.forget(n, 1) is True  # the guest forgets while we still use it
        files.assert_names(fd, files.ids("a"))
    files.assert_closed(fd)
    assert not ref.held and table.get(n) is None
    ref.release()  # idempotent
    ref2 = table.strong_ref(FUSE_ROOT_ID)
    ref2.release()
    ref2.release()
    assert table.lookups(FUSE_ROOT_ID) == 1 and table.my_pins() == 0
    with pytest.raises(InodeNotFound):
        table.strong_ref(n)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("nodeid", [0, 3, 12345, 2**32 + 2, 2**64 - 1, -1, 2**64, 2**100])
def test_forged_nodeids_are_rejected(table: InodeTable, files: Files, nodeid: int) -> None:
    n, _, fd = lookup(table, files, "a", b"h")
    before = table.stats()["entries"]
    assert table.pin(nodeid) is None
    assert table.get(nodeid) is None and table.lookups(nodeid) == 0
    assert table.forget(nodeid, 1) is False
    with pytest.raises(NotPinned):
        table.unpin(nodeid)
    with pytest.raises(InodeNotFound):
        table.set_migration_info(nodeid, 1, "x")
    assert table.stats()["entries"] == before and table.lookups(n) == 1
    files.assert_names(fd, files.ids("a"))
    table.check()


def test_argument_limits(table: InodeTable, files: Files) -> None:
    fd, ids = files.open("a", os.O_PATH)
    with pytest.raises(ValueError):
        table.claim_or_insert(ids, b"x" * 129, 1, fd, REG)
    with pytest.raises(ValueError):
        table.claim_or_insert(ids, None, 0, fd, REG, 1, "n" * 256)
    files.assert_names(fd, ids)  # refused: still the caller's
    n, ins = table.claim_or_insert(ids, b"x" * 128, 1, fd, REG, 1, "n" * 255)
    e = table.get(n)
    assert ins and e is not None and e.handle == b"x" * 128 and e.name == b"n" * 255
    table.check()


# ------------------------------------------------------------------ full table


def test_table_full(make_table, files: Files) -> None:
    table = make_table(capacity=8)
    held = [lookup(table, files, f"f{i}", b"%d" % i) for i in range(7)]
    fd, ids = files.open("new", os.O_PATH)
    with pytest.raises(InodeTableFull):
        table.claim_or_insert(ids, b"new", 1, fd, REG)
    files.assert_names(fd, ids)  # not taken: the caller closes it
    # existing entries are still found (no new slot needed) and nothing broke
    assert lookup(table, files, "f3", b"3")[:2] == (held[3][0], False)
    table.check()
    assert table.stats()["full_errors"] == 1
    assert table.forget(held[0][0], 1) is True
    files.assert_closed(held[0][2])
    n, ins = table.claim_or_insert(ids, b"new", 1, fd, REG)
    assert ins and n == (2 << 32) | slot_of(held[0][0])  # the slot's 2nd generation
    table.check()


# ------------------------------------------------------------------ migration info, iteration


def test_set_migration_info(table: InodeTable, files: Files) -> None:
    n, _, _ = lookup(table, files, "first", b"h")
    table.set_migration_info(n, 7, b"second")
    e = table.get(n)
    assert e is not None and (e.parent, e.name) == (7, b"second")
    table.set_migration_info(n, 8, "")
    assert table.get(n).name == b""
    with pytest.raises(ValueError):
        table.set_migration_info(n, 1, "x" * 256)
    assert table.pin(n) is not None
    table.forget(n, 1)
    with pytest.raises(InodeNotFound):  # dying: the guest forgot it
        table.set_migration_info(n, 1, "gone")
    table.unpin(n)
    with pytest.raises(InodeNotFound):
        table.set_migration_info(n, 1, "gone")


def test_iter_entries(table: InodeTable, files: Files) -> None:
    made = {lookup(table, files, f"f{i}", b"%d" % i)[0] for i in range(20)}
    gone = sorted(made)[:5]
    for n in gone:
        table.forget(n, 1)
    made -= set(gone)
    got = {e.nodeid: e for e in table.iter_entries()}
    assert set(got) == made | {FUSE_ROOT_ID}
    assert all(e.lookups == 1 for e in got.values())
    # a pinned, forgotten entry shows with dying=True only, with no lookups
    pinned = sorted(made)[0]
    assert table.pin(pinned) is not None
    table.forget(pinned, 1)
    assert pinned not in {e.nodeid for e in table.iter_entries()}
    dying = {e.nodeid: e.lookups for e in table.iter_entries(dying=True)}
    assert dying[pinned] == 0 and set(dying) == made | {FUSE_ROOT_ID}
    table.unpin(pinned)
    made.discard(pinned)
    # iterating while entries are removed and added terminates and yields only live ones
    it = table.iter_entries()
    first = next(it)
    for n in sorted(made)[:5]:
        table.forget(n, 1)
    lookup(table, files, "new", b"new")
    rest = list(it)
    assert first.nodeid == FUSE_ROOT_ID and all(e.lookups >= 1 for e in rest)
    assert len(table) == len(made) - 5 + 2


def test_stats(table: InodeTable, files: Files) -> None:
    n, _, _ = lookup(table, files, "a", b"h")
    lookup(table, files, "a", b"h")
    assert table.pin(n) is not None
    table.forget(n, 2)
    st = table.stats()
    assert st["capacity"] == 64 and st["entries"] == 2 and st["inserts"] == 2
    assert st["lookups"] == 1 and st["removals"] == 0 and st["tombstones"] == 2  # ids, handle
    assert (st["dying"], st["deferred"], st["pin_rows"]) == (1, 1, 1)
    assert st["load_factor"] == pytest.approx(2 / 64)
    table.unpin(n)
    st = table.stats()
    assert (st["entries"], st["removals"], st["dying"]) == (1, 1, 0)


# ------------------------------------------------------------------ segments


def test_attach_sees_the_same_table(table: InodeTable, files: Files) -> None:
    n, _, fd = lookup(table, files, "a", b"h")
    other = InodeTable.attach(table.name)
    try:
        assert other.pin(n) == (slot_of(n), fd)
        assert table.my_pins() == 1  # one pin board, one row per thread
        assert table.forget(n, 1) is True
        files.assert_names(fd, files.ids("a"))
        other.unpin(n)
        files.assert_closed(fd)
        other.check()
    finally:
        other.close()
    with pytest.raises(SegmentLayoutError):
        HandleTable.attach(table.name)


def test_create_replaces_stale_segment_of_dead_owner(caplog, files: Files) -> None:
    name = unique_name("stale")

    def make_and_leave() -> None:
        t = InodeTable.create(name, 16)
        fd, ids = files.open("root", os.O_PATH)
        t.insert_root(ids, fd, DIR)

    Child(make_and_leave).result()
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
