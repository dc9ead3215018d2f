"""The device state of live migration: what the destination daemon needs to go on serving
the guest's nodeids and fhs, as a versioned msgpack blob.

Never the files' data: source and destination must export the same contents (the same
directory, or a copy, or shared storage). The state says how to find each inode again:

* ``find-paths`` (virtiofsd's default): the path of each inode below the shared
  directory, read from the fd directory's link of its O_PATH fd (or of the fd its file
  handle opens), collected while the guest still runs and re-checked at the switch-over
  (``paths.py``), so renames since the lookup are followed. An inode removed while open
  is ``unlinked``: lost (never re-found by the name it was looked up by, which may be
  another file now); an inode with no path below the share falls back to the parent
  nodeid and name recorded at the lookup. ``--migration-confirm-paths`` reads and
  re-opens each path at the switch-over and compares inodes; ``--migration-verify-handles``
  sends file handles too, which the destination compares with what it found.
* ``file-handles``: the file handle (the destination opens it on its shared directory's
  mount; needs the same file system and CAP_DAC_READ_SEARCH); inodes without one fall back
  to their path.

The destination (``find.py``) re-creates the inode table with the same nodeids and lookup
counts and the open-file table with the same fhs, each file re-opened with the flags the
guest opened it with (O_TRUNC left out), and takes the guest's host locks again
(``locks.py``).

Blob (a msgpack map): ``format`` "pyvirtiofsd-device-state", ``version`` 2, ``mode``,
``session`` (the INIT flags agreed), ``root_lookups``, ``inodes`` (columns, see
:data:`COLUMNS`: one C call exports them from the table and one restores them, so the
stopped phase costs no Python per inode), ``handles``: [fh, nodeid, flags] triples,
``locks``: see ``locks.py``; ``parked``: queue -> [head, unique, fh, nodeid, owner,
start, end, type, flock, pid] per SETLKW its worker was waiting with (its chain is still in
guest memory: the destination's worker of that queue answers it).
"""

from __future__ import annotations

import errno
import logging
import os
from array import array
from dataclasses import dataclass
from typing import Any

import msgpack

from daemon.fs.migration import locks as lock_state
from daemon.fs.migration.paths import (
    UNLINKED,
    Inodes,
    PathCollector,
    all_paths,
    path_or_none,
    readlink_fd,
)
from daemon.fs.migration.paths import relative as relative_path
from daemon.fs.ops.base import O_PATH_FLAGS
from daemon.fs.ops.session import SESSION_FLAGS
from daemon.fs.passthrough import PassthroughFs
from daemon.native._sys import lib
from daemon.protocol import fuse

log = logging.getLogger("pyvirtiofsd.migration")

FORMAT = "pyvirtiofsd-device-state"
VERSION = 2
MAX_STATE = 1 << 30  # a blob larger than this is refused on load
NO_PATH = lib.PYVFS_NO_PATH

# inodes: one column per field, each the bytes of an array of the machine's byte order
# (the state goes between daemons of one kind on one host or its twin), in rising slot
# order; names, paths and handles concatenated, cut by their lengths
COLUMNS = {"nodeid": "Q", "lookups": "Q", "parent": "Q", "mode": "I", "name_len": "H",
           "path_len": "I", "handle_len": "H", "handle_type": "i"}
# plus "count", "names", "paths", "handles" (bytes) and "unlinked" (nodeids)


class MigrationError(Exception):
    """The device state cannot be saved or loaded (the message says which inode and why)."""


@dataclass(frozen=True)
class MigrationOptions:
    """virtiofsd 1.13's --migration-* options."""

    mode: str = "find-paths"  # or "file-handles"
    on_error: str = "abort"  # or "guest-error": an inode not found is lost: EIO
    verify_handles: bool = False
    confirm_paths: bool = False


# ----- source -----------------------------------------------------------------------------


def walk(fs: PassthroughFs, path: bytes) -> int:
    """An O_PATH fd of ``path`` below the share, one component at a time without
    following symlinks (a path in the state never leads outside the share)."""
    fd = os.open(fs.shared_dir, O_PATH_FLAGS | os.O_DIRECTORY)
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            os.close(fd)
            raise OSError(errno.EINVAL, f"'..' in migrated path {path!r}")
        try:
            nxt = os.open(part, O_PATH_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _confirmed_path(fs: PassthroughFs, inodes: Inodes, i: int) -> bytes | None:
    """--migration-confirm-paths: the path, if opening it leads to the same inode."""
    fd, close = inodes.fd(fs, i)
    try:
        path = relative_path(fs, readlink_fd(fd))
        if path is None or path == UNLINKED:
            return path
        found = walk(fs, path)
        try:
            a, b = os.fstat(found), os.fstat(fd)
            return path if (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) else None
        finally:
            os.close(found)
    except OSError as e:
        log.warning("migration: inode %d: no path: %s", inodes.nodeids[i], e.strerror or e)
        return None
    finally:
        if close:
            os.close(fd)


def _paths(fs: PassthroughFs, inodes: Inodes, options: MigrationOptions,
           collector: PathCollector | None) -> list[bytes | None]:
    if options.mode == "file-handles":  # only inodes without a handle need one
        one = _confirmed_path if options.confirm_paths else path_or_none
        return [None if inodes.handle(i) else one(fs, inodes, i) for i in range(inodes.count)]
    if options.confirm_paths:
        return [_confirmed_path(fs, inodes, i) for i in range(inodes.count)]
    if collector is not None and collector.complete:
        return collector.at_switch_over(inodes)
    return all_paths(fs, inodes)


def save_state(fs: PassthroughFs, options: MigrationOptions,
               held: lock_state.HeldLocks | None = None,
               collector: PathCollector | None = None,
               parked: dict[int, list[list[int]]] | None = None) -> bytes:
    """The device state of ``fs`` (its workers stopped: the tables do not change), with
    the locks ``held`` (:func:`daemon.fs.migration.locks.collect`), the paths
    ``collector`` gathered while the guest ran and the SETLKWs ``parked`` per queue."""
    cols = fs.inodes.export(with_handles=True)
    inodes = Inodes(cols)
    paths = _paths(fs, inodes, options, collector)
    path_len = array("I", [NO_PATH if p is None or p == UNLINKED else len(p) for p in paths])
    unlinked = [n for n, p in zip(inodes.nodeids, paths, strict=True) if p == UNLINKED]
    columns: dict[str, Any] = {
        "count": inodes.count, "names": cols["names"], "unlinked": unlinked,
        "paths": b"".join(p for p in paths if p is not None and p != UNLINKED),
        "path_len": path_len.tobytes()}
    for key in ("nodeid", "lookups", "parent", "mode", "name_len"):
        columns[key] = cols[key].tobytes()
    if options.mode == "file-handles" or options.verify_handles:
        columns.update(handle_len=cols["handle_len"].tobytes(),
                       handle_type=cols["handle_type"].tobytes(), handles=cols["handles"])
    else:
        columns.update(handle_len=bytes(2 * inodes.count),
                       handle_type=bytes(4 * inodes.count), handles=b"")
    handles = [[h.fh, h.nodeid, h.flags] for h in
               sorted(fs.handles.iter_handles(), key=lambda h: h.slot)]
    state = {"format": FORMAT, "version": VERSION, "mode": options.mode,
             "session": SESSION_FLAGS.unpack_from(fs.session)[0],
             "root_lookups": fs.inodes.lookups(fuse.ROOT_ID), "inodes": columns,
             "handles": handles, "locks": (held or lock_state.HeldLocks()).to_state(),
             "parked": {q: entries for q, entries in (parked or {}).items() if entries}}
    return msgpack.packb(state, use_bin_type=True)


# ----- the columns, read back ---------------------------------------------------------------


def read_columns(inodes: Any) -> dict[str, Any]:
    """The state's ``inodes`` as arrays, checked: MigrationError when they do not fit."""
    if not isinstance(inodes, dict) or not isinstance(inodes.get("count"), int):
        raise MigrationError("device state: no inode columns")
    n = inodes["count"]
    cols: dict[str, Any] = {"count": n}
    try:
        for key, code in COLUMNS.items():
            col = array(code)
            col.frombytes(inodes[key])
            if len(col) != n:
                raise MigrationError(f"device state: column {key} has {len(col)} of {n}")
            cols[key] = col
        for key, lengths in (("names", "name_len"), ("handles", "handle_len")):
            cols[key] = bytes(inodes[key])
            if len(cols[key]) != sum(cols[lengths]):
                raise MigrationError(f"device state: {key} do not match their lengths")
        cols["paths"] = bytes(inodes["paths"])
        if len(cols["paths"]) != sum(x for x in cols["path_len"] if x != NO_PATH):
            raise MigrationError("device state: paths do not match their lengths")
        cols["unlinked"] = {int(x) for x in inodes["unlinked"]}
    except (KeyError, TypeError, ValueError) as e:
        raise MigrationError(f"device state: bad inode columns ({e})") from e
    if any(x > lib.PYVFS_MIGRATE_HANDLE_MAX for x in cols["handle_len"]) or any(
            x > 255 for x in cols["name_len"]):
        raise MigrationError("device state: a name or file handle too long")
    return cols


def inode_records(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The state's inodes one map each (nodeid, lookups, parent, mode, name, path, handle,
    unlinked): for tests and logs."""
    cols = read_columns(state["inodes"])
    records = []
    name_at = path_at = handle_at = 0
    for i in range(cols["count"]):
        nl, pl, hl = cols["name_len"][i], cols["path_len"][i], cols["handle_len"][i]
        record = {k: cols[k][i] for k in ("nodeid", "lookups", "parent", "mode")}
        record["name"] = cols["names"][name_at:name_at + nl]
        record["path"] = None if pl == NO_PATH else cols["paths"][path_at:path_at + pl]
        record["handle"] = ([cols["handle_type"][i], cols["handles"][handle_at:handle_at + hl]]
                            if hl else None)
        record["unlinked"] = record["nodeid"] in cols["unlinked"]
        name_at += nl
        path_at += 0 if pl == NO_PATH else pl
        handle_at += hl
        records.append(record)
    return records


def unpack(blob: bytes) -> dict[str, Any]:
    """The state, its format and version checked."""
    try:
        state = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise MigrationError(f"device state is not msgpack: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MigrationError("device state is not pyvirtiofsd's (virtiofsd's own format is "
                             "not understood)")
    if state.get("version") != VERSION:
        raise MigrationError(f"device state version {state.get('version')} (this daemon "
                             f"reads {VERSION})")
    return state
