"""Hypothesis state machines: the shared tables against a plain model with both kinds of
reference, the guest's (lookups, open) and pins, held by two workers.

"me" is this process; "other" is another queue's worker, a process sharing the fd table as
the daemon's do, which pins, unpins, forgets and releases on request, and is SIGKILLed at
times while it holds pins (the supervisor then gives them back while it is a zombie).  The
model says, after every step, which entries exist with which lookups, which are dying (the
guest let go, a pin holds them), which fds are open naming which file, and which were closed
(each exactly once: a closed number is plugged, see realfds).
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from conftest import unique_name
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from procs import Child
from realfds import Files, Ids, open_fds

from shm_table import (
    FUSE_ROOT_ID,
    HandleTable,
    HandleTableFull,
    InodeTable,
    InodeTableFull,
    NotPinned,
    PinsExhausted,
)

CAPACITY = 6
HANDLES = [None, b"a", b"b", b"c"]
NAMES = ["x", "y", "z"]
MAX_PINS = 7
U64 = (1 << 64) - 1
ACTORS = ["me", "other"]
_REQ = struct.Struct("<BQQ")
_REP = struct.Struct("<q")
PIN, UNPIN, FORGET, CLOSE, EXIT = range(1, 6)
NONE, EXHAUSTED, NOT_PINNED = -2, -3, -4


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def call_table(t: InodeTable | HandleTable, op: int, a: int, b: int) -> int:
    """One table call, its outcome as an int (the same in either process)."""
    try:
        if op == PIN:
            r = t.pin(a)
            return NONE if r is None else (r[0] << 32) | (r[1] + 1)
        if op == UNPIN:
            t.unpin(a)
            return 0
        if op == FORGET:
            assert isinstance(t, InodeTable)
            return int(t.forget(a, b))
        assert isinstance(t, HandleTable) and op == CLOSE
        return int(t.close(a))
    except PinsExhausted:
        return EXHAUSTED
    except NotPinned:
        return NOT_PINNED


class Worker:
    """The other queue's worker: a process sharing our fd table, serving table calls."""

    def __init__(self, table: InodeTable | HandleTable) -> None:
        self.req_r, self.req_w = os.pipe()
        self.rep_r, self.rep_w = os.pipe()
        self.table = table
        self.child = Child(self._serve, shared_fds=True)

    def _serve(self) -> None:
        while True:
            op, a, b = _REQ.unpack(_read_exact(self.req_r, _REQ.size))
            if op == EXIT:
                return
            os.write(self.rep_w, _REP.pack(call_table(self.table, op, a, b)))

    def call(self, op: int, a: int, b: int = 0) -> int:
        os.write(self.req_w, _REQ.pack(op, a & U64, b & U64))
        return _REP.unpack(_read_exact(self.rep_r, _REP.size))[0]

    def kill(self) -> None:
        """SIGKILL it; it stays a zombie until finish()."""
        self.child.kill()
        self.child.wait_exit()

    def finish(self) -> None:
        if not self.child.exited():
            os.write(self.req_w, _REQ.pack(EXIT, 0, 0))
        self.child.reap()
        for fd in (self.req_r, self.req_w, self.rep_r, self.rep_w):
            os.close(fd)


class Base(RuleBasedStateMachine):
    """The actors, their pins and the files, shared by both machines."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="pyvfs-sm-"))
        self.files = Files(self.tmp)
        self.fds_before = open_fds()
        self.pins: dict[str, list[int]] = {a: [] for a in ACTORS}
        self.t: InodeTable | HandleTable = self.make_table()
        self.worker = Worker(self.t)

    def make_table(self) -> InodeTable | HandleTable:
        raise NotImplementedError

    def do(self, actor: str, op: int, a: int, b: int = 0) -> int:
        if actor == "me":
            return call_table(self.t, op, a, b)
        return self.worker.call(op, a, b)

    def pinned_by_anyone(self, key: int) -> bool:
        return any(key in p for p in self.pins.values())

    def teardown(self) -> None:
        try:
            self.worker.finish()  # exits holding its pins: given back below
            self.t.reap_dead_pins()
            for key in list(self.pins["me"]):
                self.t.unpin(key)
            self.destroy()
            assert self.t.pins_held() == 0 and self.t.stats()["dying"] == 0
            assert self.t.take_orphaned_fds() == []
            self.t.check()
            self.files.check_plugs()
        finally:
            self.t.unlink()
            self.t.detach()
        leaked = open_fds() - self.fds_before - set(self.files.plugs) - self.kept_fds()
        assert not leaked, f"fds left open: {sorted(leaked)}"
        self.files.close()
        for fd in self.kept_fds():
            os.close(fd)
        shutil.rmtree(self.tmp)

    def destroy(self) -> None:
        raise NotImplementedError

    def kept_fds(self) -> set[int]:
        """fds that stay open after destroy() (the root's)."""
        return set()

    def gone(self, fd: int) -> None:
        """An entry was freed just now: its fd is closed (and plugged: closed once)."""
        if fd >= 0:
            self.files.assert_closed(fd)

    def _kill_other(self) -> list[int]:
        """SIGKILL the other worker while it holds its pins, give them back while it is a
        zombie, as the supervisor does; a fresh worker takes its place.  Returns the keys it
        held."""
        held = self.pins["other"]
        self.pins["other"] = []
        self.worker.kill()
        self.t.reap_dead_pins()
        assert self.worker.child.killed_by() == signal.SIGKILL
        self.worker.finish()
        self.worker = Worker(self.t)
        return held


@dataclass
class Ent:
    ids: Ids
    handle: tuple[int, bytes] | None
    fd: int
    lookups: int
    slot: int
    parent: int = 0
    name: bytes = b""


class InodeModel(Base):
    def make_table(self) -> InodeTable:
        t = InodeTable.create(unique_name("sm"), CAPACITY)
        self.root_fd = os.open(self.tmp, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st_ = os.fstat(self.root_fd)
        root_ids = (st_.st_ino, st_.st_dev, 0)
        t.insert_root(root_ids, self.root_fd, 0o40755)
        self.live: dict[int, Ent] = {FUSE_ROOT_ID: Ent(root_ids, None, self.root_fd, 1, 0)}
        self.dying: dict[int, Ent] = {}
        self.issued: list[int] = []  # every nodeid handed out, in order: never again
        return t

    def kept_fds(self) -> set[int]:
        return {self.root_fd}

    def destroy(self) -> None:
        assert isinstance(self.t, InodeTable)
        for n in list(self.live):
            self.t.forget(n, U64)
            if n != FUSE_ROOT_ID:
                self.gone(self.live.pop(n).fd)
        for e in self.dying.values():  # freed as their pins went in teardown
            self.gone(e.fd)

    def _find(self, ids: Ids, handle: tuple[int, bytes] | None) -> int | None:
        if handle is not None:
            for n, e in self.live.items():
                if e.handle == handle:
                    return n
        for n, e in self.live.items():
            if e.ids == ids and e.fd >= 0:
                return n
        return None

    def _free_if_unpinned(self, nodeid: int) -> None:
        if nodeid in self.dying and not self.pinned_by_anyone(nodeid):
            self.gone(self.dying.pop(nodeid).fd)

    @rule(name=st.sampled_from(NAMES), h=st.sampled_from(HANDLES), htype=st.integers(1, 2),
          with_fd=st.booleans(), fname=st.binary(max_size=8))
    def lookup(self, name: str, h: bytes | None, htype: int, with_fd: bool,
               fname: bytes) -> None:
        assert isinstance(self.t, InodeTable)
        if with_fd:
            fd, ids = self.files.open(name, os.O_PATH)
        else:
            fd, ids = -1, self.files.make(name)
        key = None if h is None else (htype, h)
        expect = self._find(ids, key)
        if expect is None and len(self.live) + len(self.dying) == CAPACITY:
            try:
                self.t.claim_or_insert(ids, h, htype, fd, 0o100644, 1, fname)
            except InodeTableFull:
                if fd >= 0:
                    self.files.assert_names(fd, ids)  # refused: still ours
                    os.close(fd)
                return
            raise AssertionError("table should be full")
        nodeid, inserted = self.t.claim_or_insert(ids, h, htype, fd, 0o100644, 1, fname)
        if expect is not None:
            assert (nodeid, inserted) == (expect, False)
            self.live[expect].lookups += 1
            if fd >= 0:
                self.files.assert_names(fd, ids)  # found: the caller keeps its fd
                os.close(fd)
        else:
            assert inserted and nodeid not in self.issued and nodeid != FUSE_ROOT_ID
            assert nodeid >> 32 >= 1
            self.issued.append(nodeid)
            self.live[nodeid] = Ent(ids, key, fd, 1, nodeid & 0xFFFFFFFF, 1, fname)

    def _nodeid(self, data: st.DataObject) -> int:
        """Mostly a pinned, live or dying nodeid; else a forgotten one, the root, 0, one naming an
        unused generation or slot, or any 64-bit value."""
        held = sorted(set(self.live) - {FUSE_ROOT_ID}) + sorted(self.dying)
        pinned = sorted({n for p in self.pins.values() for n in p} - {FUSE_ROOT_ID})
        choice = data.draw(st.integers(0, 9))
        if pinned and choice < 4:  # races with requests in flight are the point
            return data.draw(st.sampled_from(pinned))
        if held and choice < 8:
            return data.draw(st.sampled_from(held))
        return data.draw(st.sampled_from(
            [FUSE_ROOT_ID, *self.issued[-3:], 0, 2, (1 << 32) | CAPACITY, (7 << 32) | 1])
            | st.integers(0, U64))

    @rule(actor=st.sampled_from(ACTORS), data=st.data())
    def pin(self, actor: str, data: st.DataObject) -> None:
        nodeid = self._nodeid(data)
        r = self.do(actor, PIN, nodeid)
        e = self.live.get(nodeid)
        if len(self.pins[actor]) == MAX_PINS:
            assert r in (EXHAUSTED, NONE)  # a nodeid naming no slot is refused first
            assert r == NONE or nodeid & 0xFFFFFFFF < CAPACITY or nodeid == FUSE_ROOT_ID
            return
        if e is None:
            assert r == NONE  # forgotten (dying too), never issued, forged
            return
        assert r >= 0 and (r >> 32, (r & 0xFFFFFFFF) - 1) == (e.slot, e.fd)
        if e.fd >= 0:
            self.files.assert_names(e.fd, e.ids)  # the right file, open while pinned
        self.pins[actor].append(nodeid)

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        actor = data.draw(st.sampled_from([a for a in ACTORS if self.pins[a]]))
        nodeid = self.pins[actor].pop(data.draw(st.integers(0, len(self.pins[actor]) - 1)))
        e = self.live.get(nodeid) or self.dying[nodeid]
        if e.fd >= 0:
            self.files.assert_names(e.fd, e.ids)  # still the file, up to the unpin
        assert self.do(actor, UNPIN, nodeid) == 0
        self._free_if_unpinned(nodeid)

    @rule(actor=st.sampled_from(ACTORS), data=st.data())
    def unpin_not_pinned(self, actor: str, data: st.DataObject) -> None:
        """A stale unpin: refused, nothing changes (checked by the invariant)."""
        nodeid = self._nodeid(data)
        if nodeid not in self.pins[actor]:
            assert self.do(actor, UNPIN, nodeid) == NOT_PINNED

    @rule(actor=st.sampled_from(ACTORS), n=st.sampled_from([1, 2, 5, U64]), data=st.data())
    def forget(self, actor: str, n: int, data: st.DataObject) -> None:
        """FORGET, BATCH_FORGET or DESTROY, with counts up to far above the guest's."""
        nodeid = self._nodeid(data)
        got = self.do(actor, FORGET, nodeid, n)
        e = self.live.get(nodeid)
        if len(self.pins[actor]) == MAX_PINS and e is not None:
            assert got == EXHAUSTED  # FORGET pins while it works
            return
        if e is None:  # forgotten (dying too), never issued, forged: a no-op
            assert got == 0 or (got == EXHAUSTED and len(self.pins[actor]) == MAX_PINS)
            return
        floor = 1 if nodeid == FUSE_ROOT_ID else 0
        e.lookups = max(e.lookups - n, floor)
        assert got == (e.lookups == 0)
        if e.lookups == 0:
            self.dying[nodeid] = self.live.pop(nodeid)
            self._free_if_unpinned(nodeid)
            event(f"last lookup forgotten, entry {'dying' if nodeid in self.dying else 'freed'}")

    @precondition(lambda self: len(self.live) > 0)
    @rule(data=st.data(), parent=st.integers(0, 99), name=st.binary(max_size=255))
    def set_info(self, data: st.DataObject, parent: int, name: bytes) -> None:
        assert isinstance(self.t, InodeTable)
        nodeid = data.draw(st.sampled_from(sorted(self.live)))
        e = self.live[nodeid]
        self.t.set_migration_info(nodeid, parent, name)
        e.parent, e.name = parent, name

    @precondition(lambda self: self.pins["other"])  # a clone per death: only when it pins
    @rule()
    def other_worker_dies(self) -> None:
        held = set(self._kill_other())
        event(f"worker killed holding a pin on a dying entry: {bool(held & set(self.dying))}")
        for nodeid in held:
            self._free_if_unpinned(nodeid)

    @invariant()
    def matches_model(self) -> None:
        assert isinstance(self.t, InodeTable)
        self.t.check()
        got = {e.nodeid: e for e in self.t.iter_entries()}
        assert set(got) == set(self.live)
        for n, e in self.live.items():
            g = got[n]
            assert (g.lookups, g.fd, g.slot, g.ids) == (e.lookups, e.fd, e.slot, e.ids)
            assert g.handle == (None if e.handle is None else e.handle[1])
            if n != FUSE_ROOT_ID:
                assert (g.parent, g.name) == (e.parent, e.name)
        dying = {e.nodeid: e for e in self.t.iter_entries(dying=True) if e.nodeid not in got}
        assert set(dying) == set(self.dying)
        assert all(e.lookups == 0 and e.fd == self.dying[n].fd for n, e in dying.items())
        for e in (*self.live.values(), *self.dying.values()):
            if e.fd >= 0:
                self.files.assert_names(e.fd, e.ids)
        assert self.t.stats()["dying"] == len(self.dying)
        assert self.t.my_pins() == len(self.pins["me"])
        assert self.t.pins_held() == sum(len(p) for p in self.pins.values())


InodeModel.TestCase.settings = settings(max_examples=40, stateful_step_count=40,
                                        deadline=None)
TestInodeModel = InodeModel.TestCase


@dataclass
class Open:
    fd: int
    name: str
    guest_open: bool = True


class HandleModel(Base):
    def make_table(self) -> HandleTable:
        self.open_files: dict[int, Open] = {}  # live and released-but-pinned
        self.dead: list[int] = []
        return HandleTable.create(unique_name("smh"), 4)

    def destroy(self) -> None:
        assert isinstance(self.t, HandleTable)
        for fh, o in list(self.open_files.items()):
            assert self.t.close(fh) == o.guest_open
            self.gone(self.open_files.pop(fh).fd)

    def _free_if_unpinned(self, fh: int) -> None:
        o = self.open_files.get(fh)
        if o is not None and not o.guest_open and not self.pinned_by_anyone(fh):
            del self.open_files[fh]
            self.dead.append(fh)
            self.gone(o.fd)

    @rule(name=st.sampled_from(NAMES))
    def open(self, name: str) -> None:
        assert isinstance(self.t, HandleTable)
        fd, _ = self.files.open(name)
        if len(self.open_files) == 4:
            try:
                self.t.open(2, fd, 0)
            except HandleTableFull:
                self.files.assert_reads(fd, name)  # refused: still ours
                os.close(fd)
                return
            raise AssertionError("table should be full")
        fh = self.t.open(2, fd, 0)
        assert fh not in self.open_files and fh not in self.dead and fh != 0
        self.open_files[fh] = Open(fd, name)

    def _fh(self, data: st.DataObject) -> int:
        """Mostly an open (or released, still pinned) fh; else a stale or forged one."""
        pinned = sorted({n for p in self.pins.values() for n in p})
        choice = data.draw(st.integers(0, 9))
        if pinned and choice < 4:
            return data.draw(st.sampled_from(pinned))
        if self.open_files and choice < 8:
            return data.draw(st.sampled_from(sorted(self.open_files)))
        return data.draw(st.sampled_from([*self.dead[-3:], 0, 7, U64]) | st.integers(0, U64))

    @rule(actor=st.sampled_from(ACTORS), data=st.data())
    def pin(self, actor: str, data: st.DataObject) -> None:
        fh = self._fh(data)
        r = self.do(actor, PIN, fh)
        o = self.open_files.get(fh)
        if len(self.pins[actor]) == MAX_PINS:
            assert r in (EXHAUSTED, NONE)
            return
        if o is None or not o.guest_open:
            assert r == NONE  # released (even if a READ still pins it), stale, forged
            return
        assert r >= 0 and (r & 0xFFFFFFFF) - 1 == o.fd
        self.files.assert_reads(o.fd, o.name)
        self.pins[actor].append(fh)

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        actor = data.draw(st.sampled_from([a for a in ACTORS if self.pins[a]]))
        fh = self.pins[actor].pop(data.draw(st.integers(0, len(self.pins[actor]) - 1)))
        o = self.open_files[fh]
        self.files.assert_reads(o.fd, o.name)  # a READ racing RELEASE reads the file
        assert self.do(actor, UNPIN, fh) == 0
        self._free_if_unpinned(fh)

    @rule(actor=st.sampled_from(ACTORS), data=st.data())
    def unpin_not_pinned(self, actor: str, data: st.DataObject) -> None:
        fh = self._fh(data)
        if fh not in self.pins[actor]:
            assert self.do(actor, UNPIN, fh) == NOT_PINNED

    @rule(actor=st.sampled_from(ACTORS), data=st.data())
    def release(self, actor: str, data: st.DataObject) -> None:
        """RELEASE, also duplicated, stale or forged."""
        fh = self._fh(data)
        got = self.do(actor, CLOSE, fh)
        o = self.open_files.get(fh)
        if len(self.pins[actor]) == MAX_PINS and o is not None and o.guest_open:
            assert got == EXHAUSTED
            return
        if o is None or not o.guest_open:  # a no-op
            assert got == 0 or (got == EXHAUSTED and len(self.pins[actor]) == MAX_PINS)
            return
        assert got == 1
        o.guest_open = False
        self._free_if_unpinned(fh)

    @precondition(lambda self: self.pins["other"])  # a clone per death: only when it pins
    @rule()
    def other_worker_dies(self) -> None:
        held = set(self._kill_other())
        event(f"worker killed holding a released file: "
              f"{any(not self.open_files[fh].guest_open for fh in held)}")
        for fh in held:
            self._free_if_unpinned(fh)

    @invariant()
    def matches_model(self) -> None:
        assert isinstance(self.t, HandleTable)
        self.t.check()
        got = {e.fh: (e.fd, e.guest_open) for e in self.t.iter_handles(released=True)}
        assert got == {fh: (o.fd, o.guest_open) for fh, o in self.open_files.items()}
        assert {e.fh for e in self.t.iter_handles()} == {
            fh for fh, o in self.open_files.items() if o.guest_open}
        for o in self.open_files.values():
            self.files.assert_reads(o.fd, o.name)
        assert self.t.stats()["dying"] == sum(not o.guest_open
                                              for o in self.open_files.values())
        assert Counter(self.pins["me"]).total() == self.t.my_pins()
        assert self.t.pins_held() == sum(len(p) for p in self.pins.values())


HandleModel.TestCase.settings = settings(max_examples=40, stateful_step_count=40,
                                         deadline=None)
TestHandleModel = HandleModel.TestCase
