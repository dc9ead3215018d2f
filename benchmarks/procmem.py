"""What a daemon's processes hold in memory, per process and per kind of mapping.

Read from /proc: ``smaps_rollup`` (PSS and its anonymous/file/shmem parts, private dirty),
``status`` (page tables, VmPTE) and, for the breakdown by mapping, ``smaps``. Used by
``benchmarks.memory_matrix``, ``benchmarks.run`` and ``benchmarks.guest`` (MemorySampler,
tree_memory) and ``benchmarks.memory_floor``, so every benchmark reads memory the same way.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field

from daemon.stats.tables import children
from tests.support.reference_daemons import process_tree

ROLLUP_FIELDS = {"Rss": "rss", "Pss": "pss", "Pss_Anon": "pss_anon", "Pss_File": "pss_file",
                 "Pss_Shmem": "pss_shmem", "Private_Dirty": "private_dirty",
                 "Shared_Dirty": "shared_dirty"}


@dataclass
class ProcMemory:
    """One process, in KiB."""

    pid: int
    role: str
    rss: int = 0
    pss: int = 0
    pss_anon: int = 0
    pss_file: int = 0
    pss_shmem: int = 0
    private_dirty: int = 0
    shared_dirty: int = 0
    page_tables: int = 0  # VmPTE
    # PSS by kind of mapping (smaps), when asked for
    by_mapping: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def role_of(pid: int, root: int, order: dict[int, int]) -> str:
    """The process's part in the daemon: its name (a worker names itself ``pyvfs-qN``,
    the process workers are cloned from ``pyvfs-template``, ``pyvfs-tmpl+q0`` while it
    serves queue 0 too; older commits did not, then children are named by start order:
    queue 0 first)."""
    if pid == root:
        return "supervisor"
    comm = _comm(pid)
    if comm == "pyvfs-template":
        return "template"
    if comm == "pyvfs-tmpl+q0":  # the template serving queue 0 (workers/template/hiprio.py)
        return "template+hiprio"
    if comm.startswith("pyvfs-q"):
        return "hiprio" if comm == "pyvfs-q0" else f"queue {comm[7:]}"
    return f"child {order.get(pid, '?')}"


def mapping_kind(name: str) -> str:
    """A smaps mapping's line tail, as one of a few kinds a reader can act on."""
    if "guest-ram" in name:
        return "guest memory"
    if name.startswith("/dev/shm/") or "pyvirtiofsd-lock-owners" in name:
        return "shared tables"
    if name in ("[heap]", ""):
        return "heap (malloc, anon)"
    if name == "[stack]":
        return "stack"
    if ".so" in name:
        return "shared libraries"
    if "python" in os.path.basename(name):
        return "interpreter binary"
    if name.startswith("/memfd:") or name.startswith("memfd:"):
        return "other memfd"
    return "other"


def smaps_by_kind(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    kind = "other"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):  # a mapping's header line
                    parts = line.split(None, 5)
                    kind = mapping_kind(parts[5].strip() if len(parts) > 5 else "")
                elif first == "Pss:":
                    out[kind] = out.get(kind, 0) + int(line.split()[1])
    except OSError:
        pass
    return out


def read_process(pid: int, role: str, detail: bool = False) -> ProcMemory | None:
    m = ProcMemory(pid, role)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ROLLUP_FIELDS:
                    setattr(m, ROLLUP_FIELDS[key], int(line.split()[1]))
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmPTE:"):
                    m.page_tables = int(line.split()[1])
    except OSError:
        return None
    if detail:
        m.by_mapping = smaps_by_kind(pid)
    return m


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def sandbox_roles(root: int) -> dict[int, str]:
    """With a sandbox the process started stays outside and waits for the server it
    forked (both daemons); pyvirtiofsd's server is then a keeper, which clones the
    supervisor (workers/handover/keeper.py), and unprivileged a helper sits between the
    two. Those processes by pid; {} without one."""
    kids = children(root)
    if len(kids) != 1:
        return {}
    server = kids[0]
    below = children(server)
    if _comm(server) != "pyvfs-keeper" and len(below) == 1 and _comm(below[0]) == "pyvfs-keeper":
        # not root: a helper made the user namespace and waits for the keeper
        return {**sandbox_roles(server), root: "outside", server: "helper"}
    if _comm(server) == "pyvfs-keeper":
        inner = [k for k in children(server) if not _comm(k).startswith("pyvfs-")]
        return {root: "outside", server: "keeper", **({inner[0]: "supervisor"} if inner
                                                        else {})}
    if _comm(server).startswith("pyvfs-"):
        return {}  # a template or worker: no sandbox
    return {root: "outside", server: "supervisor"}


def snapshot(root: int, detail: bool = False) -> list[ProcMemory]:
    """Every process of the daemon whose main process is ``root``."""
    pids = process_tree(root)
    order = {p: i for i, p in enumerate(sorted(p for p in pids if p != root))}
    named = sandbox_roles(root)
    out = []
    for pid in pids:
        m = read_process(pid, named.get(pid) or role_of(pid, root, order), detail)
        if m is not None:
            out.append(m)
    first = ("outside", "helper", "keeper", "supervisor", "hiprio")
    return sorted(out, key=lambda m: (first.index(m.role) if m.role in first else 9, m.pid))


def total(procs: list[ProcMemory], key: str = "pss") -> int:
    return sum(getattr(m, key) for m in procs)


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes, summed over pid and its descendants."""
    procs = snapshot(pid)
    return total(procs, "rss") * 1024, total(procs, "pss") * 1024


class MemorySampler:
    """The memory of a daemon's processes sampled every ``interval`` s by a thread while a
    workload runs (``with MemorySampler(pid) as mem: ...``): the largest RSS and PSS totals
    seen (bytes) and the snapshot with the largest PSS total (``peak``). With ``until`` it
    stops sampling that many seconds in and takes one snapshot with the breakdown by
    mapping (``last``), so it is taken while the load still runs."""

    def __init__(self, pid: int, interval: float = 0.1, until: float | None = None) -> None:
        self.pid, self.interval, self.until = pid, interval, until
        self.rss = self.pss = 0
        self.peak: list[ProcMemory] = []
        self.last: list[ProcMemory] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        deadline = None if self.until is None else time.monotonic() + self.until
        while deadline is None or time.monotonic() < deadline:
            procs = snapshot(self.pid)
            self.rss = max(self.rss, total(procs, "rss") * 1024)
            self.pss = max(self.pss, total(procs, "pss") * 1024)
            if total(procs) > total(self.peak):
                self.peak = procs
            if self._stop.wait(self.interval):
                break
        if self.until is not None:
            self.last = snapshot(self.pid, detail=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
