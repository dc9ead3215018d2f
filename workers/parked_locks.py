"""SETLKW requests waiting in a worker for a lock the host holds.

A SETLKW that cannot be granted at once is parked here while the queue keeps serving; the
worker retries every parked request every few milliseconds and answers each once it got
its lock, failed, or was interrupted by the guest (FUSE_INTERRUPT, which may arrive on
another queue's worker: it is posted on the shared interrupt board).

When the worker stops (GET_VRING_BASE: live migration, or the rings restart) the parked
requests are handed to the supervisor (:meth:`ParkedLocks.export`); the queue's next
worker, here or on the migration's destination, parks them again
(:meth:`ParkedLocks.adopt`) and answers each into its descriptor chain, which is still in
guest memory: it was popped before the stop reported the ring's last avail index, so the
guest waits for its used entry and gets it exactly once."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from daemon.fs.passthrough import PassthroughFs, PendingLock
from workers.interrupts import InterruptBoard

log = logging.getLogger("pyvirtiofsd.worker")


class ParkedLocks:
    def __init__(self, queue: int, interrupts: InterruptBoard) -> None:
        self.queue = queue
        self.interrupts = interrupts
        self.waiting: list[tuple[int, int, PendingLock]] = []  # head, unique, lock
        self.interrupted_here: set[int] = set()  # uniques of waiting SETLKWs to cancel

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def park(self, head: int, unique: int, lock: PendingLock) -> None:
        self.waiting.append((head, unique, lock))

    def export(self, limit: int) -> list[list[int]]:
        """[head, unique, fh, nodeid, owner, start, end, type, flock, pid] per waiting
        SETLKW, at most ``limit`` (the rest are lost, logged)."""
        out = [[head, unique, w.fh, w.nodeid, w.owner, w.start, w.end, w.kind, int(w.flock),
                w.pid] for head, unique, w in self.waiting]
        if len(out) > limit:
            log.error("queue %d: %d waiting SETLKWs are lost in the stop (at most %d are "
                      "handed on)", self.queue, len(out) - limit, limit)
        return out[:limit]

    def adopt(self, fs: PassthroughFs, parked: list[list[int]], ring_size: int) -> None:
        """Park the SETLKWs a stopped worker of this queue handed on."""
        for entry in parked:
            try:
                head, unique, fh, nodeid, owner, start, end, kind, flock, pid = (
                    int(x) for x in entry)
            except (TypeError, ValueError):
                log.error("queue %d: a handed-on SETLKW %r is malformed; dropped",
                          self.queue, entry)
                continue
            if not 0 <= head < ring_size:
                log.error("queue %d: handed-on SETLKW %d has head %d beyond the ring; "
                          "dropped", self.queue, unique, head)
                continue
            self.park(head, unique, PendingLock(fs, fh, nodeid, owner, start, end, kind,
                                                bool(flock), pid))

    def interrupt(self, target: int) -> None:
        """FUSE_INTERRUPT: a SETLKW waiting here ends with EINTR at the next retry (not
        now: the chain being answered is the INTERRUPT's); one waiting in another
        queue's worker learns of it from the shared board."""
        if any(unique == target for _, unique, _ in self.waiting):
            self.interrupted_here.add(target)
        else:
            self.interrupts.post(self.queue, target)

    def retry(self, complete: Callable[[int, int, int], None]) -> bool:
        """Try the waiting SETLKWs again; ``complete(head, unique, error)`` those that got
        their lock, failed or were interrupted. True if any was completed."""
        interrupted = self.interrupts.recent()
        if self.interrupted_here:
            interrupted = interrupted | self.interrupted_here
            self.interrupted_here = set()
        still: list[tuple[int, int, PendingLock]] = []
        done = False
        for head, unique, waiting in self.waiting:
            try:
                if unique in interrupted:
                    log.debug("queue %d: SETLKW %d interrupted", self.queue, unique)
                    raise OSError(errno.EINTR, "interrupted")
                if not waiting.attempt():
                    still.append((head, unique, waiting))
                    continue
                error = 0
            except OSError as e:
                error = -(e.errno or errno.EIO)
            complete(head, unique, error)
            done = True
        self.waiting = still
        return done
