"""In-flight tracking: a worker SIGKILLed while requests are popped and unanswered —
a SETLKW parked behind a host lock while later requests complete before it — is replaced
by one that answers every one of them exactly once and loses none.

Resuming at the used index (the old rule) gets this wrong: with a parked SETLKW the used
index counts answers given out of order, so the restarted worker pops an answered
request again (answered twice) and the parked one never gets its answer. The front-end
checks every used element against what it submitted (head and FUSE unique), so a
duplicate or a stray answer fails the test, and a lost one times out.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest

from daemon.protocol import fuse
from tests.protocol.test_hostile_guest import Served, reclaim, serve, worker_pids
from tests.support.frontend import Sent
from tests.support.held_state import (
    assert_nothing_more,
    host_can_lock,
    host_lock,
    open_file,
    setlkw,
)


def kill_worker(srv: Served, q: int) -> int:
    """SIGKILL the queue's worker and wait until its successor has started."""
    pid = worker_pids(srv.log())[q]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while worker_pids(srv.log())[q] == pid:
        assert time.monotonic() < deadline, f"no new worker for queue {q}: {srv.log()}"
        time.sleep(0.01)
    return pid


def test_parked_setlkw_and_later_answers_survive_a_killed_worker(tmp_path: Path) -> None:
    with serve(tmp_path, "--posix-lock") as srv:
        fe = srv.fe
        locked = srv.share / "locked"
        locked.write_bytes(b"locked")
        (srv.share / "other").write_bytes(b"x" * 100)
        hold = host_lock(locked)
        nodeid, fh = open_file(srv, "locked", q=1)
        _, other, _ = srv.lookup(fuse.ROOT_ID, b"other", q=1)
        reclaim(fe, 1)
        parked = setlkw(srv, nodeid, fh, owner=7, q=1)
        with pytest.raises(TimeoutError):  # it really waits for the host's lock
            fe.wait_used(1, timeout=0.3)
        later = [fe.start(fuse.Opcode.GETATTR, other, bytes(16), q=1, out_size=256,
                          indirect=True) for _ in range(3)]
        answers = fe.finish_all(later)  # answered before the SETLKW popped ahead of them
        assert [error for error, _ in answers] == [0, 0, 0]
        mark = srv.mark()
        killed = kill_worker(srv, 1)
        srv.expect_log(mark, r"queue 1: re-served 1 request")
        assert f"worker {killed} died (signal 9); restarting it" in srv.log()
        after = [fe.start(fuse.Opcode.GETATTR, other, bytes(16), q=1, out_size=256,
                          indirect=True) for _ in range(2)]
        assert [error for error, _ in fe.finish_all(after)] == [0, 0]
        os.close(hold)
        assert fe.finish(parked, timeout=5)[0] == 0  # granted once the host let go
        assert_nothing_more(srv, 1)
        assert not host_can_lock(locked), "the guest's granted lock does not exclude the host"
        srv.workers = worker_pids(srv.log())
        srv.assert_alive(queues=(1, 2))


def test_every_request_answered_once_through_repeated_kills(tmp_path: Path) -> None:
    """Rounds of 40 pipelined WRITEs and GETATTRs plus a SETLKW parked behind a host
    lock, the worker SIGKILLed a few ms into each round: every request gets exactly one
    answer, every WRITE lands, every SETLKW is granted once the host lets go."""
    rounds, per_round, block = 8, 40, 4096
    rng = random.Random(15)
    with serve(tmp_path, "--posix-lock") as srv:
        fe = srv.fe
        data_file = srv.share / "data"
        data_file.write_bytes(bytes(per_round * block))
        nodeid, fh = open_file(srv, "data", q=1)
        locks = []
        for r in range(rounds):
            (srv.share / f"lock{r}").write_bytes(b"l")
            locks.append(open_file(srv, f"lock{r}", q=1))
        reclaim(fe, 1)
        expected = bytearray(per_round * block)
        killed = []
        for r in range(rounds):
            hold = host_lock(srv.share / f"lock{r}")
            sents: list[Sent] = [setlkw(srv, *locks[r], owner=100 + r, q=1)]
            writes: list[Sent] = []
            for i in range(per_round):
                if i % 4 == 3:
                    sents.append(fe.start(fuse.Opcode.GETATTR, nodeid, bytes(16), q=1,
                                          out_size=256, indirect=True))
                    continue
                payload = bytes([r * 16 + i % 16 + 1]) * block
                expected[i * block:(i + 1) * block] = payload
                sent = fe.start(fuse.Opcode.WRITE, nodeid,
                                fuse.WRITE_IN.pack(fh, i * block, block, 0, 0, 0, 0), q=1,
                                out_size=256, indirect=True, extra_readable=[payload])
                sents.append(sent)
                writes.append(sent)
            time.sleep(rng.uniform(0, 0.004))
            killed.append(kill_worker(srv, 1))
            os.close(hold)
            answers = fe.finish_all(sents, timeout=10)
            assert [error for error, _ in answers] == [0] * len(sents), f"round {r}"
            for sent, (_, payload) in zip(sents, answers, strict=True):
                if sent in writes:
                    assert fuse.WRITE_OUT.unpack(payload)[0] == block
            assert_nothing_more(srv, 1)
            reclaim(fe, 1)
            assert not host_can_lock(srv.share / f"lock{r}")
        assert data_file.read_bytes() == bytes(expected)
        log = srv.log()
        for pid in killed:
            assert f"worker {pid} died (signal 9); restarting it" in log
        assert len(re.findall(r"queue 1: worker \d+ started", log)) == rounds + 1
        srv.workers = worker_pids(log)
        srv.assert_alive(queues=(1, 2))
