"""--sandbox namespace|chroot and --uid-map/--gid-map: the server's root is the shared
directory, it lives in its own pid and network namespaces (and user namespace when not
started as root), the guest's requests work as before (including those that reopen an fd
through /proc, like xattrs), and the process left outside removes the socket, the pid file
and the shared-memory segments when it stops."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.protocol import fuse
from tests.protocol.test_hostile_guest import serve
from tests.support.daemon import REPO, daemon_log, pyvirtiofsd
from tests.support.frontend import Frontend, reclaim

# runs the daemon as uid 1000 in a user namespace (mapped to the host's root, so the
# interpreter under /root stays reachable): the unprivileged code path, on any machine
AS_UID_1000 = ["unshare", "--user", "--map-user=1000", "--map-group=1000", "--"]


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    out = children(pid)
    for kid in list(out):
        out += descendants(kid)
    return out


def server_pid(outside: int) -> int:
    """The supervisor: the first process down from the one we started that has the two
    queue workers as children."""
    for pid in [outside, *descendants(outside)]:
        if len(children(pid)) >= 2:
            return pid
    raise AssertionError(f"no supervisor with workers under {outside}")


def ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def exercise(front: Frontend, uid: int = 0) -> dict[str, object]:
    """What a guest sees for a lookup, a read, a mkdir and an xattr round trip."""
    front.setup(2)
    front.init()
    err, entry = front.lookup(1, b"f")
    assert err == 0
    nodeid = struct.unpack_from("<Q", entry)[0]
    err, opened = front.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDWR, 0))
    assert err == 0
    fh = struct.unpack_from("<Q", opened)[0]
    err, data = front.fuse(fuse.Opcode.READ, nodeid, fuse.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0))
    err_mkdir, made = front.fuse(fuse.Opcode.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"d\0",
                                 uid=uid, gid=uid)
    err_set, _ = front.fuse(fuse.Opcode.SETXATTR, nodeid,
                            struct.pack("<II", 5, 0) + b"user.k\0hello")
    err_get, value = front.fuse(fuse.Opcode.GETXATTR, nodeid,
                                struct.pack("<II", 64, 0) + b"user.k\0")
    err_dots, _ = front.lookup(1, b"..")
    return {"read": (err, data), "mkdir": err_mkdir,
            "mkdir_uid": fuse.ATTR.unpack_from(made, fuse.ENTRY_HEAD.size)[11]
            if err_mkdir == 0 else None,
            "xattr": (err_set, err_get, value), "dotdot": err_dots}


def make_share(tmp_path: Path) -> tuple[Path, Path]:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"inside the sandbox")
    return share, tmp_path / "vfs.sock"


def segments(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"pyvirtiofsd-{pid}-")]


def test_namespace_sandbox_as_root(tmp_path: Path) -> None:
    share, sock = make_share(tmp_path)
    with pyvirtiofsd(share, sock, "--sandbox", "namespace", "--xattr") as proc:
        front = Frontend(str(sock))
        seen = exercise(front)  # (xattrs: through the fd directory, and back)
        server = server_pid(proc.pid)
        root = os.stat(f"/proc/{server}/root/")
        workers = descendants(server)
        assert len(workers) == 2  # queue 1's and the one it was cloned from (serving queue 0)
        # the server and its workers: share as root, own pid and network namespaces
        for pid in [server, *workers]:
            st = os.stat(f"/proc/{pid}/root/")
            assert (st.st_dev, st.st_ino) == (share.stat().st_dev, share.stat().st_ino)
            assert ns(pid, "pid") != ns("self", "pid")
            assert ns(pid, "net") != ns("self", "net")
            assert ns(pid, "mnt") != ns("self", "mnt")
        # the process outside stays in the host's namespaces (it cleans up host paths)
        assert ns(proc.pid, "mnt") == ns("self", "mnt")
        assert segments(proc.pid)
        # the operator's stats command finds the server and its workers behind it
        stats = run_cli("stats", "--socket-path", str(sock), "--json", "--interval", "0.1")
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["workers"] == 2
        front.close()
        assert proc.wait(10) == 0
    assert (root.st_dev, root.st_ino) == (share.stat().st_dev, share.stat().st_ino)
    assert seen == {"read": (0, b"inside the sandbox"), "mkdir": 0, "mkdir_uid": 0,
                    "xattr": (0, 0, b"hello"), "dotdot": -errno.EINVAL}
    assert (share / "d").is_dir() and os.getxattr(share / "f", "user.k") == b"hello"
    assert not sock.exists() and not Path(f"{sock}.pid").exists()
    assert segments(proc.pid) == []
    for pid in [server, *workers]:
        assert not Path(f"/proc/{pid}").exists()
    assert "(--sandbox namespace)" in daemon_log(proc)


def test_sigterm_stops_the_sandboxed_server(tmp_path: Path) -> None:
    share, sock = make_share(tmp_path)
    with pyvirtiofsd(share, sock, "--sandbox", "namespace") as proc:
        front = Frontend(str(sock))
        front.setup(2)
        front.init()
        server = server_pid(proc.pid)
        workers = descendants(server)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        front.close()
    for pid in [server, *workers]:
        assert not Path(f"/proc/{pid}").exists()
    assert not sock.exists() and segments(proc.pid) == []


def switches(pid: int) -> int:
    """How often the process has gone to sleep (voluntary context switches)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f
                    if line.startswith("voluntary_ctxt_switches:"))


def anonymous_kib(pid: int) -> int:
    """The process's resident anonymous memory (its heap, shared or not)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Anonymous:"))


def test_waiting_processes_sleep_and_forward_sigint(tmp_path: Path) -> None:
    """The process outside and the keeper only wait for the server: they hold no copy of
    its heap (they gave theirs back at the split: each page the server wrote since would
    otherwise be kept twice, 5 MB with one queue), they do not wake while it serves (an
    idle host must not pay for polls either), and an operator's ^C (SIGINT) at the
    process outside reaches the server through both, which then stops and leaves
    nothing behind."""
    share, sock = make_share(tmp_path)
    with pyvirtiofsd(share, sock, "--sandbox", "namespace") as proc:
        front = Frontend(str(sock))
        front.setup(2)
        front.init()
        keeper = children(proc.pid)[0]
        with open(f"/proc/{keeper}/comm") as f:
            assert f.read().strip() == "pyvfs-keeper"
        server = server_pid(proc.pid)
        assert children(keeper) == [server]
        server_heap = anonymous_kib(server)
        assert server_heap > 6000
        for pid in (proc.pid, keeper):
            assert anonymous_kib(pid) < server_heap // 3, (pid, anonymous_kib(pid), server_heap)
        before = {pid: switches(pid) for pid in (proc.pid, keeper)}
        for _ in range(200):  # the server and its workers serve meanwhile
            assert front.lookup(1, b"f")[0] == 0
            reclaim(front, 1)
        time.sleep(1.0)
        assert {pid: switches(pid) for pid in (proc.pid, keeper)} == before
        workers = descendants(server)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        front.close()
    for pid in [keeper, server, *workers]:
        assert not Path(f"/proc/{pid}").exists()
    assert not sock.exists() and segments(proc.pid) == []


def test_chroot_sandbox(tmp_path: Path) -> None:
    share, sock = make_share(tmp_path)
    with pyvirtiofsd(share, sock, "--sandbox", "chroot", "--xattr") as proc:
        front = Frontend(str(sock))
        seen = exercise(front)  # (xattrs: through the fd directory, and back)
        server = server_pid(proc.pid)
        st = os.stat(f"/proc/{server}/root/")
        assert (st.st_dev, st.st_ino) == (share.stat().st_dev, share.stat().st_ino)
        front.close()
        assert proc.wait(10) == 0
    assert seen["read"] == (0, b"inside the sandbox")
    assert seen["xattr"] == (0, 0, b"hello")
    assert not sock.exists() and segments(proc.pid) == []


def same_file(a: str | Path, b: str | Path) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def cwd_and_root_are_the_share(pids: list[int], share: Path) -> dict[int, tuple[bool, bool]]:
    return {pid: (same_file(f"/proc/{pid}/cwd/", share), same_file(f"/proc/{pid}/root/", share))
            for pid in pids}


def reach(front: Frontend) -> dict[str, int]:
    """Requests that reopen an inode through the server's fd directory, or name it there,
    on a regular file and on a FIFO the guest made: each answer's errno."""
    def call(op: int, nodeid: int, arg: bytes = b"", uid: int = 0) -> int:
        return front.fuse(op, nodeid, arg, uid=uid, gid=uid)[0]

    got = {}
    front.fuse(fuse.Opcode.MKNOD, 1, fuse.MKNOD_IN.pack(0o10644, 0, 0, 0) + b"fifo\0")
    nodes = {name: struct.unpack_from("<Q", front.lookup(1, name.encode())[1])[0]
             for name in ("f", "fifo")}
    for name, nodeid in nodes.items():
        got[f"setxattr {name}"] = call(fuse.Opcode.SETXATTR, nodeid,
                                       struct.pack("<II", 1, 0) + b"user.k\0v")
        got[f"getxattr {name}"] = call(fuse.Opcode.GETXATTR, nodeid,
                                       struct.pack("<II", 64, 0) + b"user.k\0")
        got[f"listxattr {name}"] = call(fuse.Opcode.LISTXATTR, nodeid, struct.pack("<II", 0, 0))
        got[f"chmod {name}"] = call(fuse.Opcode.SETATTR, nodeid, fuse.SETATTR_IN.pack(
            fuse.FATTR_MODE | fuse.FATTR_ATIME | fuse.FATTR_MTIME, 0, 0, 0, 0, 1, 1, 0, 0, 0,
            0, 0o640, 0, 0, 0, 0))
        got[f"truncate {name}"] = call(fuse.Opcode.SETATTR, nodeid, fuse.SETATTR_IN.pack(
            fuse.FATTR_SIZE, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
        got[f"syncfs {name}"] = call(fuse.Opcode.SYNCFS, nodeid, fuse.SYNCFS_IN.pack(0))
        got[f"link {name}"] = call(fuse.Opcode.LINK, 1, fuse.LINK_IN.pack(nodeid)
                                   + f"{name}.2".encode() + b"\0")
    got["opendir /"] = call(fuse.Opcode.OPENDIR, 1, fuse.OPEN_IN.pack(0, 0))
    # as an unprivileged caller: made through the parent's fd, not the fd directory
    got["tmpfile as 1000"] = call(fuse.Opcode.TMPFILE, 1, fuse.CREATE_IN.pack(
        os.O_RDWR, 0o600, 0, 0) + b"t\0", uid=1000)
    return got


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_no_path_leads_out_of_the_sandbox(tmp_path: Path, mode: str) -> None:
    """The server's and every worker's working directory is their root, the share: no
    relative path (``..`` included) leads out of it. (With chroot it used to be the
    server's /proc/<pid>/fd, outside the root: cwd/../../.. was the host's /.) Requests
    that reopen an fd through the fd directory still work, and leave it so."""
    share, sock = make_share(tmp_path)
    os.chmod(share, 0o777)
    with pyvirtiofsd(share, sock, "--sandbox", mode, "--xattr") as proc:
        front = Frontend(str(sock))
        seen = exercise(front)  # (xattrs: through the fd directory, and back)
        server = server_pid(proc.pid)
        family = [server, *descendants(server)]
        assert len(family) == 3  # the server, the template (serving queue 0) and a worker
        inside = {pid: (True, True) for pid in family}
        where = {pid: (os.readlink(f"/proc/{pid}/cwd"), os.readlink(f"/proc/{pid}/root"))
                 for pid in family}
        assert cwd_and_root_are_the_share(family, share) == inside, (
            f"(working directory, root) of each process: {where}, share {share}")
        got = reach(front)
        assert cwd_and_root_are_the_share(family, share) == inside
        front.close()
        assert proc.wait(10) == 0
    assert seen["read"] == (0, b"inside the sandbox") and seen["xattr"] == (0, 0, b"hello")
    expected = {f"{op} f": 0 for op in ("setxattr", "getxattr", "listxattr", "chmod",
                                        "truncate", "syncfs", "link")}
    # user xattrs are for regular files and directories: the kernel's answers for a FIFO
    # (through the fd directory: not ENOENT)
    expected.update({"setxattr fifo": -errno.EPERM, "getxattr fifo": -errno.ENODATA,
                     "listxattr fifo": 0,
                     "chmod fifo": 0, "truncate fifo": -errno.EBADF,
                     "syncfs fifo": -errno.EBADF, "link fifo": 0, "opendir /": 0,
                     "tmpfile as 1000": 0})
    assert got == expected
    assert (share / "f").read_bytes() == b"inside" and (share / "f.2").exists()
    assert os.getxattr(share / "f", "user.k") == b"v"
    assert stat.S_IMODE(os.stat(share / "f").st_mode) == 0o640


@pytest.mark.parametrize("maps", [[], ["--uid-map=:0:1000:1:", "--gid-map=:0:1000:1:"]],
                         ids=["own-ids", "mapped-to-root"])
def test_namespace_sandbox_unprivileged(tmp_path: Path, maps: list[str]) -> None:
    """Not root: a user namespace of its own, with the caller's ids (1:1, as virtiofsd)
    or the --uid-map/--gid-map lines that map a single id to the caller's."""
    share, sock = make_share(tmp_path)
    with pyvirtiofsd(share, sock, "--sandbox", "namespace", "--xattr", *maps,
                     wrapper=AS_UID_1000) as proc:
        front = Frontend(str(sock))
        seen = exercise(front)  # (xattrs: through the fd directory, and back)
        server = server_pid(proc.pid)
        assert ns(server, "user") not in (ns("self", "user"), ns(proc.pid, "user"))
        with open(f"/proc/{server}/uid_map") as f:
            inner = f.read().split()
        front.close()
        assert proc.wait(10) == 0
    # the host's root is uid 1000 to the daemon: inside its namespace that id is 1000
    # (own ids) or 0 (--uid-map :0:1000:1:), and files it creates are the host's root's
    assert inner[:1] == (["0"] if maps else ["1000"])
    assert seen["read"] == (0, b"inside the sandbox")
    assert seen["mkdir"] == 0 and seen["mkdir_uid"] == (0 if maps else 1000)
    assert (share / "d").stat().st_uid == 0
    assert seen["xattr"] == (0, 0, b"hello")
    assert not sock.exists() and not Path(f"{sock}.pid").exists()


def test_unprivileged_inode_looked_up_on_one_queue_serves_on_another(tmp_path: Path) -> None:
    """Not root, --inode-file-handles=prefer (the default): a file handle is made without
    privileges but opened again only with CAP_DAC_READ_SEARCH in the host's user
    namespace, which the unprivileged sandbox lacks. So every inode keeps an O_PATH fd
    (with a warning), and an inode one queue's worker looked up serves on another queue;
    it was EPERM there, the other worker having no fd of it and no right to the handle."""
    with serve(tmp_path, "--sandbox", "namespace", wrapper=AS_UID_1000) as srv:
        (srv.share / "data").write_bytes(b"across queues")
        err, entry = srv.call(fuse.Opcode.LOOKUP, 1, b"data\0", q=1)
        assert err == 0
        nodeid = struct.unpack_from("<Q", entry)[0]
        err, attr = srv.call(fuse.Opcode.GETATTR, nodeid, bytes(16), q=2)
        assert err == 0
        assert (struct.unpack_from("<Q", attr, fuse.ATTR_OUT_HEAD.size)[0]
                == (srv.share / "data").stat().st_ino)
        err, opened = srv.call(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDONLY, 0),
                               q=2)
        assert err == 0
        fh = struct.unpack_from("<Q", opened)[0]
        err, data = srv.call(fuse.Opcode.READ, nodeid,
                             fuse.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0), q=2)
        assert (err, data) == (0, b"across queues")
        assert "file handles cannot be opened here" in srv.log()


def run_cli(*args: str, wrapper: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(wrapper or []), sys.executable, "-m", "supervisor", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=30)


def test_refused_combinations(tmp_path: Path) -> None:
    share, sock = make_share(tmp_path)
    base = ["--shared-dir", str(share), "--socket-path", str(sock)]
    done = run_cli(*base, "--uid-map=:0:0:1:")
    assert done.returncode == 2 and "--uid-map is for an unprivileged daemon" in done.stderr
    done = run_cli(*base, "--sandbox", "none", "--gid-map=:0:1000:1:", wrapper=AS_UID_1000)
    assert done.returncode == 2 and "cannot be used with --sandbox none" in done.stderr
    done = run_cli(*base, "--sandbox", "chroot", wrapper=AS_UID_1000)
    assert done.returncode == 2 and "--sandbox chroot needs root" in done.stderr
    done = run_cli(*base, "--sandbox", "namespace", "--uid-map=:0:1000:1", wrapper=AS_UID_1000)
    assert done.returncode == 2 and "expected :namespace_id:host_id:count:" in done.stderr
    # a map beyond the daemon's own id needs newuidmap; without it (or without
    # /etc/subuid rights) the daemon says so and stops, leaving nothing behind
    start = time.monotonic()
    done = run_cli(*base, "--sandbox", "namespace", "--uid-map=:0:1000:1:",
                   "--uid-map=:1:100000:65536:", wrapper=AS_UID_1000)
    assert done.returncode == 1 and "newuidmap" in done.stderr, done.stderr
    assert time.monotonic() - start < 20
    assert not sock.exists() and not Path(f"{sock}.pid").exists()
