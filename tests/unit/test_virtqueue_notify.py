"""When the device signals the call eventfd (SplitQueue.push_signal, ring.c): with
EVENT_IDX right after it writes the used entry the driver's used_event names, not later
at the end of a batch, and only then; without EVENT_IDX never per push (the serve loop
signals per drained batch)."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import pytest

from daemon.guest.memory import GuestMemory
from daemon.guest.virtqueue import SplitQueue
from daemon.protocol.vhost_user import MemoryRegion

SIZE = 8
MEMORY = 64 * 1024
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


@pytest.fixture
def ring() -> Iterator[tuple[mmap.mmap, int]]:
    fd = os.memfd_create("ring")
    os.ftruncate(fd, MEMORY)
    view = mmap.mmap(fd, MEMORY)
    yield view, fd
    view.close()
    os.close(fd)


def make_queue(fd: int, event_idx: bool) -> tuple[SplitQueue, GuestMemory]:
    mem = GuestMemory([(MemoryRegion(0, MEMORY, 0, 0), fd)])
    return SplitQueue(mem, SIZE, DESC, AVAIL, USED, event_idx=event_idx,
                      indirect=True), mem


def signalled(call: int) -> bool:
    try:
        os.eventfd_read(call)
    except BlockingIOError:
        return False
    return True


def test_signals_the_entry_used_event_names_at_once(ring: tuple[mmap.mmap, int]) -> None:
    view, fd = ring
    queue, mem = make_queue(fd, event_idx=True)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        queue.push_signal(0, 16, call)
        assert signalled(call), "the first decision always signals"
        # the driver took entry 0 and sleeps until entry 2 is written (used index 3)
        struct.pack_into("<H", view, AVAIL + 4 + 2 * SIZE, 2)
        got = []
        for head in (1, 2, 3, 4):
            queue.push_signal(head, 16, call)
            got.append(signalled(call))
        assert got == [False, True, False, False]
        queue.push_signal(5, 16, -1)  # no call fd yet: nothing to write, nothing breaks
    finally:
        os.close(call)
        mem.close()


def test_without_event_idx_pushes_do_not_signal(ring: tuple[mmap.mmap, int]) -> None:
    _view, fd = ring
    queue, mem = make_queue(fd, event_idx=False)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        for head in range(3):
            queue.push_signal(head, 16, call)
            assert not signalled(call)
        assert queue.should_notify(), "the batch's end still signals (flags is 0)"
    finally:
        os.close(call)
        mem.close()
