"""In-guest benchmarks: a real Linux 6.12 guest runs fio and a metadata workload on virtio-fs.

    python3 -m benchmarks.guest [--quick] [--rounds N] [--daemons pyvirtiofsd,rust,c]

Each boot starts a fresh daemon on the same share (``guest-bench`` in the journaled ext4 image
that ``benchmarks.run`` uses as its disk share, ``/var/tmp/pyvirtiofsd-bench-disk``) and
a fresh QEMU (TCG, ``-smp 2``, Debian bookworm-backports kernel 6.12, 1 GiB) that mounts it.
Daemons run interleaved (A, B, C, A, B, C, ...) for ``--rounds`` rounds. In the guest:

- fio (the host's ``/usr/bin/fio`` with its libraries, put in the initramfs: loading them over
  9p costs seconds per start under TCG), ``direct=1`` on one file, ``time_based``: 1 MiB
  sequential write and read (psync), 4 KiB random read and write with psync and with libaio at
  queue depth 16. Parsed from fio's JSON: IOPS, bandwidth, completion latency p50/p99.
- metadata: create a tree of small files (10 x 10 directories, 100 files each by default),
  ``find`` it, ``stat`` every entry, ``rm -rf`` it; the guest's caches are dropped before each
  of the last three, so each phase reaches the daemon. Timed in the guest (/proc/uptime).

The host follows phase markers on the guest's second serial port and takes the daemon's CPU
time (all its processes) at each, samples RSS/PSS of its process tree, and counts the guest's
interrupts per request queue. Rust and C virtiofsd serve one request queue, so they get one;
pyvirtiofsd gets two (``pyvirtiofsd-1q``: one). The full run first checks what the reference
daemons do with two. Writes ``benchmarks/results/<date>-guest[-quick].md``, ``.json``,
``.png``.

Under TCG the guest's CPU, not the daemon, sets the pace: these figures show the shape;
the daemon's own speed is in ``python3 -m benchmarks.run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.procmem import MemorySampler
from benchmarks.procmem import tree_memory as tree_mem
from benchmarks.run import (
    DISK_DIR,
    RESULTS,
    fmt_mb,
    fs_type,
    journaled_ext4,
    machine_info,
    mount_disk_image,
    tree_cpu,
)
from tests.support import vm
from tests.support.reference_daemons import Daemon, make

SHARE = DISK_DIR / "guest-bench"
SOCK = Path("/tmp/pyvirtiofsd-guest-bench.sock")
KERNEL, SMP, MEMORY_MB = "6.12", 2, 1024
FIO_DIR = "opt/fio"  # where the fio bundle lives in the guest
LOADER = "/lib64/ld-linux-x86-64.so.2"

# label -> (daemon kind, request queues QEMU gives the device)
CONFIGS: dict[str, tuple[str, int]] = {
    "pyvirtiofsd": ("pyvirtiofsd", 2),
    "pyvirtiofsd-1q": ("pyvirtiofsd", 1),
    "rust": ("rust", 1),
    "c": ("c", 1),
}
LABELS = {"pyvirtiofsd": "pyvirtiofsd", "pyvirtiofsd-1q": "pyvirtiofsd 1q", "rust": "Rust",
          "c": "C"}
COLORS = {"pyvirtiofsd": "tab:blue", "pyvirtiofsd-1q": "tab:cyan", "rust": "tab:orange",
          "c": "tab:green"}


@dataclass(frozen=True)
class FioJob:
    name: str
    rw: str
    bs: str
    engine: str
    depth: int

    @property
    def unit(self) -> str:
        return "MB/s" if self.bs == "1m" else "IOPS"

    def args(self, size_mib: int, seconds: int) -> str:
        return (f"--name={self.name} --filename=/mnt/fio/data --size={size_mib}m "
                f"--rw={self.rw} --bs={self.bs} --ioengine={self.engine} "
                f"--iodepth={self.depth} --direct=1 --time_based --runtime={seconds} "
                f"--output-format=json --output=/tmp/{self.name}.json")


FIO_JOBS = [
    FioJob("seqwrite-1m", "write", "1m", "psync", 1),
    FioJob("seqread-1m", "read", "1m", "psync", 1),
    FioJob("randread-4k-psync", "randread", "4k", "psync", 1),
    FioJob("randread-4k-libaio-qd16", "randread", "4k", "libaio", 16),
    FioJob("randwrite-4k-psync", "randwrite", "4k", "psync", 1),
    FioJob("randwrite-4k-libaio-qd16", "randwrite", "4k", "libaio", 16),
]
META_PHASES = ["create", "find", "stat", "delete"]
WORKLOADS = [j.name for j in FIO_JOBS] + [f"meta-{p}" for p in META_PHASES]


@dataclass(frozen=True)
class Params:
    rounds: int
    fio_seconds: int
    file_mib: int
    tree: tuple[int, int, int]  # top dirs, subdirs each, files each
    fio_jobs: tuple[str, ...] = tuple(j.name for j in FIO_JOBS)  # the fio jobs to run
    meta: bool = True  # run the metadata phases

    @property
    def files(self) -> int:
        a, b, c = self.tree
        return a * b * c


# ----- the guest side -------------------------------------------------------------------------

def fio_bundle() -> dict[str, bytes]:
    """The host's fio, its shared libraries and the loader, as initramfs files."""
    fio = shutil.which("fio")
    if not fio:
        sys.exit("fio not found on the host: apt-get install -y fio (the guest runs the "
                 "host's fio)")
    out = subprocess.run(["ldd", fio], capture_output=True, text=True, check=True).stdout
    libs = [m.group(1) for m in re.finditer(r"=>\s*(/\S+)", out)]
    if not any("libaio" in lib for lib in libs):
        print(f"warning: {fio} does not link libaio: the libaio jobs will fail", file=sys.stderr)
    files = {f"{FIO_DIR}/fio": Path(fio).read_bytes(),
             f"{FIO_DIR}/{Path(LOADER).name}": Path(LOADER).read_bytes()}
    for lib in libs:
        files[f"{FIO_DIR}/{Path(lib).name}"] = Path(lib).read_bytes()
    return files


def guest_script(p: Params) -> str:
    fio = f"/{FIO_DIR}/{Path(LOADER).name} --library-path /{FIO_DIR} /{FIO_DIR}/fio"
    top, sub, per = p.tree
    lines = [
        "up() { read u _ < /proc/uptime; echo $u; }",
        'mark() { echo "@@PH $1 $2 $(up)@@"; }',
        "drop() { sync; echo 3 > /proc/sys/vm/drop_caches; sleep 1; }",
        'echo "@@INFO kernel=$(uname -r)@@"; echo "@@INFO cpus=$(nproc)@@"',
        'mount -t virtiofs myfs /mnt || { echo "@@FAIL mount@@"; exit 1; }',
        "mark start idle; sleep 1; mark end idle",
        f'{fio} --version | sed "s/^/@@INFO fio=/; s/$/@@/"',
    ]
    for job in (j for j in FIO_JOBS if j.name in p.fio_jobs):
        lines += [
            f"mark start {job.name}",
            f"{fio} {job.args(p.file_mib, p.fio_seconds)} > /tmp/{job.name}.log 2>&1",
            "rc=$?",
            f"mark end {job.name}",
            f'echo "@@FIO {job.name} rc=$rc@@"; cat /tmp/{job.name}.json; '
            f'[ $rc = 0 ] || cat /tmp/{job.name}.log; echo "@@ENDFIO@@"',
        ]
    meta = [
        "M=/mnt/meta; rm -rf $M; mkdir $M || exit 1; drop",
        "mark start create",
        f"t=0; while [ $t -lt {top} ]; do mkdir $M/t$t; s=0",
        f"  while [ $s -lt {sub} ]; do mkdir $M/t$t/s$s; f=0",
        f'    while [ $f -lt {per} ]; do echo "small file $t $s $f" > $M/t$t/s$s/f$f; '
        "f=$((f+1)); done",
        "  s=$((s+1)); done; t=$((t+1)); done",
        "mark end create",
        "drop; mark start find; find $M > /tmp/list; mark end find",
        'echo "@@COUNT find $(wc -l < /tmp/list)@@"',
        "drop; mark start stat; xargs stat -c %s < /tmp/list > /tmp/sizes; mark end stat",
        'echo "@@COUNT stat $(wc -l < /tmp/sizes)@@"',
        "drop; mark start delete; rm -rf $M; mark end delete",
        '[ -e $M ] && echo "@@FAIL delete@@"',
    ]
    lines += meta if p.meta else []
    lines += [
        "grep requests /proc/interrupts | "
        "awk '{ s = 0; for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; "
        'print "@@IRQ " $NF " " s "@@" }\'',
        "umount /mnt",
    ]
    return "\n".join(lines) + "\n"


# ----- the host side --------------------------------------------------------------------------

def share_on_journaled_ext4() -> None:
    """The share lives in benchmarks.run's journaled ext4 image: this machine's root ext4
    has no journal, and there file creation slows down after deletions (see
    docs/performance.md, "The disk share")."""
    DISK_DIR.mkdir(parents=True, exist_ok=True)
    if not journaled_ext4(DISK_DIR):
        mount_disk_image()
    SHARE.mkdir(parents=True, exist_ok=True)


def prepare_share(p: Params) -> None:
    """A fresh share holding only fio's data file (written once here, so the guest does
    not lay it out at every boot)."""
    share_on_journaled_ext4()
    for entry in SHARE.iterdir():
        if entry.name != "fio":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    data = SHARE / "fio" / "data"
    data.parent.mkdir(exist_ok=True)
    size = p.file_mib << 20
    if not data.exists() or data.stat().st_size != size:
        with open(data, "wb") as f:
            for _ in range(p.file_mib):
                f.write(os.urandom(1 << 20))


def parse_fio(text: str) -> dict[str, Any]:
    """IOPS, bandwidth and completion latency from one fio JSON output."""
    start = text.find("{")
    doc = json.loads(text[start:])
    job = doc["jobs"][0]
    side = job["write"] if job["write"]["total_ios"] else job["read"]
    pct = side["clat_ns"].get("percentile", {})
    return {"iops": side["iops"], "bw_bytes": side["bw_bytes"],
            "total_ios": side["total_ios"], "runtime_ms": side["runtime"],
            "p50_us": pct.get("50.000000", 0) / 1e3, "p99_us": pct.get("99.000000", 0) / 1e3,
            "error": job["error"]}


class Follower:
    """Watches the guest's output for ``@@PH start|end NAME t@@`` and takes the daemon's CPU
    time and memory at each."""

    def __init__(self, pid: int, tick: Any) -> None:
        self.pid, self.tick = pid, tick
        self.buf = ""
        self.marks: dict[str, dict[str, Any]] = {}

    def __call__(self, text: str) -> None:
        self.buf += text
        *done, self.buf = self.buf.split("\n")
        for line in done:
            m = re.search(r"@@PH (start|end) (\S+) ([\d.]+)@@", line)
            if not m:
                continue
            kind, name, t = m.group(1), m.group(2), float(m.group(3))
            rec = self.marks.setdefault(name, {})
            rec[f"{kind}_cpu"] = tree_cpu(self.pid)
            rec[f"{kind}_guest"] = t
            if kind == "end" and name == "idle":
                rec["rss"], rec["pss"] = tree_mem(self.pid)
            if kind == "start":
                self.tick(name)


def run_boot(label: str, daemon: Daemon, queues: int, p: Params, bundle: dict[str, bytes],
             tick: Any) -> dict[str, Any]:
    prepare_share(p)
    proc = daemon.start(SHARE, SOCK)
    out: dict[str, Any] = {"daemon": label, "queues": queues, "phases": {}}
    follower = Follower(proc.pid, tick)
    try:
        out["loadavg"] = os.getloadavg()[0]
        with MemorySampler(proc.pid, interval=0.25) as mem:
            run = vm.run_guest(SOCK, guest_script(p), kernel=KERNEL, smp=SMP,
                               num_request_queues=queues, memory_mb=MEMORY_MB,
                               timeout=300 + 20 * p.fio_seconds + p.files / 20,
                               initramfs_files=bundle, on_script_output=follower)
        out["cpu_total_s"] = tree_cpu(proc.pid)
        out.update(peak_rss=mem.rss, peak_pss=mem.pss, rc=run.rc, boot_s=run.boot_seconds,
                   script_s=run.script_seconds, total_s=run.total_seconds)
    finally:
        out["exit_code"] = daemon.stop()
        SOCK.unlink(missing_ok=True)
    text = run.script_output
    idle = follower.marks.get("idle", {})
    out["idle_rss"], out["idle_pss"] = idle.get("rss"), idle.get("pss")
    out["info"] = re.findall(r"@@INFO (.*?)@@", text)
    out["failures"] = re.findall(r"@@FAIL (.*?)@@", text)
    out["irq"] = {q: int(n) for q, n in re.findall(r"@@IRQ (\S+) (\d+)@@", text)}
    counts = {k: int(v) for k, v in re.findall(r"@@COUNT (\S+) (\d+)@@", text)}
    fio = {m.group(1): (int(m.group(2)), m.group(3)) for m in
           re.finditer(r"@@FIO (\S+) rc=(\d+)@@\n(.*?)@@ENDFIO@@", text, re.S)}
    for name in WORKLOADS:
        marks = follower.marks.get(name.removeprefix("meta-"), {})
        if "end_cpu" not in marks:
            continue
        ph: dict[str, Any] = {"cpu_s": marks["end_cpu"] - marks["start_cpu"],
                              "guest_s": marks["end_guest"] - marks["start_guest"]}
        if name in fio:
            rc, body = fio[name]
            try:
                ph.update(parse_fio(body))
            except (ValueError, KeyError, IndexError) as e:
                ph["error"] = f"fio rc={rc}: {e!r}: {body[-500:]}"
                out["failures"].append(f"{name}: fio rc={rc}")
            ops = ph.get("total_ios")
            ph["value"] = (ph["bw_bytes"] / 1e6 if name.endswith("-1m") else ph["iops"]
                           ) if "iops" in ph else None
        else:
            phase = name.removeprefix("meta-")
            ops = p.files if phase in ("create", "delete") else counts.get(phase)
            ph["count"] = ops
            ph["value"] = ops / ph["guest_s"] if ops and ph["guest_s"] > 0 else None
        ph["cpu_us_per_op"] = 1e6 * ph["cpu_s"] / ops if ops else None
        out["phases"][name] = ph
    if run.rc != 0:
        out["failures"].append(f"guest script rc={run.rc} timed_out={run.timed_out}")
        out["console_tail"] = run.output[-3000:]
    return out


def probe_two_queues(kind: str) -> dict[str, Any]:
    """What a reference daemon does when QEMU gives the device two request queues."""
    daemon = make(kind)
    share_on_journaled_ext4()
    daemon.start(SHARE, SOCK)
    try:
        run = vm.run_guest(SOCK, 'mount -t virtiofs myfs /mnt && echo "@@MOUNTED@@" && '
                           'ls /mnt > /dev/null && echo "@@LISTED@@"',
                           kernel=KERNEL, smp=SMP, num_request_queues=2, memory_mb=MEMORY_MB,
                           timeout=45)
    finally:
        code = daemon.stop()
        SOCK.unlink(missing_ok=True)
    qemu = [ln for ln in run.qemu_stderr.splitlines() if ln.strip()]
    log = [ln for ln in daemon.log().splitlines() if ln.strip()]
    return {"daemon": kind, "mounted": "@@MOUNTED@@" in run.script_output,
            "listed": "@@LISTED@@" in run.script_output,
            "guest_rc": run.rc, "timed_out": run.timed_out, "daemon_exit": code,
            "daemon_log_tail": log[-1] if log else "",
            "qemu_stderr": list(dict.fromkeys(qemu))[:4]}


# ----- summary, report ------------------------------------------------------------------------

def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for d in dict.fromkeys(r["daemon"] for r in runs):
        for wl in WORKLOADS:
            phs = [r["phases"][wl] for r in runs if r["daemon"] == d and wl in r["phases"]
                   and r["phases"][wl].get("value")]
            if not phs:
                continue
            vals = [ph["value"] for ph in phs]
            cpu = [ph["cpu_us_per_op"] for ph in phs if ph.get("cpu_us_per_op")]
            s = {"daemon": d, "workload": wl, "n": len(phs), "min": min(vals),
                 "median": statistics.median(vals), "max": max(vals),
                 "cpu_us_per_op": statistics.median(cpu) if cpu else None,
                 "cpu_share": statistics.median(ph["cpu_s"] / ph["guest_s"] for ph in phs)}
            if "p50_us" in phs[0]:
                s["p50_us"] = statistics.median(ph["p50_us"] for ph in phs)
                s["p99_us"] = statistics.median(ph["p99_us"] for ph in phs)
            if "count" in phs[0]:
                s["seconds"] = statistics.median(ph["guest_s"] for ph in phs)
            out[f"{wl}|{d}"] = s
    for s in out.values():
        rust = out.get(f"{s['workload']}|rust")
        s["ratio_rust"] = s["median"] / rust["median"] if rust and rust["median"] else None
    return out


def unit(wl: str) -> str:
    return "MB/s" if wl.endswith("-1m") else "IOPS" if not wl.startswith("meta") else "files/s"


def fmt_v(x: float) -> str:
    return f"{x / 1e3:.2f}k" if x >= 1e4 else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def write_markdown(path: Path, meta: dict[str, Any], summary: dict[str, dict[str, Any]],
                   runs: list[dict[str, Any]], daemons: list[str], png: str | None) -> None:
    p = meta["params"]
    m = meta["machine"]
    top, sub, per = p["tree"]
    L = [f"# virtio-fs daemons in a real guest — {meta['date']}", "",
         "**Read this first.** QEMU runs without KVM here (TCG, 2 host cores shared with the "
         "daemon and other jobs), so the guest — its kernel, the FUSE driver, fio — is the "
         "slower side by far and sets the pace of every workload. These figures show the "
         "shape (what a real kernel sends, whether anything breaks or stalls, relative "
         "order); the daemons' own speed is measured by the driver-level kit "
         "(`python3 -m benchmarks.run`, results in the other files here).", "",
         f"Command: `{meta['command']}`: {meta['rounds']} round(s), daemons interleaved per "
         f"round, each started fresh on the same share for every boot. Wall time "
         f"{meta['wall_s'] / 60:.1f} min.", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, {m['os']}, host kernel "
         f"{m['kernel']}, Python {m['python']}.", "",
         f"Guest: Linux {meta['guest_kernel']} (Debian bookworm-backports), QEMU 7.2 TCG "
         f"(`-accel tcg,thread=single`), `-smp {SMP}`, {MEMORY_MB} MiB, "
         f"`vhost-user-fs-pci` queue-size 1024; {meta['fio_version']} (the host's, "
         "bundled into the initramfs).", "",
         f"Share: `{SHARE}` ({meta['share_fstype']}, host page cache warm).", "",
         "Daemons (request queues QEMU gave the device):", ""]
    L += [f"- `{d}`: {meta['versions'][d]} — {CONFIGS[d][1]} request queue(s)"
          for d in daemons]
    L += ["", "Workloads:", "",
          f"- fio, `direct=1` (bypasses the guest page cache; every daemon drops O_DIRECT "
          f"on the host by default, so the host's page cache serves), one {p['file_mib']} "
          f"MiB file, `time_based` {p['fio_seconds']} s each, in this order: "
          + ", ".join(f"`{j.name}` (rw={j.rw} bs={j.bs} {j.engine} iodepth={j.depth})"
                      for j in FIO_JOBS) + ".",
          f"- metadata: `meta-create` makes {top} x {sub} directories with {per} small files "
          f"each ({p['files']:,} files, busybox sh `echo > file`); `meta-find` runs `find` "
          f"over the tree; `meta-stat` runs `stat` on every entry "
          f"({p['files'] + top * sub + top + 1:,}); "
          "`meta-delete` is `rm -rf`. The guest drops its caches before the last three, so "
          "they reach the daemon. Timed inside the guest.", "",
          "Cells: median over rounds (min–max), and the median's ratio to Rust virtiofsd "
          "(above 1 = faster than Rust).", "",
          "| workload | unit |" + "".join(f" {LABELS[d]} | ×Rust |" for d in daemons),
          "|---|---|" + "---|---|" * len(daemons)]
    ran = [wl for wl in WORKLOADS if any(f"{wl}|{d}" in summary for d in daemons)]
    for wl in ran:  # (--jobs: only what ran)
        row = f"| {wl} | {unit(wl)} |"
        for d in daemons:
            s = summary.get(f"{wl}|{d}")
            if not s:
                row += " – | – |"
                continue
            r = f"{s['ratio_rust']:.2f}" if s["ratio_rust"] else "–"
            row += f" {fmt_v(s['median'])} ({fmt_v(s['min'])}–{fmt_v(s['max'])}) | {r} |"
        L.append(row)
    L += ["", "## fio completion latency p50 / p99 (µs, median over rounds)", "",
          "| workload |" + "".join(f" {LABELS[d]} |" for d in daemons),
          "|---|" + "---|" * len(daemons)]
    for j in (j for j in FIO_JOBS if j.name in ran):
        row = f"| {j.name} |"
        for d in daemons:
            s = summary.get(f"{j.name}|{d}")
            row += f" {s['p50_us']:.0f} / {s['p99_us']:.0f} |" if s and "p50_us" in s else " – |"
        L.append(row)
    L += ["", "## Daemon CPU (all its processes; µs per operation, and share of one core "
          "while the phase ran)", "",
          "One operation = one fio I/O, or one file/entry in the metadata phases.", "",
          "| workload |" + "".join(f" {LABELS[d]} |" for d in daemons),
          "|---|" + "---|" * len(daemons)]
    for wl in ran:
        row = f"| {wl} |"
        for d in daemons:
            s = summary.get(f"{wl}|{d}")
            row += (f" {s['cpu_us_per_op']:.0f} µs, {s['cpu_share'] * 100:.0f}% |"
                    if s and s["cpu_us_per_op"] else " – |")
        L.append(row)
    L += ["", "## Memory (MB, summed over each daemon's processes)", "",
          "Idle: 1 s after the mount. Peak: highest sample (every 0.25 s) over the boot. "
          "RSS counts the guest-memory pages the daemon touched (shared with QEMU); PSS "
          "splits shared pages.", "",
          "| daemon | idle RSS | idle PSS | peak RSS | peak PSS | daemon CPU per boot (s) |",
          "|---|---|---|---|---|---|"]
    for d in daemons:
        rs = [r for r in runs if r["daemon"] == d and r.get("idle_rss")]
        if not rs:
            continue
        L.append(f"| {LABELS[d]} | {fmt_mb(statistics.median(r['idle_rss'] for r in rs))} | "
                 f"{fmt_mb(statistics.median(r['idle_pss'] for r in rs))} | "
                 f"{fmt_mb(max(r['peak_rss'] for r in rs))} | "
                 f"{fmt_mb(max(r['peak_pss'] for r in rs))} | "
                 f"{statistics.median(r['cpu_total_s'] for r in rs):.1f} |")
    L += ["", "## Request queues", "",
          "Guest interrupts per virtio-fs request queue over a whole boot (median), from "
          "/proc/interrupts (one fio job and the metadata shell run on one vCPU at a time, "
          "and the driver picks the queue by CPU).", ""]
    for d in daemons:
        irqs = [r["irq"] for r in runs if r["daemon"] == d and r.get("irq")]
        if irqs:
            qs = sorted(irqs[0])
            L.append(f"- {LABELS[d]}: " + ", ".join(
                f"`{q}` {statistics.median(i.get(q, 0) for i in irqs):,.0f}" for q in qs))
    probes = meta.get("two_queue_probe") or []
    if probes:
        L += ["", "Rust and C virtiofsd with `num-request-queues=2` (checked at the start of "
              "this run, 6.12 guest, `-smp 2`): "]
        for pr in probes:
            # (older JSON has no "listed": the script's last step was the ls)
            if pr.get("listed", pr["guest_rc"] == 0):
                what = "mounted and listed the share"
            elif pr["mounted"]:
                what = ("`mount` returned (the driver sends FUSE_INIT without waiting for "
                        "the answer) but the first file operation, `ls /mnt`, hung")
            else:
                what = "`mount` failed or hung"
            if pr["timed_out"]:
                what += " until the 45 s timeout"
            L.append(f"- {LABELS[pr['daemon']]}: {what}"
                     + f"; daemon exit code {pr['daemon_exit']}, its last log line "
                     f"`{pr['daemon_log_tail']}`; QEMU: "
                     + "; ".join(f"`{q}`" for q in pr["qemu_stderr"][:4]))
        L += ["", "So the reference daemons run with one request queue; pyvirtiofsd with two "
              "(and, as `pyvirtiofsd-1q`, with one where that row is present)."]
    else:
        L += ["", "Rust and C virtiofsd serve one request queue (with `num-request-queues=2` "
              "both exit and the guest's mount hangs: see a full run's report), so they run "
              "with one; pyvirtiofsd with two (`pyvirtiofsd-1q`: one)."]
    fails = [(r["daemon"], r["round"], f) for r in runs for f in r.get("failures", [])]
    boot_s = [r["boot_s"] for r in runs if r.get("boot_s")]
    script_s = [r["script_s"] for r in runs if r.get("script_s")]
    L += ["", "## Boots", "",
          f"Guest boot to the script: median {statistics.median(boot_s or [0]):.1f} s; "
          f"script: median {statistics.median(script_s or [0]):.0f} s. "
          "1-minute load average at each boot: "
          + ", ".join(f"{r['loadavg']:.1f}" for r in runs) + ".", "",
          "Failures: " + ("none." if not fails else "")]
    L += [f"- {d} round {rnd + 1}: `{f}`" for d, rnd, f in fails]
    if png:
        L += ["", f"![{png}]({png})"]
    path.write_text("\n".join(L) + "\n")


def plot(path: Path, summary: dict[str, dict[str, Any]], daemons: list[str]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install matplotlib): no PNG", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(daemons)
    for ax, ratio in zip(axes, (False, True), strict=True):
        for i, d in enumerate(daemons):
            ys, lo, hi = [], [], []
            for wl in WORKLOADS:
                s = summary.get(f"{wl}|{d}")
                rust = summary.get(f"{wl}|rust")
                div = rust["median"] if ratio and rust else 1.0
                if not s or not div:
                    s, div = {"median": 0, "min": 0, "max": 0}, 1.0
                ys.append(s["median"] / div)
                lo.append((s["median"] - s["min"]) / div)
                hi.append((s["max"] - s["median"]) / div)
            xs = [k + (i - (len(daemons) - 1) / 2) * width for k in range(len(WORKLOADS))]
            ax.bar(xs, ys, width, yerr=[lo, hi], label=LABELS[d], color=COLORS[d])
        ax.set_xticks(range(len(WORKLOADS)),
                      [f"{w} ({unit(w)})" for w in WORKLOADS], rotation=35, ha="right",
                      fontsize=8)
        if ratio:
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.set_ylabel("median relative to Rust virtiofsd (min–max)")
            ax.set_title("ratio to Rust virtiofsd")
        else:
            ax.set_yscale("log")
            ax.set_ylabel("median (min–max), unit per workload")
            ax.set_title(f"Linux {KERNEL} guest under TCG, -smp {SMP}: shape, not daemon speed")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def rerender(path: Path) -> None:
    doc = json.loads(path.read_text())
    daemons = list(doc["meta"]["configs"])
    png = plot(path.with_suffix(".png"), doc["summary"], daemons)
    write_markdown(path.with_suffix(".md"), doc["meta"], doc["summary"], doc["runs"], daemons,
                   png)
    print(f"rewrote {path.with_suffix('.md')}" + (f", {png}" if png else ""))


# ----- main -----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 round, 2 s fio jobs, 64 MiB file, 2,000 files (about 5 min)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--daemons", default="pyvirtiofsd,rust,c",
                    help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--fio-seconds", type=int)
    ap.add_argument("--no-probe", action="store_true",
                    help="skip the check of the reference daemons with two request queues")
    ap.add_argument("--jobs", help="comma-separated fio jobs to run, and 'meta' for the "
                    f"metadata phases (default all: {', '.join(WORKLOADS[:len(FIO_JOBS)])}, "
                    "meta)")
    ap.add_argument("--out", help="output stem (default benchmarks/results/<date>-guest[-quick])")
    ap.add_argument("--from-json", metavar="JSON",
                    help="only rewrite the markdown and PNG next to an earlier run's JSON")
    args = ap.parse_args()
    if args.from_json:
        rerender(Path(args.from_json))
        return
    if os.geteuid() != 0:
        sys.exit("run as root (QEMU's shared guest memory, the daemons' file handles)")
    p = Params(rounds=args.rounds or (1 if args.quick else 3),
               fio_seconds=args.fio_seconds or (2 if args.quick else 3),
               file_mib=64 if args.quick else 128,
               tree=(10, 10, 20) if args.quick else (10, 10, 100))
    if args.jobs:
        chosen = args.jobs.split(",")
        fio_names = {j.name for j in FIO_JOBS}
        if unknown := set(chosen) - fio_names - {"meta"}:
            sys.exit(f"unknown job(s) {sorted(unknown)}: choose from "
                     f"{', '.join(sorted(fio_names))}, meta")
        p = dataclasses.replace(p, fio_jobs=tuple(c for c in chosen if c in fio_names),
                                meta="meta" in chosen)
    daemons = args.daemons.split(",")
    unknown = [d for d in daemons if d not in CONFIGS]
    if unknown:
        sys.exit(f"unknown daemon(s) {unknown}: choose from {', '.join(CONFIGS)}")
    bundle = fio_bundle()
    kinds = {k: make(k) for k in dict.fromkeys(CONFIGS[d][0] for d in daemons)}
    versions = {d: kinds[CONFIGS[d][0]].version() for d in daemons}
    t_start = time.monotonic()
    probes = []
    if not args.quick and not args.no_probe:
        for kind in ("rust", "c"):
            if kind in kinds:
                print(f"checking {kind} with num-request-queues=2 (up to 45 s)...",
                      file=sys.stderr)
                probes.append(probe_two_queues(kind))
    plan = [(rnd, d) for rnd in range(p.rounds) for d in daemons]
    runs: list[dict[str, Any]] = []
    t_runs = time.monotonic()
    for i, (rnd, d) in enumerate(plan):
        label = f"[boot {i + 1}/{len(plan)}] round {rnd + 1}/{p.rounds} {d:<14}"

        def tick(phase: str, label: str = label, i: int = i) -> None:
            el = time.monotonic() - t_runs
            eta = el / i * (len(plan) - i) if i else 0
            line = f"{label} {phase:<26} elapsed {el:4.0f}s eta {eta:4.0f}s"
            print(f"\r{line:<100}", end="", file=sys.stderr, flush=True)

        tick("booting")
        kind, queues = CONFIGS[d]
        try:
            run = run_boot(d, kinds[kind], queues, p, bundle, tick)
        except Exception as e:  # noqa: BLE001 - one failed boot must not end the run
            print(f"\n{label}: failed: {e!r}\n{kinds[kind].log()[-1500:]}", file=sys.stderr)
            run = {"daemon": d, "queues": queues, "phases": {}, "failures": [repr(e)],
                   "loadavg": os.getloadavg()[0]}
        run["round"] = rnd
        runs.append(run)
        for f in run.get("failures", []):
            print(f"\n{label}: {f}", file=sys.stderr)
    print(file=sys.stderr)
    wall = time.monotonic() - t_start
    summary = summarize(runs)
    info = dict(kv.split("=", 1) for r in runs for kv in r.get("info", []) if "=" in kv)
    date = dt.datetime.now().strftime("%Y-%m-%d")
    stem = (Path(args.out) if args.out
            else RESULTS / f"{date}-guest{'-quick' if args.quick else ''}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python3 -m benchmarks.guest " + " ".join(sys.argv[1:]),
        "rounds": p.rounds, "wall_s": wall, "machine": machine_info(), "versions": versions,
        "params": {"fio_seconds": p.fio_seconds, "file_mib": p.file_mib, "tree": p.tree,
                   "files": p.files},
        "guest_kernel": info.get("kernel", KERNEL), "fio_version": info.get("fio", "fio"),
        "share_fstype": fs_type(SHARE), "two_queue_probe": probes,
        "configs": {d: {"daemon": CONFIGS[d][0], "request_queues": CONFIGS[d][1]}
                    for d in daemons},
    }  # fmt: skip
    png = plot(stem.with_suffix(".png"), summary, daemons)
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    write_markdown(stem.with_suffix(".md"), meta, summary, runs, daemons, png)
    print(f"wrote {stem}.md, {stem}.json" + (f", {png}" if png else ""))
    print(f"\nmedian (ratio to Rust), wall time {wall / 60:.1f} min:")
    for wl in WORKLOADS:
        parts = []
        for d in daemons:
            s = summary.get(f"{wl}|{d}")
            if s:
                r = f" ×{s['ratio_rust']:.2f}" if s["ratio_rust"] else ""
                parts.append(f"{d} {fmt_v(s['median'])}{r}")
        print(f"  {wl:>25} {unit(wl):>7}  " + "  ".join(parts))


if __name__ == "__main__":
    main()
