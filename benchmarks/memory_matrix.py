"""Memory of the daemon over request-queue counts, per process, idle and under load.

    python3 -m benchmarks.memory_matrix [--queues 1,2,4,8,16] \\
        [--daemons pyvirtiofsd,pyvirtiofsd@main,rust] [--rounds 2] [--seconds 2]

For every round, queue count and daemon (interleaved in that order, a fresh daemon per
connection): connect with ``benchmarks.loadgen`` (it plays QEMU and the guest), read every
process's memory idle (after INIT), then run GETATTR at QD16 on every request queue at
once (tmpfs share) and read it again near the end of the load. Per process: PSS, its
anonymous, file and shmem parts, private dirty, page tables (``benchmarks.procmem``), and
at load PSS by kind of mapping (heap, guest memory, shared tables, libraries...).
Reference daemons serve one request queue, so they appear in the 1-queue column only.

Guest memory the daemon touched counts in its PSS, split with the generator that shares
it; the breakdown shows how much that is. Writes
``benchmarks/results/<date>-memory.md`` and ``.json``.
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
from benchmarks.procmem import MemorySampler, snapshot
from benchmarks.run import RESULTS, machine_info, make_shares
from tests.support.reference_daemons import Daemon, make

QUEUES = (1, 2, 4, 8, 16)
WORKLOAD, QD = "getattr", 16


def measure(daemon: Daemon, share: Path, queues: int, seconds: float,
            sock: Path) -> dict[str, Any]:
    """One connection: idle and loaded snapshots of every process of the daemon."""
    proc = daemon.start(share, sock)
    gen = None
    try:
        gen = LoadGen(str(sock), queues)
        time.sleep(0.3)  # the workers finish starting
        idle = snapshot(proc.pid)
        # the breakdown by mapping late in the load, while it still runs
        with MemorySampler(proc.pid, until=seconds * 0.8) as mem:
            res = gen.run(WORKLOAD, QD, seconds)
        loaded, peak = mem.last, mem.peak
        return {"served_queues": gen.queues, "ops_per_s": res.ops_per_s, "errors": res.errors,
                "idle": [m.as_dict() for m in idle], "load": [m.as_dict() for m in loaded],
                "peak": [m.as_dict() for m in peak]}
    finally:
        if gen is not None:
            gen.close()
        daemon.stop()
        sock.unlink(missing_ok=True)


def mb(kib: float) -> str:
    return f"{kib / 1024:.1f}"


ROLE_ORDER = ["outside", "helper", "keeper", "supervisor", "template", "template+hiprio", "hiprio",
              "request worker"]


def kinds(proc: dict[str, Any]) -> str:
    """The process's role, with queue numbers folded: one request worker stands for all."""
    role = proc["role"]
    return "request worker" if role.startswith(("queue", "child")) else role


def per_role(procs: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Median per process of each role (request workers pooled)."""
    groups: dict[str, list[int]] = {}
    for p in procs:
        groups.setdefault(kinds(p), []).append(p[key])
    return {r: statistics.median(v) for r, v in groups.items()}


def write_markdown(path: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    daemons, qs = meta["daemons"], meta["queue_counts"]
    L = [f"# Memory over request queues — {meta['date']}", "",
         f"Command: `{meta['command']}`. Wall time {meta['wall_s']:.0f} s.", "",
         f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
         f"{meta['machine']['os']}, kernel {meta['machine']['kernel']}, Python "
         f"{meta['machine']['python']}.", "", "Daemons:", ""]
    L += [f"- `{d}`: {meta['versions'][d]}" for d in daemons]
    L += ["", f"Load: {WORKLOAD.upper()} at QD{QD} on every request queue, tmpfs share "
          f"({meta['seconds']} s per connection, {meta['rounds']} round(s)). PSS in MB summed "
          "over the daemon's processes (median over rounds; load = the largest total seen "
          "while the load ran). Guest memory the daemon touched is in it, split with the "
          "generator.", "",
          "## Total PSS (MB)", "",
          "| daemon | state |" + "".join(f" {q} q |" for q in qs) + " per extra queue (1→max) |",
          "|---|---|" + "---|" * len(qs) + "---|"]

    def cell(d: str, q: int) -> list[dict[str, Any]]:
        return [r for r in runs if r["daemon"] == d and r["queues"] == q and "idle" in r]

    for d in daemons:
        for state in ("idle", "peak"):
            vals = {}
            for q in qs:
                rs = cell(d, q)
                if rs:
                    vals[q] = statistics.median(sum(p["pss"] for p in r[state]) for r in rs)
            row = f"| {d} | {'idle' if state == 'idle' else 'load'} |" + "".join(
                f" {mb(vals[q])} |" if q in vals else " – |" for q in qs)
            have = sorted(vals)
            if len(have) > 1:
                row += f" {mb((vals[have[-1]] - vals[have[0]]) / (have[-1] - have[0]))} |"
            else:
                row += " – |"
            L.append(row)
    L += ["", "## Per process under load (KiB, median per process of that role)", "",
          "PSS anon/file/shmem split PSS by what backs the page; private dirty is what the "
          "process alone wrote; page tables are VmPTE.", ""]
    keys = ("pss", "pss_anon", "pss_file", "pss_shmem", "private_dirty", "page_tables")
    L += ["| daemon | queues | role | n |" + "".join(f" {k} |" for k in keys),
          "|---|---|---|---|" + "---|" * len(keys)]
    for d in daemons:
        for q in qs:
            rs = cell(d, q)
            if not rs:
                continue
            load = [p for r in rs for p in r["load"]]
            roles = sorted({kinds(p) for p in load}, key=ROLE_ORDER.index)
            for role in roles:
                ps = [p for p in load if kinds(p) == role]
                n = len(ps) // len(rs)
                L.append(f"| {d} | {q} | {role} | {n} |" + "".join(
                    f" {statistics.median(p[k] for p in ps):.0f} |" for k in keys))
    L += ["", "## PSS by kind of mapping under load (KiB, summed over the daemon's "
          "processes, median over rounds)", ""]
    all_kinds = sorted({k for r in runs for p in r.get("load", []) for k in p["by_mapping"]})
    L += ["| daemon | queues |" + "".join(f" {k} |" for k in all_kinds),
          "|---|---|" + "---|" * len(all_kinds)]
    for d in daemons:
        for q in qs:
            rs = cell(d, q)
            if not rs:
                continue
            L.append(f"| {d} | {q} |" + "".join(
                f" {statistics.median(sum(p['by_mapping'].get(k, 0) for p in r['load']) for r in rs):.0f} |"  # noqa: E501
                for k in all_kinds))
    fails = [r for r in runs if "error" in r]
    errors = sum(r.get("errors", 0) for r in runs)
    L += ["", f"Request errors over all connections: {errors}. Failed connections: "
          f"{len(fails)}" + "".join(f"\n- {r['daemon']} {r['queues']} q: `{r['error']}`"
                                    for r in fails), ""]
    path.write_text("\n".join(L))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queues", default=",".join(map(str, QUEUES)))
    ap.add_argument("--daemons", default="pyvirtiofsd,rust")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", help="output stem (default benchmarks/results/<date>-memory)")
    args = ap.parse_args()
    queue_counts = [int(q) for q in args.queues.split(",")]
    names = args.daemons.split(",")
    kinds_ = {d: make(d) for d in names}
    share = make_shares(["tmpfs"])["tmpfs"]
    sock = Path(f"/tmp/pyvirtiofsd-memory-{threading.get_native_id()}.sock")
    runs: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for rnd in range(args.rounds):
        for q in queue_counts:
            for d in names:
                if q > kinds_[d].max_request_queues:
                    continue
                try:
                    run = measure(kinds_[d], share, q, args.seconds, sock)
                except Exception as e:  # noqa: BLE001 - one failed connection must not end it
                    print(f"{d} q{q}: failed: {e!r}\n{kinds_[d].log()[-1500:]}",
                          file=sys.stderr)
                    run = {"error": repr(e)}
                run.update(daemon=d, queues=q, round=rnd)
                runs.append(run)
                if "idle" in run:
                    print(f"round {rnd + 1} {d:>18} q{q:<2}: idle {mb(total_of(run, 'idle'))} "
                          f"MB, load {mb(total_of(run, 'peak'))} MB, "
                          f"{run['ops_per_s']:,.0f} ops/s", file=sys.stderr)
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": "python3 -m benchmarks.memory_matrix " + " ".join(sys.argv[1:]),
            "rounds": args.rounds, "seconds": args.seconds, "wall_s": time.monotonic() - t0,
            "machine": machine_info(), "daemons": names, "queue_counts": queue_counts,
            "versions": {d: k.version() for d, k in kinds_.items()}}
    stem = Path(args.out) if args.out else RESULTS / f"{dt.date.today()}-memory"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    write_markdown(stem.with_suffix(".md"), meta, runs)
    print(f"wrote {stem}.md, {stem}.json")


def total_of(run: dict[str, Any], state: str) -> int:
    return sum(p["pss"] for p in run[state])


if __name__ == "__main__":
    main()
