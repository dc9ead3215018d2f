"""The lock word holds the caller's TID, cached without a syscall: the cache must never be
stale, in threads, after os.fork, and after a raw clone(CLONE_FILES|SIGCHLD) like the
supervisor's (which copies TLS and runs no at-fork handler)."""

from __future__ import annotations

import ctypes
import os
import threading

from shm_table._native import lib

CLONE_FILES = 0x400
SIGCHLD = 17
SYS_clone = 56  # x86-64
SYS_gettid = 186


def test_tid_in_threads() -> None:
    assert lib.seg_my_tid() == threading.get_native_id()
    got: list[tuple[int, int]] = []

    def f() -> None:
        got.append((lib.seg_my_tid(), threading.get_native_id()))

    threads = [threading.Thread(target=f) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a == b for a, b in got) and len({a for a, _ in got}) == 4


def test_tid_after_fork() -> None:
    lib.seg_my_tid()  # prime the cache
    pid = os.fork()
    if pid == 0:
        os._exit(0 if lib.seg_my_tid() == os.getpid() else 1)
    assert os.waitpid(pid, 0)[1] == 0


def test_tid_after_raw_clone() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    assert lib.seg_my_tid() == os.getpid()  # prime the cache
    pid = libc.syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0)
    assert pid >= 0, ctypes.get_errno()
    if pid == 0:
        ok = lib.seg_my_tid() == libc.syscall(SYS_gettid)
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert lib.seg_my_tid() == os.getpid()
