"""Split virtqueue (virtio 1.x, section 2.7): popping descriptor chains and pushing used
elements, with VIRTIO_RING_F_INDIRECT_DESC and VIRTIO_RING_F_EVENT_IDX.

The queue works on guest memory but does no other I/O: the worker decides when to wait
for a kick and when to signal the call eventfd (:meth:`SplitQueue.should_notify`).
"""

from __future__ import annotations

import struct

from daemon._sys import lib
from daemon.guest_memory import BadGuestAddress, GuestMemory

DESC = struct.Struct("<QIHH")
DESC_SIZE = 16
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768


class BadChain(Exception):
    """A descriptor chain the guest built wrongly; the request is dropped."""


class DescriptorChain:
    """One request: device-readable views (the FUSE request) and device-writable views
    (room for the reply), both straight into guest memory."""

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len")

    def __init__(self, head: int) -> None:
        self.head = head
        self.readable: list[memoryview] = []
        self.writable: list[memoryview] = []
        self.readable_len = 0
        self.writable_len = 0

    def release(self) -> None:
        for v in self.readable:
            v.release()
        for v in self.writable:
            v.release()


class SplitQueue:
    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool,
        indirect: bool,
        last_avail_idx: int = 0,
    ) -> None:
        if size == 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise BadChain(f"queue size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
        self.size = size
        self.mem = mem
        self.event_idx = event_idx
        self.indirect = indirect
        self.desc = mem.view(desc_gpa, size * DESC_SIZE)
        self.avail_addr = mem.host_address(avail_gpa, 6 + 2 * size)
        self.used_addr = mem.host_address(used_gpa, 6 + 8 * size)
        self.avail_ring = mem.view(avail_gpa + 4, 2 * size + 2)
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = lib.pyvfs_load_u16(self.used_addr + 2)
        self._signalled_used = self.used_idx
        self._signalled_valid = False

    def release(self) -> None:
        self.desc.release()
        self.avail_ring.release()

    def avail_idx(self) -> int:
        return lib.pyvfs_load_u16(self.avail_addr + 2)

    def has_work(self) -> bool:
        return self.avail_idx() != self.last_avail_idx

    def pop(self) -> DescriptorChain | int | None:
        """Next available chain, or None. A malformed chain is consumed and returned as
        its head index (int) so the caller can complete it with length 0 and log it."""
        avail = self.avail_idx()
        if avail == self.last_avail_idx:
            return None
        if (avail - self.last_avail_idx) & 0xFFFF > self.size:
            raise BadChain(f"avail index jumped from {self.last_avail_idx} to {avail}")
        slot = self.last_avail_idx % self.size
        head = struct.unpack_from("<H", self.avail_ring, 2 * slot)[0]
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        chain = DescriptorChain(head)
        try:
            self.walk(chain)
        except (BadChain, BadGuestAddress) as e:
            chain.release()
            self.last_error = f"descriptor chain at head {head}: {e}"
            return head
        return chain

    def walk(self, chain: DescriptorChain) -> None:
        """Translate the chain at chain.head into views (raises BadChain, BadGuestAddress)."""
        if chain.head >= self.size:
            raise BadChain(f"head index {chain.head} >= queue size {self.size}")
        table = self.desc
        table_len = self.size
        index = chain.head
        seen = 0
        indirect_done = False
        mem = self.mem
        while True:
            if index >= table_len:
                raise BadChain(f"next index {index} outside table of {table_len}")
            seen += 1
            if seen > table_len:
                raise BadChain("descriptor chain loops")
            addr, length, flags, nxt = DESC.unpack_from(table, index * DESC_SIZE)
            if flags & DESC_F_INDIRECT:
                if not self.indirect or indirect_done or table is not self.desc:
                    raise BadChain("indirect descriptor not allowed here")
                if flags & DESC_F_NEXT:
                    raise BadChain("indirect descriptor with NEXT flag")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
                    raise BadChain(f"indirect table of {length} bytes")
                table = mem.view(addr, length)
                table_len = length // DESC_SIZE
                index = 0
                seen = 0
                indirect_done = True
                continue
            if flags & DESC_F_WRITE:
                mem.views(addr, length, chain.writable)
                chain.writable_len += length
            else:
                if chain.writable:
                    raise BadChain("device-readable descriptor after a writable one")
                mem.views(addr, length, chain.readable)
                chain.readable_len += length
            if not flags & DESC_F_NEXT:
                break
            index = nxt
        if table is not self.desc:
            table.release()

    def push(self, head: int, length: int) -> None:
        """Publish one used element; the index store is a release store after it."""
        idx = self.used_idx
        lib.pyvfs_store_used(self.used_addr + 4 + 8 * (idx % self.size), head, length)
        self.used_idx = (idx + 1) & 0xFFFF
        lib.pyvfs_store_u16(self.used_addr + 2, self.used_idx)

    def enable_notifications(self) -> bool:
        """Ask for a kick on new work; True if work arrived meanwhile (process it first)."""
        if self.event_idx:
            lib.pyvfs_store_u16(self.used_addr + 4 + 8 * self.size, self.last_avail_idx)
        else:
            lib.pyvfs_store_u16(self.used_addr, 0)
        lib.pyvfs_fence()
        return self.has_work()

    def disable_notifications(self) -> None:
        if not self.event_idx:
            lib.pyvfs_store_u16(self.used_addr, 1)

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for the used elements pushed so far."""
        lib.pyvfs_fence()
        new = self.used_idx
        if not self.event_idx:
            flags = lib.pyvfs_load_u16(self.avail_addr)
            return not flags & AVAIL_F_NO_INTERRUPT
        old = self._signalled_used
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if not valid:
            return True
        used_event = lib.pyvfs_load_u16(self.avail_addr + 4 + 2 * self.size)
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
