"""The C fast path for GETATTR, LOOKUP, FORGET and BATCH_FORGET (daemon/native/fuse_ops.c),
driven in-process with the context a queue worker builds: every answer it gives must be
byte-identical to the Python operation's, references it takes must be counted as Python
counts them, and everything malformed must be declined (0) without changing anything, so
Python answers it with its errno."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.fs import proc_fd
from daemon.fs.fd_cache import FdCache
from daemon.fs.passthrough import SESSION_FLAGS, Config, PassthroughFs, Request
from daemon.native._sys import ffi, lib
from daemon.protocol import fuse
from daemon.protocol.opcodes import BY_OPCODE
from shm_table import HandleTable, InodeTable
from tests.support.paused_open import paused_open
from workers.fast_path import FastPathContext

OUT = fuse.OUT_HEADER


class Fs:
    """A PassthroughFs on a fresh pair of tables, with the worker's fast-path context."""

    def __init__(self, share: Path, **config: object) -> None:
        name = f"/pyvfs-test-fast-{uuid.uuid4().hex[:12]}"
        self.inodes = InodeTable.create(name + "-i", 4096)
        self.handles = HandleTable.create(name + "-h", 256)
        self.fs = PassthroughFs(str(share), self.inodes, self.handles, Config(**config))
        self.fs.add_root()
        self.fast_path = FastPathContext(self.fs)  # keeps what the context points into
        self.ctx = self.fast_path.c
        self.unique = 100

    def close(self) -> None:
        self.fs.fd_cache.clear()
        for e in self.inodes.iter_entries():
            if e.fd >= 0:
                os.close(e.fd)
        os.close(self.fs.mount_fd)
        for t in (self.inodes, self.handles):
            t.detach()
            t.unlink()

    # ----- one request, either way -----------------------------------------------------

    def c(self, opcode: int, nodeid: int, arg: bytes = b"", *, out_size: int = 4096,
          split: int = 0, length: int | None = None, extlen: int = 0,
          readable: bytes | None = None, wr_split: int = 0, uid: int = 0,
          gid: int = 0) -> tuple[int, bytes]:
        """(handled, reply bytes) from pyvfs_fast. split > 0 cuts the request into
        pieces of that many bytes, one iovec each; wr_split the reply buffer."""
        self.unique += 1
        if readable is None:
            total = fuse.IN_HEADER_SIZE + len(arg) if length is None else length
            readable = fuse.IN_HEADER.pack(total, opcode, self.unique, nodeid, uid, gid, 1,
                                           extlen, 0) + arg
        step = split or max(len(readable), 1)
        pieces = [readable[i : i + step] for i in range(0, len(readable), step)] or [b""]
        bufs = [ffi.new("char[]", p or b"\0") for p in pieces]
        rd = ffi.new("pyvfs_iov_t[]", len(pieces))
        for i, (b, p) in enumerate(zip(bufs, pieces, strict=True)):
            rd[i].base = int(ffi.cast("uintptr_t", b))
            rd[i].len = len(p)
        out = ffi.new("char[]", max(out_size, 1))
        wstep = wr_split or max(out_size, 1)
        starts = list(range(0, out_size, wstep))
        wr = ffi.new("pyvfs_iov_t[]", max(len(starts), 1))
        for i, at in enumerate(starts):  # one buffer, cut into iovecs
            wr[i].base = int(ffi.cast("uintptr_t", out)) + at
            wr[i].len = min(wstep, out_size - at)
        written = ffi.new("uint32_t *")
        handled = lib.pyvfs_fast(rd, len(pieces), len(readable), wr, len(starts),
                                 out_size, self.ctx, written)
        return handled, ffi.buffer(out, written[0])[:] if handled else b""

    def py(self, opcode: int, nodeid: int, arg: bytes = b"",
           room: int = fuse.MAX_WRITE, uid: int = 0, gid: int = 0) -> bytes:
        """The Python operation's reply, as the worker would write it."""
        handler = getattr(self.fs, BY_OPCODE[opcode].handler)
        payload = handler(Request(opcode, self.unique, nodeid, uid, gid, 1, arg, room))
        if payload is None:
            return b""
        return OUT.pack(fuse.OUT_HEADER_SIZE + len(payload), 0, self.unique) + bytes(payload)

    def lookup_py(self, parent: int, name: bytes) -> int:
        return struct.unpack_from("<Q", self.py(fuse.Opcode.LOOKUP, parent, name + b"\0"),
                                  fuse.OUT_HEADER_SIZE)[0]


def make_share(root: Path) -> Path:
    share = root / "share"
    share.mkdir(parents=True)
    (share / "file").write_bytes(b"x" * 5000)
    (share / "dir").mkdir()
    (share / "dir" / "inner").write_text("inner")
    os.symlink("file", share / "link")
    os.mkfifo(share / "fifo")
    os.chmod(share / "file", 0o4755)
    return share


NAMES = [b"file", b"dir", b"link", b"fifo"]


@pytest.fixture(params=["prefer", "never"])
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fs]:
    f = Fs(make_share(tmp_path), file_handles=request.param)
    yield f
    f.close()


@pytest.mark.parametrize("cache", ["auto", "always", "never"])
def test_getattr_identical(tmp_path: Path, cache: str) -> None:
    for mode in ("prefer", "never"):
        f = Fs(make_share(tmp_path / mode), file_handles=mode, cache=cache)
        try:
            nodeids = [1] + [f.lookup_py(1, n) for n in NAMES] + [
                f.lookup_py(f.lookup_py(1, b"dir"), b"inner")]
            if mode == "prefer":
                f.fs.fd_cache.clear()  # the C path re-opens them by handle
            for nodeid in nodeids:
                refs = f.inodes.lookups(nodeid)
                for arg in (b"", fuse.GETATTR_IN.pack(0, 0, 0),
                            fuse.GETATTR_IN.pack(1, 0, 0xDEAD)):  # FUSE_GETATTR_FH: unused
                    handled, reply = f.c(fuse.Opcode.GETATTR, nodeid, arg, split=7)
                    assert handled == 1
                    assert reply == f.py(fuse.Opcode.GETATTR, nodeid, arg), (mode, nodeid)
                assert f.inodes.lookups(nodeid) == refs
            if mode == "prefer":
                assert f.fs.fd_cache.opened == len(nodeids) - 1  # all but the root
            f.inodes.check()
        finally:
            f.close()


def test_lookup_identical_and_counted(fs: Fs) -> None:
    dir_id = fs.lookup_py(1, b"dir")
    for parent, name in [(1, n) for n in NAMES] + [(dir_id, b"inner")]:
        nodeid = fs.lookup_py(parent, name)  # Python inserts it
        held = fs.inodes.lookups(nodeid)  # 2 for "dir": dir_id is held too
        for split in (0, 3, 41):  # name in one piece, cut across iovecs
            handled, reply = fs.c(fuse.Opcode.LOOKUP, parent, name + b"\0", split=split)
            assert handled == 1
            assert reply == fs.py(fuse.Opcode.LOOKUP, parent, name + b"\0")
        # + 3 C and 3 Python lookups: the guest holds 6 more references
        assert fs.inodes.lookups(nodeid) == held + 6
        for _ in range(3):  # FORGET in C, with the counts the guest sends
            handled, reply = fs.c(fuse.Opcode.FORGET, nodeid, fuse.FORGET_IN.pack(2),
                                  out_size=0)
            assert (handled, reply) == (1, b"")
        assert fs.inodes.lookups(nodeid) == held
        if nodeid == dir_id:
            continue
        assert fs.c(fuse.Opcode.FORGET, nodeid, fuse.FORGET_IN.pack(1), out_size=0)[0] == 1
        assert fs.inodes.get(nodeid) is None
        assert fs.fs.fd_cache.get(nodeid) == -1  # its cached fd went with it
    assert fs.inodes.lookups(dir_id) == 2
    fs.inodes.check()


def test_lookup_of_a_new_inode_inserts_it(fs: Fs) -> None:
    handled, reply = fs.c(fuse.Opcode.LOOKUP, 1, b"file\0")
    assert handled == 1
    nodeid = struct.unpack_from("<Q", reply, fuse.OUT_HEADER_SIZE)[0]
    assert fs.inodes.lookups(nodeid) == 1
    # what Python answers for the same inode now
    assert reply == fs.py(fuse.Opcode.LOOKUP, 1, b"file\0")
    entry = fs.inodes.get(nodeid)
    assert entry is not None and entry.parent == 1 and entry.name == b"file"
    assert (entry.fd < 0) == (fs.fs.config.file_handles == "prefer")
    # BATCH_FORGET in C: a count beyond the entries sent is clamped to them
    batch = fuse.BATCH_FORGET_IN.pack(5, 0) + fuse.FORGET_ONE.pack(nodeid, 2) + \
        fuse.FORGET_ONE.pack(1, 100) + fuse.FORGET_ONE.pack(999999, 1)
    assert fs.c(fuse.Opcode.BATCH_FORGET, 0, batch, out_size=0) == (1, b"")
    assert fs.inodes.get(nodeid) is None
    assert fs.inodes.lookups(1) >= 1  # the root is never forgotten
    fs.inodes.check()


def test_many_lookups_then_one_batch_forget(fs: Fs) -> None:
    ids = {}
    for i in range(100):
        name = NAMES[i % len(NAMES)]
        handled, reply = fs.c(fuse.Opcode.LOOKUP, 1, name + b"\0")
        assert handled == 1
        ids.setdefault(name, struct.unpack_from("<Q", reply, fuse.OUT_HEADER_SIZE)[0])
    assert {fs.inodes.lookups(n) for n in ids.values()} == {25}
    batch = fuse.BATCH_FORGET_IN.pack(len(ids), 0) + b"".join(
        fuse.FORGET_ONE.pack(n, 25) for n in ids.values())
    assert fs.c(fuse.Opcode.BATCH_FORGET, 0, batch, out_size=0, split=24) == (1, b"")
    assert all(fs.inodes.get(n) is None for n in ids.values())
    assert len(fs.inodes) == 1
    fs.inodes.check()


def test_submount_flag(tmp_path: Path) -> None:
    share = make_share(tmp_path)
    (share / "mnt").mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "none", str(share / "mnt")],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"the tests run as root: mount failed: {mounted.stderr}"
    try:
        f = Fs(share)
        try:
            for negotiated in (0, fuse.SUBMOUNTS):
                SESSION_FLAGS.pack_into(f.fs.session, 0, negotiated)
                for name in (b"mnt\0", b"dir\0"):
                    handled, reply = f.c(fuse.Opcode.LOOKUP, 1, name)
                    assert handled == 1
                    assert reply == f.py(fuse.Opcode.LOOKUP, 1, name)
                    flags = struct.unpack_from("<I", reply, len(reply) - 4)[0]
                    assert flags == (fuse.ATTR_SUBMOUNT if negotiated and name == b"mnt\0"
                                     else 0)
        finally:
            f.close()
    finally:
        subprocess.run(["umount", str(share / "mnt")], check=True)


def hostile(fs: Fs) -> list[tuple[str, dict]]:
    L, G = fuse.Opcode.LOOKUP, fuse.Opcode.GETATTR
    return [
        ("lookup without a name", dict(opcode=L, nodeid=1)),
        ("unterminated name", dict(opcode=L, nodeid=1, arg=b"file")),
        ("empty name", dict(opcode=L, nodeid=1, arg=b"\0")),
        ("dot", dict(opcode=L, nodeid=1, arg=b".\0")),
        ("dotdot", dict(opcode=L, nodeid=1, arg=b"..\0")),
        ("slash", dict(opcode=L, nodeid=1, arg=b"dir/inner\0")),
        ("256-byte name", dict(opcode=L, nodeid=1, arg=b"a" * 256 + b"\0")),
        ("1000-byte name", dict(opcode=L, nodeid=1, arg=b"a" * 1000 + b"\0")),
        ("NUL past the header's length", dict(opcode=L, nodeid=1, arg=b"file\0", length=44)),
        ("forged parent", dict(opcode=L, nodeid=123456, arg=b"file\0")),
        ("nodeid 0", dict(opcode=L, nodeid=0, arg=b"file\0")),
        ("parent that is a file", dict(opcode=L, nodeid=fs.lookup_py(1, b"file"),
                                       arg=b"x\0")),
        ("length beyond the chain", dict(opcode=L, nodeid=1, arg=b"file\0", length=4096)),
        ("length shorter than the header", dict(opcode=G, nodeid=1, length=39)),
        ("request extensions", dict(opcode=L, nodeid=1, arg=b"file\0" + bytes(11),
                                    extlen=2)),
        ("lookup reply does not fit", dict(opcode=L, nodeid=1, arg=b"file\0",
                                           out_size=143)),
        ("getattr reply does not fit", dict(opcode=G, nodeid=1, out_size=119)),
        ("no writable buffer", dict(opcode=G, nodeid=1, out_size=0)),
        ("forged getattr nodeid", dict(opcode=G, nodeid=1 << 40)),
        ("all-ones nodeid", dict(opcode=G, nodeid=(1 << 64) - 1)),
        ("chain shorter than a header", dict(opcode=G, nodeid=1,
                                             readable=bytes(fuse.IN_HEADER_SIZE - 1))),
        ("forget with a length beyond the chain", dict(opcode=fuse.Opcode.FORGET, nodeid=1,
                                                       arg=bytes(8), length=100)),
        ("oversized request", dict(opcode=L, nodeid=1, arg=b"file\0" + bytes(2 << 20))),
    ]


def test_hostile_requests_are_declined(fs: Fs) -> None:
    for what, kw in hostile(fs):
        before = [(e.nodeid, e.lookups) for e in fs.inodes.iter_entries()]
        kw = dict(kw)
        opcode, nodeid = kw.pop("opcode"), kw.pop("nodeid")
        arg = kw.pop("arg", b"")
        for split in (0, 1, 5) if len(arg) < 4096 else (0,):
            handled, _ = fs.c(opcode, nodeid, arg, split=split, **kw)
            assert handled == 0, what
        assert [(e.nodeid, e.lookups) for e in fs.inodes.iter_entries()] == before, what
    fs.inodes.check()


@pytest.mark.parametrize("cache", ["auto", "always", "never"])
def test_missing_names_answered_as_python_does(tmp_path: Path, cache: str) -> None:
    """A LOOKUP of a name that does not exist: a negative entry with the entry timeout, or
    ENOENT with --cache never; no reference is taken."""
    f = Fs(make_share(tmp_path), cache=cache)
    try:
        for name in (b"a" * 255, b"nothing"):
            arg = name + b"\0"
            handled, reply = f.c(fuse.Opcode.LOOKUP, 1, arg, split=5)
            assert handled == 1
            if cache == "never":
                assert reply == OUT.pack(16, -errno.ENOENT, f.unique)
                with pytest.raises(FileNotFoundError):
                    f.py(fuse.Opcode.LOOKUP, 1, arg)
            else:
                assert reply == f.py(fuse.Opcode.LOOKUP, 1, arg)
                assert struct.unpack_from("<QQQ", reply, 16) == (0, 0, f.fs.config.timeout[0])
        assert [e.nodeid for e in f.inodes.iter_entries()] == [1]
        f.inodes.check()
    finally:
        f.close()


@pytest.mark.parametrize("posix_lock", [False, True])
def test_flush(tmp_path: Path, posix_lock: bool) -> None:
    """FLUSH is answered in C while no lock owner holds anything; an unknown fh, or a
    lock owner with a description (whose locks FLUSH must drop), is Python's."""
    f = Fs(make_share(tmp_path), posix_lock=posix_lock)
    try:
        nodeid = f.lookup_py(1, b"file")
        fh = struct.unpack_from("<Q", f.py(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(0, 0)),
                                fuse.OUT_HEADER_SIZE)[0]
        arg = fuse.FLUSH_IN.pack(fh, 0, 0, 77)
        handled, reply = f.c(fuse.Opcode.FLUSH, nodeid, arg, split=3)
        assert handled == 1 and reply == OUT.pack(16, 0, f.unique) == f.py(
            fuse.Opcode.FLUSH, nodeid, arg)
        assert f.handles.get(fh) is not None  # FLUSH does not close
        assert f.c(fuse.Opcode.FLUSH, nodeid, fuse.FLUSH_IN.pack(fh + 1, 0, 0, 77))[0] == 0
        assert f.c(fuse.Opcode.FLUSH, nodeid, arg[:20])[0] == 0  # short: Python's EINVAL
        if posix_lock:
            owners = f.fs.lock_owners
            fd = owners.use(nodeid, 77, lambda: os.open(Path(f.fs.shared_dir) / "file",
                                                         os.O_RDONLY))
            owners.done(nodeid, 77, fd)
            assert owners.live == 1
            assert f.c(fuse.Opcode.FLUSH, nodeid, arg)[0] == 0  # Python drops its locks
            assert f.py(fuse.Opcode.FLUSH, nodeid, arg) == OUT.pack(16, 0, f.unique)
            assert owners.live == 0
            assert f.c(fuse.Opcode.FLUSH, nodeid, arg)[0] == 1
        assert f.handles.get(fh) is not None
        f.py(fuse.Opcode.RELEASE, nodeid, fuse.RELEASE_IN.pack(fh, 0, 0, 0))
    finally:
        f.close()


def test_harmless_forgets_are_answered(fs: Fs) -> None:
    """What Python does without a reply, C does too: a short FORGET, forged nodeids."""
    nodeid = fs.lookup_py(1, b"file")
    for opcode, target, arg in [
        (fuse.Opcode.FORGET, nodeid, b"\1\0\0"),  # < 8 bytes: ignored
        (fuse.Opcode.FORGET, 424242, fuse.FORGET_IN.pack(1)),
        (fuse.Opcode.FORGET, 1, fuse.FORGET_IN.pack(1 << 63)),  # the root stays
        (fuse.Opcode.FORGET, nodeid, fuse.FORGET_IN.pack(0)),
        (fuse.Opcode.BATCH_FORGET, 0, b"\5\0"),  # < 8 bytes: ignored
        (fuse.Opcode.BATCH_FORGET, 0, fuse.BATCH_FORGET_IN.pack(1 << 31, 0) + bytes(15)),
    ]:
        assert fs.c(opcode, target, arg, out_size=0) == (1, b"")
    assert fs.inodes.lookups(nodeid) == 1
    assert fs.inodes.lookups(1) >= 1
    fs.inodes.check()


def test_declined_when_python_must_answer(tmp_path: Path) -> None:
    """Owners rewritten by --translate-uid/gid: the C path stays out of metadata."""
    f = Fs(make_share(tmp_path))
    try:
        f.fs.translate_ids = True
        f.fast_path = FastPathContext(f.fs)
        f.ctx = f.fast_path.c
        assert f.c(fuse.Opcode.GETATTR, 1)[0] == 0
        assert f.c(fuse.Opcode.LOOKUP, 1, b"file\0")[0] == 0
        assert f.c(fuse.Opcode.FORGET, 1, fuse.FORGET_IN.pack(1), out_size=0)[0] == 0
    finally:
        f.close()


def test_c_ops_mask_says_which_opcodes_c_answers(tmp_path: Path) -> None:
    """ctx.c_ops: an opcode whose bit is clear goes to Python however well C could answer
    it; the worker's mask holds every opcode C answers in the plain configuration."""
    f = Fs(make_share(tmp_path))
    try:
        op = fuse.Opcode
        assert f.ctx.c_ops == sum(1 << o for o in (
            op.READ, op.WRITE, op.GETATTR, op.LOOKUP, op.FORGET, op.BATCH_FORGET, op.RELEASE,
            op.RELEASEDIR, op.UNLINK, op.READDIRPLUS, op.CREATE, op.FLUSH, op.RMDIR,
            op.RENAME, op.MKDIR, op.MKNOD, op.SYMLINK, op.OPEN, op.SETATTR))
        assert f.c(op.GETATTR, 1)[0] == 1
        f.ctx.c_ops &= ~(1 << op.GETATTR)
        assert f.c(op.GETATTR, 1)[0] == 0
        assert f.c(op.LOOKUP, 1, b"file\0")[0] == 1  # the other bits still count
        f.ctx.c_ops = (1 << 64) - 1  # an opcode C does not know stays Python's
        assert f.c(op.STATFS, 1)[0] == 0
        assert f.c(64, 1)[0] == 0
    finally:
        f.close()


def test_mode_bits_survive(fs: Fs) -> None:
    nodeid = fs.lookup_py(1, b"file")
    handled, reply = fs.c(fuse.Opcode.GETATTR, nodeid)
    assert handled == 1
    mode = struct.unpack_from("<I", reply, fuse.OUT_HEADER_SIZE + 16 + 60)[0]
    assert stat.S_ISREG(mode) and mode & stat.S_ISUID


def test_release_and_unlink(fs: Fs) -> None:
    """RELEASE drops the guest's reference on the fh (once, however often it is sent);
    UNLINK removes the name; what C declines (bad names, a missing name) Python answers."""
    share = Path(fs.fs.shared_dir)
    (share / "victim").write_text("v")
    nodeid = fs.lookup_py(1, b"victim")
    fh = struct.unpack_from("<Q", fs.py(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(0, 0)),
                            fuse.OUT_HEADER_SIZE)[0]
    assert fs.handles.get(fh) is not None
    arg = fuse.RELEASE_IN.pack(fh, 0, 0, 0)
    for _ in range(2):  # the second finds nothing, and answers the same
        handled, reply = fs.c(fuse.Opcode.RELEASE, nodeid, arg, split=5)
        assert handled == 1 and reply == OUT.pack(16, 0, fs.unique)
        assert fs.handles.get(fh) is None
    assert len(fs.handles) == 0
    assert fs.c(fuse.Opcode.RELEASE, nodeid, b"\1\2\3")[0] == 0  # short: Python's
    assert fs.c(fuse.Opcode.RELEASE, nodeid, arg, out_size=15)[0] == 0
    assert fs.c(fuse.Opcode.UNLINK, 1, b"victim\0", out_size=15)[0] == 0
    for bad in (b"victim", b"..\0", b"dir/inner\0", b"x" * 256 + b"\0", b"\0", b"missing\0",
                b"dir\0"):  # unterminated, climbing, too long, empty, ENOENT, EISDIR
        assert fs.c(fuse.Opcode.UNLINK, 1, bad)[0] == 0, bad
    assert (share / "victim").exists()
    handled, reply = fs.c(fuse.Opcode.UNLINK, 1, b"victim\0")
    assert handled == 1 and reply == OUT.pack(16, 0, fs.unique)
    assert not (share / "victim").exists()
    assert fs.inodes.lookups(nodeid) == 1  # the guest still holds its lookup


def test_read_only_share_unlinks_in_python(tmp_path: Path) -> None:
    f = Fs(make_share(tmp_path), readonly=True)
    try:
        assert f.c(fuse.Opcode.UNLINK, 1, b"file\0")[0] == 0
        assert (tmp_path / "share" / "file").exists()
    finally:
        f.close()


def test_readdirplus_identical_and_counted(fs: Fs) -> None:
    share = Path(fs.fs.shared_dir)
    big = share / "big"
    big.mkdir()
    for i in range(120):
        (big / f"entry_{i:03d}_{'x' * (i % 13)}").write_text(str(i))
    (big / "sub").mkdir()
    os.symlink("nowhere", big / "dangling")
    dir_id = fs.lookup_py(1, b"big")
    fh = struct.unpack_from("<Q", fs.py(fuse.Opcode.OPENDIR, dir_id, fuse.OPEN_IN.pack(0, 0)),
                            fuse.OUT_HEADER_SIZE)[0]
    names_seen: set[bytes] = set()
    for size, out_size in [(4096, 4096), (4096, 4096 + 16), (65536, 65536), (1000, 4096),
                           (100, 4096), (4096, 200), (0, 4096), (1 << 30, 8192)]:
        offset, rounds = 0, 0
        while rounds < 400:
            rounds += 1
            arg = fuse.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
            handled, reply = fs.c(fuse.Opcode.READDIRPLUS, dir_id, arg, out_size=out_size,
                                  wr_split=777, split=9)
            assert handled == 1
            py = fs.py(fuse.Opcode.READDIRPLUS, dir_id, arg, room=out_size - 16)
            assert reply == py, (size, offset)
            body, pos, last = reply[16:], 0, None
            while pos < len(body):
                nodeid = struct.unpack_from("<Q", body, pos)[0]
                ino, off, namelen, _ = fuse.DIRENT_HEAD.unpack_from(body, pos + 128)
                name = body[pos + 152 : pos + 152 + namelen]
                names_seen.add(name)
                if name not in (b".", b".."):
                    assert nodeid and fs.inodes.lookups(nodeid) >= 2
                pos += fuse.direntplus_size(namelen)
                last = off
            if last is None:
                break
            offset = last
    assert len(names_seen) == 124  # ., .., 120 files, sub, dangling
    # every entry sent (by C and by Python) is one reference; FORGET them all in C
    for e in list(fs.inodes.iter_entries()):
        if e.parent == dir_id:
            assert fs.c(fuse.Opcode.FORGET, e.nodeid, fuse.FORGET_IN.pack(e.lookups),
                        out_size=0)[0] == 1
    assert all(e.parent != dir_id for e in fs.inodes.iter_entries())
    fs.inodes.check()
    # declined: unknown fh, forged nodeid, short arguments, offset beyond 2^63
    for nodeid, arg in [(dir_id, fuse.READ_IN.pack(fh + 2, 0, 4096, 0, 0, 0, 0)),
                        (424242, fuse.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)),
                        (dir_id, fuse.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)[:39]),
                        (dir_id, fuse.READ_IN.pack(fh, 1 << 63, 4096, 0, 0, 0, 0))]:
        assert fs.c(fuse.Opcode.READDIRPLUS, nodeid, arg)[0] == 0
    assert fs.c(fuse.Opcode.READDIRPLUS, dir_id, fuse.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0),
                out_size=15)[0] == 0
    assert all(e.parent != dir_id for e in fs.inodes.iter_entries())
    assert fs.c(fuse.Opcode.RELEASEDIR, dir_id, fuse.RELEASE_IN.pack(fh, 0, 0, 0))[0] == 1
    assert len(fs.handles) == 0


# ----- CREATE ----------------------------------------------------------------------------

ENTRY_END = fuse.OUT_HEADER_SIZE + fuse.ENTRY_OUT_SIZE


def create_arg(name: bytes, flags: int = os.O_WRONLY | os.O_CREAT, mode: int = 0o100644,
               umask: int = 0o022, open_flags: int = 0) -> bytes:
    return fuse.CREATE_IN.pack(flags, mode, umask, open_flags) + name + b"\0"


def normalized(reply: bytes) -> bytes:
    """A CREATE reply without what differs between two new files: nodeid, ino, the three
    times and the fh."""
    b = bytearray(reply)
    h = fuse.OUT_HEADER_SIZE
    b[8:16] = bytes(8)  # unique
    b[h : h + 8] = bytes(8)  # nodeid
    a = h + 40  # fuse_attr
    b[a : a + 8] = bytes(8)  # ino
    b[a + 24 : a + 48] = bytes(24)  # atime mtime ctime
    b[a + 48 : a + 60] = bytes(12)  # their nsecs
    b[ENTRY_END : ENTRY_END + 8] = bytes(8)  # fh
    return bytes(b)


@pytest.mark.parametrize("cache", ["auto", "always", "never"])
@pytest.mark.parametrize("handles", ["prefer", "never"])
def test_create_identical_and_counted(tmp_path: Path, cache: str, handles: str) -> None:
    f = Fs(make_share(tmp_path), cache=cache, file_handles=handles)
    try:
        share = Path(f.fs.shared_dir)
        for i, flags in enumerate((os.O_WRONLY, os.O_RDWR | os.O_EXCL | os.O_TRUNC,
                                   os.O_RDONLY | os.O_NONBLOCK | os.O_APPEND)):
            flags |= os.O_CREAT
            handled, reply = f.c(fuse.Opcode.CREATE, 1, create_arg(b"c%d" % i, flags),
                                 split=7 if i == 1 else 0)
            assert handled == 1
            assert len(reply) == ENTRY_END + fuse.OPEN_OUT.size
            py = f.py(fuse.Opcode.CREATE, 1, create_arg(b"p%d" % i, flags))
            assert normalized(reply) == normalized(py)
            # the entry is what Python's LOOKUP answers for the same file
            look = f.py(fuse.Opcode.LOOKUP, 1, b"c%d\0" % i)
            assert reply[16:ENTRY_END] == look[16:]
            nodeid = struct.unpack_from("<Q", reply, 16)[0]
            fh, fopen, _ = fuse.OPEN_OUT.unpack_from(reply, ENTRY_END)
            pfh = fuse.OPEN_OUT.unpack_from(py, ENTRY_END)[0]
            assert fopen == f.fs._open_reply_flags(False)
            c_open, p_open = f.handles.get(fh), f.handles.get(pfh)
            assert c_open is not None and p_open is not None
            assert (c_open.nodeid, c_open.flags, c_open.guest_open) == (nodeid, flags, True)
            assert (p_open.flags, p_open.guest_open) == (flags, True)
            # the fd's status flags as Python's
            assert fcntl.fcntl(c_open.fd, fcntl.F_GETFL) == fcntl.fcntl(p_open.fd,
                                                                        fcntl.F_GETFL)
            assert fcntl.fcntl(c_open.fd, fcntl.F_GETFD) == fcntl.fcntl(p_open.fd,
                                                                        fcntl.F_GETFD)
            assert stat.S_IMODE((share / f"c{i}").stat().st_mode) == 0o644
            entry = f.inodes.get(nodeid)
            assert entry is not None and entry.name == b"c%d" % i
            assert (entry.fd < 0) == (handles == "prefer")
            # RELEASE + FORGET (the create's and the lookup's) leave nothing behind
            assert f.c(fuse.Opcode.RELEASE, nodeid, fuse.RELEASE_IN.pack(fh, 0, 0, 0))[0]
            assert f.c(fuse.Opcode.FORGET, nodeid, fuse.FORGET_IN.pack(2), out_size=0)[0]
            assert f.handles.get(fh) is None and f.inodes.get(nodeid) is None
            f.py(fuse.Opcode.RELEASE, 1, fuse.RELEASE_IN.pack(pfh, 0, 0, 0))
        f.fs._forget(struct.unpack_from("<Q", py, 16)[0], 1)
        assert len(f.handles) == 0
        assert len(f.inodes) == 3  # root, p0 and p1 (the last one forgotten above)
        f.inodes.check()
    finally:
        f.close()


def test_create_as_the_caller(fs: Fs) -> None:
    assert os.geteuid() == 0, "the tests run as root (switching fsuid needs it)"
    share = Path(fs.fs.shared_dir)
    os.chmod(share, 0o777)
    handled, reply = fs.c(fuse.Opcode.CREATE, 1, create_arg(b"owned", mode=0o100600),
                          uid=1234, gid=4321)
    assert handled == 1
    st = (share / "owned").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 4321, 0o600)
    assert struct.unpack_from("<II", reply, 16 + 40 + 68) == (1234, 4321)
    # the daemon's own ids are back: a file made afterwards is root's
    (share / "after").write_text("")
    assert (share / "after").stat().st_uid == os.geteuid()


def test_create_declines(tmp_path: Path) -> None:
    f = Fs(make_share(tmp_path))
    try:
        share = Path(f.fs.shared_dir)
        before = sorted(os.listdir(share))
        excl = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        for arg, kw in [
            (create_arg(b"file", excl), {}),  # EEXIST: Python's answer
            (create_arg(b"file"), {}),  # existing file: Python opens it
            (create_arg(b"fifo"), {}),
            (create_arg(b"link"), {}),
            (create_arg(b"dir"), {}),
            (create_arg(b".."), {}),
            (create_arg(b"."), {}),
            (create_arg(b"a/b"), {}),
            (create_arg(b"x" * 256), {}),
            (create_arg(b""), {}),
            (create_arg(b"new")[:-1], {}),  # unterminated
            (create_arg(b"new")[:10], {}),  # short
            (create_arg(b"new", os.O_WRONLY | os.O_CREAT | os.O_DIRECTORY), {}),
            (create_arg(b"new", os.O_RDWR | os.O_TMPFILE), {}),
            (create_arg(b"new", open_flags=fuse.OPEN_KILL_SUIDGID), {}),
            (create_arg(b"new"), {"out_size": ENTRY_END + 15}),
            (create_arg(b"new"), {"extlen": 1}),
        ]:
            assert f.c(fuse.Opcode.CREATE, 1, arg, **kw)[0] == 0, (arg, kw)
        assert f.c(fuse.Opcode.CREATE, 999999, create_arg(b"new"))[0] == 0
        assert sorted(os.listdir(share)) == before
        assert len(f.handles) == 0 and len(f.inodes) == 1
        with pytest.raises(FileExistsError):
            f.py(fuse.Opcode.CREATE, 1, create_arg(b"file", excl))
    finally:
        f.close()
    for i, config in enumerate(({"readonly": True}, {"writeback": True},
                                {"posix_acl": True}, {"security_label": True})):
        f = Fs(make_share(tmp_path / str(i)), **config)
        try:
            assert f.c(fuse.Opcode.CREATE, 1, create_arg(b"new"))[0] == 0, config
            assert not (Path(f.fs.shared_dir) / "new").exists()
        finally:
            f.close()


def entry_and_fd_inodes(f: Fs, reply: bytes) -> tuple[int, int, int]:
    """(inode the CREATE reply's entry names, inode GETATTR of its nodeid answers, inode
    of the fd its fh holds in the open-file table)."""
    nodeid, = struct.unpack_from("<Q", reply, fuse.OUT_HEADER_SIZE)
    entry_ino, = struct.unpack_from("<Q", reply, fuse.OUT_HEADER_SIZE + 40)
    fh, = struct.unpack_from("<Q", reply, ENTRY_END)
    attr = f.py(fuse.Opcode.GETATTR, nodeid)
    getattr_ino, = struct.unpack_from("<Q", attr, fuse.OUT_HEADER_SIZE + 16)
    opened = f.handles.get(fh)
    assert opened is not None and opened.nodeid == nodeid
    return entry_ino, getattr_ino, os.fstat(opened.fd).st_ino


@pytest.mark.parametrize("handles", ["prefer", "never"])
@pytest.mark.parametrize("path", ["c", "python"])
def test_create_racing_a_rename_onto_its_name(tmp_path: Path, handles: str,
                                              path: str) -> None:
    """Another queue renames a file onto the name a CREATE is making, right after the
    file was made and before it is looked up (the fuzzer's open-identity finding: the
    C path answered the renamed file's entry with an fh whose fd was the file it had made,
    unlinked by the rename). Whoever answers, the open file must be the entry answered;
    a C path that declines must have taken nothing."""
    f = Fs(make_share(tmp_path), file_handles=handles)
    try:
        share = Path(f.fs.shared_dir)
        (share / "other").write_text("other")
        other = (share / "other").stat().st_ino
        arg = create_arg(b"new", os.O_RDONLY | os.O_CREAT, mode=0o100600)
        with paused_open(share, "new", lambda: os.rename(share / "other", share / "new")
                         ) as paused:
            if path == "c":
                handled, reply = f.c(fuse.Opcode.CREATE, 1, arg)
            else:
                handled, reply = 1, f.py(fuse.Opcode.CREATE, 1, arg)
        assert paused.fired
        if not handled:
            # declined: nothing taken, and the file made here was not unlinked again
            # (the name is the renamed file's now)
            assert len(f.handles) == 0 and len(f.inodes) == 1
            assert (share / "new").stat().st_ino == other
            reply = f.py(fuse.Opcode.CREATE, 1, arg)  # the worker's Python answer
        entry_ino, getattr_ino, fd_ino = entry_and_fd_inodes(f, reply)
        assert entry_ino == getattr_ino == fd_ino, (
            f"entry inode {entry_ino}, GETATTR {getattr_ino}, the fh's fd {fd_ino} "
            f"(renamed file {other})")
        f.inodes.check()
    finally:
        f.close()


def test_put_and_drop_never_close_a_pinned_fd(tmp_path: Path) -> None:
    """A request that pins a nodeid in the fd cache keeps using the fd it got: a put for
    the same nodeid (another fd of the same inode) or a drop must not close it under it."""
    cache = FdCache(4)
    first = os.open(tmp_path, os.O_PATH)
    second = os.open(tmp_path, os.O_PATH)
    cache.put(7, first)
    cache.pin(7)
    cache.put(7, second)  # kept: the pinned one stays, the new one is closed
    assert cache.get(7) == first and os.fstat(first).st_ino == tmp_path.stat().st_ino
    assert fd_closed(second)
    cache.drop(7)  # pinned: left for the sweep (or eviction) after the request
    assert cache.get(7) == first and not fd_closed(first)
    cache.unpin(7)
    cache.drop(7)
    assert cache.get(7) == -1 and fd_closed(first)
    third, fourth = os.open(tmp_path, os.O_PATH), os.open(tmp_path, os.O_PATH)
    cache.put(8, third)
    cache.put(8, fourth)  # not pinned: replaced, as before
    assert cache.get(8) == fourth and fd_closed(third)
    cache.clear()


def fd_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    return False


def test_link_keeps_the_target_fd_its_request_pins(tmp_path: Path) -> None:
    """LINK pins its target (InodeRef) and then claims the new name, which is the same
    inode: the claim's fd must not replace (and close) the cached fd the request holds."""
    f = Fs(make_share(tmp_path), file_handles="prefer")
    try:
        target = f.lookup_py(1, b"dir")
        target = f.lookup_py(target, b"inner")
        held = f.fs.fd_cache.get(target)
        inode = os.fstat(held).st_ino
        seen: list[int] = []
        claim = f.fs.claim

        def claim_then_look(fd: int, st: os.stat_result, parent: int, name: bytes) -> int:
            nodeid = claim(fd, st, parent, name)
            seen.append(-1 if fd_closed(held) else os.fstat(held).st_ino)
            return nodeid

        f.fs.claim = claim_then_look  # type: ignore[method-assign]
        reply = f.py(fuse.Opcode.LINK, 1, fuse.LINK_IN.pack(target) + b"hard\0")
        assert struct.unpack_from("<Q", reply, fuse.OUT_HEADER_SIZE)[0] == target
        assert seen == [inode], "the request's pinned fd was closed under it"
        assert f.fs.fd_cache.get(target) == held
    finally:
        f.close()


# ----- the fd directory as a directory fd (OPEN and SETATTR reopen fds under it) -----
def test_fd_directory_names_reach_the_fds_inode(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    fd = os.open(f, os.O_PATH)
    try:
        d = proc_fd.fd_directory_fd()
        assert d >= 0 and proc_fd.fd_directory_fd() == d  # opened once
        st = os.stat(str(fd), dir_fd=d)
        assert (st.st_ino, st.st_dev) == (f.stat().st_ino, f.stat().st_dev)
    finally:
        os.close(fd)


def test_fd_directory_of_the_sandbox_wins() -> None:
    saved = proc_fd.PROC_DIR_FD
    try:
        proc_fd.use_fd_directory(12345)
        assert proc_fd.fd_directory_fd() == 12345
    finally:
        proc_fd.PROC_DIR_FD = saved
