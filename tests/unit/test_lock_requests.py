"""Lock requests through the ring: a refused SETLKW gives the open file's reference back
exactly once, so the guest's file stays usable."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from pathlib import Path

import pytest

from daemon.protocol import fuse
from tests.support.daemon import pyvirtiofsd
from tests.support.frontend import Frontend


def test_refused_setlkw_leaves_the_file_open(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"still readable")
    sock = tmp_path / "vfs.sock"
    with pyvirtiofsd(share, sock, "--posix-lock"):
        front = Frontend(str(sock))
        front.setup(2)
        front.init()
        err, entry = front.lookup(1, b"f")
        nodeid = struct.unpack_from("<Q", entry)[0]
        err, opened = front.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDWR, 0))
        fh = struct.unpack_from("<Q", opened)[0]
        for _ in range(3):  # lock type 7 does not exist: EINVAL, each time
            err, _ = front.fuse(fuse.Opcode.SETLKW, nodeid,
                                fuse.LK_IN.pack(fh, 1, 0, 9, 7, 0, 0, 0))
            assert err == -errno.EINVAL
        err, data = front.fuse(fuse.Opcode.READ, nodeid,
                               fuse.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0))
        assert (err, data) == (0, b"still readable")
        # a real lock still works on the same file
        err, _ = front.fuse(fuse.Opcode.SETLKW, nodeid,
                            fuse.LK_IN.pack(fh, 1, 0, 9, 1, 0, 0, 0))
        assert err == 0
        front.close()


def _hold_write_lock(path: Path, start: int = 0, length: int = 0) -> int:
    """A host process's lock (an open-file-description lock of this test process)."""
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, start, length, 0))
    return fd


def _host_can_lock(path: Path, start: int = 0, length: int = 0) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                    struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, start, length, 0))
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("interrupt_queue", [0, 1], ids=["hiprio", "same-queue"])
def test_interrupt_ends_a_waiting_setlkw(tmp_path: Path, interrupt_queue: int) -> None:
    """A SETLKW waiting for a host process's lock ends with EINTR when the guest sends
    FUSE_INTERRUPT for it (on the hiprio queue, as the spec places it, or on the request
    queue itself), and the daemon does not take the lock later behind the guest's back."""
    share = tmp_path / "share"
    share.mkdir()
    path = share / "f"
    path.write_bytes(b"locked file")
    sock = tmp_path / "vfs.sock"
    held = _hold_write_lock(path)
    with pyvirtiofsd(share, sock, "--posix-lock"):
        front = Frontend(str(sock))
        front.setup(2)
        front.init()
        err, entry = front.lookup(1, b"f")
        nodeid = struct.unpack_from("<Q", entry)[0]
        err, opened = front.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDWR, 0))
        fh = struct.unpack_from("<Q", opened)[0]
        waiting = front.start(fuse.Opcode.SETLKW, nodeid,
                              fuse.LK_IN.pack(fh, 7, 0, fuse.OFFSET_MAX, fcntl.F_WRLCK, 0, 0, 0))
        with pytest.raises(TimeoutError):  # it really waits for the host's lock
            front.wait_used(1, timeout=0.5)
        started = time.monotonic()
        interrupt = front.start(fuse.Opcode.INTERRUPT, 0,
                                fuse.INTERRUPT_IN.pack(waiting.unique), q=interrupt_queue,
                                out_size=0)
        assert front.finish_all([waiting, interrupt], timeout=5) == [(-errno.EINTR, b""),
                                                                      (0, b"")]
        assert time.monotonic() - started < 2
        os.close(held)  # the host lets go: the interrupted request must not grab the lock
        time.sleep(0.2)
        assert _host_can_lock(path)
        # the guest's file is still open and usable, and a new SETLKW gets the lock
        err, data = front.fuse(fuse.Opcode.READ, nodeid,
                               fuse.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0))
        assert (err, data) == (0, b"locked file")
        err, _ = front.fuse(fuse.Opcode.SETLKW, nodeid,
                            fuse.LK_IN.pack(fh, 7, 0, fuse.OFFSET_MAX, fcntl.F_WRLCK, 0, 0, 0))
        assert err == 0
        assert not _host_can_lock(path)
        front.close()


def test_interrupt_of_an_unknown_request_is_ignored(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"x")
    sock = tmp_path / "vfs.sock"
    with pyvirtiofsd(share, sock, "--posix-lock"):
        front = Frontend(str(sock))
        front.setup(2)
        front.init()
        for q in (0, 1):
            front.fuse(fuse.Opcode.INTERRUPT, 0, fuse.INTERRUPT_IN.pack(12345), q=q,
                       out_size=0)
            front.fuse(fuse.Opcode.INTERRUPT, 0, b"\x01", q=q, out_size=0)  # truncated
        err, entry = front.lookup(1, b"f")
        assert err == 0
        front.close()


def _open_twice(front: Frontend) -> tuple[int, int, int]:
    err, entry = front.lookup(1, b"f")
    assert err == 0
    nodeid = struct.unpack_from("<Q", entry)[0]
    fhs = []
    for _ in range(2):
        err, opened = front.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDWR, 0))
        assert err == 0
        fhs.append(struct.unpack_from("<Q", opened)[0])
    return nodeid, fhs[0], fhs[1]


def test_posix_locks_belong_to_the_guest_lock_owner(tmp_path: Path) -> None:
    """--posix-lock: locks of one guest owner never conflict with each other, whatever
    descriptor they are taken through; another owner and host processes are excluded;
    a FLUSH (close()) by the owner through any descriptor releases all its locks."""
    share = tmp_path / "share"
    share.mkdir()
    path = share / "f"
    path.write_bytes(b"0123456789" * 10)
    sock = tmp_path / "vfs.sock"
    A, B = 0x1111, 0x2222  # two guest processes' lock owners
    with pyvirtiofsd(share, sock, "--posix-lock"):
        front = Frontend(str(sock))
        front.setup(2)
        front.init()
        nodeid, fh1, fh2 = _open_twice(front)

        def lk(op: int, fh: int, owner: int, start: int, end: int, kind: int) -> tuple:
            pid = owner  # each owner is one guest process here; its pid is its owner id
            return front.fuse(op, nodeid,
                              fuse.LK_IN.pack(fh, owner, start, end, kind, pid, 0, 0))

        assert lk(fuse.Opcode.SETLK, fh1, A, 0, 49, fcntl.F_WRLCK)[0] == 0
        # same owner through the other descriptor: no conflict (POSIX), it replaces
        assert lk(fuse.Opcode.SETLK, fh2, A, 10, 19, fcntl.F_RDLCK)[0] == 0
        # another owner conflicts, through either descriptor
        assert lk(fuse.Opcode.SETLK, fh1, B, 0, 0, fcntl.F_RDLCK)[0] == -errno.EAGAIN
        assert lk(fuse.Opcode.SETLK, fh2, B, 15, 15, fcntl.F_RDLCK)[0] == 0  # read on read
        assert lk(fuse.Opcode.SETLK, fh2, B, 15, 15, fcntl.F_UNLCK)[0] == 0
        # GETLK: the owner's own locks are no conflict; another owner sees them
        err, out = lk(fuse.Opcode.GETLK, fh2, A, 0, 99, fcntl.F_WRLCK)
        assert err == 0 and fuse.LK_OUT.unpack(out)[2] == fcntl.F_UNLCK
        err, out = lk(fuse.Opcode.GETLK, fh2, B, 0, 99, fcntl.F_WRLCK)
        assert err == 0 and fuse.LK_OUT.unpack(out) == (0, 9, fcntl.F_WRLCK, A)  # names A
        held = _hold_write_lock(path, 60, 10)  # a host process's lock: no guest pid
        err, out = lk(fuse.Opcode.GETLK, fh2, A, 55, 99, fcntl.F_RDLCK)
        assert err == 0 and fuse.LK_OUT.unpack(out) == (60, 69, fcntl.F_WRLCK, 0)
        os.close(held)
        # a host process is excluded from the held ranges and only those
        assert not _host_can_lock(path, 5, 1) and not _host_can_lock(path, 40, 5)
        assert _host_can_lock(path, 50, 10)
        # unlocking a middle part leaves the rest locked
        assert lk(fuse.Opcode.SETLK, fh1, A, 20, 39, fcntl.F_UNLCK)[0] == 0
        assert _host_can_lock(path, 25, 10) and not _host_can_lock(path, 45, 1)
        # owner B closes its descriptor: A's locks stay
        err, _ = front.fuse(fuse.Opcode.FLUSH, nodeid, fuse.FLUSH_IN.pack(fh2, 0, 0, B))
        assert err == 0 and not _host_can_lock(path, 0, 50)
        # owner A closes the *other* descriptor: all of A's locks on the file go
        err, _ = front.fuse(fuse.Opcode.FLUSH, nodeid, fuse.FLUSH_IN.pack(fh2, 0, 0, A))
        assert err == 0 and _host_can_lock(path, 0, 100)
        # and fh1 is still open and usable for new locks
        assert lk(fuse.Opcode.SETLK, fh1, A, 0, 0, fcntl.F_WRLCK)[0] == 0
        assert not _host_can_lock(path, 0, 1)
        for fh in (fh1, fh2):
            err, _ = front.fuse(fuse.Opcode.FLUSH, nodeid, fuse.FLUSH_IN.pack(fh, 0, 0, A))
            err, _ = front.fuse(fuse.Opcode.RELEASE, nodeid, fuse.RELEASE_IN.pack(fh, 0, 0, 0))
            assert err == 0
        assert _host_can_lock(path, 0, 100)
        front.close()


def test_posix_lock_owner_waits_across_queues(tmp_path: Path) -> None:
    """Owner A holds a lock taken on queue 1; owner B's SETLKW on queue 2 waits until A's
    close() (FLUSH on queue 1) and then gets it: the owner table is shared by workers."""
    share = tmp_path / "share"
    share.mkdir()
    path = share / "f"
    path.write_bytes(b"x" * 10)
    sock = tmp_path / "vfs.sock"
    with pyvirtiofsd(share, sock, "--posix-lock"):
        front = Frontend(str(sock))
        front.setup(3)
        front.init()
        nodeid, fh1, fh2 = _open_twice(front)
        err, _ = front.fuse(fuse.Opcode.SETLK, nodeid,
                            fuse.LK_IN.pack(fh1, 0xA, 0, 9, fcntl.F_WRLCK, 0, 0, 0), q=1)
        assert err == 0
        waiting = front.start(fuse.Opcode.SETLKW, nodeid,
                              fuse.LK_IN.pack(fh2, 0xB, 0, 9, fcntl.F_WRLCK, 0, 0, 0), q=2)
        with pytest.raises(TimeoutError):
            front.wait_used(2, timeout=0.5)
        err, _ = front.fuse(fuse.Opcode.FLUSH, nodeid, fuse.FLUSH_IN.pack(fh1, 0, 0, 0xA), q=1)
        assert err == 0
        assert front.finish(waiting, timeout=5) == (0, b"")
        assert not _host_can_lock(path, 0, 10)
        front.close()
