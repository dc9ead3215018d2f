"""The shared directory each fuzz input starts from: every kind of file a guest can meet.

Names are unique across directories (a directory's entries carry its name), so an entry
listed under the wrong directory is recognisable. Special files (FIFOs, device nodes, a
socket) are what the daemon must never open; ``outside`` holds what symlinks point at and
what must never change.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path

DEEP = 12  # levels of the deep tree
BIG_DIR = 150  # entries of the big directory (more than the inode table holds)
BIG_FILE = 3 << 20
OUTSIDE_SECRET = b"host secret\n"


def populate(share: Path, outside: Path) -> dict[str, str]:
    """Fill ``share`` (which must exist and be empty); returns relative path -> kind."""
    kinds: dict[str, str] = {}

    def note(rel: str, kind: str) -> None:
        kinds[rel] = kind

    outside.mkdir(exist_ok=True)
    (outside / "victim").write_bytes(OUTSIDE_SECRET)
    (share / "file").write_bytes(bytes(range(256)) * 40)
    note("file", "reg")
    (share / "empty").write_bytes(b"")
    note("empty", "reg")
    with open(share / "big", "wb") as f:
        f.truncate(BIG_FILE)
        f.seek(BIG_FILE // 2)
        f.write(b"middle")
    note("big", "reg")
    os.link(share / "file", share / "hardlink")
    note("hardlink", "reg")
    os.mkfifo(share / "fifo")
    note("fifo", "fifo")
    if os.geteuid() == 0:
        os.mknod(share / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        note("null", "chr")
        os.mknod(share / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
        note("zero", "chr")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(share / "sock"))
        note("sock", "sock")
    finally:
        sock.close()
    for name, target in (("link_rel", "file"), ("link_dir", "dir"),
                         ("link_out", "../outside/victim"),
                         ("link_abs", str(outside / "victim")), ("link_etc", "/etc"),
                         ("link_dangling", "nowhere"), ("link_loop", "link_loop")):
        os.symlink(target, share / name)
        note(name, "lnk")
    d = share / "dir"
    d.mkdir()
    note("dir", "dir")
    for name in ("dir_a", "dir_b"):
        (d / name).write_bytes(name.encode() * 10)
        note(f"dir/{name}", "reg")
    os.mkfifo(d / "dir_fifo")
    note("dir/dir_fifo", "fifo")
    os.link(share / "file", d / "dir_hardlink")
    note("dir/dir_hardlink", "reg")
    e = share / "other"
    e.mkdir()
    note("other", "dir")
    for name in ("other_x", "other_y"):
        (e / name).write_bytes(name.encode())
        note(f"other/{name}", "reg")
    (e / "other_sub").mkdir()
    note("other/other_sub", "dir")
    big = share / "many"
    big.mkdir()
    note("many", "dir")
    for i in range(BIG_DIR):
        (big / f"many_{i}").write_bytes(b"")
        note(f"many/many_{i}", "reg")
    p = share
    rel = ""
    for level in range(DEEP):
        name = f"deep{level}"
        p = p / name
        rel = f"{rel}/{name}" if rel else name
        p.mkdir()
        note(rel, "dir")
        (p / f"leaf{level}").write_bytes(b"leaf")
        note(f"{rel}/leaf{level}", "reg")
    ro = share / "ro"
    ro.mkdir()
    (ro / "ro_file").write_bytes(b"ro")
    note("ro", "dir")
    note("ro/ro_file", "reg")
    os.chmod(ro, 0o555)
    return kinds


def reset(share: Path, outside: Path) -> dict[str, str]:
    """Empty ``share`` (keeping the directory itself: it is the daemon's root inode) and
    fill it again."""
    os.chmod(share, 0o755)
    for entry in os.scandir(share):
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            for root, dirs, _ in os.walk(path):
                for name in dirs:
                    try:
                        os.chmod(os.path.join(root, name), 0o755, follow_symlinks=False)
                    except OSError:
                        pass
            os.chmod(path, 0o755)
            shutil.rmtree(path)
        else:
            path.unlink()
    if outside.exists():
        shutil.rmtree(outside)
    return populate(share, outside)


def snapshot(base: Path, share: Path) -> dict[str, tuple[int, int, bytes]]:
    """Everything under ``base`` outside the share (mode, size, contents of files), so a
    write that escaped the share shows."""
    out: dict[str, tuple[int, int, bytes]] = {}
    for root, dirs, files in os.walk(base):
        if Path(root) == share:
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if Path(root, d) != share]
        for name in files + dirs:
            p = Path(root) / name
            if p.name.startswith(("vu.sock", "daemon.log")):
                continue
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out[str(p)] = (st.st_mode, st.st_size, data)
    return out
