"""find-paths mode's paths, collected while the guest still runs (as virtiofsd collects them
when dirty-page logging starts), so that the switch-over, with the guest stopped, only
re-checks what may have changed since.

Collection, in two passes over the inode table: first every directory's (mtime, ctime),
then every inode's path (the fd directory's link of its O_PATH fd, or of an fd its file
handle opens) and (st_ino, st_dev). An inode's path changes only when an entry on it is
renamed or unlinked, which changes the mtime of the directory holding that entry; that
directory was an ancestor of the inode when its path was read, so it is in the table (the
guest holds the parents of what it holds) and was stamped before any path was read.

At the switch-over each directory is stamped again. In a directory whose stamp changed
(or was too recent to be trusted: a change within the same coarse clock tick would keep
it, see ``RECENT_NS``), each entry it held at the collection (the table's inodes whose
collected path is the directory's and one more name) is looked up by name: one that no
longer leads to the same inode has its path and all paths below it read again. Inodes
looked up since are read too. So the stopped phase costs a stat per directory, a stat
per entry of a changed directory and a readlink per moved or new inode, not a readlink
per inode. The guest's own renames and unlinks change the mtimes the same way as the
host's. ``--migration-confirm-paths`` does not use any of this: it reads and confirms
every path at the switch-over.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from itertools import accumulate
from typing import Any

from daemon.fs import proc_fd
from daemon.fs.fd_cache import open_by_handle
from daemon.fs.ops.base import O_PATH_FLAGS
from daemon.fs.passthrough import PassthroughFs

log = logging.getLogger("pyvirtiofsd.migration")

UNLINKED = b"\0unlinked"  # the inode has no name (removed while open): never a path
RECENT_NS = 200_000_000  # a stamp younger than this at collection is not trusted
CHUNK = 256  # inodes per turn of the event loop while the guest runs


class Inodes:
    """The inode table's columns (``InodeTable.export`` with handles), by index."""

    def __init__(self, cols: dict[str, Any]) -> None:
        self.cols = cols
        self.count: int = cols["count"]
        self.nodeids: list[int] = cols["nodeid"].tolist()
        self.modes: list[int] = cols["mode"].tolist()
        self._fds: list[int] = cols["fd"].tolist()
        self._hlen: list[int] = cols["handle_len"].tolist()
        self._hat = [0, *accumulate(self._hlen)]

    def handle(self, i: int) -> tuple[bytes, int] | None:
        if not self._hlen[i]:
            return None
        at = self._hat[i]
        return self.cols["handles"][at:at + self._hlen[i]], self.cols["handle_type"][i]

    def fd(self, fs: PassthroughFs, i: int) -> tuple[int, bool]:
        """An O_PATH fd of inode ``i``: its own (False: do not close) or one its handle
        opens."""
        if self._fds[i] >= 0:
            return self._fds[i], False
        handle = self.handle(i)
        if handle is None:
            raise OSError(errno.EBADF, "neither fd nor file handle")
        return open_by_handle(fs.mount_fd, handle[0], handle[1]), True

    def dirs(self) -> list[int]:
        return [i for i, m in enumerate(self.modes) if stat.S_ISDIR(m)]


def readlink_fd(fd: int) -> str:
    """Where the fd directory's link of ``fd`` points (the inode's current path)."""
    if proc_fd.PROC_DIR_FD < 0:
        return os.readlink(f"/proc/self/fd/{fd}")
    return os.readlink(str(fd), dir_fd=proc_fd.PROC_DIR_FD)


def relative(fs: PassthroughFs, target: str) -> bytes | None:
    """``target`` (a link of the fd directory) relative to the share: UNLINKED for a file
    removed while open; None when it is not below the share."""
    if target.endswith(" (deleted)"):
        return UNLINKED
    if not target.startswith("/"):
        return None
    root = os.path.normpath(fs.shared_dir)
    if root == "/":
        rel = target.lstrip("/")
    elif target == root:
        rel = ""
    elif target.startswith(root + "/"):
        rel = target[len(root) + 1:]
    else:
        return None
    return os.fsencode(rel)


def path_of(fs: PassthroughFs, inodes: Inodes, i: int) -> bytes | None:
    """Inode ``i``'s path now (UNLINKED, or None when it has none below the share)."""
    fd, close = inodes.fd(fs, i)
    try:
        return relative(fs, readlink_fd(fd))
    finally:
        if close:
            os.close(fd)


def _path_and_ids(fs: PassthroughFs, inodes: Inodes,
                  i: int) -> tuple[bytes | None, tuple[int, int]]:
    """Inode ``i``'s path now and its (st_ino, st_dev)."""
    fd, close = inodes.fd(fs, i)
    try:
        st = os.fstat(fd)
        return relative(fs, readlink_fd(fd)), (st.st_ino, st.st_dev)
    finally:
        if close:
            os.close(fd)


def _stamp(fs: PassthroughFs, inodes: Inodes, i: int) -> tuple[int, int]:
    fd, close = inodes.fd(fs, i)
    try:
        st = os.fstat(fd)
    finally:
        if close:
            os.close(fd)
    return st.st_mtime_ns, st.st_ctime_ns


def path_or_none(fs: PassthroughFs, inodes: Inodes, i: int) -> bytes | None:
    try:
        return path_of(fs, inodes, i)
    except OSError:
        return None


def all_paths(fs: PassthroughFs, inodes: Inodes) -> list[bytes | None]:
    """Every inode's path, read now (one readlink each)."""
    return [path_or_none(fs, inodes, i) for i in range(inodes.count)]


class PathCollector:
    """The paths of one migration's inodes, collected while logging, checked at the end."""

    def __init__(self, fs: PassthroughFs) -> None:
        self.fs = fs
        self.paths: dict[int, bytes | None] = {}
        self.stamps: dict[int, tuple[int, int] | None] = {}  # None: not to be trusted
        self.root_stamp: tuple[int, int] | None = None
        self.ids: dict[int, tuple[int, int]] = {}  # nodeid -> (st_ino, st_dev)
        self.complete = False

    async def collect(self) -> None:
        """Both passes, a chunk of inodes per turn of the event loop."""
        started = time.monotonic()
        fs = self.fs
        inodes = Inodes(fs.inodes.export(with_handles=True))
        for k, i in enumerate(inodes.dirs()):
            try:
                stamp: tuple[int, int] | None = _stamp(fs, inodes, i)
            except OSError:
                stamp = None
            self.stamps[inodes.nodeids[i]] = _trusted(stamp)
            if k % CHUNK == CHUNK - 1:
                await asyncio.sleep(0)
        self.root_stamp = _trusted(_root_stamp(fs))  # before any path, like the others
        for i in range(inodes.count):
            nodeid = inodes.nodeids[i]
            try:
                self.paths[nodeid], self.ids[nodeid] = _path_and_ids(fs, inodes, i)
            except OSError:
                self.paths[nodeid] = None
            if i % CHUNK == CHUNK - 1:
                await asyncio.sleep(0)
        self.complete = True
        log.info("migration: paths of %d inodes collected in %.0f ms (guest running)",
                 inodes.count, (time.monotonic() - started) * 1000)

    def at_switch_over(self, inodes: Inodes) -> list[bytes | None]:
        """Every inode's path now (the guest stopped): the collected ones, but those below
        an entry of a changed directory that is no longer what it was, and those looked up
        since, read again."""
        fs = self.fs
        changed: list[tuple[bytes, int, bool]] = []  # (collected path, index, close fd)
        if self.root_stamp is None or _root_stamp(fs) != self.root_stamp:
            changed.append((b"", os.open(fs.shared_dir, O_PATH_FLAGS | os.O_DIRECTORY), True))
        stale: list[bytes] = []  # collected paths whose subtrees are read again
        try:
            for i in inodes.dirs():
                nodeid = inodes.nodeids[i]
                if nodeid not in self.stamps:
                    continue  # looked up since: it and all below it are new, read below
                old = self.stamps[nodeid]
                try:
                    if old is not None and _stamp(fs, inodes, i) == old:
                        continue
                    path = self.paths.get(nodeid)
                    if path is None or path == UNLINKED:
                        continue
                    fd, close = inodes.fd(fs, i)
                    changed.append((path, fd, close))
                except OSError:
                    path = self.paths.get(nodeid)
                    if path is not None and path != UNLINKED:
                        stale.append(path)
            if changed:
                stale += self._entries_gone(changed)
        finally:
            for _path, fd, close in changed:
                if close:
                    os.close(fd)
        again_set = _below_any(self.paths, stale)
        paths = self.paths
        out = [paths.get(n) for n in inodes.nodeids]
        again = [i for i, n in enumerate(inodes.nodeids)
                 if n in again_set or n not in paths or out[i] is None or out[i] == UNLINKED]
        for i in again:
            out[i] = path_or_none(fs, inodes, i)
        if again:
            log.info("migration: %d of %d paths read again at the switch-over", len(again),
                     inodes.count)
        return out

    def _entries_gone(self, changed: list[tuple[bytes, int, bool]]) -> list[bytes]:
        """Of the entries the changed directories held at the collection (the table's
        inodes whose collected path is the directory's and one more name), those whose
        name no longer leads to the same inode: their collected paths."""
        children: dict[bytes, list[tuple[bytes, int]]] = {}
        for nodeid, path in self.paths.items():
            if path is not None and path != UNLINKED and path:
                parent, _, name = path.rpartition(b"/")
                children.setdefault(parent, []).append((name, nodeid))
        gone = []
        for dir_path, dir_fd, _close in changed:
            for name, nodeid in children.get(dir_path, ()):
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if (st.st_ino, st.st_dev) == self.ids.get(nodeid):
                        continue
                except OSError:
                    pass
                gone.append(dir_path + b"/" + name if dir_path else name)
        return gone


def _root_stamp(fs: PassthroughFs) -> tuple[int, int] | None:
    try:
        st = os.stat(fs.shared_dir)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ctime_ns


def _trusted(stamp: tuple[int, int] | None) -> tuple[int, int] | None:
    """None for a stamp so recent that a change in the same clock tick might not show."""
    if stamp is None or time.time_ns() - max(stamp) < RECENT_NS:
        return None
    return stamp


def _below_any(paths: dict[int, bytes | None], prefixes: list[bytes]) -> set[int]:
    """The nodeids whose path is one of ``prefixes`` or lies below one."""
    if not prefixes:
        return set()
    if b"" in prefixes:
        return set(paths)
    starts = tuple(p + b"/" for p in prefixes)
    exact = set(prefixes)
    return {n for n, p in paths.items()
            if p is not None and (p in exact or p.startswith(starts))}
