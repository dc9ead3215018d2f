"""Workers are cloned from a still template process (workers/template/process.py), not from the
supervisor, so that the supervisor's activity after a clone does not make the worker's
pages private: a real daemon, its real processes, their /proc figures."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from daemon.protocol import fuse
from tests.protocol.test_hostile_guest import KNOWN, KNOWN_DATA, Served, serve


def ppid_and_name(pid: int) -> tuple[int, str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    name = text[text.find("(") + 1 : text.rfind(")")]
    return int(text[text.rfind(")") + 2 :].split()[1]), name


def children(pid: int) -> dict[int, str]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid, name = ppid_and_name(int(entry))
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out[int(entry)] = name
    return out


def private_dirty_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:"))


def reads_known(srv: Served, q: int) -> bytes:
    error, payload = srv.call(fuse.Opcode.LOOKUP, fuse.ROOT_ID, KNOWN + b"\0", q=q)
    assert error == 0
    nodeid = int.from_bytes(payload[:8], "little")
    error, fh = srv.open(nodeid, q=q)
    assert error == 0
    error, data = srv.call(fuse.Opcode.READ, nodeid,
                           fuse.READ_IN.pack(fh, 0, 8192, 0, 0, 0, 0), q=q, out_size=16384)
    assert error == 0
    srv.release(nodeid, fh, q=q)
    return data


def restarted(srv: Served, q: int, old: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        starts = re.findall(rf"queue {q}: worker (\d+) started", srv.log())
        if starts and int(starts[-1]) != old:
            return int(starts[-1])
        time.sleep(0.05)
    raise AssertionError(f"queue {q}'s worker was not restarted:\n{srv.log()}")


def test_workers_are_the_supervisors_children_cloned_from_the_template(tmp_path: Path) -> None:
    """One template, which serves queue 0 (workers/template/hiprio.py) and is named so; every
    request queue's worker is the supervisor's child (reaped and PDEATHSIG'd by it) and
    names its queue; a request worker has fewer private pages than the supervisor (cloned
    from the supervisor, each had as many: ~3 MB)."""
    with serve(tmp_path, num_queues=3) as srv:
        assert reads_known(srv, 1) == KNOWN_DATA and reads_known(srv, 2) == KNOWN_DATA
        kids = children(srv.proc.pid)
        assert len(kids) == 3, kids
        assert kids.get(srv.workers[0]) == "pyvfs-tmpl+q0", kids
        for q in (1, 2):
            assert kids.get(srv.workers[q]) == f"pyvfs-q{q}", (q, kids)
        supervisor = private_dirty_kb(srv.proc.pid)
        for q in (1, 2):
            mine = private_dirty_kb(srv.workers[q])
            assert mine < supervisor - 512, (q, mine, supervisor)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_a_worker_restarts_when_the_template_is_gone(tmp_path: Path, how: int) -> None:
    """SIGKILL or SIGSTOP the template (queue 0's worker too), then a request worker.
    Killed: queue 0 is restarted at once in a new template, which clones the request
    worker's replacement. Stopped: the supervisor waits half a second for it, kills and
    reaps it, and clones the replacement itself; queue 0 then restarts in a new template.
    Every ring is served again, and the next restart is cloned by the new template."""
    with serve(tmp_path, num_queues=3) as srv:
        template = srv.workers[0]
        assert children(srv.proc.pid)[template] == "pyvfs-tmpl+q0"
        os.kill(template, how)
        if how == signal.SIGKILL:
            srv.workers[0] = restarted(srv, 0, template)
        old = srv.workers[1]
        os.kill(old, signal.SIGKILL)
        srv.workers[1] = restarted(srv, 1, old)
        assert ("cloning the worker directly" in srv.log()) == (how == signal.SIGSTOP)
        if how == signal.SIGSTOP:
            srv.workers[0] = restarted(srv, 0, template)
        assert reads_known(srv, 1) == KNOWN_DATA
        assert reads_known(srv, 0) == KNOWN_DATA
        assert ppid_and_name(srv.workers[1]) == (srv.proc.pid, "pyvfs-q1")
        assert template not in children(srv.proc.pid)  # reaped, not left a zombie

        old = srv.workers[2]
        os.kill(old, signal.SIGKILL)
        srv.workers[2] = restarted(srv, 2, old)
        assert reads_known(srv, 2) == KNOWN_DATA
        names = sorted(children(srv.proc.pid).values())
        assert names == ["pyvfs-q1", "pyvfs-q2", "pyvfs-tmpl+q0"], names
        assert ppid_and_name(srv.workers[2]) == (srv.proc.pid, "pyvfs-q2")
