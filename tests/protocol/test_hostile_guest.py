"""A hostile guest against pyvirtiofsd: malformed descriptor chains, malformed FUSE
requests, forged ids, and attempts to reach host files outside the share.

Every test asserts what the guest would see (the errno in the FUSE reply, used length 0
for a dropped request, file contents on the host) and then that the same daemon still
answers LOOKUP + READ of a known file with its exact bytes, that the daemon and its
workers are alive, and that the daemon log has a line about the bad input.

The helpers here are shared with test_vhost_user.py."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu
from tests.support.daemon import daemon_log, start_pyvirtiofsd
from tests.support.frontend import (  # reclaim: shared from here with other tests
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    GUEST_BASE,
    Frontend,
    reclaim,
)
from tests.support.reference import stop_daemon
from workers.queue_worker import MAX_REQUEST

KNOWN = b"known.txt"
KNOWN_DATA = bytes(range(256)) * 16 + b"-the end-"
NUM_QUEUES = 3  # hiprio + two request queues: two workers besides queue 0's
LOG_WAIT = 3.0


@dataclass
class Served:
    """A daemon, its share, a directory beside the share, and a front-end set up on it."""

    proc: subprocess.Popen[bytes]
    fe: Frontend
    share: Path
    outside: Path
    socket_path: Path
    unique: int = 1 << 32
    workers: dict[int, int] = field(default_factory=dict)

    # ----- log ------------------------------------------------------------------

    def log(self) -> str:
        return daemon_log(self.proc)

    def mark(self) -> int:
        return len(self.log())

    def expect_log(self, mark: int, pattern: str) -> str:
        """Wait (briefly) for a log line after ``mark`` that matches ``pattern``."""
        deadline = time.monotonic() + LOG_WAIT
        while True:
            text = self.log()[mark:]
            m = re.search(pattern, text, re.IGNORECASE)
            if m:
                return text[m.start() : text.find("\n", m.start())]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no daemon log line matching {pattern!r} after the bad input; "
                    f"new log lines:\n{text}"
                )
            time.sleep(0.02)

    # ----- requests -------------------------------------------------------------

    def next_unique(self) -> int:
        self.unique += 1
        return self.unique

    def chain(self, q: int, readable: list[bytes], writable: list[int], *,
              indirect: bool = False, timeout: float = 10) -> tuple[int, bytes]:
        """Submit one chain of fresh buffers; returns (used length, written bytes)."""
        bufs = self.fe.make_buffers(readable, writable)
        head = self.fe.submit_descs(q, bufs, indirect=indirect)
        return self.wait(q, head, bufs, timeout)

    def wait(self, q: int, head: int, bufs: list[tuple] | None = None,
             timeout: float = 10) -> tuple[int, bytes]:
        got, written = self.fe.wait_used(q, timeout)
        assert got == head, f"used head {got}, expected {head}"
        reclaim(self.fe, q)
        if bufs is None:
            return written, b""
        room = sum(n for _, n, f in bufs if f & F_WRITE)
        assert written <= room, f"used length {written} > the {room} writable bytes"
        out = b"".join(self.fe.read_gpa(g, n) for g, n, f in bufs if f & F_WRITE)
        return written, out[:written]

    def request(self, opcode: int, nodeid: int, arg: bytes = b"", *, q: int = 1,
                out_size: int = 4096, length: int | None = None,
                split: bool = False, indirect: bool = False, timeout: float = 10,
                uid: int = 0, gid: int = 0) -> tuple[int, int, bytes]:
        """A FUSE request whose header length may lie; returns (used length, error,
        payload). ``split`` puts header and argument in separate descriptors; the reply
        must come within ``timeout`` seconds (TimeoutError)."""
        unique = self.next_unique()
        if length is None:
            length = fuse.IN_HEADER_SIZE + len(arg)
        hdr = fuse.IN_HEADER.pack(length, opcode, unique, nodeid, uid, gid, 1, 0, 0)
        readable = [hdr, arg] if split and arg else [hdr + arg]
        written, out = self.chain(q, readable, [out_size] if out_size else [],
                                  indirect=indirect, timeout=timeout)
        if written == 0:
            return 0, 0, b""
        assert written >= fuse.OUT_HEADER_SIZE, f"reply of {written} bytes"
        total, error, got_unique = fuse.OUT_HEADER.unpack_from(out)
        assert got_unique == unique, f"reply for request {got_unique}, sent {unique}"
        assert total == written, f"out header says {total} bytes, used element {written}"
        return written, error, out[fuse.OUT_HEADER_SIZE :]

    def call(self, opcode: int, nodeid: int, arg: bytes = b"", *, q: int = 1,
             out_size: int = 4096, timeout: float = 10, uid: int = 0, gid: int = 0
             ) -> tuple[int, bytes]:
        """A well-formed request; returns (error, payload) as the guest sees them."""
        written, error, payload = self.request(opcode, nodeid, arg, q=q, out_size=out_size,
                                               timeout=timeout, uid=uid, gid=gid)
        assert written, f"opcode {opcode}: request dropped (used length 0)"
        return error, payload

    def lookup(self, parent: int, name: bytes, q: int = 1) -> tuple[int, int, int]:
        """(error, nodeid, mode)."""
        error, payload = self.call(fuse.Opcode.LOOKUP, parent, name + b"\0", q=q)
        if error:
            return error, 0, 0
        nodeid = struct.unpack_from("<Q", payload)[0]
        mode = struct.unpack_from("<I", payload, fuse.ENTRY_HEAD.size + 60)[0]
        return 0, nodeid, mode

    def open(self, nodeid: int, flags: int = os.O_RDONLY, q: int = 1) -> tuple[int, int]:
        error, payload = self.call(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(flags, 0), q=q)
        return error, (struct.unpack_from("<Q", payload)[0] if not error else 0)

    def opendir(self, nodeid: int, q: int = 1) -> tuple[int, int]:
        error, payload = self.call(fuse.Opcode.OPENDIR, nodeid, fuse.OPEN_IN.pack(0, 0), q=q)
        return error, (struct.unpack_from("<Q", payload)[0] if not error else 0)

    def read(self, nodeid: int, fh: int, size: int, offset: int = 0,
             q: int = 1) -> tuple[int, bytes]:
        arg = fuse.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
        return self.call(fuse.Opcode.READ, nodeid, arg, q=q, out_size=size + 16)

    def release(self, nodeid: int, fh: int, q: int = 1, opcode: int = fuse.Opcode.RELEASE,
                ) -> None:
        error, _ = self.call(opcode, nodeid, fuse.RELEASE_IN.pack(fh, 0, 0, 0), q=q)
        assert error == 0

    def forget(self, nodeid: int, n: int = 1, q: int = 1) -> None:
        written, _, _ = self.request(fuse.Opcode.FORGET, nodeid, fuse.FORGET_IN.pack(n),
                                     q=q, out_size=0)
        assert written == 0

    def readdir_names(self, nodeid: int, q: int = 1) -> tuple[int, list[bytes]]:
        error, fh = self.opendir(nodeid, q)
        if error:
            return error, []
        arg = fuse.READ_IN.pack(fh, 0, 65536, 0, 0, 0, 0)
        error, payload = self.call(fuse.Opcode.READDIR, nodeid, arg, q=q, out_size=65600)
        self.release(nodeid, fh, q, fuse.Opcode.RELEASEDIR)
        names: list[bytes] = []
        pos = 0
        while pos < len(payload):
            _ino, _off, namelen, _type = fuse.DIRENT_HEAD.unpack_from(payload, pos)
            start = pos + fuse.DIRENT_HEAD.size
            names.append(payload[start : start + namelen])
            pos += fuse.dirent_size(namelen)
        return error, names

    # ----- the checks after every bad input ----------------------------------------

    def assert_serves(self, q: int = 1) -> None:
        """LOOKUP + OPEN + READ of the known file returns its exact bytes on queue q."""
        error, nodeid, mode = self.lookup(fuse.ROOT_ID, KNOWN, q)
        assert error == 0 and nodeid, f"LOOKUP {KNOWN!r} on queue {q}: error {error}"
        assert mode & 0o170000 == 0o100000
        error, fh = self.open(nodeid, q=q)
        assert error == 0, f"OPEN: {error}"
        error, data = self.read(nodeid, fh, len(KNOWN_DATA) + 100, q=q)
        assert error == 0 and data == KNOWN_DATA, f"READ: error {error}, {len(data)} bytes"
        self.release(nodeid, fh, q)
        self.forget(nodeid, 1, q)

    def assert_alive(self, queues: tuple[int, ...] = (1,)) -> None:
        """Daemon and every worker still running; the same daemon serves ``queues``."""
        assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode}"
        children = child_pids(self.proc.pid)
        for q, pid in self.workers.items():
            assert pid in children, f"worker {pid} of queue {q} is gone: {self.log()}"
            assert process_state(pid) not in ("Z", "X"), f"worker {pid} of queue {q} died"
        for q in queues:
            self.assert_serves(q)


def child_pids(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.add(int(entry))
    return out


def process_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "X"
    return stat[stat.rfind(")") + 2]


def worker_pids(log: str) -> dict[int, int]:
    return {int(q): int(p) for q, p in re.findall(r"queue (\d+): worker (\d+) started", log)}


def make_share(base: Path) -> tuple[Path, Path]:
    share = base / "share"
    outside = base / "outside"
    share.mkdir()
    outside.mkdir()
    (share / KNOWN.decode()).write_bytes(KNOWN_DATA)
    (outside / "victim").write_bytes(b"host secret\n")
    return share, outside


@contextlib.contextmanager
def serve(base: Path, *extra: str, num_queues: int = NUM_QUEUES,
          wrapper: Sequence[str] = ()) -> Iterator[Served]:
    """A fresh share and daemon under ``base`` with a set-up front-end and FUSE INIT;
    ``wrapper``: a command the daemon runs under (another uid)."""
    share, outside = make_share(base)
    socket_path = base / "vu.sock"
    proc = start_pyvirtiofsd(share, socket_path, *extra, wrapper=wrapper)
    fe: Frontend | None = None
    try:
        fe = Frontend(str(socket_path), memory_size=64 << 20, queue_size=256)
        fe.setup(num_queues)
        srv = Served(proc, fe, share, outside, socket_path)
        deadline = time.monotonic() + 10
        while len(worker_pids(srv.log())) < num_queues and time.monotonic() < deadline:
            time.sleep(0.02)
        srv.workers = worker_pids(srv.log())
        assert len(srv.workers) == num_queues, srv.log()
        error, _ = srv.call(fuse.Opcode.INIT, 0, fuse.INIT_IN.pack(
            7, 38, 131072, 0xFFFFFFFF & ~fuse.INIT_EXT, 0) + bytes(44))
        assert error == 0
        yield srv
    except BaseException:
        print(daemon_log(proc))
        raise
    finally:
        if fe is not None:
            fe.close()
        stop_daemon(proc)


def get_features(fe: Frontend) -> int:
    return vu.decode_u64(fe.call(vu.Request.GET_FEATURES))


# ===================================================================================
# fixtures
# ===================================================================================

E = errno


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One daemon for the cases that cannot disturb each other; each still checks that
    the daemon and its workers are alive and serving after its bad input."""
    with serve(tmp_path_factory.mktemp("hostile")) as srv:
        yield srv


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path) as srv:
        yield srv


def name_arg(*names: bytes) -> bytes:
    return b"".join(n + b"\0" for n in names)


def lookup_known(srv: Served) -> int:
    error, nodeid, _ = srv.lookup(fuse.ROOT_ID, KNOWN)
    assert error == 0 and nodeid
    return nodeid


# ===================================================================================
# descriptor chains
# ===================================================================================


def lookup_header(srv: Served, name: bytes = KNOWN) -> bytes:
    arg = name + b"\0"
    return fuse.IN_HEADER.pack(fuse.IN_HEADER_SIZE + len(arg), fuse.Opcode.LOOKUP,
                               srv.next_unique(), fuse.ROOT_ID, 0, 0, 1, 0, 0) + arg


BAD_RANGES = {
    # (readable descriptor that follows a valid header, expected log words)
    "address_outside_memory": (lambda fe: (GUEST_BASE + fe.size + 0x10000, 64), "outside"),
    "address_below_memory": (lambda fe: (0x1000, 64), "outside"),
    "address_plus_length_overflows": (lambda fe: ((1 << 64) - 0x1000, 0x2000), "overflows"),
    "length_crosses_end_of_region": (lambda fe: (GUEST_BASE + fe.size - 16, 64), "outside"),
    "huge_length_from_inside": (lambda fe: (GUEST_BASE + 0x1000, 0xFFFFFFFF), "outside"),
}


@pytest.mark.parametrize("case", sorted(BAD_RANGES))
@pytest.mark.parametrize("writable", [False, True], ids=["readable", "writable"])
def test_descriptor_outside_guest_memory(shared: Served, case: str, writable: bool) -> None:
    fe = shared.fe
    make, words = BAD_RANGES[case]
    addr, length = make(fe)
    mark = shared.mark()
    (hdr, _, _), (out, out_len, _) = fe.make_buffers([lookup_header(shared)], [4096])
    bad = (addr, length, F_WRITE if writable else 0)
    descs = [(hdr, fuse.IN_HEADER_SIZE + len(KNOWN) + 1, 0)]
    descs += [(out, out_len, F_WRITE), bad] if writable else [bad, (out, out_len, F_WRITE)]
    head = fe.submit_descs(1, descs)
    written, _ = shared.wait(1, head)
    assert written == 0, "a chain with a descriptor outside guest memory was answered"
    shared.assert_alive()
    shared.expect_log(mark, rf"dropped descriptor chain at head {head}: .*{words}")


def test_indirect_table_outside_guest_memory(shared: Served) -> None:
    fe, ring = shared.fe, shared.fe.rings[1]
    mark = shared.mark()
    head = ring.free.pop(0)
    fe.put_desc(ring.desc, head, GUEST_BASE + fe.size + 4096, 64, F_INDIRECT, 0)
    fe.publish(1, head)
    assert shared.wait(1, head)[0] == 0
    shared.assert_alive()
    shared.expect_log(mark, rf"dropped descriptor chain at head {head}: .*outside")


def test_head_index_beyond_queue_size(shared: Served) -> None:
    fe = shared.fe
    mark = shared.mark()
    head = fe.queue_size + 7
    fe.publish(1, head)
    got, written = fe.wait_used(1)
    assert (got, written) == (head, 0)
    shared.assert_alive()
    shared.expect_log(mark, rf"head index {head} >= queue size")


def test_direct_chain_loop(shared: Served) -> None:
    """A -> B -> A, both readable: the walk must stop, not spin or grow without end."""
    fe, ring = shared.fe, shared.fe.rings[1]
    raw = lookup_header(shared)
    (hdr, n, _), (pad, m, _) = fe.make_buffers([raw, b"x" * 64], [])
    a, b = ring.free.pop(0), ring.free.pop(0)
    fe.put_desc(ring.desc, a, hdr, n, F_NEXT, b)
    fe.put_desc(ring.desc, b, pad, m, F_NEXT, a)
    mark = shared.mark()
    fe.publish(1, a)
    assert shared.wait(1, a)[0] == 0
    shared.assert_alive()
    shared.expect_log(mark, rf"chain at head {a}: .*loop")


def test_self_loop_with_writable_descriptor(shared: Served) -> None:
    fe, ring = shared.fe, shared.fe.rings[1]
    raw = lookup_header(shared)
    (hdr, n, _), (out, m, _) = fe.make_buffers([raw], [4096])
    a, b = ring.free.pop(0), ring.free.pop(0)
    fe.put_desc(ring.desc, a, hdr, n, F_NEXT, b)
    fe.put_desc(ring.desc, b, out, m, F_NEXT | F_WRITE, b)
    mark = shared.mark()
    fe.publish(1, a)
    assert shared.wait(1, a)[0] == 0
    shared.assert_alive()
    shared.expect_log(mark, rf"chain at head {a}: .*loop")


def indirect_head(srv: Served, entries: list[tuple[int, int, int, int]],
                  table_len: int | None = None, head_flags: int = F_INDIRECT) -> int:
    """Publish a head pointing at an indirect table of (addr, len, flags, next)."""
    fe, ring = srv.fe, srv.fe.rings[1]
    table = fe.alloc(16 * max(len(entries), 4), 16)
    for i, (addr, length, flags, nxt) in enumerate(entries):
        fe.put_desc(table, i, addr, length, flags, nxt)
    head = ring.free.pop(0)
    size = 16 * len(entries) if table_len is None else table_len
    fe.put_desc(ring.desc, head, table, size, head_flags, 0)
    fe.publish(1, head)
    return head


def test_indirect_table_works(shared: Served) -> None:
    """Control: the same request in a well-formed indirect table is answered."""
    written, error, payload = shared.request(fuse.Opcode.LOOKUP, fuse.ROOT_ID,
                                             KNOWN + b"\0", indirect=True)
    assert written and error == 0
    shared.forget(struct.unpack_from("<Q", payload)[0])


INDIRECT_CASES = {
    "loop_in_table": ("loop", lambda h, o: [(*h, F_NEXT, 1), (*o, F_NEXT | F_WRITE, 0)], None),
    "next_outside_table": ("outside table", lambda h, o: [(*h, F_NEXT, 5), (*o, F_WRITE, 0)],
                           None),
    "length_not_multiple_of_16": ("indirect table of 24 bytes",
                                  lambda h, o: [(*h, F_NEXT, 1), (*o, F_WRITE, 0)], 24),
    "length_zero": ("indirect table of 0 bytes",
                    lambda h, o: [(*h, F_NEXT, 1), (*o, F_WRITE, 0)], 0),
    "length_beyond_memory": ("indirect table of|outside|overflow",
                             lambda h, o: [(*h, F_NEXT, 1), (*o, F_WRITE, 0)], 0xFFFFFFF0),
}


@pytest.mark.parametrize("case", sorted(INDIRECT_CASES))
def test_bad_indirect_table(shared: Served, case: str) -> None:
    words, build, table_len = INDIRECT_CASES[case]
    raw = lookup_header(shared)
    (hdr, n, _), (out, m, _) = shared.fe.make_buffers([raw], [4096])
    mark = shared.mark()
    head = indirect_head(shared, build((hdr, n), (out, m)), table_len)
    assert shared.wait(1, head)[0] == 0
    shared.assert_alive()
    shared.expect_log(mark, rf"chain at head {head}: .*({words})")


def test_nested_indirect_descriptor(shared: Served) -> None:
    fe = shared.fe
    raw = lookup_header(shared)
    (hdr, n, _), (out, m, _) = fe.make_buffers([raw], [4096])
    inner = fe.alloc(32, 16)
    fe.put_desc(inner, 0, hdr, n, F_NEXT, 1)
    fe.put_desc(inner, 1, out, m, F_WRITE, 0)
    mark = shared.mark()
    head = indirect_head(shared, [(inner, 32, F_INDIRECT, 0)])
    assert shared.wait(1, head)[0] == 0
    shared.assert_alive()
    shared.expect_log(mark, rf"chain at head {head}: indirect descriptor not allowed")


def test_indirect_descriptor_with_next(shared: Served) -> None:
    raw = lookup_header(shared)
    (hdr, n, _), (out, m, _) = shared.fe.make_buffers([raw], [4096])
    mark = shared.mark()
    head = indirect_head(shared, [(hdr, n, F_NEXT, 1), (out, m, F_WRITE, 0)],
                         head_flags=F_INDIRECT | F_NEXT)
    assert shared.wait(1, head)[0] == 0
    shared.assert_alive()
    shared.expect_log(mark, rf"chain at head {head}: indirect descriptor with NEXT")


def test_readable_after_writable(shared: Served) -> None:
    fe = shared.fe
    raw = lookup_header(shared)
    (hdr, n, _), (extra, k, _), (out, m, _) = fe.make_buffers([raw, b"zz"], [4096])
    mark = shared.mark()
    head = fe.submit_descs(1, [(hdr, n, 0), (out, m, F_WRITE), (extra, k, 0)])
    assert shared.wait(1, head)[0] == 0
    shared.assert_alive()
    shared.expect_log(mark, rf"chain at head {head}: device-readable descriptor after")


def test_avail_index_jump_disables_only_that_queue(fresh: Served) -> None:
    fe, ring = fresh.fe, fresh.fe.rings[1]
    mark = fresh.mark()
    a = fe.off(ring.avail)
    old, new = ring.next_avail, (ring.next_avail + ring.size + 5) & 0xFFFF
    struct.pack_into("<H", fe.mem, a + 2, new)
    os.eventfd_write(ring.kick, 1)
    fresh.expect_log(mark, rf"queue 1: avail index jumped from {old} to {new}; waiting for a")
    assert fresh.proc.poll() is None
    assert get_features(fe) & vu.VIRTIO_F_VERSION_1
    fresh.assert_alive(queues=(2, 0))


# ===================================================================================
# FUSE framing
# ===================================================================================


@pytest.mark.parametrize("size", [0, 1, 39])
def test_request_shorter_than_header(shared: Served, size: int) -> None:
    raw = lookup_header(shared)[:size] if size else b""
    mark = shared.mark()
    readable = [raw] if size else []
    written, _ = shared.chain(1, readable, [4096])
    assert written == 0
    shared.assert_alive()
    shared.expect_log(mark, rf"request of {size} bytes has no FUSE header")


def test_header_split_over_descriptors_is_fine(shared: Served) -> None:
    """Control for the framing cases: a header in three pieces is still a request."""
    raw = lookup_header(shared)
    written, out = shared.chain(1, [raw[:7], raw[7:33], raw[33:]], [4096])
    total, error, _ = fuse.OUT_HEADER.unpack_from(out)
    assert written == total == fuse.OUT_HEADER_SIZE + fuse.ENTRY_OUT_SIZE and error == 0
    shared.forget(struct.unpack_from("<Q", out, fuse.OUT_HEADER_SIZE)[0])


@pytest.mark.parametrize("delta", [1, 100, 1 << 20], ids=["+1", "+100", "+1MiB"])
def test_header_length_larger_than_sent(shared: Served, delta: int) -> None:
    arg = KNOWN + b"\0"
    mark = shared.mark()
    written, error, _ = shared.request(fuse.Opcode.LOOKUP, fuse.ROOT_ID, arg,
                                       length=fuse.IN_HEADER_SIZE + len(arg) + delta)
    assert written == fuse.OUT_HEADER_SIZE and error == -E.EINVAL
    shared.assert_alive()
    shared.expect_log(mark, r"header length \d+ does not match")


@pytest.mark.parametrize("length", [0, 16, 39])
def test_header_length_smaller_than_header(shared: Served, length: int) -> None:
    mark = shared.mark()
    written, error, _ = shared.request(fuse.Opcode.LOOKUP, fuse.ROOT_ID, KNOWN + b"\0",
                                       length=length)
    assert written == fuse.OUT_HEADER_SIZE and error == -E.EINVAL
    shared.assert_alive()
    shared.expect_log(mark, rf"header length {length} does not match")


def test_huge_request_sent_in_full_gets_enomem(shared: Served) -> None:
    """More than 1 MiB of data plus 64 KiB of headers, all of it really in the chain."""
    length = MAX_REQUEST + 8
    arg = KNOWN + b"\0" + bytes(length - fuse.IN_HEADER_SIZE - len(KNOWN) - 1)
    mark = shared.mark()
    written, error, _ = shared.request(fuse.Opcode.LOOKUP, fuse.ROOT_ID, arg)
    assert written == fuse.OUT_HEADER_SIZE and error == -E.ENOMEM
    shared.assert_alive()
    shared.expect_log(mark, rf"request of {length} bytes is too large")


@pytest.mark.parametrize("length", [MAX_REQUEST + 1, 0xFFFFFFFF])
def test_huge_header_length_gets_enomem(shared: Served, length: int) -> None:
    """A header claiming more than the daemon ever accepts is ENOMEM (as in virtiofsd),
    whatever the chain holds."""
    mark = shared.mark()
    written, error, _ = shared.request(fuse.Opcode.GETATTR, fuse.ROOT_ID, bytes(16),
                                       length=length)
    assert written == fuse.OUT_HEADER_SIZE
    assert error == -E.ENOMEM, f"header.len {length:#x}: error {error}, expected ENOMEM"
    shared.assert_alive()
    shared.expect_log(mark, rf"request of {length} bytes is too large")


@pytest.mark.parametrize("opcode", [0, 7, 99, 4242, 0xFFFFFFFF])
def test_unknown_opcode_is_enosys(shared: Served, opcode: int) -> None:
    mark = shared.mark()
    error, payload = shared.call(opcode, fuse.ROOT_ID, bytes(64))
    assert (error, payload) == (-E.ENOSYS, b"")
    assert error == -38
    shared.assert_alive()
    shared.expect_log(mark, rf"opcode {opcode} not implemented")


def test_reply_buffer_too_small_is_erange(shared: Served) -> None:
    written, error, payload = shared.request(fuse.Opcode.LOOKUP, fuse.ROOT_ID, KNOWN + b"\0",
                                             out_size=fuse.OUT_HEADER_SIZE + 100)
    assert (written, error, payload) == (fuse.OUT_HEADER_SIZE, -E.ERANGE, b"")
    shared.assert_alive()


@pytest.mark.parametrize("out_size", [0, 1, 8, 15])
@pytest.mark.parametrize("op", ["GETATTR", "LOOKUP", "READ", "bad_header"])
def test_writable_part_smaller_than_out_header_is_dropped(shared: Served, op: str,
                                                          out_size: int) -> None:
    nodeid = fh = 0
    if op == "READ":
        nodeid = lookup_known(shared)
        error, fh = shared.open(nodeid)
        assert error == 0
    args = {
        "GETATTR": (fuse.Opcode.GETATTR, fuse.ROOT_ID, bytes(16), None),
        "LOOKUP": (fuse.Opcode.LOOKUP, fuse.ROOT_ID, KNOWN + b"\0", None),
        "READ": (fuse.Opcode.READ, nodeid, fuse.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0), None),
        "bad_header": (fuse.Opcode.GETATTR, fuse.ROOT_ID, bytes(16), 20),
    }
    opcode, node, arg, length = args[op]
    mark = shared.mark()
    written, _, _ = shared.request(opcode, node, arg, out_size=out_size, length=length)
    if op == "READ":
        shared.release(nodeid, fh)
        shared.forget(nodeid)
    assert written == 0, f"{op} with {out_size} writable bytes: used length {written}"
    shared.assert_alive()
    shared.expect_log(mark, r"no room for a reply")


# ===================================================================================
# FUSE arguments
# ===================================================================================

TRUNCATED = {
    "INIT": (fuse.Opcode.INIT, bytes(8)),
    "SETATTR": (fuse.Opcode.SETATTR, bytes(10)),
    "MKNOD": (fuse.Opcode.MKNOD, bytes(8)),
    "MKDIR": (fuse.Opcode.MKDIR, bytes(4)),
    "RENAME": (fuse.Opcode.RENAME, bytes(4)),
    "RENAME2": (fuse.Opcode.RENAME2, bytes(12)),
    "LINK": (fuse.Opcode.LINK, bytes(4)),
    "OPEN": (fuse.Opcode.OPEN, bytes(4)),
    "CREATE": (fuse.Opcode.CREATE, bytes(8)),
    "READ": (fuse.Opcode.READ, bytes(8)),
    "WRITE": (fuse.Opcode.WRITE, bytes(20)),
    "FLUSH": (fuse.Opcode.FLUSH, bytes(4)),
    "FSYNC": (fuse.Opcode.FSYNC, bytes(4)),
    "READDIR": (fuse.Opcode.READDIR, bytes(8)),
    "READDIRPLUS": (fuse.Opcode.READDIRPLUS, bytes(16)),
    "ACCESS": (fuse.Opcode.ACCESS, bytes(2)),
    "FALLOCATE": (fuse.Opcode.FALLOCATE, bytes(8)),
    "LSEEK": (fuse.Opcode.LSEEK, bytes(4)),
    "COPY_FILE_RANGE": (fuse.Opcode.COPY_FILE_RANGE, bytes(16)),
    "FSYNCDIR": (fuse.Opcode.FSYNCDIR, b""),
}


@pytest.mark.parametrize("name", sorted(TRUNCATED))
def test_truncated_argument_struct_is_einval(shared: Served, name: str) -> None:
    opcode, arg = TRUNCATED[name]
    mark = shared.mark()
    error, payload = shared.call(opcode, fuse.ROOT_ID, arg)
    assert (error, payload) == (-E.EINVAL, b""), f"{name} with {len(arg)} argument bytes"
    shared.assert_alive()
    shared.expect_log(mark, rf"(truncated arguments for opcode {opcode}|short {name})")


NO_NUL = {
    "LOOKUP": (fuse.Opcode.LOOKUP, KNOWN),
    "MKDIR": (fuse.Opcode.MKDIR, fuse.MKDIR_IN.pack(0o755, 0) + b"newdir"),
    "CREATE": (fuse.Opcode.CREATE, fuse.CREATE_IN.pack(os.O_RDWR, 0o644, 0, 0) + b"newfile"),
    "UNLINK": (fuse.Opcode.UNLINK, KNOWN),
    "SYMLINK_target": (fuse.Opcode.SYMLINK, b"newlink\0/etc/passwd"),
    "RENAME_newname": (fuse.Opcode.RENAME, fuse.RENAME_IN.pack(1) + KNOWN + b"\0moved"),
}


@pytest.mark.parametrize("name", sorted(NO_NUL))
def test_name_without_nul_is_einval(shared: Served, name: str) -> None:
    opcode, arg = NO_NUL[name]
    before = sorted(os.listdir(shared.share))
    mark = shared.mark()
    error, _ = shared.call(opcode, fuse.ROOT_ID, arg)
    assert error == -E.EINVAL
    assert sorted(os.listdir(shared.share)) == before
    shared.assert_alive()
    shared.expect_log(mark, r"not NUL-terminated")


BAD_NAMES = {"slash": b"a/b", "leading_slash": b"/etc", "dot": b".", "dotdot": b"..",
             "empty": b"", "up_and_out": b"../outside", "256_bytes": b"n" * 256}


def name_request(opcode: int, name: bytes) -> bytes:
    if opcode == fuse.Opcode.MKDIR:
        return fuse.MKDIR_IN.pack(0o755, 0) + name + b"\0"
    if opcode == fuse.Opcode.CREATE:
        return fuse.CREATE_IN.pack(os.O_RDWR, 0o644, 0, 0) + name + b"\0"
    if opcode == fuse.Opcode.MKNOD:
        return fuse.MKNOD_IN.pack(0o100644, 0, 0, 0) + name + b"\0"
    if opcode == fuse.Opcode.SYMLINK:
        return name + b"\0target\0"
    return name + b"\0"


@pytest.mark.parametrize("opcode", [fuse.Opcode.LOOKUP, fuse.Opcode.MKDIR, fuse.Opcode.CREATE,
                                    fuse.Opcode.MKNOD, fuse.Opcode.SYMLINK, fuse.Opcode.UNLINK,
                                    fuse.Opcode.RMDIR], ids=lambda o: o.name)
@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_bad_name_is_refused(shared: Served, case: str, opcode: fuse.Opcode) -> None:
    name = BAD_NAMES[case]
    want = -E.ENAMETOOLONG if len(name) > 255 else -E.EINVAL
    before = sorted(os.listdir(shared.share)), sorted(os.listdir(shared.outside))
    base = sorted(os.listdir(shared.share.parent))
    error, payload = shared.call(opcode, fuse.ROOT_ID, name_request(opcode, name))
    assert (error, payload) == (want, b""), f"{opcode.name} {name[:20]!r}: {error}"
    assert (sorted(os.listdir(shared.share)), sorted(os.listdir(shared.outside))) == before
    assert sorted(os.listdir(shared.share.parent)) == base
    shared.assert_alive()


FORGED_NODEIDS = {"zero": 0, "random": 0x5DEECE66D1234567, "all_ones": (1 << 64) - 1,
                  "root_plus_one_million": 1_000_001, "high_bit": 1 << 63}


@pytest.mark.parametrize("case", sorted(FORGED_NODEIDS))
@pytest.mark.parametrize("op", ["GETATTR", "LOOKUP", "OPEN", "OPENDIR", "MKDIR", "STATFS",
                                "SETATTR", "LINK_target", "RENAME_newdir"])
def test_forged_nodeid_is_ebadf(shared: Served, case: str, op: str) -> None:
    nodeid = FORGED_NODEIDS[case]
    known = lookup_known(shared)
    requests = {
        "GETATTR": (fuse.Opcode.GETATTR, nodeid, bytes(16)),
        "LOOKUP": (fuse.Opcode.LOOKUP, nodeid, KNOWN + b"\0"),
        "OPEN": (fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDONLY, 0)),
        "OPENDIR": (fuse.Opcode.OPENDIR, nodeid, fuse.OPEN_IN.pack(0, 0)),
        "MKDIR": (fuse.Opcode.MKDIR, nodeid, fuse.MKDIR_IN.pack(0o755, 0) + b"forged\0"),
        "STATFS": (fuse.Opcode.STATFS, nodeid, b""),
        "SETATTR": (fuse.Opcode.SETATTR, nodeid,
                    fuse.SETATTR_IN.pack(fuse.FATTR_MODE, *(0,) * 10, 0o777, 0, 0, 0, 0)),
        "LINK_target": (fuse.Opcode.LINK, fuse.ROOT_ID, fuse.LINK_IN.pack(nodeid) + b"lnk\0"),
        "RENAME_newdir": (fuse.Opcode.RENAME, fuse.ROOT_ID,
                          fuse.RENAME_IN.pack(nodeid) + KNOWN + b"\0moved\0"),
    }
    opcode, node, arg = requests[op]
    before = sorted(os.listdir(shared.share))
    error, _ = shared.call(opcode, node, arg)
    shared.forget(known)
    assert error == -E.EBADF, f"{op} on nodeid {nodeid:#x}: {error}"
    assert sorted(os.listdir(shared.share)) == before
    shared.assert_alive()


def test_forgotten_nodeid_is_ebadf(shared: Served) -> None:
    (shared.share / "gone.txt").write_bytes(b"gone")
    error, nodeid, _ = shared.lookup(fuse.ROOT_ID, b"gone.txt")
    assert error == 0
    assert shared.call(fuse.Opcode.GETATTR, nodeid, bytes(16))[0] == 0
    shared.forget(nodeid, 1)
    for opcode, arg in [(fuse.Opcode.GETATTR, bytes(16)),
                        (fuse.Opcode.OPEN, fuse.OPEN_IN.pack(os.O_RDONLY, 0)),
                        (fuse.Opcode.LOOKUP, b"x\0")]:
        error, _ = shared.call(opcode, nodeid, arg)
        assert error == -E.EBADF, f"opcode {opcode} on forgotten nodeid {nodeid}: {error}"
    shared.assert_alive()


FORGED_FHS = {"zero": 0, "random": 0x0123456789ABCDEF, "all_ones": (1 << 64) - 1,
              "one": 1}


@pytest.mark.parametrize("case", sorted(FORGED_FHS))
@pytest.mark.parametrize("op", ["READ", "WRITE", "READDIR", "READDIRPLUS", "FLUSH", "FSYNC",
                                "SETATTR_fh", "LSEEK"])
def test_forged_fh_is_ebadf(shared: Served, case: str, op: str) -> None:
    fh = FORGED_FHS[case]
    known = lookup_known(shared)
    requests = {
        "READ": (fuse.Opcode.READ, known, fuse.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)),
        "WRITE": (fuse.Opcode.WRITE, known, fuse.WRITE_IN.pack(fh, 0, 5, 0, 0, 0, 0) + b"owned"),
        "READDIR": (fuse.Opcode.READDIR, fuse.ROOT_ID, fuse.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)),
        "READDIRPLUS": (fuse.Opcode.READDIRPLUS, fuse.ROOT_ID,
                        fuse.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)),
        "FLUSH": (fuse.Opcode.FLUSH, known, fuse.FLUSH_IN.pack(fh, 0, 0, 0)),
        "FSYNC": (fuse.Opcode.FSYNC, known, fuse.FSYNC_IN.pack(fh, 0, 0)),
        "SETATTR_fh": (fuse.Opcode.SETATTR, known, fuse.SETATTR_IN.pack(
            fuse.FATTR_FH | fuse.FATTR_SIZE, 0, fh, 0, *(0,) * 12)),
        "LSEEK": (fuse.Opcode.LSEEK, known, fuse.LSEEK_IN.pack(fh, 0, os.SEEK_SET, 0)),
    }
    opcode, node, arg = requests[op]
    error, _ = shared.call(opcode, node, arg)
    shared.forget(known)
    assert error == -E.EBADF, f"{op} with fh {fh:#x}: {error}"
    assert (shared.share / KNOWN.decode()).read_bytes() == KNOWN_DATA
    shared.assert_alive()


def test_released_fh_is_ebadf(shared: Served) -> None:
    known = lookup_known(shared)
    error, fh = shared.open(known)
    assert error == 0
    shared.release(known, fh)
    error, _ = shared.read(known, fh, 100)
    shared.forget(known)
    assert error == -E.EBADF
    shared.assert_alive()


SILENT = {
    "name_with_slash": (fuse.Opcode.LOOKUP, fuse.ROOT_ID, b"../outside\0", -errno.EINVAL,
                        r"(invalid name|\.\./outside)"),
    "forged_nodeid": (fuse.Opcode.GETATTR, 0x5DEECE66D1234567, bytes(16), -errno.EBADF,
                      r"(nodeid|inode) (0x5deece66d1234567|6768574230975169895)"),
    "forged_fh": (fuse.Opcode.READDIR, fuse.ROOT_ID,
                  fuse.READ_IN.pack(0x0123456789ABCDEF, 0, 4096, 0, 0, 0, 0), -errno.EBADF,
                  r"(file handle|fh) (0x123456789abcdef|81985529216486895)"),
}


@pytest.mark.parametrize("case", sorted(SILENT))
def test_errno_rejections_are_logged(shared: Served, case: str) -> None:
    """Inputs no Linux guest kernel sends (a name with '/', a nodeid or fh it was never
    given) are answered with an errno, and the daemon log must say so, as for every
    other bad input."""
    opcode, nodeid, arg, want, pattern = SILENT[case]
    mark = shared.mark()
    error, _ = shared.call(opcode, nodeid, arg)
    assert error == want
    shared.assert_alive()
    shared.expect_log(mark, pattern)


def test_reply_too_small_is_logged(shared: Served) -> None:
    mark = shared.mark()
    written, error, _ = shared.request(fuse.Opcode.GETATTR, fuse.ROOT_ID, bytes(16),
                                       out_size=fuse.OUT_HEADER_SIZE + 8)
    assert (written, error) == (fuse.OUT_HEADER_SIZE, -errno.ERANGE)
    shared.assert_alive()
    shared.expect_log(mark, r"(ERANGE|no room|too small|does not fit)")


@pytest.mark.parametrize("out_size", [0, 4096], ids=["no_reply_buffer", "reply_buffer"])
def test_forget_unknown_nodeids_gets_no_reply(shared: Served, out_size: int) -> None:
    (shared.share / "kept.txt").write_bytes(b"kept")
    error, kept, _ = shared.lookup(fuse.ROOT_ID, b"kept.txt")
    assert error == 0
    for nodeid, n in [(0, 1), (0x5DEECE66D1234567, 1), ((1 << 64) - 1, (1 << 64) - 1),
                      (fuse.ROOT_ID, (1 << 64) - 1), (kept + 1, 3), (kept ^ (1 << 40), 1)]:
        written, _, _ = shared.request(fuse.Opcode.FORGET, nodeid, fuse.FORGET_IN.pack(n),
                                       out_size=out_size)
        assert written == 0, f"FORGET {nodeid:#x} was answered"
    # a truncated FORGET, too
    assert shared.request(fuse.Opcode.FORGET, kept, b"\1", out_size=out_size)[0] == 0
    # the root and the one real reference are untouched
    assert shared.call(fuse.Opcode.GETATTR, kept, bytes(16))[0] == 0
    assert shared.call(fuse.Opcode.GETATTR, fuse.ROOT_ID, bytes(16))[0] == 0
    shared.forget(kept)
    shared.assert_alive()


@pytest.mark.parametrize("count", [2, 1000, 0xFFFFFFFF])
def test_batch_forget_count_beyond_payload(shared: Served, count: int) -> None:
    (shared.share / "batch.txt").write_bytes(b"b")
    error, nodeid, _ = shared.lookup(fuse.ROOT_ID, b"batch.txt")
    assert error == 0
    # one real entry (two lookups held: drop one) and a count promising many more
    error, again, _ = shared.lookup(fuse.ROOT_ID, b"batch.txt")
    assert error == 0 and again == nodeid
    arg = fuse.BATCH_FORGET_IN.pack(count, 0) + fuse.FORGET_ONE.pack(nodeid, 1) + b"\xff" * 9
    written, _, _ = shared.request(fuse.Opcode.BATCH_FORGET, 0, arg, out_size=0)
    assert written == 0
    written, _, _ = shared.request(fuse.Opcode.BATCH_FORGET, 0, b"\x05", out_size=4096)
    assert written == 0
    # exactly one lookup dropped: the nodeid still works, and one more FORGET ends it
    assert shared.call(fuse.Opcode.GETATTR, nodeid, bytes(16))[0] == 0
    shared.forget(nodeid)
    assert shared.call(fuse.Opcode.GETATTR, nodeid, bytes(16))[0] == -E.EBADF
    shared.assert_alive()


@pytest.mark.parametrize("sent", [0, 10, 99])
def test_write_size_beyond_data_sent(shared: Served, sent: int) -> None:
    known = lookup_known(shared)
    error, fh = shared.open(known, os.O_RDWR)
    assert error == 0
    arg = fuse.WRITE_IN.pack(fh, 0, 100, 0, 0, 0, 0) + b"W" * sent
    mark = shared.mark()
    error, _ = shared.call(fuse.Opcode.WRITE, known, arg)
    shared.release(known, fh)
    shared.forget(known)
    assert error == -E.EINVAL
    assert (shared.share / KNOWN.decode()).read_bytes() == KNOWN_DATA
    shared.assert_alive()
    shared.expect_log(mark, rf"WRITE of 100 bytes with {sent} sent")


def test_write_with_data_in_other_descriptors_works(shared: Served) -> None:
    """Control: a WRITE whose data is in its own descriptor lands in the file."""
    (shared.share / "w.txt").write_bytes(b"")
    error, nodeid, _ = shared.lookup(fuse.ROOT_ID, b"w.txt")
    error, fh = shared.open(nodeid, os.O_RDWR)
    assert error == 0
    arg = fuse.WRITE_IN.pack(fh, 0, 11, 0, 0, 0, 0) + b"hello world"
    written, error, payload = shared.request(fuse.Opcode.WRITE, nodeid, arg, split=True)
    assert error == 0 and fuse.WRITE_OUT.unpack(payload)[0] == 11
    shared.release(nodeid, fh)
    shared.forget(nodeid)
    assert (shared.share / "w.txt").read_bytes() == b"hello world"


# ===================================================================================
# escapes
# ===================================================================================


@pytest.mark.parametrize("target", ["/", "../../..", "ABS_OUTSIDE"])
def test_symlink_out_of_the_share_is_never_followed(fresh: Served, target: str) -> None:
    if target == "ABS_OUTSIDE":
        target = str(fresh.outside)
    (fresh.share / "esc").symlink_to(target)
    mark = fresh.mark()
    error, esc, mode = fresh.lookup(fuse.ROOT_ID, b"esc")
    assert error == 0 and stat.S_ISLNK(mode), f"LOOKUP esc: {error}, mode {mode:o}"
    error, payload = fresh.call(fuse.Opcode.GETATTR, esc, bytes(16))
    assert error == 0
    assert stat.S_ISLNK(struct.unpack_from("<I", payload, fuse.ATTR_OUT_HEAD.size + 60)[0])
    error, payload = fresh.call(fuse.Opcode.READLINK, esc)
    assert (error, payload) == (0, target.encode())
    for flags in (os.O_RDONLY, os.O_RDWR | os.O_TRUNC, os.O_RDONLY | os.O_DIRECTORY):
        error, _ = fresh.open(esc, flags)
        # EBADF as virtiofsd (open_inode: only regular files and directories are opened)
        assert error == -E.EBADF, f"OPEN of the symlink with flags {flags:#o}: {error}"
    error, names = fresh.readdir_names(esc)
    assert error < 0 and names == [], f"OPENDIR/READDIR through the symlink: {error} {names}"
    for name in (b"etc", b"tmp", b"proc", b"victim", b"outside", b"share"):
        error, nodeid, _ = fresh.lookup(esc, name)
        assert error < 0 and nodeid == 0, f"LOOKUP {name!r} under the symlink: {nodeid}"
    # the share root lists the symlink and nothing of the host
    error, names = fresh.readdir_names(fuse.ROOT_ID)
    assert error == 0 and set(names) == {b".", b"..", b"esc", KNOWN}
    # READDIRPLUS with the root's handle but the symlink as parent
    error, fh = fresh.opendir(fuse.ROOT_ID)
    error, payload = fresh.call(fuse.Opcode.READDIRPLUS, esc,
                                fuse.READ_IN.pack(fh, 0, 65536, 0, 0, 0, 0), out_size=65600)
    assert error < 0 or b"victim" not in payload and b"passwd" not in payload
    fresh.release(fuse.ROOT_ID, fh, opcode=fuse.Opcode.RELEASEDIR)
    assert fresh.log()[mark:].count("Traceback") == 0
    fresh.assert_alive()


def test_setattr_on_symlink_leaves_its_target_alone(fresh: Served) -> None:
    victim = fresh.outside / "victim"
    (fresh.share / "esc").symlink_to(victim)
    before = victim.stat()
    error, esc, _ = fresh.lookup(fuse.ROOT_ID, b"esc")
    assert error == 0
    for valid, size, mode in [(fuse.FATTR_SIZE, 0, 0), (fuse.FATTR_MODE, 0, 0o777),
                              (fuse.FATTR_MTIME | fuse.FATTR_ATIME, 0, 0)]:
        arg = fuse.SETATTR_IN.pack(valid, 0, 0, size, 0, 1, 1, 0, 0, 0, 0, mode, 0, 0, 0, 0)
        fresh.call(fuse.Opcode.SETATTR, esc, arg)
    after = victim.stat()
    assert victim.read_bytes() == b"host secret\n"
    assert (after.st_mode, after.st_mtime_ns, after.st_size) == (
        before.st_mode, before.st_mtime_ns, before.st_size)
    fresh.assert_alive()


def test_create_through_a_symlink_does_not_escape(fresh: Served) -> None:
    """CREATE on a name that is a symlink must not follow it (O_NOFOLLOW): neither make
    a new file outside the share nor open (and truncate) an existing one there."""
    victim = fresh.outside / "victim"
    fresh_target = fresh.outside / "planted"
    for name, target in [(b"evil_new", fresh_target), (b"evil_old", victim)]:
        error, _ = fresh.call(fuse.Opcode.SYMLINK, fuse.ROOT_ID,
                              name + b"\0" + str(target).encode() + b"\0")
        assert error == 0
    error, _ = fresh.call(fuse.Opcode.CREATE, fuse.ROOT_ID,
                          fuse.CREATE_IN.pack(os.O_RDWR, 0o644, 0, 0) + b"evil_new\0")
    assert error < 0, "CREATE followed a symlink out of the share"
    assert not fresh_target.exists(), "CREATE made a file outside the share"
    error, payload = fresh.call(fuse.Opcode.CREATE, fuse.ROOT_ID, fuse.CREATE_IN.pack(
        os.O_WRONLY | os.O_TRUNC, 0o644, 0, 0) + b"evil_old\0")
    if error == 0:  # show what the guest could do with the handle
        fh = struct.unpack_from("<Q", payload, fuse.ENTRY_OUT_SIZE)[0]
        nodeid = struct.unpack_from("<Q", payload)[0]
        fresh.call(fuse.Opcode.WRITE, nodeid, fuse.WRITE_IN.pack(fh, 0, 5, 0, 0, 0, 0) + b"owned")
    assert victim.read_bytes() == b"host secret\n", "CREATE opened a host file outside"
    assert error < 0
    fresh.assert_alive()


@pytest.mark.parametrize("name", [b"../x", b"../outside/x", b"sub/../../x", b"/tmp/x"])
def test_create_outside_the_share_is_refused(fresh: Served, name: bytes) -> None:
    base = fresh.share.parent
    before = sorted(os.listdir(base)), sorted(os.listdir(fresh.outside))
    for opcode in (fuse.Opcode.CREATE, fuse.Opcode.MKDIR, fuse.Opcode.MKNOD,
                   fuse.Opcode.SYMLINK):
        error, _ = fresh.call(opcode, fuse.ROOT_ID, name_request(opcode, name))
        assert error == -E.EINVAL, f"{opcode.name} {name!r}: {error}"
    assert (sorted(os.listdir(base)), sorted(os.listdir(fresh.outside))) == before
    assert not os.path.exists("/tmp/x") or name != b"/tmp/x"
    assert sorted(os.listdir(fresh.share)) == [KNOWN.decode()]
    fresh.assert_alive()


@pytest.mark.parametrize("name", [b"../linked", b"sub/linked", b"/linked", b".."])
def test_link_and_rename_with_slash_are_refused(fresh: Served, name: bytes) -> None:
    base = fresh.share.parent
    (fresh.share / "sub").mkdir()
    known = lookup_known(fresh)
    before = sorted(os.listdir(base)), sorted(os.listdir(fresh.outside))
    attempts = [
        (fuse.Opcode.LINK, fuse.LINK_IN.pack(known) + name + b"\0"),
        (fuse.Opcode.RENAME, fuse.RENAME_IN.pack(fuse.ROOT_ID) + KNOWN + b"\0" + name + b"\0"),
        (fuse.Opcode.RENAME2, fuse.RENAME2_IN.pack(fuse.ROOT_ID, 0, 0) + KNOWN + b"\0"
         + name + b"\0"),
        # and the other way round: pull a host file into the share
        (fuse.Opcode.RENAME, fuse.RENAME_IN.pack(fuse.ROOT_ID) + b"../outside/victim\0stolen\0"),
    ]
    for opcode, arg in attempts:
        error, _ = fresh.call(opcode, fuse.ROOT_ID, arg)
        assert error == -E.EINVAL, f"{opcode.name} {arg!r}: {error}"
    assert (sorted(os.listdir(base)), sorted(os.listdir(fresh.outside))) == before
    assert sorted(os.listdir(fresh.share)) == sorted([KNOWN.decode(), "sub"])
    assert os.listdir(fresh.share / "sub") == []
    fresh.forget(known)
    fresh.assert_alive()


def test_device_node_is_not_opened_by_the_daemon(fresh: Served) -> None:
    """A guest (root in the guest) may create device nodes in the share; the daemon must
    never open one itself, or the guest reaches the host's devices (CVE-2020-35517).
    Only regular files and directories may be opened (virtiofsd: is_safe_inode)."""
    os.mknod(fresh.share / "hostzero", 0o20666, os.makedev(1, 5))  # /dev/zero
    arg = fuse.MKNOD_IN.pack(stat.S_IFCHR | 0o666, os.makedev(1, 3) & 0xFFFFFFFF, 0, 0)
    error, _ = fresh.call(fuse.Opcode.MKNOD, fuse.ROOT_ID, arg + b"guestnull\0")
    assert error == 0  # creating it is the guest's business
    for name in (b"hostzero", b"guestnull"):
        error, nodeid, mode = fresh.lookup(fuse.ROOT_ID, name)
        assert error == 0 and stat.S_ISCHR(mode)
        error, fh = fresh.open(nodeid, os.O_RDWR)
        leaked = b""
        if error == 0:
            leaked = fresh.read(nodeid, fh, 16)[1]
        assert error < 0, f"OPEN of the char device {name!r} succeeded (read {leaked!r})"
    fresh.assert_alive()


def test_fifo_is_not_opened_by_the_daemon(fresh: Served) -> None:
    """Opening a FIFO without a writer blocks: the daemon must refuse it, not hang."""
    os.mkfifo(fresh.share / "fifo")
    error, nodeid, mode = fresh.lookup(fuse.ROOT_ID, b"fifo", q=2)
    assert error == 0 and stat.S_ISFIFO(mode)
    error, _ = fresh.open(nodeid, os.O_RDONLY, q=2)
    assert error < 0
    fresh.assert_alive(queues=(1, 2))
