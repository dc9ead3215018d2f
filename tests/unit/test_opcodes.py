"""The opcode table (daemon/protocol/opcodes.py) and what is derived from it: every handler
it names exists, the reply sizes and the C mask are what the worker used before the table,
and the file system's settings name every condition under which C declines."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.fs.passthrough import Config, PassthroughFs
from daemon.fs.xattrmap import XattrMap
from daemon.protocol import fuse
from daemon.protocol.fuse import Opcode
from daemon.protocol.opcodes import (
    BY_OPCODE,
    C_OPCODES,
    MIN_REPLY,
    TABLE,
    Condition,
    Server,
    c_mask,
)
from shm_table import HandleTable, InodeTable
from workers.dispatch import dispatch_table
from workers.fast_path import FastPathContext
from workers.queue_worker import QueueWorker

ALL_C = {Opcode.READ, Opcode.WRITE, Opcode.GETATTR, Opcode.LOOKUP, Opcode.FORGET,
         Opcode.BATCH_FORGET, Opcode.RELEASE, Opcode.RELEASEDIR, Opcode.UNLINK,
         Opcode.READDIRPLUS, Opcode.CREATE, Opcode.FLUSH, Opcode.RMDIR, Opcode.RENAME,
         Opcode.MKDIR, Opcode.MKNOD, Opcode.SYMLINK, Opcode.OPEN,
         Opcode.SETATTR}  # fuse_ops.c's switch (the last seven: fuse_meta.c)
MAKES = {Opcode.CREATE, Opcode.MKDIR, Opcode.MKNOD, Opcode.SYMLINK}  # plain creates only


def opcodes_of(mask: int) -> set[Opcode]:
    return {op for op in Opcode if mask >> op & 1}


def test_one_row_per_opcode_and_every_handler_exists() -> None:
    assert len(BY_OPCODE) == len(TABLE)
    for row in TABLE:
        owner = PassthroughFs if row.served_by is Server.FS else QueueWorker
        method = getattr(owner, row.handler, None)
        assert callable(method), f"{row.opcode.name}: no {owner.__name__}.{row.handler}"
        assert list(inspect.signature(method).parameters)[0] == "self"


def test_min_reply_sizes() -> None:
    entry, open_out = fuse.ENTRY_OUT_SIZE, fuse.OPEN_OUT.size
    attr = fuse.ATTR_OUT_HEAD.size + fuse.ATTR.size
    assert MIN_REPLY == {
        Opcode.LOOKUP: entry, Opcode.MKDIR: entry, Opcode.MKNOD: entry,
        Opcode.SYMLINK: entry, Opcode.LINK: entry, Opcode.CREATE: entry + open_out,
        Opcode.TMPFILE: entry + open_out, Opcode.OPEN: open_out, Opcode.OPENDIR: open_out,
        Opcode.GETATTR: attr, Opcode.SETATTR: attr,
    }
    assert {row.opcode for row in TABLE if row.no_reply} == {
        Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT}


def test_c_rows_are_the_switch_of_fast_path_c() -> None:
    assert C_OPCODES == ALL_C
    assert all(op < 64 for op in C_OPCODES)  # pyvfs_fast_ctx_t.c_ops is 64 bits
    assert all(not row.c_declines_when for row in TABLE if not row.in_c)


@pytest.mark.parametrize(("conditions", "in_python"), [
    ((), set()),
    ((Condition.TRANSLATE_IDS,), ALL_C - {Opcode.READ, Opcode.WRITE}),
    ((Condition.READONLY,), MAKES | {Opcode.WRITE, Opcode.UNLINK, Opcode.RMDIR,
                                     Opcode.RENAME, Opcode.OPEN, Opcode.SETATTR}),
    ((Condition.CAPABILITY_RENAMED,), MAKES | {Opcode.WRITE, Opcode.OPEN, Opcode.SETATTR}),
    ((Condition.POSIX_ACL,), MAKES),
    ((Condition.SECURITY_LABEL,), MAKES),
    ((Condition.WRITEBACK,), MAKES | {Opcode.OPEN}),
    ((Condition.XATTRMAP,), MAKES),
    ((Condition.READONLY, Condition.TRANSLATE_IDS), ALL_C - {Opcode.READ}),
])
def test_mask_by_condition(conditions: tuple[Condition, ...], in_python: set[Opcode]) -> None:
    """What QueueWorker._fast_ctx decided before the table, condition by condition."""
    assert opcodes_of(c_mask(conditions)) == ALL_C - in_python


@pytest.fixture
def share(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "share").mkdir()
    yield tmp_path / "share"


def settings_of(share: Path, **config: object) -> frozenset[Condition]:
    fs = PassthroughFs(str(share), None, None, Config(**config))  # no tables needed
    return fs.c_path_settings().conditions


def test_the_file_system_names_each_condition(share: Path) -> None:
    assert settings_of(share) == frozenset()
    rename = XattrMap(":prefix:all::user.virtiofs.::bad:all:::")
    cases = {
        Condition.READONLY: {"readonly": True},
        Condition.POSIX_ACL: {"posix_acl": True},
        Condition.SECURITY_LABEL: {"security_label": True},
        Condition.WRITEBACK: {"writeback": True},
    }
    for condition, config in cases.items():
        assert settings_of(share, **config) == {condition}
    assert settings_of(share, xattrmap=rename) == {Condition.XATTRMAP,
                                                   Condition.CAPABILITY_RENAMED}
    assert settings_of(share, xattrmap=XattrMap("/ok/all///")) == {Condition.XATTRMAP}
    fs = PassthroughFs(str(share), None, None, Config())
    fs.translate_ids = True
    assert fs.c_path_settings().conditions == {Condition.TRANSLATE_IDS}


def test_xattr_rows_follow_the_file_system(share: Path) -> None:
    xattr_ops = {row.opcode for row in TABLE if row.needs_xattr}
    plain = dispatch_table(PassthroughFs(str(share), None, None, Config()), QueueWorker)
    assert set(plain) == set(BY_OPCODE) - xattr_ops
    served = dispatch_table(PassthroughFs(str(share), None, None, Config(xattr=True)),
                            QueueWorker)
    assert set(served) == set(BY_OPCODE)


@pytest.mark.parametrize(("config", "enabled"), [
    ({}, True), ({}, False), ({"readonly": True}, True), ({"writeback": True}, True),
])
def test_context_mask_follows_the_table(share: Path, config: dict, enabled: bool) -> None:
    """The C context's c_ops, its only switch, is the table's mask for the configuration
    (nothing when the C path is off)."""
    name = f"/pyvfs-test-opcodes-{uuid.uuid4().hex[:12]}"
    inodes = InodeTable.create(name + "-i", 64)
    handles = HandleTable.create(name + "-h", 16)
    try:
        fs = PassthroughFs(str(share), inodes, handles, Config(**config))
        fast = FastPathContext(fs, enabled)
        expected = c_mask(fs.c_path_settings().conditions) if enabled else 0
        assert fast.mask == fast.c.c_ops == expected
        assert fast.answers(Opcode.WRITE) == (enabled and not config.get("readonly", False))
        assert fast.answers(Opcode.CREATE) == (enabled and not config)
    finally:
        for t in (inodes, handles):
            t.detach()
            t.unlink()
