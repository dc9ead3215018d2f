"""Split virtqueue (virtio 1.x, section 2.7): walking descriptor chains and pushing used
elements, with VIRTIO_RING_F_INDIRECT_DESC and VIRTIO_RING_F_EVENT_IDX.

The queue works on guest memory but does no other I/O: the worker decides when to wait
for a kick and when to signal the call eventfd (:meth:`SplitQueue.should_notify`).
"""

from __future__ import annotations

import os
import time

from daemon.guest.memory import GuestMemory
from daemon.native._sys import ffi, lib

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768


class BadChain(Exception):
    """A descriptor chain the guest built wrongly; the request is dropped."""


MAX_SEGMENTS = 1024  # host ranges per direction (IOV_MAX); more and the chain is refused
# The chain's range arrays are left as malloc gives them: the walk writes every range it
# counts before anything reads it, and a request uses a few of the 1024. Zeroed, each
# array was 16 KiB of pages every worker wrote at its start (cffi's ffi.new clears).
_uncleared = ffi.new_allocator(should_clear_after_alloc=False)


def walk_error(rc: int, detail: object) -> str:
    """What the C walker's error code and details mean, for the log."""
    a, b = detail[0], detail[1]  # type: ignore[index]
    if rc == -1:
        if b >> 63:
            return f"head index {a} >= queue size {b & ~(1 << 63)}"
        return f"next index {a} outside table of {b}"
    return {
        -2: "descriptor chain loops",
        -3: "descriptor address outside guest memory",
        -4: ("indirect descriptor with NEXT flag" if b
             else "indirect descriptor not allowed here (nested or not negotiated)"),
        -5: "device-readable descriptor after a writable one",
        -6: f"chain needs more than {MAX_SEGMENTS} memory segments",
        -7: f"indirect table of {a} bytes (not a multiple of 16, empty, too large or "
            "outside guest memory)",
        -8: "descriptor address + length overflows",
    }.get(rc, f"walk error {rc}")


class DescriptorChain:
    """One request, as host memory ranges: device-readable (the FUSE request) and
    device-writable (room for the reply), straight into guest memory. The arrays are
    allocated once per worker and refilled for every request."""

    __slots__ = ("head", "rd", "wr", "counts", "lens", "detail")

    def __init__(self) -> None:
        self.head = 0
        self.rd = _uncleared("pyvfs_iov_t[]", MAX_SEGMENTS)
        self.wr = _uncleared("pyvfs_iov_t[]", MAX_SEGMENTS)
        self.counts = ffi.new("int[2]")
        self.lens = ffi.new("uint64_t[2]")
        self.detail = ffi.new("uint64_t[2]")

    @property
    def readable_len(self) -> int:
        return self.lens[0]

    @property
    def writable_len(self) -> int:
        return self.lens[1]

    def read(self, offset: int, buf: object, length: int) -> int:
        """Copy readable bytes [offset, offset+length) into buf (cffi char[])."""
        return lib.pyvfs_iov_read(self.rd, self.counts[0], offset, buf, length)

    def write(self, offset: int, data: bytes) -> int:
        """Copy data into the writable bytes at offset."""
        return lib.pyvfs_iov_write(self.wr, self.counts[1], offset, ffi.from_buffer(data),
                                   len(data))

    def preadv(self, fd: int, skip: int, length: int, file_offset: int) -> int:
        """Read from the file straight into the writable ranges after skip bytes."""
        n = lib.pyvfs_iov_preadv(fd, self.wr, self.counts[1], skip, length, file_offset)
        if n < 0:
            raise OSError(-n, os.strerror(-n))
        return n

    def pwritev(self, fd: int, skip: int, length: int, file_offset: int) -> int:
        """Write the readable ranges after skip bytes straight into the file."""
        n = lib.pyvfs_iov_pwritev(fd, self.rd, self.counts[0], skip, length, file_offset)
        if n < 0:
            raise OSError(-n, os.strerror(-n))
        return n


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
        self.desc_addr = mem.host_address(desc_gpa, size * DESC_SIZE)
        self.avail_addr = mem.host_address(avail_gpa, 6 + 2 * size)
        self.used_addr = mem.host_address(used_gpa, 6 + 8 * size)
        # the ring state, shared with the C loop (pyvfs_serve in daemon/native/serve.c)
        self.c = ffi.new("pyvfs_queue_t *")
        self.c.desc, self.c.avail, self.c.used = self.desc_addr, self.avail_addr, self.used_addr
        self.c.regions = mem.c_regions
        self.c.nregions = mem.c_count
        self.c.size = size
        self.c.indirect = int(indirect)
        self.c.event_idx = int(event_idx)
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = lib.pyvfs_load_u16(self.used_addr + 2)
        self.c.signalled_used = self.used_idx
        self.c.signalled_valid = 0
        self.c.used_gpa = used_gpa  # where dirty logging marks used-ring writes

    def rebind(self, mem: GuestMemory, desc_gpa: int, avail_gpa: int, used_gpa: int) -> None:
        """Serve the same ring through a new memory table (SET_MEM_TABLE, ADD_MEM_REG,
        REM_MEM_REG): its three parts and the regions the chain walker checks against
        now come from ``mem``, while the ring's position (last avail, used index, the
        last interrupt decision) stays. Raises BadGuestAddress, changing nothing, if a
        ring part is not in ``mem``; the caller unmaps the old table afterwards."""
        n = self.size
        desc = mem.host_address(desc_gpa, n * DESC_SIZE)
        avail = mem.host_address(avail_gpa, 6 + 2 * n)
        used = mem.host_address(used_gpa, 6 + 8 * n)
        self.mem = mem
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.c.desc, self.c.avail, self.c.used = desc, avail, used
        self.c.regions = mem.c_regions
        self.c.nregions = mem.c_count
        self.c.used_gpa = used_gpa

    @property
    def last_avail_idx(self) -> int:
        return self.c.last_avail

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        self.c.last_avail = value & 0xFFFF

    @property
    def used_idx(self) -> int:
        return self.c.used_idx

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        self.c.used_idx = value & 0xFFFF

    def avail_idx(self) -> int:
        return lib.pyvfs_load_u16(self.avail_addr + 2)

    def walk(self, chain: DescriptorChain) -> bool:
        """Translate the chain at chain.head; False (and last_error) if it is malformed."""
        rc = lib.pyvfs_walk_chain(
            self.desc_addr, self.size, chain.head, self.indirect, self.mem.c_regions,
            self.mem.c_count, chain.rd, chain.counts, chain.lens, chain.wr,
            chain.counts + 1, chain.lens + 1, MAX_SEGMENTS, chain.detail,
        )
        if rc:
            self.last_error = (f"descriptor chain at head {chain.head}: "
                               f"{walk_error(rc, chain.detail)}")
            return False
        return True

    def push(self, head: int, length: int, chain: DescriptorChain | None = None) -> None:
        """Publish one used element; the index store is a release store after it. While
        the front-end logs dirty pages, the reply's ``length`` bytes in ``chain`` and the
        used ring's entry are marked in the log."""
        if chain is None:
            lib.pyvfs_queue_push(self.c, head, length, ffi.NULL, 0)
        else:
            lib.pyvfs_queue_push(self.c, head, length, chain.wr, chain.counts[1])

    def set_dirty_log(self, address: int, size: int) -> None:
        """Log into the mapped dirty log at ``address`` (``size`` bytes; 0: stop logging).
        Every guest page the worker writes from now on gets its bit."""
        self.c.log_size = size if address else 0
        self.c.log = address

    def push_signal(self, head: int, length: int, call_fd: int,
                    chain: DescriptorChain | None = None) -> None:
        """Publish one used element (as push, dirty log included) and, with EVENT_IDX,
        signal call_fd (if >= 0) at once when the driver's used_event asks for it, so the
        driver's completion work overlaps the worker's next request (ring.c,
        pyvfs_queue_push_signal)."""
        if chain is None:
            lib.pyvfs_queue_push_signal(self.c, head, length, ffi.NULL, 0, call_fd)
        else:
            lib.pyvfs_queue_push_signal(self.c, head, length, chain.wr, chain.counts[1],
                                        call_fd)

    def disable_notifications(self) -> None:
        lib.pyvfs_queue_disable(self.c)

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for the used elements pushed so far."""
        return bool(lib.pyvfs_queue_should_notify(self.c))

    def lasting_avail_jump(self) -> int | None:
        """The avail index if it stays more than a ring ahead of the last one popped (a
        driver error: the queue waits for a reset), else None. A driver that writes the
        16-bit index in two stores shows a value for an instant that looks like a jump
        (Python's struct.pack_into zeroes the field first); that must cost nothing."""
        for _ in range(3):
            avail = self.avail_idx()
            if (avail - self.last_avail_idx) & 0xFFFF <= self.size:
                return None
            time.sleep(0.001)
        return avail
