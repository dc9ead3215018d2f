"""The shared inode table under a real guest: file handles keep fd use bounded whatever
the guest caches, and every reference the guest takes comes back with FORGET."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from shm_table import InodeTable
from tests.support.daemon import daemon_log, pyvirtiofsd
from tests.support.vm import run_guest


def count_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


@pytest.mark.guest
def test_find_over_a_tree_larger_than_the_fd_limit(tmp_path: Path) -> None:
    """5,050 inodes cached by the guest with RLIMIT_NOFILE 1500: with file handles
    (virtiofsd's default, prefer) the daemon keeps no fd per inode and never runs out."""
    share = tmp_path / "share"
    for d in range(50):
        (share / f"d{d}").mkdir(parents=True)
        for i in range(100):
            (share / f"d{d}" / f"f{i}").write_text(str(i))
    sock = tmp_path / "vfs.sock"
    script = """
mount -t virtiofs myfs /mnt || exit 1
echo "entries: $(find /mnt | wc -l)"
echo "sizes: $(find /mnt -type f | xargs stat -c %s | sort -u | wc -l)"
echo "bytes: $(cat /mnt/d*/f* | wc -c)"
umount /mnt
"""
    peak = 0
    done = threading.Event()
    with pyvirtiofsd(share, sock, "--rlimit-nofile", "1500",
                     "--inode-file-handles", "prefer") as proc:

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.05):
                peak = max(peak, count_fds(proc.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            run = run_guest(sock, script, timeout=300)
        finally:
            done.set()
            sampler.join()
        log = daemon_log(proc)
    assert run.rc == 0, run.describe()
    # 5,000 files + 50 dirs + the root; 100 distinct sizes; 50 * (10*1 + 90*2) bytes
    assert run.script_output.splitlines() == ["entries: 5051", "sizes: 2", "bytes: 9500"]
    assert 0 < peak <= 1500
    assert "Too many open files" not in log and "ENFILE" not in log


@pytest.mark.guest
def test_references_return_to_the_root_after_the_guest_drops_its_caches(
    tmp_path: Path,
) -> None:
    """10,000 files created and stat'ed from two vCPUs over two request queues; after
    drop_caches the guest FORGETs them all (on the hiprio queue) and only the root is
    left in the table."""
    share = tmp_path / "share"
    share.mkdir()
    sock = tmp_path / "vfs.sock"
    script = """
mount -t virtiofs myfs /mnt || exit 1
for c in 0 1; do
  mkdir /mnt/cpu$c
  taskset -c $c sh -c "cd /mnt/cpu$c && i=0; while [ \\$i -lt 5000 ]; do : > f\\$i; \\
      i=\\$((i+1)); done; ls -l > /dev/null" &
done
wait
echo "files: $(find /mnt -type f | wc -l)"
sync
echo 2 > /proc/sys/vm/drop_caches
echo dropped > /mnt/marker
sleep 8
umount /mnt
"""
    seen: list[list[int]] = []
    with pyvirtiofsd(share, sock, "--num-request-queues", "2") as proc:
        table = InodeTable.attach(f"/pyvirtiofsd-{proc.pid}-inodes")
        done = threading.Event()

        def watch() -> None:
            """Once the guest has dropped its caches, read the table (before umount)."""
            while not done.wait(0.1):
                if (share / "marker").exists():
                    done.wait(3)  # let the hiprio worker finish the FORGETs
                    seen.append(sorted(e.nodeid for e in table.iter_entries()))
                    return

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            run = run_guest(sock, script, kernel="6.12", smp=2, num_request_queues=2,
                            timeout=600)
        finally:
            done.set()
            watcher.join()
            after_umount = len(table)
            table.detach()
        log = daemon_log(proc)
    assert run.rc == 0, run.describe()
    assert "files: 10000" in run.script_output, run.script_output
    started = set(re.findall(r"queue (\d+): worker \d+ started", log))
    assert {"0", "1", "2"} <= started
    # the root, and the marker file whose dentry the guest made after dropping its caches
    assert len(seen) == 1 and len(seen[0]) == 2 and seen[0][0] == 1, seen
    assert after_umount == 1  # DESTROY at umount leaves only the root
    assert len(list(share.rglob("f*"))) == 10000
