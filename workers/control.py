"""Supervisor <-> worker control messages: msgpack maps over a SOCK_SEQPACKET pair.

Fds never travel in these messages: supervisor and workers share one fd table (clone
with CLONE_FILES), so a kick, call or memory fd is named by its number. The supervisor
closes a replaced fd only after the worker has acknowledged the change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

MAX_MESSAGE = 65536

# operations sent to a worker
OP_MEM = "mem"  # regions: [[gpa, size, uva, mmap_offset, fd], ...]
OP_CALL = "call"  # fd: new call eventfd, or -1
OP_KICK = "kick"  # fd: new kick eventfd
OP_ENABLE = "enable"  # on: bool
OP_STOP = "stop"  # reply carries last_avail and the parked SETLKWs (see ParkedLocks.export)
OP_LOG = "log"  # fd, size, offset: the dirty log to mark guest writes in (fd -1: stop)


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message)


def decode(data: bytes) -> dict[str, Any]:
    message = msgpack.unpackb(data)
    if not isinstance(message, dict):
        raise ValueError("control message is not a map")
    return message


@dataclass(slots=True)
class QueueSetup:
    """Everything a worker needs to start serving one virtqueue (copied by the clone)."""

    index: int
    size: int
    desc_uva: int
    avail_uva: int
    used_uva: int
    last_avail_idx: int
    kick_fd: int
    call_fd: int
    enabled: bool
    event_idx: bool
    indirect: bool
    resume_from_used: bool = False  # a restarted worker replays the request in flight
    poll_us: int = 0  # busy-poll the ring this long after draining it, before sleeping
    c_path: bool = True  # --c-fast-path: C may answer the opcodes the table allows it
    regions: list[list[int]] = field(default_factory=list)
    # live migration: the front-end's dirty log while it logs (VHOST_F_LOG_ALL), else -1
    log_fd: int = -1
    log_size: int = 0
    log_offset: int = 0
    # SETLKWs a stopped worker of this queue had parked (ParkedLocks.export): this one
    # parks them again and answers them into their chains (live migration, a restart)
    parked: list[list[int]] = field(default_factory=list)
