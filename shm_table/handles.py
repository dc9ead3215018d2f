"""The table of open files (FUSE ``fh`` values) shared by all queue workers.

A file opened on one queue's worker can be read on another's: the fd lives in the shared fd
table (CLONE_FILES) and its number lives here.  ``fh`` = generation << 32 | slot, so a stale
or forged fh never reaches a reused slot.  Each entry is refcounted: the guest's open holds
one reference, every in-flight request another, so a RELEASE racing a READ never closes the
fd under the reader.  See docs/shm_table.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shm_table._native import ffi, lib
from shm_table.table import (
    _KIND_HANDLE,
    HandleNotFound,
    HandleTableFull,
    TableCorrupt,
    _Segment,
)

DEFAULT_HANDLE_CAPACITY = 1 << 16

_ht_acquire = lib.ht_acquire
_ht_acquire_fd = lib.ht_acquire_fd
_ht_release_ref = lib.ht_release_ref

__all__ = [
    "DEFAULT_HANDLE_CAPACITY", "HandleEntry", "HandleNotFound", "HandleTable", "HandleTableFull",
]


@dataclass(frozen=True, slots=True)
class HandleEntry:
    """A consistent snapshot of one open file."""

    fh: int
    slot: int
    refcount: int
    nodeid: int
    fd: int
    flags: int
    guest_open: bool


class HandleTable(_Segment):
    """Shared open-file table.  Note: close(fh) is the guest's RELEASE; detach() unmaps."""

    _KIND = _KIND_HANDLE
    _KIND_NAME = "pyvirtiofsd handle table"

    @staticmethod
    def _segment_size(capacity: int) -> int:
        return int(lib.ht_segment_size(capacity))

    @staticmethod
    def _init(base: Any, capacity: int, owner: int) -> int:
        return int(lib.ht_init(base, capacity, owner))

    @classmethod
    def create(cls, name: str, capacity: int = DEFAULT_HANDLE_CAPACITY) -> HandleTable:
        """Create the table (supervisor).  See _Segment.create for stale-segment handling."""
        return super().create(name, capacity)

    def open(self, nodeid: int, fd: int, flags: int) -> int:
        """Register an open fd; the table owns it from now on.  Returns the new fh (never 0),
        holding the guest's reference.  Raises HandleTableFull."""
        fh = lib.ht_open(self._b, nodeid, fd, flags)
        if fh == 0:
            raise HandleTableFull(f"{self.name}: open-file table full")
        return fh

    def acquire(self, fh: int) -> tuple[int, int] | None:
        """Take a reference for one request: (slot, fd), or None for an unknown/stale fh."""
        try:
            r = _ht_acquire_fd(self._b, fh)
        except OverflowError:
            return None
        if r >= 0:
            return r & 0xFFFFFFFF, (r >> 32) - 1
        if r < -1:
            self.close_fd(-2 - r)
        return None

    def acquire_slot(self, fh: int) -> int:
        """acquire() without the tuple: slot or -1.  Read the fd with fd_of(slot)."""
        try:
            r = _ht_acquire(self._b, fh)
        except OverflowError:
            return -1
        if r < -1:
            self.close_fd(-2 - r)
            return -1
        return r

    def c_api(self) -> tuple[int, int, int]:
        """(segment address, ht_acquire_fd address, ht_release_ref address): for C code in
        another extension that takes and drops references without a Python round trip."""
        return (int(ffi.cast("uintptr_t", self._b)),
                int(ffi.cast("uintptr_t", ffi.addressof(lib, "ht_acquire_fd"))),
                int(ffi.cast("uintptr_t", ffi.addressof(lib, "ht_release_ref"))))

    def c_close(self) -> int:
        """The address of ht_close (the guest's RELEASE), for C callers like c_api()'s."""
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, "ht_close")))

    def c_open(self) -> int:
        """The address of ht_open (open()), for C callers like c_api()'s."""
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, "ht_open")))

    def fd_of(self, slot: int) -> int:
        """fd of a slot the caller holds a reference on."""
        return lib.ht_fd(self._b, slot)

    def release_ref(self, slot: int) -> int:
        """Drop a request's reference.  Returns the fd to close if it was the last, else -1."""
        return _ht_release_ref(self._b, slot)

    def close(self, fh: int) -> int:  # type: ignore[override]
        """The guest's RELEASE: drop its reference (once per fh).  Returns the fd to close if
        that was the last reference, else -1 (also for an unknown fh)."""
        try:
            return lib.ht_close(self._b, fh)
        except OverflowError:
            return -1

    def acquire_or_raise(self, fh: int) -> tuple[int, int]:
        """acquire() for callers that map a bad fh to EBADF via an exception."""
        r = self.acquire(fh)
        if r is None:
            raise HandleNotFound(f"file handle {fh:#x} is not open")
        return r

    def get(self, fh: int) -> HandleEntry | None:
        """Snapshot of the entry `fh` names, or None."""
        slot = fh & 0xFFFFFFFF
        e = self._snapshot(slot, ffi.new("ht_entry_t *"))
        return e if e is not None and e.fh == fh else None

    def _snapshot(self, slot: int, out: Any) -> HandleEntry | None:
        if not lib.ht_snapshot(self._b, slot, out):
            return None
        return HandleEntry(fh=out.fh, slot=slot, refcount=out.refcount, nodeid=out.nodeid,
                           fd=out.fd, flags=out.flags, guest_open=bool(out.guest_open))

    def iter_handles(self) -> Iterator[HandleEntry]:
        """Snapshots of the open entries (same guarantees as InodeTable.iter_entries)."""
        out = ffi.new("ht_entry_t *")
        for slot in range(lib.ht_hwm(self._b)):
            e = self._snapshot(slot, out)
            if e is not None:
                yield e

    def __len__(self) -> int:
        return self._raw_stats()["entries"]

    def stats(self) -> dict[str, int | float]:
        """Header counters: entries, capacity, load_factor, opens (inserts), frees (removals)."""
        raw = self._raw_stats()
        keep = ("capacity", "entries", "high_water_mark", "inserts", "removals",
                "lock_takeovers", "full_errors", "orphaned_fds")
        s: dict[str, int | float] = {k: raw[k] for k in keep}
        s["load_factor"] = s["entries"] / s["capacity"]
        return s

    def check(self) -> None:
        """Verify the invariants; raises TableCorrupt."""
        msg = ffi.new("char[256]")
        if lib.ht_check(self._b, msg, 256) != 0:
            raise TableCorrupt(f"{self.name}: {ffi.string(msg).decode()}")
