"""``pyvirtiofsd stats`` reports what the daemon's shared tables hold."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from daemon.protocol import fuse
from tests.support.daemon import REPO, pyvirtiofsd
from tests.support.frontend import Frontend


def stats(sock: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "stats", "--socket-path", str(sock), "--json",
         "--interval", "0.1"], cwd=REPO, check=True, capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout)


def test_stats_counts_inodes_open_files_and_workers(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    for i in range(5):
        (share / f"f{i}").write_text(str(i))
    sock = tmp_path / "vfs.sock"
    with pyvirtiofsd(share, sock) as proc:
        front = Frontend(str(sock))
        front.setup(2)
        front.init()
        before = stats(sock)
        nodeids = []
        for i in range(5):
            err, entry = front.lookup(1, f"f{i}".encode())
            assert err == 0
            nodeids.append(struct.unpack_from("<Q", entry)[0])
        for nodeid in nodeids[:2]:
            err, _ = front.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(0, 0))
            assert err == 0
        after = stats(sock)
        front.fuse(fuse.Opcode.FORGET, nodeids[0], fuse.FORGET_IN.pack(1), q=0, out_size=0)
        front.fuse(fuse.Opcode.FORGET, nodeids[1], fuse.FORGET_IN.pack(1), q=0, out_size=0)
        forgotten = stats(sock)
        front.close()
    assert before["pid"] == proc.pid and before["workers"] == 2
    assert before["inodes"]["entries"] == 1 and before["open_files"]["entries"] == 0
    assert after["inodes"]["entries"] == 6 and after["open_files"]["entries"] == 2
    assert after["inodes"]["capacity"] == 1 << 20
    # an open file keeps nothing of the inode alive in the table: FORGET removes both
    assert forgotten["inodes"]["entries"] == 4 and forgotten["open_files"]["entries"] == 2
    assert after["fds_held"] > 0


def test_stats_without_a_daemon_says_so(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "supervisor", "stats", "--socket-path",
                        str(tmp_path / "none.sock")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "none.sock.pid" in r.stderr
