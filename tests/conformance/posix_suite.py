"""POSIX conformance checks for a directory on a virtio-fs mount (runs INSIDE the guest).

A self-contained Python 3 program (standard library only, Python >= 3.11 on Linux) that
exercises a fresh directory and prints one line per check::

    <check-id> <result>

``result`` is ``ok`` for a success case that behaved as expected, the errno name of a
failing call (``EEXIST``, ``ENOTSUP``, ...; ``ok`` when the call unexpectedly succeeded is
reported as ``no-error``), or an observed value that never contains inode numbers or
times (those are compared inside the guest and reduced to ``ok`` / a description).  The last
line is ``@@SUITE-END checks=N``.

It must run as root: the unprivileged parts run in forked children that drop to uid/gid
1234 (:data:`USER`).  Usage::

    python3 posix_suite.py DIR [--only GROUP,GROUP] [--fsx OPS] [--seed N]

``--fsx OPS`` also runs the random-operation data-integrity exerciser of the sibling module
``fsx.py`` (in the same interpreter: one program start per guest boot).

:data:`EXPECTED` holds the POSIX/Linux-expected outcome of every check, as a Linux 6.1 guest
sees it on an ext4 share served with the default options (xattrs off); :data:`MODE_EXPECTED`
holds the few documented deviations a daemon option implies.  The host-side tests import
this module for both tables.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import signal
import stat
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

USER = 1234  # uid and gid of the unprivileged child processes
OTHER_GID = 555  # a group USER is not a member of
GIB = 1 << 30
NAME255 = "n" * 255
NAME256 = "m" * 256
ALL_BYTES_NAME = bytes(b for b in range(1, 256) if b != ord("/"))  # 254 bytes

AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
FALLOC_FL_ZERO_RANGE = 0x10
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)

# ------------------------------------------------------------------------------------------
# Expected outcome of every check (Linux 6.1 guest, default daemon options, ext4 share).

EXPECTED: dict[str, str] = {
    # open(2) flags and lookup errors
    "open.creat_excl_new": "ok",
    "open.creat_excl_exists": "EEXIST",
    "open.creat_existing_keeps_data": "ok",
    "open.trunc": "ok",
    "open.append_single": "ok",
    "open.append_two_processes": "ok",
    "open.enoent": "ENOENT",
    "open.enoent_parent": "ENOENT",
    "open.enotdir_component": "ENOTDIR",
    "open.o_directory_on_file": "ENOTDIR",
    "open.eisdir_wronly": "EISDIR",
    "open.eisdir_creat": "EISDIR",
    "open.nofollow_symlink": "ELOOP",
    "open.symlink_loop": "ELOOP",
    "open.name255": "ok",
    "open.name256": "ENAMETOOLONG",
    "stat.name256": "ENAMETOOLONG",
    "mkdir.name256": "ENAMETOOLONG",
    "open.unlinked_fd_survives": "ok",
    "open.odirect_rw": "ok",
    # directories, links, symlinks
    "mkdir.ok": "ok",
    "mkdir.eexist_dir": "EEXIST",
    "mkdir.eexist_file": "EEXIST",
    "rmdir.enotempty": "ENOTEMPTY",
    "rmdir.enotdir": "ENOTDIR",
    "rmdir.enoent": "ENOENT",
    "rmdir.ok": "ok",
    "unlink.eisdir": "EISDIR",
    "unlink.enoent": "ENOENT",
    "link.eexist": "EEXIST",
    "link.dir": "EPERM",
    "link.enoent": "ENOENT",
    "symlink.eexist": "EEXIST",
    "symlink.readlink": "ok",
    "symlink.long_target": "ok",
    "readlink.einval_on_file": "EINVAL",
    "link.nlink_sequence": "1,2,3,2,1",
    "link.same_inode": "ok",
    "link.dir_nlink_sequence": "2,3,2",
    # rename / renameat2
    "rename.basic": "ok",
    "rename.over_file": "ok",
    "rename.dir_into_own_subdir": "EINVAL",
    "rename.file_over_dir": "EISDIR",
    "rename.dir_over_file": "ENOTDIR",
    "rename.dir_over_nonempty_dir": "ENOTEMPTY",
    "rename.dir_over_empty_dir": "ok",
    "rename.enoent": "ENOENT",
    "rename.hardlinks_same_inode": "ok",
    "rename.atomic_replace": "ok",
    "rename2.noreplace_exists": "EEXIST",
    "rename2.noreplace_new": "ok",
    "rename2.exchange": "ok",
    "rename2.exchange_missing": "ENOENT",
    "rename2.exchange_dir_file": "ok",
    # sizes, sparse files, large offsets, fallocate, copy_file_range
    "trunc.shrink": "ok",
    "trunc.extend_zero_fill": "ok",
    "trunc.path": "ok",
    "write.past_eof_zero_fill": "ok",
    "sparse.1g_size": "ok",
    "sparse.1g_seek_data": "ok",
    "sparse.1g_seek_hole": "ok",
    "sparse.1g_blocks": "ok",
    "sparse.seek_data_at_eof": "ENXIO",
    "large.5g_pwrite_pread": "ok",
    "falloc.posix_fallocate": "ok",
    "falloc.keep_size": "ok",
    "falloc.punch_hole": "ok",
    "falloc.punch_without_keep_size": "ENOTSUP",
    "falloc.zero_range": "ok",
    "copy_file_range.whole": "ok",
    "copy_file_range.offsets": "ok",
    # times
    "time.utime_ns_exact": "ok",
    "time.utime_now": "ok",
    "time.mtime_on_write": "ok",
    "time.ctime_on_write": "ok",
    "time.ctime_on_chmod": "ok",
    "time.dir_mtime_on_create": "ok",
    "time.dir_mtime_on_unlink": "ok",
    # permission bits and ownership
    "perm.create_mode_umask0": "0o640",
    "perm.create_mode_umask022": "0o644",
    "perm.chmod_all_bits": "0o7777",
    "perm.mkdir_sticky": "0o1777",
    "perm.chown_root": "1234:1235",
    "perm.chown_clears_suid_sgid": "0o755",
    "perm.chown_keeps_sgid_without_gx": "0o2644",
    "perm.write_by_root_keeps_suid": "0o6777",
    "perm.write_by_nonowner_clears_suid": "0o777",
    "perm.truncate_by_nonowner_clears_suid": "0o777",
    "perm.sgid_dir_inherit_gid": "ok",
    "perm.sgid_dir_inherit_mode": "ok",
    "perm.create_owner_unpriv": "ok",
    "perm.sticky_unlink_other": "EPERM",
    "perm.sticky_rename_other": "EPERM",
    "perm.sticky_unlink_own": "ok",
    "perm.eacces_read": "EACCES",
    "perm.eacces_write_own_readonly": "EACCES",
    "perm.eacces_create_in_ro_dir": "EACCES",
    "perm.eacces_search": "EACCES",
    "perm.eperm_chmod_other": "EPERM",
    "perm.eperm_chown_to_root": "EPERM",
    "perm.eperm_utime_explicit_other": "EPERM",
    "perm.utime_now_writable_other": "ok",
    "perm.eacces_utime_now_readonly_other": "EACCES",
    "perm.chmod_sgid_nonmember_cleared": "0o755",
    # names
    "names.utf8": "ok",
    "names.space_newline_tab": "ok",
    "names.255_ascii": "ok",
    "names.255_utf8": "ok",
    "names.256_utf8": "ENAMETOOLONG",
    "names.all_bytes": "ok",
    "names.dots": "ok",
    "names.listing_exact": "ok",
    # readdir
    "readdir.300_entries": "ok",
    "readdir.churn_no_loss_no_dup": "ok",
    "readdir.seekdir_telldir": "ok",
    # xattrs (off by default in virtiofsd)
    "xattr.set": "ENOTSUP",
    "xattr.get": "ENOTSUP",
    "xattr.list": "ENOTSUP",
    # locks between two guest processes
    "lock.flock_exclusive": "EAGAIN",
    "lock.flock_shared": "ok",
    "lock.flock_after_release": "ok",
    "lock.fcntl_exclusive": "EAGAIN",
    "lock.fcntl_other_range": "ok",
    "lock.fcntl_getlk": "ok",
    "lock.fcntl_read_shared": "ok",
    "lock.fcntl_wait_then_acquire": "ok",
    "lock.fcntl_close_any_fd_releases": "ok",
    "lock.flock_fcntl_independent": "ok",
    "lock.flock_inherited_fd_shared": "ok",
    "lock.flock_two_fds_same_process": "EAGAIN",
    "lock.fcntl_same_process_two_fds": "ok",
    "lock.fcntl_inherited_fd_not_shared": "EAGAIN",
    # O_TMPFILE
    "tmpfile.open": "ok",
    "tmpfile.nlink0": "ok",
    "tmpfile.linkat": "ok",
    "tmpfile.linkat_empty_path": "ok",
    # mmap
    "mmap.shared_write_drop_caches": "ok",
    "mmap.private_not_written": "ok",
    "mmap.sees_write": "ok",
    # special files, sync, statvfs
    "mknod.fifo": "ok",
    "mknod.chardev": "ok",
    "mknod.unix_socket": "ok",
    "sync.fsync_fdatasync": "ok",
    "statvfs.namemax": "255",
}

# Data-integrity-relevant groups: the minimum run for every cache mode.
INTEGRITY_GROUPS = ("open", "size", "mmap")

# Deviations from EXPECTED that a daemon option implies by design (keyed by mode name as the
# host tests use it).  cache=never opens files with FOPEN_DIRECT_IO: a 6.1 guest refuses
# every MAP_SHARED mmap of such a file (ENODEV; FUSE_DIRECT_IO_ALLOW_MMAP came in 6.6),
# MAP_PRIVATE maps are still fine.  C and Rust virtiofsd behave the same.
MODE_EXPECTED: dict[str, dict[str, str]] = {
    # direct I/O files (no --allow-mmap): Linux 6.1 refuses shared mmap of them
    "cache-never": {"mmap.shared_write_drop_caches": "ENODEV", "mmap.sees_write": "ENODEV"},
    "cache-metadata": {"mmap.shared_write_drop_caches": "ENODEV", "mmap.sees_write": "ENODEV"},
}


def expected_for(mode: str) -> dict[str, str]:
    """EXPECTED with the documented deviations of ``mode`` applied."""
    return {**EXPECTED, **MODE_EXPECTED.get(mode, {})}


# ------------------------------------------------------------------------------------------
# Helpers

Report = Callable[[str, str], None]
CHECKS: list[tuple[str, Callable[[str, Report], None]]] = []


def check(group: str) -> Callable[[Callable[[str, Report], None]], Callable[[str, Report], None]]:
    def register(fn: Callable[[str, Report], None]) -> Callable[[str, Report], None]:
        CHECKS.append((group, fn))
        return fn

    return register


def errname(code: int | None) -> str:
    return errno.errorcode.get(code or 0, f"errno{code}")


def err(fn: Callable[..., object], *args: object, **kw: object) -> str:
    """The errno name of ``fn(*args)``, or ``no-error`` when it succeeds."""
    try:
        result = fn(*args, **kw)
    except OSError as e:
        return errname(e.errno)
    if isinstance(result, int) and fn is os.open:
        os.close(result)
    return "no-error"


def attempt(fn: Callable[[], str]) -> str:
    """Run a success check: its own verdict, or the errno name of what failed."""
    try:
        return fn()
    except OSError as e:
        return errname(e.errno)


def write_file(path: str | bytes, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def read_file(path: str | bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def omode(path: str) -> str:
    return oct(stat.S_IMODE(os.lstat(path).st_mode))


def verdict(ok: bool, detail: str) -> str:
    return "ok" if ok else detail.replace("\n", "\\n")


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def pattern(n: int, salt: int = 0) -> bytes:
    """Deterministic non-repeating-ish bytes."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += (b"%08d:%d|" % (i, salt)) * 4
        i += 1
    return bytes(out[:n])


def in_child(fn: Callable[[], Any], *, unprivileged: bool = False) -> Any:
    """Run ``fn`` in a forked child (optionally as uid/gid USER) and return its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            if unprivileged:
                os.setgroups([])
                os.setgid(USER)
                os.setuid(USER)
            try:
                result: Any = fn()
            except OSError as e:
                result = errname(e.errno)
            except BaseException as e:  # noqa: BLE001 - report anything
                result = f"child-{type(e).__name__}"
            os.write(w, json.dumps(result).encode())
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b'"child-died"')


_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]  # fmt: skip
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                        ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.c_void_p
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.telldir.restype = ctypes.c_long
_libc.telldir.argtypes = [ctypes.c_void_p]
_libc.seekdir.restype = None
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.closedir.argtypes = [ctypes.c_void_p]


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, old.encode(), AT_FDCWD, new.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def linkat(olddirfd: int, old: str, newdirfd: int, new: str, flags: int) -> None:
    if _libc.linkat(olddirfd, old.encode(), newdirfd, new.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _dirent_name(ptr: int) -> bytes:
    # glibc x86_64 struct dirent: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name[]
    return ctypes.string_at(ptr + 19)


def read_dir_names(dirp: int, count: int) -> list[bytes]:
    names: list[bytes] = []
    while len(names) < count:
        ptr = _libc.readdir(dirp)
        if not ptr:
            break
        name = _dirent_name(ptr)
        if name not in (b".", b".."):
            names.append(name)
    return names


# ------------------------------------------------------------------------------------------
# open(2)


@check("open")
def check_open(base: str, r: Report) -> None:
    d = os.path.join(base, "open")
    os.mkdir(d)
    f = os.path.join(d, "f")
    r("open.creat_excl_new", attempt(lambda: (os.close(
        os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)), "ok")[1]))
    r("open.creat_excl_exists", err(os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    write_file(f, b"keep me")

    def creat_existing() -> str:
        os.close(os.open(f, os.O_CREAT | os.O_WRONLY, 0o644))
        return verdict(read_file(f) == b"keep me", f"content={read_file(f)!r}")

    r("open.creat_existing_keeps_data", attempt(creat_existing))

    def trunc() -> str:
        write_file(f, b"x" * 100)
        os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
        return verdict(os.stat(f).st_size == 0 and read_file(f) == b"",
                       f"size={os.stat(f).st_size}")

    r("open.trunc", attempt(trunc))

    def append_single() -> str:
        write_file(f, b"a")
        fd = os.open(f, os.O_WRONLY | os.O_APPEND)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"b")
        os.close(fd)
        return verdict(read_file(f) == b"ab", f"content={read_file(f)!r}")

    r("open.append_single", attempt(append_single))

    def append_two() -> str:
        path = os.path.join(d, "append")
        write_file(path, b"")
        n, size = 300, 50

        def writer(tag: int) -> str:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            for i in range(n):
                rec = (b"%d:%05d:" % (tag, i)).ljust(size - 1, b"abcdefgh"[tag:tag + 1]) + b"\n"
                os.write(fd, rec)
            os.close(fd)
            return "ok"

        r_, w_ = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w_)
            os.read(r_, 1)
            code = 0 if writer(1) == "ok" else 1
            os._exit(code)
        os.close(r_)
        os.write(w_, b"g")
        os.close(w_)
        writer(0)
        _, status = os.waitpid(pid, 0)
        data = read_file(path)
        recs = data.split(b"\n")[:-1]
        want = {(b"%d:%05d:" % (t, i)).ljust(size - 1, b"abcdefgh"[t:t + 1])
                for t in (0, 1) for i in range(n)}
        got = set(recs)
        ok = (len(data) == 2 * n * size and len(recs) == 2 * n and got == want and status == 0)
        order_ok = all(
            [int(x.split(b":")[1]) for x in recs if x.startswith(b"%d:" % t)] == list(range(n))
            for t in (0, 1)
        )
        return verdict(ok and order_ok, f"size={len(data)} records={len(recs)} "
                       f"missing={len(want - got)} order_ok={order_ok}")

    r("open.append_two_processes", attempt(append_two))
    r("open.enoent", err(os.open, os.path.join(d, "missing"), os.O_RDONLY))
    r("open.enoent_parent", err(os.open, os.path.join(d, "nodir", "x"), os.O_CREAT | os.O_WRONLY))
    r("open.enotdir_component", err(os.open, os.path.join(f, "x"), os.O_RDONLY))
    r("open.o_directory_on_file", err(os.open, f, os.O_RDONLY | os.O_DIRECTORY))
    r("open.eisdir_wronly", err(os.open, d, os.O_WRONLY))
    r("open.eisdir_creat", err(os.open, d, os.O_CREAT | os.O_RDONLY, 0o644))
    os.symlink("f", os.path.join(d, "link"))
    r("open.nofollow_symlink", err(os.open, os.path.join(d, "link"), os.O_RDONLY | os.O_NOFOLLOW))
    os.symlink("loop2", os.path.join(d, "loop1"))
    os.symlink("loop1", os.path.join(d, "loop2"))
    r("open.symlink_loop", err(os.open, os.path.join(d, "loop1"), os.O_RDONLY))

    def name255() -> str:
        p = os.path.join(d, NAME255)
        write_file(p, b"255")
        return verdict(read_file(p) == b"255" and NAME255 in os.listdir(d), "not listed")

    r("open.name255", attempt(name255))
    r("open.name256", err(os.open, os.path.join(d, NAME256), os.O_CREAT | os.O_WRONLY, 0o644))
    r("stat.name256", err(os.stat, os.path.join(d, NAME256)))
    r("mkdir.name256", err(os.mkdir, os.path.join(d, NAME256)))

    def unlinked_fd() -> str:
        p = os.path.join(d, "unlinked")
        write_file(p, b"still here")
        fd = os.open(p, os.O_RDWR)
        os.unlink(p)
        os.pwrite(fd, b"STILL", 0)
        data = os.pread(fd, 100, 0)
        nlink = os.fstat(fd).st_nlink
        os.close(fd)
        return verdict(data == b"STILL here" and nlink == 0 and not os.path.exists(p),
                       f"data={data!r} nlink={nlink}")

    r("open.unlinked_fd_survives", attempt(unlinked_fd))

    def odirect() -> str:
        p = os.path.join(d, "direct")
        buf = mmap.mmap(-1, 8192)
        buf.write(pattern(8192, 7))
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
        try:
            os.write(fd, buf)
            back = mmap.mmap(-1, 8192)
            n = os.preadv(fd, [back], 0)
        finally:
            os.close(fd)
        return verdict(n == 8192 and back[:] == pattern(8192, 7) and read_file(p) ==
                       pattern(8192, 7), f"read={n}")

    r("open.odirect_rw", attempt(odirect))


# ------------------------------------------------------------------------------------------
# directories, links


@check("dirs")
def check_dirs(base: str, r: Report) -> None:
    d = os.path.join(base, "dirs")
    r("mkdir.ok", attempt(lambda: (os.mkdir(d), verdict(os.path.isdir(d), "not a dir"))[1]))
    f = os.path.join(d, "file")
    write_file(f, b"file")
    r("mkdir.eexist_dir", err(os.mkdir, d))
    r("mkdir.eexist_file", err(os.mkdir, f))
    sub = os.path.join(d, "sub")
    os.mkdir(sub)
    write_file(os.path.join(sub, "x"), b"")
    r("rmdir.enotempty", err(os.rmdir, sub))
    r("rmdir.enotdir", err(os.rmdir, f))
    r("rmdir.enoent", err(os.rmdir, os.path.join(d, "nope")))
    os.unlink(os.path.join(sub, "x"))
    r("rmdir.ok", attempt(lambda: (os.rmdir(sub), verdict(not os.path.exists(sub), "exists"))[1]))
    os.mkdir(sub)
    r("unlink.eisdir", err(os.unlink, sub))
    r("unlink.enoent", err(os.unlink, os.path.join(d, "nope")))
    r("link.eexist", err(os.link, f, os.path.join(d, "file")))
    r("link.dir", err(os.link, sub, os.path.join(d, "dirlink")))
    r("link.enoent", err(os.link, os.path.join(d, "nope"), os.path.join(d, "l2")))
    r("symlink.eexist", err(os.symlink, "x", f))

    def readlink() -> str:
        os.symlink("some/where else", os.path.join(d, "sl"))
        got = os.readlink(os.path.join(d, "sl"))
        return verdict(got == "some/where else", f"target={got!r}")

    r("symlink.readlink", attempt(readlink))

    def long_target() -> str:
        target = "/".join(["t" * 63] * 64)[:4000]
        os.symlink(target, os.path.join(d, "longsl"))
        got = os.readlink(os.path.join(d, "longsl"))
        size = os.lstat(os.path.join(d, "longsl")).st_size
        return verdict(got == target and size == len(target), f"len={len(got)} size={size}")

    r("symlink.long_target", attempt(long_target))
    r("readlink.einval_on_file", err(os.readlink, f))

    def nlinks() -> tuple[str, str]:
        a, b, c = (os.path.join(d, n) for n in ("la", "lb", "lc"))
        write_file(a, b"linked")
        seq = [os.stat(a).st_nlink]
        os.link(a, b)
        seq.append(os.stat(a).st_nlink)
        os.link(a, c)
        seq.append(os.stat(b).st_nlink)
        same = os.stat(a).st_ino == os.stat(b).st_ino == os.stat(c).st_ino
        os.unlink(b)
        seq.append(os.stat(a).st_nlink)
        os.unlink(a)
        seq.append(os.stat(c).st_nlink)
        same = same and read_file(c) == b"linked"
        return ",".join(map(str, seq)), verdict(same, "inode or content differs")

    try:
        seq, same = nlinks()
    except OSError as e:
        seq = same = errname(e.errno)
    r("link.nlink_sequence", seq)
    r("link.same_inode", same)

    def dir_nlinks() -> str:
        p = os.path.join(d, "nl")
        os.mkdir(p)
        seq = [os.stat(p).st_nlink]
        os.mkdir(os.path.join(p, "s"))
        seq.append(os.stat(p).st_nlink)
        os.rmdir(os.path.join(p, "s"))
        seq.append(os.stat(p).st_nlink)
        return ",".join(map(str, seq))

    r("link.dir_nlink_sequence", attempt(dir_nlinks))


# ------------------------------------------------------------------------------------------
# rename


@check("rename")
def check_rename(base: str, r: Report) -> None:
    d = os.path.join(base, "rename")
    os.mkdir(d)
    p = lambda *n: os.path.join(d, *n)  # noqa: E731

    def basic() -> str:
        write_file(p("a"), b"A")
        os.rename(p("a"), p("b"))
        return verdict(not os.path.exists(p("a")) and read_file(p("b")) == b"A", "bad state")

    r("rename.basic", attempt(basic))

    def over_file() -> str:
        write_file(p("old"), b"old")
        write_file(p("new"), b"new")
        os.rename(p("new"), p("old"))
        return verdict(read_file(p("old")) == b"new" and not os.path.exists(p("new")),
                       "bad state")

    r("rename.over_file", attempt(over_file))
    os.makedirs(p("top", "mid", "low"))
    r("rename.dir_into_own_subdir", err(os.rename, p("top"), p("top", "mid", "low", "x")))
    os.mkdir(p("emptydir"))
    r("rename.file_over_dir", err(os.rename, p("old"), p("emptydir")))
    r("rename.dir_over_file", err(os.rename, p("emptydir"), p("old")))
    r("rename.dir_over_nonempty_dir", err(os.rename, p("emptydir"), p("top")))

    def dir_over_empty() -> str:
        os.mkdir(p("src"))
        write_file(p("src", "inner"), b"in")
        os.rename(p("src"), p("emptydir"))
        return verdict(read_file(p("emptydir", "inner")) == b"in" and not os.path.exists(
            p("src")), "bad state")

    r("rename.dir_over_empty_dir", attempt(dir_over_empty))
    r("rename.enoent", err(os.rename, p("nope"), p("nope2")))

    def hardlinks() -> str:
        write_file(p("h1"), b"h")
        os.link(p("h1"), p("h2"))
        os.rename(p("h1"), p("h2"))  # same inode: POSIX says do nothing
        return verdict(os.path.exists(p("h1")) and os.path.exists(p("h2")) and
                       os.stat(p("h2")).st_nlink == 2, "a name vanished")

    r("rename.hardlinks_same_inode", attempt(hardlinks))

    def atomic() -> str:
        target = p("target")
        write_file(target, b"v-0000")
        rounds = 300
        r_, w_ = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r_)
                os.write(w_, b"g")
                for i in range(1, rounds + 1):
                    tmp = p("tmp")
                    write_file(tmp, b"v-%04d" % i)
                    os.rename(tmp, target)
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        os.close(w_)
        os.read(r_, 1)
        os.close(r_)
        missing = bad = reads = 0
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            try:
                data = read_file(target)
                reads += 1
                if len(data) != 6 or not data.startswith(b"v-"):
                    bad += 1
            except FileNotFoundError:
                missing += 1
            if done:
                break
        final = read_file(target)
        return verdict(missing == 0 and bad == 0 and status == 0 and final == b"v-%04d" % rounds,
                       f"missing={missing} torn={bad} status={status} final={final!r}")

    r("rename.atomic_replace", attempt(atomic))
    write_file(p("x1"), b"one")
    write_file(p("x2"), b"two")
    r("rename2.noreplace_exists", err(renameat2, p("x1"), p("x2"), RENAME_NOREPLACE))

    def noreplace_new() -> str:
        renameat2(p("x1"), p("x3"), RENAME_NOREPLACE)
        return verdict(read_file(p("x3")) == b"one" and not os.path.exists(p("x1")), "bad state")

    r("rename2.noreplace_new", attempt(noreplace_new))

    def exchange() -> str:
        renameat2(p("x2"), p("x3"), RENAME_EXCHANGE)
        a, b = read_file(p("x2")), read_file(p("x3"))
        return verdict(a == b"one" and b == b"two", f"x2={a!r} x3={b!r}")

    r("rename2.exchange", attempt(exchange))
    r("rename2.exchange_missing", err(renameat2, p("x2"), p("nope"), RENAME_EXCHANGE))

    def exchange_dir_file() -> str:
        os.mkdir(p("xd"))
        write_file(p("xd", "in"), b"in")
        renameat2(p("xd"), p("x2"), RENAME_EXCHANGE)
        return verdict(os.path.isdir(p("x2")) and read_file(p("x2", "in")) == b"in" and
                       read_file(p("xd")) == b"one", "bad state")

    r("rename2.exchange_dir_file", attempt(exchange_dir_file))


# ------------------------------------------------------------------------------------------
# sizes, sparse files, large offsets, fallocate, copy_file_range


@check("size")
def check_size(base: str, r: Report) -> None:
    d = os.path.join(base, "size")
    os.mkdir(d)
    f = os.path.join(d, "t")

    def shrink() -> str:
        write_file(f, b"0123456789")
        fd = os.open(f, os.O_RDWR)
        os.ftruncate(fd, 5)
        size = os.fstat(fd).st_size
        data = os.pread(fd, 100, 0)
        os.close(fd)
        return verdict(size == 5 and data == b"01234", f"size={size} data={data!r}")

    r("trunc.shrink", attempt(shrink))

    def extend() -> str:
        fd = os.open(f, os.O_RDWR)
        os.ftruncate(fd, 100)
        size = os.fstat(fd).st_size
        os.close(fd)
        drop_caches()
        data = read_file(f)
        return verdict(size == 100 and data == b"01234" + bytes(95), f"size={size}")

    r("trunc.extend_zero_fill", attempt(extend))

    def by_path() -> str:
        os.truncate(f, 3)
        return verdict(os.stat(f).st_size == 3 and read_file(f) == b"012", "bad")

    r("trunc.path", attempt(by_path))

    def past_eof() -> str:
        fd = os.open(f, os.O_RDWR)
        os.pwrite(fd, b"end", 1000)
        os.close(fd)
        data = read_file(f)
        return verdict(data == b"012" + bytes(997) + b"end", f"len={len(data)}")

    r("write.past_eof_zero_fill", attempt(past_eof))

    sp = os.path.join(d, "sparse")
    try:
        fd = os.open(sp, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, b"data", GIB)
        os.fsync(fd)
        st = os.fstat(fd)
        r("sparse.1g_size", verdict(st.st_size == GIB + 4, f"size={st.st_size}"))
        r("sparse.1g_seek_data", attempt(lambda: verdict(
            os.lseek(fd, 0, os.SEEK_DATA) == GIB, f"data_at={os.lseek(fd, 0, os.SEEK_DATA)}")))
        r("sparse.1g_seek_hole", attempt(lambda: verdict(
            os.lseek(fd, 0, os.SEEK_HOLE) == 0 and os.lseek(fd, GIB, os.SEEK_HOLE) == GIB + 4,
            f"hole_at={os.lseek(fd, 0, os.SEEK_HOLE)},{os.lseek(fd, GIB, os.SEEK_HOLE)}")))
        r("sparse.1g_blocks", verdict(st.st_blocks * 512 < (1 << 20), f"blocks={st.st_blocks}"))
        r("sparse.seek_data_at_eof", err(os.lseek, fd, GIB + 4, os.SEEK_DATA))
        os.close(fd)
    except OSError as e:
        for cid in ("sparse.1g_size", "sparse.1g_seek_data", "sparse.1g_seek_hole",
                    "sparse.1g_blocks", "sparse.seek_data_at_eof"):
            r(cid, errname(e.errno))

    def five_gib() -> str:
        big = os.path.join(d, "big")
        fd = os.open(big, os.O_RDWR | os.O_CREAT, 0o644)
        off = 5 * GIB + 123
        os.pwrite(fd, b"beyond 4 GiB", off)
        os.close(fd)
        drop_caches()
        fd = os.open(big, os.O_RDONLY)
        data = os.pread(fd, 12, off)
        before = os.pread(fd, 4, off - 4)
        size = os.fstat(fd).st_size
        os.close(fd)
        os.unlink(big)
        return verdict(data == b"beyond 4 GiB" and before == bytes(4) and size == off + 12,
                       f"data={data!r} size={size}")

    r("large.5g_pwrite_pread", attempt(five_gib))

    def posix_falloc() -> str:
        p = os.path.join(d, "pf")
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        os.posix_fallocate(fd, 0, 1 << 20)
        st = os.fstat(fd)
        data = os.pread(fd, 1 << 20, 0)
        os.close(fd)
        return verdict(st.st_size == 1 << 20 and data == bytes(1 << 20) and
                       st.st_blocks * 512 >= 1 << 20, f"size={st.st_size} blocks={st.st_blocks}")

    r("falloc.posix_fallocate", attempt(posix_falloc))

    def keep_size() -> str:
        p = os.path.join(d, "ks")
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 1 << 20)
        st = os.fstat(fd)
        os.close(fd)
        return verdict(st.st_size == 0 and st.st_blocks * 512 >= 1 << 20,
                       f"size={st.st_size} blocks={st.st_blocks}")

    r("falloc.keep_size", attempt(keep_size))

    ph = os.path.join(d, "punch")
    write_file(ph, b"x" * 65536)

    def punch() -> str:
        fd = os.open(ph, os.O_RDWR)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192)
        cached = os.pread(fd, 65536, 0)
        os.close(fd)
        drop_caches()
        data = read_file(ph)
        want = b"x" * 4096 + bytes(8192) + b"x" * (65536 - 12288)
        return verdict(cached == want and data == want,
                       f"cached_ok={cached == want} after_drop_ok={data == want}")

    r("falloc.punch_hole", attempt(punch))

    def punch_no_keep() -> str:
        fd = os.open(ph, os.O_RDWR)
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096)
        finally:
            os.close(fd)
        return "no-error"

    r("falloc.punch_without_keep_size", attempt(punch_no_keep))

    def zero_range() -> str:
        fd = os.open(ph, os.O_RDWR)
        try:
            fallocate(fd, FALLOC_FL_ZERO_RANGE, 0, 4096)
            data = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        return verdict(data == bytes(4096), "not zeroed")

    r("falloc.zero_range", attempt(zero_range))

    src = os.path.join(d, "cfr-src")
    content = pattern(200_000, 3)
    write_file(src, content)

    def cfr_whole() -> str:
        dst = os.path.join(d, "cfr-dst")
        fi = os.open(src, os.O_RDONLY)
        fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        left = len(content)
        while left:
            n = os.copy_file_range(fi, fo, left)
            if n == 0:
                break
            left -= n
        os.close(fi)
        os.close(fo)
        drop_caches()
        return verdict(read_file(dst) == content, f"left={left} len={len(read_file(dst))}")

    r("copy_file_range.whole", attempt(cfr_whole))

    def cfr_offsets() -> str:
        dst = os.path.join(d, "cfr-off")
        write_file(dst, b"y" * 1000)
        fi = os.open(src, os.O_RDONLY)
        fo = os.open(dst, os.O_WRONLY)
        n = os.copy_file_range(fi, fo, 10_000, 1000, 5000)
        os.close(fi)
        os.close(fo)
        want = b"y" * 1000 + bytes(4000) + content[1000:11_000]
        got = read_file(dst)
        return verdict(n == 10_000 and got == want, f"n={n} len={len(got)}")

    r("copy_file_range.offsets", attempt(cfr_offsets))


# ------------------------------------------------------------------------------------------
# times


@check("time")
def check_time(base: str, r: Report) -> None:
    d = os.path.join(base, "time")
    os.mkdir(d)
    f = os.path.join(d, "t")
    write_file(f, b"t")
    atime, mtime = 1_000_000_001_123_456_789, 1_100_000_000_987_654_321

    def exact() -> str:
        os.utime(f, ns=(atime, mtime))
        st = os.stat(f)
        drop_caches()
        st2 = os.stat(f)
        ok = (st.st_atime_ns, st.st_mtime_ns) == (st2.st_atime_ns, st2.st_mtime_ns) == (
            atime, mtime)
        return verdict(ok, f"atime_off={st2.st_atime_ns - atime} mtime_off="
                       f"{st2.st_mtime_ns - mtime}")

    r("time.utime_ns_exact", attempt(exact))

    def now() -> str:
        before = time.time_ns() - 5 * 10**9
        os.utime(f)
        st = os.stat(f)
        return verdict(st.st_mtime_ns > before and st.st_atime_ns > before, "not current")

    r("time.utime_now", attempt(now))

    def on_write() -> tuple[str, str]:
        os.utime(f, ns=(atime, mtime))
        c0 = os.stat(f).st_ctime_ns
        time.sleep(0.05)
        fd = os.open(f, os.O_WRONLY)
        os.write(fd, b"changed")
        os.fsync(fd)
        os.close(fd)
        st = os.stat(f)
        return (verdict(st.st_mtime_ns != mtime, "mtime unchanged"),
                verdict(st.st_ctime_ns > c0, "ctime unchanged"))

    try:
        m, c = on_write()
    except OSError as e:
        m = c = errname(e.errno)
    r("time.mtime_on_write", m)
    r("time.ctime_on_write", c)

    def on_chmod() -> str:
        c0 = os.stat(f).st_ctime_ns
        time.sleep(0.05)
        os.chmod(f, 0o600)
        return verdict(os.stat(f).st_ctime_ns > c0, "ctime unchanged")

    r("time.ctime_on_chmod", attempt(on_chmod))

    def dir_create() -> str:
        os.utime(d, ns=(atime, mtime))
        write_file(os.path.join(d, "new"), b"")
        return verdict(os.stat(d).st_mtime_ns != mtime, "dir mtime unchanged")

    r("time.dir_mtime_on_create", attempt(dir_create))

    def dir_unlink() -> str:
        os.utime(d, ns=(atime, mtime))
        os.unlink(os.path.join(d, "new"))
        return verdict(os.stat(d).st_mtime_ns != mtime, "dir mtime unchanged")

    r("time.dir_mtime_on_unlink", attempt(dir_unlink))


# ------------------------------------------------------------------------------------------
# permission bits, ownership, unprivileged callers


@check("perm")
def check_perm(base: str, r: Report) -> None:
    d = os.path.join(base, "perm")
    os.mkdir(d)
    os.chmod(d, 0o777)
    p = lambda *n: os.path.join(d, *n)  # noqa: E731
    old_umask = os.umask(0)
    try:
        write_file(p("m640"), b"", 0o640)
        r("perm.create_mode_umask0", attempt(lambda: omode(p("m640"))))
        os.umask(0o022)
        write_file(p("m644"), b"", 0o666)
        r("perm.create_mode_umask022", attempt(lambda: omode(p("m644"))))
        os.umask(0)
        r("perm.chmod_all_bits", attempt(lambda: (os.chmod(p("m640"), 0o7777),
                                                  omode(p("m640")))[1]))
        r("perm.mkdir_sticky", attempt(lambda: (os.mkdir(p("sticky"), 0o1777),
                                                omode(p("sticky")))[1]))
    finally:
        os.umask(old_umask)

    def chown_root() -> str:
        write_file(p("owned"), b"")
        os.chown(p("owned"), USER, USER + 1)
        st = os.stat(p("owned"))
        return f"{st.st_uid}:{st.st_gid}"

    r("perm.chown_root", attempt(chown_root))

    def chown_mode(mode: int) -> Callable[[], str]:
        def run() -> str:
            name = p(f"chown{mode:o}")
            write_file(name, b"x")
            os.chmod(name, mode)
            os.chown(name, USER, USER)
            return omode(name)

        return run

    r("perm.chown_clears_suid_sgid", attempt(chown_mode(0o6755)))
    r("perm.chown_keeps_sgid_without_gx", attempt(chown_mode(0o2644)))

    def root_write() -> str:
        write_file(p("suid-root"), b"x")
        os.chmod(p("suid-root"), 0o6777)
        fd = os.open(p("suid-root"), os.O_WRONLY)
        os.write(fd, b"y")
        os.close(fd)
        return omode(p("suid-root"))

    r("perm.write_by_root_keeps_suid", attempt(root_write))
    for name in ("suid-w", "suid-t"):
        write_file(p(name), b"x")
        os.chmod(p(name), 0o6777)

    # sgid directory inheritance (as root)
    def sgid_dir() -> tuple[str, str]:
        sd = p("sgid")
        os.mkdir(sd)
        os.chown(sd, 0, OTHER_GID)
        os.chmod(sd, 0o2777)
        write_file(os.path.join(sd, "f"), b"")
        os.mkdir(os.path.join(sd, "sub"))
        gf = os.stat(os.path.join(sd, "f")).st_gid
        sub = os.stat(os.path.join(sd, "sub"))
        return (verdict(gf == OTHER_GID and sub.st_gid == OTHER_GID, f"gids={gf},{sub.st_gid}"),
                verdict(bool(sub.st_mode & stat.S_ISGID), f"mode={oct(sub.st_mode)}"))

    try:
        g1, g2 = sgid_dir()
    except OSError as e:
        g1 = g2 = errname(e.errno)
    r("perm.sgid_dir_inherit_gid", g1)
    r("perm.sgid_dir_inherit_mode", g2)

    # fixtures for the unprivileged child
    write_file(p("sticky", "rootfile"), b"root")
    write_file(p("secret"), b"secret", 0o600)
    os.chmod(p("secret"), 0o600)
    os.mkdir(p("rodir"), 0o755)
    os.mkdir(p("private"), 0o700)
    write_file(p("private", "f"), b"")
    write_file(p("shared666"), b"", 0o666)
    os.chmod(p("shared666"), 0o666)
    write_file(p("ro644"), b"")
    os.chmod(p("ro644"), 0o644)
    write_file(p("sgidfile"), b"")
    os.chown(p("sgidfile"), USER, OTHER_GID)
    os.chmod(p("sgidfile"), 0o644)

    def unprivileged() -> dict[str, str]:
        out: dict[str, str] = {}

        def own_create() -> str:
            write_file(p("byuser"), b"u")
            st = os.stat(p("byuser"))
            return verdict((st.st_uid, st.st_gid) == (USER, USER), f"{st.st_uid}:{st.st_gid}")

        out["perm.create_owner_unpriv"] = attempt(own_create)

        def write_clear() -> str:
            fd = os.open(p("suid-w"), os.O_WRONLY)
            os.write(fd, b"z")
            os.close(fd)
            return omode(p("suid-w"))

        out["perm.write_by_nonowner_clears_suid"] = attempt(write_clear)
        out["perm.truncate_by_nonowner_clears_suid"] = attempt(
            lambda: (os.truncate(p("suid-t"), 0), omode(p("suid-t")))[1])
        out["perm.sticky_unlink_other"] = err(os.unlink, p("sticky", "rootfile"))
        out["perm.sticky_rename_other"] = err(os.rename, p("sticky", "rootfile"),
                                              p("sticky", "stolen"))

        def own_sticky() -> str:
            write_file(p("sticky", "mine"), b"")
            os.unlink(p("sticky", "mine"))
            return verdict(not os.path.exists(p("sticky", "mine")), "still there")

        out["perm.sticky_unlink_own"] = attempt(own_sticky)
        out["perm.eacces_read"] = err(os.open, p("secret"), os.O_RDONLY)

        def own_ro() -> str:
            write_file(p("myro"), b"", 0o444)
            return err(os.open, p("myro"), os.O_WRONLY)

        out["perm.eacces_write_own_readonly"] = attempt(own_ro)
        out["perm.eacces_create_in_ro_dir"] = err(
            os.open, p("rodir", "x"), os.O_CREAT | os.O_WRONLY, 0o644)
        out["perm.eacces_search"] = err(os.stat, p("private", "f"))
        out["perm.eperm_chmod_other"] = err(os.chmod, p("ro644"), 0o777)
        out["perm.eperm_chown_to_root"] = err(os.chown, p("byuser"), 0, 0)
        out["perm.eperm_utime_explicit_other"] = err(os.utime, p("shared666"), ns=(1, 1))
        out["perm.utime_now_writable_other"] = attempt(
            lambda: (os.utime(p("shared666")), "ok")[1])
        out["perm.eacces_utime_now_readonly_other"] = err(os.utime, p("ro644"))
        out["perm.chmod_sgid_nonmember_cleared"] = attempt(
            lambda: (os.chmod(p("sgidfile"), 0o2755), omode(p("sgidfile")))[1])
        return out

    result = in_child(unprivileged, unprivileged=True)
    if isinstance(result, dict):
        for k, v in result.items():
            r(k, v)
    else:
        r("perm.unprivileged_child", str(result))


# ------------------------------------------------------------------------------------------
# names


@check("names")
def check_names(base: str, r: Report) -> None:
    d = os.path.join(base, "names")
    os.mkdir(d)
    created: set[bytes] = set()

    def make(name: str | bytes) -> str:
        raw = name if isinstance(name, bytes) else os.fsencode(name)
        path = os.path.join(os.fsencode(d), raw)
        write_file(path, raw)
        created.add(raw)
        listed = raw in os.listdir(os.fsencode(d))
        st = os.stat(path)
        return verdict(listed and st.st_size == len(raw) and read_file(path) == raw,
                       f"listed={listed} size={st.st_size}")

    r("names.utf8", attempt(lambda: make("héllo wörld ☃ 日本語 ü")))
    r("names.space_newline_tab", attempt(lambda: make(" lead and trail \n nl\ttab ")))
    r("names.255_ascii", attempt(lambda: make("a" * 255)))
    r("names.255_utf8", attempt(lambda: make("é" * 127 + "x")))
    r("names.256_utf8", err(os.open, os.path.join(d, "é" * 128), os.O_CREAT | os.O_WRONLY,
                            0o644))
    r("names.all_bytes", attempt(lambda: make(ALL_BYTES_NAME)))

    def dots() -> str:
        results = [make(n) for n in ("...", ".hidden", "..x", "-dash", "~tilde", "*?[]")]
        return verdict(all(x == "ok" for x in results), ",".join(results))

    r("names.dots", attempt(dots))
    r("names.listing_exact", attempt(lambda: verdict(
        set(os.listdir(os.fsencode(d))) == created,
        f"extra={len(set(os.listdir(os.fsencode(d))) - created)} "
        f"missing={len(created - set(os.listdir(os.fsencode(d))))}")))


# ------------------------------------------------------------------------------------------
# readdir


@check("readdir")
def check_readdir(base: str, r: Report) -> None:
    d = os.path.join(base, "readdir")
    os.mkdir(d)
    keep = {f"keep-{i:03d}-{'k' * (i % 40)}" for i in range(300)}
    for name in keep:
        write_file(os.path.join(d, name), b"")
    r("readdir.300_entries", attempt(lambda: verdict(
        sorted(os.listdir(d)) == sorted(keep), f"count={len(os.listdir(d))}")))

    def churn() -> str:
        seen: list[str] = []
        made: list[str] = []
        serial = 0
        for _round in range(3):
            seen.clear()
            with os.scandir(d) as it:
                for i, entry in enumerate(it):
                    seen.append(entry.name)
                    if i % 7 == 0:
                        name = f"churn-{serial:04d}"
                        serial += 1
                        write_file(os.path.join(d, name), b"")
                        made.append(name)
                        if len(made) > 5:
                            os.unlink(os.path.join(d, made.pop(0)))
            kept = [n for n in seen if n.startswith("keep-")]
            missing = keep - set(kept)
            dups = len(kept) - len(set(kept))
            if missing or dups:
                return f"round={_round} missing={len(missing)} duplicated={dups}"
        for name in made:
            os.unlink(os.path.join(d, name))
        return "ok"

    r("readdir.churn_no_loss_no_dup", attempt(churn))

    def seek_tell() -> str:
        dirp = _libc.opendir(d.encode())
        if not dirp:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        try:
            first = read_dir_names(dirp, 100)
            pos = _libc.telldir(dirp)
            second = read_dir_names(dirp, 60)
            _libc.seekdir(dirp, pos)
            again = read_dir_names(dirp, 60)
            _libc.seekdir(dirp, 0)
            rewound = read_dir_names(dirp, 100)
        finally:
            _libc.closedir(dirp)
        return verdict(len(second) == 60 and second == again and rewound == first,
                       f"second={len(second)} again_equal={second == again} "
                       f"rewound_equal={rewound == first}")

    r("readdir.seekdir_telldir", attempt(seek_tell))


# ------------------------------------------------------------------------------------------
# xattrs


@check("xattr")
def check_xattr(base: str, r: Report) -> None:
    f = os.path.join(base, "xattr-file")
    write_file(f, b"")
    r("xattr.set", attempt(lambda: (os.setxattr(f, "user.conformance", b"value"), "ok")[1]))
    r("xattr.get", attempt(lambda: verdict(
        os.getxattr(f, "user.conformance") == b"value", "wrong value")))
    r("xattr.list", attempt(lambda: verdict(
        "user.conformance" in os.listxattr(f), ",".join(os.listxattr(f)) or "empty")))


# ------------------------------------------------------------------------------------------
# locks between two guest processes


def _flock_struct(ltype: int, start: int, length: int) -> bytes:
    return struct.pack("hhxxxxqqi4x", ltype, os.SEEK_SET, start, length, 0)


def setlk(fd: int, ltype: int, start: int, length: int, wait: bool = False) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETLKW if wait else fcntl.F_SETLK,
                _flock_struct(ltype, start, length))


@check("lock")
def check_lock(base: str, r: Report) -> None:
    import fcntl

    f = os.path.join(base, "lockfile")
    write_file(f, b"x" * 1000)
    parent = os.getpid()

    def child_flock(flags: int) -> str:
        fd = os.open(f, os.O_RDWR)
        try:
            fcntl.flock(fd, flags)
            return "ok"
        finally:
            os.close(fd)

    def child_setlk(ltype: int, start: int, length: int) -> str:
        cfd = os.open(f, os.O_RDWR)
        try:
            setlk(cfd, ltype, start, length)
            return "ok"
        finally:
            os.close(cfd)

    fd = os.open(f, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r("lock.flock_exclusive", in_child(lambda: child_flock(fcntl.LOCK_EX | fcntl.LOCK_NB)))
        r("lock.flock_fcntl_independent", in_child(
            lambda: child_setlk(fcntl.F_WRLCK, 0, 10)))
        # flock locks belong to the open file description: shared with a child through an
        # inherited descriptor, but a second open() in the same process conflicts
        r("lock.flock_inherited_fd_shared", in_child(
            lambda: (fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), "ok")[1]))

        def second_open() -> str:
            fd2 = os.open(f, os.O_RDWR)
            try:
                fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return "no-error"
            finally:
                os.close(fd2)

        r("lock.flock_two_fds_same_process", attempt(second_open))
        fcntl.flock(fd, fcntl.LOCK_SH)
        r("lock.flock_shared", in_child(lambda: child_flock(fcntl.LOCK_SH | fcntl.LOCK_NB)))
        fcntl.flock(fd, fcntl.LOCK_UN)
        r("lock.flock_after_release", in_child(lambda: child_flock(fcntl.LOCK_EX | fcntl.LOCK_NB)))
    except OSError as e:
        r("lock.flock_exclusive", errname(e.errno))
    finally:
        os.close(fd)

    def child_getlk() -> str:
        cfd = os.open(f, os.O_RDWR)
        try:
            out = fcntl.fcntl(cfd, fcntl.F_GETLK, _flock_struct(fcntl.F_WRLCK, 50, 10))
        finally:
            os.close(cfd)
        ltype, _whence, start, length, pid = struct.unpack("hhxxxxqqi4x", out)
        who = "parent" if pid == parent else ("none" if pid == 0 else f"other({pid})")
        ok = ltype == fcntl.F_WRLCK and (start, length) == (0, 100) and who == "parent"
        return verdict(ok, f"type={ltype} start={start} len={length} pid={who}")

    fd = os.open(f, os.O_RDWR)
    try:
        setlk(fd, fcntl.F_WRLCK, 0, 100)
        r("lock.fcntl_exclusive", in_child(lambda: child_setlk(fcntl.F_WRLCK, 50, 10)))
        r("lock.fcntl_other_range", in_child(lambda: child_setlk(fcntl.F_WRLCK, 200, 100)))
        r("lock.fcntl_getlk", in_child(child_getlk))
        setlk(fd, fcntl.F_RDLCK, 0, 100)
        r("lock.fcntl_read_shared", in_child(lambda: child_setlk(fcntl.F_RDLCK, 0, 100)))
        setlk(fd, fcntl.F_WRLCK, 0, 100)

        def waiter() -> str:
            # tell the parent we are about to block, then wait for the lock (bounded)
            cfd = os.open(f, os.O_RDWR)
            signal.signal(signal.SIGALRM, lambda *_: None)
            signal.alarm(30)
            try:
                os.write(ready_w, b"w")
                setlk(cfd, fcntl.F_WRLCK, 0, 100, wait=True)
                return "ok"
            finally:
                signal.alarm(0)
                os.close(cfd)

        ready_r, ready_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(res_w, attempt(waiter).encode())
            finally:
                os._exit(0)
        os.close(res_w)
        os.read(ready_r, 1)
        time.sleep(0.5)
        setlk(fd, fcntl.F_UNLCK, 0, 100)
        result = os.read(res_r, 100).decode() or "child-died"
        os.waitpid(pid, 0)
        for x in (ready_r, ready_w, res_r):
            os.close(x)
        r("lock.fcntl_wait_then_acquire", result)

        # POSIX locks belong to the process: a second fd of the same process may take an
        # overlapping lock; a child is another owner even on the inherited descriptor
        setlk(fd, fcntl.F_WRLCK, 0, 100)
        fd2 = os.open(f, os.O_RDWR)
        r("lock.fcntl_same_process_two_fds",
          attempt(lambda: (setlk(fd2, fcntl.F_WRLCK, 50, 10), "ok")[1]))
        r("lock.fcntl_inherited_fd_not_shared", in_child(
            lambda: (setlk(fd, fcntl.F_WRLCK, 50, 10), "ok")[1]))
        os.close(fd2)

        # POSIX: closing ANY fd of the file releases the process's locks on it
        setlk(fd, fcntl.F_WRLCK, 0, 100)
        other = os.open(f, os.O_RDONLY)
        os.close(other)
        r("lock.fcntl_close_any_fd_releases", in_child(
            lambda: child_setlk(fcntl.F_WRLCK, 0, 100)))
    except OSError as e:
        r("lock.fcntl_exclusive", errname(e.errno))
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------
# O_TMPFILE


@check("tmpfile")
def check_tmpfile(base: str, r: Report) -> None:
    d = os.path.join(base, "tmpfile")
    os.mkdir(d)
    try:
        fd = os.open(d, O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as e:
        for cid in ("tmpfile.open", "tmpfile.nlink0", "tmpfile.linkat",
                    "tmpfile.linkat_empty_path"):
            r(cid, errname(e.errno))
        return
    r("tmpfile.open", "ok")
    try:
        os.write(fd, b"anonymous")
        r("tmpfile.nlink0", attempt(lambda: verdict(
            os.fstat(fd).st_nlink == 0 and os.listdir(d) == [], "visible or linked")))

        def link() -> str:
            # linkat(AT_SYMLINK_FOLLOW) on the magic link, as open(2) shows (Python's
            # os.link(follow_symlinks=True) calls link(2), which would link the /proc symlink)
            target = os.path.join(d, "named")
            linkat(AT_FDCWD, f"/proc/self/fd/{fd}", AT_FDCWD, target, AT_SYMLINK_FOLLOW)
            data = read_file(target)
            return verdict(data == b"anonymous" and os.stat(target).st_nlink == 1 and
                           os.listdir(d) == ["named"], f"data={data!r}")

        r("tmpfile.linkat", attempt(link))

        def link_empty_path() -> str:
            # a second name for the same (now linked) file through linkat(fd, "", AT_EMPTY_PATH)
            target = os.path.join(d, "named2")
            linkat(fd, "", AT_FDCWD, target, AT_EMPTY_PATH)
            return verdict(read_file(target) == b"anonymous" and
                           os.stat(target).st_nlink == 2, "bad state")

        r("tmpfile.linkat_empty_path", attempt(link_empty_path))
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------
# mmap


@check("mmap")
def check_mmap(base: str, r: Report) -> None:
    d = os.path.join(base, "mmap")
    os.mkdir(d)
    f = os.path.join(d, "m")
    size = 65536
    write_file(f, bytes(size))
    want = pattern(size, 11)

    def shared() -> str:
        fd = os.open(f, os.O_RDWR)
        try:
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        m[:] = want
        m.flush()
        m.close()
        drop_caches()
        data = read_file(f)
        same = sum(a == b for a, b in zip(data, want, strict=False))
        return verdict(data == want, f"equal_bytes={same}")

    r("mmap.shared_write_drop_caches", attempt(shared))

    def private() -> str:
        write_file(f, want)
        fd = os.open(f, os.O_RDWR)
        try:
            m = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        m[:100] = b"P" * 100
        seen = m[:100]
        m.close()
        drop_caches()
        return verdict(seen == b"P" * 100 and read_file(f) == want, "private write leaked")

    r("mmap.private_not_written", attempt(private))

    def sees_write() -> str:
        fd = os.open(f, os.O_RDWR)
        try:
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            os.pwrite(fd, b"W" * 10, 1000)
            seen = m[1000:1010]
            m.close()
        finally:
            os.close(fd)
        return verdict(seen == b"W" * 10, f"seen={seen!r}")

    r("mmap.sees_write", attempt(sees_write))


# ------------------------------------------------------------------------------------------
# special files, sync, statvfs


@check("misc")
def check_misc(base: str, r: Report) -> None:
    d = os.path.join(base, "misc")
    os.mkdir(d)
    r("mknod.fifo", attempt(lambda: (os.mkfifo(os.path.join(d, "fifo")), verdict(
        stat.S_ISFIFO(os.lstat(os.path.join(d, "fifo")).st_mode), "not a fifo"))[1]))

    def chardev() -> str:
        p = os.path.join(d, "null")
        os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        st = os.lstat(p)
        return verdict(stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3),
                       f"mode={oct(st.st_mode)} rdev={st.st_rdev}")

    r("mknod.chardev", attempt(chardev))

    def unix_socket() -> str:
        import socket

        p = os.path.join(d, "sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(p)
        return verdict(stat.S_ISSOCK(os.lstat(p).st_mode), "not a socket")

    r("mknod.unix_socket", attempt(unix_socket))

    def syncs() -> str:
        p = os.path.join(d, "sync")
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"sync")
            os.fsync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return "ok"

    r("sync.fsync_fdatasync", attempt(syncs))
    r("statvfs.namemax", attempt(lambda: str(os.statvfs(d).f_namemax)))


# ------------------------------------------------------------------------------------------


def run(base: str, groups: set[str] | None = None) -> int:
    os.makedirs(base, exist_ok=True)
    os.chmod(base, 0o755)
    count = 0

    def report(cid: str, result: str) -> None:
        nonlocal count
        count += 1
        text = str(result).replace("\n", "\\n")
        print(f"{cid} {text}", flush=True)

    for group, fn in CHECKS:
        if groups is not None and group not in groups:
            continue
        try:
            fn(base, report)
        except OSError as e:
            report(f"{group}.CRASHED", errname(e.errno))
        except Exception as e:  # noqa: BLE001 - keep going, the diff will show it
            report(f"{group}.CRASHED", f"{type(e).__name__}:{e}")
    return count


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--only", help="comma-separated groups")
    ap.add_argument("--fsx", type=int, default=0, help="also run fsx with this many ops")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    groups = set(args.only.split(",")) if args.only else None
    started = time.monotonic()
    n = run(os.path.join(args.dir, "posix"), groups)
    print(f"@@SUITE-END checks={n} seconds={time.monotonic() - started:.1f}", flush=True)
    if args.fsx:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import fsx  # the sibling module, also stdlib-only

        fsx.main([os.path.join(args.dir, "fsx"), "--ops", str(args.fsx), "--seed",
                  str(args.seed)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
