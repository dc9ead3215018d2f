"""Fixtures for the shared-table tests: fresh segments with unique names and real fds.

Every table a test makes gets a real root fd (an O_PATH fd on the test's directory).  At
teardown the fixture plays the guest's DESTROY (every lookup and open forgotten), then
checks what must hold after any test: no pin left, no orphaned fd left unclaimed, the
consistency check passes, no fd closed twice (the plugs), and this process's fd table is
exactly what it was before the test: every fd an entry owned was closed.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ensure_native() -> None:
    """Build the extensions in place when they are missing (fresh checkout)."""
    try:
        importlib.import_module("shm_table._native")
        importlib.import_module("daemon.native._sys")
    except ImportError:
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                       check=True, cwd=ROOT)


_ensure_native()

from realfds import Files, Ids, open_fds  # noqa: E402

from shm_table import HandleTable, InodeTable  # noqa: E402

U64 = (1 << 64) - 1


def unique_name(tag: str) -> str:
    return f"/pyvfs-test-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def destroy(table: InodeTable | HandleTable) -> None:
    """The guest's DESTROY: every lookup forgotten, every open file released."""
    if isinstance(table, InodeTable):
        for e in list(table.iter_entries()):
            table.forget(e.nodeid, U64)
    else:
        for h in list(table.iter_handles()):
            table.close(h.fh)


def assert_quiet(table: InodeTable | HandleTable) -> None:
    """No pin held, nothing dying, no orphan waiting, every invariant in place."""
    assert table.pins_held() == 0
    assert table.stats()["dying"] == 0
    assert table.take_orphaned_fds() == []
    table.check()


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Files]:
    f = Files(tmp_path)
    yield f
    f.close()


class Tables:
    """Makes tables for one test and checks them at teardown (see the module docstring)."""

    def __init__(self, files: Files) -> None:
        self.files = files
        self.fds_before = open_fds()
        self.made: list[InodeTable | HandleTable] = []
        self.root_fds: list[int] = []

    def inode(self, capacity: int = 64, root: bool = True) -> InodeTable:
        t = InodeTable.create(unique_name("it"), capacity)
        self.made.append(t)
        if root:
            fd = os.open(self.files.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self.root_fds.append(fd)
            st = os.fstat(fd)
            t.insert_root((st.st_ino, st.st_dev, 0), fd, 0o40755)
        return t

    def handles(self, capacity: int = 16) -> HandleTable:
        h = HandleTable.create(unique_name("ht"), capacity)
        self.made.append(h)
        return h

    def root_ids(self) -> Ids:
        st = os.stat(self.files.root)
        return (st.st_ino, st.st_dev, 0)

    def finish(self) -> None:
        for t in self.made:
            t.reap_dead_pins()  # a child a test killed may have died holding pins
            destroy(t)
            assert_quiet(t)
        self.files.check_plugs()
        for t in self.made:
            t.unlink()
            t.detach()
        for fd in self.root_fds:  # the root is never freed: its fd stays the caller's
            os.close(fd)
        leaked = open_fds() - self.fds_before - set(self.files.plugs)
        assert not leaked, f"fds left open: {sorted(leaked)}"


@pytest.fixture
def tables(files: Files) -> Iterator[Tables]:
    t = Tables(files)
    yield t
    t.finish()


@pytest.fixture
def make_table(tables: Tables) -> Callable[..., InodeTable]:
    return tables.inode


@pytest.fixture
def table(tables: Tables) -> InodeTable:
    return tables.inode()


@pytest.fixture
def handles(tables: Tables) -> HandleTable:
    return tables.handles(16)
