"""The supervisor SIGKILLed under a connected front-end (--sandbox chroot, namespace, and
none --keeper): its keeper (workers/handover/keeper.py) holds the fd table and hands it,
with the journalled device state, to the process outside, which starts a new supervisor
on it. The
front-end's connection never closes, and what it holds comes through: nodeids, an open
file, a lock, a SETLKW parked behind a host lock, requests in flight (each answered
exactly once)."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import time
from pathlib import Path

import pytest

from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu
from daemon.stats.daemon_info import read_info
from tests.options.test_sandbox import server_pid
from tests.protocol.test_hostile_guest import reclaim, serve
from tests.protocol.test_inflight import (
    assert_nothing_more,
    host_can_lock,
    host_lock,
    open_file,
    setlkw,
)
from tests.support.frontend import Sent


def wait_serving(pid: int, restarts: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        info = read_info(pid)
        if info.get("supervisor_restarts") == restarts and info.get("serving"):
            return
        assert time.monotonic() < deadline, f"no new supervisor serving: {info}"
        time.sleep(0.02)


@pytest.mark.parametrize("sandbox", ["chroot", "namespace", "none --keeper"])
def test_killed_supervisor_is_replaced_under_the_front_end(tmp_path: Path,
                                                           sandbox: str) -> None:
    with serve(tmp_path, "--posix-lock", "--sandbox", *sandbox.split()) as srv:
        fe = srv.fe
        pid = int((tmp_path / "vu.sock.pid").read_text())
        (srv.share / "data").write_bytes(b"before the kill\n")
        for name in ("held", "locked"):
            (srv.share / name).write_bytes(b"lock me")
        nodeid, fh = open_file(srv, "data", q=1)
        ino = (srv.share / "data").stat().st_ino
        held, held_fh = open_file(srv, "held", q=2)
        error, _ = srv.call(fuse.Opcode.SETLK, held, fuse.LK_IN.pack(
            held_fh, 9, 0, fuse.OFFSET_MAX, fcntl.F_WRLCK, 99, 0, 0), q=2)
        assert error == 0 and not host_can_lock(srv.share / "held")
        locked, locked_fh = open_file(srv, "locked", q=1)
        reclaim(fe, 1)
        reclaim(fe, 2)
        hold = host_lock(srv.share / "locked")
        parked = setlkw(srv, locked, locked_fh, owner=5, q=1)
        for rounds in (1, 2):
            writes: list[Sent] = [fe.start(
                fuse.Opcode.WRITE, nodeid,
                fuse.WRITE_IN.pack(fh, 100 + 10 * i, 10, 0, 0, 0, 0), q=2, out_size=256,
                indirect=True, extra_readable=[b"%09d\n" % i]) for i in range(30)]
            supervisor = server_pid(pid)
            killed_at = time.monotonic()
            os.kill(supervisor, signal.SIGKILL)
            wait_serving(pid, rounds)
            back = time.monotonic() - killed_at
            print(f"{sandbox}: kill {rounds} -> new supervisor serving in {back * 1000:.0f} ms")
            answers = fe.finish_all(writes)
            assert [(e, fuse.WRITE_OUT.unpack(p)[0]) for e, p in answers] == [(0, 10)] * 30
            assert_nothing_more(srv, 2)
            reclaim(fe, 2)
            assert server_pid(pid) != supervisor
            assert back < 5, f"the new supervisor took {back:.1f} s"
        log = srv.log()
        assert log.count("killed by signal 9; taking its fds to a new one") == 2, log
        assert "(0 live upgrades, 2 supervisor restarts)" in log
        assert vu.decode_u64(fe.call(vu.Request.GET_FEATURES)) & vu.VIRTIO_F_VERSION_1
        error, payload = srv.call(fuse.Opcode.GETATTR, nodeid, bytes(16), q=2)
        assert error == 0 and struct.unpack_from("<Q", payload, fuse.ATTR_OUT_HEAD.size)[0] == ino
        error, data = srv.read(nodeid, fh, 4096, q=2)
        assert error == 0 and data[:16] == b"before the kill\n"
        assert data[100:400] == b"".join(b"%09d\n" % i for i in range(30))
        assert not host_can_lock(srv.share / "held")
        os.close(hold)
        assert fe.finish(parked, timeout=10)[0] == 0
        assert_nothing_more(srv, 1)
        assert not host_can_lock(srv.share / "locked")
        assert srv.proc.poll() is None
        for q in (1, 2):
            srv.assert_serves(q)
