"""The guest's host locks in the device state: POSIX record locks (an OFD description per
guest lock owner, ``daemon/fs/lock_owners.py``) and flock()s (on the open file of an fh).

The source reads what each description holds from its fdinfo (the kernel lists there the
OFD and flock locks a description owns, with inclusive ranges, as FUSE's lk_in has them),
puts it in the state and *lets go* of the locks, so that a destination on the same host
can take them; the destination takes them again, non-blocking, before its
CHECK_DEVICE_STATE answers. When the migration fails, QEMU starts the source's rings
again and the source takes its locks back before any worker runs (waiting up to
``RETAKE_GRACE_S`` for a destination that had loaded the state to exit and let go). A
host process sees the locks held all along but for that handover window.

A lock that cannot be taken (someone took it in the window): on the destination
``--migration-on-error abort`` fails the check (after letting go of every lock it took);
``guest-error`` and the source's retake leave the lock out and make its holder fail
with EIO: the fh (every request but RELEASE) for a flock, the lock owner's lock requests on
that inode (until it closes the file) for POSIX locks, so the guest never believes in a
lock nobody holds without hearing of it.

In the state (``locks``): ``posix``: [nodeid, owner, guest pid, access mode of the
description, broken, [[start, end, type], ...]]; ``flock``: [fh, type]; ``broken_fhs``:
[fh, ...] (fhs that lost a lock in an earlier migration stay broken).
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from daemon.fs import locks
from daemon.fs.passthrough import PassthroughFs
from daemon.fs.proc_fd import proc_open, read_fdinfo
from daemon.protocol import fuse

log = logging.getLogger("pyvirtiofsd.migration")

_TYPES = {"READ": locks.F_RDLCK, "WRITE": locks.F_WRLCK}
RETAKE_GRACE_S = 2.0


def held_by(fd: int, kind: str) -> list[list[int]]:
    """[[start, end, type]] of the ``kind`` ("OFDLCK" or "FLOCK") locks the description
    ``fd`` holds, from its fdinfo (end inclusive, ``fuse.OFFSET_MAX`` for EOF)."""
    ranges = []
    for line in read_fdinfo(fd).splitlines():
        if not line.startswith("lock:"):
            continue
        words = line.split()
        if kind not in words or "->" in words:  # "->": a waiter, not a lock held
            continue
        lock_type = next((_TYPES[w] for w in words if w in _TYPES), None)
        if lock_type is None:
            continue
        start, end = words[-2], words[-1]
        ranges.append([int(start), fuse.OFFSET_MAX if end == "EOF" else int(end), lock_type])
    return ranges


@dataclass
class HeldLocks:
    """What the source let go of at the switch-over, to take back if the migration fails."""

    posix: list[list[Any]] = field(default_factory=list)
    flock: list[list[int]] = field(default_factory=list)
    broken_fhs: list[int] = field(default_factory=list)

    def to_state(self) -> dict[str, Any]:
        return {"posix": self.posix, "flock": self.flock, "broken_fhs": self.broken_fhs}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> HeldLocks:
        state = state or {}
        return cls([list(p) for p in state.get("posix", [])],
                   [[int(fh), int(t)] for fh, t in state.get("flock", [])],
                   [int(fh) for fh in state.get("broken_fhs", [])])


def collect(fs: PassthroughFs) -> HeldLocks:
    """Every lock the guest holds through ``fs`` (its workers stopped)."""
    held = HeldLocks()
    if fs.lock_owners is not None:
        for nodeid, owner, fd, pid, broken in fs.lock_owners.held():
            ranges = [] if broken else held_by(fd, "OFDLCK")
            if ranges or broken:  # an owner holding nothing is made again on demand
                mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
                held.posix.append([nodeid, owner, pid, mode, broken, ranges])
    for handle in fs.handles.iter_handles():
        if handle.broken:
            held.broken_fhs.append(handle.fh)
        elif fs.config.flock:
            held.flock.extend([handle.fh, t] for _s, _e, t in held_by(handle.fd, "FLOCK"))
    return held


def _owner_fd(fs: PassthroughFs, nodeid: int, owner: int) -> int:
    assert fs.lock_owners is not None
    fd = fs.lock_owners.use(nodeid, owner, None)
    if fd >= 0:
        fs.lock_owners.done(nodeid, owner, fd)  # no request runs: the fd stays
    return fd


def _handle_fd(fs: PassthroughFs, fh: int) -> int:
    entry = fs.handles.get(fh)
    return -1 if entry is None else entry.fd


def hand_over(fs: PassthroughFs, held: HeldLocks) -> None:
    """The source lets go of ``held`` (the descriptions stay, to take them back)."""
    for nodeid, owner, _pid, _mode, broken, _ranges in held.posix:
        fd = -1 if broken else _owner_fd(fs, nodeid, owner)
        if fd >= 0:
            locks.set_lock(fd, 0, fuse.OFFSET_MAX, locks.F_UNLCK, False)
    for fh, _type in held.flock:
        fd = _handle_fd(fs, fh)
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_UN)


def take_back(fs: PassthroughFs, held: HeldLocks) -> HeldLocks:
    """The migration failed: the source takes its locks again. Returns those it could
    not take (yet: a destination that loaded the state holds them until it exits)."""
    left = HeldLocks()
    for entry in held.posix:
        nodeid, owner, _pid, _mode, broken, ranges = entry
        fd = -1 if broken else _owner_fd(fs, nodeid, owner)
        if fd >= 0 and not _take_ranges(fd, ranges):
            left.posix.append(entry)
    for fh, lock_type in held.flock:
        fd = _handle_fd(fs, fh)
        if fd >= 0 and not _take_flock(fd, lock_type):
            left.flock.append([fh, lock_type])
    return left


def give_up(fs: PassthroughFs, left: HeldLocks) -> None:
    """Locks the source could not take back: their holders fail with EIO (logged)."""
    for nodeid, owner, _pid, _mode, _broken, _ranges in left.posix:
        log.error("migration failed: the POSIX locks of owner %#x on inode %d were taken by "
                  "someone else meanwhile; its lock requests get EIO", owner, nodeid)
        assert fs.lock_owners is not None
        fs.lock_owners.set_broken(nodeid, owner)
    for fh, _lock_type in left.flock:
        log.error("migration failed: the flock() of fh %#x was taken by someone else "
                  "meanwhile; the guest gets EIO for that file", fh)
        fs.handles.set_broken(fh)


def _take_ranges(fd: int, ranges: list[list[int]]) -> bool:
    """All of ``ranges`` on the description ``fd``, or none (False)."""
    try:
        for start, end, lock_type in ranges:
            locks.set_lock(fd, int(start), int(end), int(lock_type), False)
    except (locks.LockBusy, OSError):
        locks.set_lock(fd, 0, fuse.OFFSET_MAX, locks.F_UNLCK, False)
        return False
    return True


def _take_flock(fd: int, lock_type: int) -> bool:
    try:
        locks.set_lock(fd, 0, fuse.OFFSET_MAX, lock_type, True)
    except (locks.LockBusy, OSError):
        return False
    return True


def restore(fs: PassthroughFs, held: HeldLocks, inode_fds: dict[int, int],
            abort: bool) -> list[str]:
    """The destination takes ``held`` (``inode_fds``: an O_PATH fd per nodeid restored).
    Returns what it could not take (then broken: EIO), or with ``abort`` lets go of all it
    took and raises OSError."""
    taken: list[tuple[int, bool]] = []  # (fd, flock?) to let go of if this fails
    failed: list[str] = []
    try:
        for fh in held.broken_fhs:
            fs.handles.set_broken(fh)
        for nodeid, owner, pid, mode, broken, ranges in held.posix:
            inode_fd = inode_fds.get(int(nodeid))
            if inode_fd is None or fs.lock_owners is None:
                if not broken:
                    failed.append(f"POSIX locks of owner {owner:#x} on inode {nodeid}: "
                                  + ("inode lost" if inode_fd is None else "--posix-lock off"))
                continue
            fd = proc_open(inode_fd, int(mode) & os.O_ACCMODE)
            ok = broken or _take_ranges(fd, ranges)
            fs.lock_owners.adopt(int(nodeid), int(owner), fd, int(pid), broken=not ok)
            if ok:
                taken.append((fd, False))
            elif not broken:
                failed.append(f"POSIX locks of owner {owner:#x} on inode {nodeid}: held by "
                              "someone else")
        for fh, lock_type in held.flock:
            fd = _handle_fd(fs, fh)
            if fd >= 0 and fs.config.flock and _take_flock(fd, lock_type):
                taken.append((fd, True))
                continue
            fs.handles.set_broken(fh)
            failed.append(f"flock() of fh {fh:#x}: "
                          + ("held by someone else" if fd >= 0 else "file not re-opened"))
        if failed and abort:
            raise OSError(f"locks not taken: {'; '.join(failed[:5])}")
    except BaseException:
        for fd, is_flock in taken:
            if is_flock:
                fcntl.flock(fd, fcntl.LOCK_UN)
            else:
                locks.set_lock(fd, 0, fuse.OFFSET_MAX, locks.F_UNLCK, False)
        raise
    return failed
