"""Starting pyvirtiofsd itself for the tests, as an operator would (the console script's
module, a fresh process per test)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support.reference import stop_daemon, wait_for_socket

REPO = Path(__file__).resolve().parents[2]


def start_pyvirtiofsd(
    shared_dir: str | Path, socket_path: str | Path, *extra: str, wrapper: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """Start the daemon with ``--sandbox none`` (unless ``extra`` says otherwise) and wait
    for its socket; ``wrapper`` is a command it runs under. Its log goes to
    ``<socket>.log`` (``proc.log_path``)."""
    socket_path = Path(socket_path)
    socket_path.unlink(missing_ok=True)
    log_path = Path(f"{socket_path}.log")
    cmd = [
        *wrapper, sys.executable, "-m", "supervisor", "--shared-dir", str(shared_dir),
        "--socket-path", str(socket_path), "--sandbox", "none", *extra,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    proc.log_path = log_path  # type: ignore[attr-defined]
    wait_for_socket(proc, socket_path, timeout=20.0)
    return proc


def daemon_processes(proc: subprocess.Popen[bytes], count: int, timeout: float = 10
                     ) -> list[int]:
    """The daemon's pid and its children's, once there are ``count`` in all (workers
    start as their rings are set up)."""
    deadline = time.monotonic() + timeout
    pids: list[int] = []
    while time.monotonic() < deadline and len(pids) < count:
        pids = [proc.pid] + [int(p) for p in Path(
            f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        time.sleep(0.05)
    assert len(pids) == count, f"{len(pids)} daemon processes, expected {count}"
    return pids


def daemon_log(proc: subprocess.Popen[bytes]) -> str:
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


@contextlib.contextmanager
def pyvirtiofsd(
    shared_dir: str | Path, socket_path: str | Path, *extra: str, wrapper: Sequence[str] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon for the duration of a ``with`` block; always stopped afterwards, and
    its log is printed on failure so pytest shows it."""
    proc = start_pyvirtiofsd(shared_dir, socket_path, *extra, wrapper=wrapper)
    try:
        yield proc
    except BaseException:
        print(daemon_log(proc), file=sys.stderr)
        raise
    finally:
        stop_daemon(proc)
