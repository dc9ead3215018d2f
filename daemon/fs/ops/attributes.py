"""GETATTR, SETATTR, ACCESS and STATFS: an inode's attributes, read and changed through its
O_PATH fd (or the open file SETATTR names).
"""

from __future__ import annotations

import errno
import os
import stat

from daemon.fs.ops.base import FsBase, Request
from daemon.fs.ops.inodes import HandleRef, InodeRef
from daemon.fs.proc_fd import proc_name, proc_open
from daemon.native._sys import lib
from daemon.protocol import fuse
from daemon.protocol.fuse import FuseError

AT_FDCWD = -100


class AttributeOps(FsBase):
    """GETATTR, SETATTR, ACCESS, STATFS and the attributes every entry reply carries."""

    def _attr_flags(self, parent: InodeRef, st: os.stat_result) -> int:
        """FUSE_ATTR_SUBMOUNT on a directory that is another file system's root, so the
        guest gives it its own superblock (and its own SYNCFS)."""
        if not stat.S_ISDIR(st.st_mode) or not self.negotiated(fuse.SUBMOUNTS):
            return 0
        return fuse.ATTR_SUBMOUNT if os.fstat(parent.fd).st_dev != st.st_dev else 0

    def _stat_reply(self, st: os.stat_result) -> bytearray:
        buf = fuse.attr_out(st, self.config.timeout)
        self._guest_ids(buf, fuse.ATTR_OUT_HEAD.size, st)
        return buf

    def op_getattr(self, req: Request) -> bytearray:
        flags, _, fh = fuse.GETATTR_IN.unpack_from(req.arg.ljust(16, b"\0"))
        with InodeRef(self, req.nodeid) as inode:
            return self._stat_reply(os.fstat(inode.fd))

    def op_setattr(self, req: Request) -> bytearray:
        if len(req.arg) < fuse.SETATTR_IN.size:
            raise FuseError(errno.EINVAL, "short SETATTR")
        (valid, _, fh, size, _lock, atime, mtime, _ctime, atimensec, mtimensec, _ctimensec,
         mode, _, uid, gid, _) = fuse.SETATTR_IN.unpack_from(req.arg)
        self._check_writable()
        with InodeRef(self, req.nodeid) as inode:
            handle = HandleRef(self, fh) if valid & fuse.FATTR_FH else None
            try:
                if valid & fuse.FATTR_SIZE and handle is None:
                    # truncated through a file opened for it: checked before anything
                    # changes (virtiofsd opens it first: EISDIR, EBADF for the others)
                    kind = os.fstat(inode.fd).st_mode
                    if stat.S_ISDIR(kind):
                        raise OSError(errno.EISDIR, "cannot truncate a directory")
                    if not stat.S_ISREG(kind):
                        raise OSError(errno.EBADF, "only regular files are truncated")
                if valid & fuse.FATTR_MODE:
                    if handle is not None:
                        os.fchmod(handle.fd, mode & 0o7777)
                    else:
                        path, dir_fd = proc_name(inode.fd)
                        os.chmod(path, mode & 0o7777, dir_fd=dir_fd)
                if valid & (fuse.FATTR_UID | fuse.FATTR_GID):
                    host_uid, host_gid = self.host_ids(uid, gid)
                    new_uid = host_uid if valid & fuse.FATTR_UID else 0xFFFFFFFF
                    new_gid = host_gid if valid & fuse.FATTR_GID else 0xFFFFFFFF
                    self.clear_capability(inode.fd, True)
                    if lib.pyvfs_fchownat_empty(inode.fd, new_uid, new_gid) < 0:
                        err = lib.pyvfs_errno()
                        raise OSError(err, os.strerror(err))
                if valid & fuse.FATTR_SIZE:
                    with self.kill_priv(bool(valid & fuse.FATTR_KILL_SUIDGID)):
                        if handle is not None:
                            self.clear_capability(handle.fd, False)
                            os.ftruncate(handle.fd, size)
                        else:
                            self.clear_capability(inode.fd, True)
                            fd = proc_open(inode.fd, os.O_WRONLY | os.O_NONBLOCK)
                            try:
                                os.ftruncate(fd, size)
                            finally:
                                os.close(fd)
                if valid & (fuse.FATTR_ATIME | fuse.FATTR_MTIME):
                    self._set_times(inode.fd, valid, atime, atimensec, mtime, mtimensec)
                return self._stat_reply(os.fstat(inode.fd))
            finally:
                if handle is not None:
                    handle.__exit__()

    def _set_times(self, fd: int, valid: int, atime: int, ans: int, mtime: int, mns: int) -> None:
        omit, now = lib.PYVFS_UTIME_OMIT, lib.PYVFS_UTIME_NOW
        a_sec, a_ns = 0, omit
        m_sec, m_ns = 0, omit
        if valid & fuse.FATTR_ATIME:
            a_sec, a_ns = (0, now) if valid & fuse.FATTR_ATIME_NOW else (atime, ans)
        if valid & fuse.FATTR_MTIME:
            m_sec, m_ns = (0, now) if valid & fuse.FATTR_MTIME_NOW else (mtime, mns)
        if a_ns not in (omit, now) and a_ns >= 1_000_000_000 or (
            m_ns not in (omit, now) and m_ns >= 1_000_000_000
        ):
            raise OSError(errno.EINVAL, "nanoseconds out of range")
        path, dir_fd = proc_name(fd)
        if lib.pyvfs_utimensat(AT_FDCWD if dir_fd is None else dir_fd, path.encode(), a_sec,
                               a_ns, m_sec, m_ns, 0) < 0:
            err = lib.pyvfs_errno()
            raise OSError(err, os.strerror(err))

    def op_access(self, req: Request) -> bytes:
        (mask, _) = fuse.ACCESS_IN.unpack_from(req.arg)
        with InodeRef(self, req.nodeid) as inode:
            st = os.fstat(inode.fd)
        if mask == os.F_OK:
            return b""
        if mask & os.W_OK and self.config.readonly:
            raise OSError(errno.EROFS, "read-only share")
        if req.uid == 0:
            if mask & os.X_OK and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111:
                raise OSError(errno.EACCES, "no execute bit")
            return b""
        owner_uid, owner_gid = self.guest_ids(st.st_uid, st.st_gid)
        if req.uid == owner_uid:
            bits = (st.st_mode >> 6) & 7
        elif req.gid == owner_gid:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        if mask & ~bits & 7:
            raise OSError(errno.EACCES, "permission denied")
        return b""

    def op_statfs(self, req: Request) -> bytes:
        with InodeRef(self, req.nodeid) as inode:
            s = os.fstatvfs(inode.fd)
        return fuse.STATFS_OUT.pack(
            s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize,
            s.f_namemax, s.f_frsize, 0,
        )
