"""The inode store shared by the supervisor and every queue worker.

One POSIX shared memory segment holds a header, fixed 512-byte slots and two
open-addressing indexes (by (ino, dev, mnt_id), by file handle); a nodeid names its slot
(generation << 32 | slot), so finding one needs no index.  All
read-modify-write on the segment is C (``shm_table._native``); this module only wraps it.
See docs/shm_table.md for the layout, the lock and the lock-free reader protocol.
"""

from __future__ import annotations

import logging
import mmap
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import posix_ipc

from shm_table._native import ffi, lib

log = logging.getLogger("pyvirtiofsd.shm_table")

# bound once: the hot-path wrappers below avoid attribute lookups on `lib`
_it_pin = lib.it_pin
_it_unpin = lib.it_unpin
_it_forget = lib.it_forget
_it_claim_or_insert = lib.it_claim_or_insert
_NULL = ffi.NULL

FUSE_ROOT_ID = 1
MAX_HANDLE_SZ = 128
NAME_MAX = 255
DEFAULT_INODE_CAPACITY = 1 << 20
_HDR_SIZE = 4096
_KIND_INODE = 1
_KIND_HANDLE = 2
_U64 = (1 << 64) - 1

_STAT_KEYS = (
    "capacity", "entries", "high_water_mark", "index_size", "tombstones_nodeid",
    "tombstones_ids", "tombstones_handle", "lookups", "inserts", "removals",
    "acquire_misses", "rebuilds", "lock_takeovers", "full_errors", "orphaned_fds",
    "next_nodeid", "with_handle", "index_generation", "retired", "dying", "deferred",
    "reaped_pins", "pins_refused", "pin_rows",
)


class ShmTableError(Exception):
    """Base class of the shared-table errors."""


class InodeTableFull(ShmTableError):
    """No free slot in the inode table (reply ENFILE to the guest)."""


class InodeNotFound(ShmTableError, LookupError):
    """Unknown or already forgotten nodeid."""


class HandleTableFull(ShmTableError):
    """No free slot in the open-file table (reply EMFILE to the guest)."""


class HandleNotFound(ShmTableError, LookupError):
    """Unknown, closed or forged file handle (fh)."""


class PinsExhausted(ShmTableError):
    """This thread already pins as many entries as its row holds (a leak: a bug)."""


class NotPinned(ShmTableError):
    """An unpin of something this thread does not pin (a bug: nothing was changed)."""


class SegmentInUse(ShmTableError):
    """A segment with this name belongs to a live process: refusing to replace it."""


class SegmentLayoutError(ShmTableError):
    """The segment is not a table of this kind and layout version."""


class TableCorrupt(ShmTableError):
    """The consistency check found a broken invariant (a bug: please report)."""


class InodeIds(NamedTuple):
    """What identifies an inode on the host (the key of the by-ids index)."""

    ino: int
    dev: int
    mnt_id: int


@dataclass(frozen=True, slots=True)
class InodeEntry:
    """A consistent snapshot of one entry (for tests, stats and migration).  ``lookups`` is
    the guest's count; an entry with 0 is one the guest forgot that a request in flight
    still pins."""

    slot: int
    nodeid: int
    lookups: int
    ids: InodeIds
    fd: int
    mode: int
    handle: bytes | None
    handle_type: int
    handle_mnt_id: int
    parent: int
    name: bytes


def _shm_name(name: str) -> str:
    return name if name.startswith("/") else "/" + name


_S = TypeVar("_S", bound="_Segment")


class _Segment:
    """Owns the mapping of one table segment; subclasses add the table operations."""

    _KIND = 0
    _KIND_NAME = ""

    def __init__(self, name: str, mm: mmap.mmap) -> None:
        self.name = name
        self._mm: mmap.mmap | None = mm
        self._b: Any = ffi.from_buffer(mm, require_writable=True)

    # -- lifecycle -------------------------------------------------------------------------
    @staticmethod
    def _segment_size(capacity: int) -> int:
        raise NotImplementedError

    @staticmethod
    def _init(base: Any, capacity: int, owner: int) -> int:
        raise NotImplementedError

    @classmethod
    def create(cls: type[_S], name: str, capacity: int) -> _S:
        """Create the segment (supervisor).  A leftover segment of a dead owner, or one that is
        not ours at all, is replaced with a warning; one owned by a live process is refused."""
        if not 1 <= capacity <= 0x7FFFFFFF:
            raise ValueError(f"capacity must be in 1..2**31-1, not {capacity}")
        name = _shm_name(name)
        size = cls._segment_size(capacity)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError:
            cls._replace_stale(name)
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        try:
            mm = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        self = cls(name, mm)
        if cls._init(self._b, capacity, os.getpid()) != 0:
            self.detach()
            raise ValueError(f"bad capacity {capacity}")
        return self

    @classmethod
    def _replace_stale(cls, name: str) -> None:
        shm = posix_ipc.SharedMemory(name)
        try:
            size = os.fstat(shm.fd).st_size
            reason = f"size {size} is too small for a header"
            if size >= _HDR_SIZE:
                with mmap.mmap(shm.fd, _HDR_SIZE, prot=mmap.PROT_READ) as mm:
                    buf = ffi.from_buffer(mm)
                    try:
                        rc = lib.seg_check(buf, size, cls._KIND)
                        owner = lib.seg_owner_pid(buf)
                        alive = rc == 0 and lib.seg_owner_alive(buf)
                    finally:
                        ffi.release(buf)
                if alive:
                    raise SegmentInUse(
                        f"shared memory {name} is an active {cls._KIND_NAME} of live pid {owner}"
                    )
                reason = (f"its owner pid {owner} is gone (or the pid now names another "
                          f"process)" if rc == 0
                          else f"it is not a {cls._KIND_NAME} of this layout (check {rc})")
        finally:
            shm.close_fd()
        log.warning("replacing stale shared memory segment %s: %s", name, reason)
        posix_ipc.unlink_shared_memory(name)

    @classmethod
    def attach(cls: type[_S], name: str) -> _S:
        """Map an existing segment (tests, the stats command; cloned workers simply keep the
        creator's mapping)."""
        name = _shm_name(name)
        shm = posix_ipc.SharedMemory(name)
        try:
            size = os.fstat(shm.fd).st_size
            if size < _HDR_SIZE:
                raise SegmentLayoutError(f"{name}: {size} bytes is too small")
            mm = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        self = cls(name, mm)
        rc = lib.seg_check(self._b, size, cls._KIND)
        if rc != 0:
            self.detach()
            what = {-1: "bad magic", -2: "layout version", -3: "table kind", -4: "size"}
            raise SegmentLayoutError(f"{name}: not a {cls._KIND_NAME} ({what.get(rc, rc)})")
        return self

    def detach(self) -> None:
        """Unmap (the segment itself stays until unlink())."""
        if self._mm is not None:
            ffi.release(self._b)
            self._b = None
            self._mm.close()
            self._mm = None

    def unlink(self) -> None:
        """Remove the segment's name; mappings stay valid until detached."""
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- maintenance -----------------------------------------------------------------------
    def take_orphaned_fds(self) -> list[int]:
        """fds whose owner process died inside a table operation; the caller (supervisor, which
        shares the fd table with the workers) should close them."""
        out = ffi.new("int32_t[64]")
        n = lib.seg_take_orphans(self._b, out, 64)
        return [out[i] for i in range(n)]

    def reap_dead_pins(self) -> int:
        """Give back the pins of threads that died (a killed worker's requests in flight),
        freeing what only they held, and what a thread killed between its last unpin of an
        entry the guest had let go and the free left behind.  The supervisor calls it when a
        worker dies, before reaping it, so its TIDs cannot name another task yet.  Returns
        the pin-board rows freed."""
        return int(lib.seg_reap_pins(self._b))

    def my_pins(self) -> int:
        """Entries the calling thread pins (tests: a request must leave none behind)."""
        return int(lib.seg_my_pins(self._b))

    def pins_held(self) -> int:
        """Entries pinned by all threads together (stats)."""
        return int(lib.seg_pins_held(self._b))

    @property
    def lock_owner(self) -> int:
        """TID holding the writer lock, 0 if free (diagnostics)."""
        return int(lib.seg_lock_word(self._b))

    def _raw_stats(self) -> dict[str, int]:
        out = ffi.new("uint64_t[32]")
        n = lib.seg_stats(self._b, out, 32)
        return {k: int(out[i]) for i, k in enumerate(_STAT_KEYS[:n])}


class StrongRef:
    """A pin on an inode: the entry and its fd stay while it is held, whatever the guest
    forgets meanwhile.  Use as a context manager, or call release() (idempotent)."""

    __slots__ = ("_table", "slot", "nodeid", "fd")

    def __init__(self, table: InodeTable, slot: int, nodeid: int, fd: int) -> None:
        self._table: InodeTable | None = table
        self.slot = slot
        self.nodeid = nodeid
        self.fd = fd

    @property
    def held(self) -> bool:
        return self._table is not None

    def release(self) -> None:
        """Drop the pin (the entry is freed here if the guest forgot it meanwhile)."""
        t = self._table
        if t is not None:
            self._table = None
            t.unpin(self.nodeid)

    def __enter__(self) -> StrongRef:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"<StrongRef nodeid={self.nodeid} slot={self.slot} fd={self.fd} {state}>"


class InodeTable(_Segment):
    """Shared inode store: nodeid -> (ids, O_PATH fd, file handle, the guest's lookups)."""

    _KIND = _KIND_INODE
    _KIND_NAME = "pyvirtiofsd inode table"

    @staticmethod
    def _segment_size(capacity: int) -> int:
        return int(lib.it_segment_size(capacity))

    @staticmethod
    def _init(base: Any, capacity: int, owner: int) -> int:
        return int(lib.it_init(base, capacity, owner))

    @classmethod
    def create(cls, name: str, capacity: int = DEFAULT_INODE_CAPACITY) -> InodeTable:
        """Create the table (supervisor).  See _Segment.create for stale-segment handling."""
        return super().create(name, capacity)

    def close(self) -> None:
        """Unmap this process's view (alias of detach())."""
        self.detach()

    # -- writer operations (take the lock; in C) -------------------------------------------
    def insert_root(self, ids: tuple[int, int, int], fd: int, mode: int,
                    handle: bytes | None = None, handle_type: int = 0,
                    handle_mnt_id: int | None = None) -> int:
        """Insert FUSE_ROOT_ID (1 lookup; FORGET never takes it below 1).  Returns its slot."""
        hb, hn, hmnt = self._handle_args(ids, handle, handle_mnt_id)
        r = lib.it_insert_root(self._b, ids[0], ids[1], ids[2], hb, hn, handle_type, hmnt,
                               fd, mode)
        if r == -1:
            raise InodeTableFull(f"{self.name}: inode table full")
        if r == -2:
            raise ShmTableError(f"{self.name}: root inode already present")
        return int(r)

    def claim_or_insert(self, ids: tuple[int, int, int], handle: bytes | None,
                        handle_type: int, fd: int, mode: int, parent: int = 0,
                        name: bytes | str = b"",
                        handle_mnt_id: int | None = None) -> tuple[int, bool]:
        """One guest lookup on the inode found by handle, else by ids (only entries holding
        an fd count); or a new entry with one lookup that owns `fd`.

        Returns (nodeid, inserted).  When not inserted the caller still owns (and should
        close) its `fd`.  Raises InodeTableFull when a new entry is needed but there is no
        room.
        """
        # inlined _handle_args/fsencode: this runs for every LOOKUP Python answers
        if handle is None:
            hb, hn, hmnt = _NULL, 0, 0
        else:
            hn = len(handle)
            if hn > MAX_HANDLE_SZ:
                raise ValueError(f"file handle longer than MAX_HANDLE_SZ ({MAX_HANDLE_SZ})")
            hb = handle if type(handle) is bytes else bytes(handle)
            hmnt = ids[2] if handle_mnt_id is None else handle_mnt_id
        nb = name if type(name) is bytes else os.fsencode(name)
        if len(nb) > NAME_MAX:
            raise ValueError(f"name longer than {NAME_MAX} bytes")
        ino, dev, mnt = ids
        out = ffi.new("uint64_t *")
        r = _it_claim_or_insert(self._b, ino, dev, mnt, hb, hn, handle_type, hmnt, fd, mode,
                                parent, nb, len(nb), out)
        if r < 0:
            raise InodeTableFull(
                f"{self.name}: inode table full ({lib.it_hwm(self._b)} slots in use)")
        return int(out[0]), r == 1

    @staticmethod
    def _handle_args(ids: tuple[int, int, int], handle: bytes | None,
                     handle_mnt_id: int | None) -> tuple[Any, int, int]:
        if handle is None:
            return ffi.NULL, 0, 0
        if len(handle) > MAX_HANDLE_SZ:
            raise ValueError(f"file handle longer than MAX_HANDLE_SZ ({MAX_HANDLE_SZ})")
        if type(handle) is not bytes:
            handle = bytes(handle)
        return handle, len(handle), ids[2] if handle_mnt_id is None else handle_mnt_id

    def set_migration_info(self, nodeid: int, parent: int, name: bytes | str) -> None:
        """Record (parent nodeid, name) of a live nodeid, for migration."""
        nb = os.fsencode(name)
        if len(nb) > NAME_MAX:
            raise ValueError(f"name longer than {NAME_MAX} bytes")
        if not 0 <= nodeid <= _U64 or lib.it_set_info(self._b, nodeid, parent, nb, len(nb)):
            raise InodeNotFound(f"inode {nodeid} is not live")

    def restore(self, entry: InodeEntry) -> None:
        """Live migration's destination: re-create ``entry`` (from the source's table)
        under its nodeid, with its lookups, owning ``entry.fd``. Entries must come in
        rising slot order into a table holding only the root, before any worker runs."""
        hb, hn, hmnt = self._handle_args(entry.ids, entry.handle, entry.handle_mnt_id)
        name = entry.name
        if len(name) > NAME_MAX:
            raise ValueError(f"name longer than {NAME_MAX} bytes")
        r = lib.it_restore(self._b, entry.nodeid, entry.lookups, entry.ids[0], entry.ids[1],
                           entry.ids[2], hb, hn, entry.handle_type, hmnt, entry.fd,
                           entry.mode, entry.parent, name, len(name))
        if r == -2:
            raise ShmTableError(f"{self.name}: cannot restore inode {entry.nodeid}: its slot "
                                "is taken, out of order or beyond the capacity")
        if r != 0:
            raise ValueError(f"inode {entry.nodeid}: bad entry to restore")

    def export(self, with_handles: bool) -> dict[str, Any]:
        """Live migration's source: the live entries but the root, in rising slot order,
        as columns: ``count``; ``nodeid``, ``lookups``, ``parent`` (array 'Q'), ``mode``
        ('I'), ``fd`` ('i'), ``name_len`` ('H'), ``names`` (bytes, concatenated); with
        ``with_handles`` also ``handle_len`` ('H', 0: none), ``handle_type`` ('i') and
        ``handles`` (bytes). One C call, however many entries."""
        while True:
            cap = max(lib.it_hwm(self._b), 1)
            cols = {k: ffi.new(f"{t}[]", cap) for k, t in (
                ("nodeid", "uint64_t"), ("lookups", "uint64_t"), ("parent", "uint64_t"),
                ("mode", "uint32_t"), ("fd", "int32_t"), ("name_len", "uint16_t"),
                ("handle_len", "uint16_t"), ("handle_type", "int32_t"))}
            names = ffi.new("uint8_t[]", cap * NAME_MAX)
            handles = ffi.new("uint8_t[]", cap * MAX_HANDLE_SZ) if with_handles else ffi.NULL
            n = lib.it_export(self._b, cap, cols["nodeid"], cols["lookups"], cols["parent"],
                              cols["mode"], cols["fd"], cols["name_len"], names,
                              cap * NAME_MAX, cols["handle_len"], cols["handle_type"],
                              handles, cap * MAX_HANDLE_SZ if with_handles else 0)
            if n >= 0:
                break  # else the table grew meanwhile: again, larger
        out: dict[str, Any] = {"count": n}
        for key, code in (("nodeid", "Q"), ("lookups", "Q"), ("parent", "Q"), ("mode", "I"),
                          ("fd", "i"), ("name_len", "H"), ("handle_len", "H"),
                          ("handle_type", "i")):
            col = array(code)
            col.frombytes(ffi.buffer(cols[key], n * col.itemsize))
            out[key] = col
        out["names"] = bytes(ffi.buffer(names, sum(out["name_len"])))
        if with_handles:
            out["handles"] = bytes(ffi.buffer(handles, sum(out["handle_len"])))
        else:
            del out["handle_len"], out["handle_type"]
        return out

    def restore_many(self, cols: dict[str, Any]) -> list[int]:
        """Live migration's destination: :meth:`restore` for columns as :meth:`export` makes
        them plus ``ino``, ``dev``, ``mnt_id`` ('Q') and the ``fd`` ('i') each entry keeps
        (-1: by file handle). Returns the indexes that failed (slot taken, bad entry)."""
        n = cols["count"]
        status = ffi.new("int32_t[]", max(n, 1))

        def c(key: str, ctype: str) -> Any:
            return ffi.from_buffer(f"{ctype}[]", cols[key]) if n else ffi.NULL

        done = lib.it_restore_many(
            self._b, n, c("nodeid", "uint64_t"), c("lookups", "uint64_t"),
            c("ino", "uint64_t"), c("dev", "uint64_t"), c("mnt_id", "uint64_t"),
            ffi.from_buffer("uint8_t[]", cols["handles"] or b"\0"),
            c("handle_len", "uint16_t"), c("handle_type", "int32_t"), c("fd", "int32_t"),
            c("mode", "uint32_t"), c("parent", "uint64_t"),
            ffi.from_buffer("uint8_t[]", cols["names"] or b"\0"), c("name_len", "uint16_t"),
            status)
        return [] if done == n else [i for i in range(n) if status[i] != 0]

    # -- hot path (lock-free, except freeing an entry) -------------------------------------
    def pin(self, nodeid: int) -> tuple[int, int] | None:
        """Pin `nodeid` for this thread while it serves a request: (slot, O_PATH fd, -1 for
        an entry kept by file handle only), or None when the guest does not hold it.
        Raises PinsExhausted when this thread pins too much already (a leak)."""
        try:
            r = _it_pin(self._b, nodeid)
        except OverflowError:
            return None
        if r >= 0:
            return r & 0xFFFFFFFF, (r >> 32) - 1
        if r == -4:
            raise PinsExhausted(f"{self.name}: this thread pins too many inodes")
        return None

    def unpin(self, nodeid: int) -> None:
        """Drop this thread's pin on `nodeid`; the entry and its fd go here if the guest
        forgot it meanwhile.  Raises NotPinned (changing nothing) for a nodeid not pinned."""
        try:
            r = _it_unpin(self._b, nodeid)
        except OverflowError:  # not a 64-bit value: no pin can name it
            r = -1
        if r != 0:
            raise NotPinned(f"{self.name}: inode {nodeid} is not pinned by this thread")

    def c_api(self) -> dict[str, int]:
        """The segment address and the addresses of the C functions another extension's C
        code calls to resolve, claim and forget inodes without a Python round trip (the
        worker's GETATTR/LOOKUP/FORGET fast path)."""
        names = ("it_pin", "it_unpin", "it_claim_or_insert", "it_forget", "it_lookup",
                 "it_handle_of", "it_claim", "seg_removals")
        api = {n: int(ffi.cast("uintptr_t", ffi.addressof(lib, n))) for n in names}
        api["base"] = int(ffi.cast("uintptr_t", self._b))
        return api

    def fd_of(self, slot: int) -> int:
        """The O_PATH fd of a slot the caller pins (-1 if it has none)."""
        return lib.it_fd(self._b, slot)

    def handle_of(self, slot: int) -> tuple[bytes, int] | None:
        """(file handle, handle type) of a slot the caller pins, or None without one."""
        out = ffi.new("uint8_t[]", MAX_HANDLE_SZ)
        htype = ffi.new("int32_t *")
        n = lib.it_handle_of(self._b, slot, out, htype)
        return None if n < 0 else (bytes(ffi.buffer(out, n)), int(htype[0]))

    def forget(self, nodeid: int, n: int) -> bool:
        """FUSE FORGET: drop up to n of the guest's lookups of `nodeid` (an unknown nodeid is
        a no-op; pins of requests in flight are untouched).  True when the last one went."""
        try:
            r = _it_forget(self._b, nodeid, min(n, _U64))
        except OverflowError:
            return False
        if r == -4:
            raise PinsExhausted(f"{self.name}: this thread pins too many inodes")
        return r == 1

    def strong_ref(self, nodeid: int) -> StrongRef:
        """pin() as a StrongRef; raises InodeNotFound."""
        r = self.pin(nodeid)
        if r is None:
            raise InodeNotFound(f"inode {nodeid} not found (never existed or forgotten)")
        return StrongRef(self, r[0], nodeid, r[1])

    # -- inspection ------------------------------------------------------------------------
    def _snapshot(self, slot: int, out: Any, dying: bool = False) -> InodeEntry | None:
        state = lib.it_snapshot(self._b, slot, out)
        if state == 0 or (state == 2 and not dying):
            return None
        return InodeEntry(
            slot=slot,
            nodeid=out.nodeid,
            lookups=out.lookups,
            ids=InodeIds(out.ino, out.dev, out.mnt_id),
            fd=out.fd,
            mode=out.mode,
            handle=bytes(ffi.buffer(out.handle, out.handle_bytes)) if out.has_handle else None,
            handle_type=out.handle_type,
            handle_mnt_id=out.handle_mnt_id,
            parent=out.parent,
            name=bytes(ffi.buffer(out.name, out.name_len)),
        )

    def get(self, nodeid: int) -> InodeEntry | None:
        """Snapshot of the live entry `nodeid` (takes nothing), or None."""
        try:
            slot = lib.it_lookup(self._b, nodeid)
        except OverflowError:
            return None
        if slot < 0:
            return None
        e = self._snapshot(slot, ffi.new("it_entry_t *"))
        return e if e is not None and e.nodeid == nodeid else None

    def lookups(self, nodeid: int) -> int:
        """The guest's lookup count of `nodeid` (0 if it does not hold it)."""
        e = self.get(nodeid)
        return 0 if e is None else e.lookups

    def iter_entries(self, dying: bool = False) -> Iterator[InodeEntry]:
        """Snapshots of the live entries (with `dying`, also those the guest forgot that a
        request in flight still pins), by slot.  Safe while others insert and remove: may
        miss entries added meanwhile, never yields a torn one, always ends."""
        out = ffi.new("it_entry_t *")
        for slot in range(lib.it_hwm(self._b)):
            e = self._snapshot(slot, out, dying)
            if e is not None:
                yield e

    def __len__(self) -> int:
        return self._raw_stats()["entries"]

    def stats(self) -> dict[str, int | float]:
        """Counters from the header (updated atomically by every process)."""
        s: dict[str, int | float] = dict(self._raw_stats())
        s["load_factor"] = s["entries"] / s["capacity"]
        s["tombstones"] = (s["tombstones_nodeid"] + s["tombstones_ids"]
                           + s["tombstones_handle"])
        return s

    def check(self) -> None:
        """Verify every invariant (slots, free list, all indexes); raises TableCorrupt."""
        msg = ffi.new("char[256]")
        if lib.it_check(self._b, msg, 256) != 0:
            raise TableCorrupt(f"{self.name}: {ffi.string(msg).decode()}")
