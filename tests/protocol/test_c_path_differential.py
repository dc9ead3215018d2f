"""Differential tests generated from the opcode table (daemon/protocol/opcodes.py): for
every opcode the table lets C answer, the same request sequence goes to a daemon with the C
path on and to one with it off (``--c-fast-path off``: all Python), and the guest must see
the same replies: errno, bytes, inode numbers and nodeids. Only what must differ between two
runs is normalised (the ino and times of a file the case itself creates, times a case's
own writes changed).

Both daemons serve one share and see the same requests in the same order, so the nodeids
and fhs they hand out agree. Each case runs in its own directory, prepared again before
each daemon's run. A case only counts if the C daemon answered at least one of its
requests of that opcode in C (the per-queue counters say so), and the Python daemon none.

A new C-answered row in the table without an entry in CASES fails
``test_every_c_opcode_has_a_case``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest

from daemon.protocol import fuse
from daemon.protocol.fuse import Opcode
from daemon.protocol.opcodes import C_OPCODES
from daemon.stats.queue_stats import QueueStats, segment_name
from shm_table import InodeTable
from tests.support.daemon import daemon_log, pyvirtiofsd
from tests.support.frontend import Frontend

PATHS = ("on", "off")  # --c-fast-path
ENTRY = fuse.ENTRY_OUT_SIZE
ATTR_AT_IN_ENTRY = fuse.ENTRY_HEAD.size  # 40
ATTR_AT_IN_ATTR_OUT = fuse.ATTR_OUT_HEAD.size  # 16
TIMES = slice(24, 60)  # atime mtime ctime and their nanoseconds within fuse_attr


def without_times(buf: bytes, attr_at: int) -> bytes:
    """An attribute reply with the times zeroed (a case's own writes changed them)."""
    b = bytearray(buf)
    if len(b) >= attr_at + TIMES.stop:
        b[attr_at + TIMES.start : attr_at + TIMES.stop] = bytes(TIMES.stop - TIMES.start)
    return bytes(b)


def new_file_entry(buf: bytes) -> bytes:
    """The entry of a file the case made: its ino and times differ from run to run."""
    b = bytearray(without_times(buf, ATTR_AT_IN_ENTRY))
    if len(b) >= ATTR_AT_IN_ENTRY + 8:
        b[ATTR_AT_IN_ENTRY : ATTR_AT_IN_ENTRY + 8] = bytes(8)
    return bytes(b)


def new_file_attr(buf: bytes) -> bytes:
    """The attributes of a file the case made: its ino and times differ from run to run."""
    b = bytearray(without_times(buf, ATTR_AT_IN_ATTR_OUT))
    if len(b) >= ATTR_AT_IN_ATTR_OUT + 8:
        b[ATTR_AT_IN_ATTR_OUT : ATTR_AT_IN_ATTR_OUT + 8] = bytes(8)
    return bytes(b)


@dataclass
class Daemon:
    """One running daemon, its front-end, and views of its inode table and counters."""

    path: str
    pid: int
    front: Frontend
    table: InodeTable
    stats: QueueStats

    def in_c(self) -> int:
        return sum(row["in_c"] for row in self.stats.rows())


@dataclass
class Session:
    """One case's run against one daemon: what the guest saw, request by request."""

    daemon: Daemon
    target: int  # the opcode the case is about
    dir: Path  # the case's directory in the share
    answers: list[tuple[str, int, bytes]] = field(default_factory=list)
    target_in_c: int = 0  # requests of the target opcode answered in C
    in_c: int = 0  # all requests answered in C

    def req(self, what: str, opcode: int, nodeid: int, arg: bytes = b"", *,
            normalise: Callable[[bytes], bytes] | None = None, **kw: object) -> bytes:
        """One request; its errno and (normalised) payload are recorded under ``what``."""
        before = self.daemon.in_c()
        err, payload = self.daemon.front.fuse(opcode, nodeid, arg, **kw)  # type: ignore[arg-type]
        answered_in_c = self.daemon.in_c() - before
        for ring in self.daemon.front.rings.values():
            if len(ring.free) < 32:  # the front-end frees only heads; nothing is in flight
                ring.free = list(range(ring.size))
        self.in_c += answered_in_c
        if opcode == self.target:
            self.target_in_c += answered_in_c
        self.answers.append((what, err, normalise(payload) if normalise else payload))
        return payload

    def note(self, what: str, value: object) -> None:
        """Something else the guest (or the host) could observe, compared as well."""
        self.answers.append((what, 0, repr(value).encode()))

    def lookup(self, parent: int, name: bytes,
               normalise: Callable[[bytes], bytes] | None = None) -> int:
        return struct.unpack_from("<Q", self.req(f"lookup {name[:12]!r}", Opcode.LOOKUP,
                                                 parent, name + b"\0",
                                                 normalise=normalise))[0]

    def open(self, nodeid: int, flags: int = os.O_RDONLY, opcode: int = Opcode.OPEN) -> int:
        return struct.unpack_from("<Q", self.req(f"open {flags:#o}", opcode, nodeid,
                                                 fuse.OPEN_IN.pack(flags, 0)))[0]

    def release(self, nodeid: int, fh: int, opcode: int = Opcode.RELEASE) -> None:
        self.req(f"release {fh}", opcode, nodeid, fuse.RELEASE_IN.pack(fh, 0, 0, 0))


class Case(NamedTuple):
    prepare: Callable[[Path], None]  # (re)makes the case's directory before each run
    run: Callable[[Session, int], None]  # the requests, given the directory's nodeid


CASES: dict[int, Case] = {}


def case(opcode: Opcode, prepare: Callable[[Path], None]) -> Callable[
        [Callable[[Session, int], None]], Callable[[Session, int], None]]:
    def register(run: Callable[[Session, int], None]) -> Callable[[Session, int], None]:
        CASES[opcode] = Case(prepare, run)
        return run
    return register


# ----- what the directories hold ------------------------------------------------------

DATA = bytes(range(256)) * 40  # 10,240 bytes


def put(p: Path, data: bytes) -> None:
    """The file with these contents, written in place (same inode) only if they differ, so
    its times stay what the last run saw."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOATIME)
    except FileNotFoundError:
        p.write_bytes(data)
        return
    with os.fdopen(fd, "rb") as f:
        if f.read() == data:
            return
    with open(p, "r+b") as f:
        f.write(data)
        f.truncate(len(data))


def settle(d: Path) -> None:
    """Read every file and list every directory once, a clock tick after the last change:
    with relatime the daemons' own reads then leave the atimes alone, and both runs see
    the same ones."""
    time.sleep(0.02)
    for parent, _, names in os.walk(d):
        for name in names:
            p = Path(parent) / name
            if p.is_file() and not p.is_symlink():
                p.read_bytes()


def files(d: Path) -> None:
    """A file, a directory with a file, a symlink and a long name."""
    d.mkdir(exist_ok=True)
    if d.stat().st_mode & 0o777 != 0o777:
        os.chmod(d, 0o777)  # a caller other than root creates in it
    put(d / "file", DATA)
    put(d / ("n" * 255), b"long name")
    (d / "sub").mkdir(exist_ok=True)
    put(d / "sub" / "inner", b"inner")
    if not (d / "link").is_symlink():
        os.symlink("dangling", d / "link")
    settle(d)


def victims(d: Path) -> None:
    """files(), and a victim for UNLINK (made again for each run), without what CREATE
    made."""
    files(d)
    put(d / "victim", b"victim")
    for name in ("new", "owned"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(d / name)
    settle(d)


def listing(d: Path) -> None:
    """files() and 40 more names for READDIRPLUS to list in pieces."""
    files(d)
    for i in range(40):
        put(d / f"{i:02d}{'_' * i}", str(i).encode())
    settle(d)


# ----- the cases: one per opcode C may answer -----------------------------------------

BAD_NAMES = [
    ("no name", b""), ("unterminated", b"file"), ("empty", b"\0"), ("dot", b".\0"),
    ("dotdot", b"..\0"), ("slash", b"sub/inner\0"), ("256 bytes", b"n" * 256 + b"\0"),
    ("missing", b"missing\0"),
]


@case(Opcode.LOOKUP, files)
def lookup_case(s: Session, dir_id: int) -> None:
    for name in (b"file", b"sub", b"link", b"n" * 255, b"file", b"sub"):
        s.lookup(dir_id, name)
    s.lookup(s.lookup(dir_id, b"sub"), b"inner")
    for what, name in BAD_NAMES:
        s.req(f"lookup {what}", Opcode.LOOKUP, dir_id, name)
    file_id = s.lookup(dir_id, b"file")
    s.req("lookup under a file", Opcode.LOOKUP, file_id, b"x\0")
    s.req("lookup forged parent", Opcode.LOOKUP, 987654, b"file\0")
    s.req("lookup nodeid 0", Opcode.LOOKUP, 0, b"file\0")
    s.req("lookup, reply does not fit", Opcode.LOOKUP, dir_id, b"file\0", out_size=100)
    s.req("lookup on queue 2", Opcode.LOOKUP, dir_id, b"file\0", q=2)
    s.note("lookups of file", s.daemon.table.lookups(file_id))


@case(Opcode.GETATTR, files)
def getattr_case(s: Session, dir_id: int) -> None:
    ids = [1, dir_id] + [s.lookup(dir_id, n) for n in (b"file", b"sub", b"link")]
    for nodeid in ids:
        s.req(f"getattr {nodeid}", Opcode.GETATTR, nodeid, fuse.GETATTR_IN.pack(0, 0, 0))
        s.req(f"getattr fh {nodeid}", Opcode.GETATTR, nodeid,
              fuse.GETATTR_IN.pack(fuse.GETATTR_FH, 0, 77), q=2)
        s.req(f"getattr no args {nodeid}", Opcode.GETATTR, nodeid, indirect=True)
    s.req("getattr, reply does not fit", Opcode.GETATTR, 1, out_size=64)
    s.req("getattr forged", Opcode.GETATTR, 1 << 50)
    s.req("getattr nodeid 0", Opcode.GETATTR, 0)


def forget_case(batch: bool) -> Callable[[Session, int], None]:
    opcode = Opcode.BATCH_FORGET if batch else Opcode.FORGET

    def forget(s: Session, nodeid: int, n: int, what: str) -> None:
        if batch:
            arg = fuse.BATCH_FORGET_IN.pack(1, 0) + fuse.FORGET_ONE.pack(nodeid, n)
            s.req(what, opcode, 0, arg, q=0, out_size=0)
        else:
            s.req(what, opcode, nodeid, fuse.FORGET_IN.pack(n), q=0, out_size=0)

    def run(s: Session, dir_id: int) -> None:
        ids = [s.lookup(dir_id, b"file") for _ in range(3)]
        file_id = ids[0]
        sub_id = s.lookup(dir_id, b"sub")
        s.lookup(dir_id, b"sub")
        forget(s, file_id, 1, "forget one")
        s.note("lookups after one", s.daemon.table.lookups(file_id))
        forget(s, file_id, 0, "forget none")
        forget(s, 424242, 1, "forget forged")
        forget(s, 1, 1 << 63, "forget the root")
        if batch:
            s.req("short batch", opcode, 0, b"\5\0", q=0, out_size=0)
            s.req("batch longer than sent", opcode, 0, fuse.BATCH_FORGET_IN.pack(1 << 31, 0)
                  + fuse.FORGET_ONE.pack(sub_id, 1) + bytes(7), q=0, out_size=0)
            s.req("batch of two", opcode, 0, fuse.BATCH_FORGET_IN.pack(2, 0)
                  + fuse.FORGET_ONE.pack(sub_id, 1) + fuse.FORGET_ONE.pack(file_id, 2),
                  q=0, out_size=0)
        else:
            s.req("short forget", opcode, file_id, b"\1\0\0", q=0, out_size=0)
            forget(s, sub_id, 2, "forget sub")
            forget(s, file_id, 2, "forget the rest")
        s.note("file left", (s.daemon.table.get(file_id) is None,
                             s.daemon.table.lookups(1) >= 1))
        s.req("getattr forgotten", Opcode.GETATTR, file_id)
        s.lookup(dir_id, b"file")  # a new entry
        s.daemon.table.check()

    return run


case(Opcode.FORGET, files)(forget_case(batch=False))
case(Opcode.BATCH_FORGET, files)(forget_case(batch=True))


@case(Opcode.RELEASE, files)
def release_case(s: Session, dir_id: int) -> None:
    file_id = s.lookup(dir_id, b"file")
    first, second = s.open(file_id), s.open(file_id, os.O_RDWR)
    s.release(file_id, first)
    s.release(file_id, first)  # again: nothing left to drop, the same answer
    s.release(file_id, 1 << 40)
    s.req("release short", Opcode.RELEASE, file_id, b"\1\2\3")
    s.release(0, second)  # nodeid 0, as the guest sends for a file it forgot
    s.req("read after release", Opcode.READ, file_id,
          fuse.READ_IN.pack(second, 0, 10, 0, 0, 0, 0))


@case(Opcode.RELEASEDIR, files)
def releasedir_case(s: Session, dir_id: int) -> None:
    sub_id = s.lookup(dir_id, b"sub")
    fh = s.open(sub_id, os.O_RDONLY | os.O_DIRECTORY, Opcode.OPENDIR)
    s.release(sub_id, fh, Opcode.RELEASEDIR)
    s.release(sub_id, fh, Opcode.RELEASEDIR)
    s.release(sub_id, fh ^ (1 << 40), Opcode.RELEASEDIR)
    s.req("releasedir short", Opcode.RELEASEDIR, sub_id, b"")


@case(Opcode.FLUSH, files)
def flush_case(s: Session, dir_id: int) -> None:
    file_id = s.lookup(dir_id, b"file")
    fh = s.open(file_id, os.O_RDWR)
    s.req("flush", Opcode.FLUSH, file_id, fuse.FLUSH_IN.pack(fh, 0, 0, 0x1234))
    s.req("flush again", Opcode.FLUSH, file_id, fuse.FLUSH_IN.pack(fh, 0, 0, 0x1234), q=2)
    s.req("flush bad fh", Opcode.FLUSH, file_id, fuse.FLUSH_IN.pack(fh ^ (1 << 40), 0, 0, 0))
    s.req("flush short", Opcode.FLUSH, file_id, b"\0" * 8)
    s.release(file_id, fh)
    s.req("flush released", Opcode.FLUSH, file_id, fuse.FLUSH_IN.pack(fh, 0, 0, 0))


@case(Opcode.UNLINK, victims)
def unlink_case(s: Session, dir_id: int) -> None:
    victim = s.lookup(dir_id, b"victim", normalise=new_file_entry)  # made for each run
    s.req("unlink", Opcode.UNLINK, dir_id, b"victim\0")
    s.req("unlink again", Opcode.UNLINK, dir_id, b"victim\0")
    s.req("lookup unlinked", Opcode.LOOKUP, dir_id, b"victim\0")
    s.req("getattr unlinked", Opcode.GETATTR, victim, normalise=new_file_attr)
    s.req("unlink a directory", Opcode.UNLINK, dir_id, b"sub\0")
    for what, name in BAD_NAMES:
        s.req(f"unlink {what}", Opcode.UNLINK, dir_id, name)
    s.req("unlink forged parent", Opcode.UNLINK, 55555, b"file\0")
    s.req("unlink under a file", Opcode.UNLINK, s.lookup(dir_id, b"file"), b"x\0")
    s.note("left", sorted(p.name[:12] for p in s.dir.iterdir()))


@case(Opcode.READDIRPLUS, listing)
def readdirplus_case(s: Session, dir_id: int) -> None:
    fh = s.open(dir_id, os.O_RDONLY | os.O_DIRECTORY, Opcode.OPENDIR)
    offset = 0
    for size in (1024, 4096, 300, 4096, 65536, 4096):
        body = s.req(f"readdirplus {size} at {offset}", Opcode.READDIRPLUS, dir_id,
                     fuse.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), q=2)
        pos = 0
        while pos < len(body):
            _, offset, namelen, _ = fuse.DIRENT_HEAD.unpack_from(body, pos + ENTRY)
            pos += fuse.direntplus_size(namelen)
    s.req("readdirplus from the start, reply smaller", Opcode.READDIRPLUS, dir_id,
          fuse.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0), out_size=700)
    s.req("readdirplus bad fh", Opcode.READDIRPLUS, dir_id,
          fuse.READ_IN.pack(fh ^ (1 << 40), 0, 4096, 0, 0, 0, 0))
    s.req("readdirplus short", Opcode.READDIRPLUS, dir_id, bytes(16))
    s.release(dir_id, fh, Opcode.RELEASEDIR)


@case(Opcode.CREATE, victims)
def create_case(s: Session, dir_id: int) -> None:
    def create(what: str, flags: int, mode: int, name: bytes, umask: int = 0,
               parent: int = dir_id, **kw: object) -> bytes:
        return s.req(what, Opcode.CREATE, parent,
                     fuse.CREATE_IN.pack(flags, mode, umask, 0) + name,
                     normalise=new_file_entry, **kw)

    made = create("create", os.O_RDWR | os.O_CREAT, 0o644, b"new\0")
    owned = create("create as 1234", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, b"owned\0",
                   umask=0o22, uid=1234, gid=1234)
    st = os.stat(s.dir / "owned")
    s.note("owner of owned", (st.st_uid, st.st_gid, oct(st.st_mode)))
    excl = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    plain = os.O_WRONLY | os.O_CREAT
    create("create exists, O_EXCL", excl, 0o644, b"new\0")
    create("create exists", plain, 0o644, b"file\0")
    create("create O_DIRECTORY", plain | os.O_DIRECTORY, 0o644, b"d\0")
    for what, name in BAD_NAMES[:-1]:
        create(f"create {what}", plain, 0o644, name)
    s.req("create short", Opcode.CREATE, dir_id, fuse.CREATE_IN.pack(plain, 0o644, 0, 0)[:8])
    create("create forged parent", plain, 0o644, b"x\0", parent=987654)
    create("create, reply does not fit", plain, 0o644, b"x\0", out_size=100)
    for reply in (made, owned):
        nodeid, = struct.unpack_from("<Q", reply)
        fh, = struct.unpack_from("<Q", reply, ENTRY)
        s.release(nodeid, fh)
        s.req("forget created", Opcode.FORGET, nodeid, fuse.FORGET_IN.pack(1), q=0,
              out_size=0)
    s.note("left", sorted(p.name[:12] for p in s.dir.iterdir()))


@case(Opcode.READ, files)
def read_case(s: Session, dir_id: int) -> None:
    file_id = s.lookup(dir_id, b"file")
    fh = s.open(file_id)
    for offset, size, out_size in [(0, 4096, 8192), (100, 50, 4096), (10_200, 100, 4096),
                                   (50_000, 10, 4096), (0, 0, 4096), (0, 4096, 16 + 10),
                                   (7, 3000, 1000), (0, 1 << 20, 16384)]:
        s.req(f"read {size} at {offset} into {out_size}", Opcode.READ, file_id,
              fuse.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), out_size=out_size)
    s.req("read split", Opcode.READ, file_id, fuse.READ_IN.pack(fh, 5, 2000, 0, 0, 0, 0),
          indirect=True)
    s.req("read bad fh", Opcode.READ, file_id, fuse.READ_IN.pack(fh ^ (1 << 40), 0, 10, 0,
                                                                   0, 0, 0))
    s.req("read offset too large", Opcode.READ, file_id,
          fuse.READ_IN.pack(fh, 1 << 63, 10, 0, 0, 0, 0))
    s.req("read short", Opcode.READ, file_id, bytes(12))
    s.release(file_id, fh)


@case(Opcode.WRITE, files)
def write_case(s: Session, dir_id: int) -> None:
    # the times of the file this case writes to change from run to run
    file_id = s.lookup(dir_id, b"file",
                       normalise=lambda b: without_times(b, ATTR_AT_IN_ENTRY))
    fh = s.open(file_id, os.O_RDWR)

    def write(what: str, offset: int, data: bytes, size: int | None = None,
              flags: int = 0, handle: int = fh, **kw: object) -> None:
        arg = fuse.WRITE_IN.pack(handle, offset, len(data) if size is None else size, flags,
                                 0, 0, 0)
        s.req(what, Opcode.WRITE, file_id, arg + data, **kw)

    write("write", 0, b"w" * 100)
    write("write past the end", 10_230, b"e" * 30)
    write("write nothing", 5, b"")
    write("write split", 300, bytes(range(200)), extra_readable=[b"x" * 300],
          size=500, indirect=True)
    write("write as 1234", 1000, b"u" * 10, uid=1234, gid=1234)
    write("write, kill suid/sgid", 2000, b"k" * 10, flags=fuse.WRITE_KILL_SUIDGID)
    write("write bad fh", 0, b"x", handle=fh ^ (1 << 40))
    write("write more than sent", 0, b"x" * 10, size=100)
    write("write offset too large", 1 << 63, b"x")
    s.req("write short", Opcode.WRITE, file_id, bytes(20))
    s.req("read back", Opcode.READ, file_id, fuse.READ_IN.pack(fh, 0, 20_000, 0, 0, 0, 0),
          out_size=20_000)
    s.req("getattr written", Opcode.GETATTR, file_id,
          normalise=lambda b: without_times(b, ATTR_AT_IN_ATTR_OUT))
    rdonly = s.open(file_id)
    write("write to a read-only fh", 0, b"r", handle=rdonly)
    s.release(file_id, rdonly)
    s.release(file_id, fh)


# ----- the metadata requests of fuse_meta.c -------------------------------------------

MADE = ("newdir", "owneddir", "fifo", "reg", "owned", "sl", "owned_sl", "emptydir", "full",
        "from", "to", "trunc", "attrs")
FIXED_TIME = 1_600_000_000


def makes(d: Path) -> None:
    """files(), less anything a metadata case made, and what those cases act on, made again
    for each run: an empty and a full directory (RMDIR), a file to rename, a file to
    truncate on open, a file whose attributes SETATTR changes."""
    files(d)
    for name in MADE:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    with contextlib.suppress(FileNotFoundError):
        (d / "sub" / "moved").unlink()
    (d / "emptydir").mkdir()
    (d / "full").mkdir()
    (d / "full" / "x").write_bytes(b"x")
    (d / "from").write_bytes(b"from")
    (d / "trunc").write_bytes(b"truncate me")
    (d / "attrs").write_bytes(DATA)
    os.chmod(d / "attrs", 0o644)
    os.utime(d / "attrs", (FIXED_TIME, FIXED_TIME))
    os.chmod(d / "sub", 0o755)
    settle(d)


def without_ctime(buf: bytes, attr_at: int) -> bytes:
    """An attribute reply with only the ctime zeroed (a SETATTR that set atime and mtime
    itself changed it)."""
    b = bytearray(buf)
    for start, stop in ((40, 48), (56, 60)):
        if len(b) >= attr_at + stop:
            b[attr_at + start : attr_at + stop] = bytes(stop - start)
    return bytes(b)


def made_entries(s: Session, replies: list[bytes]) -> None:
    """FORGET the entries a case made (their nodeids agree between the runs)."""
    for reply in replies:
        if len(reply) >= 8:
            nodeid, = struct.unpack_from("<Q", reply)
            if nodeid:
                s.req("forget made", Opcode.FORGET, nodeid, fuse.FORGET_IN.pack(1), q=0,
                      out_size=0)


def owner(s: Session, name: str) -> None:
    st = os.lstat(s.dir / name)
    s.note(f"owner of {name}", (st.st_uid, st.st_gid, oct(st.st_mode)))


@case(Opcode.RMDIR, makes)
def rmdir_case(s: Session, dir_id: int) -> None:
    s.req("rmdir", Opcode.RMDIR, dir_id, b"emptydir\0")
    s.req("rmdir again", Opcode.RMDIR, dir_id, b"emptydir\0")
    s.req("lookup removed", Opcode.LOOKUP, dir_id, b"emptydir\0")
    s.req("rmdir not empty", Opcode.RMDIR, dir_id, b"full\0")
    s.req("rmdir a file", Opcode.RMDIR, dir_id, b"file\0")
    for what, name in BAD_NAMES:
        s.req(f"rmdir {what}", Opcode.RMDIR, dir_id, name)
    s.req("rmdir forged parent", Opcode.RMDIR, 55555, b"full\0")
    s.req("rmdir under a file", Opcode.RMDIR, s.lookup(dir_id, b"file"), b"x\0")
    s.note("left", sorted(p.name[:12] for p in s.dir.iterdir()))


@case(Opcode.RENAME, makes)
def rename_case(s: Session, dir_id: int) -> None:
    sub_id = s.lookup(dir_id, b"sub", normalise=lambda b: without_times(b, ATTR_AT_IN_ENTRY))

    def rename(what: str, old: bytes, new: bytes, newdir: int = dir_id, parent: int = dir_id,
               **kw: object) -> None:
        s.req(what, Opcode.RENAME, parent, fuse.RENAME_IN.pack(newdir) + old + new, **kw)

    rename("rename", b"from\0", b"to\0")
    rename("rename into sub", b"to\0", b"moved\0", newdir=sub_id)
    rename("rename back from sub", b"moved\0", b"to\0", parent=sub_id)
    rename("rename missing", b"from\0", b"to\0")
    rename("rename a directory onto a file", b"sub\0", b"file\0")
    rename("rename onto itself", b"to\0", b"to\0")
    for what, name in BAD_NAMES[:-1]:
        rename(f"rename from {what}", name, b"x\0")
        rename(f"rename to {what}", b"to\0", name)
    rename("rename forged newdir", b"to\0", b"x\0", newdir=987654)
    rename("rename forged parent", b"to\0", b"x\0", parent=987654)
    s.req("rename short", Opcode.RENAME, dir_id, b"\0" * 4)
    s.req("lookup renamed", Opcode.LOOKUP, dir_id, b"to\0", normalise=new_file_entry)
    s.note("left", sorted(p.name[:12] for p in s.dir.iterdir()))


def make_case(opcode: Opcode) -> Callable[[Session, int], None]:
    """MKDIR, MKNOD and SYMLINK: made as root and as another caller, and everything that
    must fail."""
    def arg(mode: int, name: bytes, umask: int = 0o022) -> bytes:
        if opcode == Opcode.MKDIR:
            return fuse.MKDIR_IN.pack(mode, umask) + name
        if opcode == Opcode.MKNOD:
            return fuse.MKNOD_IN.pack(mode, 0, umask, 0) + name
        return name + b"file\0"

    def run(s: Session, dir_id: int) -> None:
        op = opcode.name.lower()

        def make(what: str, mode: int, name: bytes, parent: int = dir_id,
                 **kw: object) -> bytes:
            return s.req(f"{op} {what}", opcode, parent, arg(mode, name),
                         normalise=new_file_entry, **kw)

        first = {Opcode.MKDIR: "newdir", Opcode.MKNOD: "fifo", Opcode.SYMLINK: "sl"}[opcode]
        other = {Opcode.MKDIR: "owneddir", Opcode.MKNOD: "owned",
                 Opcode.SYMLINK: "owned_sl"}[opcode]
        kind = stat_kind = {Opcode.MKDIR: 0, Opcode.MKNOD: 0o010000, Opcode.SYMLINK: 0}[opcode]
        made = [make("", kind | 0o755, first.encode() + b"\0"),
                make("as 1234", stat_kind | 0o750, other.encode() + b"\0", uid=1234,
                     gid=1234)]
        if opcode == Opcode.MKNOD:
            made.append(make("regular", 0o100644, b"reg\0"))
        owner(s, first)
        owner(s, other)
        make("exists", kind | 0o755, b"file\0")
        for what, name in BAD_NAMES[:-1]:
            make(what, kind | 0o755, name)
        make("forged parent", kind | 0o755, b"x\0", parent=987654)
        make("under a file", kind | 0o755, b"x\0", parent=s.lookup(dir_id, b"file"))
        make("reply does not fit", kind | 0o755, b"x\0", out_size=100)
        s.req(f"{op} short", opcode, dir_id, b"\0" * 3)
        if opcode == Opcode.SYMLINK:
            s.req("symlink empty target", opcode, dir_id, b"x\0\0")
            s.req("symlink unterminated target", opcode, dir_id, b"x\0file")
            s.req("symlink target too long", opcode, dir_id, b"x\0" + b"t" * 4096 + b"\0")
        made_entries(s, made)
        s.note("left", sorted(p.name[:12] for p in s.dir.iterdir()))

    return run


for _opcode in (Opcode.MKDIR, Opcode.MKNOD, Opcode.SYMLINK):
    case(_opcode, makes)(make_case(_opcode))


@case(Opcode.OPEN, makes)
def open_case(s: Session, dir_id: int) -> None:
    file_id = s.lookup(dir_id, b"file")
    trunc_id = s.lookup(dir_id, b"trunc", normalise=new_file_entry)
    fhs = [(file_id, s.open(file_id)), (file_id, s.open(file_id, os.O_RDWR)),
           (file_id, s.open(file_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)),
           (trunc_id, s.open(trunc_id, os.O_WRONLY | os.O_TRUNC))]
    s.req("read through an fh opened", Opcode.READ, file_id,
          fuse.READ_IN.pack(fhs[0][1], 0, 100, 0, 0, 0, 0))
    s.req("getattr truncated", Opcode.GETATTR, trunc_id, normalise=new_file_attr)
    sub_id = s.lookup(dir_id, b"sub", normalise=lambda b: without_times(b, ATTR_AT_IN_ENTRY))
    fhs.append((sub_id, s.open(sub_id, os.O_RDONLY | os.O_DIRECTORY)))  # Python's
    s.req("open a symlink", Opcode.OPEN, s.lookup(dir_id, b"link"), fuse.OPEN_IN.pack(0, 0))
    s.req("open forged", Opcode.OPEN, 987654, fuse.OPEN_IN.pack(0, 0))
    s.req("open O_TMPFILE", Opcode.OPEN, file_id, fuse.OPEN_IN.pack(os.O_TMPFILE | os.O_RDWR, 0))
    s.req("open kill suid/sgid", Opcode.OPEN, file_id,
          fuse.OPEN_IN.pack(os.O_RDWR, fuse.OPEN_KILL_SUIDGID))
    s.req("open short", Opcode.OPEN, file_id, b"\0" * 4)
    s.req("open, reply does not fit", Opcode.OPEN, file_id, fuse.OPEN_IN.pack(0, 0),
          out_size=20)
    for nodeid, fh in fhs:
        s.release(nodeid, fh)


@case(Opcode.SETATTR, makes)
def setattr_case(s: Session, dir_id: int) -> None:
    attrs_id = s.lookup(dir_id, b"attrs", normalise=new_file_entry)
    sub_id = s.lookup(dir_id, b"sub", normalise=lambda b: without_times(b, ATTR_AT_IN_ENTRY))

    def setattr(what: str, valid: int, nodeid: int = attrs_id, *, mode: int = 0,
                size: int = 0, atime: int = 0, mtime: int = 0, ans: int = 0, mns: int = 0,
                fh: int = 0, keep_times: bool = False, **kw: object) -> None:
        arg = fuse.SETATTR_IN.pack(valid, 0, fh, size, 0, atime, mtime, 0, ans, mns, 0, mode,
                                   0, 0, 0, 0)
        ino_and_times = new_file_attr if nodeid == attrs_id else (
            lambda b: without_times(b, ATTR_AT_IN_ATTR_OUT))

        def ctime_only(b: bytes) -> bytes:
            b = without_ctime(b, ATTR_AT_IN_ATTR_OUT)
            return b[:16] + bytes(8) + b[24:] if nodeid == attrs_id and len(b) >= 24 else b

        s.req(f"setattr {what}", Opcode.SETATTR, nodeid, arg,
              normalise=ctime_only if keep_times else ino_and_times, **kw)

    setattr("chmod", fuse.FATTR_MODE, mode=0o100600)
    setattr("chmod setuid", fuse.FATTR_MODE, mode=0o104755)
    setattr("truncate", fuse.FATTR_SIZE, size=100)
    setattr("extend", fuse.FATTR_SIZE, size=20_000)
    setattr("utimes", fuse.FATTR_ATIME | fuse.FATTR_MTIME, atime=1_500_000_000,
            mtime=1_500_000_001, ans=5, mns=7, keep_times=True)
    setattr("atime only", fuse.FATTR_ATIME, atime=1_400_000_000, keep_times=True)
    setattr("touch", fuse.FATTR_ATIME | fuse.FATTR_MTIME | fuse.FATTR_ATIME_NOW |
            fuse.FATTR_MTIME_NOW)
    setattr("mode, size and times", fuse.FATTR_MODE | fuse.FATTR_SIZE | fuse.FATTR_ATIME |
            fuse.FATTR_MTIME | (1 << 10), mode=0o644, size=5, atime=1_300_000_000,
            mtime=1_300_000_000, keep_times=True)
    setattr("chmod a directory", fuse.FATTR_MODE, sub_id, mode=0o40700)
    setattr("truncate a directory", fuse.FATTR_SIZE, sub_id, size=0)
    setattr("chmod a symlink", fuse.FATTR_MODE, s.lookup(dir_id, b"link"), mode=0o600)
    setattr("nanoseconds out of range", fuse.FATTR_MTIME, mtime=5, mns=1_000_000_000)
    setattr("seconds beyond 63 bits", fuse.FATTR_MTIME, mtime=1 << 63)
    setattr("size beyond 63 bits", fuse.FATTR_SIZE, size=1 << 63)
    setattr("kill suid/sgid", fuse.FATTR_SIZE | fuse.FATTR_KILL_SUIDGID, size=3)
    setattr("owner", fuse.FATTR_UID | fuse.FATTR_GID)
    fh = s.open(attrs_id, os.O_RDWR)
    setattr("truncate through a handle", fuse.FATTR_SIZE | fuse.FATTR_FH, size=2, fh=fh)
    s.release(attrs_id, fh)
    setattr("forged", fuse.FATTR_MODE, 987654, mode=0o600)
    setattr("reply does not fit", fuse.FATTR_MODE, mode=0o600, out_size=64)
    s.req("setattr short", Opcode.SETATTR, attrs_id, b"\0" * 40)
    st = os.stat(s.dir / "attrs")
    s.note("attrs", (oct(st.st_mode), st.st_size, st.st_atime_ns))  # the last truncate: mtime


# ----- the daemons and the tests ------------------------------------------------------


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Daemon]]]:
    """One share, a daemon with the C path on and one with it off."""
    base = tmp_path_factory.mktemp("differential")
    share = base / "share"
    share.mkdir()
    with contextlib.ExitStack() as stack:
        running: dict[str, Daemon] = {}
        for path in PATHS:
            proc = stack.enter_context(pyvirtiofsd(share, base / f"{path}.sock",
                                                   "--c-fast-path", path))
            front = Frontend(str(base / f"{path}.sock"))
            stack.callback(front.close)
            front.setup(3)
            front.init()
            # the socket appears before the tables are made; after INIT they are
            table = InodeTable.attach(f"/pyvirtiofsd-{proc.pid}-inodes")
            stack.callback(table.detach)
            stats = QueueStats.attach(segment_name(proc.pid))
            stack.callback(stats.close)
            running[path] = Daemon(path, proc.pid, front, table, stats)
        yield share, running
    shutil.rmtree(share, ignore_errors=True)


def test_every_c_opcode_has_a_case() -> None:
    """The table is the truth: each opcode C may answer needs a differential case."""
    missing = {Opcode(op).name for op in C_OPCODES - CASES.keys()}
    assert not missing, f"C-answered opcodes without a differential case: {missing}"
    stale = {Opcode(op).name for op in CASES.keys() - C_OPCODES}
    assert not stale, f"cases for opcodes C no longer answers: {stale}"


@pytest.mark.parametrize("opcode", sorted(C_OPCODES), ids=lambda op: Opcode(op).name)
def test_c_and_python_answer_alike(daemons: tuple[Path, dict[str, Daemon]],
                                   opcode: int) -> None:
    share, running = daemons
    assert opcode in CASES, f"{Opcode(opcode).name}: no differential case (add one to CASES)"
    prepare, run = CASES[opcode]
    name = Opcode(opcode).name.lower()
    sessions: dict[str, Session] = {}
    for path, daemon in running.items():
        prepare(share / name)
        s = sessions[path] = Session(daemon, opcode, share / name)
        # the directory's times change with what the cases make and remove in it
        run(s, s.lookup(1, name.encode(),
                        normalise=lambda b: without_times(b, ATTR_AT_IN_ENTRY)))
    on, off = sessions["on"], sessions["off"]
    assert [a[0] for a in on.answers] == [a[0] for a in off.answers]
    for c_answer, python_answer in zip(on.answers, off.answers, strict=True):
        assert c_answer == python_answer, c_answer[0]
    assert on.target_in_c > 0, f"no {name} request answered in C: nothing was compared"
    assert off.in_c == 0, "--c-fast-path off: a request was answered in C"


def test_debug_logging_leaves_the_c_path_on(tmp_path: Path) -> None:
    """--log-level debug logs each request Python answers; it no longer moves the C
    path's requests to Python (those are not logged one by one)."""
    share = tmp_path / "share"
    share.mkdir()
    sock = tmp_path / "debug.sock"
    with pyvirtiofsd(share, sock, "--log-level", "debug") as proc:
        front = Frontend(str(sock))
        front.setup(2)
        front.init()
        stats = QueueStats.attach(segment_name(proc.pid))
        try:
            assert front.fuse(Opcode.GETATTR, 1)[0] == 0
            assert front.fuse(Opcode.STATFS, 1)[0] == 0
            assert sum(row["in_c"] for row in stats.rows()) == 1  # the GETATTR
        finally:
            stats.close()
            front.close()
        log = daemon_log(proc)
    assert f"opcode {int(Opcode.STATFS)} nodeid 1" in log
    assert f"opcode {int(Opcode.GETATTR)} nodeid" not in log
