"""FIFOs, sockets, device nodes and symlinks a hostile guest names: the daemon must never
open one (a FIFO without a writer blocks the open for ever, and with it the worker and
its queue; a device node the guest made with MKNOD is the host's device), nor create or
truncate over one.

Every opcode that opens an inode, or could, is sent on each such file with a timeout of a
few seconds. It must answer with the errno virtiofsd 1.13 gives (EBADF where its
``open_inode`` refuses anything but regular files and directories; for the calls it
makes on the inode without opening it, xattrs through /proc/self/fd, chmod, readlink,
whatever the same call gives the test here), the worker keeps serving, and nothing was
opened on the host side: inotify saw no IN_OPEN on any of the files, a FIFO has no reader
left (a writer's non-blocking open gets ENXIO), and no fd of the daemon but an O_PATH one
refers to them."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.protocol import fuse
from tests.protocol.test_hostile_guest import Served, child_pids, serve

E = errno
PROMPT = 3.0  # seconds a request may take: a worker stuck in open(2) never answers
Q = 2  # the queue the special files are named on; queue 1 checks the daemon still serves

IN_OPEN = 0x20
IN_DONT_FOLLOW = 0x02000000
O_PATH_FLAG = 0o10000000  # in /proc/<pid>/fdinfo "flags:" (octal)

_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """IN_OPEN events on a set of paths (an O_PATH open makes none)."""

    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        self.names: dict[int, str] = {}

    def watch(self, path: Path) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN | IN_DONT_FOLLOW)
        assert wd >= 0, os.strerror(ctypes.get_errno())
        self.names[wd] = path.name

    def opened(self) -> list[str]:
        """Names opened since the last call."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out, pos = [], 0
        while pos < len(data):
            wd, mask, _cookie, length = struct.unpack_from("iIII", data, pos)
            pos += 16 + length
            if mask & IN_OPEN:
                out.append(self.names.get(wd, "?"))
        return out

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Special:
    name: str
    nodeid: int
    path: Path
    kind: str  # fifo, chr, sock, symlink


@dataclass
class Share:
    srv: Served
    files: list[Special]
    inotify: Inotify
    ids: set[tuple[int, int]]  # (st_dev, st_ino) of every special file


def mknod(srv: Served, name: str, mode: int, rdev: int = 0) -> None:
    """MKNOD from the guest (as root): the daemon makes the node itself."""
    arg = fuse.MKNOD_IN.pack(mode, rdev, 0, 0) + name.encode() + b"\0"
    error, _ = srv.call(fuse.Opcode.MKNOD, fuse.ROOT_ID, arg)
    assert error == 0, f"MKNOD {name}: {error}"


@contextlib.contextmanager
def special_share(base: Path) -> Iterator[Share]:
    with serve(base, "--xattr") as srv:
        mknod(srv, "fifo", stat.S_IFIFO | 0o666)
        mknod(srv, "gnull", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a copy of /dev/null
        mknod(srv, "gzero", stat.S_IFCHR | 0o666, os.makedev(1, 5))  # and of /dev/zero
        mknod(srv, "gsock", stat.S_IFSOCK | 0o666)
        (srv.share / "link").symlink_to(srv.outside / "victim")
        # a socket a host process listens on
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.chdir(srv.share)  # bind by a short relative name (sun_path is 108 bytes)
            listener.bind("hostsock")
        finally:
            os.fchdir(here)
            os.close(here)
        listener.listen(1)
        kinds = {"fifo": "fifo", "gnull": "chr", "gzero": "chr", "gsock": "sock",
                 "hostsock": "sock", "link": "symlink"}
        files = []
        inotify = Inotify()
        for name, kind in kinds.items():
            error, nodeid, mode = srv.lookup(fuse.ROOT_ID, name.encode(), q=Q)
            assert error == 0, f"LOOKUP {name}: {error}"
            assert stat.S_IFMT(mode) == stat.S_IFMT(os.lstat(srv.share / name).st_mode)
            files.append(Special(name, nodeid, srv.share / name, kind))
            if kind != "symlink":
                inotify.watch(srv.share / name)
        ids = {(st.st_dev, st.st_ino) for st in (os.lstat(f.path) for f in files)}
        try:
            yield Share(srv, files, inotify, ids)
        finally:
            inotify.close()
            listener.close()


@pytest.fixture
def share(tmp_path: Path) -> Iterator[Share]:
    with special_share(tmp_path) as s:
        yield s


# ----- what virtiofsd does with the same call ---------------------------------------


def host_errno(call: Callable[[str], object], path: Path) -> int:
    """The (negative) errno of ``call`` on the file's own inode, reached as virtiofsd
    reaches it: through /proc/self/fd of an O_PATH fd, which opens nothing."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        call(f"/proc/self/fd/{fd}")
    except OSError as e:
        return -e.errno
    finally:
        os.close(fd)
    return 0


def readlink_errno(path: Path) -> int:
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        os.readlink("", dir_fd=fd)
    except OSError as e:
        return -e.errno
    finally:
        os.close(fd)
    return 0


XNAME = b"user.pyvfs"


def _getxattr(p: str) -> object:
    return os.getxattr(p, XNAME)


def _setxattr(p: str) -> object:
    return os.setxattr(p, XNAME, b"v")


def _removexattr(p: str) -> object:
    return os.removexattr(p, XNAME)


def _chmod_same(p: str) -> object:
    return os.chmod(p, stat.S_IMODE(os.stat(p).st_mode))


Request = tuple[int, int, bytes]  # opcode, nodeid, argument
CASES: dict[str, tuple[Callable[[Special], Request], Callable[[Special], int]]] = {
    # virtiofsd's open_inode: EBADF for anything but a regular file or directory
    "open_rdonly": (lambda f: (fuse.Opcode.OPEN, f.nodeid, fuse.OPEN_IN.pack(os.O_RDONLY, 0)),
                    lambda f: -E.EBADF),
    "open_wronly_nonblock": (lambda f: (fuse.Opcode.OPEN, f.nodeid, fuse.OPEN_IN.pack(
        os.O_WRONLY | os.O_NONBLOCK, 0)), lambda f: -E.EBADF),
    "open_rdwr_trunc": (lambda f: (fuse.Opcode.OPEN, f.nodeid, fuse.OPEN_IN.pack(
        os.O_RDWR | os.O_TRUNC, 0)), lambda f: -E.EBADF),
    "opendir": (lambda f: (fuse.Opcode.OPENDIR, f.nodeid, fuse.OPEN_IN.pack(0, 0)),
                lambda f: -E.EBADF),
    "syncfs": (lambda f: (fuse.Opcode.SYNCFS, f.nodeid, fuse.SYNCFS_IN.pack(0)),
               lambda f: -E.EBADF),
    # CREATE of an existing name: lookup + open_inode (EBADF); with O_EXCL: EEXIST
    "create_rdwr_trunc": (lambda f: (fuse.Opcode.CREATE, fuse.ROOT_ID, fuse.CREATE_IN.pack(
        os.O_RDWR | os.O_TRUNC, 0o644, 0, 0) + f.name.encode() + b"\0"), lambda f: -E.EBADF),
    "create_rdonly": (lambda f: (fuse.Opcode.CREATE, fuse.ROOT_ID, fuse.CREATE_IN.pack(
        os.O_RDONLY, 0o644, 0, 0) + f.name.encode() + b"\0"), lambda f: -E.EBADF),
    "create_excl": (lambda f: (fuse.Opcode.CREATE, fuse.ROOT_ID, fuse.CREATE_IN.pack(
        os.O_WRONLY | os.O_EXCL, 0o644, 0, 0) + f.name.encode() + b"\0"),
        lambda f: -E.EEXIST),
    # SETATTR: a truncate without a handle opens the inode (EBADF); chmod and utimes go
    # through /proc/self/fd without opening it
    "truncate": (lambda f: (fuse.Opcode.SETATTR, f.nodeid, fuse.SETATTR_IN.pack(
        fuse.FATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)), lambda f: -E.EBADF),
    "chmod": (lambda f: (fuse.Opcode.SETATTR, f.nodeid, fuse.SETATTR_IN.pack(
        fuse.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        stat.S_IMODE(os.lstat(f.path).st_mode), 0, 0, 0, 0)),
        lambda f: host_errno(_chmod_same, f.path)),
    "utimes": (lambda f: (fuse.Opcode.SETATTR, f.nodeid, fuse.SETATTR_IN.pack(
        fuse.FATTR_ATIME | fuse.FATTR_MTIME, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
        lambda f: 0),
    # xattrs: path-based through /proc/self/fd (virtiofsd, for such inodes)
    "getxattr": (lambda f: (fuse.Opcode.GETXATTR, f.nodeid, fuse.GETXATTR_IN.pack(64, 0)
                            + XNAME + b"\0"), lambda f: host_errno(_getxattr, f.path)),
    "listxattr": (lambda f: (fuse.Opcode.LISTXATTR, f.nodeid, fuse.GETXATTR_IN.pack(0, 0)),
                  lambda f: host_errno(os.listxattr, f.path)),
    "setxattr": (lambda f: (fuse.Opcode.SETXATTR, f.nodeid, fuse.SETXATTR_IN_COMPAT.pack(1, 0)
                            + XNAME + b"\0v"), lambda f: host_errno(_setxattr, f.path)),
    "removexattr": (lambda f: (fuse.Opcode.REMOVEXATTR, f.nodeid, XNAME + b"\0"),
                    lambda f: host_errno(_removexattr, f.path)),
    "readlink": (lambda f: (fuse.Opcode.READLINK, f.nodeid, b""),
                 lambda f: readlink_errno(f.path)),
    # LINK: linkat through /proc/self/fd, nothing opened (the new name is removed below)
    "link": (lambda f: (fuse.Opcode.LINK, fuse.ROOT_ID, fuse.LINK_IN.pack(f.nodeid)
                        + b"linked\0"), lambda f: 0),
    # the special file as a directory
    "tmpfile_in": (lambda f: (fuse.Opcode.TMPFILE, f.nodeid, fuse.CREATE_IN.pack(
        os.O_RDWR, 0o600, 0, 0) + b"tmp\0"), lambda f: -E.ENOTDIR),
    "mkdir_in": (lambda f: (fuse.Opcode.MKDIR, f.nodeid, fuse.MKDIR_IN.pack(0o755, 0)
                            + b"d\0"), lambda f: -E.ENOTDIR),
    "create_in": (lambda f: (fuse.Opcode.CREATE, f.nodeid, fuse.CREATE_IN.pack(
        os.O_RDWR, 0o644, 0, 0) + b"c\0"), lambda f: -E.ENOTDIR),
    # handles are only ever made for regular files and directories
    "fsync": (lambda f: (fuse.Opcode.FSYNC, f.nodeid, fuse.FSYNC_IN.pack(1 << 40, 0, 0)),
              lambda f: -E.EBADF),
    "fsyncdir": (lambda f: (fuse.Opcode.FSYNCDIR, f.nodeid, fuse.FSYNC_IN.pack(1 << 40, 0, 0)),
                 lambda f: -E.EBADF),
    "copy_file_range": (lambda f: (fuse.Opcode.COPY_FILE_RANGE, f.nodeid,
                                   fuse.COPY_FILE_RANGE_IN.pack(1 << 40, 0, f.nodeid, 1 << 41,
                                                                0, 10, 0)),
                        lambda f: -E.EBADF),
    # no open at all
    "getattr": (lambda f: (fuse.Opcode.GETATTR, f.nodeid, bytes(16)), lambda f: 0),
    "statfs": (lambda f: (fuse.Opcode.STATFS, f.nodeid, b""), lambda f: 0),
}


def daemon_opened(s: Share) -> list[str]:
    """fds of the daemon (one fd table for all its processes) that are not O_PATH and
    refer to one of the special files."""
    found = []
    pids = [s.srv.proc.pid, *child_pids(s.srv.proc.pid)]
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = int(next(ln for ln in info if ln.startswith("flags:")).split()[1],
                                8)
            except (OSError, StopIteration):
                continue
            if (st.st_dev, st.st_ino) in s.ids and not flags & O_PATH_FLAG:
                found.append(f"pid {pid} fd {fd} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
        break  # the fd table is shared: the supervisor's view is every worker's
    return found


def fifo_has_reader(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        assert e.errno == E.ENXIO, e
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("case", sorted(CASES))
def test_special_files_are_never_opened(share: Share, case: str) -> None:
    build, expected = CASES[case]
    srv = share.srv
    victim = (srv.outside / "victim").read_bytes()
    for f in share.files:
        want = expected(f)
        opcode, nodeid, arg = build(f)
        try:
            error, _ = srv.call(opcode, nodeid, arg, q=Q, timeout=PROMPT)
        except TimeoutError:
            pytest.fail(f"{case} on {f.name} ({f.kind}): no answer within {PROMPT} s, the "
                        f"worker of queue {Q} is stuck")
        opened = share.inotify.opened()
        assert opened == [], f"{case} on {f.name}: the daemon opened {opened} ({error})"
        assert not fifo_has_reader(share.files[0].path), f"{case} on {f.name}: FIFO reader"
        assert daemon_opened(share) == [], f"{case} on {f.name}"
        assert error == want, f"{case} on {f.name} ({f.kind}): {error}, virtiofsd: {want}"
        assert stat.S_IFMT(os.lstat(f.path).st_mode) == stat.S_IFMT(
            {"fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "sock": stat.S_IFSOCK,
             "symlink": stat.S_IFLNK}[f.kind]), f"{case} replaced {f.name}"
        if case == "link":
            assert os.lstat(srv.share / "linked").st_ino == os.lstat(f.path).st_ino
            assert srv.call(fuse.Opcode.UNLINK, fuse.ROOT_ID, b"linked\0", q=Q)[0] == 0
        srv.assert_alive(queues=(1, Q))
    assert (srv.outside / "victim").read_bytes() == victim
    assert sorted(os.listdir(srv.share)) == sorted(
        ["known.txt", *(f.name for f in share.files)])
