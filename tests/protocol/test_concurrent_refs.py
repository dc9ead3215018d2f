"""References under concurrency, across worker processes: the same names looked up on two
request queues at once while the FORGETs of the previous round are still on their way on
the high-priority queue (whose worker lets them gather before it drains).

The guest's rule is the kernel's: a nodeid it holds a LOOKUP for is valid until it sends
the matching FORGETs. So every nodeid a LOOKUP just returned must answer GETATTR and
OPENDIR on any queue, even when the entry's last reference was being dropped on another
queue at the same moment (the table then hands out a fresh entry, never a dying one).
When every reference is forgotten, the shared inode table is back to the root alone.
And a CREATE racing a RENAME onto its name on the other queue hands out an fh open on the
very inode its entry names.

The test front-end writes its 16-bit avail index with struct.pack_into, which zeroes the
field before it writes the two bytes: while requests stream in, a worker now and then
reads an index that looks more than a ring ahead. Until the worker learned to read again,
it then stopped serving the queue (and lost the request it had popped): this test hung."""

from __future__ import annotations

import os
import struct
import time
from collections import Counter
from pathlib import Path

from daemon.protocol import fuse
from shm_table import HandleTable, InodeTable
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


CREATE_ROUNDS = 1500


def test_create_racing_a_rename_hands_out_the_file_it_answers(tmp_path: Path) -> None:
    """CREATE of a new name on queue 1 while queue 2 renames another file onto that name:
    whichever file the CREATE answers, the fh it hands out must be open on that inode (the
    C path once answered the renamed file's entry with an fh on the file it had made, which
    the rename had unlinked: about one CREATE in a hundred here)."""
    with serve(tmp_path) as srv:
        fe = srv.fe
        pid = srv.proc.pid
        table = HandleTable.attach(f"/pyvirtiofsd-{pid}-handles")
        mark = fe.brk
        wrong: list[str] = []
        try:
            for rnd in range(CREATE_ROUNDS):
                fe.brk = mark  # nothing in flight: the round reuses the request buffers
                for ring in fe.rings.values():
                    ring.free = list(range(ring.size))
                for i in range(PER_QUEUE):
                    (srv.share / f"s{i}").write_text("s")
                sents = []
                for i in range(PER_QUEUE):
                    sents.append(fe.start(fuse.Opcode.CREATE, fuse.ROOT_ID,
                                          fuse.CREATE_IN.pack(0, 0o100600, 0o022, 0)
                                          + b"n%d\0" % i, q=1, out_size=256))
                    sents.append(fe.start(fuse.Opcode.RENAME, fuse.ROOT_ID,
                                          fuse.RENAME_IN.pack(fuse.ROOT_ID)
                                          + b"s%d\0n%d\0" % (i, i), q=2, out_size=256))
                made = []
                for sent, (error, payload) in zip(sents, fe.finish_all(sents), strict=True):
                    if sent.q != 1:
                        continue
                    assert error == 0, f"round {rnd}: CREATE: {error}"
                    nodeid, = struct.unpack_from("<Q", payload)
                    ino, = struct.unpack_from("<Q", payload, 40)  # entry_out's attr.ino
                    fh, = struct.unpack_from("<Q", payload, fuse.ENTRY_OUT_SIZE)
                    opened = table.get(fh)
                    assert opened is not None and opened.nodeid == nodeid
                    st = os.stat(f"/proc/{pid}/fd/{opened.fd}")
                    if st.st_ino != ino:
                        wrong.append(f"round {rnd}: fh {fh:#x} of entry inode {ino} is inode "
                                     f"{st.st_ino} ({st.st_nlink} links)")
                    made.append((nodeid, fh))
                for ring in fe.rings.values():
                    ring.free = list(range(ring.size))
                fe.finish_all([fe.start(fuse.Opcode.RELEASE, nodeid,
                                        fuse.RELEASE_IN.pack(fh, 0, 0, 0), q=1, out_size=256)
                               for nodeid, fh in made]
                              + [fe.start(fuse.Opcode.FORGET, nodeid, fuse.FORGET_IN.pack(1),
                                          q=0, out_size=0) for nodeid, _ in made])
                for i in range(PER_QUEUE):
                    (srv.share / f"n{i}").unlink(missing_ok=True)
        finally:
            table.detach()
        assert not wrong, f"{len(wrong)} CREATEs handed out another file's fh: {wrong[:3]}"
        srv.assert_alive(queues=(1, 2))
