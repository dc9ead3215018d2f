"""Extended attributes (--xattr, also on with --posix-acl, --security-label, --xattrmap):
GETXATTR, LISTXATTR, SETXATTR and REMOVEXATTR, names mapped by --xattrmap, POSIX ACL
names only once negotiated, and the renamed security.capability that the daemon removes
where the kernel would have removed the real one. An inode's xattrs are reached by its
O_PATH fd through the fd directory, never by opening it.
"""

from __future__ import annotations

import errno
import os
import stat

from daemon.fs import proc_fd
from daemon.fs.ops.base import FsBase, Request
from daemon.fs.ops.inodes import InodeRef
from daemon.fs.proc_fd import proc_name
from daemon.native._sys import ffi, lib
from daemon.protocol import fuse
from daemon.protocol.fuse import FuseError

XATTR_MAX = 65536  # XATTR_SIZE_MAX and XATTR_LIST_MAX: no value or list is longer
ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
SECURITY_CAPABILITY = b"security.capability"


class XattrOps(FsBase):
    """The xattr requests, the names they map to on the host, and xattr system calls on an
    O_PATH fd."""

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
        """The value of xattr ``name`` of the inode of O_PATH fd ``fd``."""
        n = self._xattr(lib.PYVFS_XATTR_GET, fd, name)
        return bytes(ffi.buffer(self._xattr_buf, n))

    def listxattr_of(self, fd: int) -> list[bytes]:
        """The xattr names of the inode of O_PATH fd ``fd``."""
        n = self._xattr(lib.PYVFS_XATTR_LIST, fd, None)
        return bytes(ffi.buffer(self._xattr_buf, n)).split(b"\0")[:-1]

    def setxattr_of(self, fd: int, name: bytes, value: bytes, flags: int) -> None:
        """Set xattr ``name`` of the inode of O_PATH fd ``fd``."""
        self._xattr(lib.PYVFS_XATTR_SET, fd, name, value, flags)

    def removexattr_of(self, fd: int, name: bytes) -> None:
        """Remove xattr ``name`` of the inode of O_PATH fd ``fd``."""
        self._xattr(lib.PYVFS_XATTR_REMOVE, fd, name)
