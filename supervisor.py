"""The supervisor: owns the vhost-user socket, the guest memory fds, the shared-memory
tables and the worker processes (one per started virtqueue).

It speaks vhost-user with the front-end (QEMU) on uvloop, and turns ring set-up and
tear-down into control messages to workers, replying to the front-end only once the
workers have acknowledged. It never touches a FUSE request itself.
"""

from __future__ import annotations

from daemon.host import lean_interpreter

lean_interpreter.install_no_tls()  # before asyncio and uvloop import ssl (4 MB of OpenSSL)

import asyncio
import fcntl
import logging
import mmap
import os
import resource
import signal
import socket
import stat
import sys
import time
import types
from collections.abc import Callable

import posix_ipc

from daemon.fs import proc_fd
from daemon.fs.migration import MigrationOptions
from daemon.fs.passthrough import Config, PassthroughFs
from daemon.guest.memory import BadGuestAddress, check_regions
from daemon.host import (
    activation,
    capabilities,
    fd_store,
    handover,
    sandbox,
    sd_notify,
    seccomp,
)
from daemon.host.sd_notify import Notifier
from daemon.options import (
    CAPABILITIES,
    LOG_LEVELS,
    UsageError,
    apply_compat,
    parse,
    parse_modcaps,
    validate,
)
from daemon.protocol import vhost_user as vu
from daemon.protocol.vhost_user import Message, ProtocolError
from daemon.stats.daemon_info import DaemonInfo
from daemon.stats.daemon_info import segment_name as info_segment
from daemon.stats.queue_stats import QueueStats
from shm_table import HandleTable, InodeTable
from workers import control
from workers.handover import from_fd_store, keeper, warm
from workers.handover.device_state import DeviceState, VringState
from workers.handover.live_upgrade import UPGRADE, HandOver, LiveUpgrade
from workers.handover.migration import DeviceStateHandlers, DirtyLogHandlers
from workers.inflight import InflightRecords
from workers.interrupts import InterruptBoard
from workers.pool import WorkerPool, close_quietly, freeze_heap
from workers.rings import RingHandlers
from workers.template.process import quiet_fork_hooks

log = logging.getLogger("pyvirtiofsd")

MAX_FDS_PER_MESSAGE = 16
MAX_MEM_SLOTS = 509
RECEIVE_TIMEOUT = 5.0  # for the rest of a message whose header has arrived


class FrontEnd:
    """The vhost-user connection: messages with their fds in, replies out. Messages are
    read as they arrive (``messages``; None at the end) and handled one at a time."""

    def __init__(self, conn: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.loop = loop
        self.messages: asyncio.Queue[Message | None] = asyncio.Queue()
        self.exit_code = 0  # 1 once the connection failed (not a clean close)
        conn.setblocking(False)
        loop.add_reader(conn.fileno(), self._on_readable)

    @classmethod
    async def accept(cls, listener: socket.socket) -> FrontEnd:
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        conn, _ = await loop.sock_accept(listener)
        return cls(conn, loop)

    def close(self) -> None:
        if self.conn.fileno() >= 0:
            self.loop.remove_reader(self.conn.fileno())
            self.conn.close()

    def pause(self) -> None:
        """Stop reading messages (a live upgrade: the next program reads them)."""
        self.loop.remove_reader(self.conn.fileno())

    def resume(self) -> None:
        self.loop.add_reader(self.conn.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            msg = self._receive_message()
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ProtocolError) as e:
            log.error("vhost-user connection: %s; disconnecting", e)
            self.exit_code = 1
            msg = None
        if msg is None:
            self.loop.remove_reader(self.conn.fileno())
        self.messages.put_nowait(msg)

    def _receive_message(self) -> Message | None:
        """One message: the header with its fds, then the payload (None on EOF)."""
        conn = self.conn
        header, ancdata, _flags, _ = conn.recvmsg(
            vu.HEADER_SIZE, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
        )
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(int.from_bytes(payload[i : i + 4], "little", signed=True)
                           for i in range(0, usable, 4))
        try:
            if not header:
                raise EOFError
            conn.settimeout(RECEIVE_TIMEOUT)
            try:
                header += _recv_exact(conn, vu.HEADER_SIZE - len(header))
                request, flags, size = vu.decode_header(header)
                payload = _recv_exact(conn, size)
            finally:
                conn.setblocking(False)
        except BaseException:
            for fd in fds:
                close_quietly(fd)
            if isinstance(sys.exc_info()[1], EOFError):
                return None
            raise
        return Message(request, flags, payload, fds)

    def send(self, data: bytes) -> None:
        self.conn.setblocking(True)
        try:
            self.conn.sendall(data)
        finally:
            self.conn.setblocking(False)


class MemoryTableHandlers:
    """SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG: the guest memory every worker maps,
    changed at any time (memory hotplug, guest reboot), running queues included."""

    state: DeviceState  # the Supervisor's
    pool: WorkerPool
    _ensure_worker: Callable[[int], None]  # replaces a worker that did not answer

    async def on_set_mem_table(self, msg: Message) -> None:
        regions = vu.decode_mem_table(msg.payload)
        if len(regions) != len(msg.fds):
            raise ProtocolError(f"{len(regions)} memory regions but {len(msg.fds)} fds")
        new = list(zip(regions, msg.fds, strict=True))
        old = self.state.regions
        await self._change_memory(new)
        msg.fds = []  # taken
        for _, fd in old:
            close_quietly(fd)

    async def on_add_mem_reg(self, msg: Message) -> None:
        region = vu.decode_single_region(msg.payload)
        if len(msg.fds) != 1:
            raise ProtocolError(f"ADD_MEM_REG carried {len(msg.fds)} fds, expected 1")
        if len(self.state.regions) >= MAX_MEM_SLOTS:
            raise ProtocolError("no free memory slot")
        await self._change_memory([*self.state.regions, (region, msg.fds[0])])
        msg.fds = []  # taken

    async def on_rem_mem_reg(self, msg: Message) -> None:
        region = vu.decode_single_region(msg.payload)
        kept, removed = [], []
        for r, fd in self.state.regions:
            same = (r.guest_phys_addr, r.memory_size, r.userspace_addr) == (
                region.guest_phys_addr, region.memory_size, region.userspace_addr)
            (removed if same else kept).append((r, fd))
        if not removed:
            raise ProtocolError(f"no memory region at {region.guest_phys_addr:#x} to remove")
        await self._change_memory(kept)
        for _, fd in removed:
            close_quietly(fd)

    def _region_list(self, regions: list[tuple[vu.MemoryRegion, int]] | None = None
                     ) -> list[list[int]]:
        return [
            [r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, fd]
            for r, fd in (self.state.regions if regions is None else regions)
        ]

    async def _change_memory(self, regions: list[tuple[vu.MemoryRegion, int]]) -> None:
        """Make ``regions`` the memory table, for every running worker too, before QEMU
        hears back. A region that cannot be mapped is refused here, before any worker
        sees it; a worker that does not answer in time is replaced by a fresh one on the
        new table; if a worker refuses it, every worker goes back to the old table and
        the change fails (the caller then keeps its fds out of the table)."""
        current = {fd for _, fd in self.state.regions}
        check_regions([(r, fd) for r, fd in regions if fd not in current])
        for index, vring in self.state.vrings.items():
            if vring.worker is not None or vring.kick_fd >= 0:
                self._check_ring_addresses(index, vring, regions)
        old, self.state.regions = self.state.regions, regions  # what workers start on now
        refused = await self._tell_workers({"op": control.OP_MEM,
                                            "regions": self._region_list(regions)})
        if refused:
            self.state.regions = old
            await self._tell_workers({"op": control.OP_MEM, "regions": self._region_list()})
            raise refused[0]

    async def _tell_workers(self, message: dict) -> list[OSError]:
        """Send one control message to every running worker at once; those that do not
        answer in time are replaced (on the current device state). Returns the refusals."""
        running = [(index, vring.worker) for index, vring in self.state.vrings.items()
                   if vring.worker is not None]
        answers = await asyncio.gather(*(self.pool.ask(w, message) for _, w in running),
                                       return_exceptions=True)
        refused = []
        for (index, _), answer in zip(running, answers, strict=True):
            if isinstance(answer, OSError):
                refused.append(answer)
            elif isinstance(answer, BaseException):
                raise answer
            elif answer is None:
                self._ensure_worker(index)
        return refused

    @staticmethod
    def _check_ring_addresses(index: int, vring: VringState,
                              regions: list[tuple[vu.MemoryRegion, int]]) -> None:
        """The rings must lie in guest memory before a worker is told to use them."""
        assert vring.addr is not None
        n = vring.size
        for what, uva, size in (("descriptor table", vring.addr.desc_user_addr, 16 * n),
                                ("avail ring", vring.addr.avail_user_addr, 6 + 2 * n),
                                ("used ring", vring.addr.used_user_addr, 6 + 8 * n)):
            if not any(r.userspace_addr <= uva and uva + size <= r.userspace_addr
                       + r.memory_size for r, _ in regions):
                raise ProtocolError(f"queue {index}: {what} address {uva:#x}+{size:#x} is "
                                    "outside guest memory")


class Supervisor(MemoryTableHandlers, DirtyLogHandlers, DeviceStateHandlers, LiveUpgrade,
                 RingHandlers):
    def __init__(
        self,
        fs: PassthroughFs,
        *,
        tag: str | None,
        num_request_queues: int,
        poll_us: int = 0,
        notifier: Notifier | None = None,
        stats: QueueStats | None = None,
        c_path: bool = True,
        migration_options: MigrationOptions | None = None,
        resumed: dict | None = None,
        hand_over_to: HandOver | None = None,
        carried: dict | None = None,
    ) -> None:
        """``resumed``: the state a previous program handed over (live upgrade);
        ``hand_over_to``: how this one hands over on SIGHUP (None: it cannot);
        ``carried``: what start-up wants in the handed-over state besides the device."""
        self.fs = fs
        self.resumed = resumed
        self.hand_over_to = hand_over_to
        self.carried = carried or {}
        self.handing_over = False
        self.listener_fd = -1
        self.migration = migration_options or MigrationOptions()
        self._transfer = None
        self._handed_over = None
        self._path_collector = None
        self._collecting = None
        # queue -> the SETLKWs its stopped worker had parked, for the next worker
        self.parked: dict[int, list[list[int]]] = {}
        self.notifier = notifier or Notifier()
        self.stats = stats  # per-queue counters; each worker writes its own row
        self.tag = tag
        self.num_queues = 1 + num_request_queues
        self.interrupts = InterruptBoard(self.num_queues)  # shared with every worker
        self.poll_us = poll_us
        self.c_path = c_path  # --c-fast-path, for every worker
        self.state = DeviceState.from_wire(resumed["device"]) if resumed else DeviceState()
        self.front_end: FrontEnd | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0
        # what each ring's worker popped and has not answered (workers/inflight.py)
        self.inflight = InflightRecords(self.num_queues,
                                        resumed["inflight"] if resumed else -1)
        self.pool = WorkerPool(fs, self.interrupts, stats, on_exit=self._worker_exited,
                               on_kill=self._detach, inflight=self.inflight)

    # ----- features ---------------------------------------------------------------

    @property
    def virtio_features(self) -> int:
        return (
            vu.VIRTIO_F_VERSION_1 | vu.VIRTIO_RING_F_INDIRECT_DESC | vu.VIRTIO_RING_F_EVENT_IDX
            | vu.VHOST_USER_F_PROTOCOL_FEATURES | vu.VHOST_F_LOG_ALL
        )

    @property
    def offered_protocol_features(self) -> int:
        pf = vu.ProtocolFeature
        offered = (pf.MQ | pf.REPLY_ACK | pf.CONFIGURE_MEM_SLOTS | pf.RESET_DEVICE
                   | pf.LOG_SHMFD | pf.DEVICE_STATE)
        if self.tag is not None:
            offered |= pf.CONFIG
        return int(offered)

    # ----- connection -------------------------------------------------------------

    async def serve(self, listener: socket.socket) -> int:
        """Accept one front-end and serve it until it goes away, like virtiofsd; or go on
        with the one a previous program handed over (live upgrade)."""
        self.loop = self.pool.loop = asyncio.get_running_loop()
        self.listener_fd = listener.fileno()
        conn = self.resumed["conn"] if self.resumed else -1
        if conn >= 0:
            self.front_end = front_end = FrontEnd(socket.socket(fileno=conn), self.loop)
            for index in sorted(self.state.vrings):
                self._start_logged(index)  # each resumes from its in-flight record
            stalled = self.resumed.get("stalled_since")
            log.info("live upgrade: took over the front-end from code %s%s",
                     self.resumed.get("build"), "" if stalled is None else
                     " (rings served by no worker for %.1f ms)"
                     % (1000 * (time.monotonic() - stalled)))
        else:
            self.serving()  # the socket is served: an upgrade may come before QEMU does
            self.upgrade_requested = asyncio.Event()
            accepted = asyncio.ensure_future(FrontEnd.accept(listener))
            upgrade = asyncio.ensure_future(self.upgrade_requested.wait())
            await asyncio.wait((accepted, upgrade), return_when=asyncio.FIRST_COMPLETED)
            while not accepted.done():  # no front-end yet: nothing but fds to hand over
                await self.hand_over()
                self.upgrade_requested.clear()
                upgrade = asyncio.ensure_future(self.upgrade_requested.wait())
                await asyncio.wait((accepted, upgrade), return_when=asyncio.FIRST_COMPLETED)
            upgrade.cancel()
            self.front_end = front_end = accepted.result()
            log.info("front-end connected")
        self.notifier.status("front-end connected")
        if conn >= 0:
            self.serving()
        self.journal()
        try:
            while (msg := await front_end.messages.get()) is not None:
                if msg is UPGRADE:
                    if await self.upgrade_between_messages(front_end) is None:
                        break  # the front-end went away meanwhile
                    continue
                await self.dispatch(msg)
                self.journal()
        finally:
            await self.stop_all_workers("the front-end is gone")
            front_end.close()
        self.front_end_gone()
        log.info("front-end disconnected, shutting down")
        return self.exit_code or front_end.exit_code

    def send(self, data: bytes) -> None:
        assert self.front_end is not None
        self.front_end.send(data)

    # ----- dispatch ---------------------------------------------------------------

    async def dispatch(self, msg: Message) -> None:
        handler = getattr(self, "on_" + msg.name.lower(), None)
        ok = True
        reply: bytes | None = None
        try:
            if handler is None:
                log.warning("vhost-user request %s is not supported", msg.name)
                ok = False
            else:
                reply = await handler(msg)
        except (ProtocolError, ValueError, OSError, BadGuestAddress) as e:
            log.error("vhost-user %s failed: %s", msg.name, e)
            ok = False
        finally:
            for fd in msg.fds:  # handlers take the fds they keep out of msg.fds
                close_quietly(fd)
        if reply is not None:
            self.send(vu.encode_reply(msg.request, reply))
        elif msg.request in vu.REQUESTS_WITH_REPLY:
            self.send(vu.encode_reply(msg.request, b""))  # an empty reply is the error
        elif msg.need_reply and self.state.protocol_features & vu.ProtocolFeature.REPLY_ACK:
            self.send(vu.encode_u64_reply(msg.request, 0 if ok else 1))

    def _vring(self, index: int) -> VringState:
        if index >= self.num_queues:
            raise ProtocolError(f"queue index {index} >= {self.num_queues} queues")
        return self.state.vrings.setdefault(index, VringState())

    def _take_fd(self, msg: Message) -> int:
        """The message's one fd, now owned by the caller."""
        if len(msg.fds) != 1:
            raise ProtocolError(f"{msg.name} carried {len(msg.fds)} fds, expected 1")
        return msg.fds.pop()

    # --- features and owner
    async def on_get_features(self, msg: Message) -> bytes:
        return vu.U64.pack(self.virtio_features)

    async def on_set_features(self, msg: Message) -> None:
        features = vu.decode_u64(msg.payload, "features")
        if features & ~self.virtio_features:
            raise ProtocolError(f"front-end acked features {features:#x} we never offered")
        was_logging = self.state.logging
        self.state.acked_features = features
        if self.state.logging != was_logging:
            await self.log_all_changed()

    async def on_get_protocol_features(self, msg: Message) -> bytes:
        return vu.U64.pack(self.offered_protocol_features)

    async def on_set_protocol_features(self, msg: Message) -> None:
        features = vu.decode_u64(msg.payload, "protocol features")
        self.state.protocol_features = features & self.offered_protocol_features

    async def on_set_owner(self, msg: Message) -> None:
        return None

    async def on_reset_owner(self, msg: Message) -> None:
        await self.reset()

    async def on_reset_device(self, msg: Message) -> None:
        await self.reset()

    async def reset(self) -> None:
        await self.stop_all_workers("device reset")
        for vring in self.state.vrings.values():
            for fd in (vring.kick_fd, vring.call_fd, vring.err_fd):
                close_quietly(fd)
        self.state.vrings.clear()
        self.state.acked_features = 0

    async def on_get_queue_num(self, msg: Message) -> bytes:
        return vu.U64.pack(self.num_queues)

    async def on_get_max_mem_slots(self, msg: Message) -> bytes:
        return vu.U64.pack(MAX_MEM_SLOTS)

    async def on_get_config(self, msg: Message) -> bytes:
        offset, size, flags = vu.decode_config_request(msg.payload)
        space = vu.virtio_fs_config(self.tag or "", self.num_queues - 1)
        if offset + size > len(space):
            raise ProtocolError(f"config read {offset}+{size} beyond {len(space)} bytes")
        return vu.encode_config_reply(offset, flags, space[offset : offset + size])

    async def on_set_config(self, msg: Message) -> None:
        raise ProtocolError("the virtio-fs config space is read-only")


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


# ----- listening socket and pid file ------------------------------------------------


def create_listener(path: str, group: str | None) -> socket.socket:
    """A listening socket as virtiofsd makes it: umask 077 (007 with --socket-group)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0o007 if group else 0o077)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    finally:
        os.umask(old)
    if group:
        import grp

        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            sock.close()
            raise SystemExit(f"pyvirtiofsd: --socket-group: no group named {group!r}") from None
        os.chown(path, -1, gid)
    sock.listen(1)
    return sock


def lock_pid_file(socket_path: str) -> int:
    """Create and lock <socket>.pid so a second daemon on the same socket refuses to run."""
    path = socket_path + ".pid"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(
            f"pyvirtiofsd: {path} is locked: another daemon is serving {socket_path}"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def run(fs: PassthroughFs, listener: socket.socket, *, tag: str | None,
        num_request_queues: int, poll_us: int = 0, notifier: Notifier | None = None,
        where: str = "", stats: QueueStats | None = None, c_path: bool = True,
        migration_options: MigrationOptions | None = None, resumed: dict | None = None,
        hand_over_to: HandOver | None = None, carried: dict | None = None) -> int:
    """Serve one front-end on uvloop; SIGTERM/SIGINT stop workers and return, SIGHUP
    hands over to the installed code (live upgrade, ``hand_over_to``). systemd
    (``notifier``) hears READY=1 once the listening socket is served, watchdog pings from
    this loop, and STOPPING=1."""
    import uvloop

    # one thread from here on, which clones only from its own loop: threading's and
    # logging's after-fork hooks have nothing to repair in the template (or a worker this
    # process clones itself), and they would copy ~0.45 MB of shared pages into it
    quiet_fork_hooks()
    notifier = notifier or Notifier()
    sup = Supervisor(fs, tag=tag, num_request_queues=num_request_queues, poll_us=poll_us,
                     notifier=notifier, stats=stats, c_path=c_path,
                     migration_options=migration_options, resumed=resumed,
                     hand_over_to=hand_over_to, carried=carried)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        loop.add_signal_handler(signal.SIGHUP, sup.request_upgrade)
        if notifier.watchdog:
            interval = notifier.watchdog

            def ping() -> None:  # from this loop: a loop that hangs stops the pings
                notifier.ping()
                loop.call_later(interval, ping)

            ping()
        if resumed is None:
            notifier.ready(f"waiting for the front-end{' on ' + where if where else ''}")
        else:  # systemd: a reload (ExecReload sent SIGHUP) is done once this is said
            notifier.notify(ready=1, status=f"serving with code {handover.build_id()}")
        try:
            return await sup.serve(listener)
        except asyncio.CancelledError:
            log.info("signal received, stopping")
            sup.kill_workers_now()
            return 0
        finally:
            notifier.stopping("stopping")

    try:
        return uvloop.run(main())
    finally:
        sup.kill_workers_now()
        sys.stdout.flush()


# ----- start-up ---------------------------------------------------------------

SYSLOG_SOCKET = "/dev/log"


def syslog_reachable(path: str = SYSLOG_SOCKET) -> str | None:
    """None if a syslog daemon listens on path, else why not."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(path)
                return None
            except OSError as e:
                why = e.strerror or str(e)
    return why


def setup_logging(level: str, use_syslog: bool) -> None:
    handler: logging.Handler
    unreachable = syslog_reachable() if use_syslog else None
    if use_syslog and unreachable is None:
        # only here: logging.handlers brings pickle and more (~1 MB per daemon)
        from logging.handlers import SysLogHandler

        handler = SysLogHandler(address=SYSLOG_SOCKET)
        handler.setFormatter(logging.Formatter("pyvirtiofsd[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("[%(asctime)s %(levelname)s %(name)s %(process)d] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LOG_LEVELS[level])
    if unreachable is not None:
        logging.getLogger("pyvirtiofsd").warning(
            "--syslog: no syslog daemon on %s (%s); logging to standard error instead",
            SYSLOG_SOCKET, unreachable)


def raise_nofile(limit: int | None) -> None:
    """Like virtiofsd: min(1,000,000, fs.nr_open) unless told otherwise; 0 = leave."""
    if limit == 0:
        return
    if limit is None:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                limit = min(1_000_000, int(f.read()))
        except OSError:
            limit = 1_000_000
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    except (ValueError, OSError):
        # without CAP_SYS_RESOURCE the hard limit is the ceiling
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        logging.getLogger("pyvirtiofsd").info(
            "RLIMIT_NOFILE is %d (the hard limit; %d needs CAP_SYS_RESOURCE)", hard, limit)


def fd_cache_budget(num_request_queues: int) -> int:
    """Each worker's share of RLIMIT_NOFILE for re-opened inode fds: a quarter of what is
    left after memory slots and the daemon's own fds, so open files keep the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    reserve = 509 + 200
    return max(32, min(4096, (soft - reserve) // (4 * (num_request_queues + 1))))


def listener_from_fd(fd: int) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise UsageError(f"--fd {fd}: not an open file descriptor ({e.strerror})") from e
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"--fd {fd}: not a socket")
    return socket.socket(fileno=fd)


def listener_from_systemd() -> socket.socket:
    """The one listening socket systemd passed (socket activation without --socket-path)."""
    try:
        return activation.only_listener()
    except activation.ActivationError as e:
        raise UsageError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        lean_interpreter.reexec_without_site(argv)  # returns only where it does not apply
    if argv[:1] == ["upgrade"]:
        return handover.upgrade_main(argv[1:])
    if argv[:1] == ["stats"]:
        from daemon.stats import report

        lean_interpreter.uninstall_no_tls()  # not the daemon: --listen, exposition need ssl
        return report.main(argv[1:])
    args, usage = parse(argv)
    if args.print_capabilities:
        import json  # only here: the daemon never needs it

        print(json.dumps(CAPABILITIES))
        return 0
    try:
        apply_compat(args)
        # executed by a process that waited around the sandboxed server (sandbox.Finish)
        plan = sandbox.take_plan()
        exited = os.environ.pop(sandbox.SERVER_EXITED_ENV, None) if plan else None
        if plan is not None and sandbox.KEEPER_ENV in os.environ:
            setup_logging(args.log_level, args.syslog)
            keeper.keep_executed(os.environ.pop(sandbox.KEEPER_ENV), plan)
        if plan is not None and exited is not None and sandbox.SUCCESSOR_ENV not in os.environ:
            setup_logging(args.log_level, args.syslog)
            return finish_outside(args, plan, int(exited))
        validate(args)
        setup_logging(args.log_level, args.syslog)
        log = logging.getLogger("pyvirtiofsd")
        if args.allow_mmap and args.cache not in ("metadata", "never"):
            log.info("--allow-mmap only matters with --cache metadata or never (files are "
                     "not opened direct-io with --cache %s)", args.cache)
        return serve(args, (plan, int(exited)) if plan and exited is not None else None)
    except UsageError as e:
        sys.stderr.write(usage)
        print(f"pyvirtiofsd: error: {e}", file=sys.stderr)
        return 2


def finish_outside(args: types.SimpleNamespace, plan: dict, code: int) -> int:
    """The process outside, executed afresh once the sandboxed server exited
    (daemon/native/sandbox.c): remove what it made in the host's namespaces, exit with
    the server's status."""
    journal = keeper.StateJournal(plan["journal_fd"]) if plan["fd_store"] else None
    clean_up(args, plan["tables"], plan["info"], journal, plan["systemd_owns_path"], -1)
    return code


def clean_up(args: types.SimpleNamespace, tables: list[str], info: str,
             journal: keeper.StateJournal | None, systemd_owns_path: bool,
             pid_fd: int) -> None:
    """What a daemon leaves when it stops: the shared-memory tables (unless systemd's fd
    store keeps a connection a restart resumes on: ``journal``), the info segment, the
    socket (unless systemd passed it) and the pid file."""
    state = journal.read() if journal is not None else None
    if state is None or state.get("conn", -1) < 0:
        # else a restart of the service resumes on them (workers/handover/
        # from_fd_store.py); a stop leaves them in /dev/shm (docs/operations.md)
        for name in tables:
            try:
                posix_ipc.unlink_shared_memory(name)
            except posix_ipc.ExistentialError:
                pass
    try:
        posix_ipc.unlink_shared_memory(info)
    except posix_ipc.ExistentialError:
        pass
    if args.socket_path:
        # a socket systemd passed stays: the .socket unit listens on it for the next start
        leftovers = [args.socket_path + ".pid"]
        if not systemd_owns_path:
            leftovers.insert(0, args.socket_path)
        for path in leftovers:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    if pid_fd >= 0:
        os.close(pid_fd)


def serve(args: types.SimpleNamespace, finishing: tuple[dict, int] | None = None) -> int:
    """Serve; ``finishing``: this is the process outside executed afresh after the
    sandboxed server handed its fds over (a live upgrade), with the plan and status to
    finish with if it did not hand everything over."""
    log = logging.getLogger("pyvirtiofsd")
    # a live upgrade: what the previous program left (or the sandboxed server sends)
    resumed = sandbox.take_from_server(finishing is not None)
    if resumed is None and finishing is not None:
        return finish_outside(args, *finishing)
    resumed = (resumed or handover.take_state()
               # a restart of the service: what systemd's fd store kept
               or from_fd_store.take(os.environ, os.path.abspath(args.shared_dir)))
    if resumed is not None and "old_workers" in resumed:
        warm.take_over(resumed)  # its workers served while this program started
    handover.build_id()  # of the code as installed now, before the sandbox hides it
    if resumed is None or resumed.get("from_fd_store"):
        # connected now: inside the sandbox its path or abstract name is out of reach
        notifier = sd_notify.Notifier.from_environment()
    else:
        notify_fd, watchdog = resumed["notify"]
        notifier = sd_notify.Notifier(
            socket.socket(fileno=notify_fd) if notify_fd >= 0 else None, watchdog)
    raise_nofile(args.rlimit_nofile)
    os.umask(0)  # modes come from the guest, already masked by its umask
    pid_fd = -1
    name = f"/pyvirtiofsd-{os.getpid()}"
    names = [name + "-inodes", name + "-handles", name + "-stats"]
    systemd_owns_path = False
    if resumed is not None:
        pid_fd = resumed["pid_fd"]
        if resumed.get("from_fd_store") and args.socket_path:
            pid_fd = lock_pid_file(args.socket_path)
        systemd_owns_path = resumed.get("systemd_owns_path", False)
        listener = socket.socket(fileno=resumed["listener"])
        names = resumed["tables"]
        inodes = InodeTable.attach(names[0])
        handles = HandleTable.attach(names[1])
        stats = QueueStats.attach(names[2], writable=True)
    else:
        if args.fd is not None:
            listener = listener_from_fd(args.fd)
        elif args.socket_path:
            pid_fd = lock_pid_file(args.socket_path)
            # pyvirtiofsd@.socket passes a socket bound to the same path: take it over
            passed = activation.listener_for_path(args.socket_path)
            systemd_owns_path = passed is not None
            listener = passed or create_listener(args.socket_path, args.socket_group)
        else:
            listener = listener_from_systemd()
        inodes = InodeTable.create(names[0], args.inode_table_size)
        handles = HandleTable.create(names[1], args.handle_table_size)
        stats = QueueStats.create(names[2], 1 + args.num_request_queues)
    info = DaemonInfo.open(info_segment(os.getpid()), create=True)
    restart = bool(resumed and resumed.get("restart"))  # the keeper's, not an upgrade
    carried = {"pid_fd": pid_fd, "tables": names, "info": info,
               "systemd_owns_path": systemd_owns_path,
               "upgrades": resumed["upgrades"] + (0 if restart else 1) if resumed else 0,
               "supervisor_restarts": (resumed.get("supervisor_restarts", 0) + restart
                                       if resumed else 0)}
    shared_dir = os.path.abspath(args.shared_dir)
    # read while /proc is still there: the sandboxed server sees only its fds in it
    args.cap_last = capabilities.last_cap() if os.geteuid() == 0 else -1
    if args.seccomp != "none":
        try:
            seccomp.load()
        except seccomp.SeccompError as e:
            log.error("--seccomp %s: %s", args.seccomp, e)
            return 1
    try:
        split = args.sandbox != "none" or args.keeper
        if split:
            import uvloop  # noqa: F401 - nothing can be imported once inside

            # the process outside executes the new code while the server serves
            # (daemon/native/sandbox.c); PYVIRTIOFSD_UPGRADE as below
            carried["outside_execs_first"] = warm_upgrades = (
                os.environ.get("PYVIRTIOFSD_UPGRADE") != "stop-workers-first")
            # the server's first process stays outside the sandbox as the supervisor's
            # keeper (workers/handover/keeper.py); the supervisor it clones goes in
            carried["journal"] = journal = keeper.StateJournal()
            # a memfd: systemd's fd store keeps it for a restart of the service
            carried["session_fd"] = session_fd = os.memfd_create("pyvirtiofsd-session",
                                                                 os.MFD_CLOEXEC)
            os.ftruncate(session_fd, mmap.PAGESIZE)
            carried["session_page"] = mmap.mmap(session_fd, mmap.PAGESIZE)
            if notifier.sock is not None and fd_store.wanted(os.environ):
                # the supervisor keeps systemd's fd store current with the journal
                carried["fd_store"] = store = fd_store.FdStore(notifier.sock)
                if resumed is not None:  # what the store holds from before: synced anew
                    store.stored = dict.fromkeys(resumed.get("fd_store_names", ()), (0, 0))
            quiet_fork_hooks()
            freeze_heap()
            # the process outside and the keeper run no Python from the split on
            # (daemon/native/sandbox.c); what they execute then needs these
            finish = sandbox.Finish(
                exec_first=warm_upgrades,
                journal_fd=journal.fd if "fd_store" in carried else -1,
                state={"tables": [inodes.name, handles.name, stats.name], "info": info.name,
                       "journal_fd": journal.fd, "session_fd": session_fd,
                       "fd_store": "fd_store" in carried,
                       "systemd_owns_path": systemd_owns_path})
            try:  # returns only in the sandboxed server
                sandbox.enter(args.sandbox, shared_dir, finish, args.uid_maps, args.gid_maps,
                              after_upgrade=resumed is not None)
            except sandbox.SandboxError as e:
                log.error("--sandbox %s: %s", args.sandbox, e)
                return 1
            proc_fd.use_fd_directory(sandbox.server_fd_directory(),
                                     sandbox.server_fdinfo_directory())
            # the sandboxed server: it must not clean up host paths (the same names in
            # here are files of the shared directory); the process outside does that
            try:
                code = run_server(args, "/" if args.sandbox != "none" else shared_dir,
                                  listener, inodes, handles, notifier, stats, resumed,
                                  carried, sandbox.hand_over_outside)
            finally:
                logging.shutdown()
            os._exit(code)
        # the workers serve while the new code starts (workers/handover/warm.py); the
        # older way, stop them first, stays for comparison (benchmarks/upgrade_stalls.py)
        carried["warm"] = os.environ.get("PYVIRTIOFSD_UPGRADE") != "stop-workers-first"
        return run_server(args, shared_dir, listener, inodes, handles, notifier, stats,
                          resumed, carried, lambda state_fd, _fds: handover.reexec(state_fd))
    finally:
        clean_up(args, [inodes.name, handles.name, stats.name], info.name,
                 carried.get("journal") if "fd_store" in carried else None,
                 systemd_owns_path, pid_fd)


def run_server(args: types.SimpleNamespace, shared_dir: str, listener: socket.socket,
               inodes: InodeTable, handles: HandleTable,
               notifier: sd_notify.Notifier | None = None,
               stats: QueueStats | None = None, resumed: dict | None = None,
               carried: dict | None = None, hand_over_to: HandOver | None = None) -> int:
    log = logging.getLogger("pyvirtiofsd")
    config = Config(
        cache=args.cache, readdirplus=not args.no_readdirplus, writeback=args.writeback,
        allow_direct_io=args.allow_direct_io, preserve_noatime=args.preserve_noatime,
        announce_submounts=args.announce_submounts, readonly=args.readonly,
        file_handles=args.inode_file_handles, xattr=args.xattr,
        fd_cache_size=fd_cache_budget(args.num_request_queues),
        posix_lock=args.posix_lock, flock=args.flock,
        uid_map=args.translate_uid_map, gid_map=args.translate_gid_map,
        xattrmap=args.xattrmap_rules, posix_acl=args.posix_acl,
        security_label=args.security_label, killpriv_v2=args.killpriv_v2,
        allow_mmap=args.allow_mmap,
    )
    fs = PassthroughFs(shared_dir, inodes, handles, config,
                       session=(carried or {}).get("session_page"))
    # with --sandbox none a live upgrade executes in this very process: its capabilities
    # and seccomp filter were set by the first program and stay (a second filter would
    # only stack on the first)
    executes_itself = args.sandbox == "none" and not args.keeper
    confined = resumed is not None and executes_itself
    try:
        if resumed is None:
            fs.add_root()
        else:
            fs.resume(resumed)
    except OSError as e:
        log.error("cannot share %s: %s", args.shared_dir, e.strerror or e,
                  exc_info=resumed is not None)
        return 1
    if args.cap_last >= 0 and not confined:  # as root: keep only what serving needs
        keep = capabilities.retained(fs.use_handles,
                                     parse_modcaps(args.modcaps) if args.modcaps else ())
        try:
            capabilities.drop_all_but(keep, args.cap_last)
        except OSError as e:
            log.error("cannot drop capabilities: %s", e.strerror or e)
            return 1
        log.info("capabilities kept: %s", " ".join(sorted(keep)))
    if args.seccomp != "none" and not confined:
        try:
            # --sandbox none: a live upgrade executes the new code in this process
            allowed = seccomp.install(args.seccomp, seccomp.ALLOWED + (
                ["execve"] if executes_itself else []))
        except seccomp.SeccompError as e:
            log.error("--seccomp %s: %s", args.seccomp, e)
            return 1
        log.info("seccomp: %d system calls allowed, others %s", allowed,
                 {"kill": "kill the process", "log": "are logged by the kernel",
                  "trap": "raise SIGSYS"}[args.seccomp])
    log.info("sharing %s on %s%s", args.shared_dir,
             args.socket_path or f"fd {listener.fileno()}",
             "" if args.sandbox == "none" else f" (--sandbox {args.sandbox})")
    return run(fs, listener, tag=args.tag,
               num_request_queues=args.num_request_queues,
               poll_us=max(0, args.poll_us), notifier=notifier, stats=stats,
               where=args.socket_path or f"fd {listener.fileno()}",
               c_path=args.c_fast_path == "on",
               migration_options=MigrationOptions(
                   args.migration_mode, args.migration_on_error,
                   args.migration_verify_handles, args.migration_confirm_paths),
               resumed=resumed, hand_over_to=hand_over_to, carried=carried)


if __name__ == "__main__":
    sys.exit(main())
