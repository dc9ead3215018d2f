"""POSIX record locks and flock() forwarded to the host, so a guest and a host process
(or two guests sharing a directory) really exclude each other.

flock() locks are taken on the open file the guest's ``fh`` names (exactly flock's
owner); POSIX locks as open-file-description locks (F_OFD_*: never owned by the daemon
process that happens to run the request, never dropped by another worker closing an fd
of the file) on a description per guest lock owner (``daemon/fs/lock_owners.py``). Nothing
here blocks: a lock that is not free raises :class:`LockBusy`, and the worker retries a
SETLKW later without stalling its queue.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from daemon.protocol import fuse

FLOCK = struct.Struct("hhqqi4x")  # struct flock on x86_64/aarch64: type whence start len pid
F_RDLCK, F_WRLCK, F_UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK


class LockBusy(Exception):
    """The lock is held by someone else; SETLK answers EAGAIN, SETLKW waits."""


def _length(start: int, end: int) -> int:
    if end >= fuse.OFFSET_MAX:
        return 0  # to the end of the file, however it grows
    if end < start:
        raise OSError(errno.EINVAL, "lock end before start")
    return end - start + 1


def _check(start: int, kind: int) -> None:
    if start > fuse.OFFSET_MAX:
        raise OSError(errno.EINVAL, "lock start out of range")
    if kind not in (F_RDLCK, F_WRLCK, F_UNLCK):
        raise OSError(errno.EINVAL, f"lock type {kind}")


def check_request(start: int, end: int, kind: int) -> None:
    """The EINVAL checks of a lock request, without taking it."""
    _check(start, kind)
    _length(start, end)


def get_lock(fd: int, start: int, end: int, kind: int) -> bytes:
    """GETLK: the first lock that would conflict, or F_UNLCK."""
    _check(start, kind)
    raw = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                      FLOCK.pack(kind, os.SEEK_SET, start, _length(start, end), 0))
    got_type, _, got_start, got_len, got_pid = FLOCK.unpack(raw)
    if got_type == F_UNLCK:
        return fuse.LK_OUT.pack(start, end, F_UNLCK, 0)
    got_end = fuse.OFFSET_MAX if got_len == 0 else got_start + got_len - 1
    return fuse.LK_OUT.pack(got_start, got_end, got_type, max(got_pid, 0))


def set_lock(fd: int, start: int, end: int, kind: int, flock: bool) -> None:
    """SETLK/SETLKW without waiting: raises LockBusy when someone else holds it."""
    _check(start, kind)
    try:
        if flock:
            op = {F_RDLCK: fcntl.LOCK_SH, F_WRLCK: fcntl.LOCK_EX, F_UNLCK: fcntl.LOCK_UN}[kind]
            fcntl.flock(fd, op | (0 if kind == F_UNLCK else fcntl.LOCK_NB))
        else:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                        FLOCK.pack(kind, os.SEEK_SET, start, _length(start, end), 0))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise LockBusy from e
        raise
