"""The session with the guest: INIT (what both sides agree on, kept in a page every worker
sees), DESTROY (the guest unmounted) and SYNCFS.
"""

from __future__ import annotations

import errno
import logging
import os
import struct

from daemon.fs.ops.base import FsBase, Request
from daemon.fs.ops.inodes import InodeRef
from daemon.fs.proc_fd import openable, proc_open
from daemon.native._sys import lib
from daemon.protocol import fuse
from daemon.protocol.fuse import FuseError

log = logging.getLogger("pyvirtiofsd.fs")


SESSION_FLAGS = struct.Struct("<Q")


class SessionOps(FsBase):
    """INIT, DESTROY, SYNCFS and the flags INIT negotiated."""

    def negotiated(self, flag: int) -> bool:
        """Whether INIT agreed on ``flag``, as every worker sees it."""
        return bool(SESSION_FLAGS.unpack_from(self.session)[0] & flag)

    def op_init(self, req: Request) -> bytes:
        if len(req.arg) < 16:
            raise FuseError(errno.EINVAL, "short INIT")
        major, minor, max_readahead, flags, flags2 = fuse.INIT_IN.unpack_from(
            req.arg.ljust(fuse.INIT_IN.size, b"\0")
        )
        if major != fuse.KERNEL_VERSION or minor < fuse.MIN_KERNEL_MINOR_VERSION:
            log.error("guest speaks FUSE %d.%d, need 7.%d+", major, minor,
                      fuse.MIN_KERNEL_MINOR_VERSION)
            raise OSError(errno.EPROTO, "unsupported FUSE version")
        offered = (
            fuse.ASYNC_READ | fuse.PARALLEL_DIROPS | fuse.BIG_WRITES | fuse.AUTO_INVAL_DATA
            | fuse.ASYNC_DIO | fuse.HAS_IOCTL_DIR | fuse.ATOMIC_O_TRUNC | fuse.MAX_PAGES_FLAG
            | fuse.INIT_EXT
        )
        if self.config.announce_submounts:
            offered |= fuse.SUBMOUNTS
        if self.config.readdirplus and self.config.cache != "never":
            offered |= fuse.DO_READDIRPLUS | fuse.READDIRPLUS_AUTO
        if self.config.writeback:
            offered |= fuse.WRITEBACK_CACHE
        if self.config.posix_lock:
            offered |= fuse.POSIX_LOCKS
        if self.config.flock:
            offered |= fuse.FLOCK_LOCKS
        guest = flags | (flags2 << 32 if flags & fuse.INIT_EXT else 0)
        if self.config.killpriv_v2:
            if guest & fuse.HANDLE_KILLPRIV_V2:
                offered |= fuse.HANDLE_KILLPRIV_V2
            else:
                log.warning("--killpriv-v2: the guest does not support FUSE_HANDLE_KILLPRIV_V2")
        if self.config.posix_acl:
            acl = fuse.POSIX_ACL | fuse.DONT_MASK | fuse.SETXATTR_EXT
            if guest & acl != acl:
                log.error("--posix-acl: the guest does not offer POSIX_ACL, DONT_MASK and "
                          "SETXATTR_EXT; refusing INIT")
                raise OSError(errno.EPROTO, "guest cannot do POSIX ACLs")
            offered |= acl
        if self.config.security_label:
            if not guest & fuse.SECURITY_CTX:
                log.error("--security-label: the guest does not offer FUSE_SECURITY_CTX; "
                          "refusing INIT")
                raise OSError(errno.EPROTO, "guest cannot send security contexts")
            offered |= fuse.SECURITY_CTX
        if self.config.allow_mmap:
            offered |= fuse.DIRECT_IO_ALLOW_MMAP
        agreed = guest & offered
        SESSION_FLAGS.pack_into(self.session, 0, agreed)
        return fuse.INIT_OUT.pack(
            fuse.KERNEL_VERSION, min(minor, fuse.KERNEL_MINOR_VERSION), max_readahead,
            agreed & 0xFFFFFFFF, fuse.MAX_BACKGROUND, fuse.CONGESTION_THRESHOLD,
            fuse.MAX_WRITE, 1, fuse.MAX_PAGES, 0, agreed >> 32,
        )

    def op_destroy(self, req: Request) -> bytes:
        """The guest unmounted: drop everything it held (its lookups and opens, never the
        pins of requests still in flight on other queues), keep the root."""
        for handle in list(self.handles.iter_handles()):
            self.handles.close(handle.fh)
        for entry in list(self.inodes.iter_entries()):
            if entry.nodeid != fuse.ROOT_ID and entry.lookups:
                self._forget(entry.nodeid, entry.lookups)
        return b""

    def op_syncfs(self, req: Request) -> bytes:
        with InodeRef(self, req.nodeid) as inode:
            # syncfs needs a real fd: never of a FIFO (the open would wait for a writer
            # for ever) or of a device node (virtiofsd's open_inode: EBADF)
            if not openable(os.fstat(inode.fd).st_mode):
                raise OSError(errno.EBADF, "only regular files and directories are opened")
            fd = proc_open(inode.fd, os.O_RDONLY | os.O_NONBLOCK)
            try:
                if lib.pyvfs_syncfs(fd) < 0:
                    err = lib.pyvfs_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
        return b""
