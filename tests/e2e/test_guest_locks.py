"""Locks taken in the guest exclude host processes and the other way round (virtiofsd
1.13 keeps them inside the guest, where they protect nothing on a shared directory):
flock() and fcntl() locks (both forwarded by default)."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from tests.support.daemon import pyvirtiofsd
from tests.support.vm import run_guest

SCRIPT = """
mount -t virtiofs myfs /mnt || exit 1
: > /mnt/lk1
: > /mnt/lk2
: > /mnt/rec
hostrun python3 -c '
import fcntl, os, time
# 1. the guest holds flock(LOCK_EX) for a while: the host must not get it meanwhile
with open("/mnt/lk1") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    open("/mnt/state1", "w").write("held")
    time.sleep(4)
    os.unlink("/mnt/state1")
# 2. the host holds lk2: the guest waits in flock() until the host lets go
open("/mnt/state2", "w").write("waiting")
with open("/mnt/lk2") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    open("/mnt/got2", "w").write("got")
# 3. fcntl record locks: the guest write-locks bytes 0-9 while the host probes, then
#    waits (F_SETLKW) for a range the host holds
fd = os.open("/mnt/rec", os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
open("/mnt/state3", "w").write("held")
time.sleep(4)
fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
os.unlink("/mnt/state3")
open("/mnt/state4", "w").write("waiting")
fcntl.lockf(fd, fcntl.LOCK_EX, 10, 100)
open("/mnt/got4", "w").write("got")
'
echo done
umount /mnt
"""


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


@pytest.mark.guest
def test_guest_and_host_exclude_each_other(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    sock = tmp_path / "vfs.sock"
    seen: dict[str, object] = {}

    def host_side() -> None:
        # 1. guest holds flock on lk1
        wait_for(share / "state1")
        with open(share / "lk1") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen["flock_while_guest_holds"] = "acquired"
            except BlockingIOError:
                seen["flock_while_guest_holds"] = "busy"
        # 2. host holds lk2 while the guest waits for it
        with open(share / "lk2") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            wait_for(share / "state2")
            time.sleep(2)
            seen["guest_got_lk2_while_host_held"] = (share / "got2").exists()
        # 3. fcntl byte-range locks
        wait_for(share / "state3")
        fd = os.open(share / "rec", os.O_RDWR)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
                seen["lockf_overlapping"] = "acquired"
            except OSError:
                seen["lockf_overlapping"] = "busy"
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)  # disjoint range: free
            seen["lockf_disjoint"] = "acquired"
            fcntl.lockf(fd, fcntl.LOCK_UN, 10, 50)
            # take 100-109 while the guest still sleeps on 0-9; it asks for it next
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 100)
            wait_for(share / "state4")
            time.sleep(2)
            seen["guest_got_range_while_host_held"] = (share / "got4").exists()
            fcntl.lockf(fd, fcntl.LOCK_UN, 10, 100)
        finally:
            os.close(fd)

    with pyvirtiofsd(share, sock, "--posix-lock"):
        helper = threading.Thread(target=host_side)
        helper.start()
        run = run_guest(sock, SCRIPT, host_root_9p=True, timeout=300)
        helper.join(timeout=60)
    assert run.rc == 0, run.describe()
    assert run.script_output.strip().endswith("done"), run.script_output
    assert seen == {
        "flock_while_guest_holds": "busy",
        "guest_got_lk2_while_host_held": False,
        "lockf_overlapping": "busy",
        "lockf_disjoint": "acquired",
        "guest_got_range_while_host_held": False,
    }
    assert (share / "got2").read_text() == "got"
    assert (share / "got4").read_text() == "got"
