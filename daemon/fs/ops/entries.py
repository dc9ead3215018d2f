"""Directory entries: LOOKUP and READLINK, and the requests that make or remove names
(MKNOD, MKDIR, SYMLINK, LINK, CREATE, TMPFILE, UNLINK, RMDIR, RENAME, RENAME2). A request
that makes a node and then fails (a full inode table) removes it again: it leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable

from daemon.fs.ops.base import O_PATH_FLAGS, FsBase, Request, check_name
from daemon.fs.ops.inodes import InodeRef
from daemon.fs.proc_fd import proc_name, proc_open
from daemon.native._sys import lib
from daemon.protocol import fuse


class EntryOps(FsBase):
    """Names looked up, made, linked, renamed and removed."""

    def op_lookup(self, req: Request) -> bytearray:
        name, _ = fuse.split_name(req.arg)
        check_name(name)
        with InodeRef(self, req.nodeid) as parent:
            try:
                return self.entry(parent, name)
            except FileNotFoundError:
                if self.config.cache == "never":
                    raise
                return fuse.negative_entry_out(self.config.timeout)

    def op_readlink(self, req: Request) -> bytes:
        with InodeRef(self, req.nodeid) as inode:
            return os.fsencode(os.readlink("", dir_fd=inode.fd))

    def _create_node(self, req: Request, make: Callable[[int, bytes], None], name: bytes,
                     umask: int | None = None, is_dir: bool = False) -> bytes:
        self._check_writable()
        check_name(name)
        secctx = self.security_context(req)
        with InodeRef(self, req.nodeid) as parent:
            with self._creating(req, umask):
                make(parent.fd, name)
            return self._new_entry(parent, name, is_dir, secctx)

    def op_mkdir(self, req: Request) -> bytes:
        mode, umask = fuse.MKDIR_IN.unpack_from(req.arg)
        name, _ = fuse.split_name(req.arg[fuse.MKDIR_IN.size :])
        return self._create_node(req, lambda d, n: os.mkdir(n, mode & 0o7777, dir_fd=d), name,
                                 umask, is_dir=True)

    def op_mknod(self, req: Request) -> bytes:
        mode, rdev, umask, _ = fuse.MKNOD_IN.unpack_from(req.arg)
        name, _ = fuse.split_name(req.arg[fuse.MKNOD_IN.size :])
        return self._create_node(req, lambda d, n: os.mknod(n, mode, rdev, dir_fd=d), name,
                                 umask)

    def op_symlink(self, req: Request) -> bytes:
        name, used = fuse.split_name(req.arg)
        target, _ = fuse.split_name(req.arg[used:], "symlink target")
        if len(target) >= 4096:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long")
        return self._create_node(req, lambda d, n: os.symlink(target, n, dir_fd=d), name)

    def op_link(self, req: Request) -> bytes:
        (old_nodeid,) = fuse.LINK_IN.unpack_from(req.arg)
        name, _ = fuse.split_name(req.arg[fuse.LINK_IN.size :])
        check_name(name)
        self._check_writable()
        with InodeRef(self, old_nodeid) as target, InodeRef(self, req.nodeid) as parent:
            path, dir_fd = proc_name(target.fd)  # linkat of the inode itself: nothing opened
            os.link(path, name, src_dir_fd=dir_fd, dst_dir_fd=parent.fd, follow_symlinks=True)
            return self._new_entry(parent, name)

    def _new_entry(self, parent: InodeRef, name: bytes, is_dir: bool = False,
                   secctx: tuple[bytes, bytes] | None = None) -> bytearray:
        """The entry of a node this request has just made (MKDIR, MKNOD, SYMLINK, LINK),
        labelled (--security-label), looked up and claimed. If any step fails (a full inode
        table: ENFILE) the node is removed again: a failed request leaves nothing behind."""
        try:
            fd = os.open(name, O_PATH_FLAGS, dir_fd=parent.fd)
        except FileNotFoundError:
            raise  # removed meanwhile: nothing of ours is left
        except BaseException:
            self._unmake(parent.fd, name, None, is_dir)
            raise
        st = None
        try:
            st = os.fstat(fd)
            if secctx is not None:
                self.set_security_context(secctx, fd, True)
        except BaseException:
            os.close(fd)
            self._unmake(parent.fd, name, st, is_dir)
            raise
        try:
            return self._entry_of(parent, fd, st, name)
        except BaseException:
            self._unmake(parent.fd, name, st, is_dir)
            raise

    @staticmethod
    def _unmake(parent_fd: int, name: bytes, made: os.stat_result | None, is_dir: bool
                ) -> None:
        """Remove ``name``, which this request created, after a later step failed; with
        ``made`` only while the name still is that inode, so nothing put there since by
        someone else goes."""
        with contextlib.suppress(OSError):
            if made is not None:
                now = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                if (now.st_ino, now.st_dev) != (made.st_ino, made.st_dev):
                    return
            if is_dir:
                os.rmdir(name, dir_fd=parent_fd)
            else:
                os.unlink(name, dir_fd=parent_fd)

    def op_unlink(self, req: Request) -> bytes:
        name, _ = fuse.split_name(req.arg)
        self._check_writable()
        with InodeRef(self, req.nodeid) as parent:
            os.unlink(check_name(name), dir_fd=parent.fd)
        return b""

    def op_rmdir(self, req: Request) -> bytes:
        name, _ = fuse.split_name(req.arg)
        self._check_writable()
        with InodeRef(self, req.nodeid) as parent:
            os.rmdir(check_name(name), dir_fd=parent.fd)
        return b""

    def _rename(self, req: Request, newdir: int, names: bytes, flags: int) -> bytes:
        old, used = fuse.split_name(names)
        new, _ = fuse.split_name(names[used:])
        check_name(old)
        check_name(new)
        self._check_writable()
        with InodeRef(self, req.nodeid) as src, InodeRef(self, newdir) as dst:
            if flags:
                if lib.pyvfs_renameat2(src.fd, old, dst.fd, new, flags) < 0:
                    err = lib.pyvfs_errno()
                    raise OSError(err, os.strerror(err))
            else:
                os.rename(old, new, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        return b""

    def op_rename(self, req: Request) -> bytes:
        (newdir,) = fuse.RENAME_IN.unpack_from(req.arg)
        return self._rename(req, newdir, req.arg[fuse.RENAME_IN.size :], 0)

    def op_rename2(self, req: Request) -> bytes:
        newdir, flags, _ = fuse.RENAME2_IN.unpack_from(req.arg)
        return self._rename(req, newdir, req.arg[fuse.RENAME2_IN.size :], flags)

    def op_create(self, req: Request) -> bytes:
        flags, mode, umask, fuse_open_flags = fuse.CREATE_IN.unpack_from(req.arg)
        name, _ = fuse.split_name(req.arg[fuse.CREATE_IN.size :])
        check_name(name)
        self._check_writable()
        secctx = self.security_context(req)
        with InodeRef(self, req.nodeid) as parent:
            # O_EXCL always, as virtiofsd: O_CREAT on an existing FIFO or device node would
            # open it (and block, or reach the device); an existing name is opened below
            # only once it is known to be a regular file
            open_flags = (self._open_flags(flags) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_NONBLOCK)
            try:
                with self._creating(req, umask):
                    fd = os.open(name, open_flags, mode & 0o7777, dir_fd=parent.fd)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                return self._create_existing(req, parent, name, flags, fuse_open_flags)
            # from here on a failure (ENFILE from a full inode or open-file table, the
            # label) removes the file again: a failed CREATE leaves nothing behind
            st = None
            try:
                st = os.fstat(fd)
                if secctx is not None:  # only a file made here gets the label (virtiofsd)
                    self.set_security_context(secctx, fd, False)
                if not flags & os.O_NONBLOCK:
                    os.set_blocking(fd, True)
                # the entry of the very file made, not of whatever the name is by now
                path_fd = proc_open(fd, os.O_PATH)
                entry = self._entry_of(parent, path_fd, st, name)
            except BaseException:
                os.close(fd)
                self._unmake(parent.fd, name, st, False)
                raise
            try:
                # (closes fd itself if it fails)
                return self._entry_and_handle(entry, int.from_bytes(entry[:8], "little"), fd,
                                              flags)
            except BaseException:
                self._unmake(parent.fd, name, st, False)
                raise

    def _create_existing(self, req: Request, parent: InodeRef, name: bytes, flags: int,
                         fuse_open_flags: int) -> bytes:
        """CREATE without O_EXCL of a name that exists: looked up and opened as OPEN
        would (virtiofsd: do_lookup, then do_open), and only if it is a regular file:
        EBADF for anything else (virtiofsd's open_inode), EISDIR for a directory (as
        open(2) with O_CREAT). The caller must be allowed to open it. Claimed before it is
        opened, so a full inode table (ENFILE) leaves it untouched (O_TRUNC)."""
        path_fd = os.open(name, O_PATH_FLAGS, dir_fd=parent.fd)
        try:
            st = os.fstat(path_fd)
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, "CREATE of an existing directory")
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EBADF, "only regular files and directories are opened")
            self._check_access(req, path_fd, flags)
            reopen_fd = os.dup(path_fd)  # path_fd goes to the table (or is closed)
        except BaseException:
            os.close(path_fd)
            raise
        try:
            entry = self._entry_of(parent, path_fd, st, name)
            nodeid = int.from_bytes(entry[:8], "little")
            try:
                with self.kill_priv(bool(fuse_open_flags & fuse.OPEN_KILL_SUIDGID)):
                    fd = proc_open(reopen_fd, self._open_flags(flags))
            except BaseException:
                self._forget(nodeid, 1)
                raise
        finally:
            os.close(reopen_fd)
        try:
            if flags & os.O_TRUNC:
                self.clear_capability(fd, False)
        except BaseException:
            os.close(fd)
            self._forget(nodeid, 1)
            raise
        return self._entry_and_handle(entry, nodeid, fd, flags)

    def _check_access(self, req: Request, path_fd: int, flags: int) -> None:
        """Whether the caller may open the inode with ``flags``, asked of the kernel as the
        caller (faccessat2 on the O_PATH fd): the file is then opened as the daemon
        through the fd directory, which the caller's ids cannot reach in the sandbox.
        Kernels before 5.8 lack faccessat2: no check, as virtiofsd."""
        want = {os.O_RDONLY: os.R_OK, os.O_WRONLY: os.W_OK}.get(
            flags & os.O_ACCMODE, os.R_OK | os.W_OK)
        if flags & os.O_TRUNC:
            want |= os.W_OK
        with self._creating(req):
            if lib.pyvfs_access_fd(path_fd, want) == 0:
                return
            err = lib.pyvfs_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err))

    def op_tmpfile(self, req: Request) -> bytes:
        """O_TMPFILE: an unnamed file in the directory, answered like CREATE (the name the
        guest sends is a placeholder)."""
        flags, mode, umask, _ = fuse.CREATE_IN.unpack_from(req.arg)
        self._check_writable()
        with InodeRef(self, req.nodeid) as parent:
            with self._creating(req, umask):
                # "." of the parent's O_PATH fd: the fd directory is out of the caller's
                # reach in the sandbox (it is the server's), and the file must be the
                # caller's, with its mode, as CREATE makes it
                fd = os.open(".", (self._open_flags(flags) & ~os.O_CREAT) | os.O_TMPFILE,
                             mode & 0o7777, dir_fd=parent.fd)
            try:
                st = os.fstat(fd)
                # follow the magic link (no O_NOFOLLOW): we want the file, not the link
                path_fd = proc_open(fd, os.O_PATH)
            except BaseException:
                os.close(fd)
                raise
            try:
                # an unlinked file may not re-open by handle: claim keeps path_fd cached
                nodeid = self.claim(path_fd, st, parent.nodeid, b"")
            except BaseException:
                os.close(fd)
                raise
            t = self.config.timeout
            entry = fuse.entry_out(nodeid, st, t, t)
            self._guest_ids(entry, fuse.ENTRY_HEAD.size, st)
            return self._entry_and_handle(entry, nodeid, fd, flags)

    def _entry_and_handle(self, entry: bytearray, nodeid: int, fd: int, flags: int) -> bytes:
        """CREATE/TMPFILE's answer: the entry plus an open handle for fd; if no handle can
        be made, the reference the entry took is given back."""
        try:
            opened = self._new_handle(nodeid, fd, flags, False)
        except BaseException:
            self._forget(nodeid, 1)
            raise
        return bytes(entry) + opened
