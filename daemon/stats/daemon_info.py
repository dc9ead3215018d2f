"""Which code serves: a small shared-memory segment per daemon, ``/pyvirtiofsd-<pid>-info``
(pid: the pid-file's process), holding the build id of the serving code, the serving
process's pid, how many live upgrades it went through and since when it serves.

The process outside any sandbox creates (or, after a live upgrade, re-attaches) it before
the server starts, so the server writes it through a mapping even where /dev/shm is out
of sight. ``pyvirtiofsd stats`` shows it, and ``pyvirtiofsd upgrade`` waits on it for the
new code to serve (daemon/host/handover.py)."""

from __future__ import annotations

import mmap
import struct

import msgpack
import posix_ipc

SIZE = 4096
LENGTH = struct.Struct("<I")


def daemon_pid(socket_path: str, failure: str) -> int:
    """The pid the daemon serving ``socket_path`` wrote next to it (``S.pid``): how the
    stats and upgrade commands find it. Where there is none, exits saying ``failure``,
    the path and why."""
    path = socket_path + ".pid"
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError) as e:
        raise SystemExit(f"{failure} {path}: {e}") from None


def segment_name(pid: int) -> str:
    return f"/pyvirtiofsd-{pid}-info"


class DaemonInfo:
    def __init__(self, name: str, mm: mmap.mmap) -> None:
        self.name = name
        self.mm = mm

    @classmethod
    def open(cls, name: str, create: bool = False) -> DaemonInfo:
        """Map the segment; ``create``: make it if missing (the daemon, at start and
        after an upgrade); else it must exist (the stats and upgrade commands)."""
        flags = posix_ipc.O_CREAT if create else 0
        shm = posix_ipc.SharedMemory(name, flags, mode=0o600, size=SIZE if create else 0)
        try:
            mm = mmap.mmap(shm.fd, SIZE, prot=mmap.PROT_READ | (mmap.PROT_WRITE if create
                                                               else 0))
        finally:
            shm.close_fd()
        return cls(name, mm)

    def write(self, info: dict) -> None:
        data = msgpack.packb(info)
        if LENGTH.size + len(data) > SIZE:
            raise ValueError("daemon info too large")
        self.mm[LENGTH.size:LENGTH.size + len(data)] = data
        LENGTH.pack_into(self.mm, 0, len(data))  # last: a reader sees old or new length

    def read(self) -> dict:
        (n,) = LENGTH.unpack_from(self.mm)
        if not n or n > SIZE - LENGTH.size:
            return {}
        try:
            info = msgpack.unpackb(self.mm[LENGTH.size:LENGTH.size + n])
        except (ValueError, msgpack.UnpackException):
            return {}  # read while being written: the caller reads again
        return info if isinstance(info, dict) else {}

    def unlink(self) -> None:
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def close(self) -> None:
        self.mm.close()


def read_info(pid: int) -> dict:
    """The info of the daemon whose pid file names ``pid``; {} if it has none."""
    try:
        info = DaemonInfo.open(segment_name(pid))
    except (posix_ipc.ExistentialError, OSError):
        return {}
    try:
        return info.read()
    finally:
        info.close()
