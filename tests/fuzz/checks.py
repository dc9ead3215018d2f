"""Invariant checks that look at the daemon's processes from outside: open fds, blocked
threads, files the daemon opened (inotify), and its log."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.guest import Finding

O_PATH = 0o10000000
# system calls an idle or lock-waiting worker sleeps in (x86-64 numbers)
IDLE_SYSCALLS = {
    7: "poll", 23: "select", 35: "nanosleep", 202: "futex", 230: "clock_nanosleep",
    232: "epoll_wait", 281: "epoll_pwait", 441: "epoll_pwait2", 61: "wait4",
    247: "waitid", 270: "pselect6", 271: "ppoll",
}
SYSCALL_NAMES = {2: "open", 257: "openat", 437: "openat2", 306: "syncfs", 74: "fsync",
                 75: "fdatasync", 72: "fcntl", 73: "flock", 1: "write", 17: "pread64",
                 18: "pwrite64", 295: "preadv", 296: "pwritev", 0: "read"}
OWN_PREFIXES = ("socket:", "pipe:", "anon_inode:", "/memfd:", "/dev/shm/", "/dev/null",
                "/dev/pts/", "/dev/urandom", "/dev/random", "/dev/tty")


@dataclass
class FdInfo:
    fd: int
    target: str


def list_fds(pid: int) -> list[FdInfo]:
    out: list[FdInfo] = []
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for name in names:
        try:
            out.append(FdInfo(int(name), os.readlink(f"{base}/{name}")))
        except OSError:
            continue  # closed meanwhile
    return out


_FLAGS: dict[tuple[int, int, str], int] = {}


def fd_flags(pid: int, fd: int, target: str = "") -> int:
    """An fd's open flags (from fdinfo), remembered per (pid, fd, target): the fd caches
    keep hundreds of O_PATH fds that would otherwise be read again at every audit."""
    key = (pid, fd, target)
    flags = _FLAGS.get(key)
    if flags is None:
        flags = _FLAGS[key] = _read_flags(pid, fd)
        if len(_FLAGS) > 100_000:
            _FLAGS.clear()
    return flags


def _read_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"flags:"):
                return int(line.split()[1], 8)
    return 0


LOCK_ENTRY = struct.Struct("<QQiIIi")  # daemon/fs/lock_owners.py: nodeid owner fd users state pid
LOCK_SLOTS = 4096


def lock_owner_fds(pid: int, fds: list[FdInfo]) -> set[int]:
    """The fds the lock-owner table (a memfd every daemon process maps) owns: each guest
    lock owner's own description of a file, open until the owner's FLUSH."""
    out: set[int] = set()
    for info in fds:
        if not info.target.startswith("/memfd:pyvirtiofsd-lock-owners"):
            continue
        try:
            fd = os.open(f"/proc/{pid}/fd/{info.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            live = os.pread(fd, 8, LOCK_ENTRY.size * LOCK_SLOTS)
            if live and int.from_bytes(live, "little") == 0:
                continue  # no lock owner has a description
            data = os.pread(fd, LOCK_ENTRY.size * LOCK_SLOTS, 0)
        finally:
            os.close(fd)
        states = data[16 + 8 :: LOCK_ENTRY.size]  # the low byte of each entry's state
        for m in re.finditer(rb"[^\x00]", states):
            _n, _o, owned, _users, state, _pid = LOCK_ENTRY.unpack_from(
                data, m.start() * LOCK_ENTRY.size)
            if state in (1, 2) and owned >= 0:  # USED, CLOSING
                out.add(owned)
    return out


SYS_KCMP = 312  # x86-64
KCMP_FILES = 2


def same_fd_table(pid1: int, pid2: int) -> bool:
    """Whether two processes share one fd table (kcmp KCMP_FILES; clones with
    CLONE_FILES do). Unknown (no kcmp) counts as not shared, so both get audited."""
    return _libc.syscall(SYS_KCMP, pid1, pid2, KCMP_FILES, 0, 0) == 0


def audit_fds(pid: int, share: str, baseline: dict[int, str], table_fds: set[int]) -> None:
    """Every fd of the daemon's (shared) fd table is its own (sockets, eventfds, memfds,
    shm segments, ...), was there at start, or is a file inside the share that a table
    entry owns: an inode or open-file fd, a lock owner's description (lock-owner table),
    or an O_PATH fd (a worker's fd cache). Anything else is a leak, an fd at a file
    outside the share, or a special file the daemon must never open."""
    root = share.rstrip("/")
    fds = list_fds(pid)
    owned = table_fds | lock_owner_fds(pid, fds)
    for info in fds:
        target = info.target
        if baseline.get(info.fd) == target:
            continue
        plain = target[: -len(" (deleted)")] if target.endswith(" (deleted)") else target
        inside = plain == root or plain.startswith(root + "/")
        if not inside:
            if target.startswith(OWN_PREFIXES):
                continue
            raise Finding("fd-outside", f"fd {info.fd} of the daemon points outside the "
                          f"share: {target!r}")
        if info.fd in owned:
            continue
        try:
            flags = fd_flags(pid, info.fd, target)
            if flags & O_PATH:
                continue  # a worker's fd cache: O_PATH only, never opens anything
            _FLAGS.pop((pid, info.fd, target), None)  # not cached: it may be transient
            mode = os.stat(f"/proc/{pid}/fd/{info.fd}").st_mode
        except OSError:
            continue  # closed meanwhile
        kind = stat.S_IFMT(mode)
        if kind != stat.S_IFREG and kind != stat.S_IFDIR:
            raise Finding("fd-special", f"fd {info.fd} of the daemon has {target!r} open "
                          f"(a {file_kind(mode)}, flags {flags:#o}); the daemon "
                          "must never open FIFOs, devices or sockets")
        raise Finding("fd-leak", f"fd {info.fd} of the daemon has {target!r} open (flags "
                      f"{flags:#o}) but no table entry owns it")


def file_kind(mode: int) -> str:
    return {stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device",
            stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket", stat.S_IFLNK: "symlink",
            stat.S_IFDIR: "directory", stat.S_IFREG: "regular file"}.get(
                stat.S_IFMT(mode), f"mode {mode:#o}")


@dataclass
class ThreadState:
    pid: int
    tid: int
    state: str
    syscall: int  # -1: running in user space
    wchan: str


def thread_states(pids: list[int]) -> list[ThreadState]:
    out: list[ThreadState] = []
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tids:
            base = f"/proc/{pid}/task/{t}"
            try:
                st = Path(f"{base}/stat").read_text()
                state = st[st.rfind(")") + 2]
                sc = Path(f"{base}/syscall").read_text().split()
                wchan = Path(f"{base}/wchan").read_text().strip()
            except OSError:
                continue
            nr = -1 if not sc or sc[0] == "running" else int(sc[0])
            out.append(ThreadState(pid, int(t), state, nr, wchan))
    return out


# file I/O that may take seconds on a busy disk (syncfs of the whole file system above
# all): slow, not stuck; if it never returns, the reply deadline reports it
IO_SYSCALLS = {74: "fsync", 75: "fdatasync", 306: "syncfs", 1: "write", 18: "pwrite64",
               296: "pwritev", 328: "pwritev2", 77: "ftruncate", 285: "fallocate",
               326: "copy_file_range", 17: "pread64", 295: "preadv", 327: "preadv2",
               0: "read", 76: "truncate"}


def blocked_workers(pids: list[int]) -> list[ThreadState]:
    """Threads asleep in a system call that is neither one a serving worker waits in nor
    file I/O (an open of a FIFO, a lock wait, a read of a pipe ... are not)."""
    return [t for t in thread_states(pids)
            if t.state in ("S", "D") and t.syscall >= 0 and t.syscall not in IDLE_SYSCALLS
            and not (t.syscall in IO_SYSCALLS and t.state == "D")]


def describe(t: ThreadState) -> str:
    name = SYSCALL_NAMES.get(t.syscall, f"syscall {t.syscall}")
    return f"process {t.pid} (thread {t.tid}) state {t.state} in {name}, wchan {t.wchan!r}"


# ----- inotify: files the daemon opens ------------------------------------------------

IN_OPEN = 0x20
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
EVENT = struct.Struct("iIII")
_libc = ctypes.CDLL(None, use_errno=True)


class OpenWatch:
    """inotify IN_OPEN on every directory of the share: opening a FIFO, device node or
    socket shows up here (O_PATH opens, all the daemon may do to them, do not)."""

    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.dirs: dict[int, str] = {}

    def watch_tree(self, root: str) -> None:
        for path, dirs, _ in os.walk(root):
            self.add(path)
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(path, d))]

    def add(self, path: str) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN)
        if wd >= 0:
            self.dirs[wd] = path

    def events(self) -> list[str]:
        """Paths opened since the last call."""
        out: list[str] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos + EVENT.size <= len(data):
                wd, mask, _cookie, n = EVENT.unpack_from(data, pos)
                name = data[pos + EVENT.size : pos + EVENT.size + n].rstrip(b"\0")
                pos += EVENT.size + n
                if mask & IN_OPEN and not mask & IN_ISDIR and name and wd in self.dirs:
                    out.append(os.path.join(self.dirs[wd], os.fsdecode(name)))

    def special_opens(self) -> list[tuple[str, str]]:
        """(path, kind) of FIFOs, devices and sockets opened since the last call. The kind
        is what the name is now: callers skip batches that renamed or unlinked."""
        found = []
        for path in self.events():
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue
            if stat.S_IFMT(mode) in (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK,
                                     stat.S_IFSOCK):
                found.append((path, file_kind(mode)))
        return found

    def close(self) -> None:
        os.close(self.fd)


# ----- the log ------------------------------------------------------------------------

DIED = re.compile(r"queue (\d+): worker (\d+) died \(([^)]*)\)")


def scan_log(text: str) -> None:
    """New log lines: a worker that died, or an exception nobody expected."""
    m = DIED.search(text)
    if m:
        how = m.group(3)
        sig = re.match(r"signal (\d+)", how)
        cause = signal.Signals(int(sig.group(1))).name if sig else how.replace(" ", "-")
        start = text.rfind("Traceback", 0, m.start())
        why = text[start : m.start()].strip()[-1200:] if start >= 0 else ""
        raise Finding(f"worker-died-{cause}", f"worker {m.group(2)} of queue {m.group(1)} "
                      f"died ({how})" + (f"\n{why}" if why else ""))
    if "Traceback" in text:
        start = text.find("Traceback")
        raise Finding("exception", "the daemon logged an unexpected exception:\n"
                      + text[max(0, start - 300) : start + 1500])
    if "worker for queue" in text and "failed" in text:
        raise Finding("worker-died", text[-1500:])
