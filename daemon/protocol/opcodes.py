"""The one table of the FUSE requests the daemon serves: who answers each opcode, how big its
reply is at least, whether it has one, and whether the C fast path may answer it.

Everything else is derived from it: the queue worker's dispatch (``handler`` looked up once
per worker, on the file system or on the worker itself), the reply-room check made before a
request acts (:data:`MIN_REPLY`), the mask of opcodes handed to the C path
(``workers/fast_path.py``), and the differential tests that compare the C and Python answers
(``tests/protocol/test_c_path_differential.py``). Adding an op is adding a row here
(``docs/adding-an-op.md``).

Data only: no I/O, no import of the layers above.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from daemon.protocol import fuse
from daemon.protocol.fuse import Opcode


class Server(enum.Enum):
    """Where a request's handler lives."""

    FS = "fs"  # a method of the file system (PassthroughFs): Request -> reply payload
    WORKER = "worker"  # a method of the queue worker: the request moves data through the
    # descriptor chain itself (READ, WRITE), waits (SETLKW) or concerns the worker (INTERRUPT)


class Condition(enum.Enum):
    """A configuration under which the C path declines an opcode it could answer otherwise:
    the file system says which of these hold (``PassthroughFs.c_path_settings()``), and C
    answers an opcode only if none of the row's ``c_declines_when`` does."""

    TRANSLATE_IDS = "translate_ids"  # --translate-uid/gid: owners are rewritten in Python
    READONLY = "readonly"  # --readonly: EROFS and friends are Python's
    CAPABILITY_RENAMED = "capability_renamed"  # --xattrmap renames security.capability:
    # writes and creates must clear the renamed xattr (Python)
    POSIX_ACL = "posix_acl"  # --posix-acl: a new file's mode needs the guest's umask
    SECURITY_LABEL = "security_label"  # --security-label: a new file gets the guest's label
    WRITEBACK = "writeback"  # --writeback: open flags are rewritten (O_APPEND, O_WRONLY)
    XATTRMAP = "xattrmap"  # --xattrmap: xattrs set at creation are renamed


@dataclass(frozen=True, slots=True)
class Op:
    """One row of the table."""

    opcode: Opcode
    handler: str  # the method's name on the file system, or on the worker (``served_by``)
    served_by: Server = Server.FS
    # a reply of a fixed size, checked against the guest's buffer before the request acts
    # (a LOOKUP whose answer cannot be delivered must not take a reference); None: no check
    min_reply: int | None = None
    no_reply: bool = False  # the guest waits for no answer: the chain completes empty
    in_c: bool = False  # daemon/native/fuse_ops.c may answer it (it still declines single
    # requests it cannot answer exactly as Python would: Python answers those)
    c_declines_when: frozenset[Condition] = frozenset()  # configurations that keep it in Python
    needs_xattr: bool = False  # served only with --xattr (or what implies it); else ENOSYS


ENTRY = fuse.ENTRY_OUT_SIZE
ATTR_OUT = fuse.ATTR_OUT_HEAD.size + fuse.ATTR.size
OPEN_OUT = fuse.OPEN_OUT.size
NOT_PLAIN_CREATE = frozenset({
    Condition.TRANSLATE_IDS, Condition.READONLY, Condition.POSIX_ACL,
    Condition.SECURITY_LABEL, Condition.WRITEBACK, Condition.XATTRMAP,
    Condition.CAPABILITY_RENAMED,
})
META = frozenset({Condition.TRANSLATE_IDS})  # C's metadata answers carry untranslated owners

W = Server.WORKER
TABLE: tuple[Op, ...] = (
    Op(Opcode.INIT, "op_init"),
    Op(Opcode.DESTROY, "op_destroy"),
    Op(Opcode.LOOKUP, "op_lookup", min_reply=ENTRY, in_c=True, c_declines_when=META),
    Op(Opcode.FORGET, "op_forget", no_reply=True, in_c=True, c_declines_when=META),
    Op(Opcode.BATCH_FORGET, "op_batch_forget", no_reply=True, in_c=True,
       c_declines_when=META),
    Op(Opcode.GETATTR, "op_getattr", min_reply=ATTR_OUT, in_c=True, c_declines_when=META),
    # (C answers mode, size by name and times; owners, a handle, KILL_SUIDGID are Python's)
    Op(Opcode.SETATTR, "op_setattr", min_reply=ATTR_OUT, in_c=True,
       c_declines_when=META | {Condition.READONLY, Condition.CAPABILITY_RENAMED}),
    Op(Opcode.READLINK, "op_readlink"),
    Op(Opcode.SYMLINK, "op_symlink", min_reply=ENTRY, in_c=True,
       c_declines_when=NOT_PLAIN_CREATE),
    Op(Opcode.MKNOD, "op_mknod", min_reply=ENTRY, in_c=True, c_declines_when=NOT_PLAIN_CREATE),
    Op(Opcode.MKDIR, "op_mkdir", min_reply=ENTRY, in_c=True, c_declines_when=NOT_PLAIN_CREATE),
    Op(Opcode.UNLINK, "op_unlink", in_c=True,
       c_declines_when=META | {Condition.READONLY}),
    Op(Opcode.RMDIR, "op_rmdir", in_c=True, c_declines_when=META | {Condition.READONLY}),
    Op(Opcode.RENAME, "op_rename", in_c=True, c_declines_when=META | {Condition.READONLY}),
    Op(Opcode.RENAME2, "op_rename2"),
    Op(Opcode.LINK, "op_link", min_reply=ENTRY),
    # (C opens regular files only; directories, O_TMPFILE, KILL_SUIDGID are Python's)
    Op(Opcode.OPEN, "op_open", min_reply=OPEN_OUT, in_c=True,
       c_declines_when=META | {Condition.READONLY, Condition.WRITEBACK,
                               Condition.CAPABILITY_RENAMED}),
    Op(Opcode.READ, "serve_read", served_by=W, in_c=True),
    # (C declines a WRITE_KILL_SUIDGID write by itself: Python clears the privileges)
    Op(Opcode.WRITE, "serve_write", served_by=W, in_c=True,
       c_declines_when=frozenset({Condition.READONLY, Condition.CAPABILITY_RENAMED})),
    Op(Opcode.CREATE, "op_create", min_reply=ENTRY + OPEN_OUT, in_c=True,
       c_declines_when=NOT_PLAIN_CREATE),
    Op(Opcode.TMPFILE, "op_tmpfile", min_reply=ENTRY + OPEN_OUT),
    Op(Opcode.FLUSH, "op_flush", in_c=True, c_declines_when=META),
    Op(Opcode.RELEASE, "op_release", in_c=True, c_declines_when=META),
    Op(Opcode.FSYNC, "op_fsync"),
    Op(Opcode.OPENDIR, "op_opendir", min_reply=OPEN_OUT),
    Op(Opcode.READDIR, "op_readdir"),
    Op(Opcode.READDIRPLUS, "op_readdirplus", in_c=True, c_declines_when=META),
    Op(Opcode.RELEASEDIR, "op_release", in_c=True, c_declines_when=META),
    Op(Opcode.FSYNCDIR, "op_fsync"),
    Op(Opcode.STATFS, "op_statfs"),
    Op(Opcode.ACCESS, "op_access"),
    Op(Opcode.FALLOCATE, "op_fallocate"),
    Op(Opcode.LSEEK, "op_lseek"),
    Op(Opcode.COPY_FILE_RANGE, "op_copy_file_range"),
    Op(Opcode.SYNCFS, "op_syncfs"),
    Op(Opcode.GETXATTR, "op_getxattr", needs_xattr=True),
    Op(Opcode.LISTXATTR, "op_listxattr", needs_xattr=True),
    Op(Opcode.SETXATTR, "op_setxattr", needs_xattr=True),
    Op(Opcode.REMOVEXATTR, "op_removexattr", needs_xattr=True),
    Op(Opcode.GETLK, "op_getlk"),
    Op(Opcode.SETLK, "op_setlk"),
    Op(Opcode.SETLKW, "serve_setlkw", served_by=W),
    Op(Opcode.INTERRUPT, "serve_interrupt", served_by=W, no_reply=True),
)

BY_OPCODE: dict[int, Op] = {row.opcode: row for row in TABLE}
MIN_REPLY: dict[int, int] = {row.opcode: row.min_reply for row in TABLE
                             if row.min_reply is not None}
C_OPCODES: frozenset[Opcode] = frozenset(row.opcode for row in TABLE if row.in_c)


def c_mask(conditions: Iterable[Condition]) -> int:
    """The bit mask of the opcodes C may answer (bit ``op`` set: ``pyvfs_fast_ctx_t.c_ops``)
    on a file system where ``conditions`` hold."""
    holding = frozenset(conditions)
    mask = 0
    for row in TABLE:
        if row.in_c and not row.c_declines_when & holding:
            mask |= 1 << row.opcode
    return mask
