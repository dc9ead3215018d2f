"""Hypothesis state machine: the shared inode table against a plain in-process model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import unique_name
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shm_table import FUSE_ROOT_ID, HandleTable, HandleTableFull, InodeTable, InodeTableFull

CAPACITY = 6
HANDLES = [None, b"a", b"b", b"c"]


@dataclass
class Ent:
    ids: tuple[int, int, int]
    handle: tuple[int, bytes] | None
    fd: int
    refcount: int
    slot: int
    parent: int = 0
    name: bytes = b""


class InodeModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = InodeTable.create(unique_name("sm"), CAPACITY)
        self.t.close_fd = lambda fd: None
        self.t.insert_root((1, 1, 1), 3, 0o40755)
        self.m: dict[int, Ent] = {FUSE_ROOT_ID: Ent((1, 1, 1), None, 3, 1, 0)}
        self.issued: list[int] = []  # every nodeid handed out, in order: never again
        self.fd_counter = 100

    def teardown(self) -> None:
        self.t.unlink()
        self.t.detach()

    def _find(self, ids: tuple[int, int, int], handle: tuple[int, bytes] | None) -> int | None:
        if handle is not None:
            for n, e in self.m.items():
                if e.handle == handle:
                    return n
        for n, e in self.m.items():
            if e.ids == ids and e.fd >= 0:
                return n
        return None

    @rule(ino=st.integers(0, 2), h=st.sampled_from(HANDLES), htype=st.integers(1, 2),
          with_fd=st.booleans(), name=st.binary(max_size=8))
    def claim(self, ino: int, h: bytes | None, htype: int, with_fd: bool, name: bytes) -> None:
        ids = (10 + ino, 5, 6)
        key = None if h is None else (htype, h)
        self.fd_counter += 1
        fd = self.fd_counter if with_fd else -1
        expect = self._find(ids, key)
        if expect is None and len(self.m) == CAPACITY:
            try:
                self.t.claim_or_insert(ids, h, htype, fd, 0o100644, 1, name)
            except InodeTableFull:
                return
            raise AssertionError("table should be full")
        nodeid, slot, inserted = self.t.claim_or_insert(ids, h, htype, fd, 0o100644, 1, name)
        if expect is not None:
            assert (nodeid, inserted) == (expect, False)
            assert slot == self.m[expect].slot
            self.m[expect].refcount += 1
        else:
            assert inserted and nodeid not in self.issued and nodeid != FUSE_ROOT_ID
            assert nodeid & 0xFFFFFFFF == slot and nodeid >> 32 >= 1
            self.issued.append(nodeid)
            self.m[nodeid] = Ent(ids, key, fd, 1, slot, 1, name)

    def _pick(self, pick: int, forged: int) -> int:
        """A live or forgotten nodeid, the root, 0, a nodeid naming an unused generation or
        slot, or any 64-bit value."""
        known = [FUSE_ROOT_ID, *self.issued]
        if pick < len(known):
            return known[-1 - pick]
        return [0, 2, (1 << 32) | CAPACITY, (7 << 32) | 1, forged][pick % 5]

    @rule(pick=st.integers(0, 50), forged=st.integers(0, 2**64 - 1))
    def acquire(self, pick: int, forged: int) -> None:
        nodeid = self._pick(pick, forged)
        r = self.t.acquire(nodeid)
        e = self.m.get(nodeid)
        if e is None:
            assert r is None
        else:
            assert r == (e.slot, e.fd)
            e.refcount += 1

    def _drop(self, nodeid: int, n: int, got: int) -> None:
        e = self.m[nodeid]
        floor = 1 if nodeid == FUSE_ROOT_ID else 0
        e.refcount = max(e.refcount - n, floor)
        if e.refcount == 0:
            del self.m[nodeid]
            assert got == e.fd
        else:
            assert got == -1

    @precondition(lambda self: len(self.m) > 0)
    @rule(data=st.data(), n=st.integers(1, 3))
    def release(self, data: st.DataObject, n: int) -> None:
        nodeid = data.draw(st.sampled_from(sorted(self.m)))
        self._drop(nodeid, n, self.t.release(self.m[nodeid].slot, n))

    @rule(pick=st.integers(0, 40), n=st.sampled_from([1, 2, 5, 2**64 - 1]),
          forged=st.integers(0, 2**64 - 1))
    def forget(self, pick: int, n: int, forged: int) -> None:
        pick = self._pick(pick, forged)
        got = self.t.forget(pick, n)
        if pick in self.m:
            self._drop(pick, n, got)
        else:
            assert got == -1

    @precondition(lambda self: len(self.m) > 0)
    @rule(data=st.data(), parent=st.integers(0, 99), name=st.binary(max_size=255))
    def set_info(self, data: st.DataObject, parent: int, name: bytes) -> None:
        nodeid = data.draw(st.sampled_from(sorted(self.m)))
        e = self.m[nodeid]
        self.t.set_migration_info(e.slot, parent, name)
        e.parent, e.name = parent, name

    @invariant()
    def matches_model(self) -> None:
        self.t.check()
        got = {e.nodeid: e for e in self.t.iter_entries()}
        assert set(got) == set(self.m)
        for n, e in self.m.items():
            g = got[n]
            assert (g.refcount, g.fd, g.slot, g.ids) == (e.refcount, e.fd, e.slot, e.ids)
            assert g.handle == (None if e.handle is None else e.handle[1])
            if n != FUSE_ROOT_ID:
                assert (g.parent, g.name) == (e.parent, e.name)


InodeModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                        deadline=None)
TestInodeModel = InodeModel.TestCase


class HandleModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = HandleTable.create(unique_name("smh"), 4)
        self.open_fhs: dict[int, list[int]] = {}  # fh -> [fd, refcount, guest_open]
        self.dead: list[int] = []
        self.held: list[tuple[int, int]] = []  # (fh, slot)
        self.fd = 100

    def teardown(self) -> None:
        self.t.unlink()
        self.t.detach()

    @rule()
    def open(self) -> None:
        self.fd += 1
        if len(self.open_fhs) == 4:
            with pytest.raises(HandleTableFull):
                self.t.open(2, self.fd, 0)
            return
        fh = self.t.open(2, self.fd, 0)
        assert fh not in self.open_fhs and fh not in self.dead
        self.open_fhs[fh] = [self.fd, 1, 1]

    @rule(data=st.data())
    def acquire(self, data: st.DataObject) -> None:
        fh = data.draw(st.sampled_from(sorted(self.open_fhs) + self.dead + [0, 7]))
        r = self.t.acquire(fh)
        if fh in self.open_fhs:
            assert r is not None and r[1] == self.open_fhs[fh][0]
            self.open_fhs[fh][1] += 1
            self.held.append((fh, r[0]))
        else:
            assert r is None

    def _unref(self, fh: int, n: int, got: int) -> None:
        ent = self.open_fhs[fh]
        ent[1] -= n
        if ent[1] == 0:
            assert got == ent[0]
            del self.open_fhs[fh]
            self.dead.append(fh)
        else:
            assert got == -1

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release_ref(self, data: st.DataObject) -> None:
        fh, slot = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self._unref(fh, 1, self.t.release_ref(slot))

    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        fh = data.draw(st.sampled_from(sorted(self.open_fhs) + self.dead + [0]))
        got = self.t.close(fh)
        ent = self.open_fhs.get(fh)
        if ent is None or not ent[2]:
            assert got == -1
        else:
            ent[2] = 0
            self._unref(fh, 1, got)

    @invariant()
    def matches_model(self) -> None:
        self.t.check()
        got = {e.fh: (e.fd, e.refcount, int(e.guest_open)) for e in self.t.iter_handles()}
        assert got == {fh: tuple(v) for fh, v in self.open_fhs.items()}


HandleModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                         deadline=None)
TestHandleModel = HandleModel.TestCase
