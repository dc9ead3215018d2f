"""One worker process per virtqueue: wait for a kick, pop descriptor chains, answer each
FUSE request straight between guest memory and the host file, push used elements,
signal the call eventfd.

A worker is a clone of the supervisor that shares its fd table but not its memory; the
only state that outlives it is in the shared-memory tables and the shared fds.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import struct
import time
from typing import NoReturn

from daemon.fs.passthrough import (
    GuestInputError,
    PassthroughFs,
)
from daemon.guest.memory import BadGuestAddress, DirtyLog, GuestMemory
from daemon.guest.virtqueue import MAX_SEGMENTS, BadChain, DescriptorChain, SplitQueue, walk_error
from daemon.host.process import name_process
from daemon.native._sys import ffi, lib
from daemon.protocol import fuse
from daemon.protocol.fuse import FuseError
from daemon.protocol.opcodes import MIN_REPLY
from daemon.protocol.vhost_user import MemoryRegion
from daemon.stats.queue_stats import QueueStats
from shm_table import HandleTableFull, InodeTableFull
from workers import control
from workers.control import QueueSetup
from workers.dispatch import shared_dispatch
from workers.fast_path import FastPathContext
from workers.inflight import InflightRecords
from workers.interrupts import InterruptBoard
from workers.parked_locks import ParkedLocks
from workers.worker_requests import PENDING, Incoming, WorkerRequests

log = logging.getLogger("pyvirtiofsd.worker")

MAX_REQUEST = fuse.MAX_WRITE + 64 * 1024  # virtiofsd: 1 MiB of data plus headers
ONE = struct.pack("<Q", 1)
serve = lib.pyvfs_serve
note = lib.pyvfs_stats_note
SERVE_CHAIN = lib.PYVFS_SERVE_CHAIN
SERVE_CONTROL = lib.PYVFS_SERVE_CONTROL
SERVE_TIMEOUT = lib.PYVFS_SERVE_TIMEOUT
SERVE_ERROR = lib.PYVFS_SERVE_ERROR
LOCK_RETRY_MS = 10
PARKED_HANDED_ON = 800  # waiting SETLKWs a stop hands on (its reply's size is bounded)
WARN_BURST = 100
WARN_PERIOD = 10.0
# The high-priority queue carries FORGETs (and the rare INTERRUPT), which nobody waits for:
# after a kick its worker lets them gather for this long, so one wake-up, one drain and one
# used-ring notification serve dozens of them instead of a few (the guest does not kick
# again meanwhile: with EVENT_IDX it waits for the worker to move avail_event).
HIPRIO_GATHER_NS = 200_000


def map_table(regions: list[list[int]]) -> GuestMemory:
    """A memory table as control messages carry it: (gpa, size, uva, offset, fd) rows."""
    return GuestMemory([(MemoryRegion(g, n, u, o), fd) for g, n, u, o, fd in regions])


def ring_addresses(mem: GuestMemory, s: QueueSetup) -> tuple[int, int, int]:
    """The ring's descriptor table, avail and used rings as guest-physical addresses."""
    return (mem.uva_to_gpa(s.desc_uva, 16 * s.size), mem.uva_to_gpa(s.avail_uva, 6 + 2 * s.size),
            mem.uva_to_gpa(s.used_uva, 6 + 8 * s.size))


class QueueWorker(WorkerRequests):
    def __init__(self, setup: QueueSetup, fs: PassthroughFs, control_sock: socket.socket,
                 interrupts: InterruptBoard, inflight: InflightRecords | None = None) -> None:
        self.setup = setup
        self.interrupts = interrupts
        self.fs = fs
        self.control = control_sock
        self.kick_fd = setup.kick_fd
        self.call_fd = setup.call_fd
        self.enabled = setup.enabled
        self.mem = map_table(setup.regions)
        self.queue = self._make_queue(setup.last_avail_idx)
        self.dirty_log: DirtyLog | None = None  # mapped while the front-end logs
        if setup.log_fd >= 0:
            self.set_dirty_log(setup.log_fd, setup.log_size, setup.log_offset)
        self.resumed: list[int] = []  # heads the lost predecessor left unanswered
        if inflight is not None:
            self.queue.c.inflight = inflight.address(setup.index)
            if setup.resume_from_used:
                # re-serve what it popped and never answered (parked SETLKWs answered
                # out of order included), then go on where it stopped popping
                last_avail, self.resumed = inflight.recover(setup.index, setup.size,
                                                            self.queue.used_idx)
                self.queue.last_avail_idx = last_avail
            else:
                inflight.reset(setup.index, setup.last_avail_idx, setup.size)
        elif setup.resume_from_used:
            # no records: in-order completions only, so everything before the used index
            # was answered and at most the one request after it was lost
            self.queue.last_avail_idx = self.queue.used_idx
        self.unknown_opcodes: set[int] = set()
        self.chain = DescriptorChain()  # refilled for every request
        self.serve = ffi.new("pyvfs_serve_t *")  # pyvfs_serve's settings and loop state
        self.serve.kick_fd, self.serve.call_fd = self.kick_fd, self.call_fd
        self.serve.enabled = int(self.enabled)
        self.serve.poll_ns = setup.poll_us * 1000
        self.serve.gather_ns = HIPRIO_GATHER_NS if setup.index == 0 else 0
        # the opcodes the table lets C answer (daemon/native/fuse_ops.c), unless the C
        # path is off (--c-fast-path off: all in Python)
        self.fast_path = FastPathContext.shared(fs, setup.c_path)
        self.fast = int(setup.c_path)
        self.serve.fast = self.fast
        self.fast_ctx = self.fast_path.c
        self.handlers = shared_dispatch(fs, QueueWorker)  # the template's (workers/dispatch.py)
        self.drain_head = ffi.new("uint32_t *")
        self.header = ffi.new("char[]", fuse.IN_HEADER_SIZE)
        self.header_view = ffi.buffer(self.header)
        self.argbuf = ffi.new("char[]", MAX_REQUEST)
        self.parked = ParkedLocks(setup.index, interrupts)  # SETLKWs waiting for a lock
        self.parked.adopt(fs, setup.parked, setup.size)  # a stopped worker's, if any
        for head, _unique, _lock in self.parked.waiting:  # a crash of this worker re-serves them
            lib.pyvfs_inflight_park(self.queue.c, head)
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.warned: dict[str, tuple[float, int]] = {}

    def remap(self, regions: list[list[int]]) -> None:
        """Switch to a new memory table; on any failure the old one stays in use.

        Guest addresses are translated only when used: the C ring state (SplitQueue's
        struct, rebound here) and each chain's walk (a parked SETLKW walks its chain
        again when it completes), so the next request sees the new table. The serve
        loop's state holds no guest address."""
        mem = map_table(regions)
        try:
            self.queue.rebind(mem, *ring_addresses(mem, self.setup))
        except BaseException:
            mem.close()
            raise
        old, self.mem = self.mem, mem
        old.close()

    def set_dirty_log(self, fd: int, size: int, offset: int) -> None:
        """Mark every guest page this worker writes in the front-end's dirty log (fd -1:
        stop); the old mapping goes once the queue uses the new one."""
        log = DirtyLog(fd, size, offset) if fd >= 0 else None
        self.queue.set_dirty_log(log.address if log else 0, log.size if log else 0)
        old, self.dirty_log = self.dirty_log, log
        if old is not None:
            old.close()

    def _make_queue(self, last_avail: int) -> SplitQueue:
        return SplitQueue(self.mem, self.setup.size, *ring_addresses(self.mem, self.setup),
                          event_idx=self.setup.event_idx, indirect=self.setup.indirect,
                          last_avail_idx=last_avail)

    # ----- event loop ------------------------------------------------------------

    def run(self) -> NoReturn:
        """Serve the queue until the supervisor stops us. The waiting, draining and
        notifying is C (pyvfs_serve); it comes back here only for a request that needs
        Python, a control message, or the retry time of waiting SETLKWs."""
        ep = select.epoll()
        ep.register(self.control.fileno(), select.EPOLLIN)
        ep.register(self.kick_fd, select.EPOLLIN)
        self.epoll = ep
        self.watch(ep)
        s = self.serve
        s.epoll_fd = ep.fileno()
        self.serve_resumed()
        self.start_draining()  # whatever is in the ring already
        if self.setup.resume_from_used and self.call_fd >= 0:
            # the worker before (killed, or dead) may have pushed answers it never signalled;
            # an interrupt too many costs the guest nothing
            try:
                os.write(self.call_fd, ONE)
            except OSError:
                pass  # not an eventfd we can write: the C loop's notifications say the same
        q_chain = self.chain
        while True:
            s.timeout_ms = LOCK_RETRY_MS if self.parked else -1
            q = self.queue
            r = serve(q.c, q_chain.rd, q_chain.wr, q_chain.counts, q_chain.lens,
                      q_chain.detail, self.drain_head, MAX_SEGMENTS, self.fast_ctx, s)
            if r == SERVE_CHAIN:
                q_chain.head = self.drain_head[0]
                written = self.handle_chain(q_chain)
                note(q_chain.rd, q_chain.counts[0], q_chain.wr, q_chain.counts[1],
                     0 if written == PENDING else written, 0)
                if written != PENDING:
                    q.push_signal(q_chain.head, written, self.call_fd, q_chain)
                else:
                    lib.pyvfs_inflight_park(q.c, q_chain.head)
                s.flags |= lib.PYVFS_PUSHED
            elif r > 1:  # a malformed chain: consumed, completed with length 0
                q_chain.head = self.drain_head[0]
                self.warn("chain", "dropped descriptor chain at head %d: %s", q_chain.head,
                          walk_error(1 - r, q_chain.detail))
                q.push_signal(q_chain.head, 0, self.call_fd)
                s.flags |= lib.PYVFS_PUSHED
            elif r == -1:  # the avail index is more than a ring ahead of what we popped
                jumped = q.lasting_avail_jump()
                if jumped is not None:
                    log.error("queue %d: avail index jumped from %d to %d; waiting for a "
                              "reset", self.setup.index, q.last_avail_idx, jumped)
                    self.enabled = False
                    s.enabled = 0
                    s.flags &= ~lib.PYVFS_DRAINING
                # else it was read while the driver was writing it: DRAINING is still
                # set, so the next serve() call drains again and nothing is lost
            elif r == SERVE_CONTROL:
                self.handle_control()
            elif r == SERVE_ERROR:
                err = lib.pyvfs_errno()
                raise OSError(err, f"epoll_wait: {os.strerror(err)}")
            if self.parked and r in (SERVE_TIMEOUT, SERVE_CONTROL):
                self.retry_locks()

    def serve_resumed(self) -> None:
        """Answer the requests the lost predecessor popped and never answered, each
        exactly once: its chain is walked again (the memory table may be another) and
        handled as if just popped; a SETLKW may park again."""
        q, chain = self.queue, self.chain
        for head in self.resumed:
            lib.pyvfs_inflight_completing(q.c, head)
            chain.head = head
            if not q.walk(chain):
                self.warn("chain", "dropped descriptor chain: %s", q.last_error)
                q.push(head, 0)
                continue
            written = self.handle_chain(chain)
            note(chain.rd, chain.counts[0], chain.wr, chain.counts[1],
                 0 if written == PENDING else written, 0)
            if written == PENDING:
                lib.pyvfs_inflight_park(q.c, head)
            else:
                q.push(head, written, chain)
        if self.resumed:
            log.info("queue %d: re-served %d request(s) the previous worker left "
                     "unanswered", self.setup.index, len(self.resumed))
        self.resumed = []

    def start_draining(self) -> None:
        """Make the next pyvfs_serve call drain the ring before it waits."""
        if self.enabled:
            self.queue.disable_notifications()
            self.serve.flags |= lib.PYVFS_DRAINING

    def stop_draining(self) -> None:
        """Leave a disabled ring alone at once, even mid-drain (pyvfs_serve looks at the
        control socket between chains); the answers pushed so far are signalled first."""
        s = self.serve
        if s.flags & lib.PYVFS_DRAINING:
            s.flags &= ~lib.PYVFS_DRAINING
            if s.flags & lib.PYVFS_PUSHED and self.call_fd >= 0 and self.queue.should_notify():
                try:
                    os.write(self.call_fd, ONE)
                except OSError:
                    pass  # the front-end's eventfd is gone: nothing to do
            s.flags &= ~lib.PYVFS_PUSHED

    def handle_control(self) -> None:
        data = self.control.recv(control.MAX_MESSAGE)
        if not data:
            os._exit(0)  # the supervisor is gone
        msg = control.decode(data)
        op = msg.get("op")
        reply: dict = {"ok": True}
        if op == control.OP_MEM:
            try:
                self.remap(msg["regions"])
            except (OSError, BadGuestAddress, BadChain) as e:
                reply = {"ok": False, "error": f"new memory table refused: {e}"}
        elif op == control.OP_CALL:
            self.call_fd = msg["fd"]
            self.serve.call_fd = self.call_fd
        elif op == control.OP_KICK:
            try:  # the new fd first: one epoll cannot take keeps the old one in use
                self.epoll.register(msg["fd"], select.EPOLLIN)
            except OSError as e:
                reply = {"ok": False, "error": f"kick fd {msg['fd']} refused: {e}"}
            else:
                self.epoll.unregister(self.kick_fd)
                self.kick_fd = msg["fd"]
                self.serve.kick_fd = self.kick_fd
        elif op == control.OP_LOG:
            try:
                self.set_dirty_log(msg["fd"], msg["size"], msg["offset"])
            except OSError as e:
                reply = {"ok": False, "error": f"dirty log refused: {e}"}
        elif op == control.OP_ENABLE:
            self.enabled = bool(msg["on"])
            self.serve.enabled = int(self.enabled)
            if not self.enabled:
                self.stop_draining()
        elif op == control.OP_STOP:
            self.epoll.close()  # its own fd, else left open in the shared table for ever
            reply["last_avail"] = self.queue.last_avail_idx
            reply["parked"] = self.parked.export(PARKED_HANDED_ON)
            self.control.send(control.encode(reply))
            self.stopped()
        else:
            reply = {"ok": False, "error": f"unknown op {op!r}"}
        self.control.send(control.encode(reply))
        if op in (control.OP_ENABLE, control.OP_MEM, control.OP_KICK):
            self.start_draining()

    def watch(self, ep: select.epoll) -> None:
        """Register fds besides the kick and control ones in the serve loop's epoll (a
        readable one ends pyvfs_serve as the control socket does: handle_control)."""

    def stopped(self) -> NoReturn:
        """OP_STOP was answered: the worker's process ends (workers/template/hiprio.py's queue 0,
        served in the template, goes back to cloning instead)."""
        os._exit(0)

    # ----- one request -----------------------------------------------------------

    def handle_chain(self, chain: DescriptorChain) -> int:
        """Answer one request; returns the number of bytes written to the guest."""
        if chain.readable_len < fuse.IN_HEADER_SIZE:
            self.warn("request", "request of %d bytes has no FUSE header", chain.readable_len)
            return 0
        chain.read(0, self.header, fuse.IN_HEADER_SIZE)
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = fuse.IN_HEADER.unpack_from(
            self.header_view)
        if self.debug:
            log.debug("queue %d: request %d opcode %d nodeid %d len %d", self.setup.index,
                      unique, opcode, nodeid, length)
        try:
            if length > MAX_REQUEST:
                raise FuseError(errno.ENOMEM, f"request of {length} bytes is too large")
            if length > chain.readable_len or length < fuse.IN_HEADER_SIZE + 8 * extlen:
                raise FuseError(errno.EINVAL, f"header length {length} does not match the "
                                f"{chain.readable_len} bytes sent")
            room = chain.writable_len - fuse.OUT_HEADER_SIZE
            if opcode in MIN_REPLY and room < MIN_REPLY[opcode]:
                # checked before acting: a LOOKUP whose answer cannot be delivered must not
                # take a reference the guest will never FORGET
                raise FuseError(errno.ERANGE, f"no room for the reply: {room} bytes for "
                                f"opcode {opcode}")
            handler = self.handlers.get(opcode)
            if handler is None:
                if opcode not in self.unknown_opcodes:
                    self.unknown_opcodes.add(opcode)
                    log.info("opcode %d not implemented: ENOSYS", opcode)
                raise OSError(errno.ENOSYS, "not implemented")
            answer = handler(self, chain, Incoming(length, opcode, unique, nodeid, uid, gid,
                                                   pid, extlen, room))
            if isinstance(answer, int):
                return answer  # answered already, not at all (no reply) or later
        except Exception as e:  # noqa: BLE001 - every failure becomes an errno reply
            return self.reply_error(chain, unique, opcode, e)
        return self.reply(chain, unique, 0, answer)

    def args(self, chain: DescriptorChain, length: int) -> bytes:
        """The request's bytes after the FUSE header (arguments and names, not data)."""
        n = chain.read(fuse.IN_HEADER_SIZE, self.argbuf, length)
        return ffi.buffer(self.argbuf, n)[:]

    def warn(self, kind: str, message: str, *args: object) -> None:
        """Log a guest mistake, at most WARN_BURST per kind and WARN_PERIOD seconds, so a
        hostile guest cannot flood the log."""
        now = time.monotonic()
        start, count = self.warned.get(kind, (now, 0))
        if now - start > WARN_PERIOD:
            if count > WARN_BURST:
                log.warning("queue %d: %d more %s warnings suppressed", self.setup.index,
                            count - WARN_BURST, kind)
            start, count = now, 0
        count += 1
        self.warned[kind] = (start, count)
        if count <= WARN_BURST:
            log.warning("queue %d: " + message, self.setup.index, *args)

    def retry_locks(self) -> None:
        """Answer the parked SETLKWs that got their lock, failed or were interrupted."""
        if self.parked.retry(self.complete_later) and self.call_fd >= 0 \
                and self.queue.should_notify():
            os.write(self.call_fd, ONE)

    def complete_later(self, head: int, unique: int, error: int) -> None:
        """Answer a request after others: walk its chain again (the memory table may
        have changed since) and push it."""
        chain = self.chain
        chain.head = head
        lib.pyvfs_inflight_completing(self.queue.c, head)
        if self.queue.walk(chain):
            written = self.reply(chain, unique, error, b"")
        else:
            log.warning("queue %d: chain %d went bad while waiting: %s", self.setup.index,
                        head, self.queue.last_error)
            written = 0
        self.queue.push(head, written, chain)

    def reply(self, chain: DescriptorChain, unique: int, error: int, payload: bytes) -> int:
        total = fuse.OUT_HEADER_SIZE + len(payload)
        if total > chain.writable_len:
            if chain.writable_len < fuse.OUT_HEADER_SIZE:
                self.warn("reply", "no room for a reply to request %d", unique)
                return 0
            self.warn("reply", "reply of %d bytes to request %d does not fit in %d: ERANGE",
                      total, unique, chain.writable_len)
            error, payload, total = -errno.ERANGE, b"", fuse.OUT_HEADER_SIZE
        chain.write(0, fuse.OUT_HEADER.pack(total, error, unique))
        if payload:
            chain.write(fuse.OUT_HEADER_SIZE, payload)
        return total

    def reply_error(self, chain: DescriptorChain, unique: int, opcode: int, e: Exception) -> int:
        if isinstance(e, FuseError):
            code = e.errno
            self.warn("request", "bad request (opcode %d): %s", opcode, e)
        elif isinstance(e, GuestInputError):
            code = e.errno
            self.warn(e.kind, "opcode %d: %s", opcode, e.strerror)
        elif isinstance(e, InodeTableFull):
            code = errno.ENFILE
            log.error("inode table full: %s", e)
        elif isinstance(e, HandleTableFull):
            code = errno.EMFILE
            log.error("handle table full: %s", e)
        elif isinstance(e, (BadGuestAddress, BadChain)):
            code = errno.EFAULT
            log.warning("queue %d: %s", self.setup.index, e)
        elif isinstance(e, OSError) and e.errno:
            code = e.errno
            if log.isEnabledFor(logging.DEBUG):
                log.debug("queue %d: opcode %d: %s", self.setup.index, opcode, e)
        elif isinstance(e, OverflowError):
            code = errno.EINVAL
            self.warn("request", "opcode %d: value out of range: %s", opcode, e)
        elif isinstance(e, struct.error):
            code = errno.EINVAL
            log.warning("queue %d: truncated arguments for opcode %d", self.setup.index, opcode)
        else:
            code = errno.EIO
            log.exception("queue %d: opcode %d failed", self.setup.index, opcode)
        return self.reply(chain, unique, -code, b"")


def worker_signals() -> None:
    """A worker's signal dispositions: SIGTERM ends it, SIGINT (the operator's ^C at the
    supervisor's terminal) does not, no wake-up fd of the supervisor's event loop."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def worker_main(setup: QueueSetup, fs: PassthroughFs, control_sock: socket.socket,
                interrupts: InterruptBoard, supervisor_pid: int,
                lock_mutex_fd: int = -1, stats: QueueStats | None = None,
                inflight: InflightRecords | None = None,
                signals_set: bool = False) -> NoReturn:
    """Entry point in the freshly cloned child; never returns. ``signals_set``: the
    process it was cloned from set the signals as a worker wants them already."""
    try:
        lib.pyvfs_set_pdeathsig(signal.SIGKILL)
        name_process(f"pyvfs-q{setup.index}")
        if not signals_set:
            worker_signals()
        if os.getppid() != supervisor_pid:
            os._exit(1)  # the supervisor died before PDEATHSIG was set
        if fs.lock_owners is not None:
            fs.lock_owners.mutex_fd = lock_mutex_fd
        if stats is not None:
            stats.attach_worker(setup.index)
        QueueWorker(setup, fs, control_sock, interrupts, inflight).run()
    except BaseException:  # noqa: BLE001 - a worker must never unwind into the supervisor
        log.exception("worker for queue %d failed", setup.index)
        os._exit(1)
