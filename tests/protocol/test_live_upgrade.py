"""Live upgrade: ``pyvirtiofsd upgrade`` (SIGHUP) makes a running daemon execute the code
installed now while a front-end stays connected, in every sandbox mode.

What the front-end holds must come through unchanged: the connection itself (it never
sees it close: vhost-user messages keep working), its nodeids (same inode numbers), an
open file (reads its bytes, takes writes), a lock it holds (still excludes the host), a
SETLKW parked behind a host lock at the moment of the upgrade (answered once, granted),
and requests in flight (each answered exactly once). The daemon keeps its pid, and the
stats command shows the new code's build id and the count of upgrades.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.protocol import fuse
from tests.options.test_sandbox import AS_UID_1000
from tests.protocol.test_hostile_guest import Served, serve
from tests.support.daemon import REPO, daemon_log, start_pyvirtiofsd
from tests.support.frontend import Frontend
from tests.support.held_state import (
    assert_holdings_came_through,
    assert_writes_answered,
    open_file,
    start_writes,
    take_holdings,
)
from tests.support.reference import stop_daemon

MARKER = REPO / "daemon" / "host" / "_live_upgrade_test_marker.py"


def upgrade(srv: Served) -> str:
    done = subprocess.run([sys.executable, "-m", "supervisor", "upgrade", "--socket-path",
                           str(srv.socket_path), "--timeout", "20"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr + srv.log()
    return done.stdout


def stats(srv: Served) -> dict:
    done = subprocess.run([sys.executable, "-m", "supervisor", "stats", "--socket-path",
                           str(srv.socket_path), "--json", "--interval", "0.05"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def attr_ino(payload: bytes) -> int:
    return struct.unpack_from("<Q", payload, fuse.ATTR_OUT_HEAD.size)[0]


@pytest.mark.parametrize("sandbox", ["none", "chroot", "namespace", "none --keeper",
                                     "namespace:stop-workers-first", "namespace as uid 1000"])
def test_upgrade_keeps_connection_files_locks_and_requests(
        tmp_path: Path, sandbox: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``:stop-workers-first``: the older order (PYVIRTIOFSD_UPGRADE), where the server
    stops its workers and sends its fds before the process outside executes the new
    code. ``as uid 1000``: not root, the unprivileged namespace sandbox."""
    sandbox, _, user = sandbox.partition(" as uid ")
    sandbox, _, order = sandbox.partition(":")
    if order:
        monkeypatch.setenv("PYVIRTIOFSD_UPGRADE", order)
    with serve(tmp_path, "--posix-lock", "--sandbox", *sandbox.split(),
               wrapper=AS_UID_1000 if user else ()) as srv:
        pid = int((tmp_path / "vu.sock.pid").read_text())
        held = take_holdings(srv, b"before the upgrade\n")
        before = stats(srv)
        assert before["live_upgrades"] == 0 and before["build"]

        if sandbox == "none":  # the installed code changes: the build id must follow
            MARKER.write_text("# written by tests/protocol/test_live_upgrade.py\n")
        try:
            out = upgrade(srv)
        finally:
            MARKER.unlink(missing_ok=True)
        assert f"pyvirtiofsd {pid}: code {before['build']} -> " in out
        new_build = out.split(" -> ")[1].split(",")[0]
        if sandbox == "none":  # the code it executed is the code installed now
            assert new_build != before["build"]
        assert "live upgrade 1, serving" in out
        # requests in flight while the second upgrade happens: each answered once
        writes = start_writes(srv, held)
        assert "live upgrade 2, serving" in upgrade(srv)
        assert_writes_answered(srv, writes)

        after = stats(srv)
        assert after["pid"] == pid and after["live_upgrades"] == 2
        assert after["build"] == before["build"]  # the marker is gone again
        log = srv.log()
        assert log.count("live upgrade: took over the front-end") == 2
        assert "serving with code" in log and "(2 live upgrades, 0 supervisor restarts)" in log
        assert_holdings_came_through(srv, held)


def test_upgrade_of_a_daemon_that_is_not_there(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "supervisor", "upgrade", "--socket-path",
                           str(tmp_path / "nothing.sock")], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "no daemon pid in" in done.stderr


@pytest.mark.parametrize("sandbox", ["none", "namespace"])
def test_upgrade_before_the_front_end_connects(tmp_path: Path, sandbox: str) -> None:
    """Waiting for QEMU is serving too: the new code takes the listening socket over."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"hello")
    sock = tmp_path / "vu.sock"
    proc = start_pyvirtiofsd(share, sock, "--sandbox", sandbox)
    try:
        done = subprocess.run([sys.executable, "-m", "supervisor", "upgrade",
                               "--socket-path", str(sock), "--timeout", "20"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "live upgrade 1, serving" in done.stdout, \
            done.stderr + daemon_log(proc)
        fe = Frontend(str(sock))
        try:
            fe.setup(2)
            fe.init()
            error, payload = fe.lookup(fuse.ROOT_ID, b"f")
            assert error == 0
            assert struct.unpack_from("<Q", payload, fuse.ENTRY_HEAD.size)[0] == \
                (share / "f").stat().st_ino
        finally:
            fe.close()
    finally:
        stop_daemon(proc)


def test_files_opened_and_released_while_the_new_code_starts(tmp_path: Path) -> None:
    """--sandbox none: the old workers serve while the new program starts (workers/
    handover/warm.py). Inodes looked up, files opened and released in that window live
    only in the old fd table; the new program must end up with exactly those: each file
    opened then reads its own bytes under the same inode, each released fh is gone. The
    guest releases files it opened before the upgrade meanwhile, so numbers are reused in
    the old table that the new program's copy still has for the released files (the
    workers' C path must not reopen through the new program's table)."""
    with serve(tmp_path, "--sandbox", "none") as srv:
        count = 400
        for i in range(count):
            (srv.share / f"f{i}").write_bytes(b"file %d\n" % i)
            (srv.share / f"p{i}").write_bytes(b"opened before %d\n" % i)
        # files the guest releases in the window: their fds' numbers are reused there
        before = [open_file(srv, f"p{i}", q=1) for i in range(count)]
        pid = int((tmp_path / "vu.sock.pid").read_text())
        mark = len(srv.log())
        os.kill(pid, signal.SIGHUP)
        opened: dict[int, tuple[int, int]] = {}
        released: list[tuple[int, int]] = []
        in_window = 0
        for i in range(count):
            stopped = "old workers stopped" in srv.log()[mark:]
            srv.release(*before[i], q=1 + i % 2)
            nodeid, fh = open_file(srv, f"f{i}", q=1 + i % 2)
            in_window += not stopped
            if i % 3 == 2:  # released again: its fd closes in the old table
                error, _ = srv.call(fuse.Opcode.RELEASE, nodeid,
                                    fuse.RELEASE_IN.pack(fh, os.O_RDWR, 0, 0), q=1 + i % 2)
                assert error == 0
                released.append((nodeid, fh))
            else:
                opened[i] = (nodeid, fh)
            if stopped and i > 40:
                break
        assert in_window >= 5, f"only {in_window} opens while the new code started"
        deadline = time.monotonic() + 20
        while "live upgrade: took over the front-end" not in srv.log()[mark:]:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.02)
        for i, (nodeid, fh) in opened.items():
            error, data = srv.read(nodeid, fh, 64, q=2)
            assert (error, data) == (0, b"file %d\n" % i)
            error, payload = srv.call(fuse.Opcode.GETATTR, nodeid, bytes(16), q=1)
            assert error == 0 and attr_ino(payload) == (srv.share / f"f{i}").stat().st_ino
        for nodeid, fh in released:
            error, _ = srv.read(nodeid, fh, 64, q=1)
            assert error == -errno.EBADF
        # the daemon holds no open file of a released one (only its inode's O_PATH fd)
        fds = Path(f"/proc/{pid}/fd")
        targets = [os.readlink(fds / n) for n in os.listdir(fds)]
        for i in range(len(opened) + len(released)):
            path = str((srv.share / f"f{i}").resolve())
            assert targets.count(path) <= (2 if i in opened else 1), (i, targets.count(path))
