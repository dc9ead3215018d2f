"""References under concurrency, across worker processes: the same names looked up on two
request queues at once while the FORGETs of the previous round are still on their way on
the high-priority queue (whose worker lets them gather before it drains).

The guest's rule is the kernel's: a nodeid it holds a LOOKUP for is valid until it sends
the matching FORGETs. So every nodeid a LOOKUP just returned must answer GETATTR and
OPENDIR on any queue, even when the entry's last reference was being dropped on another
queue at the same moment (the table then hands out a fresh entry, never a dying one).
When every reference is forgotten, the shared inode table is back to the root alone.

The test front-end writes its 16-bit avail index with struct.pack_into, which zeroes the
field before it writes the two bytes: while requests stream in, a worker now and then
reads an index that looks more than a ring ahead. Until the worker learned to read again,
it then stopped serving the queue (and lost the request it had popped): this test hung."""

from __future__ import annotations

import struct
import time
from collections import Counter
from pathlib import Path

from daemon.protocol import fuse
from shm_table import InodeTable
from tests.protocol.test_hostile_guest import serve

ROUNDS = 400
PER_QUEUE = 8


def test_lookups_racing_forgets_never_hand_out_a_dead_nodeid(tmp_path: Path) -> None:
    with serve(tmp_path) as srv:
        d = srv.share / "d"
        d.mkdir()
        for i in range(4):
            (d / f"f{i}").write_bytes(b"x" * i)
        fe = srv.fe
        pending: list = []  # FORGETs not yet seen completed
        nodeids_seen: set[int] = set()
        for rnd in range(ROUNDS):
            # the directory, and a file in it, from both request queues at once
            held: Counter[int] = Counter()
            parent_sents = [fe.start(fuse.Opcode.LOOKUP, fuse.ROOT_ID, b"d\0", q=q,
                                     out_size=256)
                            for q in (1, 2) for _ in range(PER_QUEUE)]
            answers = fe.finish_all(parent_sents + pending)[: len(parent_sents)]
            pending = []
            for ring in fe.rings.values():  # nothing in flight: every descriptor is free
                ring.free = list(range(ring.size))
            for error, payload in answers:
                assert error == 0, f"round {rnd}: LOOKUP d: {error}"
                held[struct.unpack_from("<Q", payload)[0]] += 1
            parent = next(iter(held))
            name = f"f{rnd % 4}\0".encode()
            child_sents = [fe.start(fuse.Opcode.LOOKUP, parent, name, q=q, out_size=256)
                           for q in (2, 1) for _ in range(PER_QUEUE // 2)]
            for error, payload in fe.finish_all(child_sents):
                assert error == 0, f"round {rnd}: LOOKUP {name!r}: {error}"
                held[struct.unpack_from("<Q", payload)[0]] += 1
            nodeids_seen.update(held)
            # every nodeid held must work on the other queue
            for nodeid in held:
                q = 2 if rnd % 2 else 1
                error, _ = fe.fuse(fuse.Opcode.GETATTR, nodeid, bytes(16), q=q, out_size=256)
                assert error == 0, f"round {rnd}: GETATTR of held nodeid {nodeid}: {error}"
            error, payload = fe.fuse(fuse.Opcode.OPENDIR, parent, fuse.OPEN_IN.pack(0, 0),
                                     q=3 - (1 if rnd % 2 else 2), out_size=256)
            assert error == 0, f"round {rnd}: OPENDIR of held nodeid {parent}: {error}"
            fh = struct.unpack_from("<Q", payload)[0]
            error, _ = fe.fuse(fuse.Opcode.RELEASEDIR, parent,
                               fuse.RELEASE_IN.pack(fh, 0, 0, 0), q=1, out_size=256)
            assert error == 0
            # give every reference back on the high-priority queue, without waiting
            pending = [fe.start(fuse.Opcode.FORGET, nodeid, fuse.FORGET_IN.pack(n), q=0,
                                out_size=0) for nodeid, n in held.items()]
        fe.finish_all(pending)
        table = InodeTable.attach(f"/pyvirtiofsd-{srv.proc.pid}-inodes")
        try:
            deadline = time.monotonic() + 5
            while table.stats()["entries"] != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert table.stats()["entries"] == 1, (
                f"{table.stats()['entries']} inode entries left after every reference was "
                f"forgotten ({len(nodeids_seen)} nodeids handed out)")
        finally:
            table.detach()
        srv.assert_alive(queues=(1, 2))
