"""Many request queues, all loaded at once, on however many cores this machine has.

    python3 -m benchmarks.many_queues [--queues 1,2,4,8,16] [--daemons pyvirtiofsd] \\
        [--workloads getattr,read_4k,write_4k,create_release_unlink] [--rounds 3]

A 16-vCPU guest keeps all its queues busy; a host may give its daemon two cores. For every
round, queue count and daemon (interleaved in that order, a fresh daemon per connection)
``benchmarks.loadgen`` drives each workload at QD16 on every request queue at once
(tmpfs share). Reported per cell: total ops/s (median over rounds, and its ratio to the
2-queue figure), each queue's p50 and p99 latency (the worst queue's p99/p50 ratio) and
the daemon's CPU per request. Writes ``benchmarks/results/<date>-many-queues.md`` and
``.json``. Run it on a larger machine unchanged to check docs/scaling.md's prediction.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.loadgen import LoadGen
from benchmarks.run import RESULTS, machine_info, make_shares, tree_cpu
from tests.support.reference_daemons import Daemon, make

QUEUES = (1, 2, 4, 8, 16)
WORKLOADS = ("getattr", "read_4k", "write_4k", "create_release_unlink")
QD = 16


def connection(daemon: Daemon, share: Path, queues: int, workloads: list[str],
               seconds: float, sock: Path) -> list[dict[str, Any]]:
    """Every workload on one fresh daemon with ``queues`` request queues."""
    proc = daemon.start(share, sock)
    gen = None
    cells = []
    try:
        gen = LoadGen(str(sock), queues)
        time.sleep(0.2)
        for wl in workloads:
            cpu0 = tree_cpu(proc.pid)
            res = gen.run(wl, QD, seconds)
            cpu = tree_cpu(proc.pid) - cpu0
            cells.append({"workload": wl, "served_queues": gen.queues,
                          "ops_per_s": res.ops_per_s, "errors": res.errors,
                          "stalls": res.stalls,
                          "cpu_us_per_op": 1e6 * cpu / res.ops if res.ops else None,
                          "gen_cpu_share": res.gen_cpu / res.seconds if res.seconds else 0,
                          "per_queue": res.per_queue})
    finally:
        if gen is not None:
            gen.close()
        daemon.stop()
        sock.unlink(missing_ok=True)
    return cells


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for run in runs:
        for c in run.get("cells", []):
            groups.setdefault((run["daemon"], run["queues"], c["workload"]), []).append(c)
    out = {}
    for (d, q, wl), cells in groups.items():
        # each queue's p50/p99: median over rounds; the worst queue's ratio is reported
        per_q: dict[int, list[tuple[float, float]]] = {}
        for c in cells:
            for pq in c["per_queue"]:
                per_q.setdefault(pq["queue"], []).append((pq["p50_us"], pq["p99_us"]))
        queues = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v))
                  for k, v in per_q.items()}
        ratios = [p99 / p50 for p50, p99 in queues.values() if p50 > 0]
        cpu = [c["cpu_us_per_op"] for c in cells if c["cpu_us_per_op"]]
        out[f"{d}|{q}|{wl}"] = {
            "daemon": d, "queues": q, "workload": wl, "n": len(cells),
            "ops_median": statistics.median(c["ops_per_s"] for c in cells),
            "ops_min": min(c["ops_per_s"] for c in cells),
            "ops_max": max(c["ops_per_s"] for c in cells),
            "p50_us_median_queue": statistics.median(a for a, _ in queues.values()),
            "p99_us_worst_queue": max(b for _, b in queues.values()),
            "p99_over_p50_worst": max(ratios) if ratios else 0.0,
            "per_queue": {k: {"p50_us": a, "p99_us": b} for k, (a, b) in sorted(queues.items())},
            "cpu_us_per_op": statistics.median(cpu) if cpu else None,
            "errors": sum(c["errors"] for c in cells),
            "stalls": sum(c["stalls"] for c in cells),
        }  # fmt: skip
    return out


def fmt_ops(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def write_markdown(path: Path, meta: dict[str, Any], summary: dict[str, dict[str, Any]]) -> None:
    m = meta["machine"]
    qs = meta["queue_counts"]
    L = [f"# Many queues loaded at once — {meta['date']}", "",
         f"Command: `{meta['command']}` ({meta['rounds']} rounds, {meta['seconds']} s per "
         f"cell). Wall time {meta['wall_s']:.0f} s.", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}, kernel {m['kernel']}, "
         f"Python {m['python']}. The generator (QEMU and the guest) runs on the same cores.",
         "", "Daemons:", ""]
    L += [f"- `{d}`: {meta['versions'][d]}" for d in meta["daemons"]]
    L += ["", f"Every request queue at QD{QD}, tmpfs share. Total ops/s is the median over "
          "rounds (min–max), then its ratio to the 2-queue figure. p50/p99 are per queue "
          "(median over rounds); shown: the median queue's p50, the worst queue's p99, and "
          "the largest p99/p50 of any queue.", ""]
    for d in meta["daemons"]:
        L += [f"## {d}", "", "| workload |" + "".join(f" {q} q |" for q in qs),
              "|---|" + "---|" * len(qs)]
        for wl in meta["workloads"]:
            two = summary.get(f"{d}|2|{wl}")
            row = f"| {wl} ops/s |"
            for q in qs:
                s = summary.get(f"{d}|{q}|{wl}")
                if not s:
                    row += " – |"
                    continue
                rel = (f" ×{s['ops_median'] / two['ops_median']:.2f}"
                       if two and two["ops_median"] else "")
                err = f" **{s['errors']} errors**" if s["errors"] else ""
                row += (f" {fmt_ops(s['ops_median'])} ({fmt_ops(s['ops_min'])}–"
                        f"{fmt_ops(s['ops_max'])}){rel}{err} |")
            L.append(row)
            row = f"| {wl} p50 / worst p99 µs (max p99/p50) |"
            for q in qs:
                s = summary.get(f"{d}|{q}|{wl}")
                row += (f" {s['p50_us_median_queue']:.0f} / {s['p99_us_worst_queue']:.0f} "
                        f"({s['p99_over_p50_worst']:.1f}) |" if s else " – |")
            L.append(row)
            row = f"| {wl} CPU µs/op |"
            for q in qs:
                s = summary.get(f"{d}|{q}|{wl}")
                row += f" {s['cpu_us_per_op']:.1f} |" if s and s["cpu_us_per_op"] else " – |"
            L.append(row)
        L.append("")
    stalls = sum(s["stalls"] for s in summary.values())
    L += [f"Generator re-kicks after 100 ms without progress (stalls): {stalls}.", ""]
    path.write_text("\n".join(L))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queues", default=",".join(map(str, QUEUES)))
    ap.add_argument("--daemons", default="pyvirtiofsd")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--out", help="output stem (default benchmarks/results/<date>-many-queues)")
    args = ap.parse_args()
    queue_counts = [int(q) for q in args.queues.split(",")]
    names = args.daemons.split(",")
    workloads = args.workloads.split(",")
    daemons = {d: make(d) for d in names}
    share = make_shares(["tmpfs"])["tmpfs"]
    sock = Path(f"/tmp/pyvirtiofsd-many-{threading.get_native_id()}.sock")
    runs: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for rnd in range(args.rounds):
        for q in queue_counts:
            for d in names:
                if q > daemons[d].max_request_queues:
                    continue
                run: dict[str, Any] = {"daemon": d, "queues": q, "round": rnd}
                try:
                    run["cells"] = connection(daemons[d], share, q, workloads, args.seconds,
                                              sock)
                except Exception as e:  # noqa: BLE001 - one failed connection must not end it
                    print(f"{d} q{q}: failed: {e!r}\n{daemons[d].log()[-1500:]}",
                          file=sys.stderr)
                    run["error"] = repr(e)
                runs.append(run)
                print(f"round {rnd + 1} {d} q{q}: " + ", ".join(
                    f"{c['workload']} {fmt_ops(c['ops_per_s'])}" for c in run.get("cells", [])),
                    file=sys.stderr)
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": "python3 -m benchmarks.many_queues " + " ".join(sys.argv[1:]),
            "rounds": args.rounds, "seconds": args.seconds, "wall_s": time.monotonic() - t0,
            "machine": machine_info(), "daemons": names, "queue_counts": queue_counts,
            "workloads": workloads, "versions": {d: k.version() for d, k in daemons.items()}}
    summary = summarize(runs)
    stem = Path(args.out) if args.out else RESULTS / f"{dt.date.today()}-many-queues"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    write_markdown(stem.with_suffix(".md"), meta, summary)
    print(f"wrote {stem}.md, {stem}.json")


if __name__ == "__main__":
    main()
