"""Load generator that plays QEMU and a Linux guest's virtio-fs driver.

It connects to any vhost-user-fs back-end socket, shares memfd guest memory, asks the
back-end how many queues it has (GET_QUEUE_NUM: the high-priority queue plus the request
queues), sets up the high-priority queue and 1..N request queues, and drives FUSE requests
straight into the rings at a chosen queue depth, one driver thread per request queue.

The inner loop is C (``benchmarks/_loadgen_build.py``, built on first use) because a
Python driver cannot keep a back-end busy on this 2-core machine: see
``docs/performance.md`` ("Why the generator is C") and ``--engine py`` below, which runs
the same GETATTR loop in Python for comparison.

Usage (against a daemon already listening)::

    python3 -m benchmarks.loadgen SOCKET --workload getattr --qd 16 --queues 1 --seconds 2
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import shutil
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks._loadgen_build import load
from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu
from tests.support.frontend import GUEST_BASE, UVA_BASE, Frontend

WORKLOADS: dict[str, dict[str, Any]] = {
    # name: C workload id, io size, description
    "getattr": {"id": 0, "io": 0, "what": "GETATTR of one file"},
    "lookup_forget": {"id": 1, "io": 0, "what": "LOOKUP of one name + FORGET (hiprio)"},
    "create_release_unlink": {"id": 2, "io": 0,
                              "what": "CREATE + RELEASE + UNLINK (+ FORGET) of a new file, "
                                      "in a directory of each queue's own"},
    "readdirplus": {"id": 3, "io": 0,
                    "what": "READDIRPLUS (4 KiB buffer) over a 1,000-entry directory"},
    "read_4k": {"id": 4, "io": 4096, "what": "4 KiB READ at a random offset of 64 MiB"},
    "write_4k": {"id": 5, "io": 4096, "what": "4 KiB WRITE at a random offset of 64 MiB"},
    "read_1m": {"id": 4, "io": 1 << 20, "what": "1 MiB READ (256 page descriptors)"},
    "write_1m": {"id": 5, "io": 1 << 20, "what": "1 MiB WRITE (256 page descriptors)"},
    # The metadata workloads below each leave the share as they found it (the generator
    # stops a request slot only at the end of its cycle), so cells repeat on one share.
    "mkdir_rmdir": {"id": 6, "io": 0,
                    "what": "MKDIR + RMDIR (+ FORGET) of a new directory, in a directory "
                            "of each queue's own"},
    "mknod_reg_unlink": {"id": 7, "io": 0, "variant": stat.S_IFREG,
                         "what": "MKNOD (S_IFREG) + UNLINK (+ FORGET), per-queue directory"},
    "mknod_fifo_unlink": {"id": 7, "io": 0, "variant": stat.S_IFIFO,
                          "what": "MKNOD (S_IFIFO) + UNLINK (+ FORGET), per-queue directory"},
    "symlink_unlink": {"id": 8, "io": 0,
                       "what": "SYMLINK + UNLINK (+ FORGET), per-queue directory"},
    "rename": {"id": 9, "io": 0,
               "what": "RENAME of a file to and fro in its directory (one op per RENAME; "
                       "each slot's file made by MKNOD first, unlinked at the end)"},
    "setattr_chmod": {"id": 10, "io": 0, "variant": 0,
                      "what": "SETATTR mode (chmod 0644/0600) of one file"},
    "setattr_truncate": {"id": 10, "io": 0, "variant": 1,
                         "what": "SETATTR size (truncate to 0/4096, no handle) of one file"},
    "setattr_utimes": {"id": 10, "io": 0, "variant": 2,
                       "what": "SETATTR atime+mtime (utimes) of one file"},
    "open_release": {"id": 11, "io": 0, "what": "OPEN (read-only) + RELEASE of one file"},
}
# Workloads that work in each queue's own directory (as CREATE does)
PER_QUEUE_DIR = {"create_release_unlink", "mkdir_rmdir", "mknod_reg_unlink",
                 "mknod_fifo_unlink", "symlink_unlink", "rename"}

MAX_QD = 64
SLOT_STRIDE = 32768 + (1 << 20)  # see S_DATA in _loadgen_build.py
FILE_SIZE = 64 << 20
LAT_CAP = 1 << 20
# Share layout the workloads expect (made by prepare_share).
STAT_FILE = b"stat_target"
DATA_FILE = b"data64m"
DIR_1000 = b"dir1000"
CREATE_DIR = b"createdir"
SETATTR_FILE = b"setattr_target"
# A Linux guest holds a directory's lock while it creates or unlinks in it, so two vCPUs
# only ever create concurrently in two directories: each queue gets one (q1, q2, ...).
MAX_QUEUES = 16
# The front-ends lg_run can play (benchmarks/_loadgen_build.py): "batch" resubmits every
# completion at once and publishes them with one kick decision; "driver" behaves like
# Linux's virtio-fs driver under a process per request: it looks at the used ring only
# when an interrupt says so, re-arms interrupts before completing, spends
# completion_us of guest time per completion and publishes each new request on its own.
# At 3 µs the generator's one thread (the whole guest here) is the bottleneck at QD16 for
# every daemon and hides how the device signals; 1 µs shows it (docs/performance.md).
FRONTENDS = {"batch": 0, "driver": 1}
COMPLETION_US = 1.0


def prepare_share(root: str) -> None:
    """Create the files the workloads use (idempotent)."""
    os.makedirs(root, exist_ok=True)
    for name in (STAT_FILE, SETATTR_FILE):
        with open(os.path.join(root, name.decode()), "ab"):
            pass
    data = os.path.join(root, DATA_FILE.decode())
    if not os.path.exists(data) or os.path.getsize(data) != FILE_SIZE:
        with open(data, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(FILE_SIZE >> 20):
                f.write(block)
    d = os.path.join(root, DIR_1000.decode())
    os.makedirs(d, exist_ok=True)
    have = set(os.listdir(d))
    for i in range(1000):
        name = f"entry_{i:04d}"
        if name not in have:
            with open(os.path.join(d, name), "wb"):
                pass
    cd = os.path.join(root, CREATE_DIR.decode())
    for q in range(1, MAX_QUEUES + 1):
        qd = os.path.join(cd, f"q{q}")
        os.makedirs(qd, exist_ok=True)
        for name in os.listdir(qd):  # what an interrupted run left
            path = os.path.join(qd, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)


@dataclass
class RunResult:
    workload: str
    qd: int
    queues: int
    ops: int = 0
    requests: int = 0
    errors: int = 0
    first_error: int = 0
    first_error_opcode: int = 0
    bytes: int = 0
    seconds: float = 0.0
    stalls: int = 0
    frontend: str = "batch"
    wakeups: int = 0  # call eventfd reads that returned: interrupts the front-end took
    kicks: int = 0  # kick eventfd writes
    gen_cpu: float = 0.0  # generator's own CPU seconds (all threads)
    lat_ns: list[int] = field(default_factory=list, repr=False)
    # each request queue's own figures: ops, ops_per_s, p50_us, p99_us
    per_queue: list[dict[str, float]] = field(default_factory=list, repr=False)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.lat_ns:
            return 0.0
        s = sorted(self.lat_ns)
        return s[min(len(s) - 1, int(p / 100 * len(s)))] / 1000.0  # µs

    def summary(self) -> dict[str, Any]:
        return {
            "workload": self.workload, "qd": self.qd, "queues": self.queues,
            "ops": self.ops, "requests": self.requests, "errors": self.errors,
            "first_error": self.first_error, "first_error_opcode": self.first_error_opcode,
            "seconds": self.seconds, "ops_per_s": self.ops_per_s,
            "bytes_per_s": self.bytes / self.seconds if self.seconds else 0.0,
            "p50_us": self.percentile(50), "p99_us": self.percentile(99),
            "stalls": self.stalls, "frontend": self.frontend,
            "wakeups": self.wakeups, "kicks": self.kicks,
            "wakeups_per_request": self.wakeups / self.requests if self.requests else 0.0,
            "kicks_per_request": self.kicks / self.requests if self.requests else 0.0,
            "gen_cpu_s": self.gen_cpu,
            "gen_cpu_share": self.gen_cpu / self.seconds if self.seconds else 0.0,
        }  # fmt: skip


def queue_figures(q: int, ops: int, seconds: float, lat_ns: list[int]) -> dict[str, float]:
    """One request queue's throughput and latency percentiles (µs)."""
    s = sorted(lat_ns)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(p / 100 * len(s)))] / 1000.0 if s else 0.0

    return {"queue": q, "ops": ops, "ops_per_s": ops / seconds if seconds else 0.0,
            "p50_us": pct(50), "p99_us": pct(99)}


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class LoadGen:
    """One vhost-user connection: set up, run workloads, close (the daemon then exits)."""

    def __init__(self, socket_path: str, queues: int = 1, queue_size: int = 1024) -> None:
        self.lib_mod = load()
        self.ffi, self.lib = self.lib_mod.ffi, self.lib_mod.lib
        slot_bytes = queues * MAX_QD * SLOT_STRIDE
        self.fe = Frontend(socket_path, memory_size=slot_bytes + (8 << 20),
                           queue_size=queue_size)
        num = self._setup(queues)
        self.device_queues = num  # hiprio + request queues the back-end serves
        self.queues = max(1, min(queues, num - 1))
        for index in range(1 + self.queues):
            self.fe.add_ring(index)
        self.init_reply = self.fe.init()
        self._mem_buf = self.ffi.from_buffer(self.fe.mem)
        self.mem_host = int(self.ffi.cast("uintptr_t", self._mem_buf))
        self.slot_gpa = {q: self.fe.alloc(MAX_QD * SLOT_STRIDE, 4096)
                         for q in range(1, self.queues + 1)}
        hi = self.fe.rings[0]
        self.hiprio_cfg = self._ring_cfg(0)
        self.hiprio = self.lib.lg_hiprio_new(self.hiprio_cfg,
                                             self.fe.alloc(64 * hi.size, 64))
        self.unique = 1 << 40

    def _setup(self, queues: int) -> int:
        """QEMU's order (as ``Frontend.setup``), with GET_QUEUE_NUM once MQ is agreed;
        returns the back-end's queue count."""
        fe = self.fe
        features = vu.decode_u64(fe.call(vu.Request.GET_FEATURES))
        acked = vu.VIRTIO_F_VERSION_1 | vu.VHOST_USER_F_PROTOCOL_FEATURES
        acked |= features & (vu.VIRTIO_RING_F_INDIRECT_DESC | vu.VIRTIO_RING_F_EVENT_IDX)
        fe.event_idx = bool(features & vu.VIRTIO_RING_F_EVENT_IDX)
        fe.send(vu.Request.SET_OWNER)
        pf = vu.decode_u64(fe.call(vu.Request.GET_PROTOCOL_FEATURES))
        fe.send(vu.Request.SET_PROTOCOL_FEATURES,
                vu.U64.pack(pf & (vu.ProtocolFeature.MQ | vu.ProtocolFeature.REPLY_ACK)))
        num = 2
        if pf & vu.ProtocolFeature.MQ:
            num = vu.decode_u64(fe.call(vu.Request.GET_QUEUE_NUM))
        if fe.ack(vu.Request.SET_FEATURES, vu.U64.pack(acked)) != 0:
            raise RuntimeError("SET_FEATURES refused")
        table = vu.MEM_TABLE_HEAD.pack(1, 0) + vu.MEM_REGION.pack(
            GUEST_BASE, fe.size, UVA_BASE, 0)
        if fe.ack(vu.Request.SET_MEM_TABLE, table, [fe.memfd]) != 0:
            raise RuntimeError("SET_MEM_TABLE refused")
        return num

    def _ring_cfg(self, q: int) -> Any:
        r = self.fe.rings[q]
        cfg = self.ffi.new("lg_ring *")
        cfg.mem_host = self.mem_host
        cfg.gpa_base = GUEST_BASE
        cfg.desc_gpa, cfg.avail_gpa, cfg.used_gpa = r.desc, r.avail, r.used
        cfg.size = r.size
        cfg.kick_fd, cfg.call_fd = r.kick, r.call
        cfg.event_idx = 1 if self.fe.event_idx else 0
        cfg.next_avail, cfg.last_used = r.next_avail, r.last_used
        return cfg

    # ----- synchronous requests for set-up (Python, direct descriptors) -------------

    def request(self, opcode: int, nodeid: int, arg: bytes = b"", q: int = 1,
                out_size: int = 4096) -> bytes:
        mark = self.fe.brk
        try:
            err, payload = self.fe.fuse(opcode, nodeid, arg, q=q, out_size=out_size)
        finally:
            self.fe.brk = mark
        if err:
            raise OSError(-err, f"opcode {opcode} on nodeid {nodeid}: {os.strerror(-err)}")
        return payload

    def lookup(self, parent: int, name: bytes) -> int:
        nodeid = struct.unpack_from("<Q", self.request(fuse.Opcode.LOOKUP, parent,
                                                       name + b"\0"))[0]
        if nodeid == 0:  # a negative entry: the name does not exist
            raise FileNotFoundError(f"{name.decode(errors='replace')} in nodeid {parent} "
                                    "(prepare_share makes the workloads' files)")
        return nodeid

    def open(self, nodeid: int, flags: int = os.O_RDWR, q: int = 1) -> int:
        out = self.request(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(flags, 0), q=q)
        return struct.unpack_from("<Q", out)[0]

    def opendir(self, nodeid: int, q: int = 1) -> int:
        out = self.request(fuse.Opcode.OPENDIR, nodeid, fuse.OPEN_IN.pack(os.O_RDONLY, 0), q=q)
        return struct.unpack_from("<Q", out)[0]

    def release(self, nodeid: int, fh: int, opcode: int = fuse.Opcode.RELEASE) -> None:
        self.request(opcode, nodeid, fuse.RELEASE_IN.pack(fh, 0, 0, 0), out_size=16)

    # ----- load ------------------------------------------------------------------------

    def run(self, workload: str, qd: int, seconds: float, seed: int = 1,
            engine: str = "c", frontend: str = "batch",
            completion_us: float = COMPLETION_US) -> RunResult:
        """Drive one workload at queue depth qd for about seconds; frontend picks how the
        guest side waits, completes and kicks (FRONTENDS); completion_us is the driver
        front-end's guest time per completion."""
        spec = WORKLOADS[workload]
        if not 1 <= qd <= MAX_QD:
            raise ValueError(f"queue depth {qd} not in 1..{MAX_QD}")
        nodeid = 1
        handles: dict[int, list[int]] = {}
        dirs: dict[int, int] = {}  # queue -> its CREATE directory
        name = b""
        release_op = fuse.Opcode.RELEASE
        if workload == "getattr":
            nodeid = self.lookup(1, STAT_FILE)
        elif workload == "lookup_forget":
            name = STAT_FILE
        elif workload in PER_QUEUE_DIR:
            name = STAT_FILE if workload == "symlink_unlink" else b""  # the link's target
            top = self.lookup(1, CREATE_DIR)
            dirs = {q: self.lookup(top, f"q{q}".encode()) for q in range(1, self.queues + 1)}
        elif workload.startswith("setattr_"):
            nodeid = self.lookup(1, SETATTR_FILE)
        elif workload == "open_release":
            nodeid = self.lookup(1, STAT_FILE)
        elif workload == "readdirplus":
            nodeid = self.lookup(1, DIR_1000)
            release_op = fuse.Opcode.RELEASEDIR
            handles = {q: [self.opendir(nodeid, q) for _ in range(qd)]
                       for q in range(1, self.queues + 1)}
        else:
            nodeid = self.lookup(1, DATA_FILE)
            handles = {q: [self.open(nodeid, q=q)] * qd for q in range(1, self.queues + 1)}
        jobs = []
        cfgs = []
        for q in range(1, self.queues + 1):
            job = self.ffi.new("lg_job *")
            job.workload = spec["id"]
            job.qd = qd
            job.seconds = seconds
            job.slot_gpa = self.slot_gpa[q]
            job.slot_stride = SLOT_STRIDE
            job.nodeid = dirs.get(q, nodeid)
            for i, fh in enumerate(handles.get(q, [])):
                job.fh[i] = fh
            job.io_size = spec["io"]
            job.variant = spec.get("variant", 0)
            job.file_size = FILE_SIZE
            job.name = name
            job.tag = q
            job.seed = seed * 7919 + q * 104729
            lat = self.ffi.new("uint64_t[]", LAT_CAP)
            job.lat_ns = lat
            job.lat_cap = LAT_CAP
            job.unique_base = self.unique + (q << 48)
            job.frontend = FRONTENDS[frontend]
            job.completion_ns = int(completion_us * 1000)
            jobs.append((job, lat))
            cfgs.append(self._ring_cfg(q))
        cpu0 = _cpu_self()
        if engine == "py":
            if workload != "getattr" or self.queues != 1:
                raise ValueError("the Python engine only drives GETATTR on one queue")
            t0 = time.monotonic()
            n, lats = py_getattr_loop(self, 1, nodeid, qd, seconds)
            res = RunResult(workload, qd, self.queues, ops=n, requests=n,
                            seconds=time.monotonic() - t0, lat_ns=lats)
            res.gen_cpu = _cpu_self() - cpu0
            self.fe.rings[1].free = list(range(self.fe.rings[1].size))
            return res
        rcs: list[int] = [0] * len(jobs)

        def drive(i: int) -> None:
            rcs[i] = self.lib.lg_run(cfgs[i], jobs[i][0], self.hiprio)

        threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gen_cpu = _cpu_self() - cpu0
        res = RunResult(workload, qd, self.queues, gen_cpu=gen_cpu, frontend=frontend)
        for (job, lat), cfg, q in zip(jobs, cfgs, range(1, self.queues + 1), strict=True):
            r = self.fe.rings[q]
            r.next_avail, r.last_used = cfg.next_avail, cfg.last_used
            r.free = list(range(r.size))
            res.ops += job.ops
            res.requests += job.requests
            res.errors += job.errors
            res.bytes += job.bytes
            res.stalls += job.stalls
            res.wakeups += job.wakeups
            res.kicks += job.kicks
            if job.first_error and not res.first_error:
                res.first_error, res.first_error_opcode = job.first_error, job.first_error_opcode
            res.seconds = max(res.seconds, job.elapsed_ns / 1e9)
            mine = self.ffi.unpack(lat, job.lat_n)
            res.lat_ns.extend(mine)
            res.per_queue.append(queue_figures(q, job.ops, job.elapsed_ns / 1e9, mine))
            self.unique = max(self.unique, job.unique_base - (q << 48))
        if any(rcs):
            raise RuntimeError(f"lg_run failed: {rcs}")
        for q, fhs in handles.items():
            for fh in sorted(set(fhs)):
                self.request(release_op, nodeid, fuse.RELEASE_IN.pack(fh, 0, 0, 0), q=q,
                             out_size=16)
        return res

    def close(self) -> None:
        self.lib.lg_hiprio_free(self.hiprio)
        self.hiprio = self.ffi.NULL
        del self._mem_buf
        self.fe.close()


def py_getattr_loop(gen: LoadGen, q: int, nodeid: int, qd: int,
                    seconds: float) -> tuple[int, list[int]]:
    """The GETATTR workload with the ring loop in Python (same layout as the C loop),
    kept to show why the generator is C. Returns (ops, latencies in ns)."""
    fe = gen.fe
    mem = fe.mem
    ring = fe.rings[q]
    size = ring.size
    base = gen.slot_gpa[q]
    off = fe.off
    desc = struct.Struct("<QIHH")
    hdr = fuse.IN_HEADER
    lats: list[int] = []
    t_start: list[int] = [0] * qd
    avail_off = off(ring.avail)
    used_off = off(ring.used)
    unique = 1 << 50

    def submit(i: int) -> None:
        nonlocal unique
        s = base + i * SLOT_STRIDE
        unique += 1
        hdr.pack_into(mem, off(s), 56, fuse.Opcode.GETATTR, unique, nodeid, 0, 0, 1, 0, 0)
        t = off(s + 16384)
        desc.pack_into(mem, t, s, 40, 1, 1)
        desc.pack_into(mem, t + 16, s + 64, 16, 1, 2)
        desc.pack_into(mem, t + 32, s + 4096, 16, 3, 3)
        desc.pack_into(mem, t + 48, s + 4096 + 16, 104, 2, 0)
        desc.pack_into(mem, off(ring.desc) + 16 * i, s + 16384, 64, 4, 0)
        struct.pack_into("<H", mem, avail_off + 4 + 2 * (ring.next_avail % size), i)
        ring.next_avail = (ring.next_avail + 1) & 0xFFFF
        t_start[i] = time.monotonic_ns()

    def publish(old: int) -> None:
        new = ring.next_avail
        struct.pack_into("<H", mem, avail_off + 2, new)
        ev = struct.unpack_from("<H", mem, used_off + 4 + 8 * size)[0]
        if ((new - ev - 1) & 0xFFFF) < ((new - old) & 0xFFFF):
            os.eventfd_write(ring.kick, 1)

    old = ring.next_avail
    for i in range(qd):
        submit(i)
    publish(old)
    deadline = time.monotonic() + seconds
    inflight = qd
    ops = 0
    stopping = False
    while inflight:
        u = struct.unpack_from("<H", mem, used_off + 2)[0]
        if u == ring.last_used:
            struct.pack_into("<H", mem, avail_off + 4 + 2 * size, ring.last_used)
            if struct.unpack_from("<H", mem, used_off + 2)[0] != ring.last_used:
                continue
            select.select([ring.call], [], [], 0.1)
            try:
                os.eventfd_read(ring.call)
            except BlockingIOError:
                os.eventfd_write(ring.kick, 1)
            continue
        old = ring.next_avail
        now = time.monotonic_ns()
        stopping = stopping or time.monotonic() >= deadline
        while ring.last_used != u:
            head = struct.unpack_from("<I", mem, used_off + 4 + 8 * (ring.last_used % size))[0]
            ring.last_used = (ring.last_used + 1) & 0xFFFF
            inflight -= 1
            ops += 1
            lats.append(now - t_start[head])
            if not stopping:
                submit(head)
                inflight += 1
        publish(old)
    return ops, lats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("socket")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="getattr")
    ap.add_argument("--qd", type=int, default=16)
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--engine", choices=["c", "py"], default="c")
    ap.add_argument("--frontend", choices=sorted(FRONTENDS), default="batch",
                    help="batch: resubmit every completion at once; driver: like Linux's "
                         "driver (interrupt-driven, guest time per completion)")
    ap.add_argument("--completion-us", type=float, default=COMPLETION_US,
                    help="the driver front-end's guest time per completion")
    ap.add_argument("--profile", help="write a cProfile of the run to this file")
    args = ap.parse_args()
    gen = LoadGen(args.socket, args.queues)
    print(f"back-end has {gen.device_queues} queues; driving {gen.queues} request queue(s)")
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        res = prof.runcall(gen.run, args.workload, args.qd, args.seconds, engine=args.engine,
                           frontend=args.frontend, completion_us=args.completion_us)
        prof.dump_stats(args.profile)
    else:
        res = gen.run(args.workload, args.qd, args.seconds, engine=args.engine,
                      frontend=args.frontend, completion_us=args.completion_us)
    gen.close()
    for k, v in res.summary().items():
        print(f"{k:>20}: {v:.6g}" if isinstance(v, float) else f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
