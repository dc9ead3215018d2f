"""The supervisor's live-migration messages (vhost-user), mixed into
``supervisor.Supervisor``: the dirty log the workers mark (SET_LOG_BASE, SET_LOG_FD,
VHOST_F_LOG_ALL; the paths collected while it is on) and the device state
(SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE) with what the stopped workers handed on. What
the state holds and how it is found again is ``daemon/fs/migration/``; docs/migration.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from daemon.fs import migration
from daemon.fs.migration import MigrationOptions
from daemon.fs.passthrough import PassthroughFs
from daemon.protocol import vhost_user as vu
from daemon.protocol.vhost_user import Message, ProtocolError
from workers import control
from workers.pool import WorkerPool, close_quietly

log = logging.getLogger("pyvirtiofsd")


class Device(Protocol):
    """What these handlers use of the supervisor's ``DeviceState``."""

    vrings: dict[int, Any]
    log_fd: int
    log_size: int
    log_offset: int

    @property
    def logging(self) -> bool: ...

    def log_setup(self) -> dict[str, int]: ...


class DirtyLogHandlers:
    """SET_LOG_BASE and SET_LOG_FD, and VHOST_F_LOG_ALL: while the front-end migrates the
    guest's memory, every worker marks each guest page it writes (reply payloads, used
    ring entries and index, avail_event) in the front-end's dirty log, a bit per 4 KiB
    page that QEMU reads to send those pages again (daemon/native/ring.c)."""

    state: Device
    fs: PassthroughFs
    migration: MigrationOptions
    _tell_workers: Callable[[dict], Awaitable[list[OSError]]]
    _path_collector: migration.PathCollector | None  # find-paths: paths since logging
    _collecting: asyncio.Future[None] | None

    async def on_set_log_base(self, msg: Message) -> bytes:
        """Take the new log (LOG_SHMFD: a shared-memory fd), switch the workers to it,
        then close the old one; the front-end waits for this reply."""
        size, offset = vu.decode_log(msg.payload)
        if len(msg.fds) != 1:
            raise ProtocolError(f"SET_LOG_BASE carried {len(msg.fds)} fds, expected 1 "
                                "(only LOG_SHMFD is supported)")
        fd = msg.fds[0]
        if size == 0 or os.fstat(fd).st_size < offset + size:
            raise ProtocolError(f"dirty log of {size} bytes at {offset} does not fit its fd")
        state = self.state
        old = state.log_fd, state.log_size, state.log_offset
        state.log_fd, state.log_size, state.log_offset = fd, size, offset
        msg.fds = []  # taken
        refused = await self._tell_workers({"op": control.OP_LOG, **state.log_setup()})
        if refused:
            state.log_fd, state.log_size, state.log_offset = old
            await self._tell_workers({"op": control.OP_LOG, **state.log_setup()})
            close_quietly(fd)
            raise refused[0]
        close_quietly(old[0])
        return vu.U64.pack(0)

    async def on_set_log_fd(self, msg: Message) -> None:
        """An eventfd to signal log changes on; the log is shared memory, so unused."""
        return None

    async def log_all_changed(self) -> None:
        """VHOST_F_LOG_ALL was set or cleared: workers start or stop logging before the
        front-end hears back (it waits for SET_FEATURES' reply when enabling)."""
        refused = await self._tell_workers({"op": control.OP_LOG, **self.state.log_setup()})
        if refused:
            raise refused[0]
        log.info("migration: dirty-page logging %s",
                 "started" if self.state.logging else "stopped")
        self._collect_paths(self.state.logging)

    def _collect_paths(self, start: bool) -> None:
        """find-paths: collect the inodes' paths while the guest still runs (as virtiofsd
        does when logging starts), for the switch-over to re-check only what changed
        (daemon/fs/migration/paths.py). A collection is checked whenever it is used, so
        one kept after logging stopped stays usable, only slower."""
        task = self._collecting
        if task is not None and not task.done():
            task.cancel()
        self._collecting = None
        if not start or self.migration.mode != "find-paths" or self.migration.confirm_paths:
            if start:
                self._path_collector = None
            return
        collector = migration.PathCollector(self.fs)
        self._path_collector = collector

        async def collect() -> None:
            try:
                await collector.collect()
            except OSError as e:
                log.warning("migration: collecting paths failed (%s); the switch-over reads "
                            "them all", e)
        self._collecting = asyncio.ensure_future(collect())


TRANSFER_SAVE, TRANSFER_LOAD = 0, 1  # SET_DEVICE_STATE_FD directions
PHASE_STOPPED = 0
NO_REPLY_FD = 1 << 8  # SET_DEVICE_STATE_FD's reply: the back-end returns no fd of its own


class DeviceStateHandlers:
    """SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE (vhost-user DEVICE_STATE), as QEMU 8.2+
    drives them for vhost-user-fs: with every ring stopped (GET_VRING_BASE stopped its
    worker), the source writes the device state (daemon/fs/migration/) into the pipe the
    front-end sent, the destination reads it until EOF and re-creates its tables. The
    front-end reads or writes the pipe only after the reply, so the transfer runs on this
    loop (non-blocking, no threads: seccomp allows none) while later messages are served;
    CHECK_DEVICE_STATE waits for it and reports how it went."""

    state: Device
    fs: PassthroughFs
    pool: WorkerPool
    migration: MigrationOptions
    _transfer: asyncio.Future[None] | None
    _handed_over: migration.HeldLocks | None  # the source's locks, while in the state
    parked: dict[int, list[list[int]]]  # queue -> SETLKWs its stopped worker had parked

    async def on_set_device_state_fd(self, msg: Message) -> bytes:
        if len(msg.payload) < vu.DEVICE_STATE.size:
            raise ProtocolError("SET_DEVICE_STATE_FD: short payload")
        direction, phase = vu.DEVICE_STATE.unpack_from(msg.payload)
        if len(msg.fds) != 1:
            raise ProtocolError(f"SET_DEVICE_STATE_FD carried {len(msg.fds)} fds, expected 1")
        if phase != PHASE_STOPPED:
            raise ProtocolError(f"device state transfer in phase {phase}: only the stopped "
                                "phase (0) is supported")
        running = [i for i, v in self.state.vrings.items() if v.worker is not None]
        if running:
            raise ProtocolError(f"device state transfer while queues {running} run")
        if self._transfer is not None and not self._transfer.done():
            raise ProtocolError("a device state transfer is under way already")
        fd = msg.fds.pop()
        os.set_blocking(fd, False)
        if direction == TRANSFER_SAVE:
            self.take_locks_back()  # a second save after a failed one
            try:
                blob, self._handed_over = migration.hand_over_state(
                    self.fs, self.migration, self._path_collector, self.parked)
            except BaseException:
                close_quietly(fd)
                raise
            log.info("migration: saving the device state (%d inodes, %d open files, "
                     "%d bytes)", len(self.fs.inodes) - 1, len(self.fs.handles), len(blob))
            self._transfer = asyncio.ensure_future(_write_all(fd, blob))
        elif direction == TRANSFER_LOAD:
            self._transfer = asyncio.ensure_future(self._load_from(fd))
        else:
            close_quietly(fd)
            raise ProtocolError(f"device state transfer direction {direction}")
        return vu.U64.pack(NO_REPLY_FD)

    def take_locks_back(self) -> None:
        """The source's rings start again after it saved its state: the migration failed,
        and the locks it let go of for the destination are taken again before any worker
        serves the guest; one that is not free makes its holder fail with EIO."""
        held, self._handed_over = self._handed_over, None
        if held is not None:
            migration.locks.give_up(self.fs, migration.locks.take_back(self.fs, held))
            log.info("migration: the device runs here again; its locks were taken back")

    async def take_locks_back_soon(self) -> None:
        """As take_locks_back, but a lock that is not free is tried again for a while: a
        destination that loaded the state holds it until it sees its front-end go."""
        held, self._handed_over = self._handed_over, None
        if held is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + migration.locks.RETAKE_GRACE_S
        left = migration.locks.take_back(self.fs, held)
        while (left.posix or left.flock) and loop.time() < deadline:
            await asyncio.sleep(0.02)
            left = migration.locks.take_back(self.fs, left)
        migration.locks.give_up(self.fs, left)
        log.info("migration: the device runs here again; its locks were taken back")

    async def _load_from(self, fd: int) -> None:
        blob = await _read_all(fd, migration.MAX_STATE)
        self.parked = migration.load_state(self.fs, blob, self.migration)
        log.info("migration: device state loaded (%d inodes, %d open files)",
                 len(self.fs.inodes) - 1, len(self.fs.handles))
        self.pool.warm()  # the rings start while the guest is stopped: clone workers at once

    async def on_check_device_state(self, msg: Message) -> bytes:
        """0 when the last transfer completed; the front-end closed its end first."""
        transfer, self._transfer = self._transfer, None
        if transfer is None:
            log.error("migration: CHECK_DEVICE_STATE without a transfer")
            return vu.U64.pack(1)
        try:
            await transfer
        except (OSError, migration.MigrationError, ValueError, KeyError, TypeError) as e:
            log.error("migration: device state transfer failed: %s", e)
            return vu.U64.pack(1)
        return vu.U64.pack(0)


async def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to a non-blocking pipe as it drains, then close it (EOF: the end)."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                await _ready(loop.add_writer, loop.remove_writer, fd)
    finally:
        os.close(fd)


async def _read_all(fd: int, limit: int) -> bytes:
    """Everything up to EOF from a non-blocking pipe (then closed); ValueError past limit."""
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                await _ready(loop.add_reader, loop.remove_reader, fd)
                continue
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise ValueError(f"device state larger than {limit} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)


async def _ready(add: Callable, remove: Callable, fd: int) -> None:
    fut = asyncio.get_running_loop().create_future()
    add(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        remove(fd)
