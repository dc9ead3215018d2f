"""Inode references: nodeid <-> fd. An entry the guest looks up is claimed in the shared
inode table (one reference per lookup, given back by FORGET); the root is added at start.
An inode on the share's mount is kept by file handle alone and reopened by any worker
(its fd cached per worker, :mod:`daemon.fs.fd_cache`); others keep their O_PATH fd. A
request pins what it uses (:class:`InodeRef`, :class:`HandleRef`) for its length.
"""

from __future__ import annotations

import errno
import logging
import os

from daemon.fs.fd_cache import open_by_handle
from daemon.fs.ops.base import O_PATH_FLAGS, FsBase, GuestInputError, Request
from daemon.fs.proc_fd import proc_open
from daemon.native._sys import ffi, lib
from daemon.protocol import fuse

log = logging.getLogger("pyvirtiofsd.fs")


class InodeRef:
    """A pin on an inode for the length of one request: its fd stays open whatever the
    guest forgets meanwhile on other queues, and a forgotten nodeid is refused."""

    __slots__ = ("fs", "slot", "fd", "nodeid", "cache_held")

    def __init__(self, fs: InodeOps, nodeid: int) -> None:
        got = fs.inodes.pin(nodeid)
        if got is None:
            raise GuestInputError(errno.EBADF, f"unknown nodeid {nodeid}", "nodeid")
        self.fs = fs
        self.slot, self.fd = got
        self.nodeid = nodeid
        self.cache_held = False
        if self.fd < 0:
            try:
                self.fd = fs.fd_for_handle(nodeid, self.slot)
            except BaseException:
                self.__exit__()
                raise
            fs.fd_cache.pin(nodeid)
            self.cache_held = True

    def __enter__(self) -> InodeRef:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cache_held:
            self.fs.fd_cache.unpin(self.nodeid)
        self.fs.inodes.unpin(self.nodeid)


class HandleRef:
    """A pin on an open file for the length of one request (a RELEASE meanwhile closes the
    fd only once the request lets go of it)."""

    __slots__ = ("fs", "slot", "fd", "fh")

    def __init__(self, fs: FsBase, fh: int) -> None:
        got = fs.handles.pin(fh)
        if got is None:
            raise GuestInputError(errno.EBADF, f"unknown file handle {fh:#x}", "fh")
        self.fs = fs
        self.fh = fh
        self.slot, self.fd = got

    def __enter__(self) -> HandleRef:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fs.handles.unpin(self.fh)


class InodeOps(FsBase):
    """Lookups claimed and forgotten, the root, and the fd of an inode the table keeps by
    file handle only."""

    def add_root(self) -> int:
        """Insert the shared directory as nodeid 1; it is never forgotten."""
        fd = os.open(self.shared_dir, O_PATH_FLAGS | os.O_DIRECTORY)
        st = os.fstat(fd)
        handle, htype, mnt = self._file_handle(fd)
        if self.config.file_handles == "mandatory" and handle is None:
            os.close(fd)
            raise OSError(
                errno.EOPNOTSUPP,
                f"--inode-file-handles=mandatory, but {self.shared_dir} has no file handles "
                "(needs CAP_DAC_READ_SEARCH and a file system that supports them)",
            )
        if handle is None and self.config.file_handles == "prefer":
            log.warning("%s has no file handles (needs CAP_DAC_READ_SEARCH and a file "
                        "system that exports them): every inode keeps an O_PATH fd",
                        self.shared_dir)
            self.use_handles = False
        self.root_mnt_id = mnt
        # open_by_handle_at wants a real (not O_PATH) fd on the mount
        self.mount_fd = proc_open(fd, os.O_RDONLY | os.O_DIRECTORY)
        if handle is not None:
            refused = self._handles_refused(handle, htype)
            if refused and self.config.file_handles == "mandatory":
                os.close(fd)
                raise OSError(errno.EPERM, f"--inode-file-handles=mandatory, but file "
                              f"handles of {self.shared_dir} cannot be opened ({refused}; "
                              "open_by_handle_at needs CAP_DAC_READ_SEARCH in the host's "
                              "user namespace, which an unprivileged sandbox lacks): use "
                              "--inode-file-handles=prefer or never")
            if refused:
                # name_to_handle_at works without privileges, open_by_handle_at does not:
                # an inode kept by handle only could not be opened by any other worker
                log.warning("--inode-file-handles=prefer: the shared directory's file "
                            "handles cannot be opened here (%s; open_by_handle_at needs "
                            "CAP_DAC_READ_SEARCH in the host's user namespace): every inode "
                            "keeps an O_PATH fd", refused)
                self.use_handles = False
                handle, htype = None, 0
        self.inodes.insert_root((st.st_ino, st.st_dev, mnt), fd, st.st_mode, handle, htype)
        return fuse.ROOT_ID

    def _handles_refused(self, handle: bytes, htype: int) -> str:
        """Why a file handle of the share cannot be opened again ("" if it can)."""
        fd = lib.pyvfs_open_by_handle(self.mount_fd, handle, len(handle), htype,
                                      O_PATH_FLAGS)
        if fd < 0:
            return os.strerror(lib.pyvfs_errno())
        os.close(fd)
        return ""

    def _file_handle(self, fd: int) -> tuple[bytes | None, int, int]:
        if not self.use_handles:
            return None, 0, 0
        n = lib.pyvfs_name_to_handle(
            fd, b"", 0x1000, self._handle_buf, 128, self._handle_type, self._mount_id
        )  # AT_EMPTY_PATH
        if n < 0:
            return None, 0, 0
        return bytes(ffi.buffer(self._handle_buf, n)), self._handle_type[0], self._mount_id[0]

    def do_lookup(self, parent: InodeRef, name: bytes) -> tuple[int, os.stat_result]:
        """Open, identify and claim one directory entry; leaks one reference to the guest."""
        fd = os.open(name, O_PATH_FLAGS, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self.claim(fd, st, parent.nodeid, name), st

    def claim(self, fd: int, st: os.stat_result, parent: int, name: bytes) -> int:
        """Find or insert the inode of an O_PATH fd we own; the fd ends up in the table, in
        this worker's fd cache, or closed. Returns its nodeid, with one reference taken."""
        try:
            handle, htype, mnt = self._file_handle(fd)
            if handle is None and self.config.file_handles == "mandatory":
                raise OSError(errno.EIO, "--inode-file-handles=mandatory: no file handle")
            # Entries found by handle on the root's mount keep no fd: any worker can
            # re-open them; others (no handle, or another mount) keep their O_PATH fd.
            by_handle = handle is not None and mnt == self.root_mnt_id
            nodeid, inserted = self.inodes.claim_or_insert(
                (st.st_ino, st.st_dev, mnt), handle, htype, -1 if by_handle else fd,
                st.st_mode, parent, name,
            )
        except BaseException:
            os.close(fd)
            raise
        if by_handle:
            self.fd_cache.put(nodeid, fd)  # the next request on it needs no re-open
        elif not inserted:
            os.close(fd)
        return nodeid

    def fd_for_handle(self, nodeid: int, slot: int) -> int:
        """An O_PATH fd for an inode the table keeps by file handle only (pinned by the
        caller in `slot`)."""
        fd = self.fd_cache.get(nodeid)
        if fd >= 0:
            return fd
        handle = self.inodes.handle_of(slot)
        if handle is None:  # an inode a migration lost (daemon/fs/migration/state.py)
            raise OSError(errno.EIO, f"nodeid {nodeid} was lost in a migration")
        fd = open_by_handle(self.mount_fd, handle[0], handle[1])
        self.fd_cache.opened += 1
        self.fd_cache.put(nodeid, fd)
        return fd

    def entry(self, parent: InodeRef, name: bytes) -> bytearray:
        """The entry reply for an existing ``name`` in ``parent`` (LOOKUP), claimed."""
        fd = os.open(name, O_PATH_FLAGS, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._entry_of(parent, fd, st, name)

    def _entry_of(self, parent: InodeRef, fd: int, st: os.stat_result, name: bytes
                  ) -> bytearray:
        """The entry reply for an O_PATH fd we own and its stat: claims the inode (the
        guest's reference); the fd ends up in the table, the fd cache or closed. On an error
        nothing stays taken."""
        try:
            attr_flags = self._attr_flags(parent, st)
        except BaseException:
            os.close(fd)
            raise
        nodeid = self.claim(fd, st, parent.nodeid, name)
        t = self.config.timeout
        buf = bytearray(fuse.ENTRY_OUT_SIZE)
        try:
            fuse.pack_entry_into(buf, 0, nodeid, st, t, t, attr_flags)
            self._guest_ids(buf, fuse.ENTRY_HEAD.size, st)
        except BaseException:
            self._forget(nodeid, 1)
            raise
        return buf

    def op_forget(self, req: Request) -> None:
        if len(req.arg) >= 8:
            self._forget(req.nodeid, fuse.FORGET_IN.unpack_from(req.arg)[0])
        return None

    def op_batch_forget(self, req: Request) -> None:
        if len(req.arg) < 8:
            return None
        count, _ = fuse.BATCH_FORGET_IN.unpack_from(req.arg)
        count = min(count, (len(req.arg) - 8) // 16)
        for i in range(count):
            nodeid, nlookup = fuse.FORGET_ONE.unpack_from(req.arg, 8 + 16 * i)
            self._forget(nodeid, nlookup)
        return None

    def _forget(self, nodeid: int, n: int) -> None:
        if nodeid == fuse.ROOT_ID:
            return
        self.inodes.forget(nodeid, n)
        if self.inodes.get(nodeid) is None:
            self.fd_cache.drop(nodeid)
