"""systemd's readiness and watchdog protocol (``Type=notify``, ``WatchdogSec=``).

systemd passes ``NOTIFY_SOCKET`` (a datagram socket path, or ``@name`` in the abstract
namespace) and, with a watchdog, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``. The daemon
sends ``READY=1`` once its vhost-user socket accepts connections, so a QEMU unit ordered
after it never finds the socket missing; ``STATUS=`` lines that ``systemctl status``
shows; ``WATCHDOG=1`` from the supervisor's event loop at half the interval, so a hung
loop gets the service restarted; and ``STOPPING=1`` on the way out.

The socket is connected when the daemon starts, before the sandbox: the server then
keeps reaching it from a mount namespace where the path does not exist and a network
namespace where the abstract name is not visible. Its variables are removed from the
environment, so nothing the daemon starts mistakes itself for the service. With the
namespace sandbox the messages come from the server, a child of the service's main
process: the unit needs ``NotifyAccess=all`` (``packaging/pyvirtiofsd@.service``).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("pyvirtiofsd")


def message(**fields: str | int) -> bytes:
    """``KEY=VALUE`` lines in the order given (keys are upper-cased)."""
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text:
            raise ValueError(f"{key}: a notification value is one line")
        lines.append(f"{key.upper()}={text}")
    return ("\n".join(lines) + "\n").encode()


def watchdog_interval(environ: dict[str, str] | os._Environ[str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when systemd
    asks for none, or asks another process (WATCHDOG_PID)."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 2e6


class Notifier:
    """The service manager's notification socket; every method is a no-op without one."""

    def __init__(self, sock: socket.socket | None = None,
                 watchdog: float | None = None) -> None:
        self.sock = sock
        self.watchdog = watchdog if sock is not None else None
        self._failed = False

    @classmethod
    def from_environment(cls) -> Notifier:
        """Connect to NOTIFY_SOCKET (if set) and take the variables out of the environment."""
        address = os.environ.pop("NOTIFY_SOCKET", "")
        watchdog = watchdog_interval(os.environ, os.getpid())
        for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)
        if not address:
            return cls()
        if address[0] not in "/@":
            log.warning("NOTIFY_SOCKET=%s: not a path or an abstract socket name; systemd "
                        "will not be told when the daemon is ready", address)
            return cls()
        target = "\0" + address[1:] if address[0] == "@" else address
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(target)
        except OSError as e:
            sock.close()
            log.warning("NOTIFY_SOCKET=%s: %s; systemd will not be told when the daemon is "
                        "ready", address, e.strerror or e)
            return cls()
        return cls(sock, watchdog)

    def notify(self, **fields: str | int) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send(message(**fields))
        except OSError as e:
            if not self._failed:  # once: a vanished manager must not flood the log
                log.warning("cannot notify systemd: %s", e.strerror or e)
                self._failed = True

    def ready(self, status: str) -> None:
        # no MAINPID: inside the namespace sandbox our pid is 1, and systemd knows its
        # main process anyway (the one it started)
        self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.notify(STATUS=status)

    def stopping(self, status: str) -> None:
        self.notify(STOPPING=1, STATUS=status)

    def ping(self) -> None:
        self.notify(WATCHDOG=1)
