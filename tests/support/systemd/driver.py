"""What the test front-end does inside the systemd test VM (imported there by the agent).

The tests in tests/e2e/test_systemd.py send short Python snippets to the VM's agent; the
FUSE conversations they need are here, so each snippet is one call: connect and
negotiate, read a file through LOOKUP/OPEN/READ/RELEASE, and a background loop that keeps
requests flowing (and checks each answer) while systemd restarts or reloads the daemon.
"""

from __future__ import annotations

import os
import threading
import time

from daemon.protocol import fuse
from daemon.protocol.fuse import Opcode
from tests.support.frontend import Frontend


def connect(path: str, queues: int = 2, connect_timeout: float = 10) -> Frontend:
    """A front-end on ``path`` with the hiprio queue and one request queue, after INIT;
    ``connect_timeout=0``: the socket must accept at the first try."""
    fe = Frontend(path, connect_timeout=connect_timeout)
    # behind the socket unit the first reply waits for the daemon's start: about 7 s under
    # TCG on an idle machine, several times that on a busy one
    fe.reply_timeout = 90
    fe.setup(queues)
    arg = fuse.INIT_IN.pack(7, 38, 131072, 0xFFFFFFFF & ~fuse.INIT_EXT, 0) + bytes(44)
    error, _ = fe.finish(fe.start(Opcode.INIT, 0, arg), 90)  # the worker may still start
    if error:
        raise OSError(-error, "INIT")
    return fe


def read_file(fe: Frontend, name: bytes, timeout: float = 10) -> bytes:
    """The contents of ``name`` in the shared directory's root, as the guest reads it."""
    error, entry = fe.fuse(Opcode.LOOKUP, 1, name + b"\0")
    if error:
        raise OSError(-error, f"LOOKUP {name!r}")
    nodeid = fuse.ENTRY_HEAD.unpack_from(entry)[0]
    error, opened = fe.fuse(Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDONLY, 0))
    if error:
        raise OSError(-error, f"OPEN {name!r}")
    fh = fuse.OPEN_OUT.unpack_from(opened)[0]
    sent = fe.start(Opcode.READ, nodeid, fuse.READ_IN.pack(fh, 0, 65536, 0, 0, 0, 0),
                    out_size=fuse.OUT_HEADER_SIZE + 65536)
    error, data = fe.finish(sent, timeout)
    fe.fuse(Opcode.RELEASE, nodeid, fuse.RELEASE_IN.pack(fh, 0, 0, 0))
    fe.fuse(Opcode.FORGET, nodeid, fuse.FORGET_IN.pack(1), q=0, out_size=0)
    if error:
        raise OSError(-error, f"READ {name!r}")
    return data


def connection_closed(fe: Frontend, timeout: float) -> float | None:
    """Seconds until the daemon closed the vhost-user connection, or None if it stayed
    open for ``timeout`` seconds."""
    start = time.monotonic()
    fe.sock.settimeout(timeout)
    try:
        data = fe.sock.recv(1)
    except TimeoutError:
        return None
    except ConnectionError:
        return time.monotonic() - start
    return time.monotonic() - start if not data else None


class RequestLoop:
    """GETATTRs of the root in a thread, ``depth`` in flight at a time: every answer is
    checked (error 0, the root's attributes, its own unique, exactly one answer a request),
    so a request lost or answered twice stops the loop with the reason; ``answered``
    counts, ``longest`` is the longest wait for a batch's answers."""

    def __init__(self, fe: Frontend, depth: int = 4, answer_timeout: float = 30) -> None:
        self.fe = fe
        self.depth = depth
        self.answer_timeout = answer_timeout
        self.answered = 0
        self.longest = 0.0
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        arg = fuse.GETATTR_IN.pack(0, 0, 0)
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                # indirect: one ring descriptor a request, which wait_used frees again
                sents = [self.fe.start(Opcode.GETATTR, 1, arg, indirect=True,
                                       out_size=fuse.OUT_HEADER_SIZE + 256)
                         for _ in range(self.depth)]
                answers = self.fe.finish_all(sents, self.answer_timeout)
                self.longest = max(self.longest, time.monotonic() - start)
                for error, payload in answers:
                    if error or len(payload) < fuse.ATTR_OUT_HEAD.size:
                        self.failure = f"GETATTR answered error {error}, {len(payload)} bytes"
                        return
                    self.answered += 1
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.failure = f"{type(e).__name__}: {e}"

    def stop(self) -> dict[str, object]:
        """Stop after the request in flight; what the loop saw."""
        self._stop.set()
        self._thread.join(self.answer_timeout + 5)
        time.sleep(0.5)  # an answer given twice would land in the used ring by now
        ring = self.fe.rings[1]
        used_idx = int.from_bytes(self.fe.read_gpa(ring.used + 2, 2), "little")
        return {"answered": self.answered, "longest_s": round(self.longest, 3),
                "failure": self.failure, "alive": self._thread.is_alive(),
                "unexpected_answers": (used_idx - ring.last_used) & 0xFFFF}
