"""systemd's fd store: the fds a restarted service needs, kept by the service manager.

When the service's main process dies (``kill -9``, the watchdog) or ``systemctl restart``
runs, systemd stops the whole cgroup, and every fd the daemon held closes with it: the
vhost-user connection first, which QEMU does not reconnect. systemd keeps fds for a
service that sends them with ``FDSTORE=1`` (and ``FDNAME=``, SCM_RIGHTS) on its
notification socket, up to the unit's ``FileDescriptorStoreMax=``, and passes them back
to the next start in ``LISTEN_FDS`` with their names in ``LISTEN_FDNAMES``. The store
outlives a restart caused by ``Restart=`` or ``systemctl restart``; systemd 252 (Debian
12) drops it on ``systemctl stop``, later ones as ``FileDescriptorStorePreserve=`` says.

``FdStore.sync`` keeps the store equal to a ``{name: fd}`` map: it pushes the fds that
are new or whose object changed (a ring's eventfd replaced at the same number), and
``FDSTOREREMOVE=1`` for the names that are gone (eventfds, which fstat cannot tell
apart, are pushed again at each sync: a few per vhost-user message). ``FDPOLL=0``:
systemd would otherwise drop an fd on POLLHUP/POLLERR, and the state journal names every
fd it holds. ``passed`` reads the names back at the next start.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import stat
from collections.abc import Mapping

log = logging.getLogger("pyvirtiofsd")

LISTEN_FDS_START = 3  # sd_listen_fds(3): the first passed fd
ENABLE_ENV = "PYVIRTIOFSD_FDSTORE"  # the unit's opt-in where systemd < 254 sets no $FDSTORE
PREFIX = "pyvfs-"  # our names in the store (a socket unit's names are others)


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the unit keeps fds for us: systemd >= 254 says how many in ``$FDSTORE``
    (0: none); an older one says nothing, and the unit opts in with
    ``PYVIRTIOFSD_FDSTORE=1`` beside its ``FileDescriptorStoreMax=`` (pushing to a store
    of size 0 only fills the journal with warnings)."""
    limit = environ.get("FDSTORE", "")
    if limit.isdigit():
        return int(limit) > 0
    return environ.get(ENABLE_ENV, "") not in ("", "0")


class FdStore:
    """The fds this service has in systemd's store, by name; pushes through the
    connected notification socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stored: dict[str, tuple[int, int]] = {}  # name: (st_dev, st_ino) pushed
        self._failed = False

    def sync(self, fds: Mapping[str, int]) -> int:
        """Make the store hold exactly ``fds`` (our names); returns how many fds were
        pushed. A push that fails is logged once and tried again at the next sync."""
        pushed = 0
        for name in [n for n in self.stored if n not in fds]:
            if self._send(f"FDSTOREREMOVE=1\nFDNAME={name}\n", []):
                del self.stored[name]
        for name, fd in fds.items():
            try:
                st = os.fstat(fd)
            except OSError:
                continue  # closed meanwhile: the next sync sees the map without it
            identity = (st.st_dev, st.st_ino)
            old = self.stored.get(name)
            # an anonymous inode (eventfd) has no type and every eventfd the same
            # number: one at the same number may be another, so it goes again
            if old == identity and stat.S_IFMT(st.st_mode):
                continue
            if old is not None:
                self._send(f"FDSTOREREMOVE=1\nFDNAME={name}\n", [])
                del self.stored[name]
            if self._send(f"FDSTORE=1\nFDPOLL=0\nFDNAME={name}\n", [fd]):
                self.stored[name] = identity
                pushed += 1
        return pushed

    def _send(self, text: str, fds: list[int]) -> bool:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg([text.encode()], anc)
        except OSError as e:
            if not self._failed:
                log.warning("fd store: cannot send to systemd: %s", e.strerror or e)
                self._failed = True
            return False
        return True


def name_of(fd: int) -> str:
    """The store's name for the fd at this number in the daemon (the state journal names
    fds by number; a restart puts each back at its number)."""
    return f"{PREFIX}{fd}"


def passed(environ: Mapping[str, str], pid: int) -> dict[str, int]:
    """The fds systemd passed to this process with our names (``LISTEN_FDS`` from 3 on,
    ``LISTEN_FDNAMES`` colon-separated, for ``LISTEN_PID``); others (a socket unit's
    listener) are left where they are."""
    if environ.get("LISTEN_PID", "") != str(pid):
        return {}
    count = environ.get("LISTEN_FDS", "")
    if not count.isdigit():
        return {}
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    out = {}
    for i in range(int(count)):
        name = names[i] if i < len(names) else ""
        if name.startswith(PREFIX):
            out[name] = LISTEN_FDS_START + i
    return out
