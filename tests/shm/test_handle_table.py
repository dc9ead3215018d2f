"""Unit tests for the open-file (fh) table, on real fds.

The guest's reference to an open file is one flag, dropped once by RELEASE (close()); a
request in flight (READ, WRITE, ...) pins the fh; the fd is closed, once, when the file is
released and no pin names it, by whoever lets go last.
"""

from __future__ import annotations

import os

import pytest
from conftest import U64, assert_quiet
from procs import Child, Gate, Signal
from realfds import Files, is_open

from shm_table import HandleNotFound, HandleTable, HandleTableFull, NotPinned, PinsExhausted
from shm_table._native import lib


def open_file(ht: HandleTable, files: Files, name: str, nodeid: int = 2,
              flags: int = os.O_RDONLY) -> tuple[int, int]:
    """An OPEN as the daemon does it: (fh, fd), the fd now the table's."""
    fd, _ = files.open(name, flags)
    return ht.open(nodeid, fd, flags), fd


def test_open_pin_release(handles: HandleTable, files: Files) -> None:
    fh, fd = open_file(handles, files, "a", flags=os.O_RDWR)
    assert fh != 0
    slot, pfd = handles.pin(fh)
    assert pfd == fd and handles.fd_of(slot) == fd
    files.assert_reads(fd, "a")
    e = handles.get(fh)
    assert e is not None
    assert (e.nodeid, e.fd, e.flags, e.guest_open) == (2, fd, os.O_RDWR, True)
    handles.unpin(fh)
    assert handles.my_pins() == 0 and handles.get(fh) is not None
    files.assert_reads(fd, "a")  # pins come and go, the guest's open keeps the fd
    assert handles.close(fh) is True
    files.assert_closed(fd)
    assert handles.get(fh) is None and handles.pin(fh) is None
    handles.check()


def test_release_racing_read_keeps_fd(handles: HandleTable, files: Files) -> None:
    fh, fd = open_file(handles, files, "a")
    slot, _ = handles.pin(fh)  # a READ in flight
    assert handles.close(fh) is True  # RELEASE arrives: must not close under the reader
    assert handles.fd_of(slot) == fd
    files.assert_reads(fd, "a")
    assert handles.get(fh) is None and handles.pin(fh) is None  # released: no new request
    (e,) = handles.iter_handles(released=True)
    assert e.fh == fh and not e.guest_open
    assert list(handles.iter_handles()) == []
    st = handles.stats()
    assert (st["dying"], st["deferred"]) == (1, 1)
    handles.check()
    handles.unpin(fh)  # the last user closes it
    files.assert_closed(fd)
    assert handles.stats()["dying"] == 0
    handles.check()


def test_release_racing_read_in_another_process(handles: HandleTable, files: Files) -> None:
    """A READ parked in another worker (shared fd table) keeps reading the right file after
    the guest's RELEASE; its unpin closes the fd for both processes."""
    fh, fd = open_file(handles, files, "a")
    pinned, go = Signal(), Gate()

    def reader() -> None:
        assert handles.pin(fh)[1] == fd
        pinned.post()
        go.wait()
        files.assert_reads(fd, "a")
        handles.unpin(fh)

    child = Child(reader, shared_fds=True)
    pinned.take()
    assert handles.close(fh) is True
    files.assert_reads(fd, "a")
    go.open()
    child.result()
    files.assert_closed(fd)
    pinned.close()
    go.close()
    handles.check()


def test_reader_unpins_before_guest_release(handles: HandleTable, files: Files) -> None:
    fh, fd = open_file(handles, files, "a")
    handles.pin(fh)
    handles.unpin(fh)
    files.assert_reads(fd, "a")
    assert handles.close(fh) is True
    files.assert_closed(fd)
    handles.check()


def test_double_release_drops_the_guest_reference_once(handles: HandleTable,
                                                         files: Files) -> None:
    fh, fd = open_file(handles, files, "a")
    handles.pin(fh)
    assert handles.close(fh) is True
    assert handles.close(fh) is False  # a duplicate or forged RELEASE changes nothing
    assert handles.my_pins() == 1
    files.assert_reads(fd, "a")
    handles.unpin(fh)
    files.assert_closed(fd)
    assert handles.close(fh) is False
    handles.check()


def test_stale_and_forged_fh_rejected(handles: HandleTable, files: Files) -> None:
    fh, fd = open_file(handles, files, "a")
    assert handles.close(fh) is True
    files.assert_closed(fd)
    fh2, fd2 = open_file(handles, files, "b")
    assert fh2 & 0xFFFFFFFF == fh & 0xFFFFFFFF and fh2 != fh  # slot reused, new generation
    for bad in (fh, 0, 1, fh2 + (1 << 32), fh2 + (2 << 32), fh2 ^ 1,
                (fh2 >> 32) << 32 | 10**6, fh2 + 5, U64, -1, 2**64):
        assert handles.pin(bad) is None
        assert handles.close(bad) is False
        assert handles.get(bad) is None
        with pytest.raises(NotPinned):
            handles.unpin(bad)
    e = handles.get(fh2)
    assert e is not None and e.guest_open
    files.assert_reads(fd2, "b")
    with pytest.raises(HandleNotFound):
        handles.pin_or_raise(fh)
    handles.check()


def test_unpin_never_touches_a_later_occupant(handles: HandleTable, files: Files) -> None:
    fh1, fd1 = open_file(handles, files, "a")
    handles.pin(fh1)
    assert handles.close(fh1) is True
    handles.unpin(fh1)
    files.assert_closed(fd1)
    fh2, fd2 = open_file(handles, files, "b")
    assert fh2 & 0xFFFFFFFF == fh1 & 0xFFFFFFFF
    handles.pin(fh2)
    handles.close(fh2)  # released, only our pin holds it
    with pytest.raises(NotPinned):
        handles.unpin(fh1)  # a stale unpin of the earlier occupant
    assert handles.my_pins() == 1
    files.assert_reads(fd2, "b")
    handles.unpin(fh2)
    files.assert_closed(fd2)
    with pytest.raises(NotPinned):
        handles.unpin(fh2)
    handles.check()


def test_pins_exhausted(handles: HandleTable, files: Files) -> None:
    fh, fd = open_file(handles, files, "a")
    for _ in range(7):
        assert handles.pin(fh) is not None
    with pytest.raises(PinsExhausted):
        handles.pin(fh)
    with pytest.raises(PinsExhausted):
        handles.close(fh)  # RELEASE pins while it works
    assert handles.get(fh).guest_open
    handles.unpin(fh)
    assert handles.close(fh) is True
    for _ in range(6):
        files.assert_reads(fd, "a")
        handles.unpin(fh)
    files.assert_closed(fd)
    assert handles.stats()["pins_refused"] == 2
    handles.check()


def test_handle_table_full(handles: HandleTable, files: Files) -> None:
    opened = [open_file(handles, files, f"f{i}") for i in range(16)]
    fd, _ = files.open("extra")
    with pytest.raises(HandleTableFull):
        handles.open(2, fd, 0)
    assert is_open(fd)  # refused: still the caller's
    handles.check()
    assert handles.close(opened[3][0]) is True
    files.assert_closed(opened[3][1])
    fh = handles.open(2, fd, 0)
    assert handles.pin(fh)[1] == fd
    handles.unpin(fh)
    assert len(handles) == 16 and handles.stats()["full_errors"] == 1
    want = {o[1] for i, o in enumerate(opened) if i != 3} | {fd}
    assert {e.fd for e in handles.iter_handles()} == want


def test_open_crash_is_rolled_back(handles: HandleTable, files: Files) -> None:
    """The opener dies before returning the fh: the guest never learns it, so the repair drops
    the guest reference and hands the fd to the supervisor."""
    keep, keep_fd = open_file(handles, files, "keep")
    fd, _ = files.open("lost")

    def die_in_open() -> None:
        lib.seg_debug_crash_after(4)  # intent, slot taken, fields written, busy = 1
        handles.open(2, fd, 0)

    child = Child(die_in_open, shared_fds=True)
    assert child.killed_by() == 9
    assert handles.lock_owner != 0
    handles.check()  # takes the lock over and repairs
    assert handles.take_orphaned_fds() == [fd]
    files.assert_reads(fd, "lost")  # the orphan is still open: the supervisor closes it
    os.close(fd)
    assert [e.fd for e in handles.iter_handles()] == [keep_fd]
    assert handles.pin(keep)[1] == keep_fd
    handles.unpin(keep)
    assert_quiet(handles)


def test_attach(handles: HandleTable, files: Files) -> None:
    fh, fd = open_file(handles, files, "a")
    other = HandleTable.attach(handles.name)
    try:
        assert other.pin(fh)[1] == fd
        assert handles.my_pins() == 1 and handles.get(fh).guest_open
        assert handles.close(fh) is True
        other.unpin(fh)
        files.assert_closed(fd)
    finally:
        other.detach()
