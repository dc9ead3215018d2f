"""FUSE wire format (protocol 7.38, ``linux/fuse.h``): opcodes, flags and struct codecs.

Pure data: no file system or guest-memory access happens here, so the codecs can be
tested and fuzzed on their own.
"""

from __future__ import annotations

import enum
import os
import struct

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 38
MIN_KERNEL_MINOR_VERSION = 27
ROOT_ID = 1
MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
MAX_BACKGROUND = 0xFFFF
CONGESTION_THRESHOLD = MAX_BACKGROUND * 3 // 4


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


# INIT flags
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
POSIX_ACL = 1 << 20
MAX_PAGES_FLAG = 1 << 22
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
SECURITY_CTX = 1 << 32

# open_out flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3

# setattr valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_KILL_SUIDGID = 1 << 11

GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")
IN_HEADER_SIZE = IN_HEADER.size  # 40
OUT_HEADER_SIZE = OUT_HEADER.size  # 16

ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # 88 bytes
ENTRY_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsec nsec
ENTRY_OUT_SIZE = ENTRY_HEAD.size + ATTR.size  # 128
ATTR_OUT_HEAD = struct.Struct("<QII")
INIT_IN = struct.Struct("<IIIII")  # major minor max_readahead flags flags2
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
OPEN_OUT = struct.Struct("<QII")
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<QIIQ")
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = struct.Struct("<QQIIQII")
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
FSYNC_IN = struct.Struct("<QII")
ACCESS_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
DIRENT_HEAD = struct.Struct("<QQII")  # ino off namelen type
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("<QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("<Q")
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")  # fh_in off_in nodeid_out fh_out off_out len flags
SETXATTR_IN = struct.Struct("<IIII")  # size flags setxattr_flags padding (8 bytes without EXT)
SETXATTR_IN_COMPAT = struct.Struct("<II")
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
SYNCFS_IN = struct.Struct("<Q")
FILE_LOCK = struct.Struct("<QQII")  # start end type pid
LK_IN = struct.Struct("<QQQQIIII")  # fh owner lk(start end type pid) lk_flags padding
LK_OUT = FILE_LOCK
LK_FLOCK = 1 << 0
OFFSET_MAX = (1 << 63) - 1
ATTR_SUBMOUNT = 1 << 0


class FuseError(Exception):
    """A request that is malformed on the wire (the reply is an errno, the worker lives)."""

    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_value


def encode_dev(rdev: int) -> int:
    """The lower 32 bits of glibc's dev_t encoding are the kernel's new_encode_dev."""
    return rdev & 0xFFFFFFFF


def pack_attr_into(buf: bytearray | memoryview, offset: int, st: os.stat_result) -> None:
    ATTR.pack_into(
        buf,
        offset,
        st.st_ino,
        st.st_size,
        st.st_blocks,
        st.st_atime_ns // 1_000_000_000,
        st.st_mtime_ns // 1_000_000_000,
        st.st_ctime_ns // 1_000_000_000,
        st.st_atime_ns % 1_000_000_000,
        st.st_mtime_ns % 1_000_000_000,
        st.st_ctime_ns % 1_000_000_000,
        st.st_mode,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        encode_dev(st.st_rdev),
        st.st_blksize,
        0,
    )


def pack_entry_into(
    buf: bytearray | memoryview,
    offset: int,
    nodeid: int,
    st: os.stat_result,
    entry_valid: tuple[int, int],
    attr_valid: tuple[int, int],
    attr_flags: int = 0,
) -> None:
    ENTRY_HEAD.pack_into(
        buf, offset, nodeid, 0, entry_valid[0], attr_valid[0], entry_valid[1], attr_valid[1]
    )
    pack_attr_into(buf, offset + ENTRY_HEAD.size, st)
    if attr_flags:
        struct.pack_into("<I", buf, offset + ENTRY_OUT_SIZE - 4, attr_flags)


def entry_out(
    nodeid: int, st: os.stat_result, entry_valid: tuple[int, int], attr_valid: tuple[int, int]
) -> bytearray:
    buf = bytearray(ENTRY_OUT_SIZE)
    pack_entry_into(buf, 0, nodeid, st, entry_valid, attr_valid)
    return buf


def negative_entry_out(entry_valid: tuple[int, int]) -> bytearray:
    """A LOOKUP answer with nodeid 0: the guest caches the name's absence."""
    buf = bytearray(ENTRY_OUT_SIZE)
    ENTRY_HEAD.pack_into(buf, 0, 0, 0, entry_valid[0], 0, entry_valid[1], 0)
    return buf


def attr_out(st: os.stat_result, attr_valid: tuple[int, int]) -> bytearray:
    buf = bytearray(ATTR_OUT_HEAD.size + ATTR.size)
    ATTR_OUT_HEAD.pack_into(buf, 0, attr_valid[0], attr_valid[1], 0)
    pack_attr_into(buf, ATTR_OUT_HEAD.size, st)
    return buf


def dirent_size(namelen: int) -> int:
    return (DIRENT_HEAD.size + namelen + 7) & ~7


def direntplus_size(namelen: int) -> int:
    return (ENTRY_OUT_SIZE + DIRENT_HEAD.size + namelen + 7) & ~7


def split_name(data: bytes | memoryview, what: str = "name") -> tuple[bytes, int]:
    """First NUL-terminated string in data: (name, bytes consumed incl. the NUL)."""
    raw = bytes(data)
    end = raw.find(b"\0")
    if end < 0:
        raise FuseError(22, f"{what} is not NUL-terminated")
    return raw[:end], end + 1


# ----- options of virtiofsd 1.13 that need more of the protocol ------------------------
# FUSE 7.39: the guest may mmap(MAP_SHARED) files opened with FOPEN_DIRECT_IO
# (not in the 7.38 headers of this host)
DIRECT_IO_ALLOW_MMAP = 1 << 36
WRITE_KILL_SUIDGID = 1 << 2  # write_in.write_flags
OPEN_KILL_SUIDGID = 1 << 0  # open_in / create_in open_flags
SETXATTR_ACL_KILL_SGID = 1 << 0  # setxattr_in.setxattr_flags
EXT_HEADER = struct.Struct("<II")  # fuse_ext_header: size (incl. header), type
EXT_SUPP_GROUPS = 32  # extension types 0..31 are a security context with that many entries
SECCTX = struct.Struct("<II")  # fuse_secctx: size, padding
ATTR_UID_OFFSET = 68  # uid, then gid, inside struct fuse_attr
ATTR_IDS = struct.Struct("<II")


def set_attr_ids(buf: bytearray | memoryview, attr_offset: int, uid: int, gid: int) -> None:
    """Overwrite the owner of an already packed fuse_attr (translated ids)."""
    ATTR_IDS.pack_into(buf, attr_offset + ATTR_UID_OFFSET, uid, gid)


def parse_extensions(data: bytes) -> list[tuple[int, bytes]]:
    """The request extensions after the arguments: (type, body) each, as the header's
    total_extlen announces them (each padded to 8 bytes)."""
    out = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < EXT_HEADER.size:
            raise FuseError(22, "truncated extension header")
        size, kind = EXT_HEADER.unpack_from(data, pos)
        if size < EXT_HEADER.size or pos + size > len(data):
            raise FuseError(22, f"extension of {size} bytes does not fit")
        out.append((kind, data[pos + EXT_HEADER.size : pos + size]))
        pos += (size + 7) & ~7
    return out


def parse_security_context(nr_secctx: int, body: bytes) -> tuple[bytes, bytes] | None:
    """(xattr name, value) of the one security context the guest kernel sends with a
    create; None when it sends none (no LSM labels this file)."""
    if nr_secctx == 0:
        return None
    if nr_secctx > 1:
        raise FuseError(22, f"{nr_secctx} security contexts (only one is supported)")
    if len(body) < SECCTX.size:
        raise FuseError(22, "truncated security context")
    size, _ = SECCTX.unpack_from(body)
    rest = body[SECCTX.size :]
    end = rest.find(b"\0")
    if size == 0 or end <= 0 or len(rest) - end - 1 < size:
        raise FuseError(22, "malformed security context")
    return rest[:end], rest[end + 1 : end + 1 + size]
