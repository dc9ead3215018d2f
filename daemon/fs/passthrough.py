"""The FUSE file system: each request answered by system calls on the shared directory.

Inodes live in the shared-memory :class:`shm_table.InodeTable`, open files in
:class:`shm_table.HandleTable`; both store fd numbers of the one fd table that the
supervisor and all workers share (see ``docs/design.md``), so a request can arrive on any
queue. Every operation is relative to an inode's O_PATH fd and one validated name
component, never a path the guest builds, so nothing can reach outside the share.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from daemon.fs import locks, proc_fd
from daemon.fs.fd_cache import FdCache, open_by_handle
from daemon.fs.idmap import IdMap
from daemon.fs.lock_owners import LockOwners
from daemon.fs.proc_fd import openable, proc_name, proc_open
from daemon.fs.xattrmap import XattrMap
from daemon.host.capabilities import without_fsetid
from daemon.native._sys import ffi, lib
from daemon.protocol import fuse
from daemon.protocol.fuse import FuseError

log = logging.getLogger("pyvirtiofsd.fs")

O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
O_TMPFILE_ONLY = os.O_TMPFILE & ~os.O_DIRECTORY  # O_TMPFILE is this bit plus O_DIRECTORY
NAME_MAX = 255
# Flags the guest may not pass through to an open(2) on the host.
OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | getattr(os, "O_PATH", 0)
DIRENT64_HEAD = 19  # d_ino u64, d_off s64, d_reclen u16, d_type u8
GETDENTS_BUF = 32768
GETDENTS_MIN = 1024  # room for the longest dirent64 (19 + 256 bytes)
AT_FDCWD = -100
XATTR_MAX = 65536  # XATTR_SIZE_MAX and XATTR_LIST_MAX: no value or list is longer


@dataclass(slots=True)
class Config:
    """Options of virtiofsd that change how requests are answered."""

    cache: str = "auto"
    readdirplus: bool = True
    writeback: bool = False
    allow_direct_io: bool = False
    preserve_noatime: bool = False
    announce_submounts: bool = True
    readonly: bool = False
    file_handles: str = "prefer"  # never | prefer | mandatory
    xattr: bool = False
    fd_cache_size: int = 1024  # per worker, for inodes the table keeps by handle only
    posix_lock: bool = False  # forward fcntl locks to the host (per open file, not per owner)
    flock: bool = True  # forward flock() to the host
    uid_map: IdMap | None = None  # --translate-uid
    gid_map: IdMap | None = None  # --translate-gid
    xattrmap: XattrMap | None = None  # --xattrmap
    posix_acl: bool = False  # --posix-acl
    security_label: bool = False  # --security-label
    killpriv_v2: bool = False  # --killpriv-v2
    allow_mmap: bool = False  # --allow-mmap

    @property
    def timeout(self) -> tuple[int, int]:
        return {"never": (0, 0), "auto": (1, 0)}.get(self.cache, (86400, 0))


@dataclass(slots=True)
class Request:
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


class InodeRef:
    """A pin on an inode for the length of one request: its fd stays open whatever the
    guest forgets meanwhile on other queues, and a forgotten nodeid is refused."""

    __slots__ = ("fs", "slot", "fd", "nodeid", "cache_held")

    def __init__(self, fs: PassthroughFs, nodeid: int) -> None:
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

    def __init__(self, fs: PassthroughFs, fh: int) -> None:
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


SESSION_FLAGS = struct.Struct("<Q")


def check_name(name: bytes) -> bytes:
    """One path component, nothing that could climb out of its directory."""
    if not name or b"/" in name or name in (b".", b".."):
        raise GuestInputError(errno.EINVAL, f"invalid name {name[:64]!r}", "name")
    if len(name) > NAME_MAX:
        raise GuestInputError(errno.ENAMETOOLONG, "name longer than 255 bytes", "name")
    return name


class Credentials:
    """Switch this thread's fsuid/fsgid to the guest caller's so new files get its ids.
    (In an unprivileged user namespace an id outside its maps cannot be switched to; the
    file then gets the daemon's own ids.)"""

    __slots__ = ("uid", "gid")
    own_uid = 0  # what to switch back to: the server's ids, set once it is in its sandbox
    own_gid = 0

    def __init__(self, uid: int, gid: int) -> None:
        self.uid = uid
        self.gid = gid

    def __enter__(self) -> None:
        lib.pyvfs_setfsgid(self.gid)
        lib.pyvfs_setfsuid(self.uid)

    def __exit__(self, *exc: object) -> None:
        lib.pyvfs_own_fsids(Credentials.own_uid, Credentials.own_gid)


ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
SECURITY_CAPABILITY = b"security.capability"


@contextlib.contextmanager
def guest_umask(umask: int | None) -> Iterator[None]:
    """With POSIX ACLs (FUSE_DONT_MASK) the guest leaves its umask to us: the host kernel
    applies it only where the parent directory has no default ACL, as a local file
    system does. The daemon otherwise runs with umask 0."""
    if umask is None:
        yield
        return
    old = os.umask(umask & 0o777)
    try:
        yield
    finally:
        os.umask(old)


class PassthroughFs:
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

    # ----- setup -----------------------------------------------------------------

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
        self.inodes.insert_root((st.st_ino, st.st_dev, mnt), fd, st.st_mode, handle, htype)
        return fuse.ROOT_ID

    def _file_handle(self, fd: int) -> tuple[bytes | None, int, int]:
        if not self.use_handles:
            return None, 0, 0
        n = lib.pyvfs_name_to_handle(
            fd, b"", 0x1000, self._handle_buf, 128, self._handle_type, self._mount_id
        )  # AT_EMPTY_PATH
        if n < 0:
            return None, 0, 0
        return bytes(ffi.buffer(self._handle_buf, n)), self._handle_type[0], self._mount_id[0]

    # ----- helpers -----------------------------------------------------------------

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
        if handle is None:
            raise OSError(errno.EBADF, f"nodeid {nodeid} has neither fd nor file handle")
        fd = open_by_handle(self.mount_fd, handle[0], handle[1])
        self.fd_cache.opened += 1
        self.fd_cache.put(nodeid, fd)
        return fd

    def entry(self, parent: InodeRef, name: bytes) -> bytearray:
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

    # ----- --translate-uid / --translate-gid ------------------------------------------

    def host_ids(self, uid: int, gid: int) -> tuple[int, int]:
        """A guest caller's ids as host ids; EPERM for ids forbid-guest excludes."""
        if self.config.uid_map is not None:
            uid = self.config.uid_map.guest_to_host(uid)
        if self.config.gid_map is not None:
            gid = self.config.gid_map.guest_to_host(gid)
        return uid, gid

    def guest_ids(self, uid: int, gid: int) -> tuple[int, int]:
        if self.config.uid_map is not None:
            uid = self.config.uid_map.host_to_guest(uid)
        if self.config.gid_map is not None:
            gid = self.config.gid_map.host_to_guest(gid)
        return uid, gid

    def _guest_ids(self, buf: bytearray, attr_offset: int, st: os.stat_result) -> None:
        """Rewrite the owner in a packed fuse_attr as the guest should see it."""
        if self.translate_ids:
            fuse.set_attr_ids(buf, attr_offset, *self.guest_ids(st.st_uid, st.st_gid))

    def _creating(self, req: Request, umask: int | None = None) -> contextlib.ExitStack:
        """Credentials of the (translated) caller, and its umask under --posix-acl."""
        stack = contextlib.ExitStack()
        uid, gid = self.host_ids(req.uid, req.gid)
        stack.enter_context(Credentials(uid, gid))
        if umask is not None and self.negotiated(fuse.POSIX_ACL):
            stack.enter_context(guest_umask(umask))
        return stack

    # ----- --xattrmap, --posix-acl, --security-label, --killpriv-v2 -----------------------

    def client_xattr(self, name: bytes) -> bytes:
        """The host name of an xattr the guest names (virtiofsd's map_client_xattrname):
        ACL xattrs are ENOTSUP unless POSIX ACLs were negotiated, then --xattrmap."""
        if not self.negotiated(fuse.POSIX_ACL) and (
            ACL_ACCESS.startswith(name) or ACL_DEFAULT.startswith(name)
        ):
            raise OSError(errno.EOPNOTSUPP, "POSIX ACLs are not enabled (--posix-acl)")
        if self.config.xattrmap is not None:
            return self.config.xattrmap.map_client(name)
        return name

    def clear_capability(self, fd: int, o_path: bool) -> None:
        """Remove the renamed security.capability (only with an --xattrmap that renames
        it: otherwise the host kernel does this itself)."""
        if self.security_capability is None:
            return
        try:
            if o_path:
                self.removexattr_of(fd, self.security_capability)
            else:
                os.removexattr(fd, self.security_capability)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise

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

    def security_context(self, req: Request) -> tuple[bytes, bytes] | None:
        """The label the guest sends with a create (FUSE_SECURITY_CTX), checked before
        anything is created."""
        if not self.negotiated(fuse.SECURITY_CTX):
            return None
        if req.ext is None:
            if not self._ext_missing_warned:
                self._ext_missing_warned = True
                log.warning("--security-label: request extensions are not passed to the "
                            "file system; new files get no label")
            return None
        secctx = None
        received = False
        for kind, body in fuse.parse_extensions(req.ext):
            if kind < fuse.EXT_SUPP_GROUPS:
                if received:
                    raise FuseError(errno.EINVAL, "two security context extensions")
                received = True
                secctx = fuse.parse_security_context(kind, body)
            elif kind != fuse.EXT_SUPP_GROUPS:
                raise FuseError(errno.EINVAL, f"unknown request extension {kind}")
        if not received:
            raise FuseError(errno.EINVAL, "create without its security context extension")
        return secctx

    def set_security_context(self, secctx: tuple[bytes, bytes], fd: int, o_path: bool) -> None:
        name, value = secctx
        if o_path:
            self.setxattr_of(fd, self.client_xattr(name), value, 0)
        else:
            os.setxattr(fd, self.client_xattr(name), value)

    # ----- xattrs of an inode by its O_PATH fd, which is never opened for them -----------

    def _xattr(self, op: int, fd: int, name: bytes | None, value: bytes | None = None,
               flags: int = 0) -> int:
        """pyvfs_xattr: path-based through the fd directory, so a FIFO, a socket or a
        device node is not opened (virtiofsd does this for such inodes)."""
        if value is not None:
            buf, size = ffi.from_buffer(value), len(value)
        else:
            buf, size = self._xattr_buf, XATTR_MAX
        n = lib.pyvfs_xattr(op, proc_fd.PROC_DIR_FD, fd, ffi.NULL if name is None else name, buf,
                            size, flags)
        if n < 0:
            err = lib.pyvfs_errno()
            raise OSError(err, os.strerror(err))
        return n

    def getxattr_of(self, fd: int, name: bytes) -> bytes:
        n = self._xattr(lib.PYVFS_XATTR_GET, fd, name)
        return bytes(ffi.buffer(self._xattr_buf, n))

    def listxattr_of(self, fd: int) -> list[bytes]:
        n = self._xattr(lib.PYVFS_XATTR_LIST, fd, None)
        return bytes(ffi.buffer(self._xattr_buf, n)).split(b"\0")[:-1]

    def setxattr_of(self, fd: int, name: bytes, value: bytes, flags: int) -> None:
        self._xattr(lib.PYVFS_XATTR_SET, fd, name, value, flags)

    def removexattr_of(self, fd: int, name: bytes) -> None:
        self._xattr(lib.PYVFS_XATTR_REMOVE, fd, name)

    def negotiated(self, flag: int) -> bool:
        return bool(SESSION_FLAGS.unpack_from(self.session)[0] & flag)

    def _attr_flags(self, parent: InodeRef, st: os.stat_result) -> int:
        """FUSE_ATTR_SUBMOUNT on a directory that is another file system's root, so the
        guest gives it its own superblock (and its own SYNCFS)."""
        if not stat.S_ISDIR(st.st_mode) or not self.negotiated(fuse.SUBMOUNTS):
            return 0
        return fuse.ATTR_SUBMOUNT if os.fstat(parent.fd).st_dev != st.st_dev else 0

    def _check_writable(self) -> None:
        if self.config.readonly:
            raise OSError(errno.EROFS, "shared directory is read-only")

    # ----- operations ------------------------------------------------------------

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

    def op_link(self, req: Request) -> bytes:
        (old_nodeid,) = fuse.LINK_IN.unpack_from(req.arg)
        name, _ = fuse.split_name(req.arg[fuse.LINK_IN.size :])
        check_name(name)
        self._check_writable()
        with InodeRef(self, old_nodeid) as target, InodeRef(self, req.nodeid) as parent:
            path, dir_fd = proc_name(target.fd)  # linkat of the inode itself: nothing opened
            os.link(path, name, src_dir_fd=dir_fd, dst_dir_fd=parent.fd, follow_symlinks=True)
            return self._new_entry(parent, name)

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

    def op_opendir(self, req: Request) -> bytes:
        with InodeRef(self, req.nodeid) as inode:
            if not openable(os.fstat(inode.fd).st_mode):
                raise OSError(errno.EBADF, "only regular files and directories are opened")
            fd = proc_open(inode.fd, os.O_RDONLY | os.O_DIRECTORY)  # a file: ENOTDIR
            return self._new_handle(req.nodeid, fd, 0, True)

    def _dirents(self, fd: int, offset: int, want: int):  # noqa: ANN202 - tuple generator
        """(d_ino, next_offset, d_type, name) from getdents64, starting at offset, read
        about ``want`` bytes of dirent64 at a time: what the reply can take, since what it
        cannot is read again after the next request's lseek (on ext4 that re-hashes whole
        directory blocks)."""
        os.lseek(fd, offset, os.SEEK_SET)
        buf = self._dents_view
        chunk = max(GETDENTS_MIN, min(GETDENTS_BUF, want))
        while True:
            n = lib.pyvfs_getdents64(fd, self._dents, chunk)
            if n < 0:
                err = lib.pyvfs_errno()
                raise OSError(err, os.strerror(err))
            if n == 0:
                return
            pos = 0
            while pos < n:
                ino = int.from_bytes(buf[pos : pos + 8], "little")
                off = int.from_bytes(buf[pos + 8 : pos + 16], "little", signed=True)
                reclen = int.from_bytes(buf[pos + 16 : pos + 18], "little")
                dtype = buf[pos + 18][0]
                end = buf[pos + 19 : pos + reclen].index(b"\0") if reclen > 19 else 0
                name = bytes(buf[pos + 19 : pos + 19 + end])
                pos += reclen
                yield ino, off, dtype, name

    def op_readdir(self, req: Request) -> bytes:
        fh, offset, size, *_ = fuse.READ_IN.unpack_from(req.arg)
        size = min(size, fuse.MAX_WRITE, req.room)
        out = bytearray()
        with HandleRef(self, fh) as handle:
            for ino, off, dtype, name in self._dirents(handle.fd, offset, size):
                rec = fuse.dirent_size(len(name))
                if len(out) + rec > size:
                    break
                out += fuse.DIRENT_HEAD.pack(ino, off, len(name), dtype)
                out += name
                out += b"\0" * (rec - fuse.DIRENT_HEAD.size - len(name))
        return bytes(out)

    def op_readdirplus(self, req: Request) -> bytes:
        fh, offset, size, *_ = fuse.READ_IN.unpack_from(req.arg)
        size = min(size, fuse.MAX_WRITE, req.room)  # every entry sent carries a reference
        out = bytearray()
        t = self.config.timeout
        claimed: list[int] = []  # lookups taken for the guest, in order
        with HandleRef(self, fh) as handle, InodeRef(self, req.nodeid) as parent:
            start = 0
            try:
                # a dirent64 is at most a quarter of its direntplus
                for ino, off, dtype, name in self._dirents(handle.fd, offset, size // 4):
                    rec = fuse.direntplus_size(len(name))
                    if len(out) + rec > size:
                        break
                    start = len(out)
                    out += bytes(rec)
                    if name in (b".", b".."):
                        # nodeid 0: the guest makes no dentry and sends no FORGET for it
                        fuse.ENTRY_HEAD.pack_into(out, start, 0, 0, 0, 0, 0, 0)
                        fuse.ATTR.pack_into(out, start + fuse.ENTRY_HEAD.size, ino,
                                            *(0,) * 8, dtype << 12, *(0,) * 6)
                    else:
                        try:
                            nodeid, st = self.do_lookup(parent, name)
                        except FileNotFoundError:
                            del out[start:]
                            continue
                        claimed.append(nodeid)
                        fuse.pack_entry_into(out, start, nodeid, st, t, t,
                                             self._attr_flags(parent, st))
                        self._guest_ids(out, start + fuse.ENTRY_HEAD.size, st)
                        ino = st.st_ino
                    fuse.DIRENT_HEAD.pack_into(out, start + fuse.ENTRY_OUT_SIZE, ino, off,
                                               len(name), dtype)
                    p = start + fuse.ENTRY_OUT_SIZE + fuse.DIRENT_HEAD.size
                    out[p : p + len(name)] = name
                    start = len(out)
            except Exception:
                # An entry failed (a full inode table, a vanished parent): the entries
                # before it go to the guest with their lookups; the failed one gives its
                # lookup back; with none before it, the error is the answer.
                del out[start:]
                sent = sum(1 for _ in _entry_nodeids(out))
                for nodeid in claimed[sent:]:
                    self._forget(nodeid, 1)
                if not out:
                    raise
        return bytes(out)

    def op_statfs(self, req: Request) -> bytes:
        with InodeRef(self, req.nodeid) as inode:
            s = os.fstatvfs(inode.fd)
        return fuse.STATFS_OUT.pack(
            s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize,
            s.f_namemax, s.f_frsize, 0,
        )

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

    # ----- extended attributes (--xattr) --------------------------------------------

    def op_getxattr(self, req: Request) -> bytes:
        size, _ = fuse.GETXATTR_IN.unpack_from(req.arg)
        name, _ = fuse.split_name(req.arg[fuse.GETXATTR_IN.size :])
        try:
            host_name = self.client_xattr(name)
        except OSError as e:
            if e.errno == errno.EPERM:  # a "bad" rule: as if the xattr did not exist
                raise OSError(errno.ENODATA, "no such xattr") from None
            raise
        with InodeRef(self, req.nodeid) as inode:
            value = self.getxattr_of(inode.fd, host_name)
        return self._sized(value, size)

    def op_listxattr(self, req: Request) -> bytes:
        size, _ = fuse.GETXATTR_IN.unpack_from(req.arg)
        with InodeRef(self, req.nodeid) as inode:
            names = self.listxattr_of(inode.fd)
        if self.config.xattrmap is not None:
            names = self.config.xattrmap.map_server_list(names)
        if not self.negotiated(fuse.POSIX_ACL):
            names = [n for n in names
                     if not (ACL_ACCESS.startswith(n) or ACL_DEFAULT.startswith(n))]
        raw = b"".join(n + b"\0" for n in names)
        return self._sized(raw, size)

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        """The xattr size probe: size 0 asks how much room the value needs."""
        if size == 0:
            return fuse.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "xattr buffer too small")
        return value

    def op_setxattr(self, req: Request) -> bytes:
        head = fuse.SETXATTR_IN if self.negotiated(fuse.SETXATTR_EXT) else (
            fuse.SETXATTR_IN_COMPAT)
        size, flags, *rest = head.unpack_from(req.arg)
        setxattr_flags = rest[0] if rest else 0
        name, used = fuse.split_name(req.arg[head.size :])
        value = req.arg[head.size + used : head.size + used + size]
        if len(value) != size:
            raise FuseError(errno.EINVAL, "SETXATTR value shorter than its size")
        self._check_writable()
        host_name = self.client_xattr(name)
        with InodeRef(self, req.nodeid) as inode:
            self.clear_capability(inode.fd, True)
            if (host_name == ACL_ACCESS and setxattr_flags & fuse.SETXATTR_ACL_KILL_SGID
                    and self.negotiated(fuse.POSIX_ACL)):
                # the guest's setfacl would have cleared setgid (caller not in the group)
                mode = os.fstat(inode.fd).st_mode
                if mode & stat.S_ISGID:
                    path, dir_fd = proc_name(inode.fd)
                    os.chmod(path, stat.S_IMODE(mode) & ~stat.S_ISGID, dir_fd=dir_fd)
            self.setxattr_of(inode.fd, host_name, value, flags)
        return b""

    def op_removexattr(self, req: Request) -> bytes:
        name, _ = fuse.split_name(req.arg)
        self._check_writable()
        host_name = self.client_xattr(name)
        with InodeRef(self, req.nodeid) as inode:
            self.removexattr_of(inode.fd, host_name)
        return b""

    # ----- locks ----------------------------------------------------------------------

    def _lock_args(self, req: Request) -> tuple[int, int, int, int, int, bool, int]:
        """fh, owner, start, end, type, flock?, and the locking process (its tgid)."""
        fh, owner, start, end, kind, pid, lk_flags, _ = fuse.LK_IN.unpack_from(req.arg)
        flock = bool(lk_flags & fuse.LK_FLOCK)
        if (flock and not self.config.flock) or (not flock and self.lock_owners is None):
            raise OSError(errno.ENOSYS, "lock forwarding is off")
        return fh, owner, start, end, kind, flock, pid

    def owner_opener(self, fd: int) -> Callable[[], int]:
        """Opens the lock owner's own description of the file ``fd`` (an open file of
        the guest): read-write when the host allows, else as the guest opened it."""
        def reopen() -> int:
            try:
                return proc_open(fd, os.O_RDWR)
            except OSError:
                mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
                return proc_open(fd, mode)
        return reopen

    def lock_as_owner(self, nodeid: int, owner: int, handle_fd: int, start: int, end: int,
                      kind: int, pid: int = 0) -> None:
        """SETLK of a POSIX lock on the owner's description (raises LockBusy)."""
        assert self.lock_owners is not None
        opener = None if kind == locks.F_UNLCK else self.owner_opener(handle_fd)
        fd = self.lock_owners.use(nodeid, owner, opener, pid)
        if fd < 0:
            locks.check_request(start, end, kind)
            return  # unlocking what was never locked
        try:
            locks.set_lock(fd, start, end, kind, False)
        finally:
            self.lock_owners.done(nodeid, owner, fd)

    def op_getlk(self, req: Request) -> bytes:
        fh, owner, start, end, kind, flock, _pid = self._lock_args(req)
        with HandleRef(self, fh) as handle:
            if flock or self.lock_owners is None:
                return locks.get_lock(handle.fd, start, end, kind)
            # the owner's own locks never conflict: ask through its description if any
            owners = self.lock_owners
            fd = owners.use(req.nodeid, owner, None)
            try:
                answer = locks.get_lock(handle.fd if fd < 0 else fd, start, end, kind)
            finally:
                if fd >= 0:
                    owners.done(req.nodeid, owner, fd)
            return self._name_the_holder(req.nodeid, owner, answer)

    def _name_the_holder(self, nodeid: int, owner: int, answer: bytes) -> bytes:
        """Host OFD locks have no pid: if the conflicting lock is another guest owner's
        (the range is free as that owner sees it), answer that owner's guest pid, as
        POSIX F_GETLK does; a host process's lock is answered with pid 0."""
        got_start, got_end, got_kind, _ = fuse.LK_OUT.unpack(answer)
        if got_kind == locks.F_UNLCK:
            return answer
        assert self.lock_owners is not None
        others = self.lock_owners.others(nodeid, owner)
        pid = 0
        try:
            for _other, fd, other_pid in others:
                seen = locks.get_lock(fd, got_start, got_end, locks.F_WRLCK)
                if other_pid and fuse.LK_OUT.unpack(seen)[2] == locks.F_UNLCK:
                    pid = other_pid
                    break
        finally:
            for other, fd, _ in others:
                self.lock_owners.done(nodeid, other, fd)
        return fuse.LK_OUT.pack(got_start, got_end, got_kind, pid)

    def op_setlk(self, req: Request) -> bytes:
        fh, owner, start, end, kind, flock, pid = self._lock_args(req)
        with HandleRef(self, fh) as handle:
            try:
                if flock:
                    locks.set_lock(handle.fd, start, end, kind, True)
                else:
                    self.lock_as_owner(req.nodeid, owner, handle.fd, start, end, kind, pid)
            except locks.LockBusy:
                raise OSError(errno.EAGAIN, "lock held elsewhere") from None
        return b""

    def start_setlkw(self, req: Request) -> PendingLock | None:
        """SETLKW: take the lock now, or return what the worker must retry later."""
        fh, owner, start, end, kind, flock, pid = self._lock_args(req)
        pending = PendingLock(self, fh, req.nodeid, owner, start, end, kind, flock, pid)
        if pending.attempt():
            return None
        return pending


def _entry_nodeids(buf: bytearray) -> Iterator[int]:
    """The non-zero nodeids of the direntplus records in a READDIRPLUS reply."""
    pos = 0
    while pos < len(buf):
        nodeid = int.from_bytes(buf[pos : pos + 8], "little")
        namelen = int.from_bytes(buf[pos + fuse.ENTRY_OUT_SIZE + 16 :
                                     pos + fuse.ENTRY_OUT_SIZE + 20], "little")
        if nodeid:
            yield nodeid
        pos += fuse.direntplus_size(namelen)


class PendingLock:
    """A SETLKW the host could not grant yet.  It pins its open file only while it tries:
    a parked request holds nothing, so a RELEASE meanwhile closes the file and the next try
    answers EBADF, and any number of parked requests costs no pins."""

    __slots__ = ("fs", "fh", "nodeid", "owner", "start", "end", "kind", "flock", "pid")

    def __init__(self, fs: PassthroughFs, fh: int, nodeid: int, owner: int, start: int,
                 end: int, kind: int, flock: bool, pid: int) -> None:
        self.fs, self.fh = fs, fh
        self.nodeid, self.owner, self.pid = nodeid, owner, pid
        self.start, self.end, self.kind, self.flock = start, end, kind, flock

    def attempt(self) -> bool:
        """True once the lock is ours; raises OSError when the guest closed the file
        meanwhile or the host refuses."""
        fs = self.fs
        got = fs.handles.pin(self.fh)
        if got is None:
            raise OSError(errno.EBADF, "the file is not open (released while waiting?)")
        try:
            if self.flock:
                locks.set_lock(got[1], self.start, self.end, self.kind, True)
            else:
                fs.lock_as_owner(self.nodeid, self.owner, got[1], self.start, self.end,
                                 self.kind, self.pid)
        except locks.LockBusy:
            return False
        finally:
            fs.handles.unpin(self.fh)
        return True
