"""find-paths mode's paths, collected while the guest still runs (as virtiofsd collects them
when dirty-page logging starts), so that the switch-over, with the guest stopped, only
re-checks what may have changed since.

Collection, in two passes over the inode table: first every directory's (mtime, ctime),
then every inode's path (the fd directory's link of its O_PATH fd, or of an fd its file
handle opens). An inode's path changes only when an entry on it is renamed or unlinked,
which changes the mtime of the directory holding that entry; that directory was an
ancestor of the inode when its path was read, so it is in the table (the guest holds the
parents of what it holds) and was stamped before any path was read. At the switch-over
each directory is stamped again; a directory whose stamp changed, that had no stamp, or
whose stamp was too recent to be trusted (a change within the same coarse clock tick
would keep it: see ``RECENT_NS``) makes every inode whose collected path lies below its
old or its current path collected again; inodes looked up since are collected then too.
So the stopped phase costs a stat per directory and a readlink per changed or new inode,
not a readlink per inode. The guest's own renames and unlinks change the mtimes the same
way as the host's. ``--migration-confirm-paths`` does not use any of this: it reads and
confirms every path at the switch-over.
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
            self.paths[inodes.nodeids[i]] = path_or_none(fs, inodes, i)
            if i % CHUNK == CHUNK - 1:
                await asyncio.sleep(0)
        self.complete = True
        log.info("migration: paths of %d inodes collected in %.0f ms (guest running)",
                 inodes.count, (time.monotonic() - started) * 1000)

    def at_switch_over(self, inodes: Inodes) -> list[bytes | None]:
        """Every inode's path now (the guest stopped): the collected ones, but those below
        a directory that changed since, and those looked up since, read again."""
        fs = self.fs
        suspects: list[bytes] = []
        if self.root_stamp is None or _root_stamp(fs) != self.root_stamp:
            suspects.append(b"")
        for i in inodes.dirs():
            nodeid = inodes.nodeids[i]
            if nodeid not in self.stamps:
                continue  # looked up since: it and all below it are new, read below
            old = self.stamps[nodeid]
            if old is not None:
                try:
                    if _stamp(fs, inodes, i) == old:
                        continue
                except OSError:
                    pass
            for prefix in (self.paths.get(nodeid), path_or_none(fs, inodes, i)):
                if prefix is not None and prefix != UNLINKED:
                    suspects.append(prefix)
        stale = _below_any(self.paths, suspects)
        paths = self.paths
        out = [paths.get(n) for n in inodes.nodeids]
        again = [i for i, n in enumerate(inodes.nodeids) if n in stale or n not in paths]
        for i in again:
            out[i] = path_or_none(fs, inodes, i)
        if again:
            log.info("migration: %d of %d paths read again at the switch-over", len(again),
                     inodes.count)
        return out


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
