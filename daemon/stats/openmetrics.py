"""``pyvirtiofsd stats --format openmetrics|prometheus [--output FILE]`` and ``--listen``:
the daemon's counters as a Prometheus scrape target or a node_exporter text file.

Only the stats command imports this module (and with it ``prometheus_client``): the daemon's
own processes never do, they only write their counters into shared memory
(daemon/stats/queue_stats.py), and every sample here is read from there at the moment it is
asked for. node_exporter's textfile collector reads the Prometheus text format, not
OpenMetrics, hence both formats (``--output`` writes either atomically); the listener
answers in the one the scraper asks for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import exposition
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from daemon.stats import queue_stats
from daemon.stats.tables import read_tables

PREFIX = "pyvirtiofsd_"
# the histogram's bucket bounds in seconds, as the exposition writes them
LATENCY_BOUNDS = tuple(floatToGoString(us / 1e6) for us in queue_stats.LATENCY_BOUNDS_US)

# per queue: (counter name, row field, help)
QUEUE_COUNTERS = (
    ("requests_in_c", "in_c", "Requests answered by the C fast path."),
    ("dropped_chains", "dropped", "Malformed descriptor chains completed without an answer."),
    ("read_bytes", "read_bytes", "File data bytes READ replies carried to the guest."),
    ("write_bytes", "write_bytes", "File data bytes WRITE requests wrote."),
    ("wakeups", "wakeups", "Kicks the worker woke up for."),
    ("guest_interrupts", "notifies", "Interrupts sent to the guest (used-buffer notifications)."),
    ("worker_restarts", "worker_restarts", "Workers that died and were started again."),
)


class DaemonCollector(Collector):
    """Reads the daemon's shared tables on every collect(); ``pid`` is asked for each
    time too, so a listener follows a daemon restarted under the same socket path."""

    def __init__(self, pid: Callable[[], int]) -> None:
        self.pid = pid

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(PREFIX + "up", "1 if the daemon's tables could be read.")
        try:
            tables = read_tables(self.pid())
        except SystemExit:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from table_metrics(tables)
        yield from queue_metrics(tables["queues"])


def table_metrics(t: dict) -> Iterator[Metric]:
    """The processes and the shared inode and open-file tables."""
    inodes, handles = t["inodes"], t["handles"]
    for name, value, doc in (
        ("workers", t["workers"], "Queue worker processes."),
        ("fds_held", t["fds_held"], "File descriptors the supervisor holds."),
        ("inodes", inodes["entries"], "Inodes the guest knows (inode table entries)."),
        ("inodes_capacity", inodes["capacity"], "Inode table slots."),
        ("inodes_with_file_handle", inodes["with_handle"], "Inodes kept by file handle."),
        ("inode_tombstones", inodes["tombstones"], "Inode table tombstones."),
        ("open_files", handles["entries"], "Files and directories the guest holds open."),
        ("open_files_capacity", handles["capacity"], "Open-file table slots."),
    ):
        g = GaugeMetricFamily(PREFIX + name, doc)
        g.add_metric([], value)
        yield g
    for name, value, doc in (
        ("inode_lookups", inodes["lookups"], "Inode table lookups."),
        ("inode_inserts", inodes["inserts"], "Inode table inserts."),
        ("inode_removals", inodes["removals"], "Inode table removals."),
        ("inode_table_full_errors", inodes["full_errors"], "Inserts refused: table full."),
        ("open_file_table_full_errors", handles["full_errors"], "Opens refused: table full."),
    ):
        c = CounterMetricFamily(PREFIX + name, doc)
        c.add_metric([], value)
        yield c


def queue_metrics(rows: list[dict]) -> Iterator[Metric]:
    """Per queue, and per queue and opcode (only the opcodes it has seen)."""
    requests = CounterMetricFamily(PREFIX + "requests", "FUSE requests answered.",
                                   labels=["queue", "opcode"])
    errors = CounterMetricFamily(PREFIX + "request_errors",
                                 "FUSE requests answered with an error.",
                                 labels=["queue", "opcode"])
    reply_bytes = CounterMetricFamily(
        PREFIX + "reply_bytes", "Bytes written into the guest's buffers, reply headers "
        "included.", labels=["queue", "opcode"], unit="bytes")
    duration = HistogramMetricFamily(
        PREFIX + "request_duration_seconds", "From the worker popping a request to its "
        "reply.", labels=["queue", "opcode"], unit="seconds")
    per_queue = {name: CounterMetricFamily(PREFIX + name, doc, labels=["queue"],
                                           unit="bytes" if name.endswith("_bytes") else "")
                 for name, _, doc in QUEUE_COUNTERS}
    for index, row in enumerate(rows):
        if not (row["requests"] or row["wakeups"] or row["dropped"]):
            continue
        queue = str(index)
        for name, field, _ in QUEUE_COUNTERS:
            per_queue[name].add_metric([queue], row[field])
        for opcode, c in row["opcodes"].items():
            labels = [queue, opcode]
            requests.add_metric(labels, c["requests"])
            errors.add_metric(labels, c["errors"])
            reply_bytes.add_metric(labels, c["reply_bytes"])
            cumulative, buckets = 0, []
            for bound, n in zip((*LATENCY_BOUNDS, "+Inf"), c["latency"], strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            duration.add_metric(labels, buckets, sum_value=c["latency_ns"] / 1e9)
    yield requests
    yield errors
    yield reply_bytes
    yield duration
    yield from per_queue.values()


def registry(pid: Callable[[], int]) -> CollectorRegistry:
    r = CollectorRegistry(auto_describe=False)
    r.register(DaemonCollector(pid))
    return r


def render(pid: Callable[[], int], fmt: str) -> bytes:
    """One exposition: ``openmetrics`` (ends with ``# EOF``) or ``prometheus`` (the text
    format node_exporter's textfile collector reads)."""
    if fmt == "openmetrics":
        return openmetrics_exposition.generate_latest(registry(pid))
    return exposition.generate_latest(registry(pid))


def listen(pid: Callable[[], int], where: str) -> None:
    """Serve /metrics on HOST:PORT from this (the stats) process until it is stopped."""
    host, sep, port = where.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"pyvirtiofsd stats: --listen wants HOST:PORT, not {where!r}")
    server, _ = exposition.start_http_server(int(port), host.strip("[]") or "0.0.0.0",
                                             registry=registry(pid))
    bound_host, bound_port = server.server_address[:2]
    print(f"pyvirtiofsd stats: serving http://{bound_host}:{bound_port}/metrics", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
