"""fcntl() record locks owned by the guest's lock owner, as POSIX wants, not by the
open file (--posix-lock).

The guest kernel names the owner of every lock (``lock_owner``: one per process, per
files_struct). For each (inode, owner) the daemon opens a host open file description of
its own and takes the owner's locks on it with F_OFD_SETLK, so:

* one guest process's locks never conflict with each other, through any descriptor;
* host processes and other guest processes (other owners) are excluded;
* FLUSH, sent on every close() with the closing owner, drops all of that owner's locks
  on the inode (POSIX's "closing any descriptor releases the process's locks"): the
  description is closed.

Requests of one owner may arrive on any queue, so the table is shared by every process:
a memfd mapped by all of them (made before the first worker is cloned). Its entries are
changed under an open-file-description lock on the memfd; each worker takes it through a
description of its own, which the supervisor opens before cloning the worker and closes
when the worker dies, so a worker killed inside the (short) critical section cannot leave
the table locked. An entry also counts the requests using its fd, so a FLUSH racing with
a lock request of the same owner never closes an fd under it: the last user closes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Iterator

SLOTS = 4096
_ENTRY = struct.Struct("<QQiIIi")  # nodeid, owner, fd, users, state, guest pid
FREE, USED, CLOSING, GONE = 0, 1, 2, 3  # GONE: a tombstone, keeps probe chains whole
_LIVE = struct.Struct("<Q")
_MUTEX = struct.Struct("hhqqi4x")  # struct flock: type whence start len pid


class LockOwners:
    def __init__(self, proc_open: Callable[[int, int], int], slots: int = SLOTS,
                 memfd: int = -1) -> None:
        """``proc_open(fd, flags)`` opens fd's file anew (``daemon.fs.proc_fd.proc_open``);
        ``memfd``: the table a previous program left (live upgrade), its descriptions'
        fds still open at the numbers it names."""
        self.slots = slots
        # the entries, then a count of live ones (USED or CLOSING): the C FLUSH path
        # (daemon/native/fuse_ops.c) answers without the table while it is 0
        self.live_offset = _ENTRY.size * slots
        if memfd < 0:
            memfd = os.memfd_create("pyvirtiofsd-lock-owners", os.MFD_CLOEXEC)
            os.ftruncate(memfd, self.live_offset + 8)
        self.memfd = memfd
        self.mem = mmap.mmap(self.memfd, self.live_offset + 8)
        self._proc_open = proc_open
        self.mutex_fd = -1  # this process's own description of the memfd

    def fds(self) -> list[int]:
        """The descriptions the table holds (each with its owner's locks)."""
        out = []
        for slot in range(self.slots):
            _n, _o, fd, _users, state, _pid = _ENTRY.unpack_from(self.mem, slot * _ENTRY.size)
            if state in (USED, CLOSING) and fd >= 0:
                out.append(fd)
        return out

    def open_mutex(self) -> int:
        """A new description of the table's memfd: one per worker (the supervisor closes
        it when that worker is gone)."""
        return self._proc_open(self.memfd, os.O_RDWR)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.mutex_fd < 0:
            self.mutex_fd = self.open_mutex()
        fcntl.fcntl(self.mutex_fd, fcntl.F_OFD_SETLKW, _MUTEX.pack(fcntl.F_WRLCK, 0, 0, 1, 0))
        try:
            yield
        finally:
            fcntl.fcntl(self.mutex_fd, fcntl.F_OFD_SETLK, _MUTEX.pack(fcntl.F_UNLCK, 0, 0, 1, 0))

    def _find(self, nodeid: int, owner: int) -> tuple[int, int]:
        """(slot of the live entry or -1, first reusable slot or -1)."""
        start = hash((nodeid, owner)) % self.slots
        reusable = -1
        for i in range(self.slots):
            slot = (start + i) % self.slots
            n, o, _fd, _users, state, _pid = _ENTRY.unpack_from(self.mem, slot * _ENTRY.size)
            if state == FREE:
                return -1, slot if reusable < 0 else reusable
            if state == USED and (n, o) == (nodeid, owner):
                return slot, reusable
            if state == GONE and reusable < 0:
                reusable = slot
        return -1, reusable

    def use(self, nodeid: int, owner: int, opener: Callable[[], int] | None,
            pid: int = 0) -> int:
        """The owner's fd for this inode, counted as in use until :meth:`done`; made with
        ``opener`` if there is none yet, or -1 without an opener. ``pid``: the guest
        process that asks, remembered so that GETLK can name it."""
        with self._locked():
            slot, free = self._find(nodeid, owner)
            if slot >= 0:
                off = slot * _ENTRY.size
                n, o, fd, users, state, old_pid = _ENTRY.unpack_from(self.mem, off)
                _ENTRY.pack_into(self.mem, off, n, o, fd, users + 1, state, pid or old_pid)
                return fd
            if opener is None:
                return -1
            if free < 0:
                raise OSError(errno.ENOLCK, "too many lock owners")
            fd = opener()
            _ENTRY.pack_into(self.mem, free * _ENTRY.size, nodeid, owner, fd, 1, USED, pid)
            self._count_live(+1)
            return fd

    def others(self, nodeid: int, owner: int) -> list[tuple[int, int, int]]:
        """(owner, fd, pid) of every other owner with a description of the inode, each
        counted as in use until :meth:`done`."""
        found = []
        with self._locked():
            for slot in range(self.slots):
                off = slot * _ENTRY.size
                n, o, fd, users, state, pid = _ENTRY.unpack_from(self.mem, off)
                if state == USED and n == nodeid and o != owner:
                    _ENTRY.pack_into(self.mem, off, n, o, fd, users + 1, state, pid)
                    found.append((o, fd, pid))
        return found

    def done(self, nodeid: int, owner: int, fd: int) -> None:
        """End a use; the last user of an entry FLUSH marked closes its fd."""
        with self._locked():
            slot = self._slot_of_fd(nodeid, owner, fd)
            if slot < 0:
                return
            off = slot * _ENTRY.size
            n, o, fd, users, state, pid = _ENTRY.unpack_from(self.mem, off)
            if state == CLOSING and users <= 1:
                _ENTRY.pack_into(self.mem, off, 0, 0, -1, 0, GONE, 0)
                self._count_live(-1)
                os.close(fd)
            else:
                _ENTRY.pack_into(self.mem, off, n, o, fd, max(users - 1, 0), state, pid)

    def _slot_of_fd(self, nodeid: int, owner: int, fd: int) -> int:
        """The entry in use with this fd, USED or CLOSING (which _find no longer finds)."""
        start = hash((nodeid, owner)) % self.slots
        for i in range(self.slots):
            slot = (start + i) % self.slots
            n, o, got_fd, _users, state, _pid = _ENTRY.unpack_from(self.mem,
                                                                  slot * _ENTRY.size)
            if state == FREE:
                break
            if state in (USED, CLOSING) and (n, o, got_fd) == (nodeid, owner, fd):
                return slot
        return -1

    def flush(self, nodeid: int, owner: int) -> bool:
        """The owner closed a descriptor of the inode: its locks there go. True if it
        had any description here."""
        with self._locked():
            slot, _ = self._find(nodeid, owner)
            if slot < 0:
                return False
            off = slot * _ENTRY.size
            n, o, fd, users, _state, pid = _ENTRY.unpack_from(self.mem, off)
            if users == 0:
                _ENTRY.pack_into(self.mem, off, 0, 0, -1, 0, GONE, 0)
                self._count_live(-1)
                os.close(fd)  # the only reference to the description: its locks go
            else:
                _ENTRY.pack_into(self.mem, off, n, o, fd, users, CLOSING, pid)
            return True

    def _count_live(self, delta: int) -> None:
        """Under the mutex; readers outside it (C) only ask whether it is 0."""
        (n,) = _LIVE.unpack_from(self.mem, self.live_offset)
        _LIVE.pack_into(self.mem, self.live_offset, n + delta)

    @property
    def live(self) -> int:
        return _LIVE.unpack_from(self.mem, self.live_offset)[0]

    def count(self) -> int:
        """Live entries (for tests and stats)."""
        return sum(1 for slot in range(self.slots)
                   if _ENTRY.unpack_from(self.mem, slot * _ENTRY.size)[4] in (USED, CLOSING))
