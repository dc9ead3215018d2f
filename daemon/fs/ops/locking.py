"""GETLK, SETLK and SETLKW, POSIX record locks (--posix-lock) and flock() (--flock),
forwarded to the host: the lock calls are in :mod:`daemon.fs.locks`, the description
per guest lock owner that POSIX locks are taken on in :mod:`daemon.fs.lock_owners`.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable

from daemon.fs import locks
from daemon.fs.ops.base import FsBase, Request
from daemon.fs.ops.inodes import HandleRef
from daemon.fs.proc_fd import proc_open
from daemon.protocol import fuse


class LockOps(FsBase):
    """Lock requests; a SETLKW that cannot be granted yet becomes a :class:`PendingLock`
    that the worker retries."""

    def _lock_args(self, req: Request) -> tuple[int, int, int, int, int, bool, int]:
        """fh, owner, start, end, type, flock?, and the locking process (its tgid)."""
        fh, owner, start, end, kind, pid, lk_flags, _ = fuse.LK_IN.unpack_from(req.arg)
        flock = bool(lk_flags & fuse.LK_FLOCK)
        if (flock and not self.config.flock) or (not flock and self.lock_owners is None):
            raise OSError(errno.ENOSYS, "lock forwarding is off")
        return fh, owner, start, end, kind, flock, pid

    def owner_opener(self, fd: int) -> Callable[[], int]:
        """Opens the lock owner's own description of the file ``fd`` (an open file of
        the guest): read-write when the host allows, else as the guest opened it."""
        def reopen() -> int:
            try:
                return proc_open(fd, os.O_RDWR)
            except OSError:
                mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
                return proc_open(fd, mode)
        return reopen

    def lock_as_owner(self, nodeid: int, owner: int, handle_fd: int, start: int, end: int,
                      kind: int, pid: int = 0) -> None:
        """SETLK of a POSIX lock on the owner's description (raises LockBusy)."""
        assert self.lock_owners is not None
        opener = None if kind == locks.F_UNLCK else self.owner_opener(handle_fd)
        fd = self.lock_owners.use(nodeid, owner, opener, pid)
        if fd < 0:
            locks.check_request(start, end, kind)
            return  # unlocking what was never locked
        try:
            locks.set_lock(fd, start, end, kind, False)
        finally:
            self.lock_owners.done(nodeid, owner, fd)

    def op_getlk(self, req: Request) -> bytes:
        fh, owner, start, end, kind, flock, _pid = self._lock_args(req)
        with HandleRef(self, fh) as handle:
            if flock or self.lock_owners is None:
                return locks.get_lock(handle.fd, start, end, kind)
            # the owner's own locks never conflict: ask through its description if any
            owners = self.lock_owners
            fd = owners.use(req.nodeid, owner, None)
            try:
                answer = locks.get_lock(handle.fd if fd < 0 else fd, start, end, kind)
            finally:
                if fd >= 0:
                    owners.done(req.nodeid, owner, fd)
            return self._name_the_holder(req.nodeid, owner, answer)

    def _name_the_holder(self, nodeid: int, owner: int, answer: bytes) -> bytes:
        """Host OFD locks have no pid: if the conflicting lock is another guest owner's
        (the range is free as that owner sees it), answer that owner's guest pid, as
        POSIX F_GETLK does; a host process's lock is answered with pid 0."""
        got_start, got_end, got_kind, _ = fuse.LK_OUT.unpack(answer)
        if got_kind == locks.F_UNLCK:
            return answer
        assert self.lock_owners is not None
        others = self.lock_owners.others(nodeid, owner)
        pid = 0
        try:
            for _other, fd, other_pid in others:
                seen = locks.get_lock(fd, got_start, got_end, locks.F_WRLCK)
                if other_pid and fuse.LK_OUT.unpack(seen)[2] == locks.F_UNLCK:
                    pid = other_pid
                    break
        finally:
            for other, fd, _ in others:
                self.lock_owners.done(nodeid, other, fd)
        return fuse.LK_OUT.pack(got_start, got_end, got_kind, pid)

    def op_setlk(self, req: Request) -> bytes:
        fh, owner, start, end, kind, flock, pid = self._lock_args(req)
        with HandleRef(self, fh) as handle:
            try:
                if flock:
                    locks.set_lock(handle.fd, start, end, kind, True)
                else:
                    self.lock_as_owner(req.nodeid, owner, handle.fd, start, end, kind, pid)
            except locks.LockBusy:
                raise OSError(errno.EAGAIN, "lock held elsewhere") from None
        return b""

    def start_setlkw(self, req: Request) -> PendingLock | None:
        """SETLKW: take the lock now, or return what the worker must retry later."""
        fh, owner, start, end, kind, flock, pid = self._lock_args(req)
        pending = PendingLock(self, fh, req.nodeid, owner, start, end, kind, flock, pid)
        if pending.attempt():
            return None
        return pending


class PendingLock:
    """A SETLKW the host could not grant yet.  It pins its open file only while it tries:
    a parked request holds nothing, so a RELEASE meanwhile closes the file and the next try
    answers EBADF, and any number of parked requests costs no pins."""

    __slots__ = ("fs", "fh", "nodeid", "owner", "start", "end", "kind", "flock", "pid")

    def __init__(self, fs: LockOps, fh: int, nodeid: int, owner: int, start: int,
                 end: int, kind: int, flock: bool, pid: int) -> None:
        self.fs, self.fh = fs, fh
        self.nodeid, self.owner, self.pid = nodeid, owner, pid
        self.start, self.end, self.kind, self.flock = start, end, kind, flock

    def attempt(self) -> bool:
        """True once the lock is ours; raises OSError when the guest closed the file
        meanwhile or the host refuses."""
        fs = self.fs
        got = fs.handles.pin(self.fh)
        if got is None:
            raise OSError(errno.EBADF, "the file is not open (released while waiting?)")
        try:
            if self.flock:
                locks.set_lock(got[1], self.start, self.end, self.kind, True)
            else:
                fs.lock_as_owner(self.nodeid, self.owner, got[1], self.start, self.end,
                                 self.kind, self.pid)
        except locks.LockBusy:
            return False
        finally:
            fs.handles.unpin(self.fh)
        return True
