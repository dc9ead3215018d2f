"""The fuzzer's guest: the real daemon (under the coverage tracer) and a front-end that
keeps many requests in flight on several queues, checks every used-ring entry as it
arrives, and changes the memory table while requests run.

Ring discipline is the driver's: a request takes free descriptors, its head goes into
the avail ring (one 16-bit store for the index), and only a used element that names a
head we submitted and have not seen completed frees them. Each in-flight request owns a
buffer slot (readable part, writable part, an indirect table), so nothing the daemon may
still write is reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import select
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu
from tests.support.frontend import DESC, F_INDIRECT, F_NEXT, F_WRITE, GUEST_BASE, UVA_BASE, Frontend
from tests.support.reference import stop_daemon, wait_for_socket

REPO = Path(__file__).resolve().parents[2]
QUEUE_SIZE = 256
NUM_QUEUES = 3  # hiprio + two request queues
SLOT_READ = 160 * 1024  # room for a request (a 128 KiB WRITE and its headers)
SLOT_WRITE = 160 * 1024  # room for a reply
SLOT_TABLE = 16 * 16  # an indirect table of up to 16 descriptors
SLOT_SIZE = SLOT_READ + SLOT_WRITE + 4096
SLOTS_PER_QUEUE = 24
MEMORY_SIZE = 48 << 20
EXTRA_REGION_SIZE = 1 << 20
EXTRA_BASE = GUEST_BASE + (64 << 20)  # guest-physical address of added regions
EXTRA_UVA = UVA_BASE + (64 << 20)
# A full memory barrier, as a driver's virtio_mb() before it reads avail_event: C11's
# atomic_thread_fence(memory_order_seq_cst), out of line in gcc's libatomic (Python has no
# fence of its own, and the daemon's extension exports none)
MEMORY_ORDER_SEQ_CST = 5
_libatomic = ctypes.CDLL(ctypes.util.find_library("atomic") or "libatomic.so.1")
_libatomic.atomic_thread_fence.argtypes = [ctypes.c_int]
_libatomic.atomic_thread_fence.restype = None


def full_fence() -> None:
    """Order the stores before it against the loads after it (a store-load barrier)."""
    _libatomic.atomic_thread_fence(MEMORY_ORDER_SEQ_CST)


class Finding(Exception):
    """An invariant the daemon broke. ``kind`` groups findings of one cause."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"[{kind}] {message}")
        self.kind = kind
        self.message = message


@dataclass
class Pending:
    """A request in flight: where its reply will be and what the model needs."""

    q: int
    head: int
    descs: list[int]
    slot: int
    unique: int
    opcode: int
    nodeid: int
    writable: int  # device-writable bytes of the chain
    out_gpa: int  # where the reply starts (0: no writable room)
    meta: dict = field(default_factory=dict)
    sent_at: float = 0.0
    done: bool = False
    written: int = 0
    error: int = 0
    payload: bytes = b""


@dataclass
class ExtraRegion:
    gpa: int
    size: int  # as told to the daemon
    uva: int
    fd: int
    file_size: int  # the memfd's real size: beyond it an access is SIGBUS
    mem: mmap.mmap


class Guest:
    """One daemon instance and the front-end talking to it."""

    def __init__(self, workdir: Path, share: Path, options: list[str],
                 coverage_map: str | None) -> None:
        self.workdir = workdir
        self.share = share
        self.socket_path = workdir / "vu.sock"
        self.log_path = workdir / "daemon.log"
        self.options = options
        self.socket_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "tests.fuzz.covd", coverage_map or "-", "--",
               "--shared-dir", str(share), "--socket-path", str(self.socket_path),
               "--sandbox", "none", "--num-request-queues", str(NUM_QUEUES - 1),
               "--poll-us", "0", *options]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log)
        self.proc.log_path = self.log_path  # type: ignore[attr-defined]
        wait_for_socket(self.proc, self.socket_path, timeout=30.0)
        self.fe = Frontend(str(self.socket_path), memory_size=MEMORY_SIZE,
                           queue_size=QUEUE_SIZE)
        self.extra: list[ExtraRegion] = []
        self.fe.setup(NUM_QUEUES)
        # a region larger than its memfd (a front-end's bug the daemon must refuse, or
        # else survive: requests reach past its end on purpose if it is taken)
        self.add_region(oversized=True)
        self.mem = self.fe.mem
        self.u16 = memoryview(self.mem).cast("H")
        self.unique = 1 << 40
        self.slots: dict[int, list[int]] = {}
        self.free_slots: dict[int, list[int]] = {}
        for q in range(NUM_QUEUES):
            self.slots[q] = [self.fe.alloc(SLOT_SIZE, 4096) for _ in range(SLOTS_PER_QUEUE)]
            self.free_slots[q] = list(range(SLOTS_PER_QUEUE))
        self.inflight: dict[tuple[int, int], Pending] = {}
        self.requests = 0
        self.kicks = 0
        self.table_fds = 0  # SET_MEM_TABLE re-sends so far
        self.log_offset = 0
        self.worker_pids = self._wait_workers()

    # ----- processes --------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_workers(self) -> dict[int, int]:
        import re

        deadline = time.monotonic() + 20
        while True:
            found = {int(q): int(p) for q, p in
                     re.findall(r"queue (\d+): worker (\d+) started", self.log_text())}
            if len(found) == NUM_QUEUES or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def daemon_pids(self) -> list[int]:
        """The supervisor and its children (the workers)."""
        pid = self.proc.pid
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            kids = []
        return [pid] + [int(k) for k in kids]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill_supervisor(self, timeout: float = 2.0) -> list[int]:
        """SIGKILL the supervisor, as a crash or the OOM killer would: every worker must
        follow it (the design relies on PR_SET_PDEATHSIG). Returns the workers still
        running after ``timeout`` (then killed here)."""
        workers = self.daemon_pids()[1:]
        self.proc.kill()
        self.proc.wait()
        deadline = time.monotonic() + timeout
        alive = workers
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if _running(p)]
        for pid in alive:
            os.kill(pid, 9)
        return alive

    def close(self) -> None:
        workers = self.daemon_pids()[1:] if self.alive() else []
        try:
            stop_daemon(self.proc)
            for pid in workers:  # never leave a worker behind, whatever the daemon does
                if _running(pid):
                    os.kill(pid, 9)
        finally:
            self.u16.release()
            for region in self.extra:
                region.mem.close()
                os.close(region.fd)
            self.extra = []
            self.fe.close()

    # ----- submitting -------------------------------------------------------------

    def can_submit(self, q: int) -> bool:
        return bool(self.free_slots[q]) and len(self.fe.rings[q].free) >= 18

    def next_unique(self) -> int:
        self.unique += 2
        return self.unique

    def submit(self, q: int, opcode: int, nodeid: int, arg: bytes = b"", *,
               uid: int = 0, gid: int = 0, out_size: int = 4096, layout: int = 0,
               length: int | None = None, unique: int | None = None,
               beyond: ExtraRegion | None = None, meta: dict | None = None) -> Pending:
        """One request. ``layout``: 0 one readable descriptor, 1 header and arguments
        apart, 2 both in an indirect table, 3 the reply split over small buffers.
        ``beyond``: put the reply in that added region, past its memfd's end."""
        ring = self.fe.rings[q]
        slot = self.free_slots[q].pop()
        base = self.slots[q][slot]
        if unique is None:
            unique = self.next_unique()
        if length is None:
            length = fuse.IN_HEADER_SIZE + len(arg)
        hdr = fuse.IN_HEADER.pack(length & 0xFFFFFFFF, opcode & 0xFFFFFFFF, unique,
                                  nodeid & (2**64 - 1), uid, gid, 4242, 0, 0)
        request = (hdr + arg)[:SLOT_READ]
        off = self.fe.off(base)
        self.mem[off : off + len(request)] = request
        descs: list[tuple[int, int, int]] = []
        if layout in (1, 2) and arg:
            descs.append((base, fuse.IN_HEADER_SIZE, 0))
            descs.append((base + fuse.IN_HEADER_SIZE, len(request) - fuse.IN_HEADER_SIZE, 0))
        else:
            descs.append((base, len(request), 0))
        out_gpa = 0
        writable = 0
        if out_size:
            out_size = min(out_size, SLOT_WRITE)
            out_gpa = base + SLOT_READ
            if beyond is not None:
                out_gpa = beyond.gpa + beyond.file_size  # the daemon was told it is there
                out_size = min(out_size, beyond.size - beyond.file_size)
            if layout == 3 and out_size > 64 and beyond is None:
                cut = [16, 48] + [out_size - 64]
                pos = out_gpa
                for n in cut:
                    descs.append((pos, n, F_WRITE))
                    pos += n
            else:
                descs.append((out_gpa, out_size, F_WRITE))
            writable = out_size
        if layout == 2:
            table = base + SLOT_READ + SLOT_WRITE
            toff = self.fe.off(table)
            for i, (addr, n, flags) in enumerate(descs):
                nxt = i + 1 if i + 1 < len(descs) else 0
                DESC.pack_into(self.mem, toff + 16 * i, addr, n,
                               flags | (F_NEXT if nxt else 0), nxt)
            head = ring.free.pop(0)
            ids = [head]
            self._put_desc(ring.desc, head, table, 16 * len(descs), F_INDIRECT, 0)
        else:
            ids = [ring.free.pop(0) for _ in descs]
            for k, (addr, n, flags) in enumerate(descs):
                last = k + 1 == len(descs)
                self._put_desc(ring.desc, ids[k], addr, n, flags | (0 if last else F_NEXT),
                               0 if last else ids[k + 1])
            head = ids[0]
        p = Pending(q, head, ids, slot, unique, opcode, nodeid, writable, out_gpa,
                    meta or {}, time.monotonic())
        self.inflight[(q, head)] = p
        self._publish(q, head)
        self.requests += 1
        return p

    def _put_desc(self, table_gpa: int, i: int, addr: int, length: int, flags: int,
                  nxt: int) -> None:
        DESC.pack_into(self.mem, self.fe.off(table_gpa) + 16 * i, addr, length, flags, nxt)

    def _publish(self, q: int, head: int) -> None:
        """Make the head available; kick only when the device's avail_event asks for it
        (VIRTIO_RING_F_EVENT_IDX, as a Linux driver does: vring_need_event)."""
        ring = self.fe.rings[q]
        a = self.fe.off(ring.avail)
        self.u16[(a + 4) // 2 + ring.next_avail % ring.size] = head
        old = ring.next_avail
        ring.next_avail = (ring.next_avail + 1) & 0xFFFF
        self.u16[(a + 2) // 2] = ring.next_avail  # one aligned 16-bit store
        full_fence()  # the index before reading avail_event
        event = self.u16[(self.fe.off(ring.used) + 4 + 8 * ring.size) // 2]
        if (ring.next_avail - event - 1) & 0xFFFF < (ring.next_avail - old) & 0xFFFF:
            os.eventfd_write(ring.kick, 1)
            self.kicks += 1

    # ----- completions ------------------------------------------------------------

    def poll(self) -> list[Pending]:
        """Used elements that arrived, checked: a head we submitted and that is still in
        flight, a length within the chain's writable room."""
        done: list[Pending] = []
        for q, ring in self.fe.rings.items():
            u = self.fe.off(ring.used)
            idx = self.u16[(u + 2) // 2]
            while idx != ring.last_used:
                elem = u + 4 + 8 * (ring.last_used % ring.size)
                head, written = struct.unpack_from("<II", self.mem, elem)
                ring.last_used = (ring.last_used + 1) & 0xFFFF
                if head >= ring.size:
                    raise Finding("used-ring", f"queue {q}: used id {head} >= queue size "
                                  f"{ring.size}")
                p = self.inflight.pop((q, head), None)
                if p is None:
                    raise Finding("used-ring", f"queue {q}: used id {head} is not a head "
                                  "in flight (never submitted or already completed)")
                if written > p.writable:
                    raise Finding("used-ring", f"queue {q}: used length {written} > the "
                                  f"{p.writable} writable bytes of request {p.unique} "
                                  f"(opcode {p.opcode})")
                ring.free.extend(p.descs)
                self.free_slots[q].append(p.slot)
                p.done = True
                p.written = written
                self._read_reply(p)
                done.append(p)
            # used_event: interrupt us for every element
            a = self.fe.off(ring.avail)
            self.u16[(a + 4) // 2 + ring.size] = ring.last_used
        return done

    def _read_reply(self, p: Pending) -> None:
        if p.written == 0 or not p.out_gpa:
            return
        raw = self.fe.read_gpa(p.out_gpa, p.written)
        what = f"request {p.unique} (opcode {p.opcode}, nodeid {p.nodeid:#x}, queue {p.q})"
        if p.written < fuse.OUT_HEADER_SIZE:
            raise Finding("reply", f"{what}: reply of {p.written} bytes")
        total, error, unique = fuse.OUT_HEADER.unpack_from(raw)
        if unique != p.unique:
            raise Finding("reply", f"{what}: reply names request {unique}")
        if total != p.written:
            raise Finding("reply", f"{what}: header says {total} bytes, used element "
                          f"{p.written}")
        if not -4095 <= error <= 0:
            raise Finding("reply", f"{what}: error {error}")
        p.error = error
        p.payload = raw[fuse.OUT_HEADER_SIZE:]

    def wait_calls(self, timeout: float) -> None:
        """Sleep until a call eventfd fires or ``timeout`` passes."""
        calls = [r.call for r in self.fe.rings.values()]
        ready, _, _ = select.select(calls, [], [], timeout)
        for fd in ready:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass

    # ----- memory table -----------------------------------------------------------

    def _table_payload(self, regions: list[tuple[int, int, int, int]]) -> bytes:
        return vu.MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(
            vu.MEM_REGION.pack(*r) for r in regions)

    def resend_table(self, split: bool) -> int:
        """SET_MEM_TABLE again with a new fd of the same memory (``split``: as two
        regions), plus the added regions; the REPLY_ACK status (0 = taken)."""
        fd = os.dup(self.fe.memfd)
        try:
            if split:
                half = MEMORY_SIZE // 2
                regions = [(GUEST_BASE, half, UVA_BASE, 0),
                           (GUEST_BASE + half, MEMORY_SIZE - half, UVA_BASE + half, half)]
                fds = [fd, fd]
            else:
                regions = [(GUEST_BASE, MEMORY_SIZE, UVA_BASE, 0)]
                fds = [fd]
            for r in self.extra:
                regions.append((r.gpa, r.size, r.uva, 0))
                fds.append(r.fd)
            self.table_fds += 1
            return self.fe.ack(vu.Request.SET_MEM_TABLE, self._table_payload(regions), fds)
        finally:
            os.close(fd)

    def add_region(self, oversized: bool) -> ExtraRegion | None:
        """ADD_MEM_REG of a fresh memfd; ``oversized``: the daemon is told the region is
        twice as large as the file (the front-end's bug, which a daemon must refuse)."""
        if len(self.extra) >= 4:
            return None
        region = self._new_region(oversized)
        payload = bytes(8) + vu.MEM_REGION.pack(region.gpa, region.size, region.uva, 0)
        status = self.fe.ack(vu.Request.ADD_MEM_REG, payload, [region.fd])
        if status != 0:
            region.mem.close()
            os.close(region.fd)
            return None
        self.extra.append(region)
        return region

    def _new_region(self, oversized: bool) -> ExtraRegion:
        used = {r.gpa for r in self.extra}
        k = next(i for i in range(8) if EXTRA_BASE + i * 4 * EXTRA_REGION_SIZE not in used)
        file_size = EXTRA_REGION_SIZE
        size = 2 * file_size if oversized else file_size
        fd = os.memfd_create(f"extra-{k}", os.MFD_CLOEXEC)
        os.ftruncate(fd, file_size)
        mem = mmap.mmap(fd, file_size)
        return ExtraRegion(EXTRA_BASE + k * 4 * EXTRA_REGION_SIZE, size,
                           EXTRA_UVA + k * 4 * EXTRA_REGION_SIZE, fd, file_size, mem)

    def oversized(self) -> ExtraRegion | None:
        """A region of the table that is larger than its memfd, if any."""
        return next((r for r in self.extra if r.size > r.file_size), None)

    def remove_region(self) -> int | None:
        """REM_MEM_REG of the last added region, if no request in flight uses it."""
        if not self.extra:
            return None
        region = self.extra[-1]
        if any(p.meta.get("region") is region for p in self.inflight.values()):
            return None
        payload = bytes(8) + vu.MEM_REGION.pack(region.gpa, region.size, region.uva, 0)
        status = self.fe.ack(vu.Request.REM_MEM_REG, payload)
        self.extra.pop()
        region.mem.close()
        os.close(region.fd)
        return status


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"
