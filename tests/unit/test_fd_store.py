"""daemon/host/fd_store.py against a real datagram socket in systemd's place: what the
manager receives (messages, names, the fds themselves) when the store is synced."""

from __future__ import annotations

import array
import os
import socket

from daemon.host import fd_store


def _manager() -> tuple[socket.socket, socket.socket]:
    manager, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.setblocking(False)
    return manager, daemon


def _received(manager: socket.socket) -> list[tuple[dict[str, str], list[int]]]:
    out = []
    while True:
        try:
            data, anc, _, _ = manager.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
        except BlockingIOError:
            return out
        fds = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % 4])
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        out.append((fields, list(fds)))


def test_sync_pushes_new_fds_once_and_replaces_changed_ones() -> None:
    manager, daemon = _manager()
    store = fd_store.FdStore(daemon)
    r, w = os.pipe()
    ev = os.eventfd(0)
    try:
        assert store.sync({fd_store.name_of(r): r, fd_store.name_of(ev): ev}) == 2
        got = _received(manager)
        assert [(f["FDSTORE"], f["FDPOLL"], f["FDNAME"]) for f, _ in got] == [
            ("1", "0", f"pyvfs-{r}"), ("1", "0", f"pyvfs-{ev}")]
        # the manager holds the same objects
        assert [os.fstat(fds[0]).st_ino for _, fds in got] == [
            os.fstat(r).st_ino, os.fstat(ev).st_ino]
        os.write(w, b"kept")
        assert os.read(got[0][1][0], 4) == b"kept"
        for _, fds in got:
            os.close(fds[0])
        # nothing changed: only the eventfd goes again (fstat cannot tell eventfds apart)
        assert store.sync({fd_store.name_of(r): r, fd_store.name_of(ev): ev}) == 1
        assert [f for f, _ in _received(manager)] == [
            {"FDSTOREREMOVE": "1", "FDNAME": f"pyvfs-{ev}"},
            {"FDSTORE": "1", "FDPOLL": "0", "FDNAME": f"pyvfs-{ev}"}]
        # a ring's eventfd replaced at the same number, the pipe gone
        new = os.eventfd(0)
        os.dup2(new, ev)
        os.close(new)
        assert store.sync({fd_store.name_of(ev): ev}) == 1
        got = _received(manager)
        assert [f for f, _ in got] == [
            {"FDSTOREREMOVE": "1", "FDNAME": f"pyvfs-{r}"},
            {"FDSTOREREMOVE": "1", "FDNAME": f"pyvfs-{ev}"},
            {"FDSTORE": "1", "FDPOLL": "0", "FDNAME": f"pyvfs-{ev}"}]
        assert os.fstat(got[2][1][0]).st_ino == os.fstat(ev).st_ino
        os.close(got[2][1][0])
    finally:
        for fd in (r, w, ev):
            os.close(fd)
        manager.close()
        daemon.close()


def test_wanted_and_passed_read_what_systemd_sets() -> None:
    assert fd_store.wanted({"FDSTORE": "64"})
    assert not fd_store.wanted({"FDSTORE": "0", fd_store.ENABLE_ENV: "1"})
    assert fd_store.wanted({fd_store.ENABLE_ENV: "1"})
    assert not fd_store.wanted({})
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "3",
           "LISTEN_FDNAMES": "vhost-user:pyvfs-7:pyvfs-12"}
    assert fd_store.passed(env, 42) == {"pyvfs-7": 4, "pyvfs-12": 5}
    assert fd_store.passed(env, 43) == {}
