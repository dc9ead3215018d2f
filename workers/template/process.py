"""The process every worker is cloned from: a copy of the supervisor that stays still.

Why: a clone shares its parent's pages until either writes to one. The supervisor keeps
running after it clones a worker (the rest of the vhost-user set-up, the next worker's
start, control messages), and CPython writes to every object it touches (reference
counts), so each page it touched after a clone became private twice: the supervisor's
copy and that worker's. Measured with ``benchmarks.memory_matrix``: about 2 MB of each
worker's 3.3 MB of PSS. The template is cloned once from the supervisor, when the first
worker starts, then sleeps in ``recv`` and does nothing but clone: the workers share its
pages with it and with each other, and pay only for what they write themselves.

A worker is the template's sibling (CLONE_PARENT): the supervisor's child, reaped through
its pidfd and killed with PDEATHSIG when the supervisor dies, as before. The template
shares the supervisor's fd table (CLONE_FILES), and so do the workers: a ring's fds, the
control socket's and the lock-owner table's are named by number. What a worker needs
besides its ``QueueSetup`` (the file system, the interrupt board, the stats) it takes
from the template's copy of the supervisor's objects, as the supervisor held them when
the template was cloned; state that changes later reaches workers through shared memory
or control messages, as it must for the workers already running.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import os
import select
import signal
import socket
from collections.abc import Callable, Collection
from typing import NoReturn

import msgpack

from daemon.host.process import clone_shared_fds, clone_sibling_bare, name_process
from daemon.native._sys import lib
from workers.control import QueueSetup
from workers.queue_worker import worker_signals

# how long the supervisor waits for the template's answer (it clones at once); then it
# clones the worker itself, still well within the second QEMU waits for its answer
SPAWN_TIMEOUT = 0.5

# in the new worker: serve this ring with this control socket fd and lock-owner mutex fd
StartWorker = Callable[[QueueSetup, int, int], NoReturn]
# in the template, before it clones a worker for this ring: make what every worker uses
Prepare = Callable[[QueueSetup], None]
# in the template: answer one request read from the clone socket; the function given runs
# first in the clone (in its own address space)
Clone = Callable[[bytes, Callable[[], None]], None]
# in the template, for queue 0: serve it here (workers/template/hiprio.py) with this control socket
# fd and lock-owner mutex fd until the ring stops, answering the clone socket's requests
# meanwhile with the Clone given
Host = Callable[[QueueSetup, int, int, socket.socket, Clone], None]


class Template:
    """The supervisor's handle on the template process."""

    def __init__(self, start_worker: StartWorker, prepare: Prepare,
                 freeze: Callable[[], None], host: Host | None = None) -> None:
        """Clone the template; ``freeze`` readies the heap for sharing first (pool.py);
        ``host`` serves queue 0 in the template rather than in a clone."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        supervisor = os.getpid()
        freeze()
        pid = clone_shared_fds()
        if pid == 0:
            try:  # the child must never unwind into the supervisor's code
                ours.detach()  # shared fd table: closing it here would close it for everyone
                _serve(theirs, start_worker, prepare, supervisor, host)
            finally:
                os._exit(1)
        self.pid = pid
        self.reaped = False
        self.sock = ours
        self.peer_fd = theirs.detach()  # the template's end stays open in the shared table

    def spawn(self, setup: QueueSetup, control_fd: int, lock_mutex_fd: int) -> int:
        """Have the template clone a worker; returns its pid (a child of ours). Raises
        OSError when the template cannot (then the caller drops it)."""
        if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:  # killed: reaped just now
            self.reaped = True
            raise OSError(errno.ECHILD, f"worker template {self.pid} was killed")
        self.sock.send(msgpack.packb([dataclasses.astuple(setup), control_fd, lock_mutex_fd]))
        ready, _, _ = select.select([self.sock], [], [], SPAWN_TIMEOUT)
        answer = self.sock.recv(64) if ready else b""
        if not answer:
            raise OSError(errno.ECHILD, f"worker template {self.pid} did not answer")
        pid = msgpack.unpackb(answer)
        if pid < 0:
            raise OSError(-pid, f"worker template: clone: {os.strerror(-pid)}")
        return pid

    def release(self) -> None:
        """Give the template up without killing it, for it serves queue 0 and goes on
        doing so (a live upgrade whose old workers serve on): it clones no more, closes
        its end of the socket, and exits when queue 0 stops, as a worker does. It stays
        our child, reaped as queue 0's worker."""
        self.sock.close()
        self.reaped = True  # not ours to reap any more: the worker's

    def close(self, known: Collection[int] = ()) -> None:
        """Kill and reap the template (its workers live on: they are our children); then
        kill any child of ours not in ``known`` (the current workers): a worker the
        template cloned but had no time to report before it was killed or gave up
        waiting must not serve a ring beside the one the caller starts next."""
        if not self.reaped:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.sock.close()
        try:
            os.close(self.peer_fd)
        except OSError:
            pass
        for pid in our_children() - set(known):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def our_children() -> set[int]:
    """Every child of this process (of any of its threads)."""
    kids: set[int] = set()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:  # no /proc in this sandbox: nothing to find
        return kids
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                kids.update(int(pid) for pid in f.read().split())
        except OSError:
            pass
    return kids


def _nothing() -> None:
    """What the template's clones run in place of the fork hooks below."""


def quiet_fork_hooks() -> None:
    """In the supervisor, before it clones the template: make threading's and logging's
    after-fork hooks do nothing in the processes it clones (the template, and a worker it
    clones itself when the template is gone; the template clones its workers without any
    hooks, ``clone_sibling_bare``). ``PyOS_AfterFork_Child`` runs them in every clone, and
    they walk objects all over the heap (the thread registry, every handler's lock):
    0.45 MB of pages copied into a bare clone. Their work is moot here: the supervisor has
    one thread, which clones only from its own loop, so no lock of theirs can be held at a
    clone and the thread registry names the one thread there is (``get_ident`` is the
    same in the clone). os.register_at_fork offers no way to take a hook back, so the
    functions' code is replaced; the template inherits the replacement."""
    import logging
    import threading

    for hook in (getattr(threading, "_after_fork", None),
                 getattr(logging, "_after_at_fork_child_reinit_locks", None)):
        code = getattr(hook, "__code__", None)
        if code is not None and code.co_argcount == 0 and not code.co_kwonlyargcount:
            hook.__code__ = _nothing.__code__


def _serve(sock: socket.socket, start_worker: StartWorker, prepare: Prepare,
           supervisor: int, host: Host | None = None) -> NoReturn:
    """The template's life: wait for a request, clone a worker (or serve queue 0 here),
    answer its pid."""
    lib.pyvfs_set_pdeathsig(signal.SIGKILL)
    name_process("pyvfs-template")
    worker_signals()  # once here rather than in every worker (each call writes to pages)
    if os.getppid() != supervisor:
        os._exit(1)  # the supervisor died before PDEATHSIG was set

    def clone(data: bytes, in_clone: Callable[[], None]) -> None:
        _answer(sock, data, start_worker, prepare, in_clone=in_clone)

    def serve_queue0(setup: QueueSetup, control_fd: int, lock_mutex_fd: int) -> None:
        assert host is not None
        host(setup, control_fd, lock_mutex_fd, sock, clone)

    while True:
        data = sock.recv(65536)
        if not data:
            os._exit(0)  # the supervisor closed its end
        _answer(sock, data, start_worker, prepare, serve_queue0 if host else None)


def _answer(sock: socket.socket, data: bytes, start_worker: StartWorker, prepare: Prepare,
            serve_queue0: Callable[[QueueSetup, int, int], None] | None = None,
            in_clone: Callable[[], None] | None = None) -> None:
    """One request: clone a worker for the ring and answer its pid, or (``serve_queue0``)
    serve queue 0 in this process until it stops. ``in_clone`` runs first in a clone made
    while queue 0 is served here; a second request for queue 0 then is refused (EBUSY)."""
    fields, control_fd, lock_mutex_fd = msgpack.unpackb(data)
    setup = QueueSetup(*fields)
    if setup.index == 0 and serve_queue0 is not None:
        serve_queue0(setup, control_fd, lock_mutex_fd)
        return
    if setup.index == 0 and in_clone is not None:
        sock.send(msgpack.packb(-errno.EBUSY))
        return
    try:
        prepare(setup)
    except Exception:  # noqa: BLE001 - the worker makes it then, and reports what fails
        pass
    gc.freeze()  # what this loop made stays out of the worker's collections too
    try:
        pid = clone_sibling_bare()  # one thread here: nothing for fork hooks to repair
    except OSError as e:
        sock.send(msgpack.packb(-(e.errno or errno.EAGAIN)))
        return
    if pid == 0:
        try:
            if in_clone is not None:
                in_clone()
            start_worker(setup, control_fd, lock_mutex_fd)
        finally:
            os._exit(1)
    sock.send(msgpack.packb(pid))
