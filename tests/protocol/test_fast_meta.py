"""GETATTR, LOOKUP and FORGET through a real ring: the daemon answers them in C
(daemon/native/fuse_ops.c) by default, in Python with --c-fast-path off. The guest must
not be able to tell: the same requests, hostile ones included, get byte-identical
replies from both, and references taken in C are given back by FORGET."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
from pathlib import Path

import pytest

from daemon.protocol import fuse
from shm_table import InodeTable
from tests.support.daemon import pyvirtiofsd
from tests.support.frontend import Frontend

L, G, F = fuse.Opcode.LOOKUP, fuse.Opcode.GETATTR, fuse.Opcode.FORGET


def make_share(root: Path) -> tuple[Path, bool]:
    share = root / "share"
    share.mkdir()
    (share / "file").write_bytes(b"x" * 12345)
    (share / "dir").mkdir()
    (share / "dir" / "inner").write_text("inner")
    os.symlink("dangling", share / "link")
    (share / ("n" * 255)).write_text("long name")
    (share / "mnt").mkdir()
    (share / "scratch").mkdir()  # changed by the conversation
    os.chmod(share / "scratch", 0o777)  # a caller other than root creates in it
    (share / "listing").mkdir()  # its atime changes when it is read
    for i in range(40):
        (share / "listing" / f"{i:02d}{'_' * i}").write_text(str(i))
    os.symlink("nowhere", share / "listing" / "link")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "none", str(share / "mnt")],
                             capture_output=True).returncode == 0
    return share, mounted


def without_times(entry_and_open: bytes) -> bytes:
    """A CREATE reply without the new file's ino and times."""
    b = bytearray(entry_and_open)
    b[40:48] = bytes(8)
    b[64:100] = bytes(36)
    return bytes(b)


SHARES: dict[int, Path] = {}


def share_of(front: Frontend) -> Path:
    return SHARES[id(front)]


def script(front: Frontend) -> list[tuple[str, int, bytes]]:
    """The same conversation with either daemon: (what, errno, payload) per request."""
    out: list[tuple[str, int, bytes]] = []

    def req(what: str, opcode: int, nodeid: int, arg: bytes = b"", exact: bool = True,
            **kw: object) -> bytes:
        """exact=False: the payload carries times the first daemon's run changed"""
        err, payload = front.fuse(opcode, nodeid, arg, **kw)  # type: ignore[arg-type]
        out.append((what, err, payload if exact else b"(not compared)"))
        return payload

    ids = {}
    for name in (b"file", b"dir", b"link", b"n" * 255, b"mnt"):
        ids[name] = struct.unpack_from("<Q", req(f"lookup {name[:8]!r}", L, 1,
                                                 name + b"\0"))[0]
        req(f"lookup again {name[:8]!r}", L, 1, name + b"\0", q=2)
    ids[b"inner"] = struct.unpack_from("<Q", req("lookup inner", L, ids[b"dir"],
                                                 b"inner\0"))[0]
    for name, nodeid in [(b"root", 1), *ids.items()]:
        req(f"getattr {name[:8]!r}", G, nodeid)
        req(f"getattr fh {name[:8]!r}", G, nodeid, fuse.GETATTR_IN.pack(1, 0, 77), q=2)
        req(f"getattr no args {name[:8]!r}", G, nodeid, indirect=True)
    # hostile or failing: Python's errno either way
    for what, nodeid, arg in [
        ("no name", 1, b""),
        ("unterminated", 1, b"file"),
        ("empty", 1, b"\0"),
        ("dot", 1, b".\0"),
        ("dotdot", 1, b"..\0"),
        ("dotdot in dir", ids[b"dir"], b"..\0"),
        ("slash", 1, b"dir/inner\0"),
        ("256 bytes", 1, b"n" * 256 + b"\0"),
        ("missing", 1, b"missing\0"),
        ("under a file", ids[b"file"], b"x\0"),
        ("forged parent", 987654, b"file\0"),
        ("nodeid 0", 0, b"file\0"),
    ]:
        req(f"lookup {what}", L, nodeid, arg)
    req("lookup, reply does not fit", L, 1, b"file\0", out_size=100)
    req("getattr, reply does not fit", G, 1, out_size=64)
    req("getattr forged", G, 1 << 50)
    req("getattr nodeid 0", G, 0)
    # RELEASE and UNLINK (C), OPEN and CREATE (Python)
    opened = req("open file", fuse.Opcode.OPEN, ids[b"file"], fuse.OPEN_IN.pack(0, 0))
    fh = struct.unpack_from("<Q", opened)[0]
    req("release", fuse.Opcode.RELEASE, ids[b"file"], fuse.RELEASE_IN.pack(fh, 0, 0, 0))
    req("release again", fuse.Opcode.RELEASE, ids[b"file"], fuse.RELEASE_IN.pack(fh, 0, 0, 0))
    req("release forged", fuse.Opcode.RELEASE, ids[b"file"], fuse.RELEASE_IN.pack(1, 0, 0, 0))
    scratch = struct.unpack_from("<Q", req("lookup scratch", L, 1, b"scratch\0",
                                           exact=False))[0]
    # CREATE (C for a new name; Python for the rest): the reply compared without the
    # new file's ino and times
    created = req("create", fuse.Opcode.CREATE, scratch,
                  fuse.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + b"new\0",
                  exact=False)
    out[-1] = (out[-1][0], out[-1][1], without_times(created))
    created_id = struct.unpack_from("<Q", created)[0]
    owned = req("create as 1234", fuse.Opcode.CREATE, scratch,
                fuse.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, 0o22, 0)
                + b"owned\0", exact=False, uid=1234, gid=1234)
    out[-1] = (out[-1][0], out[-1][1], without_times(owned))
    excl = fuse.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, 0, 0)
    plain = fuse.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT, 0o644, 0, 0)
    for what, nodeid, arg, kw in [
        ("create exists, O_EXCL", scratch, excl + b"new\0", {}),
        ("create dotdot", scratch, plain + b"..\0", {}),
        ("create slash", scratch, plain + b"a/b\0", {}),
        ("create 256 bytes", scratch, plain + b"n" * 256 + b"\0", {}),
        ("create unterminated", scratch, plain + b"x", {}),
        ("create short", scratch, plain[:8], {}),
        ("create forged parent", 987654, plain + b"x\0", {}),
        ("create under a file", ids[b"file"], plain + b"x\0", {}),
        ("create, reply does not fit", scratch, plain + b"x\0", {"out_size": 100}),
    ]:
        req(what, fuse.Opcode.CREATE, nodeid, arg, **kw)
    for reply in (created, owned):
        req("release created", fuse.Opcode.RELEASE, 0, fuse.RELEASE_IN.pack(
            struct.unpack_from("<Q", reply, fuse.ENTRY_OUT_SIZE)[0], 0, 0, 0))
    st = os.stat(share_of(front) / "scratch" / "owned")
    out.append(("owner of owned", 0, struct.pack("<III", st.st_uid, st.st_gid, st.st_mode)))
    req("unlink owned", fuse.Opcode.UNLINK, scratch, b"owned\0")
    req("forget created", F, created_id, fuse.FORGET_IN.pack(1), out_size=0)
    req("forget owned", F, struct.unpack_from("<Q", owned)[0], fuse.FORGET_IN.pack(1),
        out_size=0)
    for what, nodeid, arg in [
        ("unlink", scratch, b"new\0"),
        ("unlink again", scratch, b"new\0"),
        ("unlink a directory", 1, b"dir\0"),
        ("unlink dotdot", ids[b"dir"], b"..\0"),
        ("unlink unterminated", ids[b"dir"], b"inner"),
        ("unlink forged parent", 55555, b"inner\0"),
    ]:
        req(what, fuse.Opcode.UNLINK, nodeid, arg)
    # READDIRPLUS (C) over a directory, in pieces; OPENDIR (Python), RELEASEDIR (C)
    listing = struct.unpack_from("<Q", req("lookup listing", L, 1, b"listing\0",
                                           exact=False))[0]
    fh = struct.unpack_from("<Q", req("opendir", fuse.Opcode.OPENDIR, listing,
                                      fuse.OPEN_IN.pack(0, 0)))[0]
    offset = 0
    for size in (1024, 4096, 300, 4096, 65536, 4096):
        body = req(f"readdirplus {size} at {offset}", fuse.Opcode.READDIRPLUS, listing,
                   fuse.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), q=2)
        pos = 0
        while pos < len(body):
            _, offset, namelen, _ = fuse.DIRENT_HEAD.unpack_from(body, pos + 128)
            pos += fuse.direntplus_size(namelen)
    req("readdirplus, bad fh", fuse.Opcode.READDIRPLUS, listing,
        fuse.READ_IN.pack(fh ^ (1 << 40), 0, 4096, 0, 0, 0, 0))
    req("readdirplus, short", fuse.Opcode.READDIRPLUS, listing, bytes(16))
    req("releasedir", fuse.Opcode.RELEASEDIR, listing, fuse.RELEASE_IN.pack(fh, 0, 0, 0))
    return out


@pytest.mark.parametrize("handles", ["prefer", "never"])
@pytest.mark.parametrize("cache", ["auto", "always", "never"])
def test_c_answers_are_the_python_answers(tmp_path: Path, handles: str, cache: str) -> None:
    share, mounted = make_share(tmp_path)
    try:
        answers = {}
        for path in ("on", "off"):  # off: every request goes through Python
            sock = tmp_path / f"{path}.sock"
            with pyvirtiofsd(share, sock, "--c-fast-path", path, "--cache", cache,
                             "--inode-file-handles", handles):
                front = Frontend(str(sock))
                front.setup(3)
                front.init()
                SHARES[id(front)] = share
                answers[path] = script(front)
                front.close()
        assert len(answers["on"]) == len(answers["off"])
        for fast, slow in zip(answers["on"], answers["off"], strict=True):
            assert fast == slow, fast[0]
        by_what = {what: err for what, err, _ in answers["on"]}
        assert by_what["lookup dotdot"] == -errno.EINVAL
        assert by_what["lookup 256 bytes"] == -errno.ENAMETOOLONG
        assert by_what["lookup forged parent"] == -errno.EBADF
        assert by_what["getattr, reply does not fit"] == -errno.ERANGE
        assert by_what["unlink"] == 0 and by_what["unlink again"] == -errno.ENOENT
        assert by_what["create"] == 0 and by_what["create as 1234"] == 0
        assert by_what["create exists, O_EXCL"] == -errno.EEXIST
        owner = [p for w, _, p in answers["on"] if w == "owner of owned"][0]
        assert struct.unpack("<III", owner) == (1234, 1234, 0o100640)
        assert by_what["unlink a directory"] == -errno.EISDIR
        assert by_what["readdirplus, bad fh"] == -errno.EBADF
        assert by_what["readdirplus, short"] == -errno.EINVAL
        listed = [p for w, _, p in answers["on"] if w.startswith("readdirplus ")]
        assert len([p for p in listed if p]) >= 3 and listed[-1] == b""  # all, then the end
        if mounted:
            attr_flags = [p for w, _, p in answers["on"] if w == "lookup b'mnt'"][0]
            assert struct.unpack_from("<I", attr_flags, len(attr_flags) - 4)[0] == \
                fuse.ATTR_SUBMOUNT
    finally:
        if mounted:
            subprocess.run(["umount", str(share / "mnt")], check=True)


@pytest.mark.parametrize("handles", ["prefer", "never"])
def test_lookups_in_c_are_forgotten(tmp_path: Path, handles: str) -> None:
    share, mounted = make_share(tmp_path)
    try:
        sock = tmp_path / "vfs.sock"
        with pyvirtiofsd(share, sock, "--inode-file-handles", handles) as proc:
            front = Frontend(str(sock))
            front.setup(3)
            front.init()
            # the socket appears before the tables are made; by now they are
            table = InodeTable.attach(f"/pyvirtiofsd-{proc.pid}-inodes")
            nodeids = set()
            for i in range(60):  # both request queues
                err, entry = front.lookup(1, b"file", q=1 + i % 2)
                assert err == 0
                nodeids.add(struct.unpack_from("<Q", entry)[0])
            (nodeid,) = nodeids
            assert table.lookups(nodeid) == 60
            for n in (25, 25, 9):  # on the high-priority queue
                front.fuse(F, nodeid, fuse.FORGET_IN.pack(n), q=0, out_size=0)
            assert table.lookups(nodeid) == 1
            # BATCH_FORGET: the last reference, and a forged nodeid
            batch = fuse.BATCH_FORGET_IN.pack(2, 0) + fuse.FORGET_ONE.pack(nodeid, 1) + \
                fuse.FORGET_ONE.pack(nodeid + 1000, 5)
            front.fuse(fuse.Opcode.BATCH_FORGET, 0, batch, q=0, out_size=0)
            assert table.get(nodeid) is None
            # looked up again: a new inode, answered and counted the same way
            err, entry = front.lookup(1, b"file", q=2)
            assert err == 0 and struct.unpack_from("<Q", entry)[0] > nodeid
            err, _ = front.fuse(G, struct.unpack_from("<Q", entry)[0], q=1)
            assert err == 0
            assert len(table) == 2
            table.check()
            table.detach()
            front.close()
    finally:
        if mounted:
            subprocess.run(["umount", str(share / "mnt")], check=True)


@pytest.mark.parametrize("handles", ["prefer", "never"])
def test_lookup_of_a_known_name_follows_the_host(tmp_path: Path, handles: str) -> None:
    """A LOOKUP of a name that already has an entry is answered without opening it (by
    file handle or by ids); it must still see what the host did to the name meanwhile."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "file").write_bytes(b"a" * 100)
    (share / "other").write_bytes(b"b" * 7)
    (share / "keep").write_bytes(b"k")
    sock = tmp_path / "vfs.sock"

    def entry(q: int, name: bytes = b"file") -> tuple[int, int, int, int]:
        err, out = front.lookup(1, name, q=q)
        assert err == 0
        nodeid = struct.unpack_from("<Q", out)[0]
        ino, size = struct.unpack_from("<QQ", out, 40)
        (mode,) = struct.unpack_from("<I", out, 100)
        return nodeid, ino, size, mode

    with pyvirtiofsd(share, sock, "--inode-file-handles", handles) as proc:
        front = Frontend(str(sock))
        front.setup(3)
        front.init()
        table = InodeTable.attach(f"/pyvirtiofsd-{proc.pid}-inodes")
        kept = entry(1, b"keep")
        first = entry(1)
        assert first[1:] == (os.lstat(share / "file").st_ino, 100, 0o100644)
        # changed in place on the host: the same inode, its new attributes, on both queues
        os.chmod(share / "file", 0o600)
        with open(share / "file", "ab") as f:
            f.write(b"c" * 23)
        for q in (1, 2, 1):
            assert entry(q) == (first[0], first[1], 123, 0o100600)
        assert table.lookups(first[0]) == 4
        # another file renamed over the name: another inode, not the known one
        os.replace(share / "other", share / "file")
        second = entry(2)
        assert second[0] != first[0]
        assert second[1:] == (os.lstat(share / "file").st_ino, 7, 0o100644)
        assert entry(1) == second
        # a symlink to a known file in its place: not followed, a third inode
        os.unlink(share / "file")
        os.symlink("keep", share / "file")
        third = entry(1)
        assert third[0] not in (first[0], second[0], kept[0])
        assert third[3] & 0o170000 == 0o120000
        assert table.lookups(first[0]) == 4 and table.lookups(second[0]) == 2
        table.check()
        table.detach()
        front.close()
