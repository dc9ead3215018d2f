"""What a running daemon holds, read from its shared-memory segments without disturbing it
(every worker updates the counters atomically): the inode and open-file tables, the
per-queue counters, its processes. ``report`` (the ``pyvirtiofsd stats`` command),
``watch`` and ``openmetrics`` all read through here.
"""

from __future__ import annotations

import os
import sys

from daemon.stats import queue_stats
from shm_table import HandleTable, InodeTable


def segment_names(pid: int) -> tuple[str, str]:
    """The daemon names its segments after its pid (see supervisor.serve)."""
    return f"/pyvirtiofsd-{pid}-inodes", f"/pyvirtiofsd-{pid}-handles"


def children(pid: int) -> list[int]:
    """A process's children (of its main thread), from /proc; [] once it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _confinement(pid: int) -> tuple:
    """What a sandbox changes: root directory and namespaces."""
    try:
        root = os.stat(f"/proc/{pid}/root/")
        return ((root.st_dev, root.st_ino),
                *(os.readlink(f"/proc/{pid}/ns/{kind}") for kind in ("mnt", "pid", "user")))
    except OSError:
        return ()


# the process workers are cloned from (workers/template/process.py) while it serves no
# queue; serving queue 0 (workers/template/hiprio.py) it is named pyvfs-tmpl+q0 and counts
# as that queue's worker
TEMPLATE_NAME = "pyvfs-template"


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def processes(pid: int) -> list[int]:
    """The supervisor and its workers. With --sandbox the pid file names the process
    that stayed outside: the supervisor is down its line of single children that live
    in another root or other namespaces."""
    kids = children(pid)
    while len(kids) == 1 and (_confinement(kids[0]) != _confinement(pid)
                              or _is_keeper(kids[0])):
        pid = kids[0]
        kids = children(pid)
    return [pid, *kids]


def _is_keeper(pid: int) -> bool:
    """The supervisor's keeper (workers/handover/keeper.py) stands between the process
    outside and the supervisor; with --sandbox chroot it is not confined itself."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "pyvfs-keeper"
    except OSError:
        return False


def read_tables(pid: int) -> dict:
    """One reading of everything the daemon shares: its processes, the inode and open-file
    tables' statistics and the per-queue counters (an empty list from a daemon without
    them). SystemExit, with the reason, when the daemon's tables cannot be attached."""
    inode_name, handle_name = segment_names(pid)
    try:
        inodes = InodeTable.attach(inode_name)
    except Exception as e:  # noqa: BLE001 - any attach failure means the same to the user
        raise SystemExit(f"pyvirtiofsd stats: no tables for pid {pid} ({e}); "
                         "is the daemon running?") from None
    try:
        try:
            handles = HandleTable.attach(handle_name)
        except Exception as e:  # noqa: BLE001 - as above
            raise SystemExit(f"pyvirtiofsd stats: no tables for pid {pid} ({e}); "
                             "is the daemon running?") from None
        try:
            inode_stats, handle_stats = inodes.stats(), handles.stats()
        finally:
            handles.detach()
    finally:
        inodes.detach()
    try:
        counters = queue_stats.QueueStats.attach(queue_stats.segment_name(pid))
    except ValueError as e:  # another version's segment: say so rather than show nothing
        print(f"pyvirtiofsd stats: {e}", file=sys.stderr)
        counters = None
    except Exception:  # noqa: BLE001 - a daemon from before per-queue counters
        counters = None
    try:
        rows = counters.rows() if counters else []
    finally:
        if counters:
            counters.close()
    supervisor, *children = processes(pid)
    workers = [p for p in children if _comm(p) != TEMPLATE_NAME]
    try:
        fds = len(os.listdir(f"/proc/{supervisor}/fd"))
    except OSError:
        fds = -1
    return {"pid": pid, "workers": len(workers), "fds_held": fds, "inodes": inode_stats,
            "handles": handle_stats, "queues": rows}
