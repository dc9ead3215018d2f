"""The supervisor SIGKILLed under a connected front-end (--sandbox chroot, namespace, and
none --keeper): its keeper (workers/handover/keeper.py) holds the fd table and hands it,
with the journalled device state, to the process outside, which starts a new supervisor
on it. The
front-end's connection never closes, and what it holds comes through: nodeids, an open
file, a lock, a SETLKW parked behind a host lock, requests in flight (each answered
exactly once)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from daemon.stats.daemon_info import read_info
from tests.options.test_sandbox import AS_UID_1000, server_pid
from tests.protocol.test_hostile_guest import serve
from tests.support.held_state import (
    assert_holdings_came_through,
    assert_writes_answered,
    start_writes,
    take_holdings,
)


def wait_serving(pid: int, restarts: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        info = read_info(pid)
        if info.get("supervisor_restarts") == restarts and info.get("serving"):
            return
        assert time.monotonic() < deadline, f"no new supervisor serving: {info}"
        time.sleep(0.02)


@pytest.mark.parametrize("sandbox", ["chroot", "namespace", "none --keeper",
                                     "namespace as uid 1000"])
def test_killed_supervisor_is_replaced_under_the_front_end(tmp_path: Path,
                                                           sandbox: str) -> None:
    """``as uid 1000``: not root, the unprivileged namespace sandbox (its own user
    namespace, a helper process between the process outside and the keeper)."""
    sandbox, _, user = sandbox.partition(" as uid ")
    wrapper = AS_UID_1000 if user else ()
    with serve(tmp_path, "--posix-lock", "--sandbox", *sandbox.split(),
               wrapper=wrapper) as srv:
        pid = int((tmp_path / "vu.sock.pid").read_text())
        held = take_holdings(srv, b"before the kill\n")
        for rounds in (1, 2):
            writes = start_writes(srv, held)
            supervisor = server_pid(pid)
            killed_at = time.monotonic()
            os.kill(supervisor, signal.SIGKILL)
            wait_serving(pid, rounds)
            back = time.monotonic() - killed_at
            print(f"{sandbox}: kill {rounds} -> new supervisor serving in {back * 1000:.0f} ms")
            assert_writes_answered(srv, writes)
            assert server_pid(pid) != supervisor
            assert back < 5, f"the new supervisor took {back:.1f} s"
        log = srv.log()
        assert log.count("killed by signal 9; taking its fds to a new one") == 2, log
        assert "(0 live upgrades, 2 supervisor restarts)" in log
        assert_holdings_came_through(srv, held)
