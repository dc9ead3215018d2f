"""What a front-end holds while the daemon's code or supervisor changes under it (a live
upgrade, a SIGKILLed supervisor), and the checks that it all came through.

tests/protocol/test_live_upgrade.py and test_supervisor_restart.py take the same holdings
(an open file with data, a guest lock on a second file, a SETLKW parked behind a host lock
on a third, WRITEs in flight) and check them the same way afterwards; test_inflight.py
uses the lock helpers."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu
from tests.support.frontend import Sent, reclaim

if TYPE_CHECKING:
    from tests.protocol.test_hostile_guest import Served

FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, length, pid
OFD_WRLCK = FLOCK.pack(fcntl.F_WRLCK, 0, 0, 0, 0)
IN_FLIGHT = 30  # WRITEs on queue 2 while the daemon changes, 10 bytes each from offset 100


def host_lock(path: Path) -> int:
    """A host process's write lock on the whole file (an OFD lock of this process)."""
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, OFD_WRLCK)
    return fd


def host_can_lock(path: Path, length: int = 0) -> bool:
    """Whether a host process could write-lock the file's first ``length`` bytes (0: the
    whole file) now, that is nobody holds a lock there (the lock is given back at once)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, 0, 0, length, 0))
        return True
    except OSError as e:
        assert e.errno in (errno.EAGAIN, errno.EACCES)
        return False
    finally:
        os.close(fd)


def open_file(srv: Served, name: str, q: int) -> tuple[int, int]:
    """(nodeid, fh) of a share file opened read-write by the guest."""
    error, nodeid, _ = srv.lookup(fuse.ROOT_ID, name.encode(), q=q)
    assert error == 0
    error, fh = srv.open(nodeid, os.O_RDWR, q=q)
    assert error == 0
    return nodeid, fh


def setlkw(srv: Served, nodeid: int, fh: int, owner: int, q: int) -> Sent:
    """A whole-file SETLKW write lock, sent and left unanswered (it may park)."""
    return srv.fe.start(fuse.Opcode.SETLKW, nodeid,
                        fuse.LK_IN.pack(fh, owner, 0, fuse.OFFSET_MAX, fcntl.F_WRLCK,
                                        4000 + owner, 0, 0), q=q, out_size=256, indirect=True)


def assert_nothing_more(srv: Served, q: int) -> None:
    """No used element beyond those the test waited for: none was answered twice."""
    with pytest.raises(TimeoutError):
        srv.fe.wait_used(q, timeout=0.3)


@dataclass
class Holdings:
    """The guest's side of what must survive: "data" open (nodeid, fh; host inode ino)
    starting with ``first``; "held" locked by the guest; a SETLKW on "locked" parked
    behind the host lock ``host_fd`` (queue 1's descriptors stay its until answered)."""

    nodeid: int
    fh: int
    ino: int
    first: bytes
    host_fd: int
    parked: Sent


def take_holdings(srv: Served, first: bytes) -> Holdings:
    """Open, lock and park as a guest would before the daemon changes (daemon started
    with --posix-lock)."""
    fe = srv.fe
    (srv.share / "data").write_bytes(first)
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
    host_fd = host_lock(srv.share / "locked")
    parked = setlkw(srv, locked, locked_fh, owner=5, q=1)
    return Holdings(nodeid, fh, ino, first, host_fd, parked)


def start_writes(srv: Served, held: Holdings) -> list[Sent]:
    """IN_FLIGHT WRITEs to "data" on queue 2, sent and not waited for."""
    return [srv.fe.start(
        fuse.Opcode.WRITE, held.nodeid,
        fuse.WRITE_IN.pack(held.fh, 100 + 10 * i, 10, 0, 0, 0, 0), q=2, out_size=256,
        indirect=True, extra_readable=[b"%09d\n" % i]) for i in range(IN_FLIGHT)]


def assert_writes_answered(srv: Served, writes: list[Sent]) -> None:
    """Each WRITE of start_writes answered exactly once, all 10 bytes written."""
    answers = srv.fe.finish_all(writes)
    assert [(e, fuse.WRITE_OUT.unpack(p)[0]) for e, p in answers] == [(0, 10)] * len(writes)
    assert_nothing_more(srv, 2)
    reclaim(srv.fe, 2)


def assert_holdings_came_through(srv: Served, held: Holdings) -> None:
    """The connection never closed, the nodeid is the same inode, the open file reads
    what was written, the guest's lock still excludes the host, the parked SETLKW is
    granted once the host lets go (answered exactly once), and every queue serves."""
    fe = srv.fe
    assert vu.decode_u64(fe.call(vu.Request.GET_FEATURES)) & vu.VIRTIO_F_VERSION_1
    # on queue 2: queue 1's descriptors are the parked SETLKW's until it is answered
    error, payload = srv.call(fuse.Opcode.GETATTR, held.nodeid, bytes(16), q=2)
    assert error == 0
    assert struct.unpack_from("<Q", payload, fuse.ATTR_OUT_HEAD.size)[0] == held.ino
    error, data = srv.read(held.nodeid, held.fh, 4096, q=2)
    assert error == 0 and data[:len(held.first)] == held.first
    assert data[100:100 + 10 * IN_FLIGHT] == b"".join(b"%09d\n" % i for i in range(IN_FLIGHT))
    assert not host_can_lock(srv.share / "held")
    os.close(held.host_fd)
    assert fe.finish(held.parked, timeout=10)[0] == 0
    assert_nothing_more(srv, 1)
    assert not host_can_lock(srv.share / "locked")
    assert srv.proc.poll() is None
    for q in (1, 2):  # (in a sandbox the workers are not the daemon's children)
        srv.assert_serves(q)
