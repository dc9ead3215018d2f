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

from daemon import fuse
from tests.daemon import REPO
from tests.options.helpers import init, log_of, served


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
        assert len(family(proc.pid)) == 3  # supervisor and two workers
        log = log_of(proc)
    if mode == "kill":
        assert {s[0] for s in statuses} == {2} and min(s[1] for s in statuses) >= 1
        assert "seccomp: " in log and "others kill the process" in log
    else:
        assert statuses == {(0, 0)}
    assert (share / "d").is_dir() and os.getxattr(share / "f", "user.a") == b"b"


PROBE = """
import os, signal, sys
from daemon import seccomp
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
