"""Guest memory as seen by a worker: the front-end's memfd regions mapped MAP_SHARED,
and translation of guest-physical and front-end-virtual addresses to host memory.

Every descriptor address is checked against these regions by the C chain walker
(``pyvfs_walk_chain``, fed :attr:`GuestMemory.c_regions`), and ring addresses by
:meth:`GuestMemory.host_address`, so the guest can never make the daemon touch memory
that is not guest RAM.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon._sys import ffi, lib
from daemon.vhost_user import MemoryRegion

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


def _map_region(region: MemoryRegion, fd: int) -> MappedRegion:
    if region.memory_size <= 0:
        raise BadGuestAddress("memory region of size 0")
    start = region.mmap_offset & ~(PAGE - 1)
    delta = region.mmap_offset - start
    map_len = region.memory_size + delta
    base = lib.pyvfs_mmap_shared(fd, map_len, start)
    if base == 0:
        err = lib.pyvfs_errno()
        raise OSError(err, f"cannot map guest memory region at {region.guest_phys_addr:#x}")
    return MappedRegion(
        region.guest_phys_addr, region.memory_size, region.userspace_addr, base + delta, base,
        map_len,
    )
