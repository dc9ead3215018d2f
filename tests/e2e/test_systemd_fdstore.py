"""systemd's fd store under a real systemd (the VM of tests/support/systemd/vm.py): the
service's main process SIGKILLed, then ``systemctl restart``; each time systemd starts
the service again (Restart=on-failure) and the new daemon resumes the same front-end's
connection from the fds it had stored (daemon/host/fd_store.py,
workers/handover/from_fd_store.py): the connection stays open and the nodeid and fh the
front-end had still answer, for the same file (its inode number)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

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
    wait_restarted(vm, after["MainPID"], 1)
    assert served(vm) == {"getattr": 0, "ino": ino, "read": 0, "data": "kept"}, \
        vm.journal(UNIT, 80)
    print(f"systemctl restart: served again after {time.monotonic() - started:.1f} s")
    journal = vm.journal(UNIT, 200)
    assert journal.count("fd store: resumed from") == 2, journal
    vm.py("fe.close()")
    vm.sh(f"systemctl stop {UNIT}")
