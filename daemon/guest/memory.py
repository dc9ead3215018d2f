"""Guest memory as seen by a worker: the front-end's memfd regions mapped MAP_SHARED,
and translation of guest-physical and front-end-virtual addresses to host memory.

Every descriptor address is checked against these regions by the C chain walker
(``pyvfs_walk_chain``, fed :attr:`GuestMemory.c_regions`), and ring addresses by
:meth:`GuestMemory.host_address`, so the guest can never make the daemon touch memory
that is not guest RAM.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from dataclasses import dataclass

from daemon.native._sys import ffi, lib
from daemon.protocol.vhost_user import MemoryRegion

PAGE = 4096


class BadGuestAddress(Exception):
    """A guest-supplied address or length that does not lie inside guest memory."""


@dataclass(slots=True)
class MappedRegion:
    gpa: int
    size: int
    uva: int
    host: int  # host address of guest-physical ``gpa``
    map_base: int
    map_len: int


class GuestMemory:
    """The regions of one memory table. Mapping happens once per table, in the worker."""

    def __init__(self, regions: list[tuple[MemoryRegion, int]]) -> None:
        self.regions: list[MappedRegion] = []
        try:
            for region, fd in regions:
                self.regions.append(_map_region(region, fd))
        except BaseException:
            self.close()
            raise
        self.regions.sort(key=lambda r: r.gpa)
        self._last = self.regions[0] if self.regions else None
        # the same table for the C chain walker
        self.c_regions = ffi.new("pyvfs_region_t[]", max(len(self.regions), 1))
        for i, r in enumerate(self.regions):
            self.c_regions[i].gpa = r.gpa
            self.c_regions[i].size = r.size
            self.c_regions[i].host = r.host
        self.c_count = len(self.regions)

    def close(self) -> None:
        """Unmap; callers must hold no views into this memory any more."""
        for r in self.regions:
            lib.pyvfs_munmap(r.map_base, r.map_len)
        self.regions = []
        self._last = None

    def _region_for(self, gpa: int) -> MappedRegion:
        last = self._last
        if last is not None and last.gpa <= gpa < last.gpa + last.size:
            return last
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                self._last = r
                return r
        raise BadGuestAddress(f"guest address {gpa:#x} is outside guest memory")

    def host_address(self, gpa: int, length: int) -> int:
        r = self._region_for(gpa)
        off = gpa - r.gpa
        if length < 0 or off + length > r.size:
            raise BadGuestAddress(f"guest range {gpa:#x}+{length:#x} crosses a region border")
        return r.host + off

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Ring addresses arrive as front-end virtual addresses (SET_VRING_ADDR)."""
        for r in self.regions:
            if r.uva <= uva and uva + length <= r.uva + r.size:
                return r.gpa + (uva - r.uva)
        raise BadGuestAddress(f"front-end address {uva:#x}+{length:#x} is not in any region")


def _map_region(region: MemoryRegion, fd: int, where: str = "") -> MappedRegion:
    if region.memory_size <= 0:
        raise BadGuestAddress("memory region of size 0")
    start = region.mmap_offset & ~(PAGE - 1)
    delta = region.mmap_offset - start
    map_len = region.memory_size + delta
    base = lib.pyvfs_mmap_shared(fd, map_len, start)
    if base == 0:
        err = lib.pyvfs_errno()
        where = where or f"memory region at guest address {region.guest_phys_addr:#x}"
        raise OSError(err, f"cannot map guest memory: {where}: {os.strerror(err)}: refused")
    return MappedRegion(
        region.guest_phys_addr, region.memory_size, region.userspace_addr, base + delta, base,
        map_len,
    )


def check_regions(regions: list[tuple[MemoryRegion, int]]) -> None:
    """Refuse, before any worker maps it, a region its fd cannot back: mapped past the
    end of a file, its pages would raise SIGBUS in the worker that touches them (a
    descriptor the guest points there), and a worker crash would follow every restart.
    Each region is checked with fstat and mapped once (then unmapped); BadGuestAddress
    or OSError names the region and the sizes."""
    for region, fd in regions:
        where = (f"memory region at guest address {region.guest_phys_addr:#x} (memory_size "
                 f"{region.memory_size}, mmap_offset {region.mmap_offset})")
        need = region.mmap_offset + region.memory_size
        if region.memory_size <= 0 or need >= 1 << 63 or \
                region.guest_phys_addr + region.memory_size > 1 << 64 or \
                region.userspace_addr + region.memory_size > 1 << 64:
            raise BadGuestAddress(f"{where}: impossible size or address: refused")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise OSError(e.errno, f"{where}: fd {fd}: {e.strerror}: refused") from None
        if stat.S_ISREG(st.st_mode) and st.st_size < need:
            raise BadGuestAddress(f"{where}: its fd holds {st.st_size} bytes, it needs {need} "
                                  "(mmap_offset + memory_size): refused")
        mapped = _map_region(region, fd, where)
        lib.pyvfs_munmap(mapped.map_base, mapped.map_len)


def load_u16_at(regions: list[tuple[MemoryRegion, int]], uva: int) -> int:
    """A 16-bit value of guest memory, by front-end address, read through a one-page
    mapping of its region's fd (the supervisor maps no guest memory otherwise): the used
    index of a ring whose worker was killed."""
    for region, fd in regions:
        if region.userspace_addr <= uva and uva + 2 <= region.userspace_addr + \
                region.memory_size:
            offset = region.mmap_offset + uva - region.userspace_addr
            start = offset & ~(PAGE - 1)
            base = lib.pyvfs_mmap_shared(fd, PAGE, start)
            if base == 0:
                err = lib.pyvfs_errno()
                raise OSError(err, f"cannot map guest memory at {uva:#x}: {os.strerror(err)}")
            try:
                return lib.pyvfs_load_u16(base + offset - start)
            finally:
                lib.pyvfs_munmap(base, PAGE)
    raise BadGuestAddress(f"front-end address {uva:#x} is not in any region")


class DirtyLog:
    """The front-end's dirty log (live migration: a bit per 4 KiB guest page), mapped in
    this process: workers share fds, not memory, so each maps it for itself."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        if size <= 0:
            raise OSError(errno.EINVAL, f"dirty log of {size} bytes")
        skip = offset & (mmap.PAGESIZE - 1)
        self._mapping = lib.pyvfs_mmap_shared(fd, size + skip, offset - skip)
        if not self._mapping:
            err = lib.pyvfs_errno()
            raise OSError(err, f"cannot map the dirty log: {os.strerror(err)}")
        self._length = size + skip
        self.address = self._mapping + skip  # where the log's first byte is mapped
        self.size = size

    def close(self) -> None:
        if self._mapping:
            lib.pyvfs_munmap(self._mapping, self._length)
            self._mapping = 0
