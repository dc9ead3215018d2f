"""Per-queue counters (daemon/stats/queue_stats.py, pyvfs_stats_* in
daemon/native/stats.c): after a known sequence of requests, each queue's row says
exactly what happened, whether C or Python answered; `pyvirtiofsd stats` shows the same;
a restarted worker keeps counting."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from daemon.protocol import fuse
from daemon.stats.queue_stats import QueueStats, segment_name
from tests.protocol.test_hostile_guest import KNOWN, KNOWN_DATA, serve, worker_pids
from tests.support.frontend import F_WRITE, GUEST_BASE

REPO = Path(__file__).resolve().parents[2]


def rows(pid: int) -> list[dict]:
    stats = QueueStats.attach(segment_name(pid))
    try:
        return stats.rows()
    finally:
        stats.close()


def test_counters_follow_requests_and_survive_a_worker_restart(tmp_path: Path) -> None:
    with serve(tmp_path) as srv:
        # serve() sent INIT on queue 1 (answered by Python)
        for _ in range(5):
            error, _ = srv.call(fuse.Opcode.GETATTR, fuse.ROOT_ID, bytes(16))  # C
            assert error == 0
        error, nodeid, _ = srv.lookup(fuse.ROOT_ID, KNOWN)  # C
        assert error == 0
        error, fh = srv.open(nodeid, os.O_RDWR)  # Python
        assert error == 0
        error, data = srv.read(nodeid, fh, 1000)  # C
        assert error == 0 and data == KNOWN_DATA[:1000]
        error, _ = srv.call(fuse.Opcode.WRITE, nodeid,
                            fuse.WRITE_IN.pack(fh, 0, 100, 0, 0, 0, 0) + b"w" * 100)  # C
        assert error == 0
        error, _ = srv.call(fuse.Opcode.MKDIR, fuse.ROOT_ID,
                            fuse.MKDIR_IN.pack(0o755, 0) + b"newdir\0")  # Python
        assert error == 0
        error, _ = srv.call(99, fuse.ROOT_ID)  # unknown: ENOSYS from Python
        assert error == -38
        srv.release(nodeid, fh)  # C
        srv.forget(nodeid)  # C, no reply
        # on queue 2: garbage with no room for a reply (a request, unanswered), then a
        # chain with a descriptor outside guest memory (dropped)
        written, _ = srv.chain(2, [b"x" * 40], [])
        assert written == 0
        fe = srv.fe
        head = fe.submit_descs(2, [(GUEST_BASE + fe.size + 4096, 64, F_WRITE)])
        assert srv.wait(2, head)[0] == 0
        deadline = time.monotonic() + 10  # it counts a dropped chain after pushing it
        while rows(srv.proc.pid)[2]["dropped"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)

        q0, q1, q2 = rows(srv.proc.pid)[:3]
        assert q1["by_opcode"] == {"INIT": 1, "GETATTR": 5, "LOOKUP": 1, "OPEN": 1, "READ": 1,
                                   "WRITE": 1, "MKDIR": 1, "OTHER": 1, "RELEASE": 1,
                                   "FORGET": 1}
        assert q1["requests"] == 14
        assert q1["in_c"] == 12  # all but INIT and the unknown opcode (OPEN, MKDIR: C too)
        assert q1["errors"] == 1
        assert q1["read_bytes"] == 1000 and q1["write_bytes"] == 100
        assert q1["dropped"] == 0 and q1["wakeups"] >= 1 and q1["notifies"] >= 1
        assert q2["dropped"] == 1 and q2["requests"] == 1 and q2["errors"] == 0
        assert q2["by_opcode"] == {"OTHER": 1}
        assert q0["requests"] == 0

        out = subprocess.run([sys.executable, "-m", "supervisor", "stats", "--socket-path",
                              str(srv.socket_path), "--json", "--interval", "0.1"],
                             cwd=REPO, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        shown = {r["queue"]: r for r in json.loads(out.stdout)["queues"]}
        assert shown[1]["requests"] == 14 and shown[1]["by_opcode"]["GETATTR"] == 5
        assert shown[2]["dropped"] == 1

        old = srv.workers[1]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while srv.workers.get(1) == old and time.monotonic() < deadline:
            time.sleep(0.05)
            starts = re.findall(r"queue 1: worker (\d+) started", srv.log())
            srv.workers[1] = int(starts[-1])
        assert srv.workers[1] != old, srv.log()
        error, _ = srv.call(fuse.Opcode.GETATTR, fuse.ROOT_ID, bytes(16))
        assert error == 0
        q1 = rows(srv.proc.pid)[1]
        assert q1["requests"] == 15 and q1["by_opcode"]["GETATTR"] == 6
        assert q1["worker_restarts"] == 1  # written by the supervisor
        getattr_ = q1["opcodes"]["GETATTR"]
        assert sum(getattr_["latency"]) == 6 and getattr_["latency_ns"] > 0
        srv.workers = worker_pids(srv.log()) | {1: srv.workers[1]}
