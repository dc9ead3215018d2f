"""systemd's fd store under a real systemd (the VM of tests/support/systemd/vm.py): the
service's main process SIGKILLed, then ``systemctl restart``; each time systemd starts
the service again (Restart=on-failure) and the new daemon resumes the same front-end's
connection from the fds it had stored (daemon/host/fd_store.py,
workers/handover/from_fd_store.py): the connection stays open and the nodeid and fh the
front-end had still answer, for the same file (its inode number)."""

from __future__ import annotations

import array
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.protocol import fuse
from daemon.protocol.fuse import Opcode
from tests.support.systemd.driver import connect, connection_closed
from tests.support.systemd.vm import SystemdVM

UNIT = "pyvirtiofsd@fds.service"
SOCK = "/run/pyvirtiofsd/fds.sock"


@pytest.fixture(scope="module")
def vm() -> Iterator[SystemdVM]:
    machine = SystemdVM().start()
    try:
        machine.py("from tests.support.systemd.driver import *")
        machine.py("from daemon.protocol import fuse\nfrom daemon.protocol.fuse import Opcode\n"
                   "import os")
        yield machine
    finally:
        machine.close()


def show(vm: SystemdVM, *props: str) -> dict[str, str]:
    out = vm.sh(f"systemctl show {' '.join('-p ' + p for p in props)} {UNIT}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_restarted(vm: SystemdVM, old_pid: str, restarts: int) -> dict[str, str]:
    deadline = time.monotonic() + 60
    while True:
        now = show(vm, "MainPID", "NRestarts", "ActiveState", "NFileDescriptorStore")
        if (now["MainPID"] not in ("0", old_pid) and now["ActiveState"] == "active"
                and int(now["NRestarts"]) >= restarts):
            return now
        assert time.monotonic() < deadline, (now, vm.journal(UNIT, 80))
        time.sleep(0.5)


def served(vm: SystemdVM) -> dict[str, object]:
    """GETATTR of the nodeid looked up before, READ through the fh opened before."""
    return vm.py("""
e, attr = fe.fuse(Opcode.GETATTR, nodeid, fuse.GETATTR_IN.pack(0, 0, 0))
sent = fe.start(Opcode.READ, nodeid, fuse.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0),
                out_size=fuse.OUT_HEADER_SIZE + 4096)
e2, data = fe.finish(sent, 60)
ino = int.from_bytes(attr[fuse.ATTR_OUT_HEAD.size:][:8], "little") if not e else None
{"getattr": e, "ino": ino,
 "read": e2, "data": data.decode() if not e2 else None}""", timeout=150)


def test_kill_and_restart_keep_the_connection(vm: SystemdVM) -> None:
    vm.sh("mkdir -p /srv/virtiofs/fds && printf kept > /srv/virtiofs/fds/hello")
    ino = int(vm.sh("stat -c %i /srv/virtiofs/fds/hello"))
    vm.sh(f"systemctl start {UNIT}", timeout=150)
    vm.py(f"""fe = connect({SOCK!r})
e, entry = fe.fuse(Opcode.LOOKUP, 1, b"hello\\0")
nodeid = fuse.ENTRY_HEAD.unpack_from(entry)[0]
e, opened = fe.fuse(Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDONLY, 0))
fh = fuse.OPEN_OUT.unpack_from(opened)[0]""", timeout=150)
    assert served(vm) == {"getattr": 0, "ino": ino, "read": 0, "data": "kept"}
    before = show(vm, "MainPID", "NFileDescriptorStore")
    assert int(before["NFileDescriptorStore"]) >= 8, before
    started = time.monotonic()
    vm.sh(f"kill -9 {before['MainPID']}")
    after = wait_restarted(vm, before["MainPID"], 1)
    assert served(vm) == {"getattr": 0, "ino": ino, "read": 0, "data": "kept"}, \
        vm.journal(UNIT, 80)
    print(f"kill -9: served again after {time.monotonic() - started:.1f} s")
    assert vm.py("connection_closed(fe, 1)") is None
    started = time.monotonic()
    vm.sh(f"systemctl restart {UNIT}", timeout=150)
    wait_restarted(vm, after["MainPID"], 0)  # (a manual restart resets NRestarts)
    assert served(vm) == {"getattr": 0, "ino": ino, "read": 0, "data": "kept"}, \
        vm.journal(UNIT, 80)
    print(f"systemctl restart: served again after {time.monotonic() - started:.1f} s")
    journal = vm.journal(UNIT, 200)
    assert journal.count("fd store: resumed from") == 2, journal
    vm.py("fe.close()")
    vm.sh(f"systemctl stop {UNIT}")


class StandInManager:
    """systemd's side of the fd store without systemd (no VM, seconds): a notification
    socket that keeps what FDSTORE=1 sends and drops what FDSTOREREMOVE=1 names, and the
    restart: the service's processes SIGKILLed as a cgroup, a new one started with the
    stored fds from fd 3 on, LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID as sd_listen_fds(3)
    reads them."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.path = path
        self.store: dict[str, int] = {}
        self._closing = False
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()

    def _collect(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            except OSError:
                return
            if self._closing:  # close()'s wake-up datagram
                return
            fds = array.array("i")
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % 4])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            if "FDSTORE" in fields or "FDSTOREREMOVE" in fields:
                old = self.store.pop(fields["FDNAME"], None)
                if old is not None:
                    os.close(old)
            if "FDSTORE" in fields:
                self.store[fields["FDNAME"]] = fds[0]

    def close(self) -> None:
        """Stop the collecting thread (closing the socket would leave it asleep in
        recvmsg), then close the socket and the fds still stored."""
        self._closing = True
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"", self.path)
        self._collector.join(5)
        assert not self._collector.is_alive(), "the stand-in manager's thread did not stop"
        self.sock.close()
        for fd in self.store.values():
            os.close(fd)
        self.store.clear()

    def start(self, argv: list[str], passed: dict[str, int]) -> subprocess.Popen:
        fds = list(passed.values())
        env = dict(os.environ, NOTIFY_SOCKET=self.path, PYVIRTIOFSD_FDSTORE="1")
        if passed:
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(passed))

        def at_three() -> None:
            high = [os.dup(fd) for fd in fds]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i)

        # sh sets LISTEN_PID to its own pid, which exec keeps
        cmd = ["sh", "-c", ("export LISTEN_PID=$$; " if passed else "") + 'exec "$@"', "sh",
               *argv]
        return subprocess.Popen(cmd, env=env, preexec_fn=at_three, start_new_session=True,
                                close_fds=not passed)


@pytest.mark.parametrize("stop", ["kill -9", "SIGTERM"])
def test_restart_resumes_from_a_stand_in_store(tmp_path: Path, stop: str) -> None:
    """The same as above without the VM: what a restart re-opens (inodes by file handle,
    open files through them) and the connection kept, in seconds."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("kept")
    sock = str(tmp_path / "vfs.sock")
    manager = StandInManager(str(tmp_path / "notify"))
    argv = [sys.executable, "-m", "supervisor", "--shared-dir", str(share), "--socket-path",
            sock, "--sandbox", "namespace", "--posix-lock"]
    first = manager.start(argv, {})
    second = None
    fe = connect(sock, connect_timeout=20)
    try:
        e, entry = fe.fuse(Opcode.LOOKUP, 1, b"hello\0")
        nodeid = fuse.ENTRY_HEAD.unpack_from(entry)[0]
        e, opened = fe.fuse(Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDONLY, 0))
        fh = fuse.OPEN_OUT.unpack_from(opened)[0]

        def served() -> tuple[int, int, int, bytes]:
            e, attr = fe.fuse(Opcode.GETATTR, nodeid, fuse.GETATTR_IN.pack(0, 0, 0))
            sent = fe.start(Opcode.READ, nodeid, fuse.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0),
                            out_size=fuse.OUT_HEADER_SIZE + 4096)
            e2, data = fe.finish(sent, 30)
            return e, int.from_bytes(attr[fuse.ATTR_OUT_HEAD.size:][:8], "little"), e2, data

        ino = (share / "hello").stat().st_ino
        assert served() == (0, ino, 0, b"kept")
        time.sleep(0.3)  # the journal after the last vhost-user message, pushed
        assert len(manager.store) >= 8, manager.store
        stored = set(manager.store)
        if stop == "SIGTERM":  # systemctl restart with KillMode=mixed
            first.send_signal(signal.SIGTERM)
            first.wait(10)
        try:  # what is left of the cgroup
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        first.wait(10)
        second = manager.start(argv, dict(manager.store))
        fe.reply_timeout = 60
        assert served() == (0, ino, 0, b"kept")
        assert connection_closed(fe, 0.5) is None
        deadline = time.monotonic() + 5  # the new supervisor's first sync
        while len(set(manager.store) & stored) != len(stored) - 2:
            assert time.monotonic() < deadline, (manager.store, stored)
            time.sleep(0.05)
        # the same fds, no more: the old journal and session page were replaced by the
        # new program's, the others are at the same numbers
        assert len(manager.store) == len(stored), (manager.store, stored)
        assert len(set(manager.store) & stored) == len(stored) - 2, (manager.store, stored)
        tables = {f"pyvirtiofsd-{first.pid}-{kind}" for kind in ("inodes", "handles", "stats")}
        assert tables <= {p.name for p in Path("/dev/shm").iterdir()}  # the restart's
        fe.close()  # the front-end gone: the daemon exits, nothing left to resume
        assert second.wait(20) == 0
        assert manager.store == {}
        assert not [p for p in Path("/dev/shm").iterdir() if p.name in tables]
        assert not Path(f"/dev/shm/pyvirtiofsd-{first.pid}-info").exists()
    finally:
        if fe.sock.fileno() >= 0:
            fe.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        manager.close()
