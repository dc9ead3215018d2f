"""--syslog: the log goes to the syslog socket; without a syslog daemon the operator is
told so once and the log stays on standard error (not a traceback per line).

Each daemon runs in a mount namespace of its own where /dev/log is, by a bind mount,
either the test's datagram socket or an empty file (no daemon listening)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.daemon import daemon_log, pyvirtiofsd

DEV_LOG = Path("/dev/log")


@contextlib.contextmanager
def dev_log_replaced_by(target: Path) -> Iterator[list[str]]:
    """A wrapper command under which /dev/log is target; root only."""
    assert os.geteuid() == 0, "bind mounts over /dev/log need root"
    placeholder = not DEV_LOG.exists() and not DEV_LOG.is_symlink()
    if placeholder:  # a mount point for the bind mount, removed afterwards
        DEV_LOG.touch()
    try:
        yield ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
               'mount --bind "$0" /dev/log && exec "$@"', str(target)]
    finally:
        if placeholder:
            DEV_LOG.unlink()


def test_syslog_receives_the_log(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    sock_path = tmp_path / "syslog.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(sock_path))
        syslog.settimeout(10)
        with dev_log_replaced_by(sock_path) as wrapper, \
                pyvirtiofsd(share, tmp_path / "vfs.sock", "--syslog",
                            wrapper=wrapper) as proc:
            messages = []
            while not any(b"sharing " in m for m in messages):
                messages.append(syslog.recv(4096))
            log = daemon_log(proc)
    line = next(m for m in messages if b"sharing " in m).decode()
    assert line.startswith("<14>pyvirtiofsd[")  # facility user, severity info
    assert f"sharing {share} on {tmp_path / 'vfs.sock'}" in line
    assert "sharing" not in log  # nothing on standard error meanwhile
    assert "Traceback" not in log


def test_syslog_without_a_syslog_daemon_falls_back_to_stderr(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    nobody = tmp_path / "not-a-socket"
    nobody.touch()
    with dev_log_replaced_by(nobody) as wrapper, \
            pyvirtiofsd(share, tmp_path / "vfs.sock", "--syslog", wrapper=wrapper) as proc:
        # "sharing" follows the socket's bind: stopped before it, the daemon never says it
        deadline = time.monotonic() + 10
        while f"sharing {share}" not in daemon_log(proc) and time.monotonic() < deadline:
            time.sleep(0.05)
    log = daemon_log(proc)
    assert "--syslog: no syslog daemon on /dev/log (Connection refused); logging to " \
           "standard error instead" in log
    assert f"sharing {share}" in log
    assert "Traceback" not in log and "Logging error" not in log
