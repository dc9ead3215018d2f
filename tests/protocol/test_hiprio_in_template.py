"""The high-priority queue (0) is served by the worker template, not by a process of its
own (workers/template/hiprio.py): a real daemon with one request queue, its real processes, the
shared inode table and the FUSE answers a guest sees."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import time
from pathlib import Path

import pytest

from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu
from daemon.stats.queue_stats import QueueStats, segment_name
from shm_table import InodeTable
from tests.protocol.test_control_plane import Hang
from tests.protocol.test_hostile_guest import KNOWN, Served, serve, worker_pids
from tests.protocol.test_live_upgrade import upgrade
from tests.protocol.test_worker_template import children, ppid_and_name

HOSTING = "pyvfs-tmpl+q0"
R = vu.Request


def queue0_requests(pid: int) -> int:
    stats = QueueStats.attach(segment_name(pid))
    try:
        return stats.rows()[0]["requests"]
    finally:
        stats.close()


def latest_worker(srv: Served, q: int, old: int) -> int:
    """Queue q's worker started after ``old``, once the log names it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pid = worker_pids(srv.log()).get(q)
        if pid is not None and pid != old:
            return pid
        time.sleep(0.05)
    raise AssertionError(f"queue {q}'s worker {old} was not replaced:\n{srv.log()}")


def processes_become(srv: Served, expected: dict[int, str]) -> None:
    """The daemon's children are exactly ``expected`` (pid: name) within a few seconds."""
    deadline = time.monotonic() + 5
    while children(srv.proc.pid) != expected:
        assert time.monotonic() < deadline, (children(srv.proc.pid), expected)
        time.sleep(0.02)


def forgotten_on_queue0(srv: Served, names: list[bytes], batch: bool) -> None:
    """Look each name up twice on queue 1, FORGET (or one BATCH_FORGET) all the lookups on
    queue 0: the inodes leave the shared table."""
    table = InodeTable.attach(f"/pyvirtiofsd-{srv.proc.pid}-inodes")
    try:
        nodeids = []
        for name in names:
            for _ in range(2):
                error, nodeid, _mode = srv.lookup(fuse.ROOT_ID, name)
                assert error == 0
            assert table.lookups(nodeid) == 2
            nodeids.append(nodeid)
        if batch:
            arg = fuse.BATCH_FORGET_IN.pack(len(nodeids), 0) + b"".join(
                fuse.FORGET_ONE.pack(n, 2) for n in nodeids)
            written, _, _ = srv.request(fuse.Opcode.BATCH_FORGET, 0, arg, q=0, out_size=0)
            assert written == 0
        else:
            for n in nodeids:
                srv.forget(n, 2, q=0)
        deadline = time.monotonic() + 5
        while any(table.get(n) is not None for n in nodeids):
            assert time.monotonic() < deadline, [table.get(n) for n in nodeids]
            time.sleep(0.01)
    finally:
        table.detach()


def interrupted_setlkw(srv: Served, name: bytes) -> None:
    """A SETLKW waiting on queue 1 for a host process's lock ends with EINTR when the
    guest INTERRUPTs it on queue 0."""
    held = os.open(srv.share / name.decode(), os.O_RDWR)
    fcntl.fcntl(held, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    try:
        error, nodeid, _ = srv.lookup(fuse.ROOT_ID, name)
        assert error == 0
        error, fh = srv.open(nodeid, os.O_RDWR)
        assert error == 0
        fe = srv.fe
        fe.unique = srv.next_unique()
        waiting = fe.start(fuse.Opcode.SETLKW, nodeid,
                           fuse.LK_IN.pack(fh, 7, 0, fuse.OFFSET_MAX, fcntl.F_WRLCK, 0, 0, 0))
        with pytest.raises(TimeoutError):  # it really waits for the host's lock
            fe.wait_used(1, timeout=0.3)
        interrupt = fe.start(fuse.Opcode.INTERRUPT, 0, fuse.INTERRUPT_IN.pack(waiting.unique),
                             q=0, out_size=0)
        assert fe.finish_all([waiting, interrupt], timeout=5) == [(-errno.EINTR, b""), (0, b"")]
        srv.unique = fe.unique
        srv.release(nodeid, fh)
        srv.forget(nodeid, 1)
    finally:
        os.close(held)


def test_queue0_is_served_by_the_template(tmp_path: Path) -> None:
    """One request queue: the supervisor has two children, the template (serving queue 0,
    named so) and queue 1's worker. FORGET, BATCH_FORGET and INTERRUPT on queue 0 act
    and are counted; the template killed, queue 0 comes back in a new template, which
    clones the next request worker; a stopped and restarted queue 0 (GET_VRING_BASE,
    then SET_VRING_KICK) leaves the template cloning in between and serving after."""
    with serve(tmp_path, "--posix-lock", num_queues=2) as srv:
        for name in (b"a", b"b", b"c"):
            (srv.share / name.decode()).write_bytes(b"x")
        hosting = srv.workers[0]
        processes_become(srv, {hosting: HOSTING, srv.workers[1]: "pyvfs-q1"})
        assert ppid_and_name(srv.workers[1])[0] == srv.proc.pid

        before = queue0_requests(srv.proc.pid)
        forgotten_on_queue0(srv, [b"a", b"b"], batch=True)
        forgotten_on_queue0(srv, [b"c"], batch=False)
        interrupted_setlkw(srv, b"a")
        assert queue0_requests(srv.proc.pid) == before + 3

        # the process serving queue 0 killed: a new template serves it, and clones
        mark = srv.mark()
        os.kill(hosting, signal.SIGKILL)
        srv.expect_log(mark, rf"queue 0: worker {hosting} died")
        hosting = srv.workers[0] = latest_worker(srv, 0, hosting)
        processes_become(srv, {hosting: HOSTING, srv.workers[1]: "pyvfs-q1"})
        forgotten_on_queue0(srv, [b"b"], batch=True)
        old = srv.workers[1]
        os.kill(old, signal.SIGKILL)
        srv.workers[1] = latest_worker(srv, 1, old)
        processes_become(srv, {hosting: HOSTING, srv.workers[1]: "pyvfs-q1"})
        srv.assert_serves(1)
        interrupted_setlkw(srv, b"b")
        assert "cloning the worker directly" not in srv.log()

        # queue 0 stopped: the template stays, idle, and still clones
        fe = srv.fe
        index, base = vu.decode_vring_state(fe.call(R.GET_VRING_BASE, vu.VRING_STATE.pack(0, 0)))
        assert index == 0
        processes_become(srv, {hosting: "pyvfs-template", srv.workers[1]: "pyvfs-q1"})
        old = srv.workers[1]
        os.kill(old, signal.SIGKILL)
        srv.workers[1] = latest_worker(srv, 1, old)
        processes_become(srv, {hosting: "pyvfs-template", srv.workers[1]: "pyvfs-q1"})
        srv.assert_serves(1)
        # and started again: the same template serves it
        mark = srv.mark()
        assert fe.ack(R.SET_VRING_BASE, vu.VRING_STATE.pack(0, base)) == 0
        ring = fe.rings[0]
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        assert fe.ack(R.SET_VRING_KICK, vu.U64.pack(0), [kick]) == 0
        os.close(ring.kick)
        ring.kick = kick
        assert fe.ack(R.SET_VRING_ENABLE, vu.VRING_STATE.pack(0, 1)) == 0
        srv.expect_log(mark, rf"queue 0: worker {hosting} started")
        processes_become(srv, {hosting: HOSTING, srv.workers[1]: "pyvfs-q1"})
        forgotten_on_queue0(srv, [KNOWN, b"c"], batch=True)
        interrupted_setlkw(srv, b"c")
        assert "Traceback" not in srv.log()


def test_queue0_asleep_in_the_host_does_not_hold_up_clones(tmp_path: Path) -> None:
    """A guest makes the template sleep in a host openat on queue 0 (an OPEN of a file
    the test holds a lease on). A request worker killed meanwhile is back within a second
    (the template is given up after half a second and the supervisor clones it), queue 0
    comes back in a new template (which replays the OPEN and sleeps again until the
    lease goes), and once the lease is gone queue 0 answers again and the template
    clones the next request worker itself."""
    with serve(tmp_path, num_queues=2) as srv:
        hang = Hang(srv, "lease", 0)
        try:
            template = srv.workers[0]
            hang(template)
            mark = srv.mark()
            old = srv.workers[1]
            started = time.monotonic()
            os.kill(old, signal.SIGKILL)
            srv.workers[1] = latest_worker(srv, 1, old)
            assert time.monotonic() - started < 1.5
            srv.expect_log(mark, rf"worker template {template}: .*did not answer; cloning "
                           "the worker directly")
            srv.assert_serves(1)
            srv.workers[0] = latest_worker(srv, 0, template)
            assert template not in children(srv.proc.pid)  # killed and reaped
            hang(srv.workers[0])  # the new template replays the OPEN
        finally:
            hang.release()
        [(error, _)] = srv.fe.finish_all(list(hang.pending.values()))  # type: ignore[arg-type]
        assert error == 0
        processes_become(srv, {srv.workers[0]: HOSTING, srv.workers[1]: "pyvfs-q1"})
        forgotten_on_queue0(srv, [KNOWN], batch=False)
        mark = srv.mark()
        old = srv.workers[1]
        os.kill(old, signal.SIGKILL)
        srv.workers[1] = latest_worker(srv, 1, old)
        srv.assert_serves(1)
        assert "cloning the worker directly" not in srv.log()[mark:]


def test_live_upgrade_while_the_template_serves_queue0(tmp_path: Path) -> None:
    """--sandbox none: the old template goes on serving queue 0 while the new code starts
    (it clones no more), then exits when the new program stops it; the new program's
    template serves queue 0, no old process is left, and FORGET and INTERRUPT on queue
    0 act as before."""
    with serve(tmp_path, "--posix-lock", "--sandbox", "none", num_queues=2) as srv:
        for name in (b"a", b"b"):
            (srv.share / name.decode()).write_bytes(b"x")
        old = dict(srv.workers)
        mark = srv.mark()
        assert "live upgrade 1, serving" in upgrade(srv)
        srv.expect_log(mark, "old workers stopped")
        for q in (0, 1):
            srv.workers[q] = latest_worker(srv, q, old[q])
        processes_become(srv, {srv.workers[0]: HOSTING, srv.workers[1]: "pyvfs-q1"})
        forgotten_on_queue0(srv, [b"a", b"b"], batch=True)
        interrupted_setlkw(srv, b"a")
        srv.assert_serves(1)


def test_a_flooded_queue0_still_clones_promptly(tmp_path: Path) -> None:
    """A guest keeps queue 0 full for two seconds (BATCH_FORGETs of 65,536 unknown
    nodeids each, the ring refilled as it is used): a request worker killed meanwhile is
    cloned by the template (no fallback to the supervisor, which waits half a second), while
    queue 0 is still being flooded; every BATCH_FORGET is consumed."""
    with serve(tmp_path, num_queues=2) as srv:
        fe = srv.fe
        n = 65536
        arg = fuse.BATCH_FORGET_IN.pack(n, 0) + b"".join(
            fuse.FORGET_ONE.pack((1 << 40) | i, 1) for i in range(n))
        hdr = fuse.IN_HEADER.pack(fuse.IN_HEADER_SIZE + len(arg), fuse.Opcode.BATCH_FORGET,
                                  srv.next_unique(), 0, 0, 0, 1, 0, 0)
        [(gpa, length, _)] = fe.make_buffers([hdr + arg], [])
        ring = fe.rings[0]
        outstanding = 0
        for _ in range(ring.size - 1):
            fe.submit_descs(0, [(gpa, length, 0)])
            outstanding += 1
        old = srv.workers[1]
        started = time.monotonic()
        killed_at = restarted_at = 0.0
        while time.monotonic() - started < 2 or not restarted_at:
            assert time.monotonic() - started < 10, srv.log()
            fe.wait_used(0, timeout=5)
            fe.submit_descs(0, [(gpa, length, 0)])  # one used, one more in its place
            now = time.monotonic()
            if not killed_at and now - started > 0.5:
                os.kill(old, signal.SIGKILL)
                killed_at = now
            elif killed_at and not restarted_at and worker_pids(srv.log())[1] != old:
                restarted_at = now
        assert restarted_at - killed_at < 1, restarted_at - killed_at  # (no fallback: below)
        assert time.monotonic() - restarted_at > 0.5  # the flood went on after the clone
        for _ in range(outstanding):
            fe.wait_used(0, timeout=10)
        assert "cloning the worker directly" not in srv.log()
        srv.workers[1] = worker_pids(srv.log())[1]
        processes_become(srv, {srv.workers[0]: HOSTING, srv.workers[1]: "pyvfs-q1"})
        srv.assert_serves(1)
