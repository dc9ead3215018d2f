"""FUSE_INTERRUPT across worker processes.

The guest sends INTERRUPT on the hiprio queue while the request it names (a SETLKW
waiting for a lock) is parked in the worker of a request queue: another process. The
board is a page of memory shared by the supervisor and every worker it clones (an
anonymous shared mapping made before the first clone). Each queue's worker is the only
writer of its own area, a ring of the last ``SLOTS`` interrupted request ids behind a
counter, so no lock or atomic instruction is needed; a worker that has requests waiting
reads every area when it retries them. Interrupts are rare and a waiting SETLKW is
retried every few milliseconds, so this costs nothing on the per-request path.
"""

from __future__ import annotations

import mmap
import struct

SLOTS = 64
_COUNT = struct.Struct("<Q")
_AREA = _COUNT.size + 8 * SLOTS


class InterruptBoard:
    def __init__(self, num_queues: int) -> None:
        self.num_queues = num_queues
        self.mem = mmap.mmap(-1, max(mmap.PAGESIZE, _AREA * num_queues))  # MAP_SHARED
        self._seen = -1  # sum of the counters when this process last read them
        self._recent: frozenset[int] = frozenset()

    def post(self, queue: int, unique: int) -> None:
        """Record that the guest interrupted request ``unique`` (called by the one
        worker of ``queue``): the id first, then the counter that publishes it."""
        base = _AREA * queue
        count = _COUNT.unpack_from(self.mem, base)[0]
        struct.pack_into("<Q", self.mem, base + 8 + 8 * (count % SLOTS), unique)
        _COUNT.pack_into(self.mem, base, count + 1)

    def _total(self) -> int:
        return sum(_COUNT.unpack_from(self.mem, _AREA * q)[0] for q in range(self.num_queues))

    def recent(self) -> frozenset[int]:
        """The ids of the last interrupts posted on every queue."""
        total = self._total()
        if total != self._seen:
            ids = set()
            for q in range(self.num_queues):
                base = _AREA * q
                count = min(_COUNT.unpack_from(self.mem, base)[0], SLOTS)
                ids.update(struct.unpack_from(f"<{count}Q", self.mem, base + 8))
            self._seen, self._recent = total, frozenset(ids)
        return self._recent
