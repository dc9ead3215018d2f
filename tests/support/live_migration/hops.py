"""One guest moved hop by hop between fresh virtio-fs daemons on one share: each hop starts
a destination daemon and QEMU (``-incoming``), migrates with the return path on, and stops
what the guest left (the source QEMU quits; its daemon is stopped). Used by the multi-hop
end-to-end test and the pause benchmark; the daemon is pyvirtiofsd or Rust virtiofsd."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.support.daemon import daemon_log
from tests.support.migrate import MigrationPair, Side, wait_for
from tests.support.reference import stop_daemon

#: starts a daemon on (share, socket, on_error) and returns once its socket listens
DaemonStarter = Callable[[Path, Path, str], subprocess.Popen[bytes]]


class Hops:
    """The guest's current QEMU and daemon, and every one started so far (for messages)."""

    def __init__(self, pair: MigrationPair, share: Path, work: Path,
                 start_daemon: DaemonStarter) -> None:
        self.pair = pair
        self.share = share
        self.work = work
        self.start_daemon = start_daemon
        self.count = 0
        self.daemons: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.side: Side | None = None
        self.daemon: subprocess.Popen[bytes] | None = None

    def _daemon(self, name: str, on_error: str) -> subprocess.Popen[bytes]:
        proc = self.start_daemon(self.share, self.work / f"{name}.sock", on_error)
        self.daemons.append((name, proc))
        return proc

    def boot(self, on_error: str = "abort") -> Side:
        """Start the guest on its first daemon."""
        self.daemon = self._daemon("d0", on_error)
        self.side = self.pair.start("q0", self.work / "d0.sock")
        return self.side

    def hop(self, on_error: str = "abort") -> dict:
        """Migrate to a fresh daemon and QEMU; returns query-migrate's last answer (with
        ``guest_pause_ms`` when it completed). On failure the guest stays where it was."""
        assert self.side is not None and self.daemon is not None
        self.count += 1
        name = f"d{self.count}"
        daemon = self._daemon(name, on_error)
        incoming = self.work / f"m{self.count}.sock"
        side = self.pair.start(f"q{self.count}", self.work / f"{name}.sock",
                               incoming=f"unix:{incoming}")
        wait_for(incoming.exists, 60, "incoming migration socket", self.describe)
        info = self.pair.migrate(self.side, f"unix:{incoming}", destination=side)
        if info.get("status") == "completed":
            wait_for(lambda: self.side.proc.poll() is not None, 30, "source QEMU exit")
            stop_daemon(self.daemon)
            self.side, self.daemon = side, daemon
        else:
            if side.proc.poll() is None:
                side.proc.kill()
            side.proc.wait()
            stop_daemon(daemon)
        return info

    def describe(self) -> str:
        """QEMU output and every daemon's log, for assertion messages."""
        parts = [self.side.describe() if self.side else ""]
        for name, proc in self.daemons:
            parts.append(f"--- daemon {name} (rc {proc.poll()}) ---\n{daemon_log(proc)}")
        return "\n".join(parts)[-20000:]

    def close(self) -> None:
        for _, proc in self.daemons:
            stop_daemon(proc)
