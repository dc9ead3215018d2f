"""The shared directory each fuzz input starts from: every kind of file a guest can meet.

Names are unique across directories (a directory's entries carry its name), so an entry
listed under the wrong directory is recognisable. Special files (FIFOs, device nodes, a
socket) are what the daemon must never open; ``outside`` holds what symlinks point at and
what must never change.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
from collections.abc import Callable
from pathlib import Path

DEEP = 12  # levels of the deep tree
BIG_DIR = 150  # entries of the big directory (more than the inode table holds)
BIG_FILE = 3 << 20
OUTSIDE_SECRET = b"host secret\n"


def _linked(share: Path, outside: Path, note: Callable[[str, str], None]) -> None:
    (share / "file").write_bytes(bytes(range(256)) * 40)
    note("file", "reg")
    os.link(share / "file", share / "hardlink")
    note("hardlink", "reg")
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


def _files(share: Path, outside: Path, note: Callable[[str, str], None]) -> None:
    (share / "empty").write_bytes(b"")
    note("empty", "reg")
    with open(share / "big", "wb") as f:
        f.truncate(BIG_FILE)
        f.seek(BIG_FILE // 2)
        f.write(b"middle")
    note("big", "reg")


def _special(share: Path, outside: Path, note: Callable[[str, str], None]) -> None:
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


SYMLINKS = (("link_rel", "file"), ("link_dir", "dir"), ("link_out", "../outside/victim"),
            ("link_abs", "@outside/victim"), ("link_etc", "/etc"),
            ("link_dangling", "nowhere"), ("link_loop", "link_loop"))


def _symlinks(share: Path, outside: Path, note: Callable[[str, str], None]) -> None:
    for name, target in SYMLINKS:
        os.symlink(target.replace("@outside", str(outside)), share / name)
        note(name, "lnk")


def _other(share: Path, outside: Path, note: Callable[[str, str], None]) -> None:
    e = share / "other"
    e.mkdir()
    note("other", "dir")
    for name in ("other_x", "other_y"):
        (e / name).write_bytes(name.encode())
        note(f"other/{name}", "reg")
    (e / "other_sub").mkdir()
    note("other/other_sub", "dir")


def _many(share: Path, outside: Path, note: Callable[[str, str], None]) -> None:
    big = share / "many"
    big.mkdir()
    note("many", "dir")
    for i in range(BIG_DIR):
        os.mknod(big / f"many_{i}", stat.S_IFREG | 0o644)  # one system call each
        note(f"many/many_{i}", "reg")


def _deep(share: Path, outside: Path, note: Callable[[str, str], None]) -> None:
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


def _ro(share: Path, outside: Path, note: Callable[[str, str], None]) -> None:
    ro = share / "ro"
    ro.mkdir()
    (ro / "ro_file").write_bytes(b"ro")
    note("ro", "dir")
    note("ro/ro_file", "reg")
    os.chmod(ro, 0o555)


# top-level entries built (and rebuilt) together; hard links keep their group together
GROUPS: dict[tuple[str, ...], Callable[[Path, Path, Callable[[str, str], None]], None]] = {
    ("file", "hardlink", "dir"): _linked,
    ("empty", "big"): _files,
    ("fifo", "null", "zero", "sock"): _special,
    tuple(name for name, _ in SYMLINKS): _symlinks,
    ("other",): _other,
    ("many",): _many,
    ("deep0",): _deep,
    ("ro",): _ro,
}


def populate(share: Path, outside: Path) -> dict[str, str]:
    """Fill ``share`` (which must exist and be empty); returns relative path -> kind."""
    kinds: dict[str, str] = {}
    outside.mkdir(exist_ok=True)
    (outside / "victim").write_bytes(OUTSIDE_SECRET)
    for build in GROUPS.values():
        build(share, outside, kinds.__setitem__)
    return kinds


def signature(share: Path, names: tuple[str, ...]) -> tuple:
    """What changes when anything in these entries changes (ctime covers metadata and
    xattrs, mtime contents, the inode a replacement)."""
    out = []
    for name in names:
        top = share / name
        try:
            st = top.lstat()
        except OSError:
            out.append((name, None))
            continue
        paths = [top]
        if stat.S_ISDIR(st.st_mode):
            for root, dirs, files in os.walk(top):
                paths.extend(Path(root, n) for n in dirs + files)
        for p in paths:
            try:
                s = p.lstat()
            except OSError:
                continue
            out.append((str(p), s.st_ino, s.st_mode, s.st_size, s.st_mtime_ns, s.st_ctime_ns,
                        s.st_nlink))
    return tuple(out)


class Share:
    """The share of one daemon instance, rebuilt between inputs where it changed."""

    def __init__(self, share: Path, outside: Path) -> None:
        self.share = share
        self.outside = outside
        self.kinds = populate(share, outside)
        self.root_mode = share.lstat().st_mode
        self.signatures = {names: signature(share, names) for names in GROUPS}
        self.outside_sig = signature(outside.parent, (outside.name,))

    def reset(self) -> None:
        """Back to what populate() made: groups that changed are made again, anything
        else at the top level goes."""
        share, outside = self.share, self.outside
        os.chmod(share, stat.S_IMODE(self.root_mode))
        known = {name for names in GROUPS for name in names}
        for entry in os.scandir(share):
            if entry.name not in known:
                _remove(Path(entry.path))
        if signature(outside.parent, (outside.name,)) != self.outside_sig:
            _remove(outside)
            outside.mkdir()
            (outside / "victim").write_bytes(OUTSIDE_SECRET)
            self.outside_sig = signature(outside.parent, (outside.name,))
        for names, build in GROUPS.items():
            if signature(share, names) == self.signatures[names]:
                continue
            for name in names:
                _remove(share / name)
            build(share, outside, self.kinds.__setitem__)
            self.signatures[names] = signature(share, names)


def _remove(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        for root, dirs, _ in os.walk(path):
            for name in dirs:
                sub = os.path.join(root, name)
                if not os.path.islink(sub):  # the guest may have made it unreadable
                    with contextlib.suppress(OSError):
                        os.chmod(sub, 0o755)
        os.chmod(path, 0o755)
        shutil.rmtree(path)
    else:
        path.unlink()


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
