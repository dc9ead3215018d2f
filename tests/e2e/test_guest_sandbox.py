"""A real guest against the daemon in its default sandbox (--sandbox namespace, as
virtiofsd runs by default as root): the mount works as usual while the server's root is
the shared directory, and stopping it leaves nothing behind on the host."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.support.daemon import pyvirtiofsd
from tests.support.vm import run_guest

SCRIPT = """
mount -t virtiofs myfs /mnt || exit 1
mkdir -p /mnt/a/b
echo guest-data > /mnt/a/b/file
ln -s /etc/hostname /mnt/abs-link
mv /mnt/a/b/file /mnt/a/moved
cat /mnt/a/moved
cat /mnt/from-host
ls -1 /mnt | sort | tr '\\n' ' '; echo
stat -c '%s %h' /mnt/a/moved
umount /mnt
"""


def descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in descendants(k)]


@pytest.mark.guest
def test_guest_mount_in_namespace_sandbox(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "from-host").write_text("host-data\n")
    sock = tmp_path / "vfs.sock"
    with pyvirtiofsd(share, sock, "--sandbox", "namespace") as proc:
        # the keeper is forked right after the socket appears, and clones the server,
        # whose root becomes the share once the sandbox is set up
        server = None
        deadline = time.monotonic() + 10
        while server is None and time.monotonic() < deadline:
            for pid in descendants(proc.pid):
                try:
                    if os.stat(f"/proc/{pid}/root/").st_ino == share.stat().st_ino:
                        server = pid
                except OSError:
                    pass
            time.sleep(0.05)
        assert server is not None, "no process under the daemon has the share as root"
        assert os.readlink(f"/proc/{server}/ns/pid") != os.readlink("/proc/self/ns/pid")
        run = run_guest(sock, SCRIPT, timeout=300)
        assert proc.wait(30) == 0  # the guest powered off: the daemon ends cleanly
    assert run.rc == 0, run.describe()
    assert run.script_output.split("\n")[:4] == [
        "guest-data", "host-data", "a abs-link from-host ", "11 1"]
    assert (share / "a" / "moved").read_text() == "guest-data\n"
    assert os.readlink(share / "abs-link") == "/etc/hostname"
    assert not (share / "a" / "b" / "file").exists()
    assert not sock.exists()
