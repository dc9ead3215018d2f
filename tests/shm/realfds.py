"""Real files and fds for the table tests.

The tables close the fd of an entry they free (close(2), in C), so a test can only see the
rules at work on real fds: an fd is open exactly while its entry is held by the guest or
pinned, and closed exactly once afterwards.  A closed fd NUMBER is handed out again by the
next open, so fds are checked by what they name, (st_dev, st_ino), never by number alone;
and a number the test saw closed is plugged with a canary, so a second close of it (which
would close someone else's file in the daemon) shows up when the plugs are checked.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

MNT_ID = 0  # the tests' "mount id": one file system

# (st_ino, st_dev, mnt_id): the key of the by-ids index
Ids = tuple[int, int, int]


def ids_of_fd(fd: int) -> Ids:
    """The table key of what `fd` names."""
    st = os.fstat(fd)
    return (st.st_ino, st.st_dev, MNT_ID)


def names(fd: int) -> Ids | None:
    """What `fd` names now, or None when the number is not open."""
    try:
        return ids_of_fd(fd)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
        return None


def is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
        return False
    return True


def open_fds() -> set[int]:
    """The fds open in this process's fd table (shared with clone_shared_fds children)."""
    listed = {int(n) for n in os.listdir("/proc/self/fd")}
    return {fd for fd in listed if is_open(fd)}  # minus the one listdir used


class Files:
    """Regular files in a private directory; each holds its own name, so a read through an fd
    shows which file the fd names as well as fstat does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._ids: dict[str, Ids] = {}
        canary = root / ".canary"
        canary.write_bytes(b"canary\n")
        self.canary_fd = os.open(canary, os.O_RDONLY | os.O_CLOEXEC)
        self.canary_ids = ids_of_fd(self.canary_fd)
        self.plugs: list[int] = []

    def make(self, name: str) -> Ids:
        """Create file `name` (once) and return its ids."""
        if name not in self._ids:
            p = self.root / name
            p.write_bytes(self.content(name))
            st = p.stat()
            self._ids[name] = (st.st_ino, st.st_dev, MNT_ID)
        return self._ids[name]

    @staticmethod
    def content(name: str) -> bytes:
        return f"file {name}\n".encode()

    def ids(self, name: str) -> Ids:
        return self._ids[name]

    def open(self, name: str, flags: int = os.O_RDONLY) -> tuple[int, Ids]:
        """A new fd on file `name` (created if needed), as a LOOKUP or OPEN would make one."""
        ids = self.make(name)
        fd = os.open(self.root / name, flags | os.O_CLOEXEC)
        return fd, ids

    def assert_names(self, fd: int, ids: Ids) -> None:
        got = names(fd)
        assert got is not None, f"fd {fd} should be open on {ids}, but is closed"
        assert got == ids, f"fd {fd} names {got}, expected {ids} (closed and reused?)"

    def assert_reads(self, fd: int, name: str) -> None:
        """A regular fd on `name` reads that file's content (the handle table's READ)."""
        want = self.content(name)
        assert os.pread(fd, len(want) + 8, 0) == want

    def assert_closed(self, fd: int) -> None:
        """`fd` is closed now; plug its number so that a second close is caught later."""
        assert not is_open(fd), f"fd {fd} should be closed, it names {names(fd)}"
        os.dup2(self.canary_fd, fd, inheritable=False)
        self.plugs.append(fd)

    def check_plugs(self) -> None:
        """Every plugged number still names the canary: nobody closed it a second time."""
        for fd in self.plugs:
            assert names(fd) == self.canary_ids, f"fd {fd} was closed a second time"

    def close(self) -> None:
        self.check_plugs()
        for fd in self.plugs:
            os.close(fd)
        self.plugs.clear()
        os.close(self.canary_fd)
