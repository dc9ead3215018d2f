"""The worker processes, as the supervisor sees them: starting one on a ring, asking it
something within a deadline, killing it, and reaping it whatever ended it.

Runs in the supervisor's event loop. Which ring gets a worker, and what a lost worker
means for its ring, is the supervisor's business (it hears of each exit through
``on_exit``); this module only knows processes.

Every worker is reaped through its pidfd (uvloop keeps SIGCHLD to itself), so none is
left a zombie. A worker that died holding pins in the shared tables gives them back
while it is still a zombie, when none of its thread ids can name another task yet.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from daemon.fs import proc_fd
from daemon.fs.passthrough import PassthroughFs
from daemon.host.process import clone_shared_fds
from daemon.stats.queue_stats import QueueStats
from workers import control
from workers.control import QueueSetup
from workers.dispatch import shared_dispatch
from workers.fast_path import FastPathContext
from workers.inflight import InflightRecords
from workers.interrupts import InterruptBoard
from workers.queue_worker import QueueWorker, worker_main  # imported: workers start warm
from workers.template.hiprio import serve_hosted
from workers.template.process import Clone, Template, our_children

log = logging.getLogger("pyvirtiofsd")

# QEMU must hear back within a second whatever a worker does (one asleep in a host system
# call never answers): a worker that takes longer than this to acknowledge a control
# message is killed and, if its ring goes on, replaced
WORKER_REPLY_TIMEOUT = 0.5
KILL_WAIT = 0.2  # how long a caller waits to see a killed worker exit before going on

_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only


def freeze_heap() -> None:
    """Before cloning a worker: collect garbage, then move every object the parent has into
    the garbage collector's permanent generation.  A clone shares the parent's pages until
    either writes to them; a collection that walked these objects would write to every one
    (its GC header) and so copy nearly the whole heap, in the worker and in the supervisor.
    After the first call only objects made since the previous one are collected and frozen,
    so a later worker start does not copy the pages an earlier worker still shares.

    Then give free malloc memory back to the kernel (glibc's malloc_trim): what start-up
    allocated and freed (imports, compiling modules without .pyc files, argument parsing)
    would otherwise stay resident in the supervisor and in every clone (~2 MB)."""
    gc.collect()
    gc.freeze()
    if _malloc_trim is not None:
        _malloc_trim(0)


@dataclass(eq=False)
class Worker:
    pid: int
    control: socket.socket
    peer_fd: int  # the worker's end of the control pair, in the shared fd table
    queue: int
    pidfd: int = -1  # readable when the worker exits (uvloop keeps SIGCHLD to itself)
    lock_mutex_fd: int = -1  # its own description of the lock-owner table's memfd
    exited: asyncio.Future[int] | None = None  # its wait status, once reaped
    killed: bool = False  # SIGKILL sent: it never runs user code again
    hosted: bool = False  # queue 0 served by the template process (workers/template/hiprio.py)
    awaited: asyncio.Future[bytes] | None = None  # the answer an ask() waits for


class WorkerPool:
    """Every worker process not reaped yet, current or not."""

    def __init__(self, fs: PassthroughFs, interrupts: InterruptBoard,
                 stats: QueueStats | None, *,
                 on_exit: Callable[[Worker, int], None],
                 on_kill: Callable[[Worker], None],
                 inflight: InflightRecords | None = None) -> None:
        self.fs = fs
        self.inflight = inflight  # every ring's requests popped and not answered
        self.interrupts = interrupts  # shared with every worker
        self.stats = stats  # per-queue counters; each worker writes its own row
        self.on_exit = on_exit  # after a worker was reaped, with its wait status
        self.on_kill = on_kill  # when a worker is killed: it no longer serves its ring
        self.loop: asyncio.AbstractEventLoop | None = None
        self.workers: set[Worker] = set()
        self.template: Template | None = None  # clones the workers (workers/template/process.py)
        self.supervisor_pid = os.getpid()

    def warm(self) -> None:
        """Clone the template now rather than at the first worker's start: a migration's
        destination, whose guest stays stopped until QEMU hears that its rings started.
        Only once the supervisor's objects are what workers need (the state loaded)."""
        if self.template is None:
            self.supervisor_pid = os.getpid()  # as the template's copy of us will see it
            self.template = Template(self._start_worker, self._prepare, freeze_heap,
                                     self._host)

    def _spawn(self, setup: QueueSetup, theirs: socket.socket, lock_mutex_fd: int) -> int:
        self.warm()
        assert self.template is not None
        try:
            return self.template.spawn(setup, theirs.fileno(), lock_mutex_fd)
        except OSError as e:  # killed by someone: a new template for the next worker
            log.warning("worker template %d: %s; cloning the worker directly",
                        self.template.pid, e)
            self.template.close(known={w.pid for w in self.workers})
            self.template = None
        supervisor_pid = os.getpid()
        freeze_heap()
        pid = clone_shared_fds()
        if pid == 0:
            try:  # the child must never unwind into the supervisor's code
                worker_main(setup, self.fs, theirs, self.interrupts, supervisor_pid,
                            lock_mutex_fd, self.stats, self.inflight)
            finally:
                os._exit(1)
        return pid

    def _prepare(self, setup: QueueSetup) -> None:
        """In the template: what its workers share rather than each making its own."""
        FastPathContext.shared(self.fs, setup.c_path)
        shared_dispatch(self.fs, QueueWorker)

    def _start_worker(self, setup: QueueSetup, control_fd: int, lock_mutex_fd: int) -> NoReturn:
        """In a worker the template cloned: serve the ring (never returns)."""
        worker_main(setup, self.fs, socket.socket(fileno=control_fd), self.interrupts,
                    self.supervisor_pid, lock_mutex_fd, self.stats, self.inflight, signals_set=True)

    def _host(self, setup: QueueSetup, control_fd: int, lock_mutex_fd: int,
              requests: socket.socket, answer: Clone) -> None:
        """In the template: serve queue 0 there until it stops (workers/template/hiprio.py)."""
        serve_hosted(setup, self.fs, control_fd, self.interrupts, lock_mutex_fd, self.stats,
                     self.inflight, requests, answer)

    def _hosting(self) -> Worker | None:
        """Queue 0's worker when the template serves it."""
        t = self.template
        return next((w for w in self.workers if w.hosted and t is not None and w.pid == t.pid),
                    None)

    def close_template(self, keep_workers: bool = False) -> None:
        """Kill the template (a live upgrade: it shares the fd table the program is about
        to leave, and would keep every fd in it open); the next start makes a new one.
        ``keep_workers``: the current workers live on (they serve while the new code
        starts, workers/handover/warm.py); no other child is killed either way."""
        if self.template is not None:
            if keep_workers and self._hosting() is not None:
                self.template.release()  # queue 0's worker: it serves on, cloning no more
            else:
                # it is not giving up on a worker: leave every other child alone (a successor)
                self.template.close(known=our_children())
            self.template = None

    def killed_on(self, queue: int) -> bool:
        """A killed worker of this queue has not exited yet (asleep in the kernel, where a
        system call may still complete): no other may serve the ring before it has."""
        return any(w.queue == queue and w.killed for w in self.workers)

    def start(self, setup: QueueSetup) -> Worker:
        """Start a worker (sharing our fd table) that serves ``setup``'s ring: cloned by
        the template process (workers/template/process.py), or by us if the template is gone."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        owners = self.fs.lock_owners
        lock_mutex_fd = owners.open_mutex() if owners is not None else -1
        proc_fd.fd_directory_fd()  # opened here, once, for every worker's C path
        pid = self._spawn(setup, theirs, lock_mutex_fd)
        peer_fd = theirs.detach()  # the worker's end stays open in the shared table
        ours.setblocking(False)
        worker = Worker(pid, ours, peer_fd, setup.index, os.pidfd_open(pid), lock_mutex_fd,
                        self.loop.create_future(),
                        hosted=self.template is not None and pid == self.template.pid)
        self.workers.add(worker)
        self.loop.add_reader(worker.pidfd, self._reap, worker)
        log.info("queue %d: worker %d started", setup.index, pid)
        return worker

    async def ask(self, worker: Worker, message: dict) -> dict | None:
        """Send a control message and wait for the worker's acknowledgement. None when
        there is none: the worker died, or did not answer within WORKER_REPLY_TIMEOUT
        and was killed; either way it no longer touches its ring, and the caller goes
        on without it. A worker's refusal raises OSError."""
        assert self.loop is not None and worker.exited is not None
        if worker.killed or worker.exited.done():
            return None
        loop, sock = self.loop, worker.control
        answered: asyncio.Future[bytes] = loop.create_future()
        worker.awaited = answered  # a worker that answers and exits: _reap reads it

        def readable() -> None:
            try:
                data = sock.recv(control.MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not answered.done():
                answered.set_result(data)

        try:
            sock.send(control.encode(message))
        except OSError as e:  # its queue is full: it has not read for a long time
            log.warning("queue %d: cannot reach worker %d: %s", worker.queue, worker.pid, e)
        else:
            loop.add_reader(sock.fileno(), readable)
            try:
                await asyncio.wait((answered, worker.exited), timeout=WORKER_REPLY_TIMEOUT,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                if sock.fileno() >= 0:
                    loop.remove_reader(sock.fileno())
            if answered.done() and answered.result():
                answer = control.decode(answered.result())
                if not answer.get("ok"):
                    raise OSError(errno.EIO, f"worker {worker.pid}: {answer.get('error')}")
                if message.get("op") == control.OP_STOP and self._hosting() is worker:
                    self._hosting_ended(worker)  # (a template given up exits instead)
                return answer
            if worker.exited.done() or answered.done():
                return None  # it died (its exit is handled in _reap)
        log.error("queue %d: worker %d did not answer %r within %.1f s; killed it",
                  worker.queue, worker.pid, message.get("op"), WORKER_REPLY_TIMEOUT)
        await self.kill(worker)
        return None

    async def kill(self, worker: Worker) -> None:
        """SIGKILL: from the moment it is sent the worker never runs user code again, so
        its ring is free for another worker (``on_kill`` says so to the supervisor). It
        is reaped when it exits; this waits KILL_WAIT at most for that, for a worker
        asleep in the kernel may take longer."""
        assert worker.exited is not None
        self.on_kill(worker)
        if not worker.killed and not worker.exited.done():
            worker.killed = True
            try:
                signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # exited already: the pidfd reader reaps it
        if not worker.exited.done():
            await asyncio.wait((worker.exited,), timeout=KILL_WAIT)

    def _reap(self, worker: Worker) -> None:
        """The pidfd says the worker exited: give back what it held, reap it, tell the
        supervisor."""
        assert self.loop is not None
        try:
            if os.waitid(os.P_PID, worker.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
                return  # not yet (the pidfd says it exited: this is not expected)
            # a zombie still: none of its TIDs can name another task yet
            for table in (self.fs.inodes, self.fs.handles):
                table.reap_dead_pins()
            _pid, status = os.waitpid(worker.pid, 0)
        except ChildProcessError:
            status = 0  # reaped elsewhere (shutdown)
        self.loop.remove_reader(worker.pidfd)
        self._take_last_answer(worker)
        self._release_fds(worker)
        self.workers.discard(worker)
        if worker.hosted and self.template is not None and self.template.pid == worker.pid:
            # the template died with queue 0: the next start clones a new one
            self.template.reaped = True
            self.template.close(known=our_children())  # (it was cloning nothing)
            self.template = None
        assert worker.exited is not None
        if not worker.exited.done():
            worker.exited.set_result(status)
        # fds a worker owned mid-operation when it died are parked in the tables' headers
        for table in (self.fs.inodes, self.fs.handles):
            for fd in table.take_orphaned_fds():
                close_quietly(fd)
        self.on_exit(worker, status)

    def _hosting_ended(self, worker: Worker) -> None:
        """Queue 0's template stopped serving it and went back to cloning: to everyone
        else, its worker exited (the process lives on, as the template, and is no
        longer watched as a worker)."""
        assert self.loop is not None and worker.exited is not None
        self.loop.remove_reader(worker.pidfd)
        self._release_fds(worker)
        self.workers.discard(worker)
        if not worker.exited.done():
            worker.exited.set_result(0)
        self.on_exit(worker, 0)

    @staticmethod
    def _take_last_answer(worker: Worker) -> None:
        """A worker that answers OP_STOP exits at once: its pidfd may be seen before its
        answer is read, and closing the socket then would lose the answer (with it the
        SETLKWs it handed on). Read it now if an ask() waits for it."""
        awaited, worker.awaited = worker.awaited, None
        if awaited is None or awaited.done() or worker.control.fileno() < 0:
            return
        try:
            data = worker.control.recv(control.MAX_MESSAGE, socket.MSG_DONTWAIT)
        except OSError:
            return
        if data:
            awaited.set_result(data)

    def _release_fds(self, worker: Worker) -> None:
        if worker.control.fileno() >= 0 and self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(worker.control.fileno())  # before the number is reused
        worker.control.close()
        close_quietly(worker.peer_fd)
        close_quietly(worker.pidfd)
        worker.pidfd = -1
        # a worker killed inside the lock-owner table's critical section held its lock
        # on this description: closing it lets the other workers go on
        close_quietly(worker.lock_mutex_fd)

    def kill_all_now(self) -> None:
        """On the way out: kill and reap every worker there is, current or not, and the
        template."""
        if self.template is not None:
            self.template.close(known={w.pid for w in self.workers})
            self.template = None
        for worker in list(self.workers):
            if self.loop is not None and not self.loop.is_closed() and worker.pidfd >= 0:
                self.loop.remove_reader(worker.pidfd)
            try:
                os.kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.workers.discard(worker)


def close_quietly(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
