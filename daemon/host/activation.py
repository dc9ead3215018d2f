"""systemd socket activation: the listening socket a ``.socket`` unit passes.

systemd hands sockets over as fds 3, 4, ... with ``LISTEN_FDS`` (how many),
``LISTEN_PID`` (the process they are for) and ``LISTEN_FDNAMES`` (``FileDescriptorName=``
of the socket unit, colon-separated). Two ways to use them:

- no ``--socket-path`` and no ``--fd``: exactly one socket must have been passed, and it is
  the vhost-user listener (what virtiofsd does);
- ``--socket-path PATH`` (the shipped ``pyvirtiofsd@.service``): when one of the passed
  sockets is a listening UNIX stream socket bound to PATH, the daemon takes it instead of
  binding its own, and leaves the path to systemd (``RemoveOnStop=``) on the way out. So the
  one service file works alone and behind ``pyvirtiofsd@.socket``; without a matching
  socket the daemon binds PATH itself as before.
"""

from __future__ import annotations

import os
import socket
import stat

SD_LISTEN_FDS_START = 3


class ActivationError(ValueError):
    """What systemd passed cannot be used; the message says what to change."""


def _owner_ok(owner: str) -> bool:
    return not owner or owner == str(os.getpid())


def _is_unix_listener(fd: int) -> bool:
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(fileno=os.dup(fd))
    try:
        return (probe.family == socket.AF_UNIX and probe.type == socket.SOCK_STREAM
                and probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)
    finally:
        probe.close()


def listener_for_path(socket_path: str) -> socket.socket | None:
    """The passed listening socket bound to ``socket_path``, or None (nothing passed, or
    passed for another process, or no socket of that path among them). The variables stay
    in the environment for whoever reads the other fds (systemd's fd store)."""
    count = os.environ.get("LISTEN_FDS", "")
    if not count.isdigit() or not _owner_ok(os.environ.get("LISTEN_PID", "")):
        return None
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        if not _is_unix_listener(fd):
            continue
        sock = socket.socket(fileno=os.dup(fd))
        try:
            bound = sock.getsockname()
        except OSError:
            bound = ""
        if bound == socket_path:
            sock.close()
            os.set_inheritable(fd, False)
            return socket.socket(fileno=fd)
        sock.close()
    return None


def only_listener() -> socket.socket:
    """The one socket passed without ``--socket-path``; its variables are taken out of the
    environment, as sd_listen_fds() does."""
    count = os.environ.pop("LISTEN_FDS", "")
    owner = os.environ.pop("LISTEN_PID", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not _owner_ok(owner):
        raise ActivationError(f"socket activation: LISTEN_PID={owner} names another process "
                              f"(this is {os.getpid()}); give --socket-path or --fd")
    if count != "1":
        raise ActivationError(f"socket activation: LISTEN_FDS={count or '(unset)'}, expected "
                              "exactly one socket (one vhost-user socket per daemon); give "
                              "--socket-path or --fd")
    fd = SD_LISTEN_FDS_START
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise ActivationError(f"socket activation: fd {fd} is not open ({e.strerror})") from e
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"socket activation: fd {fd} is not a socket")
    listener = socket.socket(fileno=fd)
    if listener.type != socket.SOCK_STREAM or listener.family != socket.AF_UNIX:
        raise ActivationError("socket activation: fd 3 is not a UNIX stream socket "
                              "(ListenStream= with a path in the .socket unit)")
    return listener
