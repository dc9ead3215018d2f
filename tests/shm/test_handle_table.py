"""Unit tests for the open-file (fh) table."""

from __future__ import annotations

import signal

import pytest
from test_inode_table import run_child

from shm_table import HandleNotFound, HandleTable, HandleTableFull
from shm_table._native import lib


def test_open_acquire_close(handles: HandleTable) -> None:
    fh = handles.open(2, 40, 0o2)
    assert fh != 0
    slot, fd = handles.acquire(fh)
    assert fd == 40 and handles.fd_of(slot) == 40
    e = handles.get(fh)
    assert (e.nodeid, e.fd, e.flags, e.refcount, e.guest_open) == (2, 40, 2, 2, True)
    assert handles.release_ref(slot) == -1
    assert handles.close(fh) == 40
    assert handles.get(fh) is None and handles.acquire(fh) is None
    handles.check()


def test_release_racing_read_keeps_fd(handles: HandleTable) -> None:
    fh = handles.open(2, 41, 0)
    slot = handles.acquire_slot(fh)  # a READ in flight on another queue
    assert handles.close(fh) == -1  # RELEASE arrives: must not close under the reader
    assert handles.fd_of(slot) == 41
    e = handles.get(fh)
    assert e is not None and not e.guest_open and e.refcount == 1
    handles.check()


    assert handles.release_ref(slot) == 41
    assert handles.get(fh) is None
    handles.check()


def test_reader_release_before_guest_release(handles: HandleTable) -> None:
    fh = handles.open(2, 42, 0)
    slot = handles.acquire_slot(fh)
    assert handles.release_ref(slot) == -1
    assert handles.close(fh) == 42
    assert handles.get(fh) is None
    handles.check()


def test_double_close_drops_guest_ref_once(handles: HandleTable) -> None:
    fh = handles.open(2, 43, 0)
    slot = handles.acquire_slot(fh)
    assert handles.close(fh) == -1
    assert handles.close(fh) == -1  # forged/duplicate RELEASE must not drop our ref
    assert handles.get(fh).refcount == 1
    assert handles.release_ref(slot) == 43
    handles.check()


def test_stale_and_forged_fh_rejected(handles: HandleTable) -> None:
    fh = handles.open(2, 44, 0)
    assert handles.close(fh) == 44
    fh2 = handles.open(3, 45, 0)
    assert fh2 & 0xFFFFFFFF == fh & 0xFFFFFFFF and fh2 != fh  # slot reused, new generation
    for bad in (fh, 0, 1, fh2 + (1 << 32), fh2 ^ 1, (fh2 >> 32) << 32 | 10**6,
                fh2 + 5, 2**64 - 1, -1, 2**64):
        assert handles.acquire(bad) is None
        assert handles.close(bad) == -1
    assert handles.get(fh2).refcount == 1
    with pytest.raises(HandleNotFound):
        handles.acquire_or_raise(fh)
    handles.check()


def test_handle_table_full(handles: HandleTable) -> None:
    fhs = [handles.open(2, 100 + i, 0) for i in range(16)]
    with pytest.raises(HandleTableFull):
        handles.open(2, 200, 0)
    handles.check()
    assert handles.close(fhs[3]) == 103
    fh = handles.open(2, 200, 0)
    assert handles.acquire(fh)[1] == 200
    assert len(handles) == 16 and handles.stats()["full_errors"] == 1
    assert {e.fd for e in handles.iter_handles()} == {100 + i for i in range(16) if i != 3} | {200}


def test_open_crash_is_rolled_back(handles: HandleTable) -> None:
    """The opener dies before returning the fh: the guest never learns it, so the repair drops
    the guest reference and hands the fd to the supervisor."""
    keep = handles.open(2, 50, 0)

    def die_in_open() -> None:
        lib.seg_debug_crash_after(4)  # intent, slot popped, fields written, refcount = 1
        handles.open(2, 51, 0)

    assert run_child(die_in_open) == signal.SIGKILL
    assert handles.lock_owner != 0
    handles.check()  # takes the lock over and repairs
    assert handles.take_orphaned_fds() == [51]
    assert [e.fd for e in handles.iter_handles()] == [50]
    assert handles.acquire(keep)[1] == 50


def test_attach(handles: HandleTable) -> None:
    fh = handles.open(2, 60, 0)
    other = HandleTable.attach(handles.name)
    try:
        assert other.acquire(fh)[1] == 60
        assert handles.get(fh).refcount == 2
    finally:
        other.detach()
