"""Queue 0, the high-priority queue, served inside the worker template (workers/template/process.py)
rather than by a process of its own.

Why: the guest sends only FORGET, BATCH_FORGET and INTERRUPT there, a trickle that C
answers, yet a process of its own cost a whole worker's private pages (~1.9 MB of PSS
with its page tables). The template sleeps in ``recv`` anyway and has the file system's
objects, so when the supervisor asks it for queue 0's worker it serves the ring itself
(``HostedQueue``) and answers with its own pid; to the supervisor that pid is queue 0's
worker (control messages, kill, reaping through its pidfd), and it is named so
(``HOSTING_NAME``).

The template must still clone a worker promptly however the guest uses queue 0: its
clone socket is in the serve loop's epoll, which pyvfs_serve looks at between chains at
least every 10 ms, and a clone request is answered between two requests. A template that
does not answer within SPAWN_TIMEOUT is killed as before (then queue 0 is restarted in a
new template, as a killed worker would be).

What a worker does at its end differs: OP_STOP ends the hosting, not the process (the
template goes back to cloning; the supervisor counts queue 0's worker as exited on the
answer, workers/pool.py). Once the supervisor has closed the clone socket (a live
upgrade that leaves the old workers serving while the new code starts), the template
exits at OP_STOP as any worker does. A worker cloned while the template serves queue 0
unmaps that queue's guest memory in its own address space; the template's cache of
O_PATH fds is emptied before each clone, for the clone would otherwise believe it owns
fds the template closes.
"""

from __future__ import annotations

import logging
import os
import select
import socket
from typing import NoReturn

import msgpack

from daemon.fs.passthrough import PassthroughFs
from daemon.host.process import name_process
from daemon.stats.queue_stats import QueueStats
from workers.control import QueueSetup
from workers.inflight import InflightRecords
from workers.interrupts import InterruptBoard
from workers.queue_worker import QueueWorker
from workers.template.process import Clone

log = logging.getLogger("pyvirtiofsd.worker")

HOSTING_NAME = "pyvfs-tmpl+q0"  # the template while it serves queue 0 (15 bytes at most)
IDLE_NAME = "pyvfs-template"  # workers/template/process.py names it so at its start

class StopHosting(Exception):
    """OP_STOP answered: back to the template's loop."""


class HostedQueue(QueueWorker):
    """Queue 0's worker as the template runs it: the serve loop also watches the clone
    socket."""

    def __init__(self, setup: QueueSetup, fs: PassthroughFs, control_sock: socket.socket,
                 interrupts: InterruptBoard, inflight: InflightRecords | None,
                 requests: socket.socket, answer: Clone) -> None:
        super().__init__(setup, fs, control_sock, interrupts, inflight)
        self.requests: socket.socket | None = requests
        self.answer = answer

    def watch(self, ep: select.epoll) -> None:
        if self.requests is not None:
            ep.register(self.requests.fileno(), select.EPOLLIN)

    def handle_control(self) -> None:
        """A clone request or a control message (or both) is waiting."""
        watched = [self.control] if self.requests is None else [self.requests, self.control]
        ready, _, _ = select.select(watched, [], [], 0)
        if self.requests is not None and self.requests in ready:
            self.clone_request()
        if self.control in ready:
            super().handle_control()

    def clone_request(self) -> None:
        assert self.requests is not None
        data = self.requests.recv(65536)
        if not data:  # the supervisor gave up this template: serve queue 0 until its stop
            self.epoll.unregister(self.requests.fileno())
            self.requests.close()  # the supervisor forgot this number: ours to close
            self.requests = None
            return
        self.fs.fd_cache.clear()  # the clone must not own our cached fds as well
        self.answer(data, self.unmap)

    def unmap(self) -> None:
        """In a worker cloned meanwhile: let go of this queue's guest memory (its own
        mappings are its own; ours would pin a memory table it never uses)."""
        self.mem.close()
        if self.dirty_log is not None:
            self.dirty_log.close()

    def stopped(self) -> NoReturn:
        if self.requests is None:
            os._exit(0)  # nobody to clone for any more: end as any worker does
        self.control.detach()  # the supervisor closes its number once it has the answer
        raise StopHosting


def serve_hosted(setup: QueueSetup, fs: PassthroughFs, control_fd: int,
                 interrupts: InterruptBoard, lock_mutex_fd: int, stats: QueueStats | None,
                 inflight: InflightRecords | None, requests: socket.socket,
                 answer: Clone) -> None:
    """In the template: answer the supervisor's request for queue 0's worker with our pid,
    serve the ring until OP_STOP, then return (to cloning); never when the ring cannot be
    served (the process exits, so the supervisor sees its worker die, as from a clone)."""
    name_process(HOSTING_NAME)
    control_sock = socket.socket(fileno=control_fd)
    try:
        if fs.lock_owners is not None:
            fs.lock_owners.mutex_fd = lock_mutex_fd
        if stats is not None:
            stats.attach_worker(setup.index)
        hosted = HostedQueue(setup, fs, control_sock, interrupts, inflight, requests, answer)
    except BaseException:  # noqa: BLE001 - reported as a dead worker, as a clone's would be
        log.exception("queue %d in the template failed to start", setup.index)
        requests.send(msgpack.packb(os.getpid()))
        os._exit(1)
    requests.send(msgpack.packb(os.getpid()))
    try:
        hosted.run()
    except StopHosting:
        pass
    except BaseException:  # noqa: BLE001 - never unwind into the template's loop
        log.exception("queue %d in the template failed", setup.index)
        os._exit(1)
    hosted.unmap()
    hosted.handlers = {}  # its bound methods: a cycle the frozen heap would keep
    name_process(IDLE_NAME)

