"""--posix-acl: INIT fails with EPROTO unless the guest offers POSIX_ACL, DONT_MASK and
SETXATTR_EXT; with them the daemon applies the guest's umask itself, which the host
kernel ignores under a default ACL; ACL xattrs pass; it implies --xattr."""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

from daemon.protocol import fuse
from tests.options.helpers import (
    ACL_FLAGS,
    BASE_FLAGS,
    create_arg,
    entry,
    init,
    lookup,
    mkdir_arg,
    request,
    served,
)

ACL_UNDEFINED = 0xFFFFFFFF


def acl(user: int, group: int, other: int) -> bytes:
    """A minimal ACL in the kernel's xattr format (version 2, USER_OBJ/GROUP_OBJ/OTHER)."""
    return struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, ACL_UNDEFINED)
        for tag, perm in ((0x01, user), (0x04, group), (0x20, other)))


def test_init_needs_the_three_guest_flags(tmp_path: Path) -> None:
    with served(tmp_path, "--posix-acl") as (front, _share, proc):
        for missing in (fuse.POSIX_ACL, fuse.DONT_MASK, fuse.SETXATTR_EXT):
            assert init(front, BASE_FLAGS | (ACL_FLAGS & ~missing)) == (-errno.EPROTO, 0)
        err, agreed = init(front, BASE_FLAGS | ACL_FLAGS)
        assert err == 0 and agreed & ACL_FLAGS == ACL_FLAGS
    with served(tmp_path) as (front, _share, _):
        err, agreed = init(front, BASE_FLAGS | ACL_FLAGS)
        assert err == 0 and agreed & ACL_FLAGS == 0


def test_umask_applied_unless_a_default_acl_exists(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "inherit").mkdir()
    os.setxattr(share / "inherit", "system.posix_acl_default", acl(7, 7, 7))
    with served(tmp_path, "--posix-acl") as (front, share, _):
        assert init(front, BASE_FLAGS | ACL_FLAGS)[0] == 0
        err, _ = request(front, fuse.Opcode.MKDIR, 1, mkdir_arg("plain", 0o777, 0o027))
        assert err == 0
        assert stat.S_IMODE(os.stat(share / "plain").st_mode) == 0o750
        err, payload = request(front, fuse.Opcode.CREATE, 1,
                               create_arg("file", os.O_WRONLY, 0o666, 0o022))
        assert err == 0
        assert stat.S_IMODE(os.stat(share / "file").st_mode) == 0o644
        inherit, _ = lookup(front, 1, "inherit")
        err, _ = request(front, fuse.Opcode.MKDIR, inherit, mkdir_arg("sub", 0o777, 0o077))
        assert err == 0
        # the default ACL wins over the umask, as on a local file system
        assert stat.S_IMODE(os.stat(share / "inherit" / "sub").st_mode) == 0o777
        # ACL xattrs go through (with SETXATTR_EXT the guest sends the longer header)
        node, _ = entry(payload)
        value = acl(6, 4, 0)
        arg = fuse.SETXATTR_IN.pack(len(value), 0, 0, 0) + b"system.posix_acl_access\0" + value
        assert front.fuse(fuse.Opcode.SETXATTR, node, arg)[0] == 0
        # (a minimal access ACL is stored as the mode)
        assert stat.S_IMODE(os.stat(share / "file").st_mode) == 0o640
        err, got = front.fuse(fuse.Opcode.GETXATTR, inherit,
                              fuse.GETXATTR_IN.pack(4096, 0) + b"system.posix_acl_default\0")
        assert err == 0 and got == acl(7, 7, 7)


def test_setgid_cleared_by_acl_kill_sgid(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "sg").write_text("x")
    os.chmod(share / "sg", 0o2770)
    with served(tmp_path, "--posix-acl") as (front, share, _):
        assert init(front, BASE_FLAGS | ACL_FLAGS)[0] == 0
        node, _ = lookup(front, 1, "sg")
        value = acl(7, 7, 0)
        arg = fuse.SETXATTR_IN.pack(len(value), 0, fuse.SETXATTR_ACL_KILL_SGID, 0) + (
            b"system.posix_acl_access\0" + value)
        assert front.fuse(fuse.Opcode.SETXATTR, node, arg)[0] == 0
        assert not os.stat(share / "sg").st_mode & stat.S_ISGID
