"""In-flight records (workers/inflight.py): a ring's reset writes only its own ring's part
of the shared record, and what it leaves is never taken for a request in flight."""

from __future__ import annotations

import mmap
import os

from workers.inflight import PARKED, InflightRecords

QUEUES = 17  # what a 16-queue daemon keeps (queue 0 is the high-priority one)


def test_resetting_every_ring_allocates_a_page_each_not_256_kib() -> None:
    records = InflightRecords(QUEUES)
    try:
        for q in range(QUEUES):
            records.reset(q, 7, 256)
        allocated = os.fstat(records.fd).st_blocks * 512
        assert allocated <= QUEUES * mmap.PAGESIZE, allocated
        assert all(records.next_avail(q) == 7 for q in range(QUEUES))
    finally:
        records.map.close()
        os.close(records.fd)


def test_a_reset_forgets_the_rings_parked_heads_and_ignores_beyond_its_size() -> None:
    records = InflightRecords(2)
    try:
        r = records.record(1)
        r.heads[10] = PARKED  # parked by the ring's previous worker
        r.heads[300] = PARKED  # left by a larger ring before the front-end resized it
        records.reset(1, 0, 256)
        assert int(r.heads[10]) == 0
        assert records.recover(1, 256, used_idx=0).heads == []
        r.heads[5] = PARKED  # parked after the reset: found again
        assert records.recover(1, 256, used_idx=0).heads == [5]
    finally:
        records.map.close()
        os.close(records.fd)
