"""Which function answers each opcode a worker hands to Python: the opcode table's rows
(daemon/protocol/opcodes.py) bound to the file system, made once per file system rather
than once per worker.

Why once: building the table touches every row, every handler function and the file
system's class dictionaries, and in CPython 3.11 each reference taken writes the object's
page. A worker that built its own copied ~0.2 MB of pages it otherwise shares with the
template; the template now builds it before it clones the first worker
(``workers.pool.WorkerPool._prepare``), and every worker looks it up. Nothing in it
depends on a ring: a handler takes the worker as its first argument.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

from daemon.fs.passthrough import PassthroughFs, Request
from daemon.guest.virtqueue import DescriptorChain
from daemon.protocol import fuse
from daemon.protocol.opcodes import TABLE, Op, Server
from workers.worker_requests import Incoming


class ReadsArgs(Protocol):
    def args(self, chain: DescriptorChain, length: int) -> bytes: ...


# A request's handler: called with the worker, the chain and its checked header; returns
# the bytes written to the guest (already answered; 0: no reply, PENDING: later), or the
# payload of a success reply to write.
Handler = Callable[[Any, DescriptorChain, Incoming], int | bytes | bytearray]
FsMethod = Callable[[Request], bytes | bytearray | None]

_SHARED: dict[tuple[int, type], tuple[PassthroughFs, dict[int, Handler]]] = {}


def call_fs(row: Op, method: FsMethod, worker: ReadsArgs, chain: DescriptorChain,
            h: Incoming) -> int | bytes | bytearray:
    """A request the file system answers: its arguments (and request extensions:
    security context, groups, which come last) read from the chain; no reply for
    the opcodes that have none."""
    arg = worker.args(chain, h.length - fuse.IN_HEADER_SIZE)
    ext = None
    if h.extlen:
        arg, ext = arg[: -8 * h.extlen], arg[-8 * h.extlen :]
    payload = method(Request(h.opcode, h.unique, h.nodeid, h.uid, h.gid, h.pid, arg,
                             h.room, ext))
    if row.no_reply or payload is None:
        return 0
    return payload


def dispatch_table(fs: PassthroughFs, worker_class: type) -> dict[int, Handler]:
    """Each opcode's handler: the file system's method (its arguments read from the chain,
    its payload replied) or ``worker_class``'s own; opcodes left out are answered
    ENOSYS."""
    handlers: dict[int, Handler] = {}
    for row in TABLE:
        if row.needs_xattr and not fs.serves_xattrs:
            continue
        if row.served_by is Server.WORKER:
            handlers[row.opcode] = getattr(worker_class, row.handler)
        else:
            handlers[row.opcode] = functools.partial(call_fs, row, getattr(fs, row.handler))
    return handlers


def shared_dispatch(fs: PassthroughFs, worker_class: type) -> dict[int, Handler]:
    """The table for this file system, made at the first call (in the template, before
    it clones a worker) and the same object afterwards."""
    key = (id(fs), worker_class)
    made = _SHARED.get(key)
    if made is None or made[0] is not fs:
        made = _SHARED[key] = (fs, dispatch_table(fs, worker_class))
    return made[1]
