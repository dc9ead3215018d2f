"""--seccomp: the server and its workers run under the allow-list (kill by default), the
guest's requests work under it, and a call outside the list does what the mode says."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.protocol import fuse
from tests.options.helpers import init, log_of, served
from tests.support.daemon import REPO


def seccomp_status(pid: int) -> tuple[int, int]:
    """(Seccomp mode, number of filters) from /proc/<pid>/status."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["Seccomp"]), int(fields.get("Seccomp_filters", "0"))


def family(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [pid, *(int(c) for c in f.read().split())]


@pytest.mark.parametrize("mode", ["kill", "none"])
def test_server_and_workers_are_filtered(tmp_path: Path, mode: str) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"filtered")
    with served(tmp_path, "--seccomp", mode, "--xattr", share=share) as (front, _, proc):
        assert init(front)[0] == 0
        err, entry = front.lookup(1, b"f")
        nodeid = struct.unpack_from("<Q", entry)[0]
        err, opened = front.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDWR, 0))
        fh = struct.unpack_from("<Q", opened)[0]
        assert front.fuse(fuse.Opcode.READ, nodeid,
                          fuse.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0)) == (0, b"filtered")
        err, _ = front.fuse(fuse.Opcode.SETXATTR, nodeid,
                            struct.pack("<II", 1, 0) + b"user.a\0b")
        assert err == 0
        err, made = front.fuse(fuse.Opcode.MKDIR, 1, struct.pack("<II", 0o700, 0) + b"d\0")
        assert err == 0
        statuses = {seccomp_status(p) for p in family(proc.pid)}
        assert len(family(proc.pid)) == 3  # supervisor, the template (serving queue 0), a worker
        log = log_of(proc)
    if mode == "kill":
        assert {s[0] for s in statuses} == {2} and min(s[1] for s in statuses) >= 1
        assert "seccomp: " in log and "others kill the process" in log
    else:
        assert statuses == {(0, 0)}
    assert (share / "d").is_dir() and os.getxattr(share / "f", "user.a") == b"b"


PROBE = """
import os, signal, sys
from daemon.host import seccomp
signal.signal(signal.SIGSYS, lambda *_: print("trapped", flush=True))
seccomp.install(sys.argv[1])
print("installed", flush=True)
try:
    os.chroot("/nonexistent")  # chroot is not on the list
except OSError as e:
    print("returned", e.errno, flush=True)
print("alive", flush=True)
"""


@pytest.mark.parametrize("mode", ["kill", "trap", "log"])
def test_a_call_outside_the_list(mode: str) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    lines = done.stdout.split()
    if mode == "kill":
        assert done.returncode == -signal.SIGSYS and lines == ["installed"]
    elif mode == "trap":
        assert "trapped" in lines and lines[-1] == "alive"
    else:  # logged by the kernel, then run: ENOENT from the real chroot
        assert done.returncode == 0 and "returned" in lines and "alive" in lines


ARGUMENTS = """
import ctypes, fcntl, os, signal, sys, termios
from daemon.host import seccomp
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
signal.signal(signal.SIGSYS, lambda *_: print("trapped", flush=True))
r, w = os.pipe()
seccomp.install(sys.argv[1])
print("installed", flush=True)
# what the daemon does: isatty (open() with buffering), non-blocking sockets, workers
open(seccomp.__file__).read(16)
try:
    fcntl.ioctl(r, termios.TCGETS, bytes(64))
except OSError as e:
    assert e.errno == 25
os.set_blocking(w, False)
fcntl.ioctl(w, termios.FIONBIO, b"\\0\\0\\0\\0")
pid = libc.syscall(56, ctypes.c_ulong(0x400 | 17), 0, 0, 0, 0)  # CLONE_FILES|SIGCHLD
if pid == 0:
    os._exit(7)
assert os.waitpid(pid, 0)[1] >> 8 == 7
print("allowed", flush=True)
libc.syscall(435, 0, 0)
print(f"clone3:{ctypes.get_errno()}", flush=True)  # ENOSYS (38): glibc then uses clone
what = sys.argv[2]
if what == "tiocsti":  # push a byte into a terminal's input
    try:
        fcntl.ioctl(r, termios.TIOCSTI, b"x")
    except OSError as e:
        print("returned", e.errno, flush=True)
elif what == "ioctl":  # any request the daemon never makes
    try:
        fcntl.ioctl(r, 0x12345678, 0)
    except OSError as e:
        print("returned", e.errno, flush=True)
elif what in ("clone_newuser", "clone_fs"):
    flags = 0x10000000 | 17 if what == "clone_newuser" else 0x400 | 0x200 | 17  # +CLONE_FS
    pid = libc.syscall(56, ctypes.c_ulong(flags), 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    if pid > 0 and pid != 56:
        os.waitpid(pid, 0)
        print("cloned", flush=True)
print("alive", flush=True)
"""


@pytest.mark.parametrize("what", ["tiocsti", "ioctl", "clone_newuser", "clone_fs"])
@pytest.mark.parametrize("mode", ["kill", "trap", "log"])
def test_arguments_outside_the_list(mode: str, what: str) -> None:
    """ioctl is allowed with the requests CPython and libuv issue only, clone with the
    workers' flags only (clone3 is ENOSYS): TIOCSTI, an unknown request, a clone into a
    new user namespace or a clone sharing more than the fd table meet the mode's action
    (the process is killed, gets SIGSYS without the call running, or the kernel logs it
    and it runs)."""
    done = subprocess.run([sys.executable, "-c", ARGUMENTS, mode, what], cwd=REPO,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=30)
    lines = done.stdout.split()
    assert lines[:3] == ["installed", "allowed", "clone3:38"], (lines, done.stderr)
    if mode == "kill":
        assert done.returncode == -signal.SIGSYS and lines == lines[:3], lines
    elif mode == "trap":
        assert done.returncode == 0 and "trapped" in lines and "cloned" not in lines
        assert lines[-1] == "alive"
    else:
        assert done.returncode == 0 and lines[-1] == "alive" and "trapped" not in lines
        if what.startswith("clone"):
            assert "cloned" in lines
        else:
            assert "returned" in lines


def test_guest_served_in_the_sandbox_under_the_filter(tmp_path: Path) -> None:
    """The default set-up (namespace sandbox, --seccomp kill): a guest's requests that
    reach the fd directory, create as another user, work on special files and hit errors
    all work, and no process of the daemon was killed."""
    from tests.options.test_sandbox import descendants, reach, server_pid

    share = tmp_path / "share"
    share.mkdir()
    os.chmod(share, 0o777)
    (share / "f").write_bytes(b"filtered")
    with served(tmp_path, "--sandbox", "namespace", "--seccomp", "kill", "--xattr",
                share=share) as (front, _, proc):
        assert init(front)[0] == 0
        server = server_pid(proc.pid)
        before = [server, *descendants(server)]
        got = reach(front)
        err, _ = front.fuse(fuse.Opcode.CREATE, 1, fuse.CREATE_IN.pack(
            os.O_RDWR, 0o600, 0, 0) + b"mine\0", uid=1000, gid=1000)
        assert err == 0
        err, _ = front.fuse(fuse.Opcode.LOOKUP, 1, b"missing\0")
        assert err in (0, -2)
        err, _ = front.fuse(fuse.Opcode.OPEN, 1, fuse.OPEN_IN.pack(os.O_TMPFILE | os.O_RDWR, 0))
        assert err == -22
        after = [server, *descendants(server)]
        statuses = {seccomp_status(p) for p in after}
        log = log_of(proc)
    assert before == after, log
    assert {s[0] for s in statuses} == {2}
    assert set(got.values()) <= {0, -1, -9, -61}, got
    assert (share / "mine").stat().st_uid == 1000
    assert "died" not in log and "Traceback" not in log
