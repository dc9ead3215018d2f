"""Reference virtio-fs daemons, to prove the harness and for differential tests.

Only QEMU 7.2's C virtiofsd for now (Debian package ``qemu-system-common``, pulled in by
``qemu-system-x86``).  It serves exactly one request queue and exits when QEMU disconnects,
so start a fresh one per guest run.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

C_VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """Terminate a daemon (SIGTERM, then SIGKILL) and return its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def wait_for_socket(proc: subprocess.Popen[bytes], socket_path: Path, timeout: float) -> None:
    """Wait until ``socket_path`` exists; raise (with the daemon's log) if it dies or is slow."""
    deadline = time.monotonic() + timeout
    while not socket_path.is_socket():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_daemon(proc)
            log = getattr(proc, "log_path", None)
            text = Path(log).read_text(errors="replace") if log else ""
            raise RuntimeError(
                f"daemon {proc.args!r} did not create {socket_path} "
                f"(exit code {proc.returncode}):\n{text}"
            )
        time.sleep(0.02)


def start_c_virtiofsd(
    shared_dir: str | Path, socket_path: str | Path, cache: str = "auto"
) -> subprocess.Popen[bytes]:
    """Start QEMU 7.2's C virtiofsd and return once its socket is listening.

    Its stderr goes to ``<socket_path>.log`` (also stored as ``proc.log_path``).
    """
    if not C_VIRTIOFSD.exists():
        raise RuntimeError(
            f"{C_VIRTIOFSD} not found: apt-get install -y qemu-system-x86 (qemu-system-common)"
        )
    socket_path = Path(socket_path)
    socket_path.unlink(missing_ok=True)
    log_path = Path(f"{socket_path}.log")
    cmd = [
        str(C_VIRTIOFSD), f"--socket-path={socket_path}",
        "-o", f"source={shared_dir}", "-o", f"cache={cache}",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    proc.log_path = log_path  # type: ignore[attr-defined]
    wait_for_socket(proc, socket_path, timeout=10.0)
    return proc


@contextlib.contextmanager
def c_virtiofsd(
    shared_dir: str | Path, socket_path: str | Path, cache: str = "auto"
) -> Iterator[subprocess.Popen[bytes]]:
    """C virtiofsd for the duration of a ``with`` block; always stopped afterwards."""
    proc = start_c_virtiofsd(shared_dir, socket_path, cache)
    try:
        yield proc
    finally:
        stop_daemon(proc)
