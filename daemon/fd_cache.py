"""A worker's bounded cache of O_PATH fds for inodes the shared table knows only by file
handle (``--inode-file-handles=prefer|mandatory``).

The table entry holds no fd, so a guest that caches a million dentries costs no fds; a
worker re-opens an inode with ``open_by_handle_at`` when a request needs it and keeps the
fd here, least recently used first out. Keys are nodeids, which are never reused, so an
entry forgotten elsewhere can only leave a stale fd behind until it is evicted, never
answer for another inode.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from daemon._sys import ffi, lib


class FdCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 1)
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pinned: dict[int, int] = {}  # nodeid -> requests using its fd right now
        self.opened = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._fds)

    def get(self, nodeid: int) -> int:
        fd = self._fds.get(nodeid, -1)
        if fd >= 0:
            self._fds.move_to_end(nodeid)
            self.hits += 1
        return fd

    def put(self, nodeid: int, fd: int) -> None:
        """Keep fd for nodeid (the cache now owns it), evicting the oldest if full."""
        old = self._fds.pop(nodeid, -1)
        if old >= 0 and old != fd:
            os.close(old)
        self._fds[nodeid] = fd
        if len(self._fds) > self.capacity:
            self._evict()

    def _evict(self) -> None:
        """Close the least recently used fds that no request is using."""
        for victim in list(self._fds):
            if len(self._fds) <= self.capacity:
                return
            if victim not in self._pinned:
                os.close(self._fds.pop(victim))

    def pin(self, nodeid: int) -> None:
        """Keep nodeid's fd open while a request uses it, whatever else gets cached."""
        self._pinned[nodeid] = self._pinned.get(nodeid, 0) + 1

    def unpin(self, nodeid: int) -> None:
        left = self._pinned.pop(nodeid) - 1
        if left:
            self._pinned[nodeid] = left

    def drop(self, nodeid: int) -> None:
        fd = self._fds.pop(nodeid, -1)
        if fd >= 0:
            os.close(fd)

    def clear(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


def open_by_handle(mount_fd: int, handle: bytes, handle_type: int) -> int:
    """O_PATH fd for a file handle (needs CAP_DAC_READ_SEARCH)."""
    buf = ffi.from_buffer(handle)
    fd = lib.pyvfs_open_by_handle(mount_fd, buf, len(handle), handle_type,
                                  os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    if fd < 0:
        err = lib.pyvfs_errno()
        raise OSError(err, f"open_by_handle_at: {os.strerror(err)}")
    return fd
