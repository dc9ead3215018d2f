"""``pyvirtiofsd stats`` as metrics (daemon/stats/openmetrics.py, watch.py; the counters of
daemon/native/stats.c): after known requests from the test front-end, the OpenMetrics
exposition, the Prometheus text file and the HTTP listener say exactly what happened,
whether C or Python answered; --watch draws frames; the daemon never loads
prometheus_client."""

from __future__ import annotations

import mmap
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import posix_ipc
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from daemon.protocol import fuse
from daemon.stats import queue_stats, watch
from tests.support.daemon import REPO, pyvirtiofsd
from tests.support.frontend import Frontend

DATA = bytes(range(256)) * 32  # 8 KiB


def stats(sock: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "supervisor", "stats", "--socket-path",
                          str(sock), *args], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out


def samples(families: object) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, of every sample of every family."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in families for s in family.samples}  # type: ignore[attr-defined]


def known_requests(front: Frontend) -> None:
    """INIT, 10 GETATTR, 3 LOOKUPs of a missing name (ENOENT: --cache never), a LOOKUP,
    an OPEN and a READ of 4096 bytes, all on queue 1."""
    front.init()
    for _ in range(10):
        error, _ = front.fuse(fuse.Opcode.GETATTR, fuse.ROOT_ID, fuse.GETATTR_IN.pack(0, 0, 0))
        assert error == 0
    for _ in range(3):
        error, _ = front.lookup(fuse.ROOT_ID, b"missing")
        assert error == -2
    error, entry = front.lookup(fuse.ROOT_ID, b"data")
    assert error == 0
    nodeid = struct.unpack_from("<Q", entry)[0]
    error, opened = front.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(0, 0))
    assert error == 0
    fh = struct.unpack_from("<Q", opened)[0]
    error, data = front.fuse(fuse.Opcode.READ, nodeid, fuse.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0),
                             out_size=fuse.OUT_HEADER_SIZE + 4096)
    assert error == 0 and data == DATA[:4096]


EXPECTED = {"INIT": 1, "GETATTR": 10, "LOOKUP": 4, "OPEN": 1, "READ": 1}


def check(got: dict[tuple, float], c_path: bool) -> None:
    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    q = {"queue": "1"}
    assert value("pyvirtiofsd_up") == 1
    opcodes = {dict(labels)["opcode"]: v for (name, labels), v in got.items()
               if name == "pyvirtiofsd_requests_total"}
    assert opcodes == EXPECTED
    for opcode, n in EXPECTED.items():
        labels = {**q, "opcode": opcode}
        assert value("pyvirtiofsd_request_duration_seconds_count", **labels) == n
        assert value("pyvirtiofsd_request_duration_seconds_bucket", **labels, le="+Inf") == n
        assert value("pyvirtiofsd_request_duration_seconds_sum", **labels) > 0
        assert value("pyvirtiofsd_request_errors_total", **labels) == (3 if opcode ==
                                                                       "LOOKUP" else 0)
    assert value("pyvirtiofsd_reply_bytes_total", **q, opcode="READ") == 16 + 4096
    assert value("pyvirtiofsd_read_bytes_total", **q) == 4096
    assert value("pyvirtiofsd_write_bytes_total", **q) == 0
    assert value("pyvirtiofsd_worker_restarts_total", **q) == 0
    in_c = value("pyvirtiofsd_requests_in_c_total", **q)
    assert in_c >= 10 + 4 + 1 if c_path else in_c == 0  # GETATTR, LOOKUP, READ
    assert value("pyvirtiofsd_inodes") == 2 and value("pyvirtiofsd_open_files") == 1
    assert value("pyvirtiofsd_workers") == 2


@pytest.mark.parametrize("c_path", ["on", "off"])
def test_openmetrics_file_listener_and_watch(tmp_path: Path, c_path: str) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "data").write_bytes(DATA)
    sock = tmp_path / "vfs.sock"
    with pyvirtiofsd(share, sock, "--cache", "never", "--c-fast-path", c_path):
        front = Frontend(str(sock))
        front.setup(2)
        known_requests(front)

        text = stats(sock, "--format", "openmetrics").stdout
        assert text.endswith("# EOF\n")
        check(samples(text_string_to_metric_families(text)), c_path == "on")

        out = tmp_path / "textfile" / "pyvirtiofsd.prom"
        out.parent.mkdir()
        stats(sock, "--format", "prometheus", "--output", str(out))
        assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left
        check(samples(parse_prometheus(out.read_text())), c_path == "on")

        listener = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "stats", "--socket-path", str(sock),
             "--listen", "127.0.0.1:0"], cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            line = listener.stdout.readline()  # type: ignore[union-attr]
            assert "serving http://127.0.0.1:" in line, line
            url = line.split()[-1]
            with urllib.request.urlopen(url, timeout=10) as r:
                check(samples(parse_prometheus(r.read().decode())), c_path == "on")
            ask = urllib.request.Request(
                url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
            with urllib.request.urlopen(ask, timeout=10) as r:
                scraped = r.read().decode()
            assert scraped.endswith("# EOF\n")
            check(samples(text_string_to_metric_families(scraped)), c_path == "on")
        finally:
            listener.terminate()
            assert listener.wait(10) == 0

        shown = stats(sock, "--watch", "--interval", "0.2", "--count", "2").stdout
        assert shown.count("pyvirtiofsd pid ") == 2 and "req/s" in shown and "p99" in shown

        front.close()


def test_the_daemon_never_imports_prometheus_client() -> None:
    """Only the stats command's --format openmetrics/prometheus and --listen load it."""
    probe = ("import sys, supervisor, workers.queue_worker, workers.pool, daemon.stats.report,"
             " daemon.stats.watch; print(sorted(m for m in sys.modules "
             "if m.startswith('prometheus_client')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_percentiles_from_the_log2_histogram() -> None:
    buckets = [0] * queue_stats.BUCKETS
    buckets[2] = 50  # (2 us, 4 us]
    buckets[4] = 50  # (8 us, 16 us]
    assert watch.percentile(buckets, 0.5) == pytest.approx(4e-6)
    assert watch.percentile(buckets, 0.99) == pytest.approx(8e-6 + 8e-6 * 49 / 50)
    buckets[-1] = 1000  # past the last bound: that bound
    assert watch.percentile(buckets, 0.99) == pytest.approx(65.536e-3)
    assert watch.percentile([0] * queue_stats.BUCKETS, 0.5) is None


def test_a_segment_of_another_version_is_refused_by_name() -> None:
    name = f"/pyvirtiofsd-test-{id(object())}-stats"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096)
    try:
        with mmap.mmap(shm.fd, 4096) as mm:
            queue_stats.HEADER.pack_into(mm, 0, b"PYVFSQS1", 1, 2, 576, 1)
        with pytest.raises(ValueError, match="version 1; this pyvirtiofsd reads version 2"):
            queue_stats.QueueStats.attach(name)
    finally:
        shm.close_fd()
        shm.unlink()
