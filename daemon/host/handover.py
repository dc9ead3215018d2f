"""Handing a running daemon over to the code installed now (live upgrade).

Everything a guest holds lives in kernel objects (the vhost-user connection, guest memory
and ring fds, open files and the locks on them, the shared-memory tables): those survive
an ``execve`` of the process that holds them, at the same fd numbers, as long as they are
not close-on-exec. What lives only in Python objects (negotiated features, the memory
table, the rings' addresses and fds, what FUSE INIT agreed on...) is written to a memfd
as msgpack; the new program finds that memfd's number in ``PYVIRTIOFSD_HANDOVER_FD``.

Who executes the new code: with ``--sandbox none`` the server itself (its seccomp filter
allows ``execve``; a filter stays in force across exec, so the new image is as confined);
with ``--sandbox chroot|namespace`` the server cannot see the installed code, so it sends
every fd to keep to the process outside the sandbox over the socket pair made before the
split (SCM_RIGHTS, with their numbers), which puts them back at the same numbers and
executes itself; its new code enters the sandbox again and starts the new server.

``pyvirtiofsd upgrade --socket-path S``: make a running daemon execute the code
installed now, under its running guest, and say whether it worked.

Finds the daemon by its pid file (``S.pid``), sends it SIGHUP (what ``systemctl reload``
does through the unit's ``ExecReload=``), and waits until the daemon's info segment
(daemon/stats/daemon_info.py) says the new program serves: one more live upgrade, and
serving. Prints the build ids before and after; exits 1 with the reason otherwise (no
daemon, it died, or it did not finish within ``--timeout``; its log says why).
"""

from __future__ import annotations

import argparse
import array
import logging
import os
import signal
import socket
import sys
import time
import zlib
from collections.abc import Iterable

import msgpack

from daemon.stats.daemon_info import daemon_pid, read_info

log = logging.getLogger("pyvirtiofsd")

ENV = "PYVIRTIOFSD_HANDOVER_FD"
FORMAT = 1  # the state's layout; a new program refuses another
MAX_FDS_PER_MESSAGE = 250  # SCM_RIGHTS carries at most 253 fds a message
UPGRADE_COMMAND = ("make a running daemon execute the code installed now, under its "
                   "running guest, and say whether it worked")
HANDED_OVER = 75  # the sandboxed server's exit status once the outside has its fds
_build_id: str | None = None


def build_id() -> str:
    """A short hash of the daemon's code as installed when this process started, so the
    log and ``pyvirtiofsd stats`` show which code serves (it changes with any source or
    extension file)."""
    global _build_id
    if _build_id is None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        # CRC-32 and Adler-32 of names and contents: an id, not a security check (hashlib
        # would map OpenSSL's libcrypto into the daemon, which lean_interpreter keeps out)
        crc, adler = 0, 1
        for top in ("supervisor.py", "daemon", "workers", "shm_table"):
            path = os.path.join(root, top)
            files = [path] if os.path.isfile(path) else sorted(
                os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                if f.endswith((".py", ".so", ".c", ".h")))
            for name in files:
                with open(name, "rb") as f:
                    data = os.path.relpath(name, root).encode() + f.read()
                crc, adler = zlib.crc32(data, crc), zlib.adler32(data, adler)
        _build_id = f"{crc:08x}{adler & 0xFFFF:04x}"
    return _build_id


def write_state(state: dict) -> int:
    """The state in a new memfd (inheritable, read from its start); returns the fd."""
    data = msgpack.packb({"format": FORMAT, **state})
    fd = os.memfd_create("pyvirtiofsd-handover", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def take_state() -> dict | None:
    """The state a previous program left (its memfd closed and the variable removed), or
    None on a normal start."""
    value = os.environ.pop(ENV, "")
    if not value:
        return None
    fd = int(value)
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    state = msgpack.unpackb(data, strict_map_key=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"handover state format {state.get('format')}, this program "
                         f"reads {FORMAT}")
    return state


def keep_open(fds: Iterable[int]) -> list[int]:
    """Make each fd survive exec; returns those that were open."""
    kept = []
    for fd in fds:
        if fd < 0:
            continue
        try:
            os.set_inheritable(fd, True)
        except OSError:
            continue
        kept.append(fd)
    return kept


def reexec(state_fd: int, extra_env: dict[str, str] | None = None) -> None:
    """Execute the daemon's installed code in this process (same pid, same fds); the
    state's memfd (-1: none, ``extra_env`` says where the new program finds it)."""
    env = dict(os.environ)
    if state_fd >= 0:
        env[ENV] = str(state_fd)
    env.update(extra_env or {})
    # argparse asks the terminal's size (an ioctl the seccomp filter, which the new
    # image inherits with --sandbox none, does not allow) unless these say it
    env.setdefault("COLUMNS", "100")
    env.setdefault("LINES", "40")
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    # a second SIGHUP before the new program has set its handler would end it (the
    # default action), and the guest's connection with it: ignored until then (the
    # disposition survives exec), at worst that upgrade request is lost
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.execve(sys.executable, list(sys.orig_argv), env)


def send_fds(sock: socket.socket, fds: list[int]) -> None:
    """Send fds with their numbers (the receiver puts them back at those numbers), then
    an empty message as the end."""
    for start in range(0, len(fds), MAX_FDS_PER_MESSAGE):
        batch = fds[start:start + MAX_FDS_PER_MESSAGE]
        sock.sendmsg([array.array("i", batch).tobytes()],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch))])
    sock.sendmsg([b"\0"])


def receive_fds(sock: socket.socket, got: dict[int, int]) -> bool:
    """Take the messages of send_fds waiting on a non-blocking socket into ``got``
    ({number in the sender: fd here}); True once the end came."""
    size = MAX_FDS_PER_MESSAGE * 4
    while True:
        try:
            data, anc, _flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(size))
        except BlockingIOError:
            return False
        if data == b"\0" or not data:
            return True
        numbers = array.array("i", data)
        fds = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % 4])
        for number, fd in zip(numbers, fds, strict=True):
            got[number] = fd


def place(received: dict[int, int], keep: Iterable[int] = ()) -> None:
    """Put each received fd at its number in the sender (inheritable), moving out of the
    way whatever is there first; ``keep`` are fds of ours that must stay open (they are
    not targets)."""
    high = max([*received, *received.values(), *keep, 2]) + 1
    staged = {number: os.dup2(fd, high + i) for i, (number, fd) in
              enumerate(received.items())}  # above every number in play
    for fd in received.values():
        os.close(fd)
    for number, fd in staged.items():
        os.dup2(fd, number, inheritable=True)
        os.close(fd)


# ----- `pyvirtiofsd upgrade`: the command that asks a running daemon for it ------------

def upgrade_main(argv: list[str]) -> int:
    """``pyvirtiofsd upgrade``: SIGHUP the daemon, wait until its new code serves; 0 if
    it does, else 1 with the reason on stderr."""
    p = argparse.ArgumentParser(prog="pyvirtiofsd upgrade", description=UPGRADE_COMMAND)
    p.add_argument("--socket-path", required=True, help="the daemon's --socket-path")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the new code to serve (default 30)")
    args = p.parse_args(argv)
    pid = daemon_pid(args.socket_path, "pyvirtiofsd upgrade: no daemon pid in")
    before = read_info(pid)
    if not before:
        print(f"pyvirtiofsd upgrade: daemon {pid} publishes no info segment "
              f"(/pyvirtiofsd-{pid}-info): not running, or a version without live "
              "upgrade", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"pyvirtiofsd upgrade: daemon {pid} is not running", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"pyvirtiofsd upgrade: daemon {pid} exited during the upgrade; see its "
                  "log", file=sys.stderr)
            return 1
        now = read_info(pid)
        if now.get("upgrades", 0) > before.get("upgrades", 0) and now.get("serving"):
            print(f"pyvirtiofsd {pid}: code {before.get('build')} -> {now.get('build')}, "
                  f"live upgrade {now['upgrades']}, serving")
            return 0
    print(f"pyvirtiofsd upgrade: daemon {pid} did not serve new code within "
          f"{args.timeout:g} s (it goes on with the old code if the upgrade failed; see "
          "its log)", file=sys.stderr)
    return 1
