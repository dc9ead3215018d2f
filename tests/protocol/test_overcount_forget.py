"""A hostile guest's FORGET, BATCH_FORGET and DESTROY with counts above what it looked up,
racing requests in flight on other queues.

The guest owns its lookup counts, nothing else: the references a worker holds while it
serves a request must survive whatever the guest forgets meanwhile. When the two shared one
counter, an over-count FORGET freed an entry (and closed its fd) under a GETATTR on another
queue; the slot went to the next LOOKUP, and the GETATTR's release then freed that new
entry, which the guest still held: its GETATTR answered EBADF, and a directory's listing
came from another directory whose O_PATH fd had taken the closed fd's number.

Each test checks what the guest sees (every nodeid it still holds answers with its own
inode number and its own directory entries) and what the host keeps (the inode and
open-file tables go back to the root alone, and the daemon's fd table to its size before
the test).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from pathlib import Path

import pytest

from daemon.protocol import fuse
from shm_table import HandleTable, InodeTable
from tests.protocol.test_hostile_guest import Served, reclaim, serve, worker_pids

HUGE = 1 << 40
ROUNDS = 40
IN_FLIGHT = 6


def entry_of(payload: bytes) -> tuple[int, int]:
    """(nodeid, st_ino) of a fuse_entry_out."""
    nodeid = struct.unpack_from("<Q", payload)[0]
    ino = struct.unpack_from("<Q", payload, fuse.ENTRY_HEAD.size)[0]
    return nodeid, ino


def attr_ino(payload: bytes) -> int:
    return struct.unpack_from("<Q", payload, fuse.ATTR_OUT_HEAD.size)[0]


def dirplus_names(payload: bytes) -> tuple[list[bytes], list[int]]:
    """Names and (non-zero) nodeids of a READDIRPLUS reply."""
    names, nodeids, pos = [], [], 0
    while pos < len(payload):
        nodeid = struct.unpack_from("<Q", payload, pos)[0]
        _ino, _off, namelen, _type = fuse.DIRENT_HEAD.unpack_from(
            payload, pos + fuse.ENTRY_OUT_SIZE)
        start = pos + fuse.ENTRY_OUT_SIZE + fuse.DIRENT_HEAD.size
        names.append(payload[start : start + namelen])
        if nodeid:
            nodeids.append(nodeid)
        pos += fuse.direntplus_size(namelen)
    return names, nodeids


def daemon_fds(srv: Served) -> int:
    """Entries of the fd table the server and its workers share."""
    worker = next(iter(srv.workers.values()))
    return len(os.listdir(f"/proc/{worker}/fd"))


def assert_fds_back(srv: Served, before: int) -> None:
    """The fd table is back to its size before the test: every fd of a freed entry is
    closed, including the workers' cached fds of forgotten inodes (an idle worker sweeps
    its cache once a second)."""
    deadline = time.monotonic() + 5
    while daemon_fds(srv) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon_fds(srv) == before, f"{daemon_fds(srv) - before} fds left open"


def settle(srv: Served, what: str) -> None:
    """Wait until the tables hold the root alone and nothing is pinned."""
    inodes = InodeTable.attach(f"/pyvirtiofsd-{srv.proc.pid}-inodes")
    handles = HandleTable.attach(f"/pyvirtiofsd-{srv.proc.pid}-handles")
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (
                inodes.stats()["entries"] != 1 or handles.stats()["entries"] != 0
                or inodes.pins_held() or handles.pins_held()):
            time.sleep(0.02)
        assert inodes.stats()["entries"] == 1, (
            f"{what}: {inodes.stats()['entries']} inode entries left: "
            f"{list(inodes.iter_entries(dying=True))}")
        assert handles.stats()["entries"] == 0, f"{what}: open files left"
        assert inodes.pins_held() == 0 and handles.pins_held() == 0
        inodes.check()
        handles.check()
    finally:
        inodes.detach()
        handles.detach()


def make_dirs(share: Path, n: int) -> dict[str, set[bytes]]:
    """Directories whose listings tell them apart."""
    listing = {}
    for i in range(n):
        d = share / f"d{i}"
        d.mkdir()
        names = {f"d{i}-{j}".encode() for j in range(3)}
        for name in names:
            (d / name.decode()).write_bytes(b"x")
        listing[f"d{i}"] = names
    return listing


def test_overcount_forget_never_frees_what_requests_or_the_guest_hold(tmp_path: Path) -> None:
    with serve(tmp_path) as srv:
        fe = srv.fe
        listing = make_dirs(srv.share, 4)
        big = srv.share / "big"
        big.mkdir()
        for i in range(1500):
            (big / f"entry-{i:05d}").write_bytes(b"")
        fds_before = daemon_fds(srv)
        for rnd in range(ROUNDS):
            # a long READDIRPLUS of "big" in flight on queue 1 (it uses big's fd for every
            # entry it looks up) while the guest, on the hiprio queue, forgets far more
            # lookups of "big" than it made; meanwhile queue 2 looks up new directories,
            # which take whatever slots come free
            error, payload = fe.fuse(fuse.Opcode.LOOKUP, fuse.ROOT_ID, b"big\0", q=1,
                                     out_size=256)
            assert error == 0
            big_nodeid, big_ino = entry_of(payload)
            reclaim(fe, 1)
            error, big_fh = srv.opendir(big_nodeid, q=1)
            assert error == 0
            listing_req = fe.start(fuse.Opcode.READDIRPLUS, big_nodeid,
                                   fuse.READ_IN.pack(big_fh, 0, 131072, 0, 0, 0, 0), q=1,
                                   out_size=131072 + 16)
            getattrs = [fe.start(fuse.Opcode.GETATTR, big_nodeid, bytes(16), q=1,
                                 out_size=256) for _ in range(IN_FLIGHT)]
            forget = fe.start(fuse.Opcode.FORGET, big_nodeid, fuse.FORGET_IN.pack(HUGE),
                              q=0, out_size=0)
            fresh: dict[int, tuple[int, str]] = {}
            for k in range(12):
                name = f"w{rnd}-{k}"
                (srv.share / name).mkdir()
                for entry in listing[f"d{k % 4}"]:
                    (srv.share / name / entry.decode()).write_bytes(b"y")
                error, payload = fe.fuse(fuse.Opcode.LOOKUP, fuse.ROOT_ID,
                                         name.encode() + b"\0", q=2, out_size=256)
                assert error == 0, f"round {rnd}: LOOKUP {name}: {error}"
                nodeid, ino = entry_of(payload)
                fresh[nodeid] = (ino, f"d{k % 4}")
                reclaim(fe, 2)
            answers = fe.finish_all([listing_req, *getattrs, forget])
            error, payload = answers[0]
            assert error in (0, -errno.EBADF), f"round {rnd}: READDIRPLUS big: {error}"
            names, children = dirplus_names(payload)
            assert all(n.startswith(b"entry-") or n in (b".", b"..") for n in names), (
                f"round {rnd}: READDIRPLUS of big listed another directory: {names[:5]}")
            for error, payload in answers[1:-1]:
                # big was forgotten by the guest: its own inode, or EBADF; never another's
                assert error in (0, -errno.EBADF), f"round {rnd}: GETATTR big: {error}"
                if error == 0:
                    assert attr_ino(payload) == big_ino, f"round {rnd}: GETATTR big: wrong inode"
            reclaim(fe, 1)
            reclaim(fe, 0)
            srv.release(big_nodeid, big_fh, 1, fuse.Opcode.RELEASEDIR)
            for child in children:
                srv.forget(child, 1, q=0)
            # what the guest still holds answers as itself, on both queues
            for nodeid, (ino, _like) in fresh.items():
                for q in (1, 2):
                    error, payload = fe.fuse(fuse.Opcode.GETATTR, nodeid, bytes(16), q=q,
                                             out_size=256)
                    assert error == 0, (
                        f"round {rnd}: GETATTR of held nodeid {nodeid:#x} on queue {q}: {error}")
                    assert attr_ino(payload) == ino, f"round {rnd}: GETATTR: another inode"
                    reclaim(fe, q)
            nodeid, (ino, like) = next(iter(fresh.items()))
            error, fh = srv.opendir(nodeid, q=2)
            assert error == 0, f"round {rnd}: OPENDIR of a held directory: {error}"
            error, payload = srv.call(fuse.Opcode.READDIRPLUS, nodeid,
                                      fuse.READ_IN.pack(fh, 0, 65536, 0, 0, 0, 0), q=2,
                                      out_size=65600)
            assert error == 0
            names, children = dirplus_names(payload)
            assert set(names) - {b".", b".."} == listing[like], (
                f"round {rnd}: READDIRPLUS of a held directory listed {names}")
            srv.release(nodeid, fh, 2, fuse.Opcode.RELEASEDIR)
            for child in children:
                srv.forget(child, 1, q=0)
            for nodeid in fresh:
                srv.forget(nodeid, 1, q=0)
        settle(srv, "after every lookup was forgotten")
        assert_fds_back(srv, fds_before)
        srv.assert_alive(queues=(1, 2))


def test_batch_forget_and_destroy_over_count_spare_requests_in_flight(tmp_path: Path) -> None:
    with serve(tmp_path) as srv:
        fe = srv.fe
        listing = make_dirs(srv.share, 4)
        data = {f"f{i}": os.urandom(8192) for i in range(4)}
        for name, content in data.items():
            (srv.share / name).write_bytes(content)
        big = srv.share / "big"
        big.mkdir()
        for i in range(1500):
            (big / f"entry-{i:05d}").write_bytes(b"")
        fds_before = daemon_fds(srv)
        for rnd in range(16):
            held = {}
            for name in [*data, "big"]:
                error, payload = fe.fuse(fuse.Opcode.LOOKUP, fuse.ROOT_ID,
                                         name.encode() + b"\0", q=2, out_size=256)
                assert error == 0
                held[name] = entry_of(payload)
                reclaim(fe, 2)
            opened = {}
            for name in data:
                error, fh = srv.open(held[name][0], q=2)
                assert error == 0
                opened[name] = fh
            error, big_fh = srv.opendir(held["big"][0], q=2)
            assert error == 0
            # a long READDIRPLUS and READs of every open file in flight on queue 2; a
            # BATCH_FORGET far above the guest's lookups on the hiprio queue, or a DESTROY
            # on queue 1, meanwhile; then queue 1 looks up new directories
            inflight = [fe.start(fuse.Opcode.READDIRPLUS, held["big"][0],
                                 fuse.READ_IN.pack(big_fh, 0, 131072, 0, 0, 0, 0), q=2,
                                 out_size=131072 + 16)]
            inflight += [fe.start(fuse.Opcode.READ, held[name][0],
                                  fuse.READ_IN.pack(fh, 0, 8192, 0, 0, 0, 0), q=2,
                                  out_size=8192 + 16) for name, fh in opened.items()]
            destroy = rnd % 2 == 0
            if destroy:
                error, _ = fe.fuse(fuse.Opcode.DESTROY, 0, b"", q=1, out_size=256)
                assert error == 0
                reclaim(fe, 1)
                fe.init(q=1)
                reclaim(fe, 1)
            else:
                batch = fuse.BATCH_FORGET_IN.pack(len(held), 0) + b"".join(
                    fuse.FORGET_ONE.pack(nodeid, HUGE) for nodeid, _ in held.values())
                srv.request(fuse.Opcode.BATCH_FORGET, 0, batch, q=0, out_size=0)
            fresh: dict[int, tuple[int, str]] = {}
            for k in range(12):
                name = f"w{rnd}-{k}"
                (srv.share / name).mkdir()
                for entry in listing[f"d{k % 4}"]:
                    (srv.share / name / entry.decode()).write_bytes(b"y")
                error, payload = fe.fuse(fuse.Opcode.LOOKUP, fuse.ROOT_ID,
                                         name.encode() + b"\0", q=1, out_size=256)
                assert error == 0, f"round {rnd}: LOOKUP {name}: {error}"
                nodeid, ino = entry_of(payload)
                fresh[nodeid] = (ino, f"d{k % 4}")
                reclaim(fe, 1)
            answers = fe.finish_all(inflight)
            error, payload = answers[0]
            assert error in (0, -errno.EBADF), f"round {rnd}: READDIRPLUS big: {error}"
            names, children = dirplus_names(payload)
            assert all(n.startswith(b"entry-") or n in (b".", b"..") for n in names), (
                f"round {rnd}: READDIRPLUS of big listed another directory: {names[:5]}")
            for name, (error, payload) in zip(opened, answers[1:], strict=True):
                # the file's own bytes or, once DESTROY released its fh, EBADF; never
                # another file's bytes
                assert error in (0, -errno.EBADF), f"round {rnd}: READ {name}: {error}"
                if error == 0:
                    assert payload == data[name], f"round {rnd}: READ {name}: wrong bytes"
            reclaim(fe, 2)
            for child in children:
                srv.forget(child, 1, q=0)
            if not destroy:  # BATCH_FORGET leaves the open files to the guest
                for name, fh in opened.items():
                    srv.release(held[name][0], fh, 2)
                srv.release(held["big"][0], big_fh, 2, fuse.Opcode.RELEASEDIR)
            for nodeid, (ino, _like) in fresh.items():
                for q in (1, 2):
                    error, payload = fe.fuse(fuse.Opcode.GETATTR, nodeid, bytes(16), q=q,
                                             out_size=256)
                    assert error == 0, (
                        f"round {rnd}: GETATTR of held nodeid {nodeid:#x} on queue {q}: {error}")
                    assert attr_ino(payload) == ino, f"round {rnd}: GETATTR: another inode"
                    reclaim(fe, q)
                srv.forget(nodeid, 1, q=0)
        settle(srv, "after BATCH_FORGET and DESTROY")
        assert_fds_back(srv, fds_before)
        srv.assert_alive(queues=(1, 2))


def test_a_killed_worker_gives_back_exactly_its_pins(tmp_path: Path) -> None:
    """SIGKILL a worker in the middle of a long READDIRPLUS: its pins on the directory and
    its open file go back to the tables (the supervisor reaps them while the worker is a
    zombie), so the entries the guest then releases are freed and their fds closed; the
    restarted worker answers the request again."""
    with serve(tmp_path) as srv:
        fe = srv.fe
        big = srv.share / "big"
        big.mkdir()
        for i in range(4000):
            (big / f"entry-{i:05d}").write_bytes(b"")
        inodes = InodeTable.attach(f"/pyvirtiofsd-{srv.proc.pid}-inodes")
        handles = HandleTable.attach(f"/pyvirtiofsd-{srv.proc.pid}-handles")
        try:
            for _attempt in range(40):
                error, payload = fe.fuse(fuse.Opcode.LOOKUP, fuse.ROOT_ID, b"big\0", q=1,
                                         out_size=256)
                assert error == 0
                nodeid, _ = entry_of(payload)
                reclaim(fe, 1)
                error, fh = srv.opendir(nodeid, q=1)
                assert error == 0
                worker = srv.workers[1]
                sent = fe.start(fuse.Opcode.READDIRPLUS, nodeid,
                                fuse.READ_IN.pack(fh, 0, 1 << 20, 0, 0, 0, 0), q=1,
                                out_size=(1 << 20) + 16)
                # kill it once it pins the directory (it is then inside the request)
                deadline = time.monotonic() + 2
                while inodes.pins_held() == 0 and time.monotonic() < deadline:
                    pass
                os.kill(worker, 9)
                error, payload = fe.finish(sent)  # answered again by the new worker
                assert error == 0
                _names, children = dirplus_names(payload)
                reclaim(fe, 1)
                srv.workers = worker_pids(srv.log())  # the restarted worker's pid
                srv.release(nodeid, fh, 1, fuse.Opcode.RELEASEDIR)
                for child in children:
                    srv.forget(child, 1, q=0)
                srv.forget(nodeid, 1, q=0)
                if inodes.stats()["reaped_pins"]:
                    break
            assert inodes.stats()["reaped_pins"] >= 1, "never killed inside a request"
            assert handles.stats()["reaped_pins"] >= 1  # the directory's open file
            assert inodes.pins_held() == 0 and handles.pins_held() == 0
            # the directory's fh: released by the guest, unpinned by the reaper: freed
            assert handles.stats()["entries"] == 0
        finally:
            inodes.detach()
            handles.detach()
        # the killed worker's claims for the entries it was listing are the guest's that
        # never reached it (a lookup leak a restart cannot avoid); its pins are gone
        srv.assert_alive(queues=(1, 2))


def _host_write_lock(path: Path) -> int:
    """A host process's lock on the whole file (an OFD lock of this test process)."""
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    return fd


@pytest.mark.parametrize("storm", ["batch_forget", "destroy"])
def test_parked_setlkw_outlives_an_overcount_forget(tmp_path: Path, storm: str) -> None:
    """SETLKWs parked on queue 2 behind a host lock, while the guest forgets far more than
    it looked up (or DESTROYs) and queue 1 looks new files up: once the host lets go each
    parked request is answered as the guest's open file stands — granted while the file
    is still open, EBADF once DESTROY released it — and nothing the guest holds is hurt."""
    with serve(tmp_path, "--posix-lock") as srv:
        fe = srv.fe
        files = [srv.share / f"locked{i}" for i in range(3)]
        for f in files:
            f.write_bytes(b"locked")
        holds = [_host_write_lock(f) for f in files]
        held = {}
        for f in files:
            error, payload = fe.fuse(fuse.Opcode.LOOKUP, fuse.ROOT_ID,
                                     f.name.encode() + b"\0", q=2, out_size=256)
            assert error == 0
            nodeid, _ = entry_of(payload)
            reclaim(fe, 2)
            error, fh = srv.open(nodeid, os.O_RDWR, q=2)
            assert error == 0
            held[f.name] = (nodeid, fh)
        parked = [fe.start(fuse.Opcode.SETLKW, nodeid,
                           fuse.LK_IN.pack(fh, 7 + i, 0, fuse.OFFSET_MAX, fcntl.F_WRLCK,
                                           100 + i, 0, 0), q=2, out_size=256)
                  for i, (nodeid, fh) in enumerate(held.values())]
        with pytest.raises(TimeoutError):  # they really wait for the host's locks
            fe.wait_used(2, timeout=0.3)
        if storm == "destroy":
            error, _ = fe.fuse(fuse.Opcode.DESTROY, 0, b"", q=1, out_size=256)
            assert error == 0
            reclaim(fe, 1)
            fe.init(q=1)
            reclaim(fe, 1)
        else:
            batch = fuse.BATCH_FORGET_IN.pack(len(held), 0) + b"".join(
                fuse.FORGET_ONE.pack(nodeid, HUGE) for nodeid, _ in held.values())
            srv.request(fuse.Opcode.BATCH_FORGET, 0, batch, q=0, out_size=0)
        fresh = {}
        for k in range(8):
            (srv.share / f"new{k}").write_bytes(b"n%d" % k)
            error, payload = fe.fuse(fuse.Opcode.LOOKUP, fuse.ROOT_ID, f"new{k}\0".encode(),
                                     q=1, out_size=256)
            assert error == 0
            nodeid, ino = entry_of(payload)
            fresh[nodeid] = ino
            reclaim(fe, 1)
        for fd in holds:
            os.close(fd)
        answers = fe.finish_all(parked, timeout=5)
        want = -errno.EBADF if storm == "destroy" else 0
        assert [error for error, _ in answers] == [want] * len(parked)
        reclaim(fe, 2)
        for nodeid, ino in fresh.items():
            error, payload = fe.fuse(fuse.Opcode.GETATTR, nodeid, bytes(16), q=2, out_size=256)
            assert error == 0 and attr_ino(payload) == ino
            reclaim(fe, 2)
            srv.forget(nodeid, 1, q=0)
        if storm == "batch_forget":
            for nodeid, fh in held.values():  # the guest's files are still open: release
                srv.release(nodeid, fh, 2)
        settle(srv, f"after {storm} with parked SETLKWs")
        srv.assert_alive(queues=(1, 2))
