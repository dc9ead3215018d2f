"""--security-label: INIT fails with EPROTO unless the guest offers FUSE_SECURITY_CTX;
with it, the label the guest kernel sends as a request extension with a create is set on
the new node (under its --xattrmap name), and a malformed extension creates nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.fs.passthrough import Config, PassthroughFs, Request
from daemon.fs.xattrmap import XattrMap
from daemon.protocol import fuse
from daemon.protocol.fuse import FuseError
from shm_table import HandleTable, InodeTable
from tests.options.helpers import BASE_FLAGS, init, served

LABEL = b"system_u:object_r:container_file_t:s0\0"


def secctx_ext(name: bytes, value: bytes, nr: int = 1) -> bytes:
    """The extension as the guest kernel builds it (fs/fuse/dir.c get_security_context):
    fuse_secctx_header {size, nr_secctx}, fuse_secctx {size, padding}, name, value."""
    body = struct.pack("<II", len(value), 0) + name + b"\0" + value if nr else b""
    size = (8 + len(body) + 7) & ~7
    return (struct.pack("<II", size, nr) + body).ljust(size, b"\0")


def test_init_needs_security_ctx(tmp_path: Path) -> None:
    with served(tmp_path, "--security-label") as (front, _share, _):
        assert init(front, BASE_FLAGS) == (-errno.EPROTO, 0)
        err, agreed = init(front, BASE_FLAGS | fuse.SECURITY_CTX)
        assert err == 0 and agreed & fuse.SECURITY_CTX
    with served(tmp_path) as (front, _share, _):
        err, agreed = init(front, BASE_FLAGS | fuse.SECURITY_CTX)
        assert err == 0 and not agreed & fuse.SECURITY_CTX


@contextlib.contextmanager
def filesystem(share: Path, config: Config) -> Iterator[PassthroughFs]:
    """The file system object in this process (the worker's view), without rings, so each
    malformed extension can be tried on its own."""
    name = f"/pyvfs-test-{uuid.uuid4().hex[:12]}"
    inodes = InodeTable.create(name + "-i", 64)
    handles = HandleTable.create(name + "-h", 64)
    try:
        fs = PassthroughFs(str(share), inodes, handles, config)
        fs.add_root()
        flags = BASE_FLAGS | fuse.SECURITY_CTX
        fs.op_init(Request(fuse.Opcode.INIT, 1, 0, 0, 0, 0, fuse.INIT_IN.pack(
            7, 38, 0, flags & 0xFFFFFFFF, flags >> 32) + bytes(44)))
        yield fs
    finally:
        inodes.unlink()
        handles.unlink()


def test_label_set_at_creation(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    # security.selinux needs an SELinux host; --xattrmap stores it as a user xattr
    config = Config(security_label=True, xattrmap=XattrMap(":map::user.virtiofs.:"))
    stored = "user.virtiofs.security.selinux"
    ext = secctx_ext(b"security.selinux", LABEL)
    with filesystem(share, config) as fs:
        def req(opcode: int, arg: bytes, ext: bytes | None = ext) -> Request:
            return Request(opcode, 2, 1, 0, 0, 1, arg, ext=ext)

        fs.op_mkdir(req(fuse.Opcode.MKDIR, fuse.MKDIR_IN.pack(0o755, 0) + b"d\0"))
        assert os.getxattr(share / "d", stored) == LABEL
        out = fs.op_create(req(fuse.Opcode.CREATE, fuse.CREATE_IN.pack(
            os.O_WRONLY, 0o644, 0, 0) + b"f\0"))
        assert os.getxattr(share / "f", stored) == LABEL
        fh = fuse.OPEN_OUT.unpack_from(out, fuse.ENTRY_OUT_SIZE)[0]
        fs.op_release(req(fuse.Opcode.RELEASE, fuse.RELEASE_IN.pack(fh, 0, 0, 0)))
        fs.op_mknod(req(fuse.Opcode.MKNOD, fuse.MKNOD_IN.pack(0o100644, 0, 0, 0) + b"p\0"))
        assert os.getxattr(share / "p", stored) == LABEL
        # nr_secctx 0: no LSM labelled it, nothing is set
        fs.op_mkdir(req(fuse.Opcode.MKDIR, fuse.MKDIR_IN.pack(0o755, 0) + b"n\0",
                        secctx_ext(b"", b"", nr=0)))
        assert stored not in os.listxattr(share / "n")
        # malformed or missing extensions: EINVAL and nothing created
        for bad in (b"", secctx_ext(b"security.selinux", LABEL, nr=2),
                    struct.pack("<II", 64, 1) + bytes(8)):
            with pytest.raises(FuseError) as e:
                fs.op_mkdir(req(fuse.Opcode.MKDIR, fuse.MKDIR_IN.pack(0o755, 0) + b"x\0", bad))
            assert e.value.errno == errno.EINVAL
            assert not (share / "x").exists()
        # a name the map refuses: the new node is removed again
        refusing = XattrMap("/bad/client/security.// /ok/all///")
        fs.config.xattrmap = refusing
        with pytest.raises(OSError) as e2:
            fs.op_mkdir(req(fuse.Opcode.MKDIR, fuse.MKDIR_IN.pack(0o755, 0) + b"y\0"))
        assert e2.value.errno == errno.EPERM
        assert not (share / "y").exists()


def test_label_through_the_ring(tmp_path: Path) -> None:
    """The worker hands the request's extensions (total_extlen) to the file system."""
    ext = secctx_ext(b"security.selinux", LABEL)
    with served(tmp_path, "--security-label", "--xattrmap", ":map::user.virtiofs.:") as (
            front, share, _):
        err, agreed = init(front, BASE_FLAGS | fuse.SECURITY_CTX)
        assert err == 0 and agreed & fuse.SECURITY_CTX
        arg = fuse.MKDIR_IN.pack(0o755, 0) + b"labelled\0"
        arg = arg.ljust((len(arg) + 7) & ~7, b"\0")
        front.unique += 1
        length = fuse.IN_HEADER_SIZE + len(arg) + len(ext)
        header = fuse.IN_HEADER.pack(length, fuse.Opcode.MKDIR, front.unique, 1, 0, 0, 1,
                                     len(ext) // 8, 0)
        bufs = front.make_buffers([header, arg, ext], [4096])
        head = front.submit_descs(1, bufs)
        got, written = front.wait_used(1)
        assert got == head
        _, error, _ = fuse.OUT_HEADER.unpack(front.read_gpa(bufs[-1][0], 16))
        assert error == 0 and written == 16 + fuse.ENTRY_OUT_SIZE
    assert os.getxattr(share / "labelled", "user.virtiofs.security.selinux") == LABEL
