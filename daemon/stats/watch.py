"""``pyvirtiofsd stats --watch [--interval S] [--count N]``: a terminal view of a running
daemon, redrawn in place every interval (plain ANSI escapes, no curses): per queue the
requests, errors and bytes per second over the last interval, and the busiest opcodes with
their latency percentiles, estimated from the shared latency histograms."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from daemon.stats import queue_stats
from daemon.stats.tables import read_tables

HOME_AND_CLEAR = "\x1b[H\x1b[J"
TOP_OPCODES = 8


def percentile(buckets: list[int], q: float) -> float | None:
    """The q-quantile in seconds of a latency histogram (counts per bucket of
    queue_stats.LATENCY_BOUNDS_US, not cumulative), interpolated within its bucket as
    Prometheus' histogram_quantile does; past the last bound, that bound. None if empty."""
    total = sum(buckets)
    if not total:
        return None
    rank, below, lower = q * total, 0, 0.0
    for bound_us, n in zip(queue_stats.LATENCY_BOUNDS_US, buckets, strict=False):
        upper = bound_us / 1e6
        if n and below + n >= rank:
            return lower + (upper - lower) * (rank - below) / n
        below, lower = below + n, upper
    return lower


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.1f} us"
    return f"{value * 1e3:.2f} ms"


def delta(after: dict, before: dict | None) -> dict:
    """An opcode's counters over the interval (``before`` None: it is new)."""
    if before is None:
        return after
    out = {k: after[k] - before[k] for k in queue_stats.OP_FIELDS}
    out["latency"] = [a - b for a, b in zip(after["latency"], before["latency"], strict=True)]
    return out


def frame(now: dict, before: dict, interval: float) -> list[str]:
    """The lines of one frame: rates over the ``interval`` seconds since ``before``."""
    inodes, handles = now["inodes"], now["handles"]
    lines = [f"pyvirtiofsd pid {now['pid']}: {now['workers']} worker(s), "
             f"{inodes['entries']:,} inodes, {handles['entries']:,} open files, "
             f"every {interval:g} s ({time.strftime('%H:%M:%S')})", ""]
    rows = now["queues"]
    old_rows = before["queues"] if len(before["queues"]) == len(rows) else rows
    lines.append(f"{'queue':>5} {'req/s':>10} {'err/s':>8} {'in C':>5} {'read MB/s':>10} "
                 f"{'write MB/s':>10} {'restarts':>8}")
    for index, (row, old) in enumerate(zip(rows, old_rows, strict=True)):
        if not (row["requests"] or row["wakeups"] or row["dropped"]):
            continue
        rate = {k: (row[k] - old[k]) / interval
                for k in ("requests", "errors", "read_bytes", "write_bytes")}
        share = row["in_c"] / row["requests"] if row["requests"] else 0.0
        lines.append(f"{index:>5} {rate['requests']:>10,.0f} {rate['errors']:>8,.0f} "
                     f"{share:>5.0%} {rate['read_bytes'] / 1e6:>10.1f} "
                     f"{rate['write_bytes'] / 1e6:>10.1f} {row['worker_restarts']:>8}")
    lines += ["", f"{'queue':>5} {'opcode':<14} {'req/s':>10} {'err/s':>8} {'p50':>10} "
                  f"{'p99':>10}   (over the last interval)"]
    busiest = []
    for index, (row, old) in enumerate(zip(rows, old_rows, strict=True)):
        for name, counters in row["opcodes"].items():
            d = delta(counters, old["opcodes"].get(name))
            if d["requests"]:
                busiest.append((d["requests"], index, name, d))
    busiest.sort(key=lambda t: (-t[0], t[1], t[2]))
    for n, index, name, d in busiest[:TOP_OPCODES]:
        lines.append(f"{index:>5} {name:<14} {n / interval:>10,.0f} "
                     f"{d['errors'] / interval:>8,.0f} "
                     f"{seconds(percentile(d['latency'], 0.5)):>10} "
                     f"{seconds(percentile(d['latency'], 0.99)):>10}")
    return lines


def watch(pid: Callable[[], int], interval: float, count: int | None,
          out: TextIO = sys.stdout) -> None:
    """Redraw every ``interval`` seconds, ``count`` times (None: until interrupted), each
    frame with the rates over the interval before it. Escapes only when ``out`` is a
    terminal; else the frames follow one another, a blank line between."""
    tty = out.isatty()
    shown = 0
    try:
        before = read_tables(pid())
        while count is None or shown < count:
            time.sleep(interval)
            now = read_tables(pid())
            text = "\n".join(frame(now, before, interval)) + "\n"
            out.write((HOME_AND_CLEAR if tty else "\n" if shown else "") + text)
            out.flush()
            shown += 1
            before = now
    except KeyboardInterrupt:
        pass
