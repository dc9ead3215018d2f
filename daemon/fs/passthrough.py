"""The FUSE file system: each request answered by system calls on the shared directory.

Inodes live in the shared-memory :class:`shm_table.InodeTable`, open files in
:class:`shm_table.HandleTable`; both store fd numbers of the one fd table that the
supervisor and all workers share (see ``docs/design.md``), so a request can arrive on any
queue. Every operation is relative to an inode's O_PATH fd and one validated name
component, never a path the guest builds, so nothing can reach outside the share.

:class:`PassthroughFs` is the state (set up here) plus one mixin per concern, each in
``daemon/fs/ops/`` (see its ``__init__`` for which module answers which opcode):
session (INIT, DESTROY, SYNCFS), inodes (FORGET, the nodeid <-> fd references), context
(the caller's ids, umask and security label), attributes (GETATTR, SETATTR, ACCESS,
STATFS), entries (LOOKUP, the requests that make or remove names), files (OPEN, RELEASE,
FLUSH, FSYNC, ...), directories (OPENDIR, READDIR, READDIRPLUS), xattrs and locking.
The names other modules import from here are re-exported below.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

from daemon.fs.config import Config
from daemon.fs.fd_cache import FdCache
from daemon.fs.lock_owners import LockOwners
from daemon.fs.ops.attributes import AT_FDCWD, AttributeOps
from daemon.fs.ops.base import (
    NAME_MAX,
    O_PATH_FLAGS,
    FsBase,
    GuestInputError,
    Request,
    check_name,
)
from daemon.fs.ops.context import ContextOps, Credentials, guest_umask
from daemon.fs.ops.directories import (
    DIRENT64_HEAD,
    GETDENTS_BUF,
    GETDENTS_MIN,
    DirectoryOps,
)
from daemon.fs.ops.entries import EntryOps
from daemon.fs.ops.files import O_TMPFILE_ONLY, OPEN_STRIP, FileOps
from daemon.fs.ops.inodes import HandleRef, InodeOps, InodeRef
from daemon.fs.ops.locking import LockOps, PendingLock
from daemon.fs.ops.session import SESSION_FLAGS, SessionOps
from daemon.fs.ops.xattrs import (
    ACL_ACCESS,
    ACL_DEFAULT,
    SECURITY_CAPABILITY,
    XATTR_MAX,
    XattrOps,
)
from daemon.fs.proc_fd import openable, proc_name, proc_open
from daemon.native._sys import ffi
from daemon.protocol import fuse

__all__ = [
    "ACL_ACCESS", "ACL_DEFAULT", "AT_FDCWD", "DIRENT64_HEAD", "GETDENTS_BUF", "GETDENTS_MIN",
    "NAME_MAX", "OPEN_STRIP", "O_PATH_FLAGS", "O_TMPFILE_ONLY", "SECURITY_CAPABILITY",
    "SESSION_FLAGS", "XATTR_MAX", "Config", "Credentials", "FsBase", "GuestInputError",
    "HandleRef", "InodeRef", "PassthroughFs", "PendingLock", "Request", "check_name",
    "guest_umask", "openable", "proc_name", "proc_open",
]


class PassthroughFs(SessionOps, InodeOps, ContextOps, AttributeOps, EntryOps, FileOps,
                    DirectoryOps, XattrOps, LockOps):
    """One shared directory served over FUSE: the state every worker shares (declared in
    :class:`FsBase`) and ``ops``, the handler of each opcode."""

    def __init__(self, shared_dir: str, inodes, handles, config: Config) -> None:  # noqa: ANN001
        self.shared_dir = shared_dir
        Credentials.own_uid, Credentials.own_gid = os.geteuid(), os.getegid()
        self.inodes = inodes
        self.handles = handles
        # fcntl locks by guest lock owner, shared by every worker (cloned after this)
        self.lock_owners = LockOwners(proc_open) if config.posix_lock else None
        self.config = config
        self.use_handles = config.file_handles != "never"
        self.mount_fd = -1
        self.root_mnt_id = -1
        self.fd_cache = FdCache(config.fd_cache_size)
        # What INIT agreed on, for every worker: an anonymous MAP_SHARED page made before
        # the workers are cloned, so all of them see the one copy.
        self.session = mmap.mmap(-1, mmap.PAGESIZE)
        self._dents = ffi.new("char[]", GETDENTS_BUF)
        self._dents_view = ffi.buffer(self._dents)
        self._handle_buf = ffi.new("unsigned char[]", 128)
        self._handle_type = ffi.new("int *")
        self._mount_id = ffi.new("int *")
        self._xattr_buf = ffi.new("char[]", XATTR_MAX)
        self.ops: dict[int, Callable[[Request], bytes | bytearray | None]] = {
            fuse.Opcode.INIT: self.op_init,
            fuse.Opcode.DESTROY: self.op_destroy,
            fuse.Opcode.LOOKUP: self.op_lookup,
            fuse.Opcode.FORGET: self.op_forget,
            fuse.Opcode.BATCH_FORGET: self.op_batch_forget,
            fuse.Opcode.GETATTR: self.op_getattr,
            fuse.Opcode.SETATTR: self.op_setattr,
            fuse.Opcode.READLINK: self.op_readlink,
            fuse.Opcode.SYMLINK: self.op_symlink,
            fuse.Opcode.MKNOD: self.op_mknod,
            fuse.Opcode.MKDIR: self.op_mkdir,
            fuse.Opcode.UNLINK: self.op_unlink,
            fuse.Opcode.RMDIR: self.op_rmdir,
            fuse.Opcode.RENAME: self.op_rename,
            fuse.Opcode.RENAME2: self.op_rename2,
            fuse.Opcode.LINK: self.op_link,
            fuse.Opcode.OPEN: self.op_open,
            fuse.Opcode.CREATE: self.op_create,
            fuse.Opcode.FLUSH: self.op_flush,
            fuse.Opcode.RELEASE: self.op_release,
            fuse.Opcode.FSYNC: self.op_fsync,
            fuse.Opcode.OPENDIR: self.op_opendir,
            fuse.Opcode.READDIR: self.op_readdir,
            fuse.Opcode.READDIRPLUS: self.op_readdirplus,
            fuse.Opcode.RELEASEDIR: self.op_release,
            fuse.Opcode.FSYNCDIR: self.op_fsync,
            fuse.Opcode.STATFS: self.op_statfs,
            fuse.Opcode.ACCESS: self.op_access,
            fuse.Opcode.FALLOCATE: self.op_fallocate,
            fuse.Opcode.LSEEK: self.op_lseek,
            fuse.Opcode.COPY_FILE_RANGE: self.op_copy_file_range,
            fuse.Opcode.SYNCFS: self.op_syncfs,
            fuse.Opcode.TMPFILE: self.op_tmpfile,
            fuse.Opcode.GETLK: self.op_getlk,
            fuse.Opcode.SETLK: self.op_setlk,
        }
        if config.xattr or config.posix_acl or config.security_label or config.xattrmap:
            self.ops.update({
                fuse.Opcode.GETXATTR: self.op_getxattr,
                fuse.Opcode.LISTXATTR: self.op_listxattr,
                fuse.Opcode.SETXATTR: self.op_setxattr,
                fuse.Opcode.REMOVEXATTR: self.op_removexattr,
            })
        self.translate_ids = config.uid_map is not None or config.gid_map is not None
        self._ext_missing_warned = False
        # virtiofsd: when --xattrmap renames security.capability, the daemon removes the
        # renamed xattr wherever the kernel would have removed security.capability
        self.security_capability: bytes | None = None
        if config.xattrmap is not None:
            try:
                mapped: bytes | None = config.xattrmap.map_client(SECURITY_CAPABILITY)
            except OSError:
                mapped = None
            if mapped is not None and mapped != SECURITY_CAPABILITY:
                self.security_capability = mapped
