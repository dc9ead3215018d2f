"""The requests a queue's worker answers itself rather than the file system (the opcode
table's ``Server.WORKER`` rows): READ and WRITE straight between guest memory and the
file, SETLKW (which may park), INTERRUPT. A mixin of ``QueueWorker``, kept apart so the
worker's own class stays about its ring and control channel."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, NamedTuple

from daemon.fs.passthrough import HandleRef, PassthroughFs, Request
from daemon.guest.virtqueue import DescriptorChain
from daemon.protocol import fuse
from daemon.protocol.fuse import FuseError

if TYPE_CHECKING:
    from workers.parked_locks import ParkedLocks

PENDING = -1  # handle_chain's answer for a request that completes later (SETLKW)


class Incoming(NamedTuple):
    """A request's FUSE header, checked against its chain, and the room for its reply."""

    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    extlen: int
    room: int  # bytes the guest left for the reply after the out header


class WorkerRequests:
    """READ, WRITE, INTERRUPT and SETLKW, as QueueWorker methods."""

    fs: PassthroughFs
    parked: ParkedLocks

    def args(self, chain: DescriptorChain, length: int) -> bytes:
        raise NotImplementedError  # QueueWorker's

    def warn(self, kind: str, message: str, *args: object) -> None:
        raise NotImplementedError  # QueueWorker's

    def serve_read(self, chain: DescriptorChain, h: Incoming) -> int:
        """READ: the file's bytes straight into the guest's buffers."""
        if chain.writable_len < fuse.OUT_HEADER_SIZE:
            self.warn("reply", "no room for a reply to READ %d", h.unique)
            return 0
        fh, offset, size, *_ = fuse.READ_IN.unpack(self.args(chain, fuse.READ_IN.size))
        if offset >= 1 << 63:
            raise OSError(errno.EINVAL, "offset out of range")
        size = min(size, chain.writable_len - fuse.OUT_HEADER_SIZE, fuse.MAX_WRITE)
        with HandleRef(self.fs, fh) as handle:
            n = chain.preadv(handle.fd, fuse.OUT_HEADER_SIZE, size, offset) if size > 0 else 0
        total = fuse.OUT_HEADER_SIZE + n
        chain.write(0, fuse.OUT_HEADER.pack(total, 0, h.unique))
        return total

    def serve_write(self, chain: DescriptorChain, h: Incoming) -> bytes:
        """WRITE: the guest's bytes straight from its buffers into the file."""
        fh, offset, size, wflags, _owner, _flags, _ = fuse.WRITE_IN.unpack(
            self.args(chain, fuse.WRITE_IN.size))
        start = fuse.IN_HEADER_SIZE + fuse.WRITE_IN.size
        if start + size > h.length:
            raise FuseError(errno.EINVAL, f"WRITE of {size} bytes with {h.length - start} sent")
        if offset >= 1 << 63:
            raise OSError(errno.EINVAL, "offset out of range")
        if self.fs.config.readonly:
            raise OSError(errno.EROFS, "read-only share")
        with HandleRef(self.fs, fh) as handle, self.fs.write_guard(wflags, handle.fd, h.uid):
            n = chain.pwritev(handle.fd, start, size, offset) if size > 0 else 0
        return fuse.WRITE_OUT.pack(n, 0)

    def serve_interrupt(self, chain: DescriptorChain, h: Incoming) -> int:
        """INTERRUPT (no reply): cancel a waiting SETLKW."""
        (target,) = fuse.INTERRUPT_IN.unpack(self.args(chain, fuse.INTERRUPT_IN.size))
        self.parked.interrupt(target)
        return 0

    def serve_setlkw(self, chain: DescriptorChain, h: Incoming) -> int | bytes:
        """SETLKW: the lock now, or the request parked until a retry gets it."""
        arg = self.args(chain, fuse.LK_IN.size)
        waiting = self.fs.start_setlkw(Request(h.opcode, h.unique, h.nodeid, h.uid, h.gid,
                                               h.pid, arg, h.room))
        if waiting is not None:
            self.parked.park(chain.head, h.unique, waiting)
            return PENDING
        return b""
