"""The worker's wait/drain/notify loop (pyvfs_serve in daemon/native/serve.c): every answer
the driver asked to hear about is signalled on the queue's call eventfd, whether C or
Python answered it, FORGETs on the high-priority queue included; and once idle, the
worker has asked for the next kick (avail_event names the next avail index), so a guest
that waits for interrupts and kicks only when asked never hangs."""

from __future__ import annotations

import os
import select
import struct
import time
from pathlib import Path

import pytest

from daemon.protocol import fuse
from tests.support.daemon import pyvirtiofsd
from tests.support.frontend import Frontend


def drain_call(fe: Frontend, q: int) -> None:
    try:
        os.eventfd_read(fe.rings[q].call)
    except BlockingIOError:
        pass


def signalled(fe: Frontend, q: int, timeout: float = 3.0) -> bool:
    ready, _, _ = select.select([fe.rings[q].call], [], [], timeout)
    if ready:
        os.eventfd_read(fe.rings[q].call)
    return bool(ready)


def avail_event(fe: Frontend, q: int) -> int:
    ring = fe.rings[q]
    return struct.unpack_from("<H", fe.mem, fe.off(ring.used) + 4 + 8 * ring.size)[0]


@pytest.mark.parametrize("extra", [(), ("--poll-us", "300")], ids=["default", "poll-us"])
def test_answers_are_signalled_and_kicks_asked_for(tmp_path: Path, extra: tuple) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"data")
    sock = tmp_path / "vfs.sock"
    with pyvirtiofsd(share, sock, *extra):
        fe = Frontend(str(sock))
        fe.setup(3)
        fe.init()
        requests = [
            ("GETATTR (answered in C)", fuse.Opcode.GETATTR, fuse.GETATTR_IN.pack(0, 0, 0)),
            ("STATFS (answered in Python)", fuse.Opcode.STATFS, b""),
        ]
        for q in (1, 2):
            for _ in range(3):
                for what, opcode, arg in requests:
                    drain_call(fe, q)
                    sent = fe.start(opcode, 1, arg, q=q)
                    assert signalled(fe, q), f"queue {q}: {what} answered without an interrupt"
                    err, _ = fe.finish(sent)
                    assert err == 0, what
                    time.sleep(0.02)  # past --poll-us: the worker is waiting for a kick
                    assert avail_event(fe, q) == fe.rings[q].next_avail, what
        # a FORGET on the high-priority queue: gathered for a moment, then signalled
        err, entry = fe.lookup(1, b"f")
        assert err == 0
        nodeid = struct.unpack_from("<Q", entry)[0]
        used_before = fe.rings[0].last_used
        drain_call(fe, 0)
        fe.start(fuse.Opcode.FORGET, nodeid, fuse.FORGET_IN.pack(1), q=0, out_size=0)
        assert signalled(fe, 0), "FORGET completed without an interrupt"
        fe.wait_used(0)
        assert fe.rings[0].last_used == (used_before + 1) & 0xFFFF
        time.sleep(0.02)
        assert avail_event(fe, 0) == fe.rings[0].next_avail
        fe.close()
