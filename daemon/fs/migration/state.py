"""The device state of live migration: what the destination daemon needs to go on serving
the guest's nodeids and fhs, as a versioned msgpack blob.

Never the files' data: source and destination must export the same contents (the same
directory, or a copy, or shared storage). The state says how to find each inode again:

* ``find-paths`` (virtiofsd's default): the path of each inode below the shared
  directory, read from the fd directory's link of its O_PATH fd (or of the fd its file
  handle opens) at the switch-over, so renames since the lookup are followed; where that
  fails (an unlinked file), the parent nodeid and name recorded at the lookup.
  ``--migration-confirm-paths`` re-opens each path on the source and compares inodes;
  ``--migration-verify-handles`` sends file handles too, which the destination compares
  with what it found.
* ``file-handles``: the file handle (the destination opens it on its shared directory's
  mount; needs the same file system and CAP_DAC_READ_SEARCH); inodes without one fall back
  to their path.

The destination re-creates the inode table with the same nodeids and lookup counts and the
open-file table with the same fhs, each file re-opened with the flags the guest opened it
with (O_TRUNC left out), and takes the guest's host locks again (``locks.py``).

Blob (a msgpack map): ``format`` "pyvirtiofsd-device-state", ``version`` 2, ``mode``,
``session`` (the INIT flags agreed), ``root_lookups``, ``inodes``: maps with ``nodeid``,
``lookups``, ``mode``, ``parent``, ``name``, and ``path`` (bytes relative to the share, or
nil) and/or ``handle`` [type, bytes]; ``handles``: [fh, nodeid, flags] triples;
``locks`` (version 2): see ``locks.py``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any

import msgpack

from daemon.fs import proc_fd
from daemon.fs.fd_cache import open_by_handle
from daemon.fs.migration import locks as lock_state
from daemon.fs.ops.base import O_PATH_FLAGS
from daemon.fs.ops.session import SESSION_FLAGS
from daemon.fs.passthrough import PassthroughFs
from daemon.fs.proc_fd import proc_open
from daemon.protocol import fuse
from shm_table import InodeEntry, InodeIds

log = logging.getLogger("pyvirtiofsd.migration")

FORMAT = "pyvirtiofsd-device-state"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: without locks
MAX_STATE = 1 << 30  # a blob larger than this is refused on load


class MigrationError(Exception):
    """The device state cannot be saved or loaded (the message says which inode and why)."""


@dataclass(frozen=True)
class MigrationOptions:
    """virtiofsd 1.13's --migration-* options."""

    mode: str = "find-paths"  # or "file-handles"
    on_error: str = "abort"  # or "guest-error": an inode not found is left out
    verify_handles: bool = False
    confirm_paths: bool = False


# ----- source -----------------------------------------------------------------------------


def _readlink_fd(fd: int) -> str:
    """Where the fd directory's link of ``fd`` points (the inode's current path)."""
    if proc_fd.PROC_DIR_FD < 0:
        return os.readlink(f"/proc/self/fd/{fd}")
    return os.readlink(str(fd), dir_fd=proc_fd.PROC_DIR_FD)


def _relative(fs: PassthroughFs, target: str) -> bytes | None:
    """``target`` (a link of the fd directory) relative to the share; None when it is not
    below it or names an unlinked file."""
    if target.endswith(" (deleted)") or not target.startswith("/"):
        return None
    root = os.path.normpath(fs.shared_dir)
    if root == "/":
        rel = target.lstrip("/")
    elif target == root:
        rel = ""
    elif target.startswith(root + "/"):
        rel = target[len(root) + 1:]
    else:
        return None
    return os.fsencode(rel)


def _entry_fd(fs: PassthroughFs, entry: InodeEntry) -> tuple[int, bool]:
    """An O_PATH fd of the entry: its own (False: do not close) or one its handle opens."""
    if entry.fd >= 0:
        return entry.fd, False
    if entry.handle is None:
        raise OSError(errno.EBADF, "neither fd nor file handle")
    return open_by_handle(fs.mount_fd, entry.handle, entry.handle_type), True


class FileUnlinked(OSError):
    """The inode has no name any more (the guest or the host unlinked it while it is open)."""


def _path_of(fs: PassthroughFs, entry: InodeEntry, confirm: bool) -> bytes | None:
    fd, close = _entry_fd(fs, entry)
    try:
        target = _readlink_fd(fd)
        if target.endswith(" (deleted)"):
            raise FileUnlinked(errno.ENOENT, "unlinked")
        path = _relative(fs, target)
        if path is not None and confirm:
            found = _walk(fs, path)
            try:
                a, b = os.fstat(found), os.fstat(fd)
                if (a.st_ino, a.st_dev) != (b.st_ino, b.st_dev):
                    path = None
            finally:
                os.close(found)
        return path
    finally:
        if close:
            os.close(fd)


def save_state(fs: PassthroughFs, options: MigrationOptions,
               held: lock_state.HeldLocks | None = None) -> bytes:
    """The device state of ``fs`` (its workers stopped: the tables do not change), with
    the locks ``held`` (:func:`daemon.fs.migration.locks.collect`)."""
    inodes: list[dict[str, Any]] = []
    root_lookups = 1
    for entry in sorted(fs.inodes.iter_entries(), key=lambda e: e.slot):
        if entry.nodeid == fuse.ROOT_ID:
            root_lookups = entry.lookups
            continue
        record: dict[str, Any] = {"nodeid": entry.nodeid, "lookups": entry.lookups,
                                  "mode": entry.mode, "parent": entry.parent,
                                  "name": entry.name, "path": None}
        want_handle = options.mode == "file-handles" or options.verify_handles
        if want_handle and entry.handle is not None:
            record["handle"] = [entry.handle_type, entry.handle]
        if options.mode == "find-paths" or "handle" not in record:
            try:
                record["path"] = _path_of(fs, entry, options.confirm_paths)
            except FileUnlinked:
                record["unlinked"] = True  # its recorded parent+name may be another file now
            except OSError as e:
                log.warning("migration: inode %d (%r): no path: %s", entry.nodeid,
                            entry.name, e.strerror or e)
        inodes.append(record)
    handles = [[h.fh, h.nodeid, h.flags] for h in
               sorted(fs.handles.iter_handles(), key=lambda h: h.slot)]
    state = {"format": FORMAT, "version": VERSION, "mode": options.mode,
             "session": SESSION_FLAGS.unpack_from(fs.session)[0],
             "root_lookups": root_lookups, "inodes": inodes, "handles": handles,
             "locks": (held or lock_state.HeldLocks()).to_state()}
    return msgpack.packb(state, use_bin_type=True)


# ----- destination ------------------------------------------------------------------------


def _walk(fs: PassthroughFs, path: bytes) -> int:
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


def _open_inode(fs: PassthroughFs, record: dict[str, Any], found: dict[int, int]) -> int:
    """An O_PATH fd of the inode ``record`` describes, by handle, path or parent+name."""
    handle = record.get("handle")
    if record.get("_mode") == "file-handles" and handle is not None:
        try:
            return open_by_handle(fs.mount_fd, bytes(handle[1]), int(handle[0]))
        except OSError as e:
            if record.get("path") is None:
                raise
            log.info("migration: inode %d: file handle failed (%s); trying its path",
                     record["nodeid"], e.strerror)
    if record.get("path") is not None:
        return _walk(fs, bytes(record["path"]))
    if record.get("unlinked"):
        # as virtiofsd: an inode that lost its name is lost (the name it was looked up by
        # may be another file by now: writing there would destroy that file's data)
        raise OSError(errno.ENOENT, "unlinked on the source, while open; only "
                      "--migration-mode file-handles can carry it over")
    parent = found.get(record["parent"])
    if parent is None:
        raise OSError(errno.ENOENT, "no path, and its parent was not found")
    name = bytes(record["name"])
    if not name or b"/" in name or name in (b".", b".."):
        raise OSError(errno.EINVAL, f"bad name {name!r}")
    return os.open(name, O_PATH_FLAGS, dir_fd=parent)


def _restore_inode(fs: PassthroughFs, record: dict[str, Any], fd: int,
                   verify: bool, seen: set[object]) -> None:
    """Put the inode found (its O_PATH fd ``fd``, which the table or this closes) under
    the record's nodeid, kept as a lookup would keep it. ``seen``: the inodes restored so
    far (two nodeids of the source must not become one file here)."""
    st = os.fstat(fd)
    handle, htype, mnt = fs._file_handle(fd)
    key = handle if handle is not None else (st.st_ino, st.st_dev)
    if key in seen:
        raise OSError(errno.ESTALE, "found a file another nodeid was found as")
    seen.add(key)
    if verify and record.get("handle") is not None and handle is not None \
            and bytes(record["handle"][1]) != handle:
        raise OSError(errno.ESTALE, "found another file than the source had (file handle "
                      "differs)")
    if stat.S_IFMT(st.st_mode) != stat.S_IFMT(int(record["mode"])):
        raise OSError(errno.ESTALE, "found a file of another type than the source had")
    by_handle = handle is not None and mnt == fs.root_mnt_id
    entry = InodeEntry(slot=0, nodeid=int(record["nodeid"]), lookups=int(record["lookups"]),
                       ids=InodeIds(st.st_ino, st.st_dev, mnt), fd=-1 if by_handle else fd,
                       mode=st.st_mode, handle=handle, handle_type=htype,
                       handle_mnt_id=mnt, parent=int(record["parent"]),
                       name=bytes(record["name"]))
    fs.inodes.restore(entry)


LOST_DEV = (1 << 64) - 1  # no device has this number: a lost inode's ids match no file


def _restore_lost(fs: PassthroughFs, record: dict[str, Any]) -> None:
    """An inode not found (``guest-error``), as virtiofsd's invalid inode: its nodeid
    stays taken (never reused for another file while the guest still holds it; FORGET
    works), without fd or file handle, so requests on it answer EIO."""
    nodeid = int(record["nodeid"])
    entry = InodeEntry(slot=0, nodeid=nodeid, lookups=int(record["lookups"]),
                       ids=InodeIds(nodeid, LOST_DEV, LOST_DEV), fd=-1,
                       mode=int(record["mode"]), handle=None, handle_type=0,
                       handle_mnt_id=0, parent=int(record["parent"]),
                       name=bytes(record["name"]))
    fs.inodes.restore(entry)


def load_state(fs: PassthroughFs, blob: bytes, options: MigrationOptions) -> None:
    """Re-create the source's nodeids and fhs in ``fs``'s tables (which hold only the root:
    a fresh daemon, before any worker). MigrationError when the state is unusable, or
    (``--migration-on-error abort``) when an inode cannot be found; with ``guest-error``
    such inodes and their open files stay, lost: the guest gets EIO for them."""
    try:
        state = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise MigrationError(f"device state is not msgpack: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MigrationError("device state is not pyvirtiofsd's (virtiofsd's own format is "
                             "not understood)")
    if state.get("version") not in READABLE_VERSIONS:
        raise MigrationError(f"device state version {state.get('version')} (this daemon "
                             f"reads {READABLE_VERSIONS})")
    if len(fs.inodes) != 1 or len(fs.handles):
        raise MigrationError("the destination has served requests already")
    SESSION_FLAGS.pack_into(fs.session, 0, int(state["session"]))
    found: dict[int, int] = {}  # nodeid -> an O_PATH fd of ours, for parent+name look-ups
    failed: list[str] = []
    seen: set[object] = set()
    try:
        found[fuse.ROOT_ID] = os.open(fs.shared_dir, O_PATH_FLAGS | os.O_DIRECTORY)
        records = sorted(state["inodes"], key=lambda r: int(r["nodeid"]) & 0xFFFFFFFF)
        for record in records:
            record["_mode"] = state["mode"]
            try:
                fd = _open_inode(fs, record, found)
            except OSError as e:
                failed.append(f"inode {record['nodeid']} ({record.get('path') or record['name']!r}"
                              f"): {e.strerror or e}")
                _restore_lost(fs, record)
                continue
            try:
                found[int(record["nodeid"])] = os.dup(fd)
                _restore_inode(fs, record, fd, options.verify_handles, seen)
            except OSError as e:
                os.close(fd)
                found.pop(int(record["nodeid"]), None)
                failed.append(f"inode {record['nodeid']}: {e.strerror or e}")
                _restore_lost(fs, record)
            except BaseException:
                os.close(fd)
                raise
        if failed and options.on_error == "abort":
            raise MigrationError("; ".join(failed[:5]) + (
                f" and {len(failed) - 5} more" if len(failed) > 5 else ""))
        for line in failed:
            log.error("migration: %s; the guest gets errors for it", line)
        for fh, nodeid, flags in state["handles"]:
            fd = found.get(nodeid)
            try:
                if fd is None:
                    raise OSError(errno.ENOENT, f"its inode {nodeid} was not found")
                _reopen(fs, int(fh), int(nodeid), fd, int(flags))
            except OSError as e:
                if options.on_error == "abort":
                    raise MigrationError(f"fh {fh:#x}: {e.strerror or e}") from e
                # as virtiofsd's invalid handle: the guest gets EIO for it, and may release it
                log.error("migration: fh %#x: %s; the guest gets EIO for it", fh,
                          e.strerror or e)
                fs.handles.restore(int(fh), int(nodeid), -1, int(flags), broken=True)
        try:
            lost = lock_state.restore(fs, lock_state.HeldLocks.from_state(state.get("locks")),
                                      found, options.on_error == "abort")
        except OSError as e:
            raise MigrationError(str(e)) from e
        for line in lost:
            log.error("migration: %s; the guest gets EIO for it", line)
    finally:
        for fd in found.values():
            os.close(fd)


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
