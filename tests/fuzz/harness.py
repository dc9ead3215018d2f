"""One fuzz input = one program, run against a live daemon instance, with the invariants
checked after every batch.

The input's bytes are read as a sequence of decisions (``Reader``); every byte string is
a valid program. A program is a sequence of actions: FUSE requests of every opcode on the
two request queues (and now and then on the high-priority one), with nodeids, file
handles and names drawn from what the guest holds and what the share contains, plus
forged and stale ones and malformed structs; FORGET and BATCH_FORGET with counts below,
at and above what the guest holds; DESTROY; SETLKW that must wait (the fuzzer holds a
conflicting lock on the host) and INTERRUPTs for them; memory-table changes while
requests are in flight; and "sync", which waits for every reply and checks:

* every used-ring entry: a head in flight, a length within the writable room, a reply
  whose header matches (checked as it arrives, tests.fuzz.guest);
* every nodeid the guest holds answers GETATTR with the inode it named at LOOKUP, and every
  open file handle is the file it was opened on (through the daemon's handle table and its
  fd), a directory handle lists ``.`` as that directory;
* names the daemon listed or looked up exist on the host with the inode it answered;
* a CREATE/MKDIR/MKNOD/SYMLINK/LINK that failed left nothing on the host; a new file
  belongs to the caller;
* no fd of the daemon is a leak, a special file, or outside the share (tests.fuzz.checks);
* the daemon opened no FIFO, device node or socket (inotify);
* no worker sleeps for more than a second in a system call other than its idle wait,
  while requests wait for it (parked SETLKWs wait in the idle loop and do not count);
* no worker died and the daemon logged no unexpected exception.

At the end of the input the guest releases and forgets everything it holds; then the
inode table must be back to the root (and the entries whose count the model could not
know) and the open-file table empty, and nothing outside the share may have changed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from daemon.protocol import fuse
from shm_table import HandleTable, InodeTable
from tests.fuzz import checks, share
from tests.fuzz.guest import ExtraRegion, Finding, Guest, Pending
from tests.fuzz.model import ROOT, Handle, Model, join, parse_direntplus, parse_dirents, parse_entry

O = fuse.Opcode  # noqa: E741 - short, used everywhere
MAX_STEPS = 400
BLOCK_LIMIT = 1.0  # seconds a worker may sleep outside its idle wait while requests wait
REPLY_LIMIT = 8.0  # seconds for any request that is not a parked SETLKW
INTERRUPT_LIMIT = 2.0  # seconds for a SETLKW to answer after its INTERRUPT
# a small inode table (the big directory fills it) and a small fd budget (the workers'
# fd caches evict all the time: their fds come and go, and numbers get reused)
COMMON = ["--inode-table-size", "128", "--handle-table-size", "64", "--xattr",
          "--rlimit-nofile", "1200"]
CONFIGS: list[list[str]] = [COMMON, [*COMMON, "--inode-file-handles", "never"]]
POOL = [b"n0", b"n1", b"n2", b"n3"]
BAD_NAMES = [b".", b"..", b"a/b", b"", b"x" * 256, b"\xff"]
SIZES = [0, 1, 100, 4096, 65536, 131072]
UIDS = [0, 0, 0, 1000, 65534]
NAMESPACE_OPS = {O.RENAME, O.RENAME2, O.UNLINK, O.RMDIR, O.LINK}
CREATE_OPS = {O.CREATE, O.MKDIR, O.MKNOD, O.SYMLINK, O.LINK}
ENTRY_OPS = {O.LOOKUP, O.MKDIR, O.MKNOD, O.SYMLINK, O.LINK, O.CREATE, O.TMPFILE}
REQ_OPS = [
    O.LOOKUP, O.LOOKUP, O.LOOKUP, O.LOOKUP, O.GETATTR, O.READDIRPLUS, O.READDIRPLUS,
    O.OPENDIR, O.OPENDIR, O.OPEN, O.OPEN, O.READ, O.WRITE, O.CREATE, O.CREATE, O.MKDIR,
    O.MKNOD, O.SYMLINK, O.LINK, O.UNLINK, O.RMDIR, O.RENAME, O.RENAME2, O.SETATTR,
    O.READLINK, O.STATFS, O.RELEASE, O.RELEASEDIR, O.FLUSH, O.FSYNC, O.FSYNCDIR, O.ACCESS,
    O.FALLOCATE, O.LSEEK, O.COPY_FILE_RANGE, O.SYNCFS, O.SYNCFS, O.TMPFILE, O.GETLK,
    O.SETLK, O.GETXATTR, O.LISTXATTR, O.SETXATTR, O.REMOVEXATTR, O.READDIR, O.INIT, 99,
]
# one byte picks the action: memory-table changes and DESTROY are rare, as in life
ACTIONS = (["req"] * 43 + ["forget"] * 6 + ["batch_forget"] * 2 + ["sync"] * 2
           + ["setlkw"] * 2 + ["interrupt"] * 2 + ["unlock", "fill", "fill", "creates",
              "creates", "mem", "destroy"])
TRACE = bool(os.environ.get("PYVFS_FUZZ_TRACE"))
INIT_ARG = fuse.INIT_IN.pack(7, 38, 131072, 0xFFFFFFFF & ~fuse.INIT_EXT, 0) + bytes(44)


class Reader:
    """The input's bytes as decisions; past the end every decision reads 0."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)

    def byte(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def below(self, n: int) -> int:
        if n <= 1:
            return 0
        if n <= 256:
            return self.byte() % n
        return (self.byte() | self.byte() << 8) % n

    def pick(self, seq: list) -> object:
        return seq[self.below(len(seq))]

    def chance(self, in256: int) -> bool:
        return self.byte() < in256

    def u32(self) -> int:
        return int.from_bytes(bytes(self.byte() for _ in range(4)), "little")

    def u64(self) -> int:
        return int.from_bytes(bytes(self.byte() for _ in range(8)), "little")


@dataclass
class Batch:
    """What the requests since the last sync did, for the checks that need it."""

    pending: list[Pending] = field(default_factory=list)
    names: Counter = field(default_factory=Counter)  # (parent path, name) touched
    namespace_changed: bool = False
    overforgot: set[int] = field(default_factory=set)
    destroy: bool = False
    learned: list[tuple[str, int, str]] = field(default_factory=list)  # path, ino, how
    failed_creates: list[tuple[str, Pending]] = field(default_factory=list)
    foreign_owner: list[tuple[Pending, int]] = field(default_factory=list)  # new, not ours
    released_unknown: set[int] = field(default_factory=set)  # fhs the model did not hold


class Instance:
    """A daemon with its share, the tables attached read-only, and the watches."""

    def __init__(self, workdir: Path, options: list[str], coverage_map: str | None) -> None:
        self.workdir = workdir
        if workdir.exists():
            shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        self.share = workdir / "share"
        self.outside = workdir / "outside"
        self.share.mkdir()
        self.tree = share.Share(self.share, self.outside)
        self.options = options
        self.guest = Guest(workdir, self.share, options, coverage_map)
        g = self.guest
        p = g.submit(1, O.INIT, 0, INIT_ARG)
        self.wait_one(p)
        if p.error:
            raise RuntimeError(f"INIT failed: {p.error}")
        pid = g.proc.pid
        self.inodes = InodeTable.attach(f"/pyvirtiofsd-{pid}-inodes")
        self.handles = HandleTable.attach(f"/pyvirtiofsd-{pid}-handles")
        self.baseline = {i.fd: i.target for i in checks.list_fds(pid)}
        self.watch = checks.OpenWatch()
        self.watch.watch_tree(str(self.share))
        self.before = share.snapshot(workdir, self.share)
        self.log_seen = 0
        self.inputs = 0
        self.deaths = 0  # workers that died and were replaced by the supervisor
        self.history: list[bytes] = []
        self.host_locks: list[int] = []

    def wait_one(self, p: Pending, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not p.done:
            self.guest.poll()
            if time.monotonic() > deadline:
                raise Finding("no-reply", f"request {p.unique} (opcode {p.opcode}) not "
                              f"answered in {timeout} s")
            self.guest.wait_calls(0.05)

    def new_log(self) -> str:
        """The daemon's log lines since the last call."""
        with open(self.guest.log_path, "rb") as f:
            f.seek(self.log_seen)
            data = f.read()
        self.log_seen += len(data)
        return data.decode(errors="replace")

    def reset_share(self) -> None:
        for fd in self.host_locks:
            os.close(fd)
        self.host_locks = []
        self.tree.reset()
        self.watch.events()  # the reset's own opens
        self.watch.watch_tree(str(self.share))  # directories made again
        self.before = share.snapshot(self.workdir, self.share)

    def close(self) -> None:
        for fd in self.host_locks:
            os.close(fd)
        self.host_locks = []
        for table in (self.inodes, self.handles):
            try:
                table.detach()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        self.watch.close()
        self.guest.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


class Program:
    """Runs one input against an instance and checks the invariants."""

    actions: list[str] = ACTIONS  # what run() picks from (--without narrows it)

    def __init__(self, inst: Instance, data: bytes) -> None:
        self.inst = inst
        self.g = inst.guest
        self.r = Reader(data)
        self.model = Model(os.lstat(inst.share).st_ino)
        self.batch = Batch()
        self.batch_no = 0
        self.setlkws: list[Pending] = []
        self.checks = 0

    # ----- choosing things -------------------------------------------------------

    def host(self, rel: str | None) -> Path | None:
        return None if rel is None else (self.inst.share / rel if rel else self.inst.share)

    def pick_node(self, want: str = "") -> int:
        r = self.r
        b = r.byte()
        if b < 200:
            nodes = list(self.model.nodes.values())
            if want == "dir":
                nodes = [n for n in nodes if stat.S_ISDIR(n.mode)] or nodes
            elif want == "file":
                nodes = [n for n in nodes if stat.S_ISREG(n.mode)] or nodes
            # by path, not nodeid: nodeids depend on which queue won a race for a slot,
            # paths do not, so a replay picks the same files
            nodes.sort(key=lambda n: (n.path is None, n.path or "", n.mode, n.nodeid))
            return nodes[r.below(len(nodes))].nodeid
        if b < 220:
            return ROOT
        if b < 240 and self.model.dead:
            return self.model.dead[r.below(len(self.model.dead))]
        return r.pick([0, 2, 1 << 32 | 5, (1 << 64) - 1, r.u64()])

    def pick_fh(self, want_dir: bool | None = None) -> tuple[int, Handle | None]:
        r = self.r
        b = r.byte()
        if b < 220 and self.model.handles:
            hs = sorted(self.model.handles.values(),
                        key=lambda h: (h.path is None, h.path or "", h.is_dir, h.flags, h.fh))
            if want_dir is not None:
                hs = [h for h in hs if h.is_dir == want_dir] or hs
            h = hs[r.below(len(hs))]
            return h.fh, h
        if b < 240 and self.model.released:
            return self.model.released[r.below(len(self.model.released))], None
        return r.pick([0, 1, 2 << 32 | 1, r.u64()]), None

    def pick_name(self, parent: int) -> bytes:
        """A name in the parent's real listing on the host, a new one, or a bad one."""
        r = self.r
        b = r.byte()
        node = self.model.node(parent)
        if b < 150 and node is not None and node.path is not None:
            try:
                names = sorted(os.listdir(self.host(node.path)))
            except OSError:
                names = []
            if names:
                return os.fsencode(names[r.below(len(names))])
        if b < 235:
            return POOL[r.below(len(POOL))]
        return BAD_NAMES[r.below(len(BAD_NAMES))]

    def mangle(self, arg: bytes) -> bytes:
        r = self.r
        b = r.byte()
        if b < 10 and arg:
            return arg[: r.below(len(arg))]
        if b < 20:
            return arg + bytes(r.byte() for _ in range(r.below(24) + 1))
        return arg

    # ----- actions ---------------------------------------------------------------

    def run(self) -> None:
        r = self.r
        steps = 0
        while not r.exhausted and steps < MAX_STEPS:
            steps += 1
            action = r.pick(ACTIONS)
            if action in self.actions:
                getattr(self, "act_" + action)()
        self.sync()
        self.finish()

    def queue(self) -> int:
        b = self.r.byte()
        return 0 if b < 12 else 1 + (b & 1)

    def room(self, q: int) -> bool:
        if not self.g.can_submit(q):
            self.sync()
        return self.g.can_submit(q)

    def send(self, q: int, op: int, nodeid: int, arg: bytes, meta: dict, *,
             uid: int = 0, out_size: int = 4096, layout: int = 0,
             region: ExtraRegion | None = None) -> Pending | None:
        """Submit a request of the program (one of this batch)."""
        if not self.room(q):
            return None
        if meta.get("batch", self.batch_no) != self.batch_no:
            # built for the batch before: no host checks, and the batch it lands in
            # knows its name is in use
            meta.pop("existed", None)
            self.batch.names[(meta.get("parent_path"), meta.get("name"))] += 1
        if region is not None:
            meta["region"] = region
        p = self.g.submit(q, op, nodeid, arg, uid=uid, gid=uid, out_size=out_size,
                          layout=layout, beyond=region, meta=meta)
        self.batch.pending.append(p)
        if op in NAMESPACE_OPS:  # it may act even when its reply is lost (no room)
            self.batch.namespace_changed = True
        if op == O.SETLKW:
            self.setlkws.append(p)
            p.meta["fh"] = fuse.LK_IN.unpack_from(arg)[0] if len(arg) >= fuse.LK_IN.size else 0
        return p

    def act_req(self) -> None:
        r = self.r
        op = int(r.pick(REQ_OPS))
        q = self.queue()
        if not self.room(q):  # before the request is built: what it saw must stay true
            return
        uid = int(r.pick(UIDS))
        layout = r.below(4)
        nodeid = self.pick_node("dir" if op in (O.LOOKUP, O.MKDIR, O.MKNOD, O.SYMLINK,
                                                O.CREATE, O.UNLINK, O.RMDIR, O.RENAME,
                                                O.RENAME2, O.LINK, O.TMPFILE, O.OPENDIR)
                                else "")
        meta: dict = {"op": op, "uid": uid}
        arg = self.build(op, nodeid, meta)
        if op in (O.INIT,):
            arg = INIT_ARG
        arg = self.mangle(arg)
        meta["arg_len"] = len(arg)
        if TRACE:
            meta["arg"] = arg
        if op in (O.RELEASE, O.RELEASEDIR):
            # the fh the daemon will read (a truncated struct reads as zero-padded)
            fh = int.from_bytes(arg[:8].ljust(8, b"\0"), "little")
            if self.model.handles.pop(fh, None) is not None:
                self.model.released.append(fh)
            else:  # forged or stale: it may still name a file opened in this batch
                self.batch.released_unknown.add(fh)
        out = r.pick([4096, 4096, 4096, 160 * 1024, 16, 0]) if op != O.READ else \
            meta.get("size", 4096) + 16
        if op in (O.READDIR, O.READDIRPLUS):
            out = max(out, meta.get("size", 4096) + 16) if out else 0
        self.send(q, op, nodeid, arg, meta, uid=uid, out_size=out, layout=layout)

    def build(self, op: int, nodeid: int, meta: dict) -> bytes:
        """The request's arguments (well formed; mangle() may break them)."""
        r = self.r
        node = self.model.node(nodeid)
        meta["parent_path"] = node.path if node is not None else None
        if op in (O.LOOKUP, O.UNLINK, O.RMDIR):
            name = self.pick_name(nodeid)
            self.note_name(meta, name)
            return name + b"\0"
        if op in (O.CREATE, O.MKDIR, O.MKNOD, O.SYMLINK):
            name = self.pick_name(nodeid)
            self.note_name(meta, name)
            mode = r.pick([0o644, 0o755, 0o4755, 0o600, 0o777, r.u32() & 0o7777])
            if op == O.CREATE:
                flags = r.pick([os.O_WRONLY | os.O_CREAT, os.O_RDWR | os.O_CREAT | os.O_EXCL,
                                os.O_RDWR | os.O_CREAT | os.O_TRUNC, os.O_RDONLY,
                                os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, r.u32()])
                meta["flags"] = flags
                return fuse.CREATE_IN.pack(flags, stat.S_IFREG | mode, 0o022, 0) + name + b"\0"
            if op == O.MKDIR:
                return fuse.MKDIR_IN.pack(mode, 0o022) + name + b"\0"
            if op == O.MKNOD:
                kind = r.pick([stat.S_IFIFO, stat.S_IFCHR, stat.S_IFREG, stat.S_IFSOCK,
                               stat.S_IFBLK, 0])
                rdev = r.pick([os.makedev(1, 3), os.makedev(1, 5), 0, r.u32()])
                return fuse.MKNOD_IN.pack(kind | mode, rdev, 0o022, 0) + name + b"\0"
            target = r.pick([b"file", b"../outside/victim", b"/etc/passwd", b"dir",
                             b"n0", b"x" * 300])
            return name + b"\0" + target + b"\0"
        if op == O.LINK:
            old = self.pick_node("file")
            name = self.pick_name(nodeid)
            self.note_name(meta, name)
            meta["old"] = old
            return fuse.LINK_IN.pack(old) + name + b"\0"
        if op in (O.RENAME, O.RENAME2):
            newdir = self.pick_node("dir")
            old = self.pick_name(nodeid)
            new = self.pick_name(newdir)
            self.note_name(meta, old)
            nd = self.model.node(newdir)
            meta["new_parent_path"] = nd.path if nd is not None else None
            self.batch.names[(meta["new_parent_path"], new)] += 1
            meta["new_name"] = new
            if op == O.RENAME:
                return fuse.RENAME_IN.pack(newdir) + old + b"\0" + new + b"\0"
            flags = r.pick([0, 1, 2, 4, r.u32()])  # NOREPLACE, EXCHANGE, WHITEOUT
            return fuse.RENAME2_IN.pack(newdir, flags, 0) + old + b"\0" + new + b"\0"
        if op == O.TMPFILE:
            flags = r.pick([os.O_RDWR, os.O_WRONLY, os.O_RDWR | os.O_EXCL, r.u32()])
            meta["flags"] = flags
            return fuse.CREATE_IN.pack(flags, stat.S_IFREG | 0o600, 0o022, 0)
        if op in (O.OPEN, O.OPENDIR):
            flags = r.pick([os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC,
                            os.O_RDONLY | os.O_DIRECTORY, os.O_RDWR | os.O_APPEND,
                            0o20200000 | os.O_RDWR,  # O_TMPFILE
                            os.O_RDONLY | os.O_NONBLOCK, os.O_PATH, r.u32()])
            meta["flags"] = flags
            return fuse.OPEN_IN.pack(flags, 0)
        if op == O.GETATTR:
            fh, _ = self.pick_fh()
            return fuse.GETATTR_IN.pack(r.pick([0, 0, fuse.GETATTR_FH]), 0, fh)
        if op == O.SETATTR:
            fh, _ = self.pick_fh(False)
            valid = r.pick([fuse.FATTR_MODE, fuse.FATTR_SIZE, fuse.FATTR_SIZE | fuse.FATTR_FH,
                            fuse.FATTR_UID | fuse.FATTR_GID, fuse.FATTR_ATIME
                            | fuse.FATTR_MTIME, fuse.FATTR_ATIME_NOW | fuse.FATTR_ATIME,
                            r.u32()])
            size = r.pick([0, 1, 4096, 1 << 20])
            mode = r.pick([0o644, 0o755, 0o000, 0o4755])
            owner = r.pick([0, 1000, 65534])
            return fuse.SETATTR_IN.pack(valid, 0, fh, size, 0, 1, 2, 3, 4, 5, 6, mode, 0,
                                        owner, owner, 0)
        if op in (O.READ, O.READDIR, O.READDIRPLUS):
            fh, h = self.pick_fh(op != O.READ)
            size = int(r.pick(SIZES))
            meta["size"] = size
            meta["fh"] = fh
            off = r.pick([0, 0, 0, 1, 4096, 1 << 62, r.u64()])
            return fuse.READ_IN.pack(fh, off, size, 0, 0, 0, 0)
        if op == O.WRITE:
            fh, _ = self.pick_fh(False)
            data = bytes([r.byte()]) * r.pick([0, 1, 100, 4096, 70000])
            off = r.pick([0, 4096, 1 << 20, r.u32()])
            return fuse.WRITE_IN.pack(fh, off, len(data), 0, 0, 0, 0) + data
        if op in (O.RELEASE, O.RELEASEDIR):
            fh, h = self.pick_fh(op == O.RELEASEDIR)
            meta["fh"] = fh  # given up in act_req, once the arguments are final
            return fuse.RELEASE_IN.pack(fh, 0, 0, 0)
        if op == O.FLUSH:
            fh, _ = self.pick_fh(False)
            return fuse.FLUSH_IN.pack(fh, 0, 0, r.u64())
        if op in (O.FSYNC, O.FSYNCDIR):
            fh, _ = self.pick_fh(op == O.FSYNCDIR)
            return fuse.FSYNC_IN.pack(fh, r.below(2), 0)
        if op == O.ACCESS:
            return fuse.ACCESS_IN.pack(r.pick([0, 1, 2, 4, 7]), 0)
        if op == O.FALLOCATE:
            fh, _ = self.pick_fh(False)
            return fuse.FALLOCATE_IN.pack(fh, r.pick([0, 4096]), r.pick([1, 4096, 1 << 20]),
                                          r.pick([0, 1, 3, 0x10]), 0)
        if op == O.LSEEK:
            fh, _ = self.pick_fh()
            return fuse.LSEEK_IN.pack(fh, r.pick([0, 1, 4096]), r.pick([0, 1, 2, 3, 4, 9]), 0)
        if op == O.COPY_FILE_RANGE:
            a, _ = self.pick_fh(False)
            b, _ = self.pick_fh(False)
            return fuse.COPY_FILE_RANGE_IN.pack(a, 0, nodeid, b, r.pick([0, 100]),
                                                r.pick([1, 4096, 1 << 20]), 0)
        if op in (O.GETLK, O.SETLK):
            fh, _ = self.pick_fh(False)
            return fuse.LK_IN.pack(fh, r.u32(), r.pick([0, 10]), r.pick([fuse.OFFSET_MAX, 20]),
                                   r.pick([0, 1, 2, 7]), 77, r.below(2), 0)
        if op in (O.GETXATTR, O.LISTXATTR):
            size = r.pick([0, 4, 4096])
            name = r.pick([b"user.fz", b"user.none", b"trusted.x", b"system.posix_acl_access"])
            return fuse.GETXATTR_IN.pack(size, 0) + (name + b"\0" if op == O.GETXATTR else b"")
        if op == O.SETXATTR:
            value = bytes(r.below(40))
            name = r.pick([b"user.fz", b"trusted.x", b"security.capability"])
            return fuse.SETXATTR_IN_COMPAT.pack(len(value), r.below(3)) + name + b"\0" + value
        if op == O.REMOVEXATTR:
            return r.pick([b"user.fz", b"user.none"]) + b"\0"
        if op == O.SYNCFS:
            return fuse.SYNCFS_IN.pack(0)
        return bytes(r.byte() for _ in range(r.below(32)))

    def note_name(self, meta: dict, name: bytes) -> None:
        meta["name"] = name
        meta["batch"] = self.batch_no
        self.batch.names[(meta.get("parent_path"), name)] += 1
        if meta.get("parent_path") is not None:
            meta["path"] = join(meta["parent_path"], name)
            host = self.host(meta["path"])
            try:
                existed = host is not None and os.path.lexists(host)
            except (OSError, ValueError):
                existed = True
            meta["existed"] = existed

    def act_forget(self) -> None:
        r = self.r
        nodeid = self.pick_node()
        n = self.forget_count(nodeid)
        q = 0 if r.byte() < 200 else 1 + r.below(2)
        self.send(q, O.FORGET, nodeid, fuse.FORGET_IN.pack(n), {"op": O.FORGET},
                  out_size=0)

    def forget_count(self, nodeid: int) -> int:
        r = self.r
        node = self.model.node(nodeid)
        held = node.count if node is not None and nodeid != ROOT else 0
        n = r.pick([held, held, max(held - 1, 1), held + 1, held + 2, held + 100, 1,
                    (1 << 64) - 1, 0])
        if self.model.forget(nodeid, n):
            self.batch.overforgot.add(nodeid)
        return n

    def act_batch_forget(self) -> None:
        r = self.r
        n = r.below(5) + 1
        count = n if r.byte() < 230 else r.pick([0, 1, 1000, 0xFFFFFFFF])
        items = []
        for i in range(n):
            nodeid = self.pick_node()
            if i < count:  # the daemon reads no more than the count says
                items.append((nodeid, self.forget_count(nodeid)))
            else:
                items.append((nodeid, r.pick([1, 1 << 40])))
        arg = fuse.BATCH_FORGET_IN.pack(count, 0) + b"".join(
            fuse.FORGET_ONE.pack(n, c) for n, c in items)
        self.send(0, O.BATCH_FORGET, 0, arg, {"op": O.BATCH_FORGET}, out_size=0)

    def act_destroy(self) -> None:
        if self.r.byte() >= 48:
            return
        self.send(0 if self.r.byte() < 128 else 1, O.DESTROY, 0, b"", {"op": O.DESTROY})
        self.batch.destroy = True
        self.model.forget_everything()

    def act_sync(self) -> None:
        self.sync()

    def act_fill(self) -> None:
        """OPENDIR + READDIRPLUS of the big directory: more entries than the inode table
        holds, so what follows runs with the table full."""
        many = next((n for n in self.model.nodes.values() if n.path == "many"), None)
        if many is None:
            p = self.send(1, O.LOOKUP, ROOT, b"many\0",
                          {"op": O.LOOKUP, "parent_path": "", "name": b"many",
                           "path": "many", "existed": True})
            self.sync()
            many = next((n for n in self.model.nodes.values() if n.path == "many"), None)
            if many is None or p is None:
                return
        p = self.send(2, O.OPENDIR, many.nodeid, fuse.OPEN_IN.pack(0, 0), {"op": O.OPENDIR})
        self.sync()
        if p is None or p.error:
            return
        fh = struct.unpack_from("<Q", p.payload)[0]
        size = 65536
        self.send(1 + self.r.below(2), O.READDIRPLUS, many.nodeid,
                  fuse.READ_IN.pack(fh, 0, size, 0, 0, 0, 0),
                  {"op": O.READDIRPLUS, "fh": fh, "size": size}, out_size=size + 16)

    def act_creates(self) -> None:
        """A burst of creations in one directory (with the table full, each must fail
        without leaving its file behind)."""
        r = self.r
        parent = self.pick_node("dir")
        for _ in range(r.below(4) + 1):
            op = int(r.pick([O.CREATE, O.MKDIR, O.MKNOD, O.SYMLINK]))
            q = 1 + r.below(2)
            if not self.room(q):
                return
            meta: dict = {"op": op, "uid": 0}
            arg = self.build(op, parent, meta)
            self.send(q, op, parent, arg, meta)

    def act_setlkw(self) -> None:
        """A SETLKW that has to wait: the fuzzer takes a conflicting lock on the host
        first (flock, or an OFD lock for POSIX locks)."""
        r = self.r
        fh, h = self.pick_fh(False)
        flock = r.byte() < 128
        if h is not None and h.path is not None and r.byte() < 220:
            try:
                fd = os.open(self.host(h.path), os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                fd = -1
            if fd >= 0 and stat.S_ISREG(os.fstat(fd).st_mode):
                try:
                    if flock:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    else:
                        fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0,
                                                        0))  # F_OFD_SETLK
                except OSError:
                    pass
                self.inst.host_locks.append(fd)
            elif fd >= 0:
                os.close(fd)
        q = 1 + r.below(2)
        arg = fuse.LK_IN.pack(fh, r.u32() | 1, 0, fuse.OFFSET_MAX, fcntl.F_WRLCK, 77,
                              fuse.LK_FLOCK if flock else 0, 0)
        self.send(q, O.SETLKW, h.nodeid if h is not None else ROOT, arg,
                  {"op": O.SETLKW}, layout=r.below(4))

    def act_interrupt(self) -> None:
        r = self.r
        waiting = [p for p in self.setlkws if not p.done]
        if waiting and r.byte() < 230:
            target = waiting[r.below(len(waiting))]
            unique = target.unique
            target.meta.setdefault("interrupted", time.monotonic())
        else:
            unique = r.pick([self.g.unique, r.u64()])
        q = 0 if r.byte() < 160 else 1 + r.below(2)
        self.send(q, O.INTERRUPT, 0, fuse.INTERRUPT_IN.pack(unique), {"op": O.INTERRUPT},
                  out_size=r.pick([0, 4096]))

    def act_unlock(self) -> None:
        for fd in self.inst.host_locks:
            os.close(fd)
        self.inst.host_locks = []

    def act_mem(self) -> None:
        """A memory-table change while requests are in flight."""
        r = self.r
        kind = r.below(5)
        g = self.g
        # a table the daemon refuses (REPLY_ACK != 0) is fine; one it takes must work
        if kind == 0:
            g.resend_table(split=False)
        elif kind == 1:
            g.resend_table(split=True)
        elif kind == 2:
            g.add_region(oversized=False)
        elif kind == 3:
            region = g.oversized() or g.add_region(oversized=True)
            if region is not None:
                # the daemon took a region larger than its file: a reply there must
                # not cost a worker
                self.send(1 + r.below(2), O.GETATTR, ROOT, bytes(16), {"op": O.GETATTR},
                          region=region)
        else:
            g.remove_region()

    # ----- waiting and learning ----------------------------------------------------

    def wait_batch(self) -> None:
        g = self.g
        start = time.monotonic()
        blocked_checked = False
        while True:
            for p in g.poll():
                self.complete(p)
            waiting = [p for p in self.batch.pending if not p.done and p.opcode != O.SETLKW]
            now = time.monotonic()
            for p in self.setlkws:
                since = p.meta.get("interrupted")
                if not p.done and since is not None and now - since > INTERRUPT_LIMIT:
                    raise Finding("setlkw", f"SETLKW {p.unique} not answered "
                                  f"{INTERRUPT_LIMIT} s after its INTERRUPT")
            if not waiting:
                return
            if now - start > BLOCK_LIMIT and not blocked_checked:
                blocked_checked = True
                stuck = checks.blocked_workers(g.daemon_pids())
                if stuck:
                    ops = ", ".join(f"opcode {p.opcode} nodeid {p.nodeid:#x} q{p.q}"
                                    for p in waiting[:6])
                    raise Finding("blocked", "; ".join(checks.describe(t) for t in stuck)
                                  + f" for > {BLOCK_LIMIT} s, with requests waiting: {ops}")
            if now - start > REPLY_LIMIT:
                self.check_daemon()  # a dead worker explains it better
                raise Finding("no-reply", f"{len(waiting)} requests unanswered after "
                              f"{REPLY_LIMIT} s, e.g. opcode {waiting[0].opcode}")
            if g.proc.poll() is not None:
                raise Finding("daemon-exit", f"the daemon exited with {g.proc.returncode}")
            g.wait_calls(0.02)

    def complete(self, p: Pending) -> None:
        """Learn what the reply hands the guest."""
        meta = p.meta
        op = meta.get("op")
        if TRACE:
            extra = ""
            if not p.error and p.written and op in (O.OPEN, O.OPENDIR):
                extra = f" fh {struct.unpack_from('<Q', p.payload)[0]:#x}"
            elif not p.error and op in (O.CREATE, O.TMPFILE) and len(p.payload) >= 136:
                extra = f" fh {struct.unpack_from('<Q', p.payload, 128)[0]:#x}"
            elif op in (O.RELEASE, O.RELEASEDIR, O.READ, O.WRITE, O.SETLKW):
                extra = f" (fh {meta.get('fh', 0):#x})"
            print(f"  q{p.q} op {p.opcode} nodeid {p.nodeid:#x} {meta.get('name', b'')!r} -> "
                  f"{p.error} ({p.written} bytes){extra}"
                  + (f" flags {meta['flags']:#o}" if 'flags' in meta else "")
                  + (f" arg {meta['arg'][:80]!r}" if p.error and 'arg' in meta else ""))
        if op in (O.FORGET, O.BATCH_FORGET):
            if p.written:
                raise Finding("reply", f"FORGET answered with {p.written} bytes")
            return
        if p.written == 0 and op in NAMESPACE_OPS:
            self.moved(meta)  # no answer, but it may have acted
        if p.written == 0 or op is None:
            return
        if p.error:
            if op in CREATE_OPS and meta.get("path") is not None \
                    and meta.get("existed") is False:
                self.batch.failed_creates.append((meta["path"], p))
            return
        payload = p.payload
        if op in ENTRY_OPS and len(payload) >= fuse.ENTRY_OUT_SIZE:
            nodeid, ino, mode, uid, _gid = parse_entry(payload)
            if nodeid == 0:
                return
            path = meta.get("path") if op != O.TMPFILE else None
            if op in CREATE_OPS - {O.LINK} and meta.get("existed") is False and \
                    uid != meta.get("uid", 0):
                self.batch.foreign_owner.append((p, uid))
            self.learn(nodeid, ino, mode, path, f"opcode {op}")
            if op in (O.CREATE, O.TMPFILE) and len(payload) >= fuse.ENTRY_OUT_SIZE + 8:
                fh = struct.unpack_from("<Q", payload, fuse.ENTRY_OUT_SIZE)[0]
                self.learn_handle(Handle(fh, nodeid, ino, False, path, meta.get("flags", 0),
                                         op))
        elif op in (O.OPEN, O.OPENDIR) and len(payload) >= 8:
            fh = struct.unpack_from("<Q", payload)[0]
            node = self.model.node(p.nodeid)
            if node is not None:
                self.learn_handle(Handle(fh, p.nodeid, node.ino, stat.S_ISDIR(node.mode),
                                         node.path, meta.get("flags", 0), op))
            else:  # opened through a nodeid the model does not hold: not checked
                self.learn_handle(Handle(fh, p.nodeid, -1, op == O.OPENDIR, None))
        elif op == O.READDIRPLUS:
            h = self.model.handles.get(meta.get("fh", -1))
            entries = parse_direntplus(payload)
            self.check_dot(h, [(name, ino) for name, _, ino, _ in entries], "READDIRPLUS")
            # names come from the fh's directory, but each is looked up in the nodeid's
            # (a guest may send an fh of another directory: virtiofsd answers EBADF, this
            # daemon lists one directory and looks the names up in the other)
            node = self.model.node(p.nodeid)
            lpath = node.path if node is not None else None
            for name, nodeid, ino, mode in entries:
                if nodeid:
                    self.learn(nodeid, ino, mode, join(lpath, name), "READDIRPLUS")
        elif op == O.READDIR:
            h = self.model.handles.get(meta.get("fh", -1))
            entries = parse_dirents(payload)
            self.check_dot(h, entries, "READDIR")
            if h is not None and h.path is not None:
                for name, ino in entries:
                    if name not in (b".", b".."):
                        self.batch.learned.append((join(h.path, name) or "?", ino, "READDIR"))
        if op in NAMESPACE_OPS:
            self.moved(meta)

    def check_dot(self, h: Handle | None, entries: list[tuple[bytes, int]], how: str) -> None:
        """A directory lists itself as ".": a directory handle whose listing says another
        inode reads through an fd that is now another directory's."""
        if h is None or h.ino < 0 or not h.is_dir or self.batch.destroy:
            return
        for name, ino in entries:
            if name == b"." and ino != h.ino:
                raise Finding("identity", f"{how} of fh {h.fh:#x} (directory {h.path!r}, "
                              f"inode {h.ino}) lists '.' as inode {ino}: its fd is another "
                              "directory's")

    def moved(self, meta: dict) -> None:
        """A rename, unlink, rmdir or link that may have acted: paths under the names it
        touched are no longer certain."""
        self.batch.namespace_changed = True
        if meta.get("path") is not None:
            self.model.invalidate_paths(meta["path"])
        if meta.get("new_parent_path") is not None:
            self.model.invalidate_paths(join(meta["new_parent_path"],
                                             meta.get("new_name", b"")) or "")

    def learn_handle(self, h: Handle) -> None:
        """A reply that hands the guest an open file (unless a DESTROY of the same batch
        may have closed it already)."""
        if self.batch.destroy or h.fh in self.batch.released_unknown:
            h.ino = -1  # maybe closed already: released at the end, never checked
        self.model.handles[h.fh] = h

    def learn(self, nodeid: int, ino: int, mode: int, path: str | None, how: str) -> None:
        if nodeid == ROOT:
            return
        if self.batch.destroy or nodeid in self.batch.overforgot or \
                nodeid in self.model.ambiguous:
            self.model.make_ambiguous(nodeid)
            return
        node = self.model.node(nodeid)
        if node is not None and (node.ino != ino or stat.S_IFMT(node.mode) != stat.S_IFMT(mode)):
            raise Finding("identity", f"{how} answered nodeid {nodeid:#x} as inode {ino} "
                          f"({mode:#o}); the guest holds it as inode {node.ino} "
                          f"({node.mode:#o}), path {node.path!r}")
        self.model.add_lookup(nodeid, ino, mode, path)
        if path is not None:
            self.batch.learned.append((path, ino, how))

    # ----- the checks after a batch ------------------------------------------------

    def sync(self) -> None:
        self.wait_batch()
        if TRACE:
            print("  -- sync")
        batch = self.batch
        self.batch = Batch()
        self.batch_no += 1
        self.batch.pending = [p for p in batch.pending if not p.done]  # parked SETLKWs
        self.check_daemon(batch)
        self.check_host(batch)
        self.check_identity()
        self.check_fds()

    def check_daemon(self, batch: Batch | None = None) -> None:
        inst = self.inst
        checks.scan_log(inst.new_log())
        if inst.guest.proc.poll() is not None:
            raise Finding("daemon-exit", f"the daemon exited with {inst.guest.proc.returncode}")
        opened = inst.watch.special_opens()
        if batch is None:
            batch = self.batch
        if opened and not (batch.namespace_changed or batch.destroy):
            raise Finding("opened-special", "the daemon opened " + ", ".join(
                f"the {kind} {path!r}" for path, kind in opened))

    def check_host(self, batch: Batch) -> None:
        """Answers against the host: names listed or looked up exist there with the inode
        answered; failed creations left nothing."""
        if batch.namespace_changed or batch.destroy:
            return
        for rel, ino, how in batch.learned:
            host = self.host(rel)
            try:
                st = os.lstat(host)
            except OSError:
                raise Finding("host-mismatch", f"{how} answered {rel!r} (inode {ino}), which "
                              "does not exist on the host") from None
            if ino and st.st_ino != ino:
                raise Finding("host-mismatch", f"{how} answered {rel!r} as inode {ino}; on "
                              f"the host it is inode {st.st_ino}")
        for p, uid in batch.foreign_owner:
            if batch.names[(p.meta.get("parent_path"), p.meta.get("name"))] > 1:
                continue  # another request of the batch may have made it
            raise Finding("owner", f"opcode {p.opcode} by uid {p.meta.get('uid')} made "
                          f"{p.meta.get('path')!r} owned by uid {uid}")
        for rel, p in batch.failed_creates:
            key = (p.meta.get("parent_path"), p.meta.get("name"))
            if batch.names[key] > 1:
                continue  # another request of the batch used the same name
            if os.path.lexists(self.host(rel)):
                raise Finding("failed-create-left-file", f"opcode {p.opcode} of {rel!r} "
                              f"answered {-p.error} ({errno.errorcode.get(-p.error, '?')}) "
                              "but left the file on the host")

    def check_identity(self) -> None:
        """Every nodeid the guest holds answers GETATTR as the inode it named; every
        open file handle is the file it was opened on."""
        g = self.g
        sent: list[tuple[Pending, int]] = []
        for i, nodeid in enumerate(self.model.held()):
            q = 1 + (i & 1)
            if not g.can_submit(q):
                self.drain(sent)
                sent = []
            p = g.submit(q, O.GETATTR, nodeid, fuse.GETATTR_IN.pack(0, 0, 0), out_size=256)
            sent.append((p, nodeid))
        self.drain(sent)
        pid = g.proc.pid
        for h in list(self.model.handles.values()):
            if h.ino < 0:
                continue
            entry = self.inst.handles.get(h.fh)
            if entry is None or not entry.guest_open:
                raise Finding("identity", f"file handle {h.fh:#x} (nodeid {h.nodeid:#x}, "
                              f"{h.path!r}) is gone from the open-file table; the guest "
                              "never released it")
            try:
                st = os.stat(f"/proc/{pid}/fd/{entry.fd}")
            except OSError as e:
                raise Finding("identity", f"file handle {h.fh:#x}: its fd {entry.fd} is "
                              f"closed ({e.strerror})") from None
            if st.st_ino != h.ino:
                how = "opening" if h.opcode in (O.OPEN, O.OPENDIR) else (
                    f"{O(h.opcode).name} answering")  # CREATE/TMPFILE: the entry it answered
                raise Finding("open-identity", f"file handle {h.fh:#x} from {how} nodeid "
                              f"{h.nodeid:#x} (inode {h.ino}, {h.path!r}, flags "
                              f"{h.flags:#o}) is inode {st.st_ino} ({checks.file_kind(st.st_mode)}"
                              f", owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):#o}, "
                              f"{st.st_nlink} links)")

    def drain(self, sent: list[tuple[Pending, int]]) -> None:
        g = self.g
        deadline = time.monotonic() + REPLY_LIMIT
        while any(not p.done for p, _ in sent):
            for p in g.poll():
                if p.meta:  # a program request (a parked SETLKW answering)
                    self.complete(p)
            if time.monotonic() > deadline:
                raise Finding("no-reply", "GETATTR of a held nodeid not answered")
            g.wait_calls(0.02)
        for p, nodeid in sent:
            self.checks += 1
            node = self.model.node(nodeid)
            if node is None:
                continue
            if p.error:
                host = self.host(node.path)
                gone = True
                if host is not None:
                    try:
                        gone = os.lstat(host).st_ino != node.ino
                    except OSError:
                        gone = True
                if p.error == -errno.EBADF or not gone:
                    raise Finding("identity", f"GETATTR of nodeid {nodeid:#x} (inode "
                                  f"{node.ino}, {node.path!r}, held {node.count}x) answered "
                                  f"{errno.errorcode.get(-p.error, p.error)}")
                continue
            ino = struct.unpack_from("<Q", p.payload, fuse.ATTR_OUT_HEAD.size)[0]
            mode = struct.unpack_from("<I", p.payload, fuse.ATTR_OUT_HEAD.size + 60)[0]
            if ino != node.ino or stat.S_IFMT(mode) != stat.S_IFMT(node.mode):
                raise Finding("identity", f"GETATTR of nodeid {nodeid:#x} answered inode "
                              f"{ino} ({mode:#o}); the guest holds it as inode {node.ino} "
                              f"({node.mode:#o}, {node.path!r})")

    def check_fds(self) -> None:
        inst = self.inst
        table_fds = {e.fd for e in inst.inodes.iter_entries() if e.fd >= 0}
        table_fds.update(h.fd for h in inst.handles.iter_handles() if h.fd >= 0)
        pids = self.g.daemon_pids()
        checks.audit_fds(pids[0], str(inst.share), inst.baseline, table_fds)
        for pid in pids[1:]:  # a worker with an fd table of its own: audit that one too
            if not checks.same_fd_table(pids[0], pid):
                checks.audit_fds(pid, str(inst.share), inst.baseline, table_fds)

    # ----- the end of the input -------------------------------------------------------

    def finish(self) -> None:
        """Give everything back; the tables must be empty again and nothing outside the
        share changed."""
        self.give_back()
        left = [e for e in self.inst.inodes.iter_entries(dying=True)
                if e.nodeid != ROOT and e.nodeid not in self.model.ambiguous]
        if left:
            e = left[0]
            raise Finding("leak-inode", f"{len(left)} inode entries left after the guest "
                          f"forgot everything, e.g. nodeid {e.nodeid:#x} lookups "
                          f"{e.lookups} name {e.name!r}")
        handles = list(self.inst.handles.iter_handles(released=True))
        if handles:
            h = handles[0]
            raise Finding("leak-handle", f"{len(handles)} open files left after the guest "
                          f"released everything, e.g. fh {h.fh:#x} (nodeid {h.nodeid:#x}, "
                          f"guest_open {h.guest_open}, flags "
                          f"{h.flags:#o})")
        if share.snapshot(self.inst.workdir, self.inst.share) != self.inst.before:
            raise Finding("outside-changed", "a file outside the share changed")
        # what is left are the nodeids whose counts the model could not know (a DESTROY or
        # an over-count FORGET raced their lookups): give them back too, or the next input
        # on this daemon would find them as its own leaks
        ambiguous = [(e.nodeid, e.lookups + 1000) for e in self.inst.inodes.iter_entries()
                     if e.nodeid != ROOT]
        if ambiguous:
            self.forget_all(ambiguous)
            self.wait_batch()
            self.batch = Batch()

    def give_back(self) -> None:
        """What a guest does at unmount: interrupt its waiting SETLKWs (and drop the
        host's conflicting locks), release every open file, forget every nodeid."""
        for p in self.setlkws:
            if not p.done:
                p.meta.setdefault("interrupted", time.monotonic())
                self.send(0, O.INTERRUPT, 0, fuse.INTERRUPT_IN.pack(p.unique),
                          {"op": O.INTERRUPT}, out_size=0)
        self.act_unlock()
        self.wait_all_setlkws()
        self.sync()
        # out of the model before they are sent: a send may have to sync (and check what
        # the model holds) when the queue is full
        held, self.model.handles = sorted(self.model.handles.items()), {}
        for fh, h in held:
            self.send(1, O.RELEASEDIR if h.is_dir else O.RELEASE, h.nodeid,
                      fuse.RELEASE_IN.pack(fh, 0, 0, 0), {"op": O.RELEASE})
        items = [(n.nodeid, n.count) for n in self.model.nodes.values() if n.nodeid != ROOT]
        for nodeid, _ in items:  # out of the model first, as the handles above
            del self.model.nodes[nodeid]
        self.forget_all(items)
        self.sync()

    def forget_all(self, items: list[tuple[int, int]]) -> None:
        for i in range(0, len(items), 32):
            chunk = items[i : i + 32]
            arg = fuse.BATCH_FORGET_IN.pack(len(chunk), 0) + b"".join(
                fuse.FORGET_ONE.pack(n, c) for n, c in chunk)
            self.send(0, O.BATCH_FORGET, 0, arg, {"op": O.BATCH_FORGET}, out_size=0)

    def recover(self) -> None:
        """After a finding that left the daemon serving: give back what the model holds,
        then whatever the tables still hold (leaks), so the instance can go on. Raises
        if the tables do not come back to the root alone."""
        g = self.g
        deadline = time.monotonic() + REPLY_LIMIT
        while g.inflight and time.monotonic() < deadline:
            for p in [p for p in self.setlkws if not p.done]:
                if "recover" not in p.meta:
                    p.meta["recover"] = True
                    if g.can_submit(0):
                        g.submit(0, O.INTERRUPT, 0, fuse.INTERRUPT_IN.pack(p.unique),
                                 out_size=0)
            self.act_unlock()
            g.poll()
            g.wait_calls(0.02)
        if g.inflight:
            raise RuntimeError("requests still in flight after a finding")
        self.batch = Batch()
        self.setlkws = []
        for h in list(self.inst.handles.iter_handles()):
            self.send(1, O.RELEASE, h.nodeid, fuse.RELEASE_IN.pack(h.fh, 0, 0, 0),
                      {"op": O.RELEASE})
        self.model.handles.clear()
        self.forget_all([(e.nodeid, e.lookups + 1000)
                         for e in self.inst.inodes.iter_entries() if e.nodeid != ROOT])
        self.model.nodes = {ROOT: self.model.nodes[ROOT]}
        self.wait_batch()
        self.batch = Batch()
        if len([e for e in self.inst.inodes.iter_entries() if e.nodeid != ROOT]) or \
                list(self.inst.handles.iter_handles()):
            raise RuntimeError("the tables did not empty after a finding")
        self.inst.new_log()

    def wait_all_setlkws(self) -> None:
        deadline = time.monotonic() + INTERRUPT_LIMIT + 1
        while any(not p.done for p in self.setlkws):
            for p in self.g.poll():
                self.complete(p)
            if time.monotonic() > deadline:
                p = next(p for p in self.setlkws if not p.done)
                raise Finding("setlkw", f"SETLKW {p.unique} not answered after its "
                              "INTERRUPT and the release of the conflicting lock")
            self.g.wait_calls(0.02)
