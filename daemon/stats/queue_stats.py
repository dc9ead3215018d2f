"""Per-queue request counters in shared memory, for ``pyvirtiofsd stats``.

One row per virtqueue (``pyvfs_qstats_t`` in daemon/native/pyvfs.h, counted by stats.c):
requests, how many were answered in C, errors, dropped chains, data bytes read and written,
wake-ups, interrupts sent to the guest, workers restarted, and per opcode: requests, errors,
reply bytes and a latency histogram (from the pop of the chain to its reply, in log2 buckets
of :data:`LATENCY_BOUNDS_US`, with the sum of the latencies). The supervisor creates the segment
(``/pyvirtiofsd-<pid>-stats``) before any worker exists; each worker writes only its own
row, from C and from Python, and a restarted worker carries on counting in the same row.
Anyone who may open the segment reads it without disturbing the daemon.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import posix_ipc

from daemon.protocol import fuse

MAGIC = b"PYVFSQS2"
VERSION = 2
HEADER = struct.Struct("<8sIIII")  # magic, version, queues, row size, owner pid
HEADER_SIZE = 64
FIELDS = ("requests", "in_c", "errors", "dropped", "read_bytes", "write_bytes", "wakeups",
          "notifies", "worker_restarts")
OPCODES = 64  # PYVFS_STATS_OPCODES
OP_FIELDS = ("requests", "errors", "reply_bytes", "latency_ns")  # pyvfs_opstats_t, then:
LATENCY_BOUNDS_US = tuple(1 << b for b in range(17))  # inclusive upper bounds; then +Inf
BUCKETS = len(LATENCY_BOUNDS_US) + 1  # PYVFS_STATS_BUCKETS
OP_SIZE = len(OP_FIELDS) + BUCKETS  # words per opcode
ROW = struct.Struct(f"<{len(FIELDS) + OPCODES * OP_SIZE}Q")  # must match pyvfs_qstats_t
_RESTARTS = struct.Struct("<Q")
_RESTARTS_OFFSET = FIELDS.index("worker_restarts") * 8


def segment_name(pid: int) -> str:
    return f"/pyvirtiofsd-{pid}-stats"


class QueueStats:
    def __init__(self, name: str, mm: mmap.mmap) -> None:
        self.name = name
        self.mm = mm
        _, _, self.queues, _, self.owner = HEADER.unpack_from(mm)
        self._c_rows: Any = None

    @classmethod
    def create(cls, name: str, queues: int) -> QueueStats:
        size = HEADER_SIZE + queues * ROW.size
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError:  # a crashed daemon's, with a pid now reused
            posix_ipc.unlink_shared_memory(name)
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        try:
            mm = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        HEADER.pack_into(mm, 0, MAGIC, VERSION, queues, ROW.size, os.getpid())
        return cls(name, mm)

    @classmethod
    def attach(cls, name: str, writable: bool = False) -> QueueStats:
        """Map a daemon's segment: read-only (the stats command), or ``writable`` for the
        daemon itself after a live upgrade (its workers go on counting in it)."""
        shm = posix_ipc.SharedMemory(name)
        try:
            size = os.fstat(shm.fd).st_size
            mm = mmap.mmap(shm.fd, size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable
                                                               else 0))
        finally:
            shm.close_fd()
        magic, version, queues, row, _ = HEADER.unpack_from(mm)
        if magic[:7] == MAGIC[:7] and (magic != MAGIC or version != VERSION):
            mm.close()
            raise ValueError(f"{name}: statistics segment of version {version}; this "
                             f"pyvirtiofsd reads version {VERSION}: use the stats command "
                             "of the daemon's own version")
        if magic != MAGIC or row != ROW.size or size < HEADER_SIZE + queues * ROW.size:
            mm.close()
            raise ValueError(f"{name}: not a pyvirtiofsd statistics segment of this version")
        return cls(name, mm)

    def attach_worker(self, index: int) -> None:
        """Point the C counters of this (worker) process at queue ``index``'s row."""
        from daemon.native._sys import ffi, lib

        if not 0 <= index < self.queues:
            return
        if self._c_rows is None:
            self._c_rows = ffi.from_buffer(self.mm)  # kept: the pointer below lives in it
        row = ffi.cast("pyvfs_qstats_t *", ffi.cast("char *", self._c_rows) +
                       HEADER_SIZE + index * ROW.size)
        lib.pyvfs_stats_attach(row)

    def note_restart(self, index: int) -> None:
        """The supervisor started queue ``index``'s worker again after it died (the one
        word of a row the worker never writes)."""
        if 0 <= index < self.queues:
            at = HEADER_SIZE + index * ROW.size + _RESTARTS_OFFSET
            (n,) = _RESTARTS.unpack_from(self.mm, at)
            _RESTARTS.pack_into(self.mm, at, n + 1)

    def rows(self) -> list[dict[str, Any]]:
        """Each queue's counters; ``by_opcode`` maps the opcodes seen to their request
        counts, ``opcodes`` to all their counters (``latency``: counts per bucket of
        LATENCY_BOUNDS_US, the last one past them, not cumulative)."""
        out = []
        for q in range(self.queues):
            values = ROW.unpack_from(self.mm, HEADER_SIZE + q * ROW.size)
            row: dict[str, Any] = dict(zip(FIELDS, values[: len(FIELDS)], strict=True))
            by_op: dict[str, int] = {}
            detail: dict[str, dict[str, Any]] = {}
            for op in range(OPCODES):
                at = len(FIELDS) + op * OP_SIZE
                if not values[at]:
                    continue
                name = opcode_name(op)
                by_op[name] = values[at]
                counters: dict[str, Any] = dict(zip(OP_FIELDS, values[at:at + len(OP_FIELDS)],
                                                    strict=True))
                counters["latency"] = list(values[at + len(OP_FIELDS):at + OP_SIZE])
                detail[name] = counters
            row["by_opcode"] = by_op
            row["opcodes"] = detail
            out.append(row)
        return out

    def close(self) -> None:
        if self._c_rows is not None:
            from daemon.native._sys import ffi

            ffi.release(self._c_rows)
            self._c_rows = None
        self.mm.close()

    def unlink(self) -> None:
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass


def opcode_name(op: int) -> str:
    if op == 0:
        return "OTHER"
    try:
        return fuse.Opcode(op).name
    except ValueError:
        return str(op)
