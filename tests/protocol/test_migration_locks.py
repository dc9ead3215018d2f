"""The guest's host locks move with the device state: a POSIX record lock (an OFD lock on
the lock owner's description) and a flock() (on the fh's open file) taken through the
source daemon are held by the destination once CHECK_DEVICE_STATE answered 0, so a host
process is excluded before, after, and but for the handover window; a failed migration
gives them back to the source; a lock someone took in the window fails the check
(``abort``) or makes its holder answer EIO (``guest-error``)."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu
from tests.protocol.test_migration_state import (
    LOAD,
    SAVE,
    connect,
    daemon,
    read,
    transfer,
)
from tests.support.daemon import daemon_log, start_pyvirtiofsd
from tests.support.frontend import Frontend
from tests.support.held_state import FLOCK, host_can_lock
from tests.support.reference import stop_daemon

R = vu.Request
OWNER_A, PID_A = 0xA11CE, 4242
HOST_FLOCK = FLOCK  # struct flock, for host locks of other ranges


def make_share(base: Path) -> Path:
    share = base / "share"
    share.mkdir()
    (share / "posix").write_bytes(b"p" * 4096)
    (share / "flocked").write_bytes(b"flocked bytes\n")
    return share


def open_file(fe: Frontend, name: bytes) -> tuple[int, int]:
    err, entry = fe.lookup(1, name)
    assert err == 0
    nodeid = fuse.ENTRY_HEAD.unpack_from(entry)[0]
    err, out = fe.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDWR, 0))
    assert err == 0
    return nodeid, fuse.OPEN_OUT.unpack_from(out)[0]


def lock(fe: Frontend, nodeid: int, fh: int, owner: int, start: int, end: int, kind: int,
         flock: bool = False, opcode: int = fuse.Opcode.SETLK) -> tuple[int, bytes]:
    arg = fuse.LK_IN.pack(fh, owner, start, end, kind, PID_A, fuse.LK_FLOCK if flock else 0, 0)
    return fe.fuse(opcode, nodeid, arg)


def guest_locks(fe: Frontend) -> dict[str, int]:
    """Owner A write-locks [0, 100) of "posix"; fh B holds flock(LOCK_EX) on "flocked"."""
    fe.init()
    a, fh_a = open_file(fe, b"posix")
    b, fh_b = open_file(fe, b"flocked")
    assert lock(fe, a, fh_a, OWNER_A, 0, 99, fcntl.F_WRLCK)[0] == 0
    assert lock(fe, b, fh_b, 0xB0B, 0, fuse.OFFSET_MAX, fcntl.F_WRLCK, flock=True)[0] == 0
    return {"a": a, "fh_a": fh_a, "b": b, "fh_b": fh_b}


def host_posix_free(path: Path) -> bool:
    """Whether a host process gets an OFD write lock on [0, 100) (given back at once)."""
    return host_can_lock(path, length=100)


def host_flock_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        assert e.errno == errno.EWOULDBLOCK
        return False
    finally:
        os.close(fd)


def held_on_host(share: Path) -> tuple[bool, bool]:
    return not host_posix_free(share / "posix"), not host_flock_free(share / "flocked")


def getlk(fe: Frontend, ids: dict[str, int]) -> tuple[int, int, int, int]:
    """Another guest owner asks who holds [0, 10] of "posix": (start, end, type, pid)."""
    err, out = lock(fe, ids["a"], ids["fh_a"], 0xC0FFEE, 0, 10, fcntl.F_WRLCK,
                    opcode=fuse.Opcode.GETLK)
    assert err == 0
    return fuse.LK_OUT.unpack_from(out)


def stop_rings(fe: Frontend) -> dict[int, int]:
    return {i: vu.decode_vring_state(fe.call(R.GET_VRING_BASE, vu.VRING_STATE.pack(i, 0)))[1]
            for i in fe.rings}


def restart_rings(fe: Frontend, bases: dict[int, int]) -> None:
    """As QEMU starts the source's rings again when the migration failed."""
    for index, base in bases.items():
        assert fe.ack(R.SET_VRING_BASE, vu.VRING_STATE.pack(index, base)) == 0
        assert fe.ack(R.SET_VRING_KICK, vu.U64.pack(index), [fe.rings[index].kick]) == 0
        assert fe.ack(R.SET_VRING_ENABLE, vu.VRING_STATE.pack(index, 1)) == 0


@pytest.fixture
def share(tmp_path: Path) -> Iterator[Path]:
    yield make_share(tmp_path)


@pytest.mark.parametrize("sandbox", ["none", "namespace", "chroot"])
def test_locks_move_to_the_destination(tmp_path: Path, share: Path, sandbox: str) -> None:
    """In a sandbox the source reads the locks from the fdinfo directory it kept."""
    with daemon(share, tmp_path / "a.sock", "--sandbox", sandbox) as src:
        fe = connect(tmp_path / "a.sock", 2)
        ids = guest_locks(fe)
        assert held_on_host(share) == (True, True)
        stop_rings(fe)
        result, blob = transfer(fe, SAVE)
        assert result == 0, daemon_log(src)
        state = msgpack.unpackb(blob)
        assert state["version"] == 2
        assert state["locks"]["posix"] == [[ids["a"], OWNER_A, PID_A, os.O_RDWR, False,
                                            [[0, 99, fcntl.F_WRLCK]]]]
        assert state["locks"]["flock"] == [[ids["fh_b"], fcntl.F_WRLCK]]
        # the handover window: the source let go, so that the destination can take them
        assert held_on_host(share) == (False, False)
        with daemon(share, tmp_path / "b.sock", "--sandbox", sandbox) as dst:
            fe2, result = load_into(tmp_path / "b.sock", blob)
            assert result == 0, daemon_log(dst)
            assert held_on_host(share) == (True, True)
            assert getlk(fe2, ids) == (0, 99, fcntl.F_WRLCK, PID_A)
            assert read(fe2, ids["b"], ids["fh_b"], 100) == (0, b"flocked bytes\n")
            # the owner's description works on: it unlocks, the flock goes with RELEASE
            assert lock(fe2, ids["a"], ids["fh_a"], OWNER_A, 0, 99, fcntl.F_UNLCK)[0] == 0
            err, _ = fe2.fuse(fuse.Opcode.RELEASE, ids["b"],
                              fuse.RELEASE_IN.pack(ids["fh_b"], 0, 0, 0))
            assert err == 0
            assert held_on_host(share) == (False, False)
            fe2.close()
        fe.close()


def load_into(sock: Path, blob: bytes) -> tuple[Frontend, int]:
    fe = connect(sock, 0)
    result, _ = transfer(fe, LOAD, blob)
    if result == 0:
        fe.add_ring(0)
        fe.add_ring(1)
    return fe, result


def test_a_failed_migration_gives_the_locks_back(tmp_path: Path, share: Path) -> None:
    with daemon(share, tmp_path / "a.sock") as src:
        fe = connect(tmp_path / "a.sock", 2)
        ids = guest_locks(fe)
        bases = stop_rings(fe)
        result, blob = transfer(fe, SAVE)
        assert result == 0
        with daemon(share, tmp_path / "b.sock"):  # a destination that fails the state
            fe2, result = load_into(tmp_path / "b.sock", blob[:-3] + b"\xc1\xc1\xc1")
            assert result != 0
            fe2.close()
        assert held_on_host(share) == (False, False)
        restart_rings(fe, bases)
        assert held_on_host(share) == (True, True), daemon_log(src)
        assert getlk(fe, ids) == (0, 99, fcntl.F_WRLCK, PID_A)
        assert read(fe, ids["b"], ids["fh_b"], 100) == (0, b"flocked bytes\n")
        # and a second attempt hands them over again
        stop_rings(fe)
        result, blob = transfer(fe, SAVE)
        assert result == 0 and held_on_host(share) == (False, False)
        fe.close()


@pytest.mark.parametrize("policy", ["abort", "guest-error"])
def test_a_lock_taken_in_the_window(tmp_path: Path, share: Path, policy: str) -> None:
    """A host process takes the flock while it is in the state: the destination cannot.
    abort: the check fails and the destination keeps none of the locks (the source takes
    them back); guest-error: the check passes, the POSIX lock moved, fh B answers EIO."""
    with daemon(share, tmp_path / "a.sock") as src:
        fe = connect(tmp_path / "a.sock", 2)
        ids = guest_locks(fe)
        bases = stop_rings(fe)
        result, blob = transfer(fe, SAVE)
        assert result == 0
        thief = os.open(share / "flocked", os.O_RDONLY)
        fcntl.flock(thief, fcntl.LOCK_SH | fcntl.LOCK_NB)
        with daemon(share, tmp_path / "b.sock", "--migration-on-error", policy) as dst:
            fe2, result = load_into(tmp_path / "b.sock", blob)
            if policy == "abort":
                assert result != 0
                assert host_posix_free(share / "posix"), "the destination kept a lock"
                os.close(thief)
                fe2.close()
            else:
                assert result == 0, daemon_log(dst)
                assert not host_posix_free(share / "posix")
                err, _ = read(fe2, ids["b"], ids["fh_b"], 100)
                assert err == -errno.EIO
                err, _ = fe2.fuse(fuse.Opcode.FLUSH, ids["b"],
                                  fuse.FLUSH_IN.pack(ids["fh_b"], 0, 0, 0xB0B))
                assert err == -errno.EIO
                # the rest works, and RELEASE still frees the fh
                assert read(fe2, ids["a"], ids["fh_a"], 4) == (0, b"pppp")
                err, _ = fe2.fuse(fuse.Opcode.RELEASE, ids["b"],
                                  fuse.RELEASE_IN.pack(ids["fh_b"], 0, 0, 0))
                assert err == 0
                assert read(fe2, ids["b"], ids["fh_b"], 100)[0] == -errno.EBADF
                fe2.close()
        if policy == "abort":
            restart_rings(fe, bases)
            assert held_on_host(share) == (True, True), daemon_log(src)
        else:
            os.close(thief)
        fe.close()


def test_source_cannot_take_a_lock_back(tmp_path: Path, share: Path) -> None:
    """A host process took the POSIX range in the window and the migration failed: the
    source logs it and owner A's lock requests answer EIO until it closes the file."""
    with daemon(share, tmp_path / "a.sock") as src:
        fe = connect(tmp_path / "a.sock", 2)
        ids = guest_locks(fe)
        bases = stop_rings(fe)
        assert transfer(fe, SAVE)[0] == 0
        thief = os.open(share / "posix", os.O_RDWR)
        fcntl.fcntl(thief, fcntl.F_OFD_SETLK, HOST_FLOCK.pack(fcntl.F_RDLCK, 0, 50, 1, 0))
        restart_rings(fe, bases)
        os.close(thief)
        assert lock(fe, ids["a"], ids["fh_a"], OWNER_A, 0, 99, fcntl.F_WRLCK)[0] == -errno.EIO
        assert "taken by someone else" in daemon_log(src)
        assert not host_flock_free(share / "flocked")  # the flock came back
        # close() by owner A: FLUSH drops the broken entry; it may lock again
        err, _ = fe.fuse(fuse.Opcode.FLUSH, ids["a"],
                         fuse.FLUSH_IN.pack(ids["fh_a"], 0, 0, OWNER_A))
        assert err == 0
        assert lock(fe, ids["a"], ids["fh_a"], OWNER_A, 0, 99, fcntl.F_WRLCK)[0] == 0
        fe.close()


def test_a_destination_that_loaded_gives_the_locks_back_when_it_goes(
        tmp_path: Path, share: Path) -> None:
    """The destination took the locks, then the migration failed: the source's rings start
    again while the destination still holds them; the source waits until the
    destination's daemon is gone (its front-end quit) and takes them back: no EIO."""
    with daemon(share, tmp_path / "a.sock") as src:
        fe = connect(tmp_path / "a.sock", 2)
        ids = guest_locks(fe)
        bases = stop_rings(fe)
        result, blob = transfer(fe, SAVE)
        assert result == 0
        dst = start_pyvirtiofsd(share, tmp_path / "b.sock")
        try:
            fe2, result = load_into(tmp_path / "b.sock", blob)
            assert result == 0
            assert held_on_host(share) == (True, True)  # by the destination
            fe2.close()
            threading.Timer(0.3, stop_daemon, (dst,)).start()
            restart_rings(fe, bases)  # waits for the locks
        finally:
            stop_daemon(dst)
        assert held_on_host(share) == (True, True), daemon_log(src)
        assert "taken by someone else" not in daemon_log(src)
        assert getlk(fe, ids) == (0, 99, fcntl.F_WRLCK, PID_A)
        assert read(fe, ids["b"], ids["fh_b"], 100) == (0, b"flocked bytes\n")
        fe.close()
