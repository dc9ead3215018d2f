"""The supervisor's vring messages and the rule that each running ring has exactly one
worker, mixed into ``supervisor.Supervisor``: SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR/ENABLE
and GET_VRING_BASE, and starting, replacing and stopping the ring's worker process
(workers/pool.py owns the processes themselves)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from daemon.guest.memory import load_u16_at
from daemon.protocol import vhost_user as vu
from daemon.protocol.vhost_user import Message, ProtocolError
from daemon.stats.queue_stats import QueueStats
from workers import control
from workers.control import QueueSetup
from workers.handover.device_state import DeviceState, VringState
from workers.pool import Worker, WorkerPool, close_quietly

log = logging.getLogger("pyvirtiofsd")

MAX_RESTARTS = 20  # per queue, over the daemon's life: past that a crash loop is assumed


class RingHandlers:
    """What the supervisor does for each ring; the state it keeps is ``DeviceState``."""

    state: DeviceState
    pool: WorkerPool
    stats: QueueStats | None
    parked: dict[int, list[list[int]]]
    handing_over: bool
    poll_us: int
    c_path: bool

    # the Supervisor's and its other mixins' (annotations only: nothing here shadows them)
    _vring: Callable[[int], VringState]
    _take_fd: Callable[[Message], int]
    _region_list: Callable[[], list[Any]]
    _check_ring_addresses: Callable[[int, VringState, Any], None]
    take_locks_back_soon: Callable[[], Awaitable[None]]
    take_locks_back: Callable[[], None]

    async def on_set_vring_num(self, msg: Message) -> None:
        index, num = vu.decode_vring_state(msg.payload)
        if num == 0 or num > 32768 or num & (num - 1):
            raise ProtocolError(f"queue size {num} is not a power of two <= 32768")
        self._vring(index).size = num

    async def on_set_vring_addr(self, msg: Message) -> None:
        addr = vu.decode_vring_addr(msg.payload)
        self._vring(addr.index).addr = addr

    async def on_set_vring_base(self, msg: Message) -> None:
        index, base = vu.decode_vring_state(msg.payload)
        self._vring(index).base = base & 0xFFFF

    async def on_get_vring_base(self, msg: Message) -> bytes:
        """Stop the ring and report where to go on from: the worker's last avail index,
        or, when it did not answer (killed) or was lost, the used index in guest memory,
        so the requests it never answered are served again."""
        index, _ = vu.decode_vring_state(msg.payload)
        vring = self._vring(index)
        worker, vring.worker = vring.worker, None  # its exit is expected, not a crash
        kick, vring.kick_fd = vring.kick_fd, -1  # the ring stops: nothing restarts it
        vring.enabled = False
        try:
            base = None
            if worker is not None:
                try:
                    answer = await self.pool.ask(worker, {"op": control.OP_STOP})
                except OSError:  # it must not go on serving a stopped ring
                    await self.pool.kill(worker)
                    answer = None
                if answer is not None:
                    base = int(answer.get("last_avail", vring.base))
                    # its waiting SETLKWs, for the queue's next worker (or the state)
                    self.parked[index] = list(answer.get("parked", []))
            if base is None and (worker is not None or vring.resume):
                assert vring.addr is not None
                base = load_u16_at(self.state.regions, vring.addr.used_user_addr + 2)
            if base is not None:
                vring.base = base & 0xFFFF
            vring.resume = False
        finally:
            close_quietly(kick)
        return vu.encode_vring_state(index, vring.base)

    async def on_set_vring_kick(self, msg: Message) -> None:
        index, has_fd = vu.decode_vring_fd(msg.payload)
        vring = self._vring(index)
        await self.take_locks_back_soon()  # a failed migration's source runs on
        if not has_fd:
            raise ProtocolError(f"queue {index}: polling mode without a kick fd is unsupported")
        fd = self._take_fd(msg)
        old, vring.kick_fd = vring.kick_fd, fd
        worker = vring.worker
        try:
            if worker is not None:
                if await self.pool.ask(worker, {"op": control.OP_KICK, "fd": fd}) is None:
                    self._ensure_worker(index)  # a fresh worker on the new fd
            else:
                if not self.state.protocol_features and not self.state.acked_features & (
                    vu.VHOST_USER_F_PROTOCOL_FEATURES
                ):
                    vring.enabled = True  # without protocol features rings start enabled
                self._ensure_worker(index)
        except BaseException:
            if vring.kick_fd == fd:
                vring.kick_fd = old
                old = fd
            raise
        finally:
            close_quietly(old)

    async def on_set_vring_call(self, msg: Message) -> None:
        index, has_fd = vu.decode_vring_fd(msg.payload)
        vring = self._vring(index)
        fd = self._take_fd(msg) if has_fd else -1
        old, vring.call_fd = vring.call_fd, fd
        worker = vring.worker
        try:
            if worker is not None and await self.pool.ask(
                    worker, {"op": control.OP_CALL, "fd": fd}) is None:
                self._ensure_worker(index)
        except BaseException:
            vring.call_fd, old = old, fd
            raise
        finally:
            close_quietly(old)

    async def on_set_vring_err(self, msg: Message) -> None:
        index, has_fd = vu.decode_vring_fd(msg.payload)
        vring = self._vring(index)
        close_quietly(vring.err_fd)
        vring.err_fd = self._take_fd(msg) if has_fd else -1

    async def on_set_vring_enable(self, msg: Message) -> None:
        index, enable = vu.decode_vring_state(msg.payload)
        vring = self._vring(index)
        vring.enabled = bool(enable)
        worker = vring.worker
        if worker is not None and await self.pool.ask(
                worker, {"op": control.OP_ENABLE, "on": vring.enabled}) is None:
            self._ensure_worker(index)

    # ----- workers ----------------------------------------------------------------
    #
    # A ring has at most one worker: a new one starts only when the ring has none
    # (_ensure_worker), and while a killed predecessor has not exited yet the start waits
    # for that exit (workers/pool.py reaps every worker, whatever ended it).

    def _detach(self, worker: Worker) -> None:
        """The worker is being killed: its ring is free, and the next worker resumes at
        the used index."""
        vring = self.state.vrings.get(worker.queue)
        if vring is not None and vring.worker is worker:
            vring.worker = None
            vring.resume = True

    def _worker_exited(self, worker: Worker, status: int) -> None:
        """One that died on its own is replaced (its ring state is in guest memory), and a
        ring that waited for this exit gets its worker now."""
        index = worker.queue
        vring = self.state.vrings.get(index)
        if vring is None:
            return
        if vring.worker is worker:  # it died on its own
            vring.worker = None
            vring.resume = True
            how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exit code {os.WEXITSTATUS(status)}")
            if vring.restarts >= MAX_RESTARTS:
                log.error("queue %d: worker %d died (%s); %d restarts already, giving up",
                          index, worker.pid, how, vring.restarts)
                return
            vring.restarts += 1
            if self.stats is not None:
                self.stats.note_restart(index)
            log.error("queue %d: worker %d died (%s); restarting it", index, worker.pid, how)
        self._start_logged(index)

    def _start_logged(self, index: int) -> None:
        try:
            self._ensure_worker(index)
        except (ProtocolError, OSError) as e:
            log.error("queue %d: cannot restart its worker: %s", index, e)

    def _ensure_worker(self, index: int) -> None:
        """Start the ring's worker if the ring runs and nobody serves it. A killed
        predecessor that has not exited yet defers the start to its exit."""
        vring = self.state.vrings.get(index)
        if vring is None or vring.worker is not None or vring.kick_fd < 0 or self.handing_over:
            return
        if self.pool.killed_on(index):
            log.warning("queue %d: its killed worker has not exited yet; the new one starts "
                        "when it has", index)
            return
        self.take_locks_back()
        self.start_worker(index, vring, resume=vring.resume)
        vring.resume = False

    def start_worker(self, index: int, vring: VringState, resume: bool = False) -> None:
        if vring.addr is None or vring.size == 0:
            raise ProtocolError(f"queue {index} kicked before its size and addresses were set")
        if not self.state.regions:
            raise ProtocolError(f"queue {index} started without a memory table")
        self._check_ring_addresses(index, vring, self.state.regions)
        features = self.state.acked_features
        setup = QueueSetup(
            index=index, size=vring.size, desc_uva=vring.addr.desc_user_addr,
            avail_uva=vring.addr.avail_user_addr, used_uva=vring.addr.used_user_addr,
            last_avail_idx=vring.base, kick_fd=vring.kick_fd, call_fd=vring.call_fd,
            enabled=vring.enabled, event_idx=bool(features & vu.VIRTIO_RING_F_EVENT_IDX),
            indirect=bool(features & vu.VIRTIO_RING_F_INDIRECT_DESC),
            regions=self._region_list(), resume_from_used=resume,
            poll_us=self.poll_us if index > 0 else 0,  # FORGETs need no low latency
            c_path=self.c_path, parked=self.parked.pop(index, []),
        )
        log = self.state.log_setup()
        setup.log_fd, setup.log_size, setup.log_offset = log["fd"], log["size"], log["offset"]
        vring.worker = self.pool.start(setup)

    async def stop_all_workers(self, why: str) -> None:
        """Kill every worker (a reset or the end of the connection: their rings are
        gone, nothing to ask them), without waiting more than KILL_WAIT in all."""
        workers, kicks = [], []
        for index, vring in self.state.vrings.items():
            worker, vring.worker = vring.worker, None
            kicks.append(vring.kick_fd)
            vring.kick_fd = -1  # the ring is stopped: its worker's exit starts no other
            if worker is not None:
                log.info("queue %d: stopping worker %d (%s)", index, worker.pid, why)
                workers.append(worker)
        await asyncio.gather(*(self.pool.kill(w) for w in workers))
        for fd in kicks:
            close_quietly(fd)

    def kill_workers_now(self) -> None:
        """On the way out: kill and reap every worker there is, current or not."""
        for vring in self.state.vrings.values():
            vring.worker = None
        self.pool.kill_all_now()
