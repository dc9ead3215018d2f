"""Fixtures for the shared-table tests: fresh segments with unique names, always unlinked."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ensure_native() -> None:
    """Build shm_table._native in place when it is missing (fresh checkout)."""
    try:
        importlib.import_module("shm_table._native")
    except ImportError:
        subprocess.run([sys.executable, os.path.join(ROOT, "shm_table", "_native_build.py")],
                       check=True, cwd=ROOT)


_ensure_native()

from shm_table import HandleTable, InodeTable  # noqa: E402


def unique_name(tag: str) -> str:
    return f"/pyvfs-test-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _noop_close(fd: int) -> None:
    """Tests use made-up fd numbers: never close anything for real."""


@pytest.fixture
def make_table() -> Iterator:
    made: list = []

    def make(capacity: int = 64, root: bool = True) -> InodeTable:
        t = InodeTable.create(unique_name("it"), capacity)
        t.close_fd = _noop_close
        made.append(t)
        if root:
            t.insert_root((1, 1, 1), 3, 0o40755)
        return t

    yield make
    for t in made:
        t.unlink()
        t.detach()


@pytest.fixture
def table(make_table) -> InodeTable:
    return make_table()


@pytest.fixture
def handles() -> Iterator[HandleTable]:
    h = HandleTable.create(unique_name("ht"), 16)
    h.close_fd = _noop_close
    yield h
    h.unlink()
    h.detach()
