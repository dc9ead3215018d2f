"""A SETLKW waiting for a lock at the switch-over moves with the device state: the source's
worker hands it on when GET_VRING_BASE stops it, the destination's worker of that queue
waits with it again and answers into the same descriptor chain (guest memory moves with
the guest: here both daemons map the same memory) once the lock is free: the guest gets
its answer exactly once. A failed migration's source answers it itself."""

from __future__ import annotations

import dataclasses
import fcntl
import mmap
import os
import struct
import time
from pathlib import Path

import msgpack

from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu
from tests.protocol.test_migration_locks import HOST_FLOCK, host_posix_free, stop_rings
from tests.protocol.test_migration_state import LOAD, SAVE, connect, daemon, transfer
from tests.support.daemon import daemon_log
from tests.support.frontend import GUEST_BASE, UVA_BASE, Frontend, Sent

R = vu.Request
OWNER, PID = 0x5E7, 77


def waiting_setlkw(fe: Frontend, share: Path) -> tuple[Sent, int, int]:
    fe.init()
    err, entry = fe.lookup(1, b"file")
    assert err == 0
    nodeid = fuse.ENTRY_HEAD.unpack_from(entry)[0]
    err, out = fe.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDWR, 0))
    assert err == 0
    fh = fuse.OPEN_OUT.unpack_from(out)[0]
    arg = fuse.LK_IN.pack(fh, OWNER, 0, 99, fcntl.F_WRLCK, PID, 0, 0)
    return fe.start(fuse.Opcode.SETLKW, nodeid, arg), nodeid, fh


def used_idx(fe: Frontend, q: int) -> int:
    return struct.unpack_from("<H", fe.mem, fe.off(fe.rings[q].used) + 2)[0]


def same_rings(dst: Frontend, src: Frontend, bases: dict[int, int]) -> None:
    """The destination's rings where the source's were, from the bases GET_VRING_BASE
    reported (as QEMU sends them), on the same guest memory."""
    uva = lambda gpa: UVA_BASE + gpa - GUEST_BASE  # noqa: E731
    for index, ring in src.rings.items():
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        assert dst.ack(R.SET_VRING_NUM, vu.VRING_STATE.pack(index, ring.size)) == 0
        assert dst.ack(R.SET_VRING_ADDR, vu.VRING_ADDR.pack(
            index, 0, uva(ring.desc), uva(ring.used), uva(ring.avail), 0)) == 0
        assert dst.ack(R.SET_VRING_BASE, vu.VRING_STATE.pack(index, bases[index])) == 0
        assert dst.ack(R.SET_VRING_KICK, vu.U64.pack(index), [kick]) == 0
        assert dst.ack(R.SET_VRING_CALL, vu.U64.pack(index), [call]) == 0
        assert dst.ack(R.SET_VRING_ENABLE, vu.VRING_STATE.pack(index, 1)) == 0
        dst.rings[index] = dataclasses.replace(ring, kick=kick, call=call)


def guest_memory_of(dst: Frontend, src: Frontend) -> None:
    """QEMU migrates guest memory; here the destination maps the source's."""
    os.close(dst.memfd)
    dst.mem.close()
    dst.memfd = os.dup(src.memfd)
    dst.mem = mmap.mmap(dst.memfd, src.size)
    dst.brk = src.brk
    dst.unique = src.unique


def test_a_waiting_setlkw_is_answered_by_the_destination(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "file").write_bytes(b"x" * 200)
    host = os.open(share / "file", os.O_RDWR)
    fcntl.fcntl(host, fcntl.F_OFD_SETLK, HOST_FLOCK.pack(fcntl.F_WRLCK, 0, 0, 0, 0))
    with daemon(share, tmp_path / "a.sock"):
        fe = connect(tmp_path / "a.sock", 2)
        sent, nodeid, _fh = waiting_setlkw(fe, share)
        time.sleep(1.0)  # the worker popped and parked it, even on a loaded machine
        assert used_idx(fe, 1) == fe.rings[1].last_used, "SETLKW answered while held"
        bases = stop_rings(fe)
        result, blob = transfer(fe, SAVE)
        assert result == 0
        parked = msgpack.unpackb(blob, strict_map_key=False)["parked"]
        assert [e[:2] for e in parked[1]] == [[sent.head, sent.unique]]
        with daemon(share, tmp_path / "b.sock") as dst:
            fe2 = Frontend(str(tmp_path / "b.sock"), memory_size=fe.size, queue_size=64)
            guest_memory_of(fe2, fe)
            fe2.setup(0, protocol_features=vu.ProtocolFeature.DEVICE_STATE)
            result, _ = transfer(fe2, LOAD, blob)
            assert result == 0, daemon_log(dst)
            same_rings(fe2, fe, bases)
            time.sleep(0.1)
            assert used_idx(fe2, 1) == fe2.rings[1].last_used, "answered while held"
            os.close(host)  # the host lets go: the destination's worker takes the lock
            assert fe2.finish(sent) == (0, b"")
            time.sleep(0.2)
            assert used_idx(fe2, 1) == fe2.rings[1].last_used, "answered twice"
            assert not host_posix_free(share / "file"), "the guest's lock is not held"
            # the guest goes on on that queue
            err, _ = fe2.fuse(fuse.Opcode.GETATTR, nodeid, fuse.GETATTR_IN.pack(0, 0, 0))
            assert err == 0
            fe2.close()
        fe.close()


def test_a_failed_migration_answers_it_on_the_source(tmp_path: Path) -> None:
    from tests.protocol.test_migration_locks import restart_rings

    share = tmp_path / "share"
    share.mkdir()
    (share / "file").write_bytes(b"x" * 200)
    host = os.open(share / "file", os.O_RDWR)
    fcntl.fcntl(host, fcntl.F_OFD_SETLK, HOST_FLOCK.pack(fcntl.F_WRLCK, 0, 0, 0, 0))
    with daemon(share, tmp_path / "a.sock"):
        fe = connect(tmp_path / "a.sock", 2)
        sent, _nodeid, _fh = waiting_setlkw(fe, share)
        time.sleep(1.0)  # popped and parked, even on a loaded machine
        bases = stop_rings(fe)
        assert transfer(fe, SAVE)[0] == 0
        restart_rings(fe, bases)  # the destination failed: the source runs on
        time.sleep(0.1)
        assert used_idx(fe, 1) == fe.rings[1].last_used
        os.close(host)
        assert fe.finish(sent) == (0, b"")
        time.sleep(0.2)
        assert used_idx(fe, 1) == fe.rings[1].last_used, "answered twice"
        fe.close()
