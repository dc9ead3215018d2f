"""The table of open files (FUSE ``fh`` values) shared by all queue workers.

A file opened on one queue's worker can be read on another's: the fd lives in the shared fd
table (CLONE_FILES) and its number lives here.  ``fh`` = generation << 32 | slot, so a stale
or forged fh never reaches a reused slot.  The guest's open is one flag (RELEASE clears it
once); a request in flight pins the fh in its thread's row of the pin board, so a RELEASE
racing a READ never closes the fd under the reader, and a worker that dies gives back
exactly its pins.  See docs/shm_table.md.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shm_table._native import ffi, lib
from shm_table.table import (
    _KIND_HANDLE,
    HandleNotFound,
    HandleTableFull,
    NotPinned,
    PinsExhausted,
    ShmTableError,
    TableCorrupt,
    _Segment,
)

DEFAULT_HANDLE_CAPACITY = 1 << 16

_ht_pin = lib.ht_pin
_ht_unpin = lib.ht_unpin

class HandleBroken(OSError):
    """The open file is open but unusable (:meth:`HandleTable.set_broken`): EIO."""


__all__ = ["HandleBroken",
    "DEFAULT_HANDLE_CAPACITY", "HandleEntry", "HandleNotFound", "HandleTable", "HandleTableFull",
]


@dataclass(frozen=True, slots=True)
class HandleEntry:
    """A consistent snapshot of one open file."""

    fh: int
    slot: int
    nodeid: int
    fd: int
    flags: int
    guest_open: bool
    broken: bool = False  # a migration could not carry its flock() over: EIO


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

    def restore(self, fh: int, nodeid: int, fd: int, flags: int, broken: bool = False) -> None:
        """Live migration's destination: the open file the source had under ``fh``; the
        table owns ``fd`` from now on. Rising slot order, into an empty table. ``broken``:
        it could not be opened again (``fd`` -1): requests on it answer EIO."""
        flags &= ~lib.HT_BROKEN
        r = lib.ht_restore(self._b, fh, nodeid, fd, flags | (lib.HT_BROKEN if broken else 0))
        if r == -2:
            raise ShmTableError(f"{self.name}: cannot restore fh {fh}: its slot is taken, "
                                "out of order or beyond the capacity")
        if r != 0:
            raise ValueError(f"fh {fh} cannot be an fh")

    def pin(self, fh: int) -> tuple[int, int] | None:
        """Pin an open file for this thread while it serves a request: (slot, fd), or None
        for an fh the guest does not hold.  Raises PinsExhausted (a leak)."""
        try:
            r = _ht_pin(self._b, fh)
        except OverflowError:
            return None
        if r >= 0:
            return r & 0xFFFFFFFF, (r >> 32) - 1
        if r == -4:
            raise PinsExhausted(f"{self.name}: this thread pins too many open files")
        if r == -5:
            raise HandleBroken(errno.EIO, f"open file {fh:#x} lost its lock in a migration")
        return None

    def set_broken(self, fh: int) -> bool:
        """From now on every request on ``fh`` but RELEASE answers EIO (a migration could
        not carry its lock over). False when ``fh`` is not open."""
        return lib.ht_set_broken(self._b, fh) == 0

    def unpin(self, fh: int) -> None:
        """Drop this thread's pin; the fd is closed here if the guest released the file
        meanwhile.  Raises NotPinned (changing nothing) for an fh not pinned."""
        try:
            r = _ht_unpin(self._b, fh)
        except OverflowError:  # not a 64-bit value: no pin can name it
            r = -1
        if r != 0:
            raise NotPinned(f"{self.name}: fh {fh:#x} is not pinned by this thread")

    def pin_or_raise(self, fh: int) -> tuple[int, int]:
        """pin() for callers that map a bad fh to EBADF via an exception."""
        r = self.pin(fh)
        if r is None:
            raise HandleNotFound(f"file handle {fh:#x} is not open")
        return r

    def c_api(self) -> dict[str, int]:
        """The segment address and the C functions another extension's C code calls to pin,
        unpin, open and close files without a Python round trip."""
        names = ("ht_pin", "ht_unpin", "ht_open", "ht_close")
        api = {n: int(ffi.cast("uintptr_t", ffi.addressof(lib, n))) for n in names}
        api["base"] = int(ffi.cast("uintptr_t", self._b))
        return api

    def fd_of(self, slot: int) -> int:
        """fd of a slot the caller pins."""
        return lib.ht_fd(self._b, slot)

    def close(self, fh: int) -> bool:  # type: ignore[override]
        """The guest's RELEASE: drop its reference (once per fh); the fd is closed now, or by
        the last request still using it.  True when this call dropped it."""
        try:
            r = lib.ht_close(self._b, fh)
        except OverflowError:
            return False
        if r == -4:
            raise PinsExhausted(f"{self.name}: this thread pins too many open files")
        return r == 1

    def get(self, fh: int) -> HandleEntry | None:
        """Snapshot of the open file `fh` names, or None."""
        slot = fh & 0xFFFFFFFF
        e = self._snapshot(slot, ffi.new("ht_entry_t *"))
        return e if e is not None and e.fh == fh else None

    def _snapshot(self, slot: int, out: Any, released: bool = False) -> HandleEntry | None:
        state = lib.ht_snapshot(self._b, slot, out)
        if state == 0 or (state == 2 and not released):
            return None
        return HandleEntry(fh=out.fh, slot=slot, nodeid=out.nodeid, fd=out.fd,
                           flags=out.flags & ~lib.HT_BROKEN, guest_open=bool(out.guest_open),
                           broken=bool(out.flags & lib.HT_BROKEN))

    def iter_handles(self, released: bool = False) -> Iterator[HandleEntry]:
        """Snapshots of the open files (with `released`, also those the guest released that
        a request in flight still pins); same guarantees as InodeTable.iter_entries."""
        out = ffi.new("ht_entry_t *")
        for slot in range(lib.ht_hwm(self._b)):
            e = self._snapshot(slot, out, released)
            if e is not None:
                yield e

    def __len__(self) -> int:
        return self._raw_stats()["entries"]

    def stats(self) -> dict[str, int | float]:
        """Header counters: entries, capacity, load_factor, opens (inserts), frees (removals)."""
        raw = self._raw_stats()
        keep = ("capacity", "entries", "high_water_mark", "inserts", "removals",
                "lock_takeovers", "full_errors", "orphaned_fds", "dying", "deferred",
                "reaped_pins", "pins_refused")
        s: dict[str, int | float] = {k: raw[k] for k in keep}
        s["load_factor"] = s["entries"] / s["capacity"]
        return s

    def check(self) -> None:
        """Verify the invariants; raises TableCorrupt."""
        msg = ffi.new("char[256]")
        if lib.ht_check(self._b, msg, 256) != 0:
            raise TableCorrupt(f"{self.name}: {ffi.string(msg).decode()}")
