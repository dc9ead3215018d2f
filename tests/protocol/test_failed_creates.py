"""Requests that create must leave nothing behind when a step after the host's create fails,
and OPEN must never create.

With a full inode table (a small ``--inode-table-size``) CREATE, MKDIR, MKNOD, SYMLINK
and TMPFILE answer ENFILE and the directory holds what it held before (a CREATE without
O_EXCL of a file that existed leaves that file, contents included); with a full open-file
table CREATE answers EMFILE, likewise. OPEN with O_TMPFILE is refused (it would make a
file as the daemon: root, mode 0777), and TMPFILE makes the caller's file with the
caller's mode, as CREATE does."""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.protocol import fuse
from tests.protocol.test_hostile_guest import KNOWN, Served, serve

E = errno
TABLE = 16  # the smallest table the daemon accepts
OLD = b"existing, must stay as it is\n"


def fill(srv: Served, share: Path) -> None:
    """LOOKUP new files until the inode table is full (KNOWN is in it already)."""
    for i in range(TABLE + 4):
        (share / f"f{i}").write_bytes(b"x")
    for i in range(TABLE + 4):
        error, _, _ = srv.lookup(fuse.ROOT_ID, f"f{i}".encode())
        if error == -E.ENFILE:
            return
        assert error == 0
    pytest.fail("the inode table never filled up")


@pytest.fixture
def full(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path, "--inode-table-size", str(TABLE)) as srv:
        (srv.share / "existing").write_bytes(OLD)
        assert srv.lookup(fuse.ROOT_ID, KNOWN)[0] == 0  # in the table: the checks need it
        fill(srv, srv.share)
        yield srv


def create(name: bytes, flags: int = os.O_RDWR, mode: int = 0o644, umask: int = 0) -> bytes:
    return fuse.CREATE_IN.pack(flags, mode, umask, 0) + name + b"\0"


CREATES = {
    "create": (fuse.Opcode.CREATE, create(b"new")),
    "create_excl": (fuse.Opcode.CREATE, create(b"new", os.O_RDWR | os.O_EXCL)),
    "create_trunc": (fuse.Opcode.CREATE, create(b"new", os.O_WRONLY | os.O_TRUNC)),
    "mkdir": (fuse.Opcode.MKDIR, fuse.MKDIR_IN.pack(0o755, 0) + b"new\0"),
    "mknod_file": (fuse.Opcode.MKNOD, fuse.MKNOD_IN.pack(stat.S_IFREG | 0o644, 0, 0, 0)
                   + b"new\0"),
    "mknod_fifo": (fuse.Opcode.MKNOD, fuse.MKNOD_IN.pack(stat.S_IFIFO | 0o644, 0, 0, 0)
                   + b"new\0"),
    "symlink": (fuse.Opcode.SYMLINK, b"new\0target\0"),
    "tmpfile": (fuse.Opcode.TMPFILE, create(b"new")),
    # a name that exists: it is opened, never made; it stays as it was
    "create_existing": (fuse.Opcode.CREATE, create(b"existing", os.O_WRONLY | os.O_TRUNC)),
}


@pytest.mark.parametrize("case", sorted(CREATES))
def test_full_inode_table_leaves_nothing_behind(full: Served, case: str) -> None:
    opcode, arg = CREATES[case]
    before = sorted(os.listdir(full.share))
    for q in (1, 2):  # twice, on two workers: nothing left over from the first either
        error, _ = full.call(opcode, fuse.ROOT_ID, arg, q=q)
        assert error == -E.ENFILE, f"{case}: {error}"
        assert sorted(os.listdir(full.share)) == before, f"{case} left a new entry"
        assert (full.share / "existing").read_bytes() == OLD
    full.assert_alive(queues=(1, 2))


@pytest.fixture
def few_handles(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path, "--handle-table-size", str(TABLE)) as srv:
        (srv.share / "existing").write_bytes(OLD)
        error, nodeid, _ = srv.lookup(fuse.ROOT_ID, KNOWN)
        for _ in range(TABLE + 1):
            error, _fh = srv.open(nodeid)
            if error:
                break
        assert error == -E.EMFILE
        yield srv


@pytest.mark.parametrize("case", ["create", "create_excl", "tmpfile", "create_existing"])
def test_full_handle_table_leaves_nothing_behind(few_handles: Served, case: str) -> None:
    opcode, arg = CREATES[case]
    if case == "create_existing":
        # (with O_TRUNC the file is truncated by the open before its handle is refused,
        # as OPEN with O_TRUNC does, and virtiofsd)
        arg = create(b"existing", os.O_WRONLY)
    before = sorted(os.listdir(few_handles.share))
    error, _ = few_handles.call(opcode, fuse.ROOT_ID, arg)
    assert error == -E.EMFILE, f"{case}: {error}"
    assert sorted(os.listdir(few_handles.share)) == before, f"{case} left a new entry"
    assert (few_handles.share / "existing").read_bytes() == OLD


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path) as srv:
        yield srv


def tmpfiles(share: Path, pids: list[int]) -> list[tuple[int, int, int]]:
    """(uid, gid, mode) of the unnamed files the daemon holds open in the share."""
    out = []
    for fd in os.listdir(f"/proc/{pids[0]}/fd"):
        link = f"/proc/{pids[0]}/fd/{fd}"
        try:
            target = os.readlink(link)
            st = os.stat(link)
        except OSError:
            continue
        if target.startswith(f"{share}/#"):  # "<dir>/#<ino> (deleted)"
            out.append((st.st_uid, st.st_gid, st.st_mode))
    return out


@pytest.mark.parametrize("flags", [os.O_TMPFILE | os.O_RDWR, os.O_TMPFILE | os.O_WRONLY,
                                   os.O_TMPFILE | os.O_RDWR | os.O_CREAT | os.O_EXCL],
                         ids=["rdwr", "wronly", "creat_excl"])
def test_open_never_creates(fresh: Served, flags: int) -> None:
    """OPEN of a directory with O_TMPFILE would make an unnamed file as the daemon (root,
    mode 0777, whatever the caller): EINVAL, and no file."""
    error, fh = fresh.open(fuse.ROOT_ID, flags)
    made = tmpfiles(fresh.share, [fresh.proc.pid])
    assert error == -E.EINVAL and fh == 0, f"OPEN {flags:#o}: {error}, files held: {made}"
    assert made == []
    fresh.assert_alive()


def test_open_strips_creat_and_excl(fresh: Served) -> None:
    """O_CREAT and O_EXCL mean nothing to OPEN of an inode that exists (the guest kernel
    strips them): the file is opened, not made again nor refused."""
    error, nodeid, _ = fresh.lookup(fuse.ROOT_ID, KNOWN)
    error, fh = fresh.open(nodeid, os.O_RDONLY | os.O_CREAT | os.O_EXCL)
    assert error == 0 and fh
    fresh.release(nodeid, fh)
    fresh.forget(nodeid)


@pytest.mark.parametrize("caller", [(0, 0), (1000, 1000), (1234, 5678)])
def test_tmpfile_is_the_callers(fresh: Served, caller: tuple[int, int]) -> None:
    """TMPFILE makes the file as the caller (fsuid/fsgid) with the guest's mode, as
    CREATE does: both answer the same owner and mode, and the host file has them."""
    uid, gid = caller
    os.chmod(fresh.share, 0o777)
    error, made = fresh.call(fuse.Opcode.CREATE, fuse.ROOT_ID, create(b"c", os.O_RDWR, 0o640),
                             uid=uid, gid=gid)
    assert error == 0, f"CREATE: {error}"
    st = (fresh.share / "c").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o640)
    error, tmp = fresh.call(fuse.Opcode.TMPFILE, fuse.ROOT_ID,
                            create(b"t", os.O_RDWR, 0o640), uid=uid, gid=gid)
    assert error == 0, f"TMPFILE: {error}"
    for payload in (made, tmp):
        attr = fuse.ATTR.unpack_from(payload, fuse.ENTRY_HEAD.size)
        assert (attr[11], attr[12], attr[9]) == (uid, gid, stat.S_IFREG | 0o640)
    assert set(tmpfiles(fresh.share, [fresh.proc.pid])) == {(uid, gid, stat.S_IFREG | 0o640)}
    nodeid = struct.unpack_from("<Q", tmp)[0]
    error, attr = fresh.call(fuse.Opcode.GETATTR, nodeid, bytes(16))
    assert error == 0
    assert fuse.ATTR.unpack_from(attr, fuse.ATTR_OUT_HEAD.size)[11] == uid
    fresh.assert_alive()
