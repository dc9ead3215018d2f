"""The control plane while workers serve or hang.

Memory-table changes (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) reach running workers and
are used for the very next request, under load, without restarting anybody; a region its
fd cannot back is refused at once and changes nothing; and a worker stuck in a host system
call (or stopped) never holds QEMU up: GET_VRING_BASE, SET_VRING_KICK, SET_MEM_TABLE,
RESET_DEVICE and RESET_OWNER answer within a second, a ring never has two workers, and
every child the daemon loses is reaped."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import platform
import signal
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu
from daemon.stats.queue_stats import QueueStats, segment_name
from tests.protocol.test_hostile_guest import (
    KNOWN,
    KNOWN_DATA,
    Served,
    make_share,
    process_state,
    serve,
    worker_pids,
)
from tests.support.daemon import daemon_log, start_pyvirtiofsd
from tests.support.frontend import F_NEXT, F_WRITE, GUEST_BASE, UVA_BASE, Frontend
from tests.support.reference import stop_daemon

R = vu.Request
ANSWER_WITHIN = 1.0  # seconds QEMU may wait for any control message, whatever workers do
SLOT = 8192  # one request's buffers: header and arguments, then 7.75 KiB for the reply
OUT_AT = 256
BATCH = 8  # requests a loader keeps in flight


# ----- guest memory beyond the test front-end's one region ---------------------------


class GuestRegion:
    """One more piece of guest RAM with its own memfd, placed after the front-end's 64 MiB
    (guest-physical and front-end-virtual), as QEMU's memory hotplug adds a DIMM."""

    def __init__(self, slot: int, size: int = 1 << 20, *, fd_size: int | None = None,
                 mmap_offset: int = 0) -> None:
        self.gpa = GUEST_BASE + (64 << 20) + slot * (16 << 20)
        self.uva = UVA_BASE + (64 << 20) + slot * (16 << 20)
        self.size = size
        self.mmap_offset = mmap_offset
        self.fd_size = mmap_offset + size if fd_size is None else fd_size
        self.fd = os.memfd_create(f"guest-dimm-{slot}")
        os.ftruncate(self.fd, self.fd_size)
        self.mem = mmap.mmap(self.fd, min(size, self.fd_size - mmap_offset),
                             offset=mmap_offset) if self.fd_size > mmap_offset else None

    def entry(self) -> bytes:
        return vu.MEM_REGION.pack(self.gpa, self.size, self.uva, self.mmap_offset)

    def single(self) -> bytes:
        """ADD_MEM_REG / REM_MEM_REG payload."""
        return bytes(8) + self.entry()

    def close(self) -> None:
        if self.mem is not None:
            self.mem.close()
        os.close(self.fd)


def base_entry(fe: Frontend) -> bytes:
    return vu.MEM_REGION.pack(GUEST_BASE, fe.size, UVA_BASE, 0)


def table(*entries: bytes) -> bytes:
    return vu.MEM_TABLE_HEAD.pack(len(entries), 0) + b"".join(entries)


# a place for one request's buffers: (memory the test writes through, offset, guest address)
Place = tuple[mmap.mmap, int, int]


def places_in_base(fe: Frontend, count: int) -> list[Place]:
    return [(fe.mem, fe.off(gpa), gpa) for gpa in (fe.alloc(SLOT, 64) for _ in range(count))]


def places_in(region: GuestRegion, first: int, count: int) -> list[Place]:
    assert region.mem is not None
    return [(region.mem, k * SLOT, region.gpa + k * SLOT) for k in range(first, first + count)]


class Loader(threading.Thread):
    """Keeps one request queue busy: BATCH requests in flight (READs of the known file,
    GETATTRs of the root), each answer checked. Its buffers lie in the places it is told
    to use (use() returns once a whole batch in them was answered)."""

    def __init__(self, fe: Frontend, q: int, nodeid: int, fh: int, places: list[Place]
                 ) -> None:
        super().__init__(name=f"loader-q{q}", daemon=True)
        self.fe, self.q, self.nodeid, self.fh = fe, q, nodeid, fh
        self.places = places
        self.gen = self.done_gen = 0
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.answered = 0
        self.unique = q << 40

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                with self.cond:
                    places, gen = self.places, self.gen
                self.batch(places)
                with self.cond:
                    self.done_gen = gen
                    self.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            self.error = e
            with self.cond:
                self.cond.notify_all()

    def batch(self, places: list[Place]) -> None:
        fe, ring = self.fe, self.fe.rings[self.q]
        expected = {}
        for i in range(BATCH):
            mem, off, gpa = places[i % len(places)]
            self.unique += 1
            if i % 2:
                opcode, nodeid = fuse.Opcode.READ, self.nodeid
                arg = fuse.READ_IN.pack(self.fh, 0, len(KNOWN_DATA), 0, 0, 0, 0)
            else:
                opcode, nodeid = fuse.Opcode.GETATTR, fuse.ROOT_ID
                arg = fuse.GETATTR_IN.pack(0, 0, 0)
            raw = fuse.IN_HEADER.pack(fuse.IN_HEADER_SIZE + len(arg), opcode, self.unique,
                                      nodeid, 0, 0, 1, 0, 0) + arg
            mem[off : off + len(raw)] = raw
            mem[off + OUT_AT : off + OUT_AT + 16] = bytes(16)
            head = 2 * i
            fe.put_desc(ring.desc, head, gpa, len(raw), F_NEXT, head + 1)
            fe.put_desc(ring.desc, head + 1, gpa + OUT_AT, SLOT - OUT_AT, F_WRITE, 0)
            expected[head] = (self.unique, opcode, mem, off + OUT_AT)
            fe.publish(self.q, head)
        for _ in range(BATCH):
            head, written = fe.wait_used(self.q, timeout=10)
            assert head in expected, f"queue {self.q}: unexpected used head {head}"
            unique, opcode, mem, out = expected.pop(head)
            reply = bytes(mem[out : out + written])
            assert written >= fuse.OUT_HEADER_SIZE, f"queue {self.q}: reply of {written} bytes"
            assert fuse.OUT_HEADER.unpack_from(reply) == (written, 0, unique), \
                f"queue {self.q}: opcode {opcode}: {fuse.OUT_HEADER.unpack_from(reply)}"
            if opcode == fuse.Opcode.READ:
                assert reply[fuse.OUT_HEADER_SIZE :] == KNOWN_DATA
            else:
                mode = struct.unpack_from("<I", reply, 16 + fuse.ATTR_OUT_HEAD.size + 60)[0]
                assert stat.S_ISDIR(mode), f"GETATTR of the root: mode {mode:o}"
            self.answered += 1

    def use(self, places: list[Place], timeout: float = 20) -> None:
        """Put the next requests' buffers in ``places``; return once a batch started after
        this call was answered in full (so no earlier place is in use any more)."""
        with self.cond:
            self.places = places
            self.gen += 1
            gen = self.gen
            self.cond.wait_for(lambda: self.done_gen >= gen or self.error is not None,
                               timeout)
            done = self.done_gen >= gen
        if self.error is not None:
            raise AssertionError(f"loader of queue {self.q} failed") from self.error
        assert done, f"queue {self.q}: no batch answered within {timeout} s"

    def stop(self) -> None:
        self.stopping.set()
        self.join(20)
        assert not self.is_alive(), f"loader of queue {self.q} is stuck"
        if self.error is not None:
            raise AssertionError(f"loader of queue {self.q} failed") from self.error


def used_index(fe: Frontend, q: int) -> int:
    return struct.unpack_from("<H", fe.mem, fe.off(fe.rings[q].used) + 2)[0]


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def open_known(srv: Served) -> tuple[int, int]:
    error, nodeid, _ = srv.lookup(fuse.ROOT_ID, KNOWN)
    assert error == 0
    error, fh = srv.open(nodeid)
    assert error == 0
    return nodeid, fh


def read_request_in(srv: Served, q: int, place: Place, nodeid: int, fh: int
                    ) -> tuple[int, bytes]:
    """One READ of the known file with its buffers at ``place``; (used length, reply)."""
    mem, off, gpa = place
    unique = srv.next_unique()
    arg = fuse.READ_IN.pack(fh, 0, len(KNOWN_DATA), 0, 0, 0, 0)
    raw = fuse.IN_HEADER.pack(fuse.IN_HEADER_SIZE + len(arg), fuse.Opcode.READ, unique,
                              nodeid, 0, 0, 1, 0, 0) + arg
    mem[off : off + len(raw)] = raw
    head = srv.fe.submit_descs(q, [(gpa, len(raw), 0), (gpa + OUT_AT, SLOT - OUT_AT, F_WRITE)])
    got, written = srv.fe.wait_used(q)
    assert got == head
    srv.fe.rings[q].free = list(range(srv.fe.rings[q].size))
    reply = bytes(mem[off + OUT_AT : off + OUT_AT + written])
    if written:
        assert fuse.OUT_HEADER.unpack_from(reply)[2] == unique
    return written, reply


def assert_no_restarts(srv: Served) -> None:
    log = srv.log()
    assert worker_pids(log) == srv.workers, "a worker was replaced"
    for word in ("Traceback", "died", "did not answer"):
        assert word not in log, f"{word!r} in the daemon log:\n{log}"
    srv.assert_alive(queues=())


# ----- (a) memory tables on running queues --------------------------------------------


def test_memory_table_changes_under_load(tmp_path: Path) -> None:
    """SET_MEM_TABLE with a new region, ADD_MEM_REG and REM_MEM_REG while queues 1 and 2
    are busy: every request answered correctly before, during and after, requests whose
    buffers lie in an added region are answered on every queue, a removed region is no
    longer guest memory, and no worker is restarted."""
    regions = [GuestRegion(0), GuestRegion(1)]
    with serve(tmp_path, num_queues=4) as srv:
        fe = srv.fe
        nodeid, fh = open_known(srv)
        loaders = [Loader(fe, q, nodeid, fh, places_in_base(fe, BATCH)) for q in (1, 2)]
        base = {ld.q: ld.places for ld in loaders}
        for ld in loaders:
            ld.start()
        try:
            for ld in loaders:
                ld.use(base[ld.q])
            new = {ld.q: places_in(regions[0], ld.q * BATCH, BATCH) for ld in loaders}
            # the same memory and one more region, as QEMU sends after a DIMM is plugged
            assert fe.ack(R.SET_MEM_TABLE, table(base_entry(fe), regions[0].entry()),
                          [fe.memfd, regions[0].fd]) == 0
            for ld in loaders:
                ld.use(base[ld.q][:4] + new[ld.q][:4])
            assert read_request_in(srv, 3, places_in(regions[0], 0, 1)[0], nodeid, fh)[1][
                fuse.OUT_HEADER_SIZE :] == KNOWN_DATA
            # one more region (CONFIGURE_MEM_SLOTS)
            assert fe.ack(R.ADD_MEM_REG, regions[1].single(), [regions[1].fd]) == 0
            newer = {ld.q: places_in(regions[1], ld.q * BATCH, BATCH) for ld in loaders}
            for ld in loaders:
                ld.use(base[ld.q][:2] + new[ld.q][:3] + newer[ld.q][:3])
            # the first added region goes: nobody may use it afterwards
            for ld in loaders:
                ld.use(base[ld.q][:4] + newer[ld.q][:4])
            mark = srv.mark()
            assert fe.ack(R.REM_MEM_REG, regions[0].single(), [regions[0].fd]) == 0
            for ld in loaders:
                ld.use(newer[ld.q])
            written, _ = read_request_in(srv, 3, places_in(regions[0], 1, 1)[0], nodeid, fh)
            assert written == 0, "a request in a removed region was answered"
            srv.expect_log(mark, r"dropped descriptor chain .*outside guest memory")
            assert read_request_in(srv, 3, places_in(regions[1], 0, 1)[0], nodeid, fh)[1][
                fuse.OUT_HEADER_SIZE :] == KNOWN_DATA
            for ld in loaders:
                ld.use(base[ld.q])
        finally:
            for ld in loaders:
                ld.stop()
        assert all(ld.answered >= 6 * BATCH for ld in loaders)
        assert_no_restarts(srv)
        srv.assert_alive(queues=(1, 2, 3))
    for region in regions:
        region.close()


def queue_row(srv: Served, q: int) -> dict:
    """Queue q's counters (daemon/stats/queue_stats.py), which its worker updates per request."""
    stats = QueueStats.attach(segment_name(srv.proc.pid))
    try:
        return stats.rows()[q]
    finally:
        stats.close()


def hold_lock(path: Path) -> int:
    """A host process's write lock on the whole file (an open-file-description lock)."""
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    return fd


def test_waiting_setlkw_answers_into_the_new_memory_table(tmp_path: Path) -> None:
    """A SETLKW parked while its buffers' guest memory moves to another fd (a new table
    with the same guest addresses) is answered through the new table once it gets its
    lock: the worker walks the chain again and writes where the guest's memory now is."""
    old, moved = GuestRegion(0), GuestRegion(0)
    with serve(tmp_path, "--posix-lock") as srv:
        fe = srv.fe
        nodeid, fh = open_known(srv)
        held = hold_lock(srv.share / KNOWN.decode())
        try:
            assert fe.ack(R.ADD_MEM_REG, old.single(), [old.fd]) == 0
            mem, off, gpa = places_in(old, 0, 1)[0]
            unique = srv.next_unique()
            arg = fuse.LK_IN.pack(fh, 7, 0, fuse.OFFSET_MAX, fcntl.F_WRLCK, 0, 0, 0)
            raw = fuse.IN_HEADER.pack(fuse.IN_HEADER_SIZE + len(arg), fuse.Opcode.SETLKW,
                                      unique, nodeid, 0, 0, 1, 0, 0) + arg
            mem[off : off + len(raw)] = raw
            head = fe.submit_descs(1, [(gpa, len(raw), 0), (gpa + OUT_AT, 64, F_WRITE)])
            # the worker took it (its queue's counters say so) and parks it: the lock is held
            wait_for("the SETLKW is parked", lambda: queue_row(srv, 1)["by_opcode"].get(
                "SETLKW") == 1)
            assert used_index(fe, 1) == fe.rings[1].last_used
            # the guest's memory at those addresses now comes from another fd
            assert moved.mem is not None
            moved.mem[:] = old.mem[:]  # type: ignore[index]
            assert fe.ack(R.SET_MEM_TABLE, table(base_entry(fe), moved.entry()),
                          [fe.memfd, moved.fd]) == 0
            old.mem[off + OUT_AT : off + OUT_AT + 64] = b"\xee" * 64  # type: ignore[index]
        finally:
            os.close(held)
        got, written = fe.wait_used(1, timeout=5)
        assert (got, written) == (head, fuse.OUT_HEADER_SIZE)
        reply = bytes(moved.mem[off + OUT_AT : off + OUT_AT + written])
        assert fuse.OUT_HEADER.unpack(reply) == (written, 0, unique)
        assert old.mem[off + OUT_AT] == 0xEE  # type: ignore[index]
        fe.rings[1].free = list(range(fe.rings[1].size))
        assert_no_restarts(srv)
        srv.assert_alive(queues=(1, 2))
    old.close()
    moved.close()


# ----- (b) a region its fd cannot back -------------------------------------------------


SHORT = {  # (memory_size, mmap_offset, fd size)
    "fd_smaller_than_region": (1 << 20, 0, 64 << 10),
    "offset_plus_size_beyond_fd": (1 << 20, 512 << 10, 1 << 20),
}


@contextlib.contextmanager
def served_before_rings(base: Path, queue_size: int = 256) -> Iterator[Served]:
    """A daemon whose front-end has sent features and a memory table, but no ring yet."""
    share, outside = make_share(base)
    socket_path = base / "vu.sock"
    proc = start_pyvirtiofsd(share, socket_path)
    fe: Frontend | None = None
    try:
        fe = Frontend(str(socket_path), memory_size=64 << 20, queue_size=queue_size)
        fe.setup(0)
        yield Served(proc, fe, share, outside, socket_path)
    except BaseException:
        print(daemon_log(proc))
        raise
    finally:
        if fe is not None:
            fe.close()
        stop_daemon(proc)


def start_rings(srv: Served, count: int = 3) -> None:
    """Rings 0..count-1 and their workers, then FUSE INIT."""
    for q in range(count):
        srv.fe.add_ring(q)
    deadline = time.monotonic() + 10
    while len(worker_pids(srv.log())) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    srv.workers = worker_pids(srv.log())
    error, _ = srv.call(fuse.Opcode.INIT, 0, fuse.INIT_IN.pack(
        7, 38, 131072, 0xFFFFFFFF & ~fuse.INIT_EXT, 0) + bytes(44))
    assert error == 0


@pytest.mark.parametrize("when", ["before_rings", "set_mem_table", "add_mem_reg"])
@pytest.mark.parametrize("case", sorted(SHORT))
def test_region_larger_than_its_fd_is_refused(tmp_path: Path, case: str, when: str) -> None:
    """A region whose fd ends before mmap_offset + memory_size is refused with a log line
    naming it and the sizes, the old table stays, and a descriptor in that guest range is
    a bad address (the chain is dropped), never a SIGBUS in a worker."""
    size, offset, fd_size = SHORT[case]
    short = GuestRegion(0, size, fd_size=fd_size, mmap_offset=offset)
    ctx = served_before_rings(tmp_path) if when == "before_rings" else serve(tmp_path)
    with ctx as srv:
        fe = srv.fe
        mark = srv.mark()
        if when == "add_mem_reg":
            status = fe.ack(R.ADD_MEM_REG, short.single(), [short.fd])
        else:
            status = fe.ack(R.SET_MEM_TABLE, table(base_entry(fe), short.entry()),
                            [fe.memfd, short.fd])
        assert status != 0, "a region larger than its fd was accepted"
        line = srv.expect_log(mark, rf"region at guest address {short.gpa:#x}\b.*refused")
        assert str(offset + size) in line and str(fd_size) in line, line
        if when == "before_rings":
            start_rings(srv)
        # the descriptor beyond the fd's end is outside guest memory now
        end = short.gpa + fd_size - offset + 4096
        unique = srv.next_unique()
        (hdr, n, _), = fe.make_buffers([fuse.IN_HEADER.pack(
            fuse.IN_HEADER_SIZE, fuse.Opcode.GETATTR, unique, fuse.ROOT_ID, 0, 0, 1, 0, 0)],
            [])
        head = fe.submit_descs(1, [(hdr, n, 0), (end, 4096, F_WRITE)])
        assert srv.wait(1, head)[0] == 0
        srv.expect_log(mark, rf"dropped descriptor chain at head {head}: .*outside")
        assert_no_restarts(srv)
        srv.assert_alive(queues=(1, 2))
    short.close()


# ----- (c) a worker that does not answer -----------------------------------------------


SYS_OPENAT = {"x86_64": 257, "aarch64": 56}[platform.machine()]


def in_openat(pid: int) -> bool:
    """Whether pid sleeps in openat (its /proc syscall line: number, arguments...)."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == str(SYS_OPENAT)
    except (OSError, IndexError):
        return False


def children(pid: int) -> dict[int, str]:
    """pid's children and their states (from every /proc/<p>/stat's ppid), less the
    process the workers are cloned from (workers/template/process.py) while it serves no queue
    (serving queue 0, workers/template/hiprio.py, it is named otherwise and counts)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        if int(fields[1]) == pid and text[text.find("(") + 1 : text.rfind(")")] != \
                "pyvfs-template":
            out[int(entry)] = fields[0]
    return out


def live_children_become(srv: Served, expected: set[int]) -> None:
    """The daemon's children are exactly ``expected``, none a zombie (a child it lost is
    reaped, not left behind), within a few seconds."""
    def settled() -> bool:
        now = children(srv.proc.pid)
        return set(now) == expected and "Z" not in now.values()
    deadline = time.monotonic() + 5
    while not settled():
        assert time.monotonic() < deadline, (
            f"daemon children {children(srv.proc.pid)}, expected {sorted(expected)} "
            f"and no zombie")
        time.sleep(0.02)


class Hang:
    """Makes the worker of one queue stop answering: ``lease`` puts it to sleep in a host
    openat(2) (an OPEN for writing of a file this test holds a read lease on: the kernel
    waits for the lease holder, 45 s by default), ``stop`` sends it SIGSTOP."""

    def __init__(self, srv: Served, how: str, q: int) -> None:
        self.srv, self.how, self.q = srv, how, q
        self.path = srv.share / "leased"
        self.path.write_bytes(b"leased")
        self.lease_fd = -1
        self.pending: dict[int, object] = {}  # ring (by its descriptor table) -> its OPEN
        if how == "lease":
            self.old_sigio = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the break notice
            self.lease_fd = os.open(self.path, os.O_RDONLY)
            fcntl.fcntl(self.lease_fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)

    def __call__(self, pid: int) -> None:
        """Hang queue q's worker ``pid`` (a new worker that replays the OPEN hangs alone)."""
        if self.how == "stop":
            os.kill(pid, signal.SIGSTOP)
            wait_for(f"worker {pid} is stopped", lambda: process_state(pid) == "T")
            return
        ring = self.srv.fe.rings[self.q]
        if ring.desc not in self.pending:
            error, nodeid, _ = self.srv.lookup(fuse.ROOT_ID, b"leased", q=self.q)
            assert error == 0
            self.pending[ring.desc] = self.srv.fe.start(
                fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_WRONLY, 0), q=self.q)
        wait_for(f"worker {pid} sleeps in openat", lambda: in_openat(pid))

    def release(self) -> None:
        if self.lease_fd >= 0:
            os.close(self.lease_fd)
            self.lease_fd = -1
            signal.signal(signal.SIGIO, self.old_sigio)


def timed(fe: Frontend, request: int, payload: bytes = b"", fds: list[int] | None = None
          ) -> tuple[float, bytes]:
    """Send a request that expects an answer (NEED_REPLY); (seconds to the answer, body)."""
    started = time.monotonic()
    fe.send(request, payload, fds, need_reply=request not in vu.REQUESTS_WITH_REPLY)
    try:
        got, body = fe.recv_reply(timeout=5)
    except TimeoutError:
        raise AssertionError(f"{R(request).name}: no answer within 5 s") from None
    assert got == request
    return time.monotonic() - started, body


def ack_status(body: bytes) -> int:
    return struct.unpack("<Q", body)[0]


def latest_worker(srv: Served, q: int, not_pid: int) -> int:
    wait_for(f"a new worker for queue {q}", lambda: worker_pids(srv.log()).get(q, not_pid)
             != not_pid)
    return worker_pids(srv.log())[q]


def resetup(srv: Served) -> None:
    """After a reset: negotiate again and lay out fresh rings, as a rebooted guest does."""
    fe = srv.fe
    for ring in fe.rings.values():
        os.close(ring.kick)
        os.close(ring.call)
    fe.rings.clear()
    fe.setup(3)
    wait_for("three workers", lambda: len(children(srv.proc.pid)) == 3)
    srv.workers = worker_pids(srv.log())


@pytest.mark.parametrize("how", ["lease", "stop"])
def test_a_hung_worker_never_stalls_the_control_plane(tmp_path: Path, how: str) -> None:
    """Queue 2's worker stops answering (asleep in a host system call, or stopped).
    GET_VRING_BASE still answers within a second with the used index (where the
    unanswered request is served again), the worker is killed and reaped; a new
    SET_VRING_KICK, with or without GET_VRING_BASE first, leaves exactly one worker on
    the ring; SET_MEM_TABLE, RESET_DEVICE and RESET_OWNER answer within a second too, and
    the daemon never keeps a zombie."""
    q = 2
    with serve(tmp_path) as srv:
        fe = srv.fe
        hang = Hang(srv, how, q)
        try:
            others = {srv.workers[0], srv.workers[1]}
            # GET_VRING_BASE on a hung worker
            stuck = srv.workers[q]
            hang(stuck)
            mark = srv.mark()
            took, body = timed(fe, R.GET_VRING_BASE, vu.VRING_STATE.pack(q, 0))
            assert took < ANSWER_WITHIN, f"GET_VRING_BASE took {took:.2f} s"
            index, base = vu.decode_vring_state(body)
            ring = fe.rings[q]
            assert index == q and base == ring.last_used
            if how == "lease":  # the OPEN it hangs in is served again from there
                assert base == (ring.next_avail - 1) & 0xFFFF
            srv.expect_log(mark, rf"queue {q}: worker {stuck} did not answer .*killed")
            live_children_become(srv, others)
            # the ring starts again, as QEMU restarts it
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            assert fe.ack(R.SET_VRING_BASE, vu.VRING_STATE.pack(q, base)) == 0
            took, body = timed(fe, R.SET_VRING_KICK, vu.U64.pack(q), [kick])
            assert took < ANSWER_WITHIN and ack_status(body) == 0
            os.close(ring.kick)
            ring.kick = kick
            assert fe.ack(R.SET_VRING_ENABLE, vu.VRING_STATE.pack(q, 1)) == 0
            worker = latest_worker(srv, q, stuck)
            live_children_become(srv, others | {worker})
            if how == "stop":
                srv.assert_serves(q)
            # SET_VRING_KICK on a ring whose worker hangs: still one worker on the ring
            hang(worker)  # (lease: the new worker replays the OPEN and hangs in it again)
            mark = srv.mark()
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            took, body = timed(fe, R.SET_VRING_KICK, vu.U64.pack(q), [kick])
            assert took < ANSWER_WITHIN and ack_status(body) == 0
            os.close(ring.kick)
            ring.kick = kick
            srv.expect_log(mark, rf"queue {q}: worker {worker} did not answer .*killed")
            worker = latest_worker(srv, q, worker)
            live_children_become(srv, others | {worker})
            # SET_MEM_TABLE (the same memory) while it hangs
            hang(worker)
            mark = srv.mark()
            took, body = timed(fe, R.SET_MEM_TABLE, table(base_entry(fe)), [fe.memfd])
            assert took < ANSWER_WITHIN and ack_status(body) == 0
            srv.expect_log(mark, rf"queue {q}: worker {worker} did not answer .*killed")
            worker = latest_worker(srv, q, worker)
            live_children_become(srv, others | {worker})
            assert worker_pids(srv.log())[0] in others and worker_pids(srv.log())[1] in others
            if how == "stop":
                srv.assert_serves(q)
            # RESET_DEVICE and RESET_OWNER with a hung worker
            for reset in (R.RESET_DEVICE, R.RESET_OWNER):
                hang(worker)
                took, body = timed(fe, reset)
                assert took < ANSWER_WITHIN and ack_status(body) == 0, f"{reset.name}: {took}"
                live_children_become(srv, set())
                resetup(srv)
                worker = srv.workers[q]
                others = {srv.workers[0], srv.workers[1]}
        finally:
            hang.release()
        srv.call(fuse.Opcode.INIT, 0, fuse.INIT_IN.pack(
            7, 38, 131072, 0xFFFFFFFF & ~fuse.INIT_EXT, 0) + bytes(44))
        srv.assert_alive(queues=(1, 2))
        assert "Traceback" not in srv.log()


# ----- a worker busy for seconds still hears the supervisor -------------------------------


DEEP = 8192  # READs of 1 MiB queued at once: seconds of copying for the worker, all in C


def test_a_worker_draining_a_full_ring_still_answers(tmp_path: Path) -> None:
    """A guest that keeps a deep ring full (8192 READs of 1 MiB at once) keeps the worker
    answering in its C loop for seconds without a pause. Control messages still reach it
    within a fraction of a second, so it is not taken for hung and killed: SET_MEM_TABLE
    mid-drain is acknowledged by the worker itself and the drain goes on through the new
    table; SET_VRING_ENABLE 0 mid-drain stops it at once, and GET_VRING_BASE then gets
    the worker's own last avail index."""
    with served_before_rings(tmp_path, queue_size=32768) as srv:
        fe = srv.fe
        (srv.share / "big").write_bytes(bytes(range(256)) * 4096)
        start_rings(srv, 2)
        error, nodeid, _ = srv.lookup(fuse.ROOT_ID, b"big")
        assert error == 0
        error, fh = srv.open(nodeid)
        assert error == 0
        ring = fe.rings[1]
        out = fe.alloc(fuse.OUT_HEADER_SIZE + (1 << 20), 4096)
        first = used_index(fe, 1)
        for k in range(DEEP):
            arg = fuse.READ_IN.pack(fh, 0, 1 << 20, 0, 0, 0, 0)
            raw = fuse.IN_HEADER.pack(fuse.IN_HEADER_SIZE + len(arg), fuse.Opcode.READ,
                                      srv.next_unique(), nodeid, 0, 0, 1, 0, 0) + arg
            (hdr, n, _), = fe.make_buffers([raw], [])
            fe.put_desc(ring.desc, 2 * k, hdr, n, F_NEXT, 2 * k + 1)
            fe.put_desc(ring.desc, 2 * k + 1, out, fuse.OUT_HEADER_SIZE + (1 << 20), F_WRITE, 0)
            fe.publish(1, 2 * k, kick=False)
        os.eventfd_write(ring.kick, 1)
        wait_for("the worker drains", lambda: used_index(fe, 1) != first)
        took, body = timed(fe, R.SET_MEM_TABLE, table(base_entry(fe)), [fe.memfd])
        busy = (used_index(fe, 1) - first) & 0xFFFF
        assert took < ANSWER_WITHIN and ack_status(body) == 0, f"SET_MEM_TABLE: {took:.2f} s"
        assert busy < DEEP, "the ring drained before the message arrived: nothing tested"
        wait_for("every READ answered", lambda: (used_index(fe, 1) - first) & 0xFFFF == DEEP,
                 timeout=120)
        for k in range(DEEP):  # every one answered in full, in order
            elem = fe.off(ring.used) + 4 + 8 * ((first + k) % ring.size)
            head, written = struct.unpack_from("<II", fe.mem, elem)
            assert (head, written) == (2 * k, fuse.OUT_HEADER_SIZE + (1 << 20)), k
        assert fe.read_gpa(out + fuse.OUT_HEADER_SIZE, 1 << 20) == bytes(range(256)) * 4096
        # once more: disable the ring mid-drain, then stop it
        again = used_index(fe, 1)
        for k in range(DEEP):
            fe.publish(1, 2 * k, kick=False)
        os.eventfd_write(ring.kick, 1)
        wait_for("the worker drains", lambda: used_index(fe, 1) != again)
        took, body = timed(fe, R.SET_VRING_ENABLE, vu.VRING_STATE.pack(1, 0))
        assert took < ANSWER_WITHIN and ack_status(body) == 0, f"disable: {took:.2f} s"
        stopped_at = used_index(fe, 1)  # a disabled ring is left alone from the answer on
        took, body = timed(fe, R.GET_VRING_BASE, vu.VRING_STATE.pack(1, 0))
        assert took < ANSWER_WITHIN, f"GET_VRING_BASE: {took:.2f} s"
        _, base = vu.decode_vring_state(body)
        assert base == stopped_at == used_index(fe, 1)
        assert (base - again) & 0xFFFF < DEEP
        log = srv.log()
        assert "did not answer" not in log and "died" not in log and "Traceback" not in log
        assert worker_pids(log) == srv.workers
