"""--sandbox namespace|chroot: the process that serves the guest sees nothing but the
shared directory.

The daemon process started by the operator stays outside, in the host's namespaces: it
created the listening socket, the pid file and the shared-memory tables, and after the
sandboxed server exits it removes them (inside the sandbox those paths would name files in
the shared directory). It forwards SIGTERM/SIGINT/SIGHUP to the server and exits with its
status, like virtiofsd's waiting parent.

namespace: the server is PID 1 of a new pid namespace, in a new mount and network
namespace (and a new user namespace when not started as root, with the ids of
--uid-map/--gid-map or the caller's own uid and gid), whose root is the shared directory
(pivot_root) and whose only view of /proc is its own fd directory, bound over /proc.
chroot: root only; the server chroots into the shared directory (no mounts: for
containers that cannot make namespaces).

In both, the server's first process stays outside the mount namespace / chroot as the
supervisor's keeper (workers/handover/keeper.py): it holds the fd table the supervisor it
clones shares, so a killed supervisor can be replaced. The process outside and the keeper
run no Python after the split (daemon/native/sandbox.c, :class:`Finish`). A live upgrade
or a keeper hands the fds to the process outside over a socket pair made here
(``hand_over_outside``); that process executes the installed code, which puts them back
at their numbers (:func:`take_from_server`, docs/operations.md).

Every server process's working directory is its root, the share, so no relative path
leads out of it. An fd is reopened through a directory fd of the server's
fd directory (inside the root in namespace mode, outside it with chroot, as virtiofsd's
proc_self_fd), which :func:`server_fd_directory` returns and the supervisor hands to
``daemon.fs.proc_fd``: only the decimal name of an fd number is ever looked up in it
(``proc_fd.proc_open``), and xattr calls, which take a path, switch there for that one
system call (``pyvfs_xattr``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

from daemon.host import handover
from daemon.native._sys import ffi, lib

log = logging.getLogger("pyvirtiofsd")

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_SLAVE, MS_RELATIME = 0x1000, 0x4000, 0x80000, 0x200000
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217,
                  "riscv64": 41}

SUCCESSOR_ENV = "PYVIRTIOFSD_SUCCESSOR"  # "<socket fd>:<server pid>" (live upgrade)
SERVER_EXITED_ENV = "PYVIRTIOFSD_SERVER_EXITED"  # "<status>": the process outside finishes
KEEPER_ENV = "PYVIRTIOFSD_KEEPER"  # "<server pid>:<wait status>": the server was killed
GO = b"go"  # the new program outside is ready: stop the workers, send the fds
_libc = ctypes.CDLL(None, use_errno=True)
_server_fd_dir = -1  # set in the server once it is inside: see server_fd_directory()
_server_fdinfo_dir = -1  # its fdinfo directory (the locks an fd holds, for migration)
# the server's end of the socket pair to the process outside, for a live upgrade's fds
_handover_sock: socket.socket | None = None
# in the process outside: the fd its wait after the split watches (the handover socket)
_watch_fd = -1
# in the helper of an unprivileged sandbox: its wait after the split only exits with the
# keeper's status (the process outside, its parent, does the rest)
_helper = False
# what the process outside and the keeper execute when their wait ends (see Finish)
_finish: Finish | None = None
PLAN_ENV = "PYVIRTIOFSD_SPLIT_PLAN"  # the Finish's state, for the program executed


@dataclass
class Finish:
    """With a plan, the process outside and the keeper run no Python after the split
    (daemon/native/sandbox.c): they give their copy of the heap back (each page the
    server wrote since would be kept twice: 5 MB with one queue) and, when their wait
    ends, execute the daemon afresh with this in its environment (PLAN_ENV, msgpack in
    hex) and
    the event: PYVIRTIOFSD_SUCCESSOR (a live upgrade), PYVIRTIOFSD_SERVER_EXITED (the
    process outside finishes: the status), PYVIRTIOFSD_KEEPER (the server was killed:
    the keeper hands its fds on). :func:`take_plan` reads it there."""

    exec_first: bool  # a SIGHUP executes the new code at once (else once the fds come)
    journal_fd: int  # kept open for the program that finishes (-1: none)
    state: dict  # what those programs need: tables, journal, session, sockets


def take_plan() -> dict | None:
    """In a program the process outside or the keeper executed: the state its Finish
    carried (removed from the environment); None in any other start."""
    raw = os.environ.pop(PLAN_ENV, None)
    return msgpack.unpackb(bytes.fromhex(raw)) if raw else None


def adopt_server_socket(fd: int) -> None:
    """In the keeper's new program: the server's end of the handover socket, at ``fd``."""
    global _handover_sock
    _handover_sock = socket.socket(fileno=fd)


def _plan_blob() -> tuple[bytes, int, int]:
    """The program the waiting processes execute: this one, as it was started."""
    env = dict(os.environ)
    # argparse asks the terminal's size (an ioctl) unless these say it
    env.setdefault("COLUMNS", "100")
    env.setdefault("LINES", "40")
    assert _finish is not None
    env[PLAN_ENV] = msgpack.packb(_finish.state).hex()
    for name in (SUCCESSOR_ENV, SERVER_EXITED_ENV, KEEPER_ENV):
        env.pop(name, None)  # sandbox.c adds the one an event means
    argv = list(sys.orig_argv)
    parts = [os.fsencode(sys.executable), *map(os.fsencode, argv),
             *(os.fsencode(f"{k}={v}") for k, v in env.items())]
    if any(b"\0" in p for p in parts):
        raise SandboxError("an argument or environment entry holds a NUL byte")
    return b"".join(p + b"\0" for p in parts), len(argv), len(env)


class SandboxError(Exception):
    """The sandbox could not be set up; the message says which step and why."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, what: str) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(),
                       fstype and fstype.encode(), ctypes.c_ulong(flags), None), what)


@dataclass(frozen=True)
class NamespaceIdMap:
    """One --uid-map/--gid-map line of the sandbox's user namespace (uid_map/gid_map):
    ``count`` ids from ``inside`` map to ``outside``. Not the in-daemon translation of
    --translate-uid/--translate-gid, which is :class:`daemon.fs.idmap.IdMap`."""

    inside: int
    outside: int
    count: int


def enter(mode: str, shared_dir: str, finish: Finish,
          uid_maps: Sequence[NamespaceIdMap] = (), gid_maps: Sequence[NamespaceIdMap] = (),
          after_upgrade: bool = False) -> None:
    """Split into the sandboxed server, the keeper and the process that stays outside.
    Returns only in the server (now inside, serving ``/`` in namespace mode): the others
    wait in C and then execute ``finish``'s program. Raises SandboxError before any split
    when a step fails."""
    shared_dir = os.path.realpath(shared_dir)
    global _handover_sock, _watch_fd, _finish
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    _handover_sock = theirs
    ours.setblocking(False)  # the successor reads it while the server sends
    _watch_fd = ours.fileno()  # watched from the moment of the split (pyvfs_split)
    finish.state = {**finish.state, "server_sock": theirs.fileno()}
    _finish = finish
    _enter(mode, shared_dir, uid_maps, gid_maps, after_upgrade)
    ours.close()  # the server


def wait_for_successor(timeout: float) -> bool:
    """In the sandboxed server (live upgrade): wait until the new program outside has
    started and asks for the fds (its workers serve meanwhile)."""
    assert _handover_sock is not None
    _handover_sock.settimeout(timeout)
    try:
        return _handover_sock.recv(16) == GO
    except (TimeoutError, OSError):
        return False
    finally:
        _handover_sock.settimeout(None)


def take_from_server(finishing: bool = False) -> dict | None:
    """In the new program the process outside executed (daemon/native/sandbox.c): ask
    the server for its fds, put them at their numbers once it has exited (status 75),
    and return the state it handed over; None on a normal start, and
    (``finishing``: the caller then finishes as the process outside) when the server
    exited without handing everything over."""
    value = os.environ.pop(SUCCESSOR_ENV, "")
    if not value:
        return None
    started = time.monotonic()
    sock_fd, server_pid = (int(v) for v in value.split(":"))
    sock = socket.socket(fileno=sock_fd)
    try:
        sock.send(GO)
    except OSError:  # the server sent its fds unasked and is gone (-1: it was reaped)
        pass
    sock.setblocking(False)
    received: dict[int, int] = {}
    complete = False
    while not complete:
        select.select([sock], [], [], 0.05)
        complete = handover.receive_fds(sock, received)
        if not complete and (server_pid < 0 or os.waitpid(server_pid, os.WNOHANG)[0]):
            complete = handover.receive_fds(sock, received)
            if not complete:
                if finishing:
                    log.error("live upgrade: the server exited without handing everything "
                              "over")
                    sock.close()
                    return None
                raise SystemExit("live upgrade: the server exited without handing its fds "
                                 "over; see the lines above")
            server_pid = -1
    if server_pid > 0:
        _, status = os.waitpid(server_pid, 0)
        if os.waitstatus_to_exitcode(status) != handover.HANDED_OVER:
            log.warning("live upgrade: the server exited with status %d after the handover",
                        os.waitstatus_to_exitcode(status))
    state_fd = next(iter(received))  # the first one sent
    sock_fd = sock.detach()
    handover.place(received, keep=[sock_fd])
    if sock_fd not in received:
        os.close(sock_fd)
    log.info("live upgrade: %d fds taken over from the server in %.1f ms", len(received),
             1000 * (time.monotonic() - started))
    os.environ[handover.ENV] = str(state_fd)
    state = handover.take_state()
    if state is not None:
        state["stalled_since"] = started  # the rings wait from the go to the new workers
    return state


def hand_over_outside(state_fd: int, fds: list[int]) -> None:
    """In the sandboxed server (live upgrade): send every fd to keep (the state first)
    to the process outside, which executes the installed code on them, and exit."""
    assert _handover_sock is not None
    handover.send_fds(_handover_sock, fds)
    logging.shutdown()
    os._exit(handover.HANDED_OVER)


def _enter(mode: str, shared_dir: str, uid_maps: Sequence[NamespaceIdMap],
           gid_maps: Sequence[NamespaceIdMap], after_upgrade: bool) -> None:
    if mode == "none":  # --keeper: the split without a sandbox
        _split(lambda: None)
        return
    if mode == "chroot":
        if os.geteuid() != 0:
            raise SandboxError("--sandbox chroot needs root; use --sandbox namespace or none")
        _split(lambda: _enter_chroot(shared_dir))
        return
    if mode != "namespace":
        raise ValueError(mode)
    if os.geteuid() == 0:
        if uid_maps or gid_maps:
            raise SandboxError("--uid-map/--gid-map set up a user namespace for an "
                               "unprivileged daemon; as root use --translate-uid/"
                               "--translate-gid instead")
        if after_upgrade:
            # the namespace the first server was PID 1 of died with it, and it is still
            # where this process's children would go (fork: ENOMEM, unshare: EINVAL):
            # point that back at our own pid namespace first
            own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _check(_libc.setns(own, CLONE_NEWPID), "setns(own pid namespace)")
            finally:
                os.close(own)
        _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        _split(lambda: _enter_namespaces(CLONE_NEWNS | CLONE_NEWNET, shared_dir))
        return
    _enter_as_user(shared_dir, uid_maps, gid_maps)


def _plan(split) -> object:  # noqa: ANN001 - a pyvfs_split_t *
    """What the process outside and the keeper need to execute at the end of their wait
    (``_finish``); returns the buffer ``split`` points into, to be kept alive until the
    C call (which copies it at once)."""
    assert _finish is not None
    blob, argc, envc = _plan_blob()
    plan = ffi.from_buffer(blob)
    split.plan, split.plan_len, split.argc, split.envc = plan, len(blob), argc, envc
    split.watch_fd = _watch_fd
    split.handed_over = handover.HANDED_OVER
    split.exec_first = int(_finish.exec_first)
    split.journal_fd = _finish.journal_fd
    return plan


def _split(inside) -> None:  # noqa: ANN001 - the server's set-up step
    """Fork (C: pyvfs_split): the child clones the server, which runs ``inside`` once the
    parent is known to be alive, and stays as its keeper; neither the parent (the process
    outside, or the helper of an unprivileged sandbox) nor the keeper returns here."""
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # pyvfs_split skips CPython's fork bookkeeping, which one thread needs not
        raise SandboxError(f"the daemon runs {threads} threads before entering the sandbox")
    ready_r, ready_w = os.pipe()
    split = ffi.new("pyvfs_split_t *")
    split.ready_r, split.ready_w = ready_r, ready_w
    split.parent_exits = int(_helper)
    plan = _plan(split)
    role = lib.pyvfs_split(split)
    del plan
    if role < 0:
        os.close(ready_r)
        os.close(ready_w)
        raise SandboxError(f"fork: {os.strerror(-role)}")
    try:
        inside()
    except BaseException as e:  # noqa: BLE001 - the parent reports the exit status
        log.error("sandbox: %s", e)
        os._exit(1)


def _enter_chroot(shared_dir: str) -> None:
    proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fdinfo = os.open("/proc/self/fdinfo", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    os.chroot(shared_dir)
    os.chdir("/")
    _reopen_through(proc_fd, fdinfo)


def _enter_namespaces(flags: int, shared_dir: str) -> None:
    """In the server: new mount and network namespaces, the share as root."""
    if flags:
        _check(_libc.unshare(flags), "unshare(mount, network namespaces)")
    _mount(None, "/", None, MS_SLAVE | MS_REC, "make / a slave mount")
    _mount("proc", "/proc", "proc", MS_NODEV | MS_NOEXEC | MS_NOSUID | MS_RELATIME,
           "mount /proc")
    fdinfo = os.open("/proc/self/fdinfo", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    # only our own fd directory stays reachable through /proc
    _mount("/proc/self/fd", "/proc", None, MS_BIND, "bind /proc/self/fd over /proc")
    proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    _mount(shared_dir, shared_dir, None, MS_BIND | MS_REC, f"bind-mount {shared_dir}")
    old_root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    new_root = os.open(shared_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchdir(new_root)
        nr = SYS_PIVOT_ROOT.get(os.uname().machine)
        if nr is None:
            raise SandboxError(f"pivot_root: unknown on {os.uname().machine}")
        _check(_libc.syscall(nr, b".", b"."), f"pivot_root into {shared_dir}")
        os.fchdir(old_root)
        _mount(None, ".", None, MS_SLAVE | MS_REC, "make the old root a slave mount")
        _check(_libc.umount2(b".", MNT_DETACH), "unmount the old root")
        os.fchdir(new_root)
    finally:
        os.close(old_root)
        os.close(new_root)
    os.chdir("/")
    _reopen_through(proc_fd, fdinfo)


def _reopen_through(proc_fd: int, fdinfo: int) -> None:
    """Keep ``proc_fd`` (the server's fd directory) for :func:`server_fd_directory` and
    ``fdinfo`` (its fdinfo directory, whose files list the locks each fd holds) for
    :func:`server_fdinfo_directory`; the working directory stays the root, which workers
    inherit."""
    global _server_fd_dir, _server_fdinfo_dir
    _server_fd_dir = proc_fd
    _server_fdinfo_dir = fdinfo


def server_fd_directory() -> int:
    """In the sandboxed server (after :func:`enter` returned None): a directory fd of its
    own fd directory, through which every fd must be reopened from now on (the caller
    hands it to ``daemon.fs.proc_fd.use_fd_directory``); -1 outside a sandbox."""
    return _server_fd_dir


def server_fdinfo_directory() -> int:
    """As :func:`server_fd_directory`, the server's fdinfo directory (-1 outside)."""
    return _server_fdinfo_dir


def _enter_as_user(shared_dir: str, uid_maps: Sequence[NamespaceIdMap],
                   gid_maps: Sequence[NamespaceIdMap]) -> None:
    """Unprivileged: a helper unshares a user namespace (with pid, mount and network
    namespaces owned by it), this process writes its id maps from outside (newuidmap and
    newgidmap for anything beyond our own ids), then the helper forks the server, PID 1
    of the new pid namespace, and waits for it."""
    uid, gid = os.geteuid(), os.getegid()
    uid_maps = list(uid_maps) or [NamespaceIdMap(uid, uid, 1)]
    gid_maps = list(gid_maps) or [NamespaceIdMap(gid, gid, 1)]
    helpers = {}
    import shutil  # here only: it loads bz2 and lzma (~0.2 MB); outside the sandbox still

    for tool, maps, own in (("newuidmap", uid_maps, uid), ("newgidmap", gid_maps, gid)):
        if maps != [NamespaceIdMap(maps[0].inside, own, 1)]:
            path = shutil.which(tool)
            if path is None:
                raise SandboxError(f"--{tool[3:6]}-map needs {tool} (Debian package uidmap) "
                                   "to map more than the daemon's own id")
            helpers[tool] = path
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_child_w)
        os.close(to_parent_r)
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
        try:
            _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET),
                   "unshare(user, pid, network namespaces)")
        except SandboxError as e:
            log.error("sandbox: %s", e)
            os._exit(1)
        os.write(to_parent_w, b"1")
        if os.read(to_child_r, 1) != b"1":
            os._exit(1)  # the maps could not be written (the parent said why)
        global _watch_fd, _helper
        _watch_fd = -1  # the handover socket is the process outside's, not this helper's
        _helper = True
        # the server makes its own mount namespace: the keeper stays in ours, where the
        # daemon can be executed afresh (pivot_root would move its root too)
        _split(lambda: _enter_namespaces(CLONE_NEWNS, shared_dir))
        return  # the server
    os.close(to_child_r)
    os.close(to_parent_w)
    if os.read(to_parent_r, 1) != b"1":
        os.close(to_child_w)
        os.waitpid(pid, 0)
        raise SandboxError("could not create the namespaces (see the line above; "
                           "unprivileged user namespaces may be disabled: "
                           "sysctl kernel.unprivileged_userns_clone)")
    try:
        _write_maps(pid, "uid", uid_maps, helpers.get("newuidmap"))
        _write_maps(pid, "gid", gid_maps, helpers.get("newgidmap"))
    except SandboxError:
        os.close(to_child_w)
        os.waitpid(pid, 0)
        raise
    os.write(to_child_w, b"1")
    os.close(to_child_w)
    # from here as the root modes' process outside: C only
    split = ffi.new("pyvfs_split_t *")
    plan = _plan(split)
    lib.pyvfs_outside(split, pid)  # never returns
    del plan


def _write_maps(pid: int, kind: str, maps: list[NamespaceIdMap], helper: str | None) -> None:
    if helper is not None:
        args = [helper, str(pid)]
        for m in maps:
            args += [str(m.inside), str(m.outside), str(m.count)]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise SandboxError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode} "
                               f"(are the ids in /etc/sub{kind}?)")
        return
    try:
        if kind == "gid":  # an unprivileged process may map its gid only after this
            with open(f"/proc/{pid}/setgroups", "w") as f:
                f.write("deny")
        with open(f"/proc/{pid}/{kind}_map", "w") as f:
            f.write("".join(f"{m.inside} {m.outside} {m.count}\n" for m in maps))
    except OSError as e:
        raise SandboxError(f"writing /proc/{pid}/{kind}_map: "
                           f"{os.strerror(e.errno or errno.EIO)}") from None
