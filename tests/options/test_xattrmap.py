"""--xattrmap: names the guest uses are mapped (or refused) on their way to the host,
names the host lists are mapped back (or hidden); it implies --xattr. Without
--posix-acl the ACL xattrs are refused, as virtiofsd does."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from daemon.fs.xattrmap import XattrMap, XattrMapError
from daemon.protocol import fuse
from tests.options.helpers import init, lookup, served, start_error

# virtiofsd's doc/xattr-mapping.md example 2 plus an "unsupported" rule
RULES = """
    /unsupported/client/security.//
    /prefix/all/trusted./user.virtiofs./
    /bad/server//trusted./
    /bad/client/user.virtiofs.//
    /ok/all///
"""


def setxattr(front, nodeid: int, name: bytes, value: bytes) -> int:  # noqa: ANN001
    arg = fuse.SETXATTR_IN_COMPAT.pack(len(value), 0) + name + b"\0" + value
    return front.fuse(fuse.Opcode.SETXATTR, nodeid, arg)[0]


def getxattr(front, nodeid: int, name: bytes) -> tuple[int, bytes]:  # noqa: ANN001
    return front.fuse(fuse.Opcode.GETXATTR, nodeid,
                      fuse.GETXATTR_IN.pack(4096, 0) + name + b"\0")


def listxattr(front, nodeid: int) -> tuple[int, list[bytes]]:  # noqa: ANN001
    err, payload = front.fuse(fuse.Opcode.LISTXATTR, nodeid, fuse.GETXATTR_IN.pack(4096, 0))
    return err, sorted(n for n in payload.split(b"\0") if n)


def test_rules_applied_to_all_four_operations(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    f = share / "f"
    f.write_text("x")
    os.setxattr(f, "user.plain", b"p")
    os.setxattr(f, "trusted.host_only", b"h")  # hidden by /bad/server//trusted./
    with served(tmp_path, "--xattrmap", RULES) as (front, share, _):  # no --xattr needed
        init(front)
        nodeid, _ = lookup(front, 1, "f")
        assert setxattr(front, nodeid, b"trusted.t", b"v") == 0
        assert os.getxattr(f, "user.virtiofs.trusted.t") == b"v"
        assert getxattr(front, nodeid, b"trusted.t") == (0, b"v")
        assert getxattr(front, nodeid, b"user.plain") == (0, b"p")
        # the prefixed names are not reachable directly: EPERM, and ENODATA for GETXATTR
        assert setxattr(front, nodeid, b"user.virtiofs.x", b"v") == -errno.EPERM
        assert getxattr(front, nodeid, b"user.virtiofs.trusted.t")[0] == -errno.ENODATA
        assert setxattr(front, nodeid, b"security.evil", b"v") == -errno.EOPNOTSUPP
        # LISTXATTR: prefix stripped, host-side trusted.* hidden
        assert listxattr(front, nodeid) == (0, [b"trusted.t", b"user.plain"])
        # the size probe answers the size of the mapped list
        err, payload = front.fuse(fuse.Opcode.LISTXATTR, nodeid, fuse.GETXATTR_IN.pack(0, 0))
        assert err == 0 and fuse.GETXATTR_OUT.unpack(payload)[0] == len(b"trusted.t\0user.plain\0")
        err, _ = front.fuse(fuse.Opcode.REMOVEXATTR, nodeid, b"trusted.t\0")
        assert err == 0
        assert "user.virtiofs.trusted.t" not in os.listxattr(f)
        assert front.fuse(fuse.Opcode.REMOVEXATTR, nodeid, b"user.virtiofs.trusted.t\0")[0] == (
            -errno.EPERM)


def test_map_shorthand_and_acl_names(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    f = share / "f"
    f.write_text("x")
    os.setxattr(f, "user.unmapped", b"u")
    with served(tmp_path, "--xattrmap", ":map::user.virtiofs.:") as (front, share, _):
        init(front)
        nodeid, _ = lookup(front, 1, "f")
        assert setxattr(front, nodeid, b"trusted.a", b"1") == 0
        assert setxattr(front, nodeid, b"user.b", b"2") == 0
        assert sorted(os.listxattr(f)) == [
            "user.unmapped", "user.virtiofs.trusted.a", "user.virtiofs.user.b"]
        assert listxattr(front, nodeid) == (0, [b"trusted.a", b"user.b"])
        # without --posix-acl, ACL xattrs are not supported (virtiofsd's block_xattr)
        assert setxattr(front, nodeid, b"system.posix_acl_access", b"\2\0\0\0") == (
            -errno.EOPNOTSUPP)


def test_without_xattr_options_xattrs_are_enosys(tmp_path: Path) -> None:
    with served(tmp_path) as (front, share, _):
        init(front)
        assert getxattr(front, 1, b"user.x")[0] == -errno.ENOSYS


def test_parser_matches_the_documented_language() -> None:
    m = XattrMap(":prefix:all::user.virtiofs.::bad:all:::")
    assert [(r.type, r.scope, r.key, r.prepend) for r in m.rules] == [
        (b"prefix", 3, b"", b"user.virtiofs."), (b"bad", 3, b"", b"")]
    # map with a key expands to prefix + bad + ok
    m = XattrMap("/map/trusted./user.virtiofs./")
    assert [r.type for r in m.rules] == [b"prefix", b"bad", b"ok"]
    assert m.map_client(b"trusted.x") == b"user.virtiofs.trusted.x"
    assert m.map_client(b"user.x") == b"user.x"
    assert m.map_server_list([b"user.virtiofs.trusted.x", b"trusted.y", b"user.z"]) == [
        b"trusted.x", b"user.z"]
    # "bad all security. security." blocks both ways
    m = XattrMap("/bad/all/security./security./ /ok/all///")
    with pytest.raises(OSError) as e:
        m.map_client(b"security.selinux")
    assert e.value.errno == errno.EPERM
    assert m.map_server_list([b"security.selinux", b"user.a"]) == [b"user.a"]
    # an unterminated map refuses what it does not cover
    m = XattrMap(":ok:client:user.::")
    with pytest.raises(OSError):
        m.map_client(b"trusted.x")
    for bad in (":prefix:client:a:", ":frob:all:::", ":ok:nowhere:::", ":map:a:b::ok:all:::",
                "   "):
        with pytest.raises(XattrMapError):
            XattrMap(bad)


def test_bad_rules_refused_at_start(tmp_path: Path) -> None:
    err = start_error(tmp_path, "--xattrmap", ":ok:nowhere:::")
    assert "--xattrmap" in err and "nowhere" in err
    err = start_error(tmp_path, "-o", "xattrmap=:map:a:b::ok:all:::")
    assert "--xattrmap" in err and "last rule" in err
