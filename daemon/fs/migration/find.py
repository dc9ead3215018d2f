"""Live migration's destination: the source's inodes found below the share and re-created
under their nodeids, its open files re-opened under their fhs, its locks taken.

The guest is stopped meanwhile, so the common case costs no Python per inode: one C call
(``pyvfs_migrate_find``, daemon/native/migrate.c) opens every inode by its file handle
(file-handles mode) or its path (an openat relative to its parent's fd when the path is
the parent's and one more name), stats it and takes its file handle; one C call
(``InodeTable.restore_many``) re-creates the table; one closes the fds the table does not
keep. Python handles the exceptions one by one: inodes the C pass did not find (tried
again by handle and path, then by parent and name when they have no path below the
share), or not at all.

An inode not found, of another type than on the source, found twice, or whose file
handle differs (``--migration-verify-handles``): ``--migration-on-error abort`` fails the
load; ``guest-error`` keeps it lost, as virtiofsd keeps an invalid inode: its nodeid stays
taken (FORGET works, never reused for another file), without fd or file handle, so the
guest gets EIO for it and for its open files.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from array import array
from itertools import accumulate
from typing import Any

from daemon.fs.fd_cache import open_by_handle
from daemon.fs.migration import locks as lock_state
from daemon.fs.migration.state import (
    NO_PATH,
    MigrationError,
    MigrationOptions,
    read_columns,
    unpack,
    walk,
)
from daemon.fs.ops.base import O_PATH_FLAGS
from daemon.fs.ops.session import SESSION_FLAGS
from daemon.fs.passthrough import PassthroughFs
from daemon.fs.proc_fd import proc_open
from daemon.native._sys import ffi, lib
from daemon.protocol import fuse

log = logging.getLogger("pyvirtiofsd.migration")

LOST_DEV = (1 << 64) - 1  # no device has this number: a lost inode's ids match no file


class Found:
    """What the destination found for each of the state's inodes (columns, by index)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.fd = ffi.new("int32_t[]", max(n, 1))
        self.ino = ffi.new("uint64_t[]", max(n, 1))
        self.dev = ffi.new("uint64_t[]", max(n, 1))
        self.mode = ffi.new("uint32_t[]", max(n, 1))
        self.mnt = ffi.new("uint64_t[]", max(n, 1))
        self.handles = ffi.new("uint8_t[]", max(n, 1) * lib.PYVFS_MIGRATE_HANDLE_MAX)
        self.handle_len = ffi.new("uint16_t[]", max(n, 1))
        self.handle_type = ffi.new("int32_t[]", max(n, 1))
        self.err = ffi.new("int32_t[]", max(n, 1))
        self.extra_handles: dict[int, bytes] = {}  # found in Python: index -> handle
        self.owned: set[int] = set()  # indexes whose fd the inode table keeps
        self.c_lens: list[int] = []

    def by_paths(self, fs: PassthroughFs, cols: dict[str, Any], by_handle: bool) -> None:
        """The C pass over every inode: by its file handle first with ``by_handle``
        (file-handles mode), by its path."""
        root = os.open(fs.shared_dir, O_PATH_FLAGS | os.O_DIRECTORY)
        try:
            r = lib.pyvfs_migrate_find(
                root, self.n, ffi.from_buffer("uint64_t[]", cols["nodeid"]),
                ffi.from_buffer("uint64_t[]", cols["parent"]),
                ffi.from_buffer("uint8_t[]", cols["paths"] or b"\0"),
                ffi.from_buffer("uint32_t[]", cols["path_len"]), int(fs.use_handles),
                fs.mount_fd if by_handle else -1,
                ffi.from_buffer("uint8_t[]", cols["handles"] or b"\0"),
                ffi.from_buffer("uint16_t[]", cols["handle_len"]),
                ffi.from_buffer("int32_t[]", cols["handle_type"]), self.fd,
                self.ino, self.dev, self.mode, self.mnt, self.handles, self.handle_len,
                self.handle_type, self.err)
        finally:
            os.close(root)
        if r != 0:
            raise MigrationError(f"finding the inodes: {os.strerror(lib.pyvfs_errno())}")

    def set(self, fs: PassthroughFs, i: int, fd: int) -> None:
        """Inode ``i`` found by Python as ``fd`` (which this now holds)."""
        st = os.fstat(fd)
        self.fd[i], self.ino[i], self.dev[i], self.mode[i] = fd, st.st_ino, st.st_dev, \
            st.st_mode
        handle, htype, mnt = fs._file_handle(fd)
        self.mnt[i], self.handle_type[i] = mnt, htype
        self.handle_len[i] = len(handle) if handle else 0
        if handle:
            self.extra_handles[i] = handle
        self.err[i] = 0

    def lose(self, i: int) -> None:
        if self.fd[i] >= 0:
            os.close(self.fd[i])
        self.fd[i] = -1

    def handle(self, i: int) -> bytes | None:
        if not self.handle_len[i]:
            return None
        if i in self.extra_handles:
            return self.extra_handles[i]
        at = self._handle_at[i]
        return bytes(ffi.buffer(self.handles + at, self.handle_len[i]))

    def index_handles(self) -> None:
        """Where each handle the C pass found starts (Python's are kept aside)."""
        lens = ffi.unpack(self.handle_len, self.n)
        for i in self.extra_handles:
            lens[i] = 0
        self._handle_at = [0, *accumulate(lens)]
        self.c_lens = lens


def load_state(fs: PassthroughFs, blob: bytes,
               options: MigrationOptions) -> dict[int, list[list[int]]]:
    """Re-create the source's nodeids and fhs in ``fs``'s tables (which hold only the root:
    a fresh daemon, before any worker). MigrationError when the state is unusable, or
    (``--migration-on-error abort``) when an inode cannot be found. Returns the SETLKWs
    each queue's worker is to wait with again."""
    state = unpack(blob)
    parked = _parked(state.get("parked"))
    if len(fs.inodes) != 1 or len(fs.handles):
        raise MigrationError("the destination has served requests already")
    cols = read_columns(state["inodes"])
    n = cols["count"]
    nodeids: list[int] = cols["nodeid"].tolist()
    index = {nodeid: i for i, nodeid in enumerate(nodeids)}
    capacity = fs.inodes.stats()["capacity"]
    if len(index) != n or any((x >> 32) == 0 or (x & 0xFFFFFFFF) >= capacity
                              for x in nodeids):
        raise MigrationError("device state: bad or repeated nodeids, or more slots than "
                             "this daemon's inode table has")
    SESSION_FLAGS.pack_into(fs.session, 0, int(state["session"]))
    found = Found(n)
    try:
        failed = _find_all(fs, state, cols, found, index, options)
        if failed and options.on_error == "abort":
            raise MigrationError("; ".join(failed[:5]) + (
                f" and {len(failed) - 5} more" if len(failed) > 5 else ""))
        for line in failed:
            log.error("migration: %s; the guest gets EIO for it", line)
        _restore_table(fs, cols, found)
        inode_fds = {nodeid: fd for nodeid, fd in zip(nodeids, ffi.unpack(found.fd, n),
                                                      strict=True) if fd >= 0}
        inode_fds[fuse.ROOT_ID] = os.open(fs.shared_dir, O_PATH_FLAGS | os.O_DIRECTORY)
        try:
            _reopen_handles(fs, state["handles"], inode_fds, options)
            try:
                lost = lock_state.restore(fs, lock_state.HeldLocks.from_state(
                    state.get("locks")), inode_fds, options.on_error == "abort")
            except OSError as e:
                raise MigrationError(str(e)) from e
        finally:
            os.close(inode_fds[fuse.ROOT_ID])
        for line in lost:
            log.error("migration: %s; the guest gets EIO for it", line)
    finally:
        owned = found.owned
        to_close = array("i", [-1 if i in owned else fd
                               for i, fd in enumerate(ffi.unpack(found.fd, n))])
        lib.pyvfs_close_fds(ffi.from_buffer("int32_t[]", to_close), n)
    return parked


def _parked(parked: Any) -> dict[int, list[list[int]]]:
    """The state's waiting SETLKWs, checked (each worker checks its heads)."""
    if parked is None:
        return {}
    try:
        out = {int(q): [[int(x) for x in entry] for entry in entries]
               for q, entries in parked.items()}
    except (AttributeError, TypeError, ValueError) as e:
        raise MigrationError(f"device state: bad waiting SETLKWs ({e})") from e
    if any(len(entry) != 10 for entries in out.values() for entry in entries):
        raise MigrationError("device state: bad waiting SETLKWs")
    return out


def _find_all(fs: PassthroughFs, state: dict[str, Any], cols: dict[str, Any], found: Found,
              index: dict[int, int], options: MigrationOptions) -> list[str]:
    """Find every inode; the lost ones get fd -1. Returns what was lost and why."""
    n = cols["count"]
    file_handles = state["mode"] == "file-handles"
    found.by_paths(fs, cols, file_handles)
    handle_at = [0, *accumulate(cols["handle_len"])]
    name_at = [0, *accumulate(cols["name_len"])]
    failed: list[str] = []
    for i in [i for i, fd in enumerate(ffi.unpack(found.fd, n)) if fd < 0]:
        by_handle = file_handles and bool(cols["handle_len"][i])
        why = _find_one(fs, cols, found, index, i, by_handle, handle_at, name_at)
        if why:
            failed.append(f"inode {cols['nodeid'][i]}: {why}")
    found.index_handles()
    failed += _check(cols, found, options, handle_at)
    return failed


def _find_one(fs: PassthroughFs, cols: dict[str, Any], found: Found, index: dict[int, int],
              i: int, by_handle: bool, handle_at: list[int], name_at: list[int]) -> str:
    """Inode ``i`` the C pass did not find: by its handle, or its parent and name. The
    reason it is lost, or ''."""
    nodeid = cols["nodeid"][i]
    if by_handle:
        handle = cols["handles"][handle_at[i]:handle_at[i + 1]]
        try:
            found.set(fs, i, open_by_handle(fs.mount_fd, handle, cols["handle_type"][i]))
            return ""
        except OSError as e:
            if cols["path_len"][i] == NO_PATH:
                return f"file handle: {e.strerror or e}"
            path_at = sum(x for x in cols["path_len"][:i] if x != NO_PATH)
            path = cols["paths"][path_at:path_at + cols["path_len"][i]]
            log.info("migration: inode %d: file handle failed (%s); trying its path %r",
                     nodeid, e.strerror, path)
            try:
                found.set(fs, i, walk(fs, path))
                return ""
            except OSError as e2:
                return f"{path!r}: {e2.strerror or e2}"
    if cols["path_len"][i] != NO_PATH:
        return f"path: {os.strerror(found.err[i])}"
    if nodeid in cols["unlinked"]:
        # as virtiofsd: an inode that lost its name is lost (the name it was looked up by
        # may be another file by now: writing there would destroy that file's data)
        return ("unlinked on the source, while open; only --migration-mode file-handles "
                "can carry it over")
    parent = cols["parent"][i]
    name = cols["names"][name_at[i]:name_at[i + 1]]
    if not name or b"/" in name or name in (b".", b".."):
        return f"bad name {name!r}"
    if parent == fuse.ROOT_ID:
        parent_fd = os.open(fs.shared_dir, O_PATH_FLAGS | os.O_DIRECTORY)
        close = True
    else:
        j = index.get(parent)
        if j is None or j >= i or found.fd[j] < 0:
            return "no path, and its parent was not found"
        parent_fd, close = found.fd[j], False
    try:
        found.set(fs, i, os.open(name, O_PATH_FLAGS, dir_fd=parent_fd))
        return ""
    except OSError as e:
        return f"{name!r} in inode {parent}: {e.strerror or e}"
    finally:
        if close:
            os.close(parent_fd)


def _check(cols: dict[str, Any], found: Found, options: MigrationOptions,
           handle_at: list[int]) -> list[str]:
    """What was found must be what the source had: the same type, no file twice, and
    (--migration-verify-handles) the same file handle. Returns the mismatches (lost)."""
    n = found.n
    fds = ffi.unpack(found.fd, n)
    keys = list(zip(ffi.unpack(found.ino, n), ffi.unpack(found.dev, n), strict=True))
    fmt = stat.S_IFMT
    odd = [i for i, (m, want, fd) in enumerate(zip(ffi.unpack(found.mode, n), cols["mode"],
                                                    fds, strict=True))
           if fd >= 0 and fmt(m) != fmt(want)]
    live = [k for k, fd in zip(keys, fds, strict=True) if fd >= 0]
    if len(set(live)) != len(live):  # rare: name the second finds
        seen: set[tuple[int, int]] = set()
        for i in range(n):
            if fds[i] >= 0:
                if keys[i] in seen:
                    odd.append(i)
                seen.add(keys[i])
    if options.verify_handles:
        odd += [i for i in range(n) if fds[i] >= 0 and cols["handle_len"][i] and
                found.handle_len[i] and
                found.handle(i) != cols["handles"][handle_at[i]:handle_at[i + 1]]]
    failed = []
    for i in sorted(set(odd)):
        if fmt(found.mode[i]) != fmt(cols["mode"][i]):
            why = "found a file of another type than the source had"
        elif options.verify_handles and found.handle(i) != \
                cols["handles"][handle_at[i]:handle_at[i + 1]]:
            why = "found another file than the source had (file handle differs)"
        else:
            why = "found a file another nodeid was found as"
        found.lose(i)
        failed.append(f"inode {cols['nodeid'][i]}: {why}")
    return failed


def _restore_table(fs: PassthroughFs, cols: dict[str, Any], found: Found) -> None:
    """The inode table, in one call. ``found.owned``: the indexes whose fd the table keeps
    (those without a file handle on the share's mount); lost inodes keep no fd and match
    no file."""
    n = cols["count"]
    lost_dev = LOST_DEV
    nodeids = cols["nodeid"]
    fds = ffi.unpack(found.fd, n)
    lens = [hl if fd >= 0 else 0 for hl, fd in zip(ffi.unpack(found.handle_len, n), fds,
                                                   strict=True)]
    mnts = ffi.unpack(found.mnt, n)
    root_mnt = fs.root_mnt_id
    keep = array("i", [-1 if fd < 0 or (hl and mnt == root_mnt) else fd
                       for fd, hl, mnt in zip(fds, lens, mnts, strict=True)])
    if lens == found.c_lens:  # every handle is in the C pass's buffer, in order
        handles = bytes(ffi.buffer(found.handles, sum(lens)))
    else:
        handles = b"".join(found.handle(i) or b"" for i in range(n) if lens[i])
    restore = {
        "count": n, "nodeid": nodeids, "lookups": cols["lookups"], "parent": cols["parent"],
        "names": cols["names"], "name_len": cols["name_len"], "fd": keep,
        "ino": array("Q", [x if fd >= 0 else nodeid for x, fd, nodeid in
                           zip(ffi.unpack(found.ino, n), fds, nodeids, strict=True)]),
        "dev": array("Q", [x if fd >= 0 else lost_dev for x, fd in
                           zip(ffi.unpack(found.dev, n), fds, strict=True)]),
        "mnt_id": array("Q", [x if fd >= 0 else lost_dev for x, fd in
                              zip(mnts, fds, strict=True)]),
        "mode": array("I", [x if fd >= 0 else m for x, fd, m in
                            zip(ffi.unpack(found.mode, n), fds, cols["mode"], strict=True)]),
        "handle_len": array("H", lens), "handles": handles,
        "handle_type": array("i", ffi.unpack(found.handle_type, n)),
    }
    found.owned = {i for i in range(n) if keep[i] >= 0}
    bad = fs.inodes.restore_many(restore)
    if bad:
        raise MigrationError(f"inode {nodeids[bad[0]]} cannot be restored (slot taken, out "
                             f"of order or a bad entry; {len(bad)} in all)")


def _reopen_handles(fs: PassthroughFs, handles: list[list[int]], inode_fds: dict[int, int],
                    options: MigrationOptions) -> None:
    for fh, nodeid, flags in handles:
        fd = inode_fds.get(nodeid)
        try:
            if fd is None:
                raise OSError(errno.ENOENT, f"its inode {nodeid} was not found")
            _reopen(fs, int(fh), int(nodeid), fd, int(flags))
        except OSError as e:
            if options.on_error == "abort":
                raise MigrationError(f"fh {fh:#x}: {e.strerror or e}") from e
            # as virtiofsd's invalid handle: the guest gets EIO for it, and may release it
            log.error("migration: fh %#x: %s; the guest gets EIO for it", fh, e.strerror or e)
            fs.handles.restore(int(fh), int(nodeid), -1, int(flags), broken=True)


def _reopen(fs: PassthroughFs, fh: int, nodeid: int, inode_fd: int, flags: int) -> None:
    """The open file ``fh`` again, with the guest's flags as OPEN applied them (never
    O_TRUNC again); a directory as OPENDIR opens it."""
    if stat.S_ISDIR(os.fstat(inode_fd).st_mode):
        open_flags = os.O_RDONLY | os.O_DIRECTORY
    else:
        open_flags = fs._open_flags(flags) & ~os.O_TRUNC
    fd = proc_open(inode_fd, open_flags)
    try:
        fs.handles.restore(fh, nodeid, fd, flags)
    except BaseException:
        os.close(fd)
        raise
