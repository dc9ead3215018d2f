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

from daemon.native._sys import ffi, lib


class FdCache:
    """The cache itself is C (``daemon/native/fd_cache.c``), so the worker's C fast path
    (GETATTR, LOOKUP, UNLINK, CREATE, READDIRPLUS, FORGET, BATCH_FORGET) and the Python
    operations share it."""

    __slots__ = ("c",)

    def __init__(self, capacity: int) -> None:
        c = lib.pyvfs_fdc_new(max(capacity, 1))
        if c == ffi.NULL:
            raise MemoryError("fd cache")
        self.c = ffi.gc(c, lib.pyvfs_fdc_free)

    @property
    def capacity(self) -> int:
        return self.c.capacity

    @property
    def opened(self) -> int:
        """open_by_handle_at calls (statistics)."""
        return self.c.opened

    @opened.setter
    def opened(self, value: int) -> None:
        self.c.opened = value

    @property
    def hits(self) -> int:
        return self.c.hits

    def __len__(self) -> int:
        return self.c.count

    def get(self, nodeid: int) -> int:
        return lib.pyvfs_fdc_get(self.c, nodeid)

    def put(self, nodeid: int, fd: int) -> None:
        """Keep fd for nodeid (the cache now owns it), evicting the oldest if full. A nodeid
        cached already and pinned keeps the fd its request holds; fd is closed instead."""
        if lib.pyvfs_fdc_put(self.c, nodeid, fd) < 0:
            raise MemoryError("fd cache")  # fd was closed

    def pin(self, nodeid: int) -> None:
        """Keep nodeid's fd open while a request uses it, whatever else gets cached."""
        if lib.pyvfs_fdc_pin(self.c, nodeid) < 0:
            raise MemoryError("fd cache pins")

    def unpin(self, nodeid: int) -> None:
        lib.pyvfs_fdc_unpin(self.c, nodeid)

    def drop(self, nodeid: int) -> None:
        """Close nodeid's fd (the guest forgot it), unless a request still pins it: the
        worker's sweep closes that one once the request has let go."""
        lib.pyvfs_fdc_drop(self.c, nodeid)

    def clear(self) -> None:
        lib.pyvfs_fdc_clear(self.c)


def open_by_handle(mount_fd: int, handle: bytes, handle_type: int) -> int:
    """O_PATH fd for a file handle (needs CAP_DAC_READ_SEARCH)."""
    buf = ffi.from_buffer(handle)
    fd = lib.pyvfs_open_by_handle(mount_fd, buf, len(handle), handle_type,
                                  os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    if fd < 0:
        err = lib.pyvfs_errno()
        raise OSError(err, f"open_by_handle_at: {os.strerror(err)}")
    return fd
