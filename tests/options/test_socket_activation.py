"""systemd socket activation: the listening socket arrives as fd 3 with LISTEN_FDS=1 and
LISTEN_PID naming the daemon (what a .socket unit with ListenStream=PATH hands over)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.support.frontend import Frontend
from tests.support.reference import stop_daemon

REPO = Path(__file__).resolve().parents[2]


def activated(tmp_path: Path, listen_pid: str | None, listen_fds: str = "1",
              kind: int = socket.SOCK_STREAM, socket_path_option: bool = False,
              ) -> tuple[subprocess.Popen[bytes], Path, Path]:
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("hi\n")
    sock_path = tmp_path / "vfs.sock"
    listener = socket.socket(socket.AF_UNIX, kind)
    listener.bind(str(sock_path))
    if kind == socket.SOCK_STREAM:
        listener.listen(1)
    fd = listener.fileno()
    # as systemd does: the socket as fd 3, LISTEN_PID the pid of the process it execs
    launcher = (
        "import os, sys\n"
        "fd = int(sys.argv[1])\n"
        "os.dup2(fd, 3)\n"
        "os.close(fd)\n"
        f"os.environ['LISTEN_FDS'] = {listen_fds!r}\n"
        f"os.environ['LISTEN_PID'] = {listen_pid!r} or str(os.getpid())\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n")
    log_path = tmp_path / "log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", launcher, str(fd), "-m", "supervisor",
             "--shared-dir", str(share), "--sandbox", "none",
             *(["--socket-path", str(sock_path)] if socket_path_option else [])],
            cwd=REPO, stdout=log, stderr=log, pass_fds=(fd,))
    listener.close()
    return proc, sock_path, log_path


def test_activated_socket_is_served(tmp_path: Path) -> None:
    proc, sock_path, log_path = activated(tmp_path, None)
    try:
        fe = Frontend(str(sock_path))
        try:
            fe.setup(2)
            fe.init()
            error, payload = fe.lookup(1, b"hello")
            assert error == 0 and payload
        finally:
            fe.close()
        assert proc.wait(timeout=20) == 0, log_path.read_text()
    finally:
        stop_daemon(proc)
    log = log_path.read_text()
    assert "sharing" in log and "on fd 3" in log


def test_socket_for_another_process_is_refused(tmp_path: Path) -> None:
    proc, _, log_path = activated(tmp_path, "1")
    assert proc.wait(timeout=20) == 2
    assert "socket activation: LISTEN_PID=1 names another process" in log_path.read_text()


def test_more_than_one_socket_is_refused(tmp_path: Path) -> None:
    proc, _, log_path = activated(tmp_path, None, listen_fds="2")
    assert proc.wait(timeout=20) == 2
    assert "LISTEN_FDS=2, expected exactly one socket" in log_path.read_text()


def test_datagram_socket_is_refused(tmp_path: Path) -> None:
    proc, _, log_path = activated(tmp_path, None, kind=socket.SOCK_DGRAM)
    assert proc.wait(timeout=20) == 2
    assert "fd 3 is not a UNIX stream socket" in log_path.read_text()


def test_socket_path_takes_over_the_passed_socket_of_that_path(tmp_path: Path) -> None:
    """pyvirtiofsd@.service names --socket-path; behind pyvirtiofsd@.socket systemd has
    bound that path already: the daemon serves the passed socket and leaves the path to
    systemd when it exits (the socket unit keeps listening on it)."""
    proc, sock_path, log_path = activated(tmp_path, None, socket_path_option=True)
    try:
        inode = sock_path.stat().st_ino
        fe = Frontend(str(sock_path))
        try:
            fe.setup(2)
            fe.init()
            error, payload = fe.lookup(1, b"hello")
            assert error == 0 and payload
        finally:
            fe.close()
        assert proc.wait(timeout=20) == 0, log_path.read_text()
    finally:
        stop_daemon(proc)
    assert sock_path.stat().st_ino == inode, "the daemon bound a socket of its own"
    assert not Path(str(sock_path) + ".pid").exists()
