"""An open file the guest unlinked (its name now another file's) in the device state, as
virtiofsd 1.13 treats it: find-paths cannot find it again and must never take the name it
was looked up by (that is another file now: writes would destroy its data), so ``abort``
fails the check and ``guest-error`` answers EIO for its fhs while everything else works;
file-handles opens it by its handle (on one host the source still holds it open)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import msgpack
import pytest

from daemon.fs.migration import inode_records
from daemon.protocol import fuse
from tests.protocol.test_migration_state import (
    LOAD,
    SAVE,
    connect,
    daemon,
    read,
    stop_rings,
    transfer,
)
from tests.support.daemon import daemon_log

OLD = b"the unlinked file's bytes\n"
NEW = b"another file under the same name\n"


def open_by_name(fe, name: bytes) -> tuple[int, int]:  # noqa: ANN001 - a Frontend
    err, entry = fe.lookup(1, name)
    assert err == 0
    nodeid = fuse.ENTRY_HEAD.unpack_from(entry)[0]
    err, out = fe.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDWR, 0))
    assert err == 0
    return nodeid, fuse.OPEN_OUT.unpack_from(out)[0]


def write(fe, nodeid: int, fh: int, data: bytes) -> int:  # noqa: ANN001
    err, out = fe.fuse(fuse.Opcode.WRITE, nodeid, fuse.WRITE_IN.pack(fh, 0, len(data), 0, 0, 0, 0),
                       extra_readable=[data])
    return err if err else fuse.WRITE_OUT.unpack_from(out)[0]


@pytest.mark.parametrize("policy", ["abort", "guest-error"])
@pytest.mark.parametrize("mode", ["find-paths", "file-handles"])
def test_unlinked_open_file(tmp_path: Path, mode: str, policy: str) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "victim").write_bytes(OLD)
    (share / "kept").write_bytes(b"kept\n")
    opts = ("--migration-mode", mode, "--migration-on-error", policy)
    with daemon(share, tmp_path / "a.sock", *opts):
        fe = connect(tmp_path / "a.sock", 2)
        fe.init()
        victim, fh = open_by_name(fe, b"victim")
        kept, kept_fh = open_by_name(fe, b"kept")
        err, _ = fe.fuse(fuse.Opcode.UNLINK, 1, b"victim\0")  # rm while open
        assert err == 0
        (share / "victim").write_bytes(NEW)  # the name is another file's now
        stop_rings(fe)
        result, blob = transfer(fe, SAVE)
        assert result == 0
        record = next(r for r in inode_records(msgpack.unpackb(blob))
                      if r["nodeid"] == victim)
        assert record["path"] is None
        if mode == "find-paths":
            assert record["unlinked"] is True
        # the source stays up (holding the file open) while the destination loads, as it
        # does until QEMU's migration completes
        with daemon(share, tmp_path / "b.sock", *opts) as dst:
            fe2 = connect(tmp_path / "b.sock", 0)
            result, _ = transfer(fe2, LOAD, blob)
            if mode == "find-paths" and policy == "abort":
                assert result != 0
                assert "unlinked on the source" in daemon_log(dst)
                fe2.close()
                fe.close()
                return
            assert result == 0, daemon_log(dst)
            fe2.add_ring(0)
            fe2.add_ring(1)
            if mode == "find-paths":
                assert read(fe2, victim, fh, 100)[0] == -errno.EIO
                assert write(fe2, victim, fh, b"X") == -errno.EIO
                err, _ = fe2.fuse(fuse.Opcode.FSYNC, victim, fuse.FSYNC_IN.pack(fh, 0, 0))
                assert err == -errno.EIO
                err, _ = fe2.fuse(fuse.Opcode.GETATTR, victim, fuse.GETATTR_IN.pack(0, 0, 0))
                assert err == -errno.EIO  # virtiofsd's invalid inode
            else:
                assert read(fe2, victim, fh, 100) == (0, OLD)
                assert write(fe2, victim, fh, b"X") == 1
                assert read(fe2, victim, fh, 100) == (0, b"X" + OLD[1:])
            # never the other file under its old name
            assert (share / "victim").read_bytes() == NEW
            # everything else works, and the fh can be released
            assert read(fe2, kept, kept_fh, 100) == (0, b"kept\n")
            err, entry = fe2.lookup(1, b"victim")
            assert err == 0 and fuse.ENTRY_HEAD.unpack_from(entry)[0] != victim
            err, _ = fe2.fuse(fuse.Opcode.RELEASE, victim, fuse.RELEASE_IN.pack(fh, 0, 0, 0))
            assert err == 0
            assert read(fe2, victim, fh, 100)[0] == -errno.EBADF
            fe2.close()
        fe.close()
