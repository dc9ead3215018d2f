"""Run test code in child processes; results come back through a pipe, events through pipes.

A child made with ``shared_fds=True`` shares its parent's fd table, as the daemon's workers
share the supervisor's (clone(CLONE_FILES|SIGCHLD) via daemon.host.process.clone_shared_fds): an
fd either side opens or closes is opened or closed for both.  So neither side closes the
pipe it shares while the child may run: the child sends a length-prefixed result and the
parent watches a pidfd, so it also notices a child that dies before sending one.

Nothing here sleeps to synchronise: a Gate is a pipe that becomes readable, a Signal a pipe
that carries one byte per event, and a child's death is its pidfd becoming readable.
"""

from __future__ import annotations

import mmap
import os
import pickle
import select
import signal
import struct
import traceback
from collections.abc import Callable
from typing import Any

from daemon.host.process import clone_shared_fds

WAIT_S = 120.0  # only against a hang: nothing waits for time to pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Gate:
    """A one-shot event for any number of processes: wait() returns once open() was called."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def open(self) -> None:
        os.write(self.w, b"x")  # never read: the pipe stays readable for every waiter

    def is_open(self) -> bool:
        return bool(select.select([self.r], [], [], 0)[0])

    def wait(self, timeout: float = WAIT_S) -> None:
        if not select.select([self.r], [], [], timeout)[0]:
            raise TimeoutError("gate never opened")

    def close(self) -> None:
        """Creator only, once no child uses it (with shared fds it closes for all)."""
        os.close(self.r)
        os.close(self.w)


class Signal:
    """Events counted across processes: post() one, take(n) waits for n of them."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def post(self) -> None:
        os.write(self.w, b"x")

    def take(self, n: int = 1, timeout: float = WAIT_S) -> None:
        while n > 0:
            if not select.select([self.r], [], [], timeout)[0]:
                raise TimeoutError(f"{n} events never came")
            n -= len(os.read(self.r, n))

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class Board:
    """Values published to every process (anonymous shared memory made before the clone):
    aligned 8-byte stores and loads, single instructions on x86-64."""

    def __init__(self, n: int) -> None:
        self._mm = mmap.mmap(-1, 8 * n)
        self.v = memoryview(self._mm).cast("Q")


class Child:
    """A process running fn(); its pickled return value (or traceback) comes back.

    With shared_fds the child shares this process's fd table (the daemon's workers' setup);
    call it only while this process has a single thread."""

    def __init__(self, fn: Callable[[], Any], shared_fds: bool = False) -> None:
        r, w = os.pipe()
        self.shared_fds = shared_fds
        pid = clone_shared_fds() if shared_fds else os.fork()
        if pid == 0:
            self._child(fn, r, w, shared_fds)
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)  # a zombie still has one: no race with its exit
        self._r = r
        self._w = w
        if not shared_fds:
            os.close(w)
            self._w = -1
        self.status: int | None = None

    @staticmethod
    def _child(fn: Callable[[], Any], r: int, w: int, shared_fds: bool) -> None:
        code = 0
        try:
            if not shared_fds:
                os.close(r)
            payload: tuple[str, Any] = ("ok", fn())
            data = pickle.dumps(payload)
        except BaseException:  # noqa: BLE001 - report everything to the parent
            data = pickle.dumps(("error", traceback.format_exc()))
            code = 1
        try:
            _write_all(w, struct.pack("<Q", len(data)) + data)
        finally:
            os._exit(code)

    def exited(self) -> bool:
        """Has the child exited (it is a zombie or reaped)?"""
        return self.status is not None or bool(select.select([self.pidfd], [], [], 0)[0])

    def wait_exit(self, timeout: float = WAIT_S) -> None:
        """Block until the child has exited; it stays a zombie until reap()."""
        if self.status is None and not select.select([self.pidfd], [], [], timeout)[0]:
            raise TimeoutError(f"child {self.pid} did not exit")

    def kill(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)

    def reap(self) -> int:
        """Collect the exit status (waits for the exit) and free the pipes; returns it."""
        if self.status is None:
            self.wait_exit()
            _, self.status = os.waitpid(self.pid, 0)
            os.close(self.pidfd)
            os.close(self._r)
            if self._w >= 0:
                os.close(self._w)
        return self.status

    def killed_by(self) -> int:
        """The signal that ended the child (0 when it exited)."""
        st = self.reap()
        return os.WTERMSIG(st) if os.WIFSIGNALED(st) else 0

    def result(self, timeout: float = WAIT_S) -> Any:
        """The child's return value; raises AssertionError with its traceback if it failed."""
        buf = bytearray()
        need = -1
        while need < 0 or len(buf) < need:
            ready = select.select([self._r, self.pidfd], [], [], timeout)[0]
            if not ready:
                self.kill()
                raise AssertionError(f"child {self.pid} sent no result within {timeout} s")
            if self._r in ready:
                buf += os.read(self._r, 1 << 16)
            elif not select.select([self._r], [], [], 0)[0]:
                break  # exited, and nothing left in the pipe
            if need < 0 and len(buf) >= 8:
                need = 8 + struct.unpack_from("<Q", buf)[0]
        status = self.reap()
        if need < 0 or len(buf) < need:
            raise AssertionError(f"child {self.pid} died without a result (status {status})")
        kind, value = pickle.loads(bytes(buf[8:need]))
        if kind != "ok":
            raise AssertionError(f"child {self.pid} failed:\n{value}")
        return value


def isolated(fn: Callable[[], Any]) -> Any:
    """Run fn() in a forked child with its own copy of the fd table and return its result.

    Tests whose processes share an fd table run inside one: a table that closed a wrong fd
    number there cannot close one of pytest's, and the child's fd table can be compared
    before and after."""
    return Child(fn).result()
