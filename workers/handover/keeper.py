"""The keeper: what lets the sandboxed supervisor be SIGKILLed without the guest noticing.

With ``--sandbox chroot|namespace`` the server's first process does not serve: it clones
the supervisor with ``CLONE_FILES`` (one fd table for both) and only waits. If the
supervisor dies by a signal, its workers die with it (PR_SET_PDEATHSIG), but the fd
table, with the vhost-user connection, guest memory and ring fds, every inode's and open
file's fd and the lock owners' descriptions, lives on in the keeper. The keeper then
does what a live upgrade's server does (daemon/host/handover.py): it sends every fd to
keep, with the device state the supervisor journalled after its last vhost-user message,
to the process outside, which executes the installed code on them; the new server
resumes each ring from its in-flight record. QEMU never sees the connection close.

Lost: a vhost-user message the supervisor was in the middle of when it died (its reply
never comes: QEMU waits for it) and anything it had changed for that message but not
journalled yet.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import time
from typing import NoReturn

import msgpack

from daemon.fs.lock_owners import LockOwners
from daemon.fs.proc_fd import proc_open
from daemon.host import handover, sandbox
from shm_table import HandleTable, InodeTable

log = logging.getLogger("pyvirtiofsd")

WORKERS_WAIT = 3.0  # the dead supervisor's workers die by PDEATHSIG; a task in the
# kernel may take a moment
HEADER = struct.Struct("<QII")  # sequence, length of area 0, length of area 1
AREA = 1 << 20


class StateJournal:
    """The supervisor's device state after each vhost-user message, in a memfd made before
    the keeper is cloned: two areas written in turn, then the sequence number naming the
    complete one (an 8-byte store), so a supervisor killed mid-write leaves the last
    complete state readable."""

    def __init__(self, fd: int = -1) -> None:
        if fd < 0:
            fd = os.memfd_create("pyvirtiofsd-journal", os.MFD_CLOEXEC)
            os.ftruncate(fd, HEADER.size + 2 * AREA)
        self.fd = fd
        self.map = mmap.mmap(self.fd, HEADER.size + 2 * AREA)
        self.seq = 0

    @classmethod
    def from_fd(cls, fd: int) -> StateJournal:
        """The journal a killed service left in systemd's fd store (its sequence goes on)."""
        journal = cls(fd)
        journal.seq = HEADER.unpack_from(journal.map)[0]
        return journal

    def write(self, state: dict) -> None:
        data = msgpack.packb(state)
        if len(data) > AREA:
            log.warning("journal: device state of %d bytes does not fit; not kept",
                        len(data))
            return
        seq = self.seq + 1
        area = seq % 2
        start = HEADER.size + area * AREA
        self.map[start:start + len(data)] = data
        _, len0, len1 = HEADER.unpack_from(self.map)
        lens = [len0, len1]
        lens[area] = len(data)
        struct.pack_into("<II", self.map, 8, *lens)
        struct.pack_into("<Q", self.map, 0, seq)  # last: names the complete area
        self.seq = seq

    def read(self) -> dict | None:
        seq, len0, len1 = HEADER.unpack_from(self.map)
        if not seq:
            return None
        area = seq % 2
        start = HEADER.size + area * AREA
        return msgpack.unpackb(self.map[start:start + (len0, len1)[area]],
                               strict_map_key=False)


def keep(journal: StateJournal, session: mmap.mmap, inodes: InodeTable,
         handles: HandleTable, pid: int, status: int) -> NoReturn:
    """The keeper, once the supervisor it cloned (pid) has exited with ``status``: exit
    with it, or (killed by a signal) hand its fds on."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:  # it exited (a stop, or a live upgrade's handover: 75)
        os._exit(code)
    log.error("supervisor %d killed by signal %d; taking its fds to a new one", pid, -code)
    started = time.monotonic()
    _reap_orphans()
    state = journal.read()
    if state is None or state.get("conn", -1) < 0:
        log.error("keeper: no front-end connected yet; nothing to keep")
        os._exit(1)
    state["session"] = bytes(session[:8])
    state["restart"] = True  # not an upgrade: counted as a supervisor restart
    fds = _fds_of(state, inodes, handles)
    state_fd = handover.write_state(state)
    log.info("keeper: %d fds and the journalled state handed on after %.1f ms", len(fds),
             1000 * (time.monotonic() - started))
    sandbox.hand_over_outside(state_fd, [state_fd, *fds])


def keep_executed(event: str, plan: dict) -> NoReturn:
    """The keeper's new program: the clone and the wait are C (daemon/native/sandbox.c,
    pyvfs_split), which executed this with the killed supervisor's fd table, every fd
    inheritable: ``event`` is "<pid>:<wait status>", ``plan`` what sandbox.Finish
    carried."""
    pid, status = (int(v) for v in event.split(":"))
    journal = StateJournal(plan["journal_fd"])
    session = mmap.mmap(plan["session_fd"], mmap.PAGESIZE)
    inodes = InodeTable.attach(plan["tables"][0])
    handles = HandleTable.attach(plan["tables"][1])
    sandbox.adopt_server_socket(plan["server_sock"])
    keep(journal, session, inodes, handles, pid, status)


def _reap_orphans() -> None:
    """Wait until the dead supervisor's workers are gone (they are ours now)."""
    deadline = time.monotonic() + WORKERS_WAIT
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.005)


def _fds_of(state: dict, inodes: InodeTable, handles: HandleTable) -> list[int]:
    """Every fd the journalled state and the shared tables name."""
    device = state["device"]
    fds = [fd for *_, fd in device["regions"]] + [device["log"][0]]
    for v in device["vrings"].values():
        fds += [v["kick_fd"], v["call_fd"], v["err_fd"]]
    fds += [state["conn"], state["listener"], state["inflight"], state["mount_fd"],
            state.get("pid_fd", -1), state["notify"][0]]
    if state["lock_owners"] >= 0:
        owners = LockOwners(proc_open, memfd=state["lock_owners"])
        fds += [state["lock_owners"], *owners.fds()]
        owners.mem.close()
    fds += [e.fd for e in inodes.iter_entries(dying=True)]
    fds += [h.fd for h in handles.iter_handles(released=True)]
    for table in (inodes, handles):
        for fd in table.take_orphaned_fds():
            os.close(fd)
    out = []
    for fd in sorted({fd for fd in fds if fd >= 0}):
        try:
            os.fstat(fd)
        except OSError:
            continue
        out.append(fd)
    return out
