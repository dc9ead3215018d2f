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


def clone_sibling_bare() -> int:
    """``clone_shared_fds(sibling=True)`` without CPython's fork bookkeeping, for a
    process that has one thread and never clones while that thread holds a lock of the
    interpreter's (the workers' template, which clones only from its own loop): the
    child then has nothing to repair. Why: PyOS_AfterFork_Child re-creates the
    interpreter's locks and runs every after-fork hook (random's reseed among them), and
    PyOS_BeforeFork and AfterFork_Parent take and release the import lock in the parent;
    with the ctypes calls that wrap them that wrote ~0.2 MB of pages the clone shared
    with its parent, copied into every worker. Returns 0 in the child."""
    pid = lib.pyvfs_clone_sibling()
    if pid < 0:
        err = lib.pyvfs_errno()
        raise OSError(err, os.strerror(err))
    return pid
