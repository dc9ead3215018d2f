"""Run something at the exact moment a file in a directory is opened: a race window made
deterministic.

The opener is held inside its open(2) by a fanotify permission event (FAN_OPEN_PERM,
which the kernel raises once the file exists, O_CREAT opens included, and waits on until
the listener answers) while a thread of the test does what another queue's worker could do
at that moment, say rename another file onto the name; then the open goes on. O_PATH opens
raise no such event, so a daemon's O_PATH lookups are never held.

Needs CAP_SYS_ADMIN (fanotify_init); :func:`paused_open` skips the test without it.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FAN_CLOEXEC = 0x1
FAN_CLASS_CONTENT = 0x4
FAN_MARK_ADD = 0x1
FAN_OPEN_PERM = 0x10000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ALLOW = 0x1
AT_FDCWD = -100
EVENT = struct.Struct("<IBBHQii")  # fanotify_event_metadata
RESPONSE = struct.Struct("<iI")  # fanotify_response

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]


class PausedOpen:
    """What :func:`paused_open` did: ``fired`` once the action ran (inside the open)."""

    def __init__(self) -> None:
        self.fired = False
        self.error: BaseException | None = None


@contextmanager
def paused_open(directory: Path, name: str, action: Callable[[], None]
                ) -> Iterator[PausedOpen]:
    """While in the block, the first open of ``directory/name`` (by anyone, by any path
    that reaches it) waits inside open(2) until ``action`` has run in another thread."""
    fan = _libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY | os.O_CLOEXEC)
    if fan < 0:
        pytest.fail(f"fanotify_init: {os.strerror(ctypes.get_errno())} (the tests run as "
                    "root: they need CAP_SYS_ADMIN and a kernel with fanotify)")
    if _libc.fanotify_mark(fan, FAN_MARK_ADD, FAN_OPEN_PERM | FAN_EVENT_ON_CHILD, AT_FDCWD,
                           os.fsencode(directory)) < 0:
        err = ctypes.get_errno()
        os.close(fan)
        pytest.fail(f"fanotify_mark on {directory}: {os.strerror(err)}")
    target = os.path.join(os.path.realpath(directory), name)
    state = PausedOpen()
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC)

    def listen() -> None:
        while True:
            ready, _, _ = select.select([fan, stop_r], [], [])
            if stop_r in ready:
                return
            data = os.read(fan, 4096)
            pos = 0
            while pos + EVENT.size <= len(data):
                length, _, _, _, _mask, fd, _pid = EVENT.unpack_from(data, pos)
                pos += length
                if fd < 0:
                    continue
                try:
                    if not state.fired and os.readlink(f"/proc/self/fd/{fd}") == target:
                        state.fired = True
                        try:
                            action()
                        except BaseException as e:  # noqa: BLE001 - re-raised by the test
                            state.error = e
                finally:  # every open goes on, the paused one included
                    os.write(fan, RESPONSE.pack(fd, FAN_ALLOW))
                    os.close(fd)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        os.write(stop_w, b"x")
        thread.join()
        for fd in (fan, stop_r, stop_w):  # closing the group lets any open left go on
            os.close(fd)
    if state.error is not None:
        raise state.error
