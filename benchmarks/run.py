"""Run pyvirtiofsd, Rust virtiofsd and C virtiofsd side by side.

    python3 -m benchmarks.run [--quick] [--rounds N] [--seconds S] [--daemons a,b,c]

Daemons and queue counts run interleaved (round 1: A q1, B q1, C q1, A q2, A q4; round 2:
...), each daemon started fresh for every connection.
For every share (tmpfs, disk), request-queue count (1, 2, 4; reference daemons serve one)
and round, one connection runs every workload at QD1 and QD16. Reported: min/median/max
ops/s over rounds, the median's ratio to Rust virtiofsd, QD1 latency p50/p99, the
daemon's CPU time per operation (utime+stime of all its processes, /proc/<pid>/stat), RSS
and PSS summed over its processes (/proc/<pid>/smaps_rollup) idle and under load, and the
generator's own CPU share. Writes ``benchmarks/results/<date>.md``, ``.json`` and PNGs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.loadgen import COMPLETION_US, FRONTENDS, WORKLOADS, LoadGen, prepare_share
from benchmarks.procmem import MemorySampler, tree_memory
from tests.support.reference_daemons import Daemon, make, process_tree

RESULTS = Path(__file__).resolve().parent / "results"
TICK = os.sysconf("SC_CLK_TCK")
QDS = (1, 16)
QUEUE_COUNTS = (1, 2, 4)
TMPFS_DIR = Path("/tmp/pyvirtiofsd-bench-tmpfs")
DISK_DIR = Path("/var/tmp/pyvirtiofsd-bench-disk")
# The disk share is a journaled ext4 in an image file on this machine's disk. The root
# file system here is ext4 *without* a journal, where every inode allocation skips the
# inodes freed in the last 30 s (ext4 recently_deleted()): under CREATE/UNLINK churn that
# scan grows to ~1 ms per create and whichever daemon runs after another's churn pays for
# it (docs/performance.md, "CREATE on the disk share").
DISK_IMAGE = Path("/var/tmp/pyvirtiofsd-bench-ext4.img")
DISK_IMAGE_SIZE = 2 << 30


# ----- per-process accounting -----------------------------------------------------------

def tree_cpu(pid: int) -> float:
    """CPU seconds (user+system, incl. reaped children) of pid and its descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / TICK


def machine_busy() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / TICK


# ----- shares -----------------------------------------------------------------------------

def fs_type(path: Path) -> str:
    out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def journaled_ext4(path: Path) -> bool:
    """Whether path is the root of an ext4 mount that has a jbd2 journal."""
    out = subprocess.run(["findmnt", "-n", "-o", "TARGET,FSTYPE,SOURCE", "-T", str(path)],
                         capture_output=True, text=True).stdout.split()
    if len(out) != 3 or out[0] != str(path) or out[1] != "ext4":
        return False
    dev = os.path.basename(os.path.realpath(out[2]))
    return any(j.startswith(dev + "-") for j in os.listdir("/proc/fs/jbd2")) \
        if os.path.isdir("/proc/fs/jbd2") else False


def mount_disk_image() -> None:
    if not DISK_IMAGE.exists():
        with open(DISK_IMAGE, "wb") as f:
            f.truncate(DISK_IMAGE_SIZE)
        r = subprocess.run(["mkfs.ext4", "-q", "-F", str(DISK_IMAGE)], capture_output=True)
        if r.returncode:
            DISK_IMAGE.unlink()
            return
    subprocess.run(["mount", "-o", "loop", str(DISK_IMAGE), str(DISK_DIR)],
                   capture_output=True)


def make_shares(which: list[str]) -> dict[str, Path]:
    shares: dict[str, Path] = {}
    if "tmpfs" in which:
        TMPFS_DIR.mkdir(parents=True, exist_ok=True)
        if fs_type(TMPFS_DIR) != "tmpfs":
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "pyvfs-bench",
                                str(TMPFS_DIR)], capture_output=True)
            if r.returncode:
                fallback = Path("/dev/shm/pyvirtiofsd-bench")
                fallback.mkdir(exist_ok=True)
                shares["tmpfs"] = fallback
        shares.setdefault("tmpfs", TMPFS_DIR)
    if "disk" in which:
        DISK_DIR.mkdir(parents=True, exist_ok=True)
        if not journaled_ext4(DISK_DIR):
            mount_disk_image()
        if not journaled_ext4(DISK_DIR):
            print(f"warning: {DISK_DIR} is not a journaled ext4 (mounting {DISK_IMAGE} "
                  "failed); CREATE figures on it depend on the host file system",
                  file=sys.stderr)
        shares["disk"] = DISK_DIR
    for path in shares.values():
        prepare_share(str(path))
    return shares


# ----- one connection ----------------------------------------------------------------------

def cell_name(workload: str, frontend: str) -> str:
    """A workload as a row of the tables: the batch front-end's keeps its plain name."""
    return workload if frontend == "batch" else f"{workload}+{frontend}"


def describe(name: str) -> str:
    workload, _, frontend = name.partition("+")
    what = WORKLOADS[workload]["what"]
    return f"{what}; {frontend} front-end" if frontend else what


def run_connection(daemon: Daemon, share: Path, queues: int, workloads: list[str],
                   seconds: float, sock: Path, tick: Any, frontends: tuple[str, ...] = ("batch",),
                   completion_us: float = COMPLETION_US) -> dict[str, Any]:
    proc = daemon.start(share, sock)
    out: dict[str, Any] = {"cells": []}
    gen = None
    try:
        gen = LoadGen(str(sock), queues)
        out["device_queues"] = gen.device_queues
        out["queues"] = gen.queues
        time.sleep(0.2)
        out["loadavg"] = os.getloadavg()[0]
        out["idle_rss"], out["idle_pss"] = tree_memory(proc.pid)
        for wl, fe in ((w, f) for w in workloads for f in frontends):
            for qd in QDS:
                os.sync()  # no dirty data of an earlier cell is written back in this one
                cpu0 = tree_cpu(proc.pid)
                busy0 = machine_busy()
                try:
                    with MemorySampler(proc.pid) as mem:
                        res = gen.run(wl, qd, seconds, frontend=fe,
                                      completion_us=completion_us)
                except OSError as e:  # a set-up request failed: note it, go on
                    out.setdefault("failures", []).append(
                        {"workload": wl, "qd": qd, "error": repr(e)})
                    print(f"\n{daemon.name} {share} q{queues} {wl} qd{qd}: set-up failed: "
                          f"{e!r}", file=sys.stderr)
                    continue
                cpu = tree_cpu(proc.pid) - cpu0
                busy = machine_busy() - busy0
                cell = res.summary()
                cell["workload"] = cell_name(wl, fe)
                # CPU used by everything else on the machine meanwhile (other users' jobs)
                cell["other_cpu_share"] = max(0.0, busy - cpu - res.gen_cpu) / res.seconds
                cell.update(daemon_cpu_s=cpu,
                            cpu_us_per_op=1e6 * cpu / res.ops if res.ops else None,
                            daemon_cpu_share=cpu / res.seconds if res.seconds else 0.0,
                            load_rss=mem.rss, load_pss=mem.pss)
                out["cells"].append(cell)
                tick(cell)
    finally:
        if gen is not None:
            gen.close()
        code = daemon.stop()
        out["exit_code"] = code
        sock.unlink(missing_ok=True)
    return out


def _fs_label(share: dict[str, Any]) -> str:
    if share["fstype"] != "ext4" or "journaled_ext4" not in share:
        return share["fstype"]
    if share["journaled_ext4"]:
        return "ext4 with journal, in an image file on the disk"
    return "ext4 without journal"


# ----- summary ------------------------------------------------------------------------------

def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Group cells by (share, queues, workload, qd, daemon)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        for c in run["cells"]:
            key = (run["share"], run["queues"], c["workload"], c["qd"], run["daemon"])
            groups.setdefault(key, []).append(c)
    out: dict[str, dict[str, Any]] = {}
    for key, cells in groups.items():
        ops = [c["ops_per_s"] for c in cells]
        cpu = [c["cpu_us_per_op"] for c in cells if c["cpu_us_per_op"] is not None]
        out["|".join(map(str, key))] = {
            "share": key[0], "queues": key[1], "workload": key[2], "qd": key[3],
            "daemon": key[4], "n": len(cells),
            "ops_min": min(ops), "ops_median": statistics.median(ops), "ops_max": max(ops),
            "bytes_per_s_median": statistics.median(c["bytes_per_s"] for c in cells),
            "p50_us": statistics.median(c["p50_us"] for c in cells),
            "p99_us": statistics.median(c["p99_us"] for c in cells),
            "cpu_us_per_op": statistics.median(cpu) if cpu else None,
            "daemon_cpu_share": statistics.median(c["daemon_cpu_share"] for c in cells),
            "gen_cpu_share": statistics.median(c["gen_cpu_share"] for c in cells),
            "other_cpu_share": statistics.median(c.get("other_cpu_share", 0) for c in cells),
            "errors": sum(c["errors"] for c in cells),
            "stalls": sum(c["stalls"] for c in cells),
            "wakeups_per_request": statistics.median(c.get("wakeups_per_request", 0)
                                                     for c in cells),
            "kicks_per_request": statistics.median(c.get("kicks_per_request", 0)
                                                   for c in cells),
            "load_rss_max": max(c["load_rss"] for c in cells),
            "load_pss_max": max(c["load_pss"] for c in cells),
        }  # fmt: skip
    return out


def round_ratios(runs: list[dict[str, Any]], key: tuple[str, int, str, int], daemon: str,
                 base: str = "rust") -> list[float]:
    """A daemon's ops/s over ``base``'s in each round (the two ran minutes apart at most),
    for the cell ``key`` = (share, queues, workload, QD)."""
    def per_round(d: str) -> dict[int, float]:
        return {r["round"]: c["ops_per_s"] for r in runs
                if (r["share"], r["queues"], r["daemon"]) == (key[0], key[1], d)
                for c in r["cells"] if (c["workload"], c["qd"]) == key[2:]}
    mine, theirs = per_round(daemon), per_round(base)
    return [mine[k] / theirs[k] for k in sorted(mine.keys() & theirs.keys()) if theirs[k]]


def machine_info() -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    osr = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            k, _, v = line.partition("=")
            osr[k] = v.strip('"')
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": str(os.cpu_count()), "memory": mem,
            "kernel": platform.release(), "os": osr.get("PRETTY_NAME", "?"),
            "python": sys.version.split()[0]}


def fmt_ops(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def fmt_mb(x: int) -> str:
    return f"{x / 1e6:.1f}"


def write_markdown(path: Path, meta: dict[str, Any], summary: dict[str, dict[str, Any]],
                   runs: list[dict[str, Any]], daemons: list[str], pngs: list[str]) -> None:
    labels = {d: d for d in daemons} | {"rust": "Rust", "c": "C"}
    L: list[str] = []
    m = meta["machine"]
    L += [f"# virtio-fs daemons side by side — {meta['date']}", "",
          f"Command: `{meta['command']}` ({meta['rounds']} rounds, {meta['seconds']} s per "
          f"cell, daemons interleaved per round). Wall time {meta['wall_s']:.0f} s.", "",
          f"Machine: {m['host']}, {m['cpu']}, {m['cores']} cores, {m['memory']}, "
          f"{m['os']}, kernel {m['kernel']}, Python {m['python']}. No KVM; the load "
          "generator plays QEMU and the guest driver on the same 2 cores.", "",
          "Daemons:", ""]
    L += [f"- `{d}`: {meta['versions'][d]}" for d in daemons]
    L += ["", "Shares: " + ", ".join(f"{k} = `{v['path']}` ({_fs_label(v)})"
                                      for k, v in meta["shares"].items()), ""]
    L += ["Workloads (one *op*; QD1 gives latency, QD16 throughput):", ""]
    L += [f"- `{w}`: {describe(w)}" for w in meta["workloads"]]
    if any("+" in w for w in meta["workloads"]):
        L += ["", f"Front-ends: batch (the plain names) resubmits every completion at once "
              f"and kicks once per batch; driver behaves like Linux's virtio-fs driver: it "
              f"takes completions only when interrupted, re-arms used_event first, spends "
              f"{meta.get('completion_us', COMPLETION_US)} µs per completion and publishes "
              f"each new request on its own (docs/performance.md)."]
    L += ["", "Cells show the median ops/s over rounds (min–max), then the median's ratio "
          "to Rust virtiofsd and, in brackets, the lowest and highest ratio of one round's "
          "figures (each round runs every daemon once, back to back).", ""]

    def get(share: str, q: int, wl: str, qd: int, d: str) -> dict[str, Any] | None:
        return summary.get(f"{share}|{q}|{wl}|{qd}|{d}")

    for share in meta["shares"]:
        L += [f"## {share} share, 1 request queue", ""]
        head = "| workload | QD |" + "".join(f" {labels[d]} ops/s | ×Rust |" for d in daemons)
        L += [head, "|" + "---|" * (2 + 2 * len(daemons))]
        for wl in meta["workloads"]:
            for qd in QDS:
                rust = get(share, 1, wl, qd, "rust")
                row = f"| {wl} | {qd} |"
                for d in daemons:
                    s = get(share, 1, wl, qd, d)
                    if not s:
                        row += " – | – |"
                        continue
                    ratio = (s["ops_median"] / rust["ops_median"]
                             if rust and rust["ops_median"] else float("nan"))
                    extra = (f" ({s['bytes_per_s_median'] / 1e9:.2f} GB/s)"
                             if wl.endswith("_1m") else "")
                    err = f" **{s['errors']} errors**" if s["errors"] else ""
                    rr = round_ratios(runs, (share, 1, wl, qd), d) if d != "rust" else []
                    spread = f" ({min(rr):.2f}–{max(rr):.2f})" if rr else ""
                    row += (f" {fmt_ops(s['ops_median'])} ({fmt_ops(s['ops_min'])}–"
                            f"{fmt_ops(s['ops_max'])}){extra}{err} | {ratio:.2f}{spread} |")
                L.append(row)
        L += ["", f"### {share}: QD1 latency p50 / p99 (µs), daemon CPU per op (µs), "
              "generator CPU share at QD16", ""]
        L += ["| workload |" + "".join(f" {labels[d]} p50/p99 |" for d in daemons)
              + "".join(f" {labels[d]} CPU/op QD1 / QD16 |" for d in daemons)
              + " generator CPU QD16 |",
              "|" + "---|" * (2 + 2 * len(daemons))]
        for wl in meta["workloads"]:
            row = f"| {wl} |"
            for d in daemons:
                s = get(share, 1, wl, 1, d)
                row += f" {s['p50_us']:.0f} / {s['p99_us']:.0f} |" if s else " – |"
            for d in daemons:
                a, b = get(share, 1, wl, 1, d), get(share, 1, wl, 16, d)
                if a and b and a["cpu_us_per_op"] and b["cpu_us_per_op"]:
                    row += f" {a['cpu_us_per_op']:.0f} / {b['cpu_us_per_op']:.0f} |"
                else:
                    row += " – |"
            gens = [f"{labels[d]} {get(share, 1, wl, 16, d)['gen_cpu_share'] * 100:.0f}%"
                    for d in daemons if get(share, 1, wl, 16, d)]
            L.append(row + " " + ", ".join(gens) + " |")
        L += ["", f"### {share}: front-end wake-ups (call eventfd reads) and kicks per "
              "request, 1 queue, QD1 / QD16", ""]
        L += ["| workload |" + "".join(f" {labels[d]} wake-ups | {labels[d]} kicks |"
                                       for d in daemons),
              "|" + "---|" * (1 + 2 * len(daemons))]
        for wl in meta["workloads"]:
            row = f"| {wl} |"
            for d in daemons:
                a, b = get(share, 1, wl, 1, d), get(share, 1, wl, 16, d)
                for k in ("wakeups_per_request", "kicks_per_request"):
                    row += f" {a[k]:.2f} / {b[k]:.2f} |" if a and b and k in a else " – |"
            L.append(row)
        if "pyvirtiofsd" in daemons:
            L += ["", f"### {share}: pyvirtiofsd with more request queues (median ops/s at "
                  "QD16 per queue; ratio to its own 1-queue figure and to Rust's 1 queue)", ""]
            qs = [q for q in QUEUE_COUNTS if get(share, q, meta["workloads"][0], 16,
                                                  "pyvirtiofsd")]
            L += ["| workload |" + "".join(f" {q} queue(s) |" for q in qs),
                  "|" + "---|" * (1 + len(qs))]
            for wl in meta["workloads"]:
                base = get(share, 1, wl, 16, "pyvirtiofsd")
                rust = get(share, 1, wl, 16, "rust")
                row = f"| {wl} |"
                for q in qs:
                    s = get(share, q, wl, 16, "pyvirtiofsd")
                    if not s or not base:
                        row += " – |"
                        continue
                    r1 = s["ops_median"] / base["ops_median"] if base["ops_median"] else 0
                    rr = (f", ×Rust {s['ops_median'] / rust['ops_median']:.2f}"
                          if rust and rust["ops_median"] else "")
                    row += f" {fmt_ops(s['ops_median'])} (×{r1:.2f}{rr}) |"
                L.append(row)
        L.append("")
    # memory
    L += ["## Memory (MB, summed over each daemon's processes)", "",
          "Idle = after INIT, before load (median over connections). Load = peak while a "
          "workload ran. RSS counts guest-memory pages the daemon touched; PSS splits them "
          "with the generator.", "",
          "| daemon | share | queues | idle RSS | idle PSS | load RSS | load PSS |",
          "|---|---|---|---|---|---|---|"]
    for d in daemons:
        for share in meta["shares"]:
            for q in QUEUE_COUNTS:
                rs = [r for r in runs if r["daemon"] == d and r["share"] == share
                      and r["queues"] == q and "idle_rss" in r]
                if not rs:
                    continue
                lr = max(c["load_rss"] for r in rs for c in r["cells"])
                lp = max(c["load_pss"] for r in rs for c in r["cells"])
                L.append(f"| {labels[d]} | {share} | {q} | "
                         f"{fmt_mb(statistics.median(r['idle_rss'] for r in rs))} | "
                         f"{fmt_mb(statistics.median(r['idle_pss'] for r in rs))} | "
                         f"{fmt_mb(lr)} | {fmt_mb(lp)} |")
    fails = [(r["daemon"], r["share"], r["queues"], r["round"], f)
             for r in runs for f in r.get("failures", [])]
    fails += [(r["daemon"], r["share"], r["queues"], r["round"], {"error": r["error"]})
              for r in runs if "error" in r]
    if fails:
        L += ["", "## Failures", ""]
        L += [f"- {d} {sh} {q} queue(s) round {rnd + 1}: {f.get('workload', '')} "
              f"QD{f.get('qd', '')}: `{f['error']}`" for d, sh, q, rnd, f in fails]
    others = [c.get("other_cpu_share", 0.0) for r in runs for c in r["cells"]]
    if others:
        L += ["", "Other processes on the machine (CPU share of one core while a cell ran, "
              f"not the daemon, not the generator): median {statistics.median(others):.2f}, "
              f"max {max(others):.2f}; 1-minute load average at connection starts: "
              + ", ".join(f"{r['loadavg']:.1f}" for r in runs if "loadavg" in r)[:400]]
    stalls = sum(s["stalls"] for s in summary.values())
    errors = sum(s["errors"] for s in summary.values())
    L += ["", f"Errors over all cells: {errors}. Generator re-kicks after 100 ms without "
          f"progress (stalls): {stalls}.", ""]
    for png in pngs:
        L += [f"![{png}]({png})", ""]
    path.write_text("\n".join(L))


def plot(stem: Path, meta: dict[str, Any], summary: dict[str, dict[str, Any]],
         daemons: list[str]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install matplotlib): no PNGs", file=sys.stderr)
        return []
    names: list[str] = []
    wls = meta["workloads"]
    colors = {"pyvirtiofsd": "tab:blue", "rust": "tab:orange", "c": "tab:green"}
    for share in meta["shares"]:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        for ax, qd in zip(axes, QDS, strict=True):
            width = 0.8 / len(daemons)
            for i, d in enumerate(daemons):
                ys, lo, hi = [], [], []
                for wl in wls:
                    s = summary.get(f"{share}|1|{wl}|{qd}|{d}")
                    ys.append(s["ops_median"] if s else 0)
                    lo.append(s["ops_median"] - s["ops_min"] if s else 0)
                    hi.append(s["ops_max"] - s["ops_median"] if s else 0)
                xs = [k + (i - (len(daemons) - 1) / 2) * width for k in range(len(wls))]
                ax.bar(xs, ys, width, yerr=[lo, hi], label=d, color=colors.get(d))
            ax.set_yscale("log")
            ax.set_xticks(range(len(wls)), wls, rotation=30, ha="right")
            ax.set_ylabel("ops/s (median, min–max)")
            ax.set_title(f"{share} share, 1 request queue, QD{qd}")
            ax.legend()
        fig.tight_layout()
        name = f"{stem.name}-{share}-ops.png"
        fig.savefig(stem.parent / name, dpi=90)
        plt.close(fig)
        names.append(name)
        if "pyvirtiofsd" in daemons:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for wl in wls:
                xs, ys = [], []
                base = summary.get(f"{share}|1|{wl}|16|pyvirtiofsd")
                for q in QUEUE_COUNTS:
                    s = summary.get(f"{share}|{q}|{wl}|16|pyvirtiofsd")
                    if s and base and base["ops_median"]:
                        xs.append(q)
                        ys.append(s["ops_median"] / base["ops_median"])
                ax.plot(xs, ys, marker="o", label=wl)
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.set_xticks(list(QUEUE_COUNTS))
            ax.set_xlabel("request queues")
            ax.set_ylabel("ops/s relative to 1 queue")
            ax.set_title(f"pyvirtiofsd scaling with queues, QD16, {share} (2 cores)")
            ax.legend(fontsize=7)
            fig.tight_layout()
            name = f"{stem.name}-{share}-scaling.png"
            fig.savefig(stem.parent / name, dpi=90)
            plt.close(fig)
            names.append(name)
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short cells (a few minutes in all)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, help="seconds per cell (default 1, quick 0.25)")
    ap.add_argument("--daemons", default="pyvirtiofsd,rust,c")
    ap.add_argument("--shares", default="tmpfs,disk")
    ap.add_argument("--queues", default=",".join(map(str, QUEUE_COUNTS)))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--frontends", default="batch",
                    help=f"comma-separated, of {', '.join(FRONTENDS)}: how the generator "
                         "plays the guest (benchmarks/loadgen.py)")
    ap.add_argument("--completion-us", type=float, default=COMPLETION_US,
                    help="the driver front-end's guest time per completion")
    ap.add_argument("--out", help="output stem (default benchmarks/results/<date>[-quick])")
    ap.add_argument("--from-json", metavar="JSON",
                    help="only rewrite the markdown next to an earlier run's JSON")
    args = ap.parse_args()
    if args.from_json:
        path = Path(args.from_json)
        doc = json.loads(path.read_text())
        names = list(dict.fromkeys(r["daemon"] for r in doc["runs"]))
        write_markdown(path.with_suffix(".md"), doc["meta"], doc["summary"], doc["runs"],
                       names, [p.name for p in path.parent.glob(f"{path.stem}-*.png")])
        print(f"rewrote {path.with_suffix('.md')}")
        return
    seconds = args.seconds or (0.25 if args.quick else 1.0)
    daemons = args.daemons.split(",")
    frontends = tuple(args.frontends.split(","))
    if unknown := set(frontends) - set(FRONTENDS):
        ap.error(f"unknown front-end(s): {', '.join(sorted(unknown))}")
    workloads = args.workloads.split(",")
    queue_counts = [int(q) for q in args.queues.split(",")]
    shares = make_shares(args.shares.split(","))
    kinds = {d: make(d) for d in daemons}
    versions = {d: k.version() for d, k in kinds.items()}
    sock = Path(f"/tmp/pyvirtiofsd-bench-{os.getpid()}.sock")  # runs of other users beside
    plan = []
    # queue counts interleave within a round too, so the scaling ratios (2 queues over 1)
    # compare connections minutes apart at most, not a block of rounds against a later one
    for share in shares:
        for rnd in range(args.rounds):
            for q in queue_counts:
                for d in daemons:
                    if q <= kinds[d].max_request_queues:
                        plan.append((share, q, rnd, d))
    cells_total = len(plan) * len(workloads) * len(frontends) * len(QDS)
    done = 0
    t_start = time.monotonic()

    def progress(label: str, cell: dict[str, Any] | None) -> None:
        nonlocal done
        if cell is not None:
            done += 1
        el = time.monotonic() - t_start
        eta = el / done * (cells_total - done) if done else 0
        what = (f"{cell['workload']} qd{cell['qd']}: {cell['ops_per_s']:,.0f} ops/s"
                if cell else "starting")
        line = (f"[{done:4d}/{cells_total}] {label} {what}"
                f"  elapsed {el:4.0f}s eta {eta:4.0f}s")
        print(f"\r{line:<110}", end="", file=sys.stderr, flush=True)

    runs: list[dict[str, Any]] = []
    for share, q, rnd, d in plan:
        label = f"{share} q{q} round {rnd + 1}/{args.rounds} {d:<11}"
        progress(label, None)
        try:
            run = run_connection(kinds[d], shares[share], q, workloads, seconds, sock,
                                 lambda c, label=label: progress(label, c), frontends,
                                 args.completion_us)
        except Exception as e:  # noqa: BLE001 - one failed connection must not end the run
            print(f"\n{label}: failed: {e!r}\n{kinds[d].log()[-1500:]}", file=sys.stderr)
            run = {"cells": [], "error": repr(e)}
        run.update(share=share, queues=q, round=rnd, daemon=d)
        runs.append(run)
    print(file=sys.stderr)
    wall = time.monotonic() - t_start
    summary = summarize(runs)
    date = dt.datetime.now().strftime("%Y-%m-%d")
    RESULTS.mkdir(exist_ok=True)
    stem = Path(args.out) if args.out else RESULTS / (date + ("-quick" if args.quick else ""))
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python3 -m benchmarks.run " + " ".join(sys.argv[1:]),
        "rounds": args.rounds, "seconds": seconds, "wall_s": wall,
        "machine": machine_info(), "versions": versions,
        "workloads": [cell_name(w, f) for w in workloads for f in frontends],
        "frontends": list(frontends), "completion_us": args.completion_us,
        "queue_counts": queue_counts,
        "shares": {k: {"path": str(v), "fstype": fs_type(v),
                          "journaled_ext4": journaled_ext4(v)} for k, v in shares.items()},
    }  # fmt: skip
    stem.parent.mkdir(parents=True, exist_ok=True)
    pngs = plot(stem, meta, summary, daemons)
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    write_markdown(stem.with_suffix(".md"), meta, summary, runs, daemons, pngs)
    print(f"wrote {stem}.md, {stem}.json" + "".join(f", {p}" for p in pngs))
    for share in shares:
        print(f"\n{share}, 1 queue, median ops/s (ratio to Rust):")
        for wl in meta["workloads"]:
            for qd in QDS:
                rust = summary.get(f"{share}|1|{wl}|{qd}|rust")
                parts = []
                for d in daemons:
                    s = summary.get(f"{share}|1|{wl}|{qd}|{d}")
                    if s:
                        r = (f" ×{s['ops_median'] / rust['ops_median']:.2f}"
                             if rust and rust["ops_median"] else "")
                        parts.append(f"{d} {fmt_ops(s['ops_median'])}{r} "
                                     f"(wake {s['wakeups_per_request']:.2f}, "
                                     f"kick {s['kicks_per_request']:.2f})")
                print(f"  {wl:>22} qd{qd:<2} " + "  ".join(parts))


if __name__ == "__main__":
    main()
