"""Who is calling: the lock word and the pin board name threads by TID.

The TID is cached without a syscall; the cache must never be stale, in threads, after
os.fork, and after a raw clone(CLONE_FILES|SIGCHLD) like the supervisor's (which copies TLS
and runs no at-fork handler).  The same goes for the pin-board row a thread caches: every
thread, forked child and cloned child pins in a row of its own, a row of a thread that died
is given back (its pins with it) and reused, a live thread's never.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from conftest import U64, Tables
from procs import Child
from realfds import Files

from shm_table import InodeTable, PinsExhausted
from shm_table._native import lib

CLONE_FILES = 0x400
SIGCHLD = 17
SYS_clone = 56  # x86-64
SYS_gettid = 186
PIN_BOARD = 4096  # offset of the pin board: 64 rows of (u32 owner, u32 pad, 7 x u64 pin)
PIN_ROWS = 64
ROW_REAPING = 0x80000000
PIN_ROWS_OFF = 216  # header: rows ever claimed


def board(t: InodeTable) -> dict[int, list[int]]:
    """owner TID -> the nodeids pinned in its row, for every claimed row."""
    out = {}
    for r in range(PIN_ROWS):
        base = PIN_BOARD + 64 * r
        owner = int.from_bytes(t._mm[base:base + 4], "little")
        if owner:
            pins = [int.from_bytes(t._mm[base + 8 + 8 * i:base + 16 + 8 * i], "little")
                    for i in range(7)]
            out[owner] = sorted(p for p in pins if p)
    return out


def raw_clone(fn: Callable[[], bool]) -> bool:
    """fn() in a child made by a raw clone(CLONE_FILES|SIGCHLD) syscall: no at-fork handler
    runs, TLS is the parent's copy.  True when it returned True."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    pid = libc.syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0)
    assert pid >= 0, ctypes.get_errno()
    if pid == 0:
        ok = False
        try:
            ok = fn()
        finally:
            os._exit(0 if ok else 1)
    return os.waitpid(pid, 0)[1] == 0


def fork_child(fn: Callable[[], bool]) -> bool:
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = fn()
        finally:
            os._exit(0 if ok else 1)
    return os.waitpid(pid, 0)[1] == 0


class Parked:
    """Threads that run a function, then stay alive until let go (an event, not a sleep)."""

    def __init__(self, n: int, fn: Callable[[], None]) -> None:
        self.go = threading.Event()
        self.ready = threading.Barrier(n + 1)
        self.tids: list[int] = []
        self.errors: list[BaseException] = []
        self.fn = fn
        self.threads = [threading.Thread(target=self._run) for _ in range(n)]
        for t in self.threads:
            t.start()
        self.ready.wait()

    def _run(self) -> None:
        self.tids.append(threading.get_native_id())
        try:
            self.fn()
        except BaseException as e:  # noqa: BLE001
            self.errors.append(e)
        self.ready.wait()
        self.go.wait()

    def join(self) -> None:
        self.go.set()
        for t in self.threads:
            t.join()
        assert not self.errors, self.errors


@contextmanager
def gone(tids: list[int]) -> Iterator[None]:
    """On leaving, wait until the kernel tasks of these (parked) threads are gone.  Python's
    join() returns before the OS thread has exited; a pidfd on the thread (PIDFD_THREAD,
    Linux 6.9) says when it has, else poll /proc (yielding the CPU, no sleep)."""
    pidfds: dict[int, int] = {}
    for tid in tids:
        try:
            pidfds[tid] = os.pidfd_open(tid, os.O_EXCL)  # PIDFD_THREAD == O_EXCL
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    yield
    deadline = time.monotonic() + 60
    for tid in tids:
        fd = pidfds.pop(tid, None)
        if fd is not None:
            assert select.select([fd], [], [], 60)[0]
            os.close(fd)
        while os.path.exists(f"/proc/self/task/{tid}"):
            assert time.monotonic() < deadline
            os.sched_yield()


# ------------------------------------------------------------------ the TID cache


def test_tid_in_threads() -> None:
    assert lib.seg_my_tid() == threading.get_native_id()
    got: list[tuple[int, int]] = []

    def f() -> None:
        got.append((lib.seg_my_tid(), threading.get_native_id()))

    threads = [threading.Thread(target=f) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a == b for a, b in got) and len({a for a, _ in got}) == 4


def test_tid_after_fork() -> None:
    lib.seg_my_tid()  # prime the cache
    assert fork_child(lambda: lib.seg_my_tid() == os.getpid())


def test_tid_after_raw_clone() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    assert lib.seg_my_tid() == os.getpid()  # prime the cache
    assert raw_clone(lambda: lib.seg_my_tid() == libc.syscall(SYS_gettid))
    assert lib.seg_my_tid() == os.getpid()


# ------------------------------------------------------------------ pin-board rows


@pytest.fixture
def nodeid(table: InodeTable, files: Files) -> int:
    fd, ids = files.open("a", os.O_PATH)
    return table.claim_or_insert(ids, None, 0, fd, 0o100644)[0]


def test_threads_pin_in_rows_of_their_own(table: InodeTable, nodeid: int) -> None:
    assert table.pin(nodeid) is not None
    assert table.pin(1) is not None

    def pin() -> None:
        assert table.pin(nodeid) is not None

    parked = Parked(4, pin)
    rows = board(table)
    me = threading.get_native_id()
    assert rows == {me: sorted([1, nodeid]), **{tid: [nodeid] for tid in parked.tids}}
    assert table.my_pins() == 2 and table.pins_held() == 6
    assert table.reap_dead_pins() == 0  # nobody died: nothing given back
    assert table.pins_held() == 6
    table.unpin(nodeid)
    table.unpin(1)
    with gone(parked.tids):
        parked.join()  # the threads exit holding their pins
    assert table.reap_dead_pins() == 4
    assert table.pins_held() == 0 and table.stats()["reaped_pins"] == 4
    assert set(board(table)) == {me}  # the dead threads' rows are free again
    assert table.lookups(nodeid) == 1  # pins are not lookups


@pytest.mark.parametrize("how", ["fork", "raw clone", "clone_shared_fds"])
def test_child_processes_pin_in_rows_of_their_own(table: InodeTable, nodeid: int,
                                                  how: str) -> None:
    """The child inherits the parent's cached row (fork copies TLS; a raw clone runs no
    at-fork handler): it must not pin in it."""
    assert table.pin(nodeid) is not None  # cache this thread's row
    parent = threading.get_native_id()

    def child() -> bool:
        if table.my_pins() != 0:  # the parent's pin is not this process's
            return False
        assert table.pin(nodeid) is not None
        rows = board(table)
        ok = rows == {parent: [nodeid], os.getpid(): [nodeid]}
        table.unpin(nodeid)
        return ok and table.my_pins() == 0 and board(table)[parent] == [nodeid]

    if how == "fork":
        assert fork_child(child)
    elif how == "raw clone":
        assert raw_clone(child)
    else:
        assert Child(child, shared_fds=True).result()
    assert table.reap_dead_pins() == 1  # the child's row, empty
    assert board(table) == {parent: [nodeid]} and table.my_pins() == 1
    table.unpin(nodeid)


def test_a_dead_threads_pins_free_what_only_they_held(table: InodeTable, files: Files,
                                                       nodeid: int) -> None:
    fd = table.get(nodeid).fd

    def pin() -> None:
        assert table.pin(nodeid) is not None

    parked = Parked(1, pin)
    assert table.forget(nodeid, U64)  # the guest lets go while the thread still pins it
    files.assert_names(fd, files.ids("a"))
    assert table.reap_dead_pins() == 0  # alive: its pin stays
    files.assert_names(fd, files.ids("a"))
    with gone(parked.tids):
        parked.join()
    files.assert_names(fd, files.ids("a"))  # a thread's exit unpins nothing by itself
    assert table.reap_dead_pins() == 1
    files.assert_closed(fd)
    assert table.stats()["dying"] == 0


def test_a_full_board_reuses_the_rows_of_dead_threads(table: InodeTable,
                                                      nodeid: int) -> None:
    """64 rows: a 65th live thread cannot pin; once some of the others died, the next pin
    gives their rows back itself (no supervisor needed) and takes one."""
    assert table.pin(nodeid) is not None  # row 1 of 64: this thread's

    def pin() -> None:
        assert table.pin(nodeid) is not None

    first = Parked(31, pin)
    second = Parked(32, pin)
    assert len(board(table)) == PIN_ROWS

    def refused() -> None:
        with pytest.raises(PinsExhausted):
            table.pin(nodeid)

    Parked(1, refused).join()
    assert table.stats()["pins_refused"] == 1
    with gone(first.tids):
        first.join()
    late = Parked(1, pin)  # reaps the 31 dead rows, takes one of them
    assert table.stats()["reaped_pins"] == 31
    assert len(board(table)) == 1 + 32 + 1 and table.pins_held() == 34
    with gone(second.tids + late.tids):
        second.join()
        late.join()
    table.unpin(nodeid)
    assert table.reap_dead_pins() == 33 and table.pins_held() == 0


def test_a_row_being_reaped_belongs_to_its_reaper(table: InodeTable, files: Files,
                                                  nodeid: int) -> None:
    """Regression: two reapers could give back the same row: one that read the dead owner
    and was overtaken cleared the pins of a live thread that had claimed the row after the
    other freed it.  A reaper now marks the row first: a row marked by a live reaper is
    left alone, one marked by a reaper that died is finished by the next."""
    fd = table.get(nodeid).fd
    assert table.my_pins() == 0  # claims this thread's row (row 0)
    row = PIN_BOARD + 64 * 1
    table._mm[PIN_ROWS_OFF:PIN_ROWS_OFF + 4] = (2).to_bytes(4, "little")
    table._mm[row + 8:row + 16] = nodeid.to_bytes(8, "little")  # its pin
    assert table.forget(nodeid, U64)  # only the forged row's pin holds it now

    def set_owner(owner: int) -> None:
        table._mm[row:row + 4] = owner.to_bytes(4, "little")

    set_owner(ROW_REAPING | os.getpid())  # a live reaper is at it
    assert table.reap_dead_pins() == 0
    assert board(table)[ROW_REAPING | os.getpid()] == [nodeid]
    files.assert_names(fd, files.ids("a"))
    dead = Child(lambda: None)
    dead.reap()
    set_owner(ROW_REAPING | dead.pid)  # a reaper that died at it
    assert table.reap_dead_pins() == 1
    files.assert_closed(fd)
    assert set(board(table)) == {threading.get_native_id()}


def test_a_reaper_killed_mid_reap(tables: Tables, files: Files) -> None:
    """The reaper dies after taking a dead worker's pin, before freeing what it held: the
    next reap finishes the row and frees the entry."""
    table = tables.inode()
    fd, ids = files.open("a", os.O_PATH)
    nodeid = table.claim_or_insert(ids, None, 0, fd, 0o100644)[0]

    def worker() -> None:
        assert table.pin(nodeid) is not None
        assert table.pin(1) is not None

    Child(worker, shared_fds=True).result()  # exits holding both
    assert table.forget(nodeid, U64)

    def reaper() -> None:
        lib.seg_debug_crash_after(1)  # after the first pin taken
        table.reap_dead_pins()

    reaping = Child(reaper, shared_fds=True)
    reaping.wait_exit()
    files.assert_names(fd, ids)
    assert table.reap_dead_pins() >= 1
    files.assert_closed(fd)
    assert reaping.killed_by() == 9
    assert table.pins_held() == 0
