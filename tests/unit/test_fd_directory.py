"""The fd directory as a directory fd for the C path (daemon.fs.proc_fd.fd_directory_fd):
a name under it reaches the same inode as the fd, and a sandbox's own fd directory wins."""

from __future__ import annotations

import os
from pathlib import Path

from daemon.fs import proc_fd


def test_names_under_it_reach_the_fds_inode(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    fd = os.open(f, os.O_PATH)
    try:
        d = proc_fd.fd_directory_fd()
        assert d >= 0 and proc_fd.fd_directory_fd() == d  # opened once
        st = os.stat(str(fd), dir_fd=d)
        assert (st.st_ino, st.st_dev) == (f.stat().st_ino, f.stat().st_dev)
    finally:
        os.close(fd)


def test_the_sandboxs_fd_directory_wins() -> None:
    saved = proc_fd.PROC_DIR_FD
    try:
        proc_fd.use_fd_directory(12345)
        assert proc_fd.fd_directory_fd() == 12345
    finally:
        proc_fd.PROC_DIR_FD = saved
