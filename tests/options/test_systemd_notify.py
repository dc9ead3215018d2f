"""systemd's Type=notify and watchdog protocol (daemon/host/sd_notify.py), against a socket of
the test's own standing in for systemd's."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.host import sd_notify
from tests.support.daemon import daemon_log, start_pyvirtiofsd
from tests.support.frontend import Frontend
from tests.support.reference import stop_daemon


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


class Manager:
    """The receiving end of NOTIFY_SOCKET: every datagram, with when it came."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.got: list[tuple[float, dict[str, str]]] = []

    def collect(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                self.got.append((time.monotonic(), fields(self.sock.recv(4096))))
            except TimeoutError:
                pass

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10) -> dict:
        end = time.monotonic() + timeout
        while True:
            for _, f in self.got:
                if key in f and (value is None or f[key] == value):
                    return f
            if time.monotonic() > end:
                raise AssertionError(f"no {key}={value or '*'} in {self.got}")
            self.collect(0.1)

    def count(self, key: str) -> int:
        return sum(1 for _, f in self.got if key in f)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(str(tmp_path / "notify"))
    yield m
    m.sock.close()


def test_message_and_watchdog_interval() -> None:
    assert sd_notify.message(READY=1, STATUS="up") == b"READY=1\nSTATUS=up\n"
    with pytest.raises(ValueError):
        sd_notify.message(STATUS="two\nlines")
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "3000000"}, 7) == 1.5
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "7"},
                                       7) == 1.5
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "8"},
                                       7) is None
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "0"}, 7) is None
    assert sd_notify.watchdog_interval({}, 7) is None


def test_ready_once_listening_then_watchdog_status_and_stopping(
        tmp_path: Path, manager: Manager, monkeypatch: pytest.MonkeyPatch) -> None:
    share = tmp_path / "share"
    share.mkdir()
    sock = tmp_path / "vfs.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 100 ms
    proc = start_pyvirtiofsd(share, sock)
    try:
        ready = manager.wait_for("READY", "1")
        assert sock.exists()  # QEMU started now finds the socket
        assert ready["STATUS"] == f"waiting for the front-end on {sock}"
        manager.collect(1.5)
        assert manager.count("WATCHDOG") >= 3, manager.got
        fe = Frontend(str(sock))
        try:
            fe.setup(2)
            fe.init()
            manager.wait_for("STATUS", "front-end connected")
            os.kill(proc.pid, signal.SIGTERM)
            manager.wait_for("STOPPING", "1")
        finally:
            fe.close()
        assert proc.wait(timeout=20) == 0
    finally:
        log = daemon_log(proc)
        stop_daemon(proc)
    assert "systemd" not in log  # no complaint about the notification socket


def test_watchdog_for_another_process_is_not_ours(
        tmp_path: Path, manager: Manager, monkeypatch: pytest.MonkeyPatch) -> None:
    share = tmp_path / "share"
    share.mkdir()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    proc = start_pyvirtiofsd(share, tmp_path / "vfs.sock")
    try:
        manager.wait_for("READY", "1")
        manager.collect(1.0)
        assert manager.count("WATCHDOG") == 0
    finally:
        stop_daemon(proc)


def test_ready_from_inside_the_namespace_sandbox_on_an_abstract_socket(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server runs in its own mount and network namespaces, where neither a path
    outside the share nor an abstract name of the host is reachable: it must use the
    socket connected before it went in."""
    assert os.geteuid() == 0, "the namespace sandbox as set up here needs root"
    name = f"pyvirtiofsd-test-{os.getpid()}-{time.monotonic_ns()}"
    m = Manager("\0" + name)
    share = tmp_path / "share"
    share.mkdir()
    sock = tmp_path / "vfs.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    proc = start_pyvirtiofsd(share, sock, "--sandbox", "namespace")
    try:
        m.wait_for("READY", "1")
        m.collect(1.0)
        assert m.count("WATCHDOG") >= 2, m.got
    finally:
        stop_daemon(proc)
        m.sock.close()


def test_unreachable_notify_socket_is_reported_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    share = tmp_path / "share"
    share.mkdir()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    proc = start_pyvirtiofsd(share, tmp_path / "vfs.sock")
    try:
        deadline = time.monotonic() + 10
        while "systemd will not be told" not in (log := daemon_log(proc)) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # a second report (the bug this guards against) would follow now
        log = daemon_log(proc)
    finally:
        stop_daemon(proc)
    assert log.count("NOTIFY_SOCKET=") == 1
    assert "No such file or directory; systemd will not be told when the daemon is " \
           "ready" in log
