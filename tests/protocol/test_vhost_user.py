"""The vhost-user control plane against a misbehaving front-end, and the daemon's life
cycle (capabilities, pid file, SIGTERM).

Messages that break the framing end the connection (and, as with virtiofsd, the daemon);
well-framed but wrong requests get a nonzero REPLY_ACK and change nothing: afterwards the
same daemon still answers GET_FEATURES and serves FUSE requests on every queue."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.protocol import vhost_user as vu
from tests.protocol.test_hostile_guest import (
    Served,
    child_pids,
    get_features,
    make_share,
    process_state,
    serve,
    worker_pids,
)
from tests.support.daemon import REPO, daemon_log, start_pyvirtiofsd
from tests.support.frontend import GUEST_BASE, UVA_BASE, Frontend
from tests.support.reference import stop_daemon

R = vu.Request
QUEUE_NUM = 17  # --num-request-queues defaults to 16, plus the hiprio queue


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path, "--tag", "hostile-tag") as srv:
        yield srv


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 10) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"daemon still running:\n{daemon_log(proc)}") from None


def wait_gone(pids: set[int], timeout: float = 10) -> set[int]:
    """The pids that are still running (neither gone nor zombies) after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = {p for p in pids if process_state(p) not in ("X", "Z")}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def assert_disconnected(srv: Served, pattern: str) -> None:
    """The daemon dropped the connection, exited, left no worker and logged why,
    without a traceback."""
    srv.fe.sock.settimeout(10)
    try:
        rest = srv.fe.sock.recv(4096)
    except ConnectionResetError:
        rest = b""
    assert rest == b"", f"daemon answered a broken message: {rest!r}"
    wait_exit(srv.proc)
    assert not wait_gone(set(srv.workers.values())), "workers outlived the daemon"
    log = srv.log()
    srv.expect_log(0, pattern)
    assert "Traceback" not in log, log
    assert not srv.socket_path.exists()


# ----- broken framing: the connection ends -------------------------------------------


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x4 | 0x2], ids=hex)
def test_bad_version_flags_disconnect(fresh: Served, flags: int) -> None:
    fresh.fe.sock.sendall(vu.HEADER.pack(R.GET_FEATURES, flags, 0))
    assert_disconnected(fresh, rf"bad vhost-user version in flags {flags:#x}")


@pytest.mark.parametrize("size", [vu.MAX_PAYLOAD + 1, 1 << 20, 0xFFFFFFFF])
def test_oversized_payload_disconnects(fresh: Served, size: int) -> None:
    fresh.fe.sock.sendall(vu.HEADER.pack(R.SET_FEATURES, vu.VERSION, size) + bytes(64))
    assert_disconnected(fresh, rf"payload of {size} bytes .* too large")


# ----- well framed, wrong: nonzero REPLY_ACK, nothing changes -------------------------


def mem_table(fe: Frontend, count: int) -> bytes:
    regions = b"".join(vu.MEM_REGION.pack(GUEST_BASE + i * fe.size, fe.size,
                                          UVA_BASE + i * fe.size, 0) for i in range(count))
    return vu.MEM_TABLE_HEAD.pack(count, 0) + regions


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


REJECTED: dict[str, tuple[Callable[[Frontend], tuple[int, bytes, list[int]]], str]] = {
    "mem_table_more_regions_than_fds": (
        lambda fe: (R.SET_MEM_TABLE, mem_table(fe, 2), [fe.memfd]),
        r"2 memory regions but 1 fds"),
    "mem_table_regions_without_any_fd": (
        lambda fe: (R.SET_MEM_TABLE, mem_table(fe, 1), []), r"1 memory regions but 0 fds"),
    "mem_table_nine_regions": (
        lambda fe: (R.SET_MEM_TABLE, mem_table(fe, 9), [fe.memfd] * 9), r"9 regions"),
    "mem_table_truncated": (
        lambda fe: (R.SET_MEM_TABLE, mem_table(fe, 2)[:20], [fe.memfd]), r"memory table"),
    "vring_num_3": (lambda fe: (R.SET_VRING_NUM, vu.VRING_STATE.pack(3, 3), []),
                    r"queue size 3 is not a power of two"),
    "vring_num_0": (lambda fe: (R.SET_VRING_NUM, vu.VRING_STATE.pack(3, 0), []),
                    r"queue size 0 is not a power of two"),
    "vring_num_65536": (lambda fe: (R.SET_VRING_NUM, vu.VRING_STATE.pack(3, 65536), []),
                        r"queue size 65536"),
    "vring_num_queue_beyond_queue_num": (
        lambda fe: (R.SET_VRING_NUM, vu.VRING_STATE.pack(QUEUE_NUM, 256), []),
        rf"queue index {QUEUE_NUM} >= {QUEUE_NUM}"),
    "vring_addr_queue_beyond_queue_num": (
        lambda fe: (R.SET_VRING_ADDR, vu.VRING_ADDR.pack(200, 0, UVA_BASE, UVA_BASE,
                                                         UVA_BASE, 0), []),
        r"queue index 200"),
    "vring_kick_queue_beyond_queue_num": (
        lambda fe: (R.SET_VRING_KICK, vu.U64.pack(0x99), [eventfd()]), r"queue index 153"),
    "vring_enable_queue_beyond_queue_num": (
        lambda fe: (R.SET_VRING_ENABLE, vu.VRING_STATE.pack(0xFFFFFFFF, 1), []),
        r"queue index 4294967295"),
    "vring_kick_without_fd": (
        lambda fe: (R.SET_VRING_KICK, vu.U64.pack(1), []), r"carried 0 fds"),
    "unknown_request": (lambda fe: (0x7777, b"", []), r"UNKNOWN\(30583\)"),
    "set_config_read_only": (
        lambda fe: (R.SET_CONFIG, vu.CONFIG_HEAD.pack(0, 4, 0) + b"evil", []), r"read-only"),
    "set_features_never_offered": (
        lambda fe: (R.SET_FEATURES, vu.U64.pack(1 << 0 | vu.VIRTIO_F_VERSION_1), []),
        r"never offered"),
    "add_mem_reg_without_fd": (
        lambda fe: (R.ADD_MEM_REG, bytes(8) + vu.MEM_REGION.pack(1 << 40, 4096, 1 << 41, 0),
                    []), r"carried 0 fds"),
    "rem_mem_reg_unknown": (
        lambda fe: (R.REM_MEM_REG, bytes(8) + vu.MEM_REGION.pack(1 << 40, 4096, 1 << 41, 0),
                    []), r"no memory region"),
    "short_vring_state": (lambda fe: (R.SET_VRING_BASE, b"\1\0", []), r"vring state"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_rejected_request_gets_nonzero_ack(fresh: Served, case: str) -> None:
    fe = fresh.fe
    assert vu.decode_u64(fe.call(R.GET_QUEUE_NUM)) == QUEUE_NUM
    build, pattern = REJECTED[case]
    request, payload, fds = build(fe)
    mark = fresh.mark()
    assert fe.ack(request, payload, fds) != 0
    for fd in fds:
        if fd != fe.memfd:
            os.close(fd)
    assert get_features(fe) & vu.VIRTIO_F_VERSION_1
    fresh.assert_alive(queues=(0, 1, 2))
    fresh.expect_log(mark, pattern)
    assert "Traceback" not in fresh.log()


def test_ring_outside_the_memory_table_is_refused(fresh: Served) -> None:
    """Ring addresses that no memory region covers: refused at SET_VRING_ADDR or at the
    kick that starts the queue, never a worker that dies on start."""
    fe = fresh.fe
    bad = UVA_BASE + 2 * fe.size
    kick, call = eventfd(), eventfd()
    mark = fresh.mark()
    acks = [
        fe.ack(R.SET_VRING_NUM, vu.VRING_STATE.pack(3, 256)),
        fe.ack(R.SET_VRING_ADDR, vu.VRING_ADDR.pack(3, 0, bad, bad + 8192, bad + 4096, 0)),
        fe.ack(R.SET_VRING_BASE, vu.VRING_STATE.pack(3, 0)),
        fe.ack(R.SET_VRING_CALL, vu.U64.pack(3), [call]),
        fe.ack(R.SET_VRING_KICK, vu.U64.pack(3), [kick]),
    ]
    os.close(kick)
    os.close(call)
    assert acks[0] == 0 and (acks[1] != 0 or acks[4] != 0), f"acks {acks}"
    assert get_features(fe) & vu.VIRTIO_F_VERSION_1
    fresh.assert_alive(queues=(1, 2))
    fresh.expect_log(mark, r"(not in any region|outside|address)")
    assert "Traceback" not in fresh.log()


def test_unmappable_memory_table_keeps_the_old_one(fresh: Served) -> None:
    """A SET_MEM_TABLE whose fd cannot be mapped (a pipe) is refused; the workers keep
    the table they have and go on serving."""
    fe = fresh.fe
    r, w = os.pipe()
    mark = fresh.mark()
    try:
        status = fe.ack(R.SET_MEM_TABLE, mem_table(fe, 1), [r])
    finally:
        os.close(r)
        os.close(w)
    assert status != 0
    assert get_features(fe) & vu.VIRTIO_F_VERSION_1
    fresh.assert_alive(queues=(0, 1, 2))
    fresh.expect_log(mark, r"(cannot map|memory)")
    assert "Traceback" not in fresh.log()


@pytest.mark.parametrize("offset,size", [(0, 4096), (36, 8)])
def test_get_config_beyond_config_space(fresh: Served, offset: int, size: int) -> None:
    fe = fresh.fe
    reply = fe.call(R.GET_CONFIG, vu.CONFIG_HEAD.pack(0, 40, 0) + bytes(40))
    _, got_size, _ = vu.CONFIG_HEAD.unpack_from(reply)
    assert got_size == 40 and reply[12:24] == b"hostile-tag\0"
    mark = fresh.mark()
    # GET_CONFIG always has a reply; an error is a reply with an empty config
    fe.send(R.GET_CONFIG, vu.CONFIG_HEAD.pack(offset, size, 0) + bytes(min(size, 4096)))
    request, body = fe.recv_reply(timeout=5)
    assert request == R.GET_CONFIG
    assert body == b"" or vu.CONFIG_HEAD.unpack_from(body)[1] == 0, body
    assert get_features(fe) & vu.VIRTIO_F_VERSION_1
    fresh.assert_alive(queues=(1,))
    fresh.expect_log(mark, r"beyond")


# ----- life cycle -------------------------------------------------------------------


def test_print_capabilities() -> None:
    out = subprocess.run([sys.executable, "-m", "supervisor", "--print-capabilities"],
                         cwd=REPO, capture_output=True, check=True, timeout=30)
    caps = json.loads(out.stdout)
    assert caps["type"] == "fs"


def test_pid_file_and_second_daemon(tmp_path: Path) -> None:
    share, _ = make_share(tmp_path)
    sock = tmp_path / "vu.sock"
    pid_file = Path(f"{sock}.pid")
    proc = start_pyvirtiofsd(share, sock)
    try:
        assert int(pid_file.read_text().strip()) == proc.pid
        second = subprocess.run(
            [sys.executable, "-m", "supervisor", "--shared-dir", str(share),
             "--socket-path", str(sock), "--sandbox", "none"],
            cwd=REPO, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        assert second.returncode != 0
        assert str(pid_file) in second.stderr.decode(), second.stderr.decode()
        assert b"Traceback" not in second.stderr
        # the first daemon, its socket and its pid file are untouched
        assert proc.poll() is None and sock.is_socket()
        assert int(pid_file.read_text().strip()) == proc.pid
        fe = Frontend(str(sock))
        try:
            assert get_features(fe) & vu.VIRTIO_F_VERSION_1
        finally:
            fe.close()
        wait_exit(proc)
        assert not pid_file.exists() and not sock.exists()
    finally:
        stop_daemon(proc)


def test_sigterm_stops_daemon_and_workers(fresh: Served) -> None:
    pid = fresh.proc.pid
    children = child_pids(pid)
    workers = set(worker_pids(fresh.log()).values())
    assert workers and workers <= children
    fresh.proc.send_signal(signal.SIGTERM)
    wait_exit(fresh.proc)
    assert not wait_gone(children | workers), "processes outlived the daemon"
    assert not fresh.socket_path.exists()
    assert not Path(f"{fresh.socket_path}.pid").exists()
    assert "Traceback" not in fresh.log()
    fresh.expect_log(0, r"signal received")


def test_front_end_disconnect_ends_the_daemon(fresh: Served) -> None:
    workers = set(fresh.workers.values())
    fresh.fe.sock.shutdown(socket.SHUT_RDWR)
    assert wait_exit(fresh.proc) == 0
    assert not wait_gone(workers)
    assert not fresh.socket_path.exists()
    assert "Traceback" not in fresh.log()


def test_fds_with_a_message_that_does_not_take_them_are_closed(fresh: Served) -> None:
    """GET_FEATURES with 8 fds attached: none of them stays open in the daemon."""
    fe = fresh.fe
    marker = os.memfd_create("hostile-marker")
    before = len(os.listdir(f"/proc/{fresh.proc.pid}/fd"))
    fe.sock.sendmsg([vu.HEADER.pack(R.GET_FEATURES, vu.VERSION, 0)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("8i", *[marker] * 8))])
    request, _ = fe.recv_reply()
    assert request == R.GET_FEATURES
    os.close(marker)
    links = [os.readlink(f"/proc/{fresh.proc.pid}/fd/{fd}")
             for fd in os.listdir(f"/proc/{fresh.proc.pid}/fd")]
    assert not any("hostile-marker" in link for link in links), links
    assert len(links) <= before
    fresh.assert_alive()
