"""Who decides that the tables' lock holder is dead, where /proc cannot be trusted.

Inside the sandbox /proc is the server's own fd directory (daemon/host/sandbox.py), so
``/proc/<tid>/stat`` names whatever fd <tid> is, or nothing. When the lock code read it to
tell a zombie from a live task, every live holder that kept the lock past the 2 ms futex
timeout looked dead there, and its waiter "repaired" the table under it. The holder's
liveness now comes from kill(0) and a pidfd: a live holder keeps the lock, a dead one
(a zombie not yet reaped included) is taken over.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import signal

import posix_ipc
from conftest import unique_name

from shm_table import InodeTable

LOCK_OFFSET = 64  # the header's lock word: the holder's TID
CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18


def _hide_proc() -> None:
    """A private mount namespace whose /proc shows no process at all."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "make / private")
    if libc.mount(b"tmpfs", b"/proc", b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs on /proc")


def test_a_live_holder_keeps_the_lock_where_proc_is_hidden() -> None:
    assert os.geteuid() == 0, "needs root for a private mount namespace"
    name = unique_name("lk")
    table = InodeTable.create(name, 64)
    children: list[int] = []
    try:
        table.insert_root((1, 1, 1), -1, 0o40755)
        holder = os.fork()
        if holder == 0:  # a live task that "holds" the lock and does nothing
            signal.pause()
            os._exit(0)
        children.append(holder)
        shm = posix_ipc.SharedMemory(name)
        mm = mmap.mmap(shm.fd, 4096)
        shm.close_fd()
        mm[LOCK_OFFSET : LOCK_OFFSET + 4] = holder.to_bytes(4, "little")
        r, w = os.pipe()
        waiter = os.fork()
        if waiter == 0:  # takes the lock (an insert) with /proc out of sight
            os.close(r)
            try:
                _hide_proc()
                table.claim_or_insert((5, 5, 5), None, 0, -1, 0o100644)
                os.write(w, b"inserted")
            finally:
                os._exit(0)
        children.append(waiter)
        os.close(w)
        # 300 ms is 150 of the waiter's 2 ms futex timeouts: it must still be waiting
        ready, _, _ = select.select([r], [], [], 0.3)
        assert not ready, "the waiter took the lock from a live holder"
        os.kill(holder, signal.SIGKILL)  # now it is dead (a zombie: not reaped yet)
        ready, _, _ = select.select([r], [], [], 5)
        assert ready and os.read(r, 16) == b"inserted", "a dead holder's lock was not taken over"
        os.close(r)
        mm.close()
        assert table.stats()["lock_takeovers"] == 1
        table.check()
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        table.unlink()
        table.detach()
