"""--inode-file-handles with virtiofsd's meanings: prefer and mandatory keep inodes by
file handle (no fd per inode), never keeps an O_PATH fd per inode, and a share without
file handles falls back (prefer) or is refused at start (mandatory)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.protocol import fuse
from tests.support.daemon import REPO, daemon_log, pyvirtiofsd
from tests.support.frontend import Frontend


def stats(sock: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "stats", "--socket-path", str(sock), "--json",
         "--interval", "0.05"], cwd=REPO, check=True, capture_output=True, text=True,
        timeout=30)
    return json.loads(out.stdout)


@pytest.mark.parametrize("mode", ["never", "prefer", "mandatory"])
def test_inodes_by_handle_or_by_fd(tmp_path: Path, mode: str) -> None:
    share = tmp_path / "share"
    share.mkdir()
    for i in range(50):
        (share / f"f{i}").write_text(f"content {i}")
    sock = tmp_path / "vfs.sock"
    # RLIMIT_NOFILE 800 leaves each worker's fd cache its minimum, 32 fds
    with pyvirtiofsd(share, sock, "--inode-file-handles", mode, "--rlimit-nofile", "800"):
        front = Frontend(str(sock))
        front.setup(3)
        front.init()
        before = stats(sock)
        for i in range(50):
            err, entry = front.lookup(1, f"f{i}".encode(), q=1 + i % 2)
            assert err == 0
            nodeid = struct.unpack_from("<Q", entry)[0]
            # opened and read on the other request queue
            q = 2 - i % 2
            err, opened = front.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(0, 0), q=q)
            assert err == 0
            fh = struct.unpack_from("<Q", opened)[0]
            err, data = front.fuse(fuse.Opcode.READ, nodeid,
                                   fuse.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0), q=q)
            assert (err, data) == (0, f"content {i}".encode())
            front.fuse(fuse.Opcode.RELEASE, nodeid, fuse.RELEASE_IN.pack(fh, 0, 0, 0), q=q)
        after = stats(sock)
        front.close()
    assert after["inodes"]["entries"] == 51
    if mode == "never":
        assert after["inodes"]["with_file_handle"] == 0
        # one O_PATH fd per inode the guest holds
        assert after["fds_held"] - before["fds_held"] >= 50
    else:
        assert after["inodes"]["with_file_handle"] == 51
        # each of the two request workers caches at most 32 re-opened fds; the table
        # itself pins none
        assert after["fds_held"] - before["fds_held"] <= 2 * 32


def test_share_without_file_handles(tmp_path: Path) -> None:
    """procfs exports no file handles: prefer falls back to fds with a warning, and
    mandatory refuses to start, naming the option."""
    sock = tmp_path / "vfs.sock"
    with pyvirtiofsd("/proc/sys", sock, "--inode-file-handles", "prefer") as proc:
        front = Frontend(str(sock))
        front.setup(2)
        front.init()
        err, _ = front.lookup(1, b"kernel")
        assert err == 0
        front.close()
        log = daemon_log(proc)
    assert "has no file handles" in log
    r = subprocess.run(
        [sys.executable, "-m", "supervisor", "--shared-dir", "/proc/sys", "--socket-path",
         str(tmp_path / "m.sock"), "--sandbox", "none", "--inode-file-handles", "mandatory"],
        cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "--inode-file-handles=mandatory" in r.stderr and "/proc/sys" in r.stderr
