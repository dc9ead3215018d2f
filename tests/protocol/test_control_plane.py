"""The control plane while workers serve.

Memory-table changes (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) reach running workers and
are used for the very next request, under load, without restarting anybody."""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct
import threading
from pathlib import Path

import pytest

from daemon import fuse
from daemon import vhost_user as vu
from tests.frontend import F_NEXT, F_WRITE, GUEST_BASE, UVA_BASE, Frontend
from tests.protocol.test_hostile_guest import (
    KNOWN,
    KNOWN_DATA,
    Served,
    serve,
    worker_pids,
)

R = vu.Request
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
            with pytest.raises(TimeoutError):  # it waits for the host's lock
                fe.wait_used(1, timeout=0.5)
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
