"""Who a request runs as: the guest caller's fsuid/fsgid while it creates (so new files get
its ids), its ids translated by --translate-uid/--translate-gid both ways, its umask under
--posix-acl (FUSE_DONT_MASK), and the security label (--security-label) a new file gets.
Supplementary groups are not switched: FUSE_CREATE_SUPP_GROUP is not offered at INIT (a
supplementary-groups request extension is let through and not applied).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator

from daemon.fs.ops.base import FsBase, Request
from daemon.native._sys import lib
from daemon.protocol import fuse
from daemon.protocol.fuse import FuseError

log = logging.getLogger("pyvirtiofsd.fs")


class Credentials:
    """Switch this thread's fsuid/fsgid to the guest caller's so new files get its ids.
    (In an unprivileged user namespace an id outside its maps cannot be switched to; the
    file then gets the daemon's own ids.)"""

    __slots__ = ("uid", "gid", "switched")
    own_uid = 0  # what to switch back to: the server's ids, set once it is in its sandbox
    own_gid = 0

    def __init__(self, uid: int, gid: int) -> None:
        self.uid = uid
        self.gid = gid
        self.switched = False

    def __enter__(self) -> None:
        # a caller with the daemon's own ids needs no switch (it would change nothing):
        # pyvfs_caller_fsids says whether it switched, as the C path's creates do
        self.switched = bool(lib.pyvfs_caller_fsids(self.uid, self.gid, Credentials.own_uid,
                                                    Credentials.own_gid))

    def __exit__(self, *exc: object) -> None:
        if self.switched:
            lib.pyvfs_own_fsids(Credentials.own_uid, Credentials.own_gid)


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


class ContextOps(FsBase):
    """The caller's ids and umask around a create, ids in replies, and security labels of
    new files."""

    def host_ids(self, uid: int, gid: int) -> tuple[int, int]:
        """A guest caller's ids as host ids; EPERM for ids forbid-guest excludes."""
        if self.config.uid_map is not None:
            uid = self.config.uid_map.guest_to_host(uid)
        if self.config.gid_map is not None:
            gid = self.config.gid_map.guest_to_host(gid)
        return uid, gid

    def guest_ids(self, uid: int, gid: int) -> tuple[int, int]:
        """Host ids (of a file's owner) as the guest should see them."""
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
        """Label a file this request made, under the xattr name --xattrmap gives it."""
        name, value = secctx
        if o_path:
            self.setxattr_of(fd, self.client_xattr(name), value, 0)
        else:
            os.setxattr(fd, self.client_xattr(name), value)
