"""A restarted service resumes from systemd's fd store (daemon/host/fd_store.py).

The supervisor keeps the store equal to what its state journal names after every
vhost-user message (workers/handover/live_upgrade.py ``journal``): the journal memfd, the
vhost-user connection and listener, guest memory and ring fds, the in-flight memfd, the
mount fd, the lock owners' memfd and the FUSE session page. At the next start (``kill
-9`` of the main process, the watchdog, ``systemctl restart``) systemd passes them back
in ``LISTEN_FDS``/``LISTEN_FDNAMES``; ``take`` puts each at the number the journal knows
it by and re-opens what the store does not hold: each inode of the shared tables by its
file handle (else by its parent's fd and its name), each open file through its inode
with its flags, at the numbers the tables name. From there the start is the keeper's
restart (workers/handover/keeper.py): the same device state, the connection taken
without accept, the rings resumed from their in-flight records.

Lost: an inode that cannot be found again (removed meanwhile) keeps its nodeid without
an fd (the guest gets EBADF-turned-EIO for it and its open files), and every lock: locks
belong to open file descriptions, which died with the old processes (logged).
"""

from __future__ import annotations

import logging
import os

import posix_ipc

from daemon.fs.fd_cache import open_by_handle
from daemon.fs.lock_owners import LockOwners
from daemon.fs.ops.base import O_PATH_FLAGS
from daemon.fs.proc_fd import proc_open
from daemon.host import fd_store
from shm_table import HandleTable, InodeTable
from workers.handover.keeper import StateJournal

log = logging.getLogger("pyvirtiofsd")

NOT_REOPENED = os.O_CREAT | os.O_EXCL | os.O_TRUNC


def take(environ: dict[str, str] | os._Environ[str], shared_dir: str) -> dict | None:
    """The journalled state with its fds back at their numbers, or None when systemd
    passed none of ours (a first start)."""
    passed = fd_store.passed(environ, os.getpid())
    if not passed:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    received = {int(name[len(fd_store.PREFIX):]): fd for name, fd in passed.items()}
    journal_fd = next((fd for fd in received.values() if _is_journal(fd)), -1)
    state = StateJournal.from_fd(journal_fd).read() if journal_fd >= 0 else None
    if state is None or state.get("conn", -1) not in received:
        log.warning("fd store: %d fds passed but no connected front-end's state; "
                    "starting afresh", len(received))
        for fd in received.values():
            os.close(fd)
        return None
    _place(received)
    session = state.pop("session_fd", -1)
    if session >= 0:
        state["session"] = os.pread(session, 8, 0)
    # the killed daemon's info segment (its pid's): this one makes its own
    old_info = state["tables"][0].removesuffix("-inodes") + "-info"
    try:
        posix_ipc.unlink_shared_memory(old_info)
    except posix_ipc.ExistentialError:
        pass
    inodes = InodeTable.attach(state["tables"][0])
    handles = HandleTable.attach(state["tables"][1])
    found, passing, lost = _reopen_inodes(inodes, state["mount_fd"], shared_dir)
    files = _reopen_files(handles, found)
    for fd in passing:
        os.close(fd)
    owners_fd = state.get("lock_owners", -1)
    if owners_fd >= 0:  # its descriptions died: a fresh table (the numbers are others now)
        owners = LockOwners(proc_open, memfd=owners_fd)
        held = len(owners.fds())
        owners.mem.close()
        os.close(owners_fd)
        state["lock_owners"] = -1
        if held:
            log.warning("fd store: the locks of %d lock owners are lost (they belonged to "
                        "open file descriptions that died with the old processes)", held)
    log.info("fd store: resumed from %d stored fds; %d inodes and %d open files "
             "re-opened, %d inodes lost", len(received), len(found) - len(passing), files,
             lost)
    state.update(restart=True, from_fd_store=True, pid_fd=-1, fd_store_names=sorted(passed),
                 notify=[-1, state["notify"][1]])
    return state


def _is_journal(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "/memfd:pyvirtiofsd-journal (deleted)"
    except OSError:
        return False


def _place(received: dict[int, int]) -> None:
    from daemon.host import handover

    handover.place(received)
    for number in received:
        os.set_inheritable(number, False)


def _reopen_inodes(inodes: InodeTable, mount_fd: int,
                   shared_dir: str) -> tuple[dict[int, int], list[int], int]:
    """Each inode's fd re-opened at the number the table names (an inode the table keeps
    by file handle only gets a passing fd, for its open files and children); {nodeid:
    fd}, the passing fds, how many were lost."""
    found: dict[int, int] = {}
    passing: list[int] = []
    lost = 0
    for e in sorted(inodes.iter_entries(dying=True), key=lambda e: e.nodeid):
        fd = -1
        try:
            if e.nodeid == 1:
                fd = os.open(shared_dir, O_PATH_FLAGS)
            elif e.handle:
                fd = open_by_handle(mount_fd, e.handle, e.handle_type)
            elif e.parent in found:
                fd = os.open(e.name, O_PATH_FLAGS, dir_fd=found[e.parent])
        except OSError as err:
            log.warning("fd store: inode %d (%r) not found again: %s", e.nodeid, e.name,
                        err.strerror or err)
        if fd < 0:
            lost += e.fd >= 0
            continue
        if os.fstat(fd).st_ino != e.ids.ino:
            log.warning("fd store: inode %d (%r) is another file now; lost", e.nodeid,
                        e.name)
            os.close(fd)
            lost += 1
            continue
        if e.fd < 0:
            passing.append(fd)
            found[e.nodeid] = fd
            continue
        if fd != e.fd:
            os.dup2(fd, e.fd, inheritable=False)
            os.close(fd)
        found[e.nodeid] = e.fd
    return found, passing, lost


def _reopen_files(handles: HandleTable, inodes: dict[int, int]) -> int:
    """Each open file re-opened through its inode with its flags, at its number."""
    count = 0
    for h in handles.iter_handles(released=True):
        if h.fd < 0 or h.nodeid not in inodes:
            continue
        try:
            fd = os.open(f"/proc/self/fd/{inodes[h.nodeid]}",
                         (h.flags & ~NOT_REOPENED) | os.O_CLOEXEC)
        except OSError as err:
            log.warning("fd store: open file %d of inode %d not re-opened: %s", h.fh,
                        h.nodeid, err.strerror or err)
            continue
        if fd != h.fd:
            os.dup2(fd, h.fd, inheritable=False)
            os.close(fd)
        count += 1
    return count

