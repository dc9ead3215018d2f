"""Directories: OPENDIR, READDIR and READDIRPLUS (which looks up every entry it sends).
RELEASEDIR and FSYNCDIR are answered as RELEASE and FSYNC (:mod:`daemon.fs.ops.files`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from daemon.fs.ops.base import FsBase, Request
from daemon.fs.ops.inodes import HandleRef, InodeRef
from daemon.fs.proc_fd import openable, proc_open
from daemon.native._sys import lib
from daemon.protocol import fuse

DIRENT64_HEAD = 19  # d_ino u64, d_off s64, d_reclen u16, d_type u8
GETDENTS_BUF = 32768
GETDENTS_MIN = 1024  # room for the longest dirent64 (19 + 256 bytes)


class DirectoryOps(FsBase):
    """Open directories and their entries, read with getdents64."""

    def op_opendir(self, req: Request) -> bytes:
        with InodeRef(self, req.nodeid) as inode:
            if not openable(os.fstat(inode.fd).st_mode):
                raise OSError(errno.EBADF, "only regular files and directories are opened")
            fd = proc_open(inode.fd, os.O_RDONLY | os.O_DIRECTORY)  # a file: ENOTDIR
            return self._new_handle(req.nodeid, fd, 0, True)

    def _dirents(self, fd: int, offset: int, want: int):  # noqa: ANN202 - tuple generator
        """(d_ino, next_offset, d_type, name) from getdents64, starting at offset, read
        about ``want`` bytes of dirent64 at a time: what the reply can take, since what it
        cannot is read again after the next request's lseek (on ext4 that re-hashes whole
        directory blocks)."""
        os.lseek(fd, offset, os.SEEK_SET)
        buf = self._dents_view
        chunk = max(GETDENTS_MIN, min(GETDENTS_BUF, want))
        while True:
            n = lib.pyvfs_getdents64(fd, self._dents, chunk)
            if n < 0:
                err = lib.pyvfs_errno()
                raise OSError(err, os.strerror(err))
            if n == 0:
                return
            pos = 0
            while pos < n:
                ino = int.from_bytes(buf[pos : pos + 8], "little")
                off = int.from_bytes(buf[pos + 8 : pos + 16], "little", signed=True)
                reclen = int.from_bytes(buf[pos + 16 : pos + 18], "little")
                dtype = buf[pos + 18][0]
                end = buf[pos + 19 : pos + reclen].index(b"\0") if reclen > 19 else 0
                name = bytes(buf[pos + 19 : pos + 19 + end])
                pos += reclen
                yield ino, off, dtype, name

    def op_readdir(self, req: Request) -> bytes:
        fh, offset, size, *_ = fuse.READ_IN.unpack_from(req.arg)
        size = min(size, fuse.MAX_WRITE, req.room)
        out = bytearray()
        with HandleRef(self, fh) as handle:
            for ino, off, dtype, name in self._dirents(handle.fd, offset, size):
                rec = fuse.dirent_size(len(name))
                if len(out) + rec > size:
                    break
                out += fuse.DIRENT_HEAD.pack(ino, off, len(name), dtype)
                out += name
                out += b"\0" * (rec - fuse.DIRENT_HEAD.size - len(name))
        return bytes(out)

    def op_readdirplus(self, req: Request) -> bytes:
        fh, offset, size, *_ = fuse.READ_IN.unpack_from(req.arg)
        size = min(size, fuse.MAX_WRITE, req.room)  # every entry sent carries a reference
        out = bytearray()
        t = self.config.timeout
        claimed: list[int] = []  # lookups taken for the guest, in order
        with HandleRef(self, fh) as handle, InodeRef(self, req.nodeid) as parent:
            start = 0
            try:
                # a dirent64 is at most a quarter of its direntplus
                for ino, off, dtype, name in self._dirents(handle.fd, offset, size // 4):
                    rec = fuse.direntplus_size(len(name))
                    if len(out) + rec > size:
                        break
                    start = len(out)
                    out += bytes(rec)
                    if name in (b".", b".."):
                        # nodeid 0: the guest makes no dentry and sends no FORGET for it
                        fuse.ENTRY_HEAD.pack_into(out, start, 0, 0, 0, 0, 0, 0)
                        fuse.ATTR.pack_into(out, start + fuse.ENTRY_HEAD.size, ino,
                                            *(0,) * 8, dtype << 12, *(0,) * 6)
                    else:
                        try:
                            nodeid, st = self.do_lookup(parent, name)
                        except FileNotFoundError:
                            del out[start:]
                            continue
                        claimed.append(nodeid)
                        fuse.pack_entry_into(out, start, nodeid, st, t, t,
                                             self._attr_flags(parent, st))
                        self._guest_ids(out, start + fuse.ENTRY_HEAD.size, st)
                        ino = st.st_ino
                    fuse.DIRENT_HEAD.pack_into(out, start + fuse.ENTRY_OUT_SIZE, ino, off,
                                               len(name), dtype)
                    p = start + fuse.ENTRY_OUT_SIZE + fuse.DIRENT_HEAD.size
                    out[p : p + len(name)] = name
                    start = len(out)
            except Exception:
                # An entry failed (a full inode table, a vanished parent): the entries
                # before it go to the guest with their lookups; the failed one gives its
                # lookup back; with none before it, the error is the answer.
                del out[start:]
                sent = sum(1 for _ in _entry_nodeids(out))
                for nodeid in claimed[sent:]:
                    self._forget(nodeid, 1)
                if not out:
                    raise
        return bytes(out)


def _entry_nodeids(buf: bytearray) -> Iterator[int]:
    """The non-zero nodeids of the direntplus records in a READDIRPLUS reply."""
    pos = 0
    while pos < len(buf):
        nodeid = int.from_bytes(buf[pos : pos + 8], "little")
        namelen = int.from_bytes(buf[pos + fuse.ENTRY_OUT_SIZE + 16 :
                                     pos + fuse.ENTRY_OUT_SIZE + 20], "little")
        if nodeid:
            yield nodeid
        pos += fuse.direntplus_size(namelen)
