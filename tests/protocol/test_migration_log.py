"""Dirty-page logging for live migration (VHOST_F_LOG_ALL with LOG_SHMFD): while the
front-end logs, every guest page a worker writes — reply payloads, used ring entries and
index — has its bit in the log, from the C path and from Python alike, on every queue."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu
from tests.support.daemon import daemon_log, start_pyvirtiofsd
from tests.support.frontend import GUEST_BASE, UVA_BASE, Frontend
from tests.support.reference import stop_daemon

PAGE = 4096
MEMORY = 16 << 20
DATA = os.urandom(3 * PAGE + 123)  # a READ reply that spans pages


@contextlib.contextmanager
def served(tmp_path: Path, *extra: str, num_queues: int = 3) -> Iterator[Frontend]:
    share = tmp_path / "share"
    share.mkdir()
    (share / "data").write_bytes(DATA)
    sock = tmp_path / "vu.sock"
    proc = start_pyvirtiofsd(share, sock, *extra)
    fe = None
    try:
        fe = Frontend(str(sock), memory_size=MEMORY, queue_size=64)
        fe.setup(num_queues, protocol_features=vu.ProtocolFeature.LOG_SHMFD)
        fe.init()
        yield fe
    except BaseException:
        print(daemon_log(proc))
        raise
    finally:
        if fe is not None:
            fe.close()
        stop_daemon(proc)


class DirtyLog:
    """The front-end's side of the log: a memfd, a bit per page of guest memory."""

    def __init__(self) -> None:
        pages = (GUEST_BASE + MEMORY) // PAGE
        self.size = (pages + 7) // 8
        self.fd = os.memfd_create("dirty-log")
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size)

    def pages(self) -> set[int]:
        return {8 * i + b for i, byte in enumerate(self.map[:]) if byte
                for b in range(8) if byte >> b & 1}

    def clear(self) -> None:
        self.map[:] = bytes(self.size)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def pages_of(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1)) if length else set()


def set_log_all(fe: Frontend, on: bool) -> None:
    """As QEMU at the start and end of a migration: features, then each ring's flag."""
    features = fe.acked_features | (vu.VHOST_F_LOG_ALL if on else 0)
    assert fe.ack(vu.Request.SET_FEATURES, vu.U64.pack(features)) == 0
    for ring in fe.rings.values():
        uva = lambda gpa: UVA_BASE + gpa - GUEST_BASE  # noqa: E731
        assert fe.ack(vu.Request.SET_VRING_ADDR, vu.VRING_ADDR.pack(
            ring.index, vu.VRING_F_LOG if on else 0, uva(ring.desc), uva(ring.used),
            uva(ring.avail), ring.used if on else 0)) == 0


def requests(fe: Frontend, q: int) -> set[int]:
    """LOOKUP, GETATTR, READ (C path unless off), OPEN and STATFS (Python): the guest
    pages their replies and used elements were written to."""
    written: set[int] = set()
    ring = fe.rings[q]

    def one(opcode: int, nodeid: int, arg: bytes, out_size: int = 4096) -> bytes:
        used_at = ring.last_used % ring.size
        sent = fe.start(opcode, nodeid, arg, q=q, out_size=out_size)
        error, payload = fe.finish(sent)
        assert error == 0, (opcode, error)
        written.update(pages_of(sent.out_gpa, fuse.OUT_HEADER_SIZE + len(payload)))
        written.update(pages_of(ring.used + 4 + 8 * used_at, 8))
        written.update(pages_of(ring.used + 2, 2))
        return payload

    entry = one(fuse.Opcode.LOOKUP, 1, b"data\0")
    nodeid = fuse.ENTRY_HEAD.unpack_from(entry)[0]
    one(fuse.Opcode.GETATTR, nodeid, fuse.GETATTR_IN.pack(0, 0, 0))
    fh = fuse.OPEN_OUT.unpack_from(one(fuse.Opcode.OPEN, nodeid,
                                       fuse.OPEN_IN.pack(os.O_RDONLY, 0)))[0]
    data = one(fuse.Opcode.READ, nodeid, fuse.READ_IN.pack(fh, 0, len(DATA), 0, 0, 0, 0),
               out_size=len(DATA) + 64)
    assert data == DATA
    one(fuse.Opcode.STATFS, nodeid, b"")
    return written


@pytest.mark.parametrize("c_path", ["on", "off"])
def test_every_page_written_is_logged_while_log_all(tmp_path: Path, c_path: str) -> None:
    log = DirtyLog()
    with served(tmp_path, "--c-fast-path", c_path, "--num-request-queues", "2") as fe:
        reply = fe.call(vu.Request.SET_LOG_BASE, vu.LOG.pack(log.size, 0), [log.fd])
        assert reply in (b"", vu.U64.pack(0))
        requests(fe, 1)
        assert log.pages() == set(), "logged before VHOST_F_LOG_ALL"

        set_log_all(fe, True)
        log.clear()
        written = requests(fe, 1) | requests(fe, 2)
        missing = written - log.pages()
        assert not missing, f"written but not logged: {sorted(missing)}"
        # nothing far from what was written: the rings and request buffers only
        assert log.pages() <= pages_of(GUEST_BASE, fe.brk)

        set_log_all(fe, False)
        log.clear()
        requests(fe, 2)
        time.sleep(0.05)
        assert log.pages() == set(), "logged after VHOST_F_LOG_ALL was cleared"
    log.close()


def test_a_new_log_replaces_the_old_one(tmp_path: Path) -> None:
    """QEMU sends SET_LOG_BASE again when guest memory grows: workers switch to it."""
    first, second = DirtyLog(), DirtyLog()
    with served(tmp_path) as fe:
        fe.call(vu.Request.SET_LOG_BASE, vu.LOG.pack(first.size, 0), [first.fd])
        set_log_all(fe, True)
        fe.call(vu.Request.SET_LOG_BASE, vu.LOG.pack(second.size, 0), [second.fd])
        first.clear()
        written = requests(fe, 1)
        assert written <= second.pages()
        assert first.pages() == set()
    first.close()
    second.close()


def test_a_worker_started_while_logging_logs(tmp_path: Path) -> None:
    log = DirtyLog()
    with served(tmp_path, num_queues=2) as fe:
        fe.call(vu.Request.SET_LOG_BASE, vu.LOG.pack(log.size, 0), [log.fd])
        set_log_all(fe, True)
        fe.add_ring(2)
        log.clear()
        written = requests(fe, 2)
        assert written <= log.pages()
    log.close()


def test_features_offer_log_all_and_log_shmfd(tmp_path: Path) -> None:
    with served(tmp_path, num_queues=2) as fe:
        assert vu.decode_u64(fe.call(vu.Request.GET_FEATURES)) & vu.VHOST_F_LOG_ALL
        pf = vu.decode_u64(fe.call(vu.Request.GET_PROTOCOL_FEATURES))
        assert pf & vu.ProtocolFeature.LOG_SHMFD
        assert struct.calcsize("<QQ") == vu.LOG.size
