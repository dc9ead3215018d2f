"""``pyvirtiofsd stats``: what a running daemon holds, read from its shared-memory tables
without disturbing it (the tables' counters are updated atomically by every worker).

    pyvirtiofsd stats --socket-path /run/vfs.sock [--interval 1] [--json]
    pyvirtiofsd stats --pid 1234
    pyvirtiofsd stats --socket-path S --format openmetrics|prometheus [--output FILE]
    pyvirtiofsd stats --socket-path S --listen 127.0.0.1:9432
    pyvirtiofsd stats --socket-path S --watch [--interval 1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time

from daemon.stats.daemon_info import daemon_pid, read_info
from daemon.stats.tables import read_tables


def snapshot(pid: int, interval: float) -> dict:
    """Totals now, and rates over ``interval`` seconds."""
    first = read_tables(pid)
    time.sleep(interval)
    t = read_tables(pid)
    second, handle_stats = t["inodes"], t["handles"]
    rate = {k: (second[k] - first["inodes"][k]) / interval
            for k in ("lookups", "inserts", "removals")}
    info = read_info(pid)
    return {
        "pid": pid,
        # which code serves, and how many live upgrades this daemon went through
        "build": info.get("build"),
        "live_upgrades": info.get("upgrades", 0),
        "workers": t["workers"],
        "fds_held": t["fds_held"],
        "inodes": {
            "entries": second["entries"], "capacity": second["capacity"],
            "load_factor": round(second["load_factor"], 6),
            "with_file_handle": second["with_handle"], "tombstones": second["tombstones"],
            "lookups_per_s": rate["lookups"], "inserts_per_s": rate["inserts"],
            "removals_per_s": rate["removals"], "full_errors": second["full_errors"],
            "lock_takeovers": second["lock_takeovers"],
        },
        "open_files": {
            "entries": handle_stats["entries"], "capacity": handle_stats["capacity"],
            "load_factor": round(handle_stats["load_factor"], 6),
            "full_errors": handle_stats["full_errors"],
        },
        "queues": queue_rows(first["queues"], t["queues"], interval),
    }


def queue_rows(before: list[dict], after: list[dict], interval: float) -> list[dict]:
    """Every queue that has seen a kick or a request: totals, and rates over interval."""
    if len(before) != len(after):  # the daemon went and came back between the two
        before = after
    out = []
    for index, (a, b) in enumerate(zip(before, after, strict=True)):
        if not (b["requests"] or b["wakeups"] or b["dropped"]):
            continue
        row = {"queue": index, **{k: v for k, v in b.items() if k != "by_opcode"}}
        row["requests_per_s"] = (b["requests"] - a["requests"]) / interval
        row["read_bytes_per_s"] = (b["read_bytes"] - a["read_bytes"]) / interval
        row["write_bytes_per_s"] = (b["write_bytes"] - a["write_bytes"]) / interval
        row["by_opcode"] = b["by_opcode"]
        out.append(row)
    return out


def render(s: dict) -> str:
    i, h = s["inodes"], s["open_files"]
    return "\n".join([
        f"pyvirtiofsd pid {s['pid']}: {s['workers']} worker(s), {s['fds_held']} fds held, "
        f"code {s.get('build') or '?'} ({s.get('live_upgrades', 0)} live upgrades)",
        f"inodes:     {i['entries']:>10,} of {i['capacity']:,} "
        f"(load {i['load_factor']:.2%}, {i['with_file_handle']:,} by file handle, "
        f"{i['tombstones']:,} tombstones)",
        f"            {i['lookups_per_s']:>10,.0f} lookups/s, {i['inserts_per_s']:,.0f} "
        f"inserts/s, {i['removals_per_s']:,.0f} removals/s, {i['full_errors']} full errors",
        f"open files: {h['entries']:>10,} of {h['capacity']:,} (load {h['load_factor']:.2%})",
        *render_queues(s.get("queues", [])),
    ])


def render_queues(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [f"{'queue':>5} {'requests':>12} {'req/s':>9} {'in C':>6} {'errors':>8} "
             f"{'dropped':>7} {'read MB/s':>9} {'write MB/s':>10}  most frequent"]
    for r in rows:
        top = sorted(r["by_opcode"].items(), key=lambda kv: -kv[1])[:3]
        share = r["in_c"] / r["requests"] if r["requests"] else 0.0
        lines.append(
            f"{r['queue']:>5} {r['requests']:>12,} {r['requests_per_s']:>9,.0f} "
            f"{share:>6.0%} {r['errors']:>8,} {r['dropped']:>7,} "
            f"{r['read_bytes_per_s'] / 1e6:>9.1f} {r['write_bytes_per_s'] / 1e6:>10.1f}  "
            + ", ".join(f"{name} {n:,}" for name, n in top))
    return lines


def main(argv: list[str]) -> int:
    # no docstrings under python -OO, as the daemon itself runs
    summary = (__doc__ or "\n").splitlines()[0]
    p = argparse.ArgumentParser(prog="pyvirtiofsd stats", description=summary)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--socket-path", help="the daemon's --socket-path (reads <socket>.pid)")
    who.add_argument("--pid", type=int, help="the daemon's pid")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between samples (rates, --watch frames)")
    p.add_argument("--format", choices=["text", "json", "openmetrics", "prometheus"],
                   default="text", help="openmetrics: the OpenMetrics exposition; prometheus: "
                   "the Prometheus text format, which node_exporter's textfile collector reads")
    p.add_argument("--json", action="store_true", help="the same as --format json")
    p.add_argument("--output", metavar="FILE",
                   help="write to FILE atomically (a temporary file renamed over it)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--listen", metavar="HOST:PORT",
                      help="serve /metrics over HTTP from this process until stopped")
    mode.add_argument("--watch", action="store_true",
                      help="a terminal view redrawn every --interval seconds")
    p.add_argument("--count", type=int, help="with --watch: stop after this many frames")
    args = p.parse_args(argv)
    fmt = "json" if args.json else args.format
    if args.interval <= 0:
        p.error("--interval must be positive")

    def pid() -> int:
        return args.pid if args.pid is not None else daemon_pid(
            args.socket_path, "pyvirtiofsd stats: cannot read the daemon's pid from")

    if args.watch:
        from daemon.stats import watch

        watch.watch(pid, args.interval, args.count)
        return 0
    if args.listen or fmt in ("openmetrics", "prometheus"):
        from daemon.stats import openmetrics  # imports prometheus_client: only here

        if args.listen:
            signal.signal(signal.SIGTERM, _exit_quietly)
            openmetrics.listen(pid, args.listen)
            return 0
        current = pid()
        read_tables(current)  # no daemon: say so and fail, not "up 0"
        data = openmetrics.render(lambda: current, fmt)
    else:
        s = snapshot(pid(), args.interval)
        data = ((json.dumps(s) if fmt == "json" else render(s)) + "\n").encode()
    if args.output:
        write_atomically(args.output, data)
    else:
        sys.stdout.buffer.write(data)
    return 0


def write_atomically(path: str, data: bytes) -> None:
    """Write beside ``path`` and rename over it, so a reader (node_exporter) sees the old
    file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".pyvirtiofsd-stats-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
