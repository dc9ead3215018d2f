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

from daemon.fs.c_path_settings import CPathSettings
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
from daemon.protocol.opcodes import Condition

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
    :class:`FsBase`); each opcode's handler is named in daemon/protocol/opcodes.py."""

    def __init__(self, shared_dir: str, inodes, handles, config: Config,  # noqa: ANN001
                 session: mmap.mmap | None = None) -> None:
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
        # the workers are cloned, so all of them see the one copy (``session``: one made
        # before the supervisor's keeper was cloned, so the keeper sees it too).
        self.session = session if session is not None else mmap.mmap(-1, mmap.PAGESIZE)
        self._dents = ffi.new("char[]", GETDENTS_BUF)
        self._dents_view = ffi.buffer(self._dents)
        self._handle_buf = ffi.new("unsigned char[]", 128)
        self._handle_type = ffi.new("int *")
        self._mount_id = ffi.new("int *")
        self._xattr_buf = ffi.new("char[]", XATTR_MAX)
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

    def resume(self, carried: dict) -> None:
        """Take over the share from the program before a live upgrade: the root is in the
        inode table already (its fd still open), the mount fd and what INIT agreed on
        come from the handed-over state (daemon/host/handover.py), and so does the lock
        owners' table."""
        self.mount_fd = carried["mount_fd"]
        self.root_mnt_id = carried["root_mnt_id"]
        self.use_handles = bool(carried["use_handles"])
        self.session[:8] = carried["session"]
        if self.lock_owners is not None and carried["lock_owners"] >= 0:
            self.lock_owners.mem.close()
            os.close(self.lock_owners.memfd)
            self.lock_owners = LockOwners(proc_open, memfd=carried["lock_owners"])

    @property
    def serves_xattrs(self) -> bool:
        """Whether the xattr requests are served (--xattr or an option implying it);
        without, the queue worker answers them ENOSYS as virtiofsd does."""
        cfg = self.config
        return bool(cfg.xattr or cfg.posix_acl or cfg.security_label or cfg.xattrmap)

    def open_reply_flags(self, is_dir: bool) -> int:
        """FOPEN_* flags of an OPEN/OPENDIR/CREATE reply under this cache mode."""
        return self._open_reply_flags(is_dir)

    def c_path_settings(self) -> CPathSettings:
        """What the C fast path must honour to answer as this file system would; read by
        workers/fast_path.py, which decides from it (and daemon/protocol/opcodes.py) which
        opcodes C may answer."""
        cfg = self.config
        holding = {
            Condition.TRANSLATE_IDS: self.translate_ids,
            Condition.READONLY: cfg.readonly,
            Condition.CAPABILITY_RENAMED: bool(self.security_capability),
            Condition.POSIX_ACL: cfg.posix_acl,
            Condition.SECURITY_LABEL: cfg.security_label,
            Condition.WRITEBACK: cfg.writeback,
            Condition.XATTRMAP: cfg.xattrmap is not None,
        }
        clear = OPEN_STRIP  # _open_flags without --writeback (CREATE in C is never with it)
        if not cfg.allow_direct_io:
            clear |= os.O_DIRECT
        if not cfg.preserve_noatime:
            clear |= os.O_NOATIME
        return CPathSettings(
            conditions=frozenset(c for c, on in holding.items() if on),
            timeout=cfg.timeout, negative_lookup=cfg.cache != "never",
            use_handles=self.use_handles, mandatory_handles=cfg.file_handles == "mandatory",
            root_mnt_id=self.root_mnt_id, mount_fd=self.mount_fd, create_open_clear=clear,
            create_reply_flags=self.open_reply_flags(False),
            own_ids=(Credentials.own_uid, Credentials.own_gid))
