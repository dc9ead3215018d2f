"""The fd directory through which an inode's O_PATH fd is reopened by the name of its
number (a magic link: it resolves to the inode itself, and nothing the guest sends is part
of the name).

Outside a sandbox that is ``/proc/self/fd`` of the calling process. In the sandbox /proc
is out of sight, so the server keeps a directory fd of its fd directory (opened by
``daemon.host.sandbox``, handed here by the supervisor with :func:`use_fd_directory`);
the server's working directory stays its root (the share).
"""

from __future__ import annotations

import errno
import os
import stat

# -1: /proc/self/fd of the calling process; else a directory fd of the server's fd
# directory. Read it as ``proc_fd.PROC_DIR_FD`` (a name imported from here would not see
# the change).
PROC_DIR_FD = -1
FDINFO_DIR_FD = -1  # likewise /proc/self/fdinfo (read only by live migration)


def use_fd_directory(fd: int, fdinfo: int = -1) -> None:
    """Reopen fds through ``fd`` (the sandboxed server's fd directory) from now on, so the
    host layer that opened it need not reach up into the file system; ``fdinfo``: its
    fdinfo directory."""
    global PROC_DIR_FD, FDINFO_DIR_FD
    PROC_DIR_FD = fd
    FDINFO_DIR_FD = fdinfo


def read_fdinfo(fd: int) -> str:
    """The fdinfo text of ``fd`` (its flags, and a ``lock:`` line per lock it holds)."""
    if PROC_DIR_FD < 0:
        path, dir_fd = f"/proc/self/fdinfo/{fd}", None
    elif FDINFO_DIR_FD < 0:
        raise OSError(errno.ENOENT, "no fdinfo directory in this sandbox")
    else:
        path, dir_fd = str(fd), FDINFO_DIR_FD
    info = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(info, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks).decode("ascii", "replace")
    finally:
        os.close(info)


# The fd directory as a directory fd for the C path (daemon/native/fuse_meta.c reopens
# fds by number under it: one path component instead of /proc/self/fd/N's five, about a
# microsecond of an OPEN or SETATTR). Opened once by the supervisor (fd_directory_fd),
# before its first worker clone: supervisor and workers share one fd table, so its
# listing is every worker's too.
_DIR_FD_FOR_C = -1


def fd_directory_fd() -> int:
    """A directory fd of the fd directory: the sandbox's (``PROC_DIR_FD``), or
    /proc/self/fd opened on first call (-1 if it cannot be: C then uses the path)."""
    global _DIR_FD_FOR_C
    if PROC_DIR_FD >= 0:
        return PROC_DIR_FD
    if _DIR_FD_FOR_C < 0:
        try:
            _DIR_FD_FOR_C = os.open("/proc/self/fd",
                                    os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return -1
    return _DIR_FD_FOR_C


def proc_name(fd: int) -> tuple[str, int | None]:
    """The name and dir_fd that reach ``fd``'s file through the fd directory."""
    if PROC_DIR_FD < 0:
        return f"/proc/self/fd/{fd}", None
    return str(fd), PROC_DIR_FD


def proc_open(fd: int, flags: int, mode: int = 0o777) -> int:
    """Open ``fd``'s file anew with ``flags`` (close-on-exec). Callers check the file type
    first (:func:`openable`): this follows the magic link to whatever the inode is."""
    path, dir_fd = proc_name(fd)
    return os.open(path, flags | os.O_CLOEXEC, mode, dir_fd=dir_fd)


def openable(mode: int) -> bool:
    """Only regular files and directories are ever opened by the daemon (virtiofsd's
    is_safe_inode): opening a FIFO can block the worker for ever, and a device node the
    guest made with MKNOD would hand it the host's device."""
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)
