"""What every concern of the passthrough file system shares: the request the worker hands
over, the error for what only a hostile guest sends, the one-name-component rule, and
:class:`FsBase`, the state that all the op mixins in this folder read through ``self``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon.protocol import fuse

if TYPE_CHECKING:
    import mmap

    from daemon.fs.config import Config
    from daemon.fs.fd_cache import FdCache
    from daemon.fs.lock_owners import LockOwners
    from shm_table import HandleTable, InodeTable


O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
NAME_MAX = 255


@dataclass(slots=True)
class Request:
    """One FUSE request as the worker hands it to its handler (named in the opcode table):
    the header's fields and the bytes of the arguments after it."""

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    arg: bytes
    room: int = fuse.MAX_WRITE  # bytes the guest left for the reply payload
    # the request extensions (header total_extlen * 8 bytes after the arguments); None
    # when the caller did not pass them
    ext: bytes | None = None


class GuestInputError(OSError):
    """An errno answer to something only a buggy or hostile guest sends (forged ids,
    names that would climb out of a directory): the worker logs it, rate-limited."""

    def __init__(self, code: int, message: str, kind: str) -> None:
        super().__init__(code, message)
        self.kind = kind


def check_name(name: bytes) -> bytes:
    """One path component, nothing that could climb out of its directory."""
    if not name or b"/" in name or name in (b".", b".."):
        raise GuestInputError(errno.EINVAL, f"invalid name {name[:64]!r}", "name")
    if len(name) > NAME_MAX:
        raise GuestInputError(errno.ENAMETOOLONG, "name longer than 255 bytes", "name")
    return name


class FsBase:
    """The state every concern's operations share. One object carries it, a
    :class:`daemon.fs.passthrough.PassthroughFs`, which sets it all up in its
    ``__init__``; the classes in daemon/fs/ops are its mixins and reach each other's
    methods through ``self``."""

    shared_dir: str
    inodes: InodeTable  # nodeid -> inode (O_PATH fd or file handle), shared by all workers
    handles: HandleTable  # fh -> open file, shared by all workers
    config: Config
    lock_owners: LockOwners | None  # --posix-lock: a description per guest lock owner
    use_handles: bool  # inodes may be kept by file handle (--inode-file-handles)
    mount_fd: int  # a real fd on the share's mount, for open_by_handle_at
    root_mnt_id: int  # the share's mount: only its inodes are kept by handle alone
    fd_cache: FdCache  # this worker's O_PATH fds of inodes kept by handle
    session: mmap.mmap  # what INIT agreed on (session.SESSION_FLAGS), seen by all workers
    translate_ids: bool  # --translate-uid or --translate-gid given
    security_capability: bytes | None  # the name --xattrmap gives security.capability
    _ext_missing_warned: bool  # --security-label without request extensions: said once
    # this worker's buffers for system calls (cffi)
    _dents: Any
    _dents_view: Any
    _handle_buf: Any
    _handle_type: Any
    _mount_id: Any
    _xattr_buf: Any

    def _check_writable(self) -> None:
        if self.config.readonly:
            raise OSError(errno.EROFS, "shared directory is read-only")
