"""Open files: OPEN, RELEASE, FLUSH, FSYNC, FALLOCATE, LSEEK and COPY_FILE_RANGE, and what
a write must do to setuid/setgid bits (--killpriv-v2). READ and WRITE themselves go
straight between guest memory and the file in the worker (workers/queue_worker.py, and
daemon/native/fast_path.c); RELEASEDIR and FSYNCDIR are answered by op_release and
op_fsync here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from daemon.fs.ops.base import FsBase, GuestInputError, Request
from daemon.fs.ops.inodes import HandleRef, InodeRef
from daemon.fs.proc_fd import openable, proc_open
from daemon.host.capabilities import without_fsetid
from daemon.native._sys import lib
from daemon.protocol import fuse

O_TMPFILE_ONLY = os.O_TMPFILE & ~os.O_DIRECTORY  # O_TMPFILE is this bit plus O_DIRECTORY
# Flags the guest may not pass through to an open(2) on the host.
OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | getattr(os, "O_PATH", 0)


class FileOps(FsBase):
    """Open files of the guest (fh), opened through the fd directory, and setuid/setgid
    clearing on writes."""

    def _open_flags(self, flags: int) -> int:
        flags &= ~OPEN_STRIP
        if not self.config.allow_direct_io:
            flags &= ~os.O_DIRECT
        if not self.config.preserve_noatime:
            flags &= ~os.O_NOATIME
        if self.config.writeback:
            # the guest's page cache writes whole pages at explicit offsets, and may need
            # to read around partial writes
            flags &= ~os.O_APPEND
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags | os.O_CLOEXEC

    def _open_reply_flags(self, is_dir: bool) -> int:
        cache = self.config.cache
        if is_dir:
            return fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE if cache in (
                "always", "metadata") else 0
        if cache in ("never", "metadata"):
            return fuse.FOPEN_DIRECT_IO
        if cache == "always":
            return fuse.FOPEN_KEEP_CACHE
        return 0

    def op_open(self, req: Request) -> bytes:
        flags, open_flags = fuse.OPEN_IN.unpack_from(req.arg)
        if self.config.readonly and (
            flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        ):
            raise OSError(errno.EROFS, "shared directory is read-only")
        if flags & O_TMPFILE_ONLY:
            # OPEN never creates (O_CREAT and O_EXCL are stripped as the guest kernel
            # does): O_TMPFILE on a directory would make a file as the daemon
            raise GuestInputError(errno.EINVAL, "OPEN with O_TMPFILE", "open flags")
        with InodeRef(self, req.nodeid) as inode:
            mode = os.fstat(inode.fd).st_mode
            if not openable(mode):
                # the guest opens FIFOs, sockets and device nodes itself (and resolves
                # symlinks): EBADF as virtiofsd's open_inode
                raise OSError(errno.EBADF, "only regular files and directories are opened")
            with self.kill_priv(bool(open_flags & fuse.OPEN_KILL_SUIDGID)):
                fd = proc_open(inode.fd, self._open_flags(flags))
            if flags & os.O_TRUNC:
                try:
                    self.clear_capability(fd, False)
                except BaseException:
                    os.close(fd)
                    raise
            return self._new_handle(req.nodeid, fd, flags, stat.S_ISDIR(mode))

    def _new_handle(self, nodeid: int, fd: int, flags: int, is_dir: bool) -> bytes:
        try:
            fh = self.handles.open(nodeid, fd, flags)
        except BaseException:
            os.close(fd)
            raise
        return fuse.OPEN_OUT.pack(fh, self._open_reply_flags(is_dir), 0)

    def op_flush(self, req: Request) -> bytes:
        (fh, _, _, lock_owner) = fuse.FLUSH_IN.unpack_from(req.arg)
        with HandleRef(self, fh):
            if self.lock_owners is not None:
                # close() by this owner: POSIX drops all its record locks on the file
                self.lock_owners.flush(req.nodeid, lock_owner)
        return b""

    def op_release(self, req: Request) -> bytes:
        (fh, _, _, _) = fuse.RELEASE_IN.unpack_from(req.arg.ljust(fuse.RELEASE_IN.size, b"\0"))
        self.handles.close(fh)
        return b""

    def op_fsync(self, req: Request) -> bytes:
        fh, flags, _ = fuse.FSYNC_IN.unpack_from(req.arg)
        with HandleRef(self, fh) as handle:
            if flags & fuse.FSYNC_FDATASYNC:
                os.fdatasync(handle.fd)
            else:
                os.fsync(handle.fd)
        return b""

    def op_fallocate(self, req: Request) -> bytes:
        fh, offset, length, mode, _ = fuse.FALLOCATE_IN.unpack_from(req.arg)
        self._check_writable()
        with HandleRef(self, fh) as handle:
            if lib.pyvfs_fallocate(handle.fd, mode, offset, length) < 0:
                err = lib.pyvfs_errno()
                raise OSError(err, os.strerror(err))
        return b""

    def op_lseek(self, req: Request) -> bytes:
        fh, offset, whence, _ = fuse.LSEEK_IN.unpack_from(req.arg)
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, f"lseek whence {whence}")
        with HandleRef(self, fh) as handle:
            return fuse.LSEEK_OUT.pack(os.lseek(handle.fd, offset, whence))

    def op_copy_file_range(self, req: Request) -> bytes:
        fh_in, off_in, _nodeid_out, fh_out, off_out, length, flags = (
            fuse.COPY_FILE_RANGE_IN.unpack_from(req.arg))
        self._check_writable()
        if flags:
            raise OSError(errno.EINVAL, "copy_file_range flags must be 0")
        with HandleRef(self, fh_in) as src, HandleRef(self, fh_out) as dst:
            n = os.copy_file_range(src.fd, dst.fd, min(length, 1 << 30), off_in, off_out)
        return fuse.WRITE_OUT.pack(n, 0)

    def kill_priv(self, requested: bool) -> contextlib.AbstractContextManager[None]:
        """Around a write/truncate/open(O_TRUNC) for which the guest asked that setuid and
        setgid be cleared (FUSE_HANDLE_KILLPRIV_V2)."""
        if requested and self.config.killpriv_v2 and self.negotiated(fuse.HANDLE_KILLPRIV_V2):
            return without_fsetid()
        return contextlib.nullcontext()

    def write_guard(self, write_flags: int, fd: int, uid: int = 0
                    ) -> contextlib.AbstractContextManager[None]:
        """For the WRITE path: clears a renamed security.capability and drops CAP_FSETID
        around the write when setuid/setgid must go: the guest asked (FUSE_WRITE_KILL_SUIDGID
        under --killpriv-v2), or a caller other than root writes to a setuid/setgid file
        (a direct-I/O guest leaves that to the file system, as POSIX has write(2) do it)."""
        self.clear_capability(fd, False)
        if uid != 0 and os.fstat(fd).st_mode & (stat.S_ISUID | stat.S_ISGID):
            return without_fsetid()
        return self.kill_priv(bool(write_flags & fuse.WRITE_KILL_SUIDGID))
