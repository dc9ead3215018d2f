"""What one fio I/O costs on the wire, per daemon: requests by opcode, guest interrupts,
daemon wake-ups (context switches) and CPU, counted over one fio job in a real guest.

    python3 -m benchmarks.guest_requests [--daemons pyvirtiofsd,rust] [--seconds 3]
        [--jobs randread-4k-libaio-qd16,randwrite-4k-libaio-qd16] [--rounds N]
        [--rust-debug] [--strace-dir DIR [--perf-sched]] [--json FILE]

Throughput in the guest varies ±20-30 % per boot under TCG (docs/performance.md, "In a
real guest"), which hides a daemon that makes the guest do more work per I/O. Counts do
not vary like that: a daemon whose guest sends more requests, takes more interrupts or
kicks more often per I/O shows a different number, not a wider range. pyvirtiofsd's
requests by opcode come from its stats segment; Rust virtiofsd's from its
``--log-level debug`` log with ``--rust-debug`` (one "Received request" line each; the log
slows it, so only its counts mean anything then). ``--strace-dir`` counts each daemon's
system calls over the job (``strace -c -f``; slows both), or with ``--perf-sched`` records
the scheduler over it (``perf sched record -a``: who waited how long for a core). Each
job runs in its own boot with a fresh daemon; ``pyvirtiofsd-tree`` is the work tree as it
is, ``pyvirtiofsd`` a snapshot of HEAD. One JSON line per boot; ``--json`` writes them all.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.guest import (
    FIO_DIR,
    FIO_JOBS,
    LOADER,
    SHARE,
    SOCK,
    Params,
    fio_bundle,
    parse_fio,
    prepare_share,
)
from benchmarks.run import tree_cpu
from tests.support import vm
from tests.support.reference_daemons import Daemon, PyVirtiofsd, make, process_tree

# Rust virtiofsd at debug level logs every request it takes off the ring
RUST_REQUEST = re.compile(r"Received request: opcode=(\w+)")


def guest_script(job_name: str, seconds: int, file_mib: int) -> str:
    """Mount, then one fio job between two readings of the request queue's interrupts and
    the guest's CPU time (/proc/stat)."""
    job = next(j for j in FIO_JOBS if j.name == job_name)
    fio = f"/{FIO_DIR}/{Path(LOADER).name} --library-path /{FIO_DIR} /{FIO_DIR}/fio"
    snap = ("echo \"@@SNAP $1 $(grep requests /proc/interrupts | awk '{ s = 0; "
            "for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; print s }') "
            "$(head -1 /proc/stat | cut -d' ' -f2-)@@\"")
    return "\n".join([
        f"snap() {{ {snap}; }}",
        'mount -t virtiofs myfs /mnt || { echo "@@FAIL mount@@"; exit 1; }',
        "sleep 1; snap start",
        f"{fio} {job.args(file_mib, seconds)} > /tmp/fio.log 2>&1; rc=$?",
        "snap end",
        f'echo "@@FIO rc=$rc@@"; cat /tmp/{job.name}.json; echo "@@ENDFIO@@"',
        "umount /mnt",
    ]) + "\n"


def ctx_switches(pid: int) -> int:
    """Voluntary context switches of every thread of the daemon's processes: how often it
    went to sleep waiting (each is one wake-up later)."""
    total = 0
    for p in process_tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                text = (task / "status").read_text()
            except OSError:
                continue
            m = re.search(r"voluntary_ctxt_switches:\s+(\d+)", text)
            total += int(m.group(1)) if m else 0
    return total


class Marks:
    """Takes the daemon's counters when the guest prints ``@@SNAP start|end``."""

    def __init__(self, pid: int, is_py: bool, strace_to: Path | None = None) -> None:
        self.pid, self.is_py = pid, is_py
        self.strace_to = strace_to  # count the daemon's system calls over the job
        self.strace: subprocess.Popen[bytes] | None = None
        self.buf = ""
        self.at: dict[str, dict[str, Any]] = {}

    def __call__(self, text: str) -> None:
        self.buf += text
        *done, self.buf = self.buf.split("\n")
        for line in done:
            m = re.search(r"@@SNAP (start|end) ", line)
            if not m:
                continue
            rec: dict[str, Any] = {"cpu": tree_cpu(self.pid), "ctx": ctx_switches(self.pid),
                                   "t": time.monotonic()}
            if self.is_py:
                from daemon.stats.tables import read_tables
                rows = read_tables(self.pid)["queues"]
                rec["ops"] = Counter()
                for key in ("requests", "in_c", "wakeups", "notifies"):
                    rec[key] = sum(r[key] for r in rows)
                for r in rows:
                    rec["ops"].update(r["by_opcode"])
            self.at[m.group(1)] = rec
            if self.strace_to and m.group(1) == "start":
                if self.strace_to.suffix == ".sched":  # the scheduler's view, whole machine
                    cmd = ["perf", "sched", "record", "-a", "-o", str(self.strace_to)]
                else:
                    pids = [a for p in process_tree(self.pid) for a in ("-p", str(p))]
                    cmd = ["strace", "-c", "-f", "-o", str(self.strace_to), *pids]
                self.strace = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
            elif self.strace and m.group(1) == "end":
                self.strace.send_signal(signal.SIGINT)
                self.strace.wait(30)


def rust_ops(log: str) -> Counter[str]:
    """Rust virtiofsd's requests by opcode, from its debug log."""
    return Counter(m.group(1).upper() for m in RUST_REQUEST.finditer(log))


def one_boot(name: str, job: str, seconds: int, file_mib: int,
             bundle: dict[str, bytes], rust_debug: bool,
             strace_dir: Path | None = None, perf_sched: bool = False) -> dict[str, Any]:
    """One boot: fresh daemon, one fio job, the counts per I/O over that job."""
    # "pyvirtiofsd-tree": the work tree as it is (uncommitted changes included)
    daemon: Daemon = PyVirtiofsd(rev=None) if name == "pyvirtiofsd-tree" else make(name)
    is_py = name.startswith("pyvirtiofsd")
    if not is_py and rust_debug:
        daemon.command = _with_debug(daemon.command)  # type: ignore[method-assign]
    prepare_share(Params(1, seconds, file_mib, (1, 1, 1)))
    proc = daemon.start(SHARE, SOCK)
    suffix = ".sched" if perf_sched else ".strace"
    marks = Marks(proc.pid, is_py, strace_dir / f"{name}-{job}{suffix}" if strace_dir else None)
    try:
        run = vm.run_guest(SOCK, guest_script(job, seconds, file_mib), kernel="6.12", smp=2,
                           memory_mb=1024, timeout=300, initramfs_files=bundle,
                           on_script_output=marks)
        log_before_stop = "" if is_py else daemon.log()
    finally:
        daemon.stop()
        SOCK.unlink(missing_ok=True)
    text = run.script_output
    snaps = {k: v.split() for k, v in re.findall(r"@@SNAP (start|end) (.*?)@@", text)}
    body = re.search(r"@@FIO rc=(\d+)@@\n(.*?)@@ENDFIO@@", text, re.S)
    if not body or "start" not in marks.at or "end" not in marks.at or len(snaps) < 2:
        raise SystemExit(f"{name} {job}: incomplete run\n{run.output[-3000:]}")
    fio = parse_fio(body.group(2))
    ios = fio["total_ios"]
    a, b = marks.at["start"], marks.at["end"]
    irq = int(snaps["end"][0]) - int(snaps["start"][0])
    cpu_a = [int(x) for x in snaps["start"][1:]]
    cpu_b = [int(x) for x in snaps["end"][1:]]
    jiffies = [y - x for x, y in zip(cpu_a, cpu_b, strict=False)]
    busy = sum(jiffies) - jiffies[3] - (jiffies[4] if len(jiffies) > 4 else 0)
    out: dict[str, Any] = {
        "daemon": name, "job": job, "iops": fio["iops"], "ios": ios,
        "irq_per_io": irq / ios,
        "guest_busy_share": busy / max(1, sum(jiffies)),
        "daemon_cpu_us_per_io": 1e6 * (b["cpu"] - a["cpu"]) / ios,
        "daemon_sleeps_per_io": (b["ctx"] - a["ctx"]) / ios,
    }
    if is_py:
        ops = b["ops"] - a["ops"]
        out.update({k + "_per_io": (b[k] - a[k]) / ios
                    for k in ("requests", "in_c", "wakeups", "notifies")})
    else:
        ops = rust_ops(log_before_stop)  # empty without --rust-debug
    out["ops_per_io"] = {k: round(v / ios, 4) for k, v in sorted(ops.items())}
    return out


def _with_debug(command: Any) -> Any:
    def wrapped(shared_dir: Path, socket_path: Path) -> list[str]:
        return [*command(shared_dir, socket_path), "--log-level=debug"]
    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--daemons", default="pyvirtiofsd,rust")
    ap.add_argument("--jobs", default="randread-4k-libaio-qd16,randwrite-4k-libaio-qd16")
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--file-mib", type=int, default=128)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rust-debug", action="store_true",
                    help="count Rust's requests by opcode from its debug log (slows it)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--perf-sched", action="store_true",
                    help="with --strace-dir: record the scheduler (perf sched record -a) "
                         "over each job instead of the system calls")
    ap.add_argument("--strace-dir", type=Path,
                    help="count the daemon's system calls over each job (strace -c; slows it)")
    args = ap.parse_args()
    bundle = fio_bundle()
    results = []
    for _ in range(args.rounds):
        for job in args.jobs.split(","):
            for name in args.daemons.split(","):
                r = one_boot(name, job, args.seconds, args.file_mib, bundle, args.rust_debug,
                             args.strace_dir, args.perf_sched)
                results.append(r)
                print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
