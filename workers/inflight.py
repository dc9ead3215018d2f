"""Per-ring in-flight records in shared memory: every request a worker popped and has
not answered yet, parked SETLKWs included, so that whoever serves the ring next re-serves
exactly those and never answers one twice.

Why not resume at the used index (as restarts once did): a parked SETLKW is answered
after requests popped later, so the used index no longer says which heads were answered.

The records are one memfd (``memfd_create``), a page-aligned ``pyvfs_inflight_t`` per
queue, mapped shared before any worker is cloned, so every worker writes the same pages.
The C serve loop and push keep them (``daemon/native/inflight.c``); this module resets a
ring's record when the front-end (re)starts the ring, and reads it back when a worker
takes over a ring whose worker was lost (``recover``). The memfd's number is what a
daemon that re-executes itself (live upgrade) or is restarted hands on, so the records
outlive the supervisor too (docs/operations.md).
"""

from __future__ import annotations

import mmap
import os
from typing import NamedTuple

from daemon.native._sys import ffi, lib

RECORD = ffi.sizeof("pyvfs_inflight_t")
STRIDE = (RECORD + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
BUSY = lib.PYVFS_INFLIGHT_BUSY
PARKED = lib.PYVFS_INFLIGHT_PARKED
COMPLETING = lib.PYVFS_INFLIGHT_COMPLETING


class Recovered(NamedTuple):
    """Where a ring's new worker goes on: re-serve ``heads`` (in this order), then pop
    from ``last_avail``."""

    last_avail: int
    heads: list[int]


class InflightRecords:
    def __init__(self, num_queues: int, fd: int = -1) -> None:
        """A fresh set of records for ``num_queues`` rings, or (``fd`` >= 0) the records a
        previous supervisor left in that memfd (a live upgrade or a restart)."""
        self.num_queues = num_queues
        if fd < 0:
            fd = os.memfd_create("pyvirtiofsd-inflight", os.MFD_CLOEXEC)
            os.ftruncate(fd, STRIDE * num_queues)  # sparse: pages come as rings use them
        elif os.fstat(fd).st_size < STRIDE * num_queues:
            raise ValueError(f"in-flight records in fd {fd} are smaller than "
                             f"{num_queues} queues need")
        self.fd = fd
        self.map = mmap.mmap(fd, STRIDE * num_queues)
        self.base = int(ffi.cast("uintptr_t", ffi.from_buffer(self.map)))

    def address(self, queue: int) -> int:
        """The host address of ``queue``'s record, for pyvfs_queue_t.inflight."""
        if not 0 <= queue < self.num_queues:
            raise IndexError(f"queue {queue} has no in-flight record")
        return self.base + STRIDE * queue

    def record(self, queue: int) -> object:
        return ffi.cast("pyvfs_inflight_t *", self.address(queue))

    def reset(self, queue: int, last_avail: int, size: int) -> None:
        """The front-end (re)started the ring of ``size`` entries at ``last_avail``:
        nothing is in flight."""
        lib.pyvfs_inflight_reset(self.record(queue), last_avail & 0xFFFF, size)

    def next_avail(self, queue: int) -> int:
        """The next avail entry the ring's worker would pop."""
        return int(self.record(queue).current) & 0xFFFF

    def recover(self, queue: int, size: int, used_idx: int) -> Recovered:
        """What the lost worker of ``queue`` left unanswered, given the ring's used index
        in guest memory now. A record made just before a push that happened is told apart
        by the used index it kept: the push moved the ring's. Afterwards every head to
        re-serve is recorded as parked (so a successor of this worker still finds it) and
        nothing is current."""
        r = self.record(queue)
        cur = int(r.current)
        heads: list[int] = []
        if cur & BUSY and (cur >> 32) & 0xFFFF == used_idx & 0xFFFF:
            heads.append((cur >> 16) & 0xFFFF)
        for head in range(min(size, lib.PYVFS_INFLIGHT_HEADS)):
            state = int(r.heads[head])
            if not state:
                continue
            if state & COMPLETING and (state >> 32) & 0xFFFF != used_idx & 0xFFFF:
                r.heads[head] = 0  # its answer was published
            elif head not in heads:
                heads.append(head)
        heads = [h for h in heads if h < size]  # a malformed head was completed with 0
        for head in heads:
            r.heads[head] = PARKED
        r.current = cur & 0xFFFF
        return Recovered(cur & 0xFFFF, heads)
