"""A worker killed in the middle of a guest's work is replaced and the mount carries on:
the ring state lives in guest memory, inodes and fds in shared memory and the shared
fd table, so nothing the guest holds is lost."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.support.daemon import daemon_log, pyvirtiofsd
from tests.support.vm import run_guest

SCRIPT = """
mount -t virtiofs myfs /mnt || exit 1
echo held-open > /mnt/held
exec 3< /mnt/held
i=0
while [ $i -lt 1500 ]; do echo "line $i" > /mnt/f.$i; cat /mnt/f.$i >/dev/null; i=$((i+1)); done
echo "files: $(ls /mnt | grep -c '^f\\.')"
echo "last: $(cat /mnt/f.1499)"
echo "held: $(cat <&3)"
exec 3<&-
umount /mnt && echo unmounted
"""


@pytest.mark.guest
def test_guest_survives_sigkilled_request_worker(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    sock = tmp_path / "vfs.sock"
    killed: list[int] = []
    stop = threading.Event()

    with pyvirtiofsd(share, sock) as proc:

        def kill_queue1_worker() -> None:
            """SIGKILL the request queue's worker twice while the guest is busy."""
            while not stop.is_set() and len(killed) < 2:
                started = re.findall(r"queue 1: worker (\d+) started", daemon_log(proc))
                files = len(list(share.glob("f.*")))
                if started and files >= 200 * (len(killed) + 1):
                    pid = int(started[-1])
                    if pid not in killed:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                time.sleep(0.05)

        killer = threading.Thread(target=kill_queue1_worker)
        killer.start()
        try:
            run = run_guest(sock, SCRIPT, timeout=240)
        finally:
            stop.set()
            killer.join()
        log = daemon_log(proc)

    assert len(killed) == 2, log
    assert run.rc == 0, run.describe()
    assert run.script_output.splitlines() == [
        "files: 1500", "last: line 1499", "held: held-open", "unmounted"]
    for pid in killed:
        assert f"worker {pid} died (signal 9); restarting it" in log
    assert (share / "f.1499").read_text() == "line 1499\n"
    assert sorted(int(p.name[2:]) for p in share.glob("f.*")) == list(range(1500))
