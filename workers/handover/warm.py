"""A live upgrade whose workers serve while the new code starts (``--sandbox none``).

Executing the installed code costs its Python start-up (imports, cffi modules: about
150-200 ms on a loaded machine). Stopping the workers first made that a stall the guest
saw. Instead the old supervisor leaves its workers serving and executes the new code at
once; the workers share a fd table (CLONE_FILES) that ``execve`` unshares, so they go on
in the old table while the new program gets a copy of it. Only once the new program has
imported everything and parsed its options does it stop the old workers (their control
sockets and pids are in the handed-over state; they are still our children) and take
the fd table's final contents: a holder process, cloned into the old table before the
exec (``start_holder``), sends every fd a guest depends on as they are now (inodes
looked up, files opened or released while the new program started) with their numbers;
the new program puts them back at those numbers and closes the copies of fds the workers
closed meanwhile. Then the new workers resume each ring from its in-flight record, as in
any live upgrade. The stall is stopping the workers, the fds' transfer and starting the
new workers: no interpreter start-up.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from daemon.fs import proc_fd
from daemon.host import handover
from daemon.host.process import clone_shared_fds
from workers import control

log = logging.getLogger("pyvirtiofsd")

STOP_WAIT = 5.0  # an old worker that has not stopped by then is killed
HOLDER_WAIT = 5.0


def start_holder(fds_now: Callable[[], list[int]]) -> tuple[int, int]:
    """Clone a process into our fd table that, when the new program asks (after the old
    workers stopped), sends it ``fds_now()`` computed then, and exits. Returns its pid
    and our end of the socket pair's fd (inheritable: the new program takes it)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = clone_shared_fds()
    if pid == 0:
        code = 1
        try:  # (closing anything here would close it for the supervisor too)
            theirs.settimeout(HOLDER_WAIT + STOP_WAIT + 60)  # the new program died
            if theirs.recv(16) == b"go":
                handover.send_fds(theirs, fds_now())
                code = 0
        except BaseException:  # noqa: BLE001 - never unwind into the supervisor's code
            pass
        os._exit(code)
    theirs.detach()  # the holder's end (close-on-exec: the new program has none)
    ours.set_inheritable(True)
    return pid, ours.detach()


def reopen_through(holder_pid: int) -> None:
    """The workers' C path reopens an inode's fd by its number under a directory fd of
    /proc/<supervisor>/fd (daemon/fs/proc_fd.py): once the supervisor has executed the
    new code, that names the new program's fd table, not the one the workers use, and a
    number reused there since would open another file. Put the holder's fd directory
    (which stays in the workers' table) at the same number, for every worker at once."""
    number = proc_fd.fd_directory_fd()
    if number < 0 or proc_fd.PROC_DIR_FD >= 0:
        return  # the path /proc/self/fd (each worker's own table), or a sandbox's
    holder_dir = os.open(f"/proc/{holder_pid}/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    os.dup2(holder_dir, number, inheritable=False)
    os.close(holder_dir)


def stop_holder(pid: int) -> None:
    """The exec failed: the holder is not needed (the old code goes on serving)."""
    if pid > 0:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def take_over(resumed: dict) -> None:
    """In the new program, before anything opens an fd: stop the old workers, take the
    old fd table's final contents at their numbers, close what the workers closed."""
    started = time.monotonic()
    # the copies this program has now (a worker may have closed one of the listed fds
    # before the exec: that number is free here, and a received fd may land on it)
    inherited = [fd for fd in resumed["kept"] if _is_open(fd)]
    stopped = _stop_old_workers(resumed["old_workers"])
    holder_pid, holder_fd = resumed["fd_holder"]
    sock = socket.socket(fileno=holder_fd)
    received: dict[int, int] = {}
    try:
        sock.send(b"go")
        sock.setblocking(False)
        deadline = time.monotonic() + HOLDER_WAIT
        while not handover.receive_fds(sock, received):
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError("the fd holder sent nothing in time")
            select.select([sock], [], [], left)
    finally:
        sock.close()
        _reap(holder_pid, HOLDER_WAIT)
    for fd in inherited:  # copies of fds the workers closed since
        if fd not in received:
            os.close(fd)
    handover.place(received)
    resumed["stalled_since"] = started  # the rings wait from here to the new workers
    log.info("live upgrade: %d old workers stopped, %d fds taken over in %.1f ms "
             "(%.1f ms after SIGHUP)", stopped, len(received),
             1000 * (time.monotonic() - started),
             1000 * (time.monotonic() - resumed.get("requested_at", started)))


def _stop_old_workers(workers: list[list[int]]) -> int:
    """OP_STOP to each (between two requests: parked SETLKWs stay in the in-flight
    record), then reap; one that does not answer is killed."""
    socks = []
    for pid, control_fd, _queue in workers:
        sock = socket.socket(fileno=control_fd)
        try:
            sock.send(control.encode({"op": control.OP_STOP}))
        except OSError:
            pass
        socks.append((pid, sock))
    deadline = time.monotonic() + STOP_WAIT
    for pid, sock in socks:
        left = max(0.0, deadline - time.monotonic())
        if select.select([sock], [], [], left)[0]:
            try:
                sock.recv(control.MAX_MESSAGE)
            except OSError:
                pass
        sock.close()
        _reap(pid, max(0.0, deadline - time.monotonic()))
    return len(socks)


def _reap(pid: int, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() >= deadline:
            log.error("live upgrade: old process %d did not exit; killed it", pid)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.001)


def encode_workers(workers: list) -> list[list[int]]:
    """The old workers as the new program reaches them (pid, control fd, queue)."""
    return [[w.pid, w.control.fileno(), w.queue] for w in workers]



def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
