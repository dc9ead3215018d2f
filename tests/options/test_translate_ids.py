"""--translate-uid / --translate-gid: guest ids in requests become host ids (creation
credentials, chown), host ids in replies become guest ids (entry, attr, READDIRPLUS);
forbid-guest ids are refused with EPERM; the options conflict with --posix-acl."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from daemon.fs.idmap import IdMap, IdMapError, parse_rule
from daemon.protocol import fuse
from tests.options.helpers import (
    attr_reply,
    chown,
    entry,
    init,
    lookup,
    mkdir_arg,
    request,
    served,
    setattr_arg,
    start_error,
)


def test_map_translates_requests_and_replies(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir(mode=0o777)
    share.chmod(0o777)
    (share / "owned").write_text("x")
    chown(share / "owned", 2003, 3004)
    (share / "other").write_text("y")
    chown(share / "other", 7, 8)  # outside every range: passes unchanged
    with served(tmp_path, "--translate-uid", "map:1000:2000:10",
                "--translate-gid", "map:100:3000:10") as (front, share, _):
        assert init(front)[0] == 0
        _, attr = lookup(front, 1, "owned")
        assert (attr.uid, attr.gid) == (1003, 104)
        nodeid, attr = lookup(front, 1, "other")
        assert (attr.uid, attr.gid) == (7, 8)
        # GETATTR
        err, payload = front.fuse(fuse.Opcode.GETATTR, nodeid, fuse.GETATTR_IN.pack(0, 0, 0))
        assert err == 0 and (attr_reply(payload).uid, attr_reply(payload).gid) == (7, 8)
        # a guest caller 1001/101 creates: the host owner is 2001/3001, the guest sees its ids
        err, payload = request(front, fuse.Opcode.MKDIR, 1, mkdir_arg("d"), uid=1001, gid=101)
        assert err == 0
        dnode, attr = entry(payload)
        assert (attr.uid, attr.gid) == (1001, 101)
        st = os.stat(share / "d")
        assert (st.st_uid, st.st_gid) == (2001, 3001)
        # chown in the guest to 1005:105 -> host 2005:3005
        err, payload = front.fuse(fuse.Opcode.SETATTR, dnode, setattr_arg(
            fuse.FATTR_UID | fuse.FATTR_GID, uid=1005, gid=105))
        assert err == 0
        assert (attr_reply(payload).uid, attr_reply(payload).gid) == (1005, 105)
        st = os.stat(share / "d")
        assert (st.st_uid, st.st_gid) == (2005, 3005)
        # READDIRPLUS carries guest ids too
        err, opened = front.fuse(fuse.Opcode.OPENDIR, 1, fuse.OPEN_IN.pack(0, 0))
        fh = struct.unpack_from("<Q", opened)[0]
        err, data = front.fuse(fuse.Opcode.READDIRPLUS, 1,
                               fuse.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
        assert err == 0
        seen = {}
        pos = 0
        while pos < len(data):
            _nodeid, attr = entry(data[pos:])
            _ino, _off, namelen, _type = fuse.DIRENT_HEAD.unpack_from(
                data, pos + fuse.ENTRY_OUT_SIZE)
            start = pos + fuse.ENTRY_OUT_SIZE + fuse.DIRENT_HEAD.size
            seen[data[start : start + namelen].decode()] = (attr.uid, attr.gid)
            pos += fuse.direntplus_size(namelen)
        assert seen["owned"] == (1003, 104)
        assert seen["d"] == (1005, 105)
        assert seen["other"] == (7, 8)


def test_one_way_squash_and_forbid(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    share.chmod(0o777)
    (share / "nobodys").write_text("x")
    chown(share / "nobodys", 6123, 6123)
    with served(tmp_path,
                "--translate-uid", "squash-guest:0:5000:1000",  # guest 0..999 -> host 5000
                "--translate-uid", "forbid-guest:4000:10",
                "--translate-uid", "squash-host:6000:65534:1000",  # host 6000.. -> 65534
                "--translate-gid", "guest:50:5050:10",  # guest -> host only
                ) as (front, share, _):
        assert init(front)[0] == 0
        _, attr = lookup(front, 1, "nobodys")
        assert (attr.uid, attr.gid) == (65534, 6123)
        err, payload = request(front, fuse.Opcode.MKDIR, 1, mkdir_arg("sq"), uid=7, gid=51)
        assert err == 0
        st = os.stat(share / "sq")
        assert (st.st_uid, st.st_gid) == (5000, 5051)
        # no host->guest rule for 5000/5051: the guest sees the host ids
        _, attr = entry(payload)
        assert (attr.uid, attr.gid) == (5000, 5051)
        # forbidden guest ids: as creator and as new owner
        err, _ = request(front, fuse.Opcode.MKDIR, 1, mkdir_arg("no"), uid=4005, gid=0)
        assert err == -errno.EPERM
        assert not (share / "no").exists()
        nodeid, _ = lookup(front, 1, "sq")
        err, _ = front.fuse(fuse.Opcode.SETATTR, nodeid,
                            setattr_arg(fuse.FATTR_UID, uid=4009))
        assert err == -errno.EPERM
        assert os.stat(share / "sq").st_uid == 5000


def test_rule_syntax_like_virtiofsd() -> None:
    assert str(parse_rule("map:1:2:3")) == "map:1:2:3"
    assert parse_rule("MAP/1/2/3").values == (1, 2, 3)  # any separator, type case-folded
    assert parse_rule("forbid-guest:9:1").values == (9, 1)
    for bad in ("bogus:1:2:3", "map:1:2", "map:1:2:3:4", "forbid-guest:1:2:3", "map:a:2:3",
                "map:-1:2:3", "map:1:2:4294967296", "map"):
        with pytest.raises(IdMapError):
            parse_rule(bad)
    with pytest.raises(IdMapError, match="intersects"):
        IdMap.parse("uid", ["guest:0:100:10", "squash-guest:5:7:10"])
    with pytest.raises(IdMapError, match="overflows"):
        IdMap.parse("uid", ["guest:4294967290:0:10"])
    # the two directions are independent: host->guest may reuse guest->host's range
    m = IdMap.parse("uid", ["guest:0:100:10", "host:0:100:10"])
    assert (m.guest_to_host(3), m.host_to_guest(3)) == (103, 103)


def test_errors_at_start_name_the_options(tmp_path: Path) -> None:
    err = start_error(tmp_path, "--translate-uid", "map:0:1000:1", "--posix-acl")
    assert "--translate-uid" in err and "--posix-acl" in err
    err = start_error(tmp_path, "--translate-gid", "map:0:1000:1", "--posix-acl")
    assert "--translate-gid" in err and "--posix-acl" in err
    err = start_error(tmp_path, "--translate-uid", "sideways:0:1:1")
    assert "--translate-uid" in err and "sideways" in err
    err = start_error(tmp_path, "--translate-gid", "map:0:1:1", "--translate-gid", "guest:0:5:1")
    assert "--translate-gid" in err and "intersects" in err
