"""Creating workers that share the supervisor's fd table.

``os.fork`` cannot ask for CLONE_FILES, so the clone happens in C and CPython's own fork
bookkeeping (PyOS_BeforeFork / AfterFork_*) is run around it, as os.fork would.
"""

from __future__ import annotations

import ctypes
import os

from daemon.native._sys import lib

_before = ctypes.pythonapi.PyOS_BeforeFork
_after_parent = ctypes.pythonapi.PyOS_AfterFork_Parent
_after_child = ctypes.pythonapi.PyOS_AfterFork_Child


def clone_shared_fds(sibling: bool = False) -> int:
    """Like os.fork(), but parent and child keep one fd table: an fd either opens or
    closes is opened or closed for both. Returns 0 in the child, the child's pid in the
    caller. With ``sibling`` the child is the caller's parent's child (CLONE_PARENT).
    Call it only while the process has a single thread."""
    _before()
    pid = lib.pyvfs_clone_sibling() if sibling else lib.pyvfs_clone_files()
    if pid == 0:
        _after_child()
        return 0
    err = lib.pyvfs_errno()
    _after_parent()
    if pid < 0:
        raise OSError(err, os.strerror(err))
    return pid


def name_process(name: str) -> None:
    """Set the calling thread's name (/proc/PID/comm, what top and ps show), so an
    operator and the memory benchmark can tell the workers' queues apart; at most 15
    bytes are kept."""
    lib.pyvfs_set_name(name.encode()[:15])
