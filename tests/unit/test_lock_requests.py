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

from daemon import fuse
from tests.daemon import pyvirtiofsd
from tests.frontend import Frontend


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


def _hold_write_lock(path: Path) -> int:
    """A host process's lock (an open-file-description lock of this test process)."""
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    return fd


def _lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
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
        assert _lock_is_free(path)
        # the guest's file is still open and usable, and a new SETLKW gets the lock
        err, data = front.fuse(fuse.Opcode.READ, nodeid,
                               fuse.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0))
        assert (err, data) == (0, b"locked file")
        err, _ = front.fuse(fuse.Opcode.SETLKW, nodeid,
                            fuse.LK_IN.pack(fh, 7, 0, fuse.OFFSET_MAX, fcntl.F_WRLCK, 0, 0, 0))
        assert err == 0
        assert not _lock_is_free(path)
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
