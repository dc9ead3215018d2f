"""Live upgrade, the supervisor's side: on SIGHUP (``systemctl reload``, ``pyvirtiofsd
upgrade``) stop every worker between two requests, write what lives only in Python
objects to a memfd, keep every fd a guest depends on open across exec, and hand over to
the installed code (daemon/host/handover.py says who executes it in each sandbox mode).
The new program reads the state back (``Supervisor(resumed=...)``), takes the same
connection, and starts a worker per running ring that re-serves what its ring's in-flight
record holds (workers/inflight.py) before it pops anything new.

A mixin of ``supervisor.Supervisor``: the vhost-user connection never closes, and no
message from the front-end is lost (the ones read before the handover are answered
first; the rest wait in the socket).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from daemon.fs.passthrough import PassthroughFs
from daemon.host import fd_store, handover, sandbox
from daemon.host.sd_notify import Notifier
from daemon.protocol.vhost_user import Message
from workers import control
from workers.handover import warm
from workers.handover.device_state import DeviceState
from workers.inflight import InflightRecords
from workers.pool import WorkerPool

log = logging.getLogger("pyvirtiofsd")

SUCCESSOR_WAIT = 30.0  # for the new program outside to start (sandboxed server)
STOP_WAIT = 5.0  # a worker that has not exited by then (asleep in the kernel) cancels it
# what the program that starts serving after a handover is given: the state memfd and
# every fd to keep; it never returns (exec, or the sandboxed server's exit)
HandOver = Callable[[int, list[int]], None]
# objects of this program only
NOT_CARRIED = {"fd_store", "info", "journal", "session_page", "warm", "warm_holder",
               "outside_execs_first"}
UPGRADE = Message(-1, 0, b"", [])  # queued by SIGHUP: hand over before the next message


class LiveUpgrade:
    state: DeviceState
    pool: WorkerPool
    fs: PassthroughFs
    inflight: InflightRecords
    notifier: Notifier
    front_end: Any  # supervisor.FrontEnd
    listener_fd: int
    handing_over: bool
    hand_over_to: HandOver | None
    carried: dict[str, Any]  # what start-up wants back (tables, pid file, upgrades)

    def request_upgrade(self) -> None:
        """SIGHUP: hand over to the installed code between two vhost-user messages."""
        log.info("live upgrade requested")
        if self.front_end is not None:
            self.front_end.messages.put_nowait(UPGRADE)
        elif getattr(self, "upgrade_requested", None) is not None:
            self.upgrade_requested.set()

    async def upgrade_between_messages(self, front_end: Any) -> bool | None:
        """Stop reading the connection, answer what was read already, hand over (no
        return on success); None if the front-end went away meanwhile."""
        front_end.pause()
        while not front_end.messages.empty():
            msg = front_end.messages.get_nowait()
            if msg is None:
                return None
            if msg is not UPGRADE:
                await self.dispatch(msg)  # type: ignore[attr-defined]
        await self.hand_over()
        front_end.resume()  # still here: the old code goes on
        return True

    def serving(self) -> None:
        """Say which code serves (the log, and the info segment the stats and upgrade
        commands read)."""
        info = self.carried.get("info")
        upgrades = self.carried.get("upgrades", 0)
        restarts = self.carried.get("supervisor_restarts", 0)
        log.info("serving with code %s (%d live upgrades, %d supervisor restarts)",
                 handover.build_id(), upgrades, restarts)
        if info is not None:
            info.write({"build": handover.build_id(), "upgrades": upgrades,
                        "supervisor_restarts": restarts, "since": time.time(),
                        "serving": True})

    async def hand_over(self) -> None:
        """Stop the workers and hand everything to the installed code; returns only when
        that could not be done (the old code then goes on serving)."""
        if self.hand_over_to is None:
            log.error("live upgrade: not possible in this mode; SIGHUP ignored")
            return
        started = time.monotonic()
        self.notifier.status("live upgrade: handing over")
        self.handing_over = True
        try:
            if self.carried.get("warm"):
                state_fd, fds = self._warm_state(started)
            else:
                if self.carried.get("outside_execs_first"):
                    log.info("live upgrade: serving while the process outside executes "
                             "the installed code")
                    if not sandbox.wait_for_successor(SUCCESSOR_WAIT):
                        log.error("live upgrade: the new program outside did not ask for "
                                  "the fds within %.0f s; going on", SUCCESSOR_WAIT)
                        return
                log.info("live upgrade: stopping workers (code %s)", handover.build_id())
                if not await self._stop_workers():
                    return
                state_fd = handover.write_state(self._wire_state())
                fds = handover.keep_open([state_fd, *self._fds_to_keep()])
            log.info("live upgrade: %d fds and the device state handed over after %.1f ms",
                     len(fds), 1000 * (time.monotonic() - started))
            info = self.carried.get("info")
            if info is not None:
                info.write({**info.read(), "serving": False})
            self.hand_over_to(state_fd, fds)
        except Exception:  # noqa: BLE001 - the old code must go on serving
            log.exception("live upgrade failed; the running code goes on serving")
            warm.stop_holder(self.carried.pop("warm_holder", -1))
        finally:
            self.handing_over = False
        for index in list(self.state.vrings):
            self._start_logged(index)  # type: ignore[attr-defined]

    def _warm_state(self, started: float) -> tuple[int, list[int]]:
        """--sandbox none: the workers go on serving while the new code starts; it stops
        them and takes the fd table's final contents from a holder (workers/handover/warm.py)."""
        log.info("live upgrade: executing the installed code while the workers serve "
                 "(code %s)", handover.build_id())
        self.pool.close_template(keep_workers=True)  # it would clone old code's workers
        workers = [v.worker for v in self.state.vrings.values() if v.worker is not None]
        holder_pid, holder = warm.start_holder(self._fds_to_keep)
        self.carried["warm_holder"] = holder_pid  # (killed if the exec fails)
        warm.reopen_through(holder_pid)
        fds = self._fds_to_keep()
        controls = []
        for worker in workers:
            worker.control.set_inheritable(True)
            controls.append(worker.control.fileno())
        state = {**self._wire_state(), "old_workers": warm.encode_workers(workers),
                 "fd_holder": [holder_pid, holder], "kept": fds,
                 "requested_at": started}
        state_fd = handover.write_state(state)
        return state_fd, handover.keep_open([state_fd, *fds, *controls, holder])

    async def _stop_workers(self) -> bool:
        """Every worker stopped between two requests (parked SETLKWs stay in the ring's
        in-flight record) and reaped: a worker left would share no fd table with the new
        program and keep serving its ring."""
        workers = []
        for vring in self.state.vrings.values():
            if vring.worker is not None:
                workers.append(vring.worker)
                vring.worker = None
                vring.resume = True  # the next worker starts from the in-flight record
        await asyncio.gather(*(self.pool.ask(w, {"op": control.OP_STOP}) for w in workers))
        pending = [w.exited for w in self.pool.workers if w.exited is not None]
        if pending:
            await asyncio.wait(pending, timeout=STOP_WAIT)
        if self.pool.workers:
            log.error("live upgrade: workers %s did not exit within %.0f s; not upgrading",
                      sorted(w.pid for w in self.pool.workers), STOP_WAIT)
            return False
        self.pool.close_template()
        return True

    def _wire_state(self) -> dict[str, Any]:
        fs = self.fs
        conn = self.front_end.conn.fileno() if self.front_end is not None else -1
        return {
            **{k: v for k, v in self.carried.items() if k not in NOT_CARRIED},
            "device": self.state.to_wire(),
            "conn": conn,
            "listener": self.listener_fd,
            "inflight": self.inflight.fd,
            "session": bytes(fs.session[:8]),
            "lock_owners": fs.lock_owners.memfd if fs.lock_owners is not None else -1,
            "mount_fd": fs.mount_fd,
            "root_mnt_id": fs.root_mnt_id,
            "use_handles": fs.use_handles,
            "notify": [self.notifier.sock.fileno() if self.notifier.sock else -1,
                       self.notifier.watchdog],
            "build": handover.build_id(),
        }

    def journal(self) -> None:
        """Keep the device state where the keeper finds it if this process is killed
        (workers/handover/keeper.py); after every vhost-user message."""
        journal = self.carried.get("journal")
        if journal is not None and self.front_end is not None:
            journal.write(self._wire_state())
            store = self.carried.get("fd_store")
            if store is not None:  # and in systemd's, for a restart of the service
                store.sync({fd_store.name_of(fd): fd for fd in self._fds_to_store(journal)})

    def front_end_gone(self) -> None:
        """Nothing to resume any more: the journal says so (the process outside then
        removes the tables) and systemd's store is emptied."""
        journal = self.carried.get("journal")
        if journal is not None:
            journal.write({"conn": -1})
        store = self.carried.get("fd_store")
        if store is not None:
            store.sync({})

    def _fds_to_store(self, journal: Any) -> list[int]:
        """What a restarted service resumes from (daemon/host/fd_store.py): the journal
        and every fd it names but the inodes' and open files' (re-found by handle)."""
        fs = self.fs
        fds = [journal.fd, *self.state.fds(), self.listener_fd, self.inflight.fd,
               fs.mount_fd, self.carried.get("session_fd", -1)]
        if self.front_end is not None:
            fds.append(self.front_end.conn.fileno())
        if fs.lock_owners is not None:
            fds.append(fs.lock_owners.memfd)
        return sorted({fd for fd in fds if fd >= 0})

    def _fds_to_keep(self) -> list[int]:
        """Every fd a guest depends on: the connection and device state, the tables' fds
        (inodes, open files, lock owners' descriptions) and the daemon's own."""
        fs = self.fs
        fds = [*self.state.fds(), self.listener_fd, self.inflight.fd, fs.mount_fd,
               self.carried.get("pid_fd", -1)]
        if self.front_end is not None:
            fds.append(self.front_end.conn.fileno())
        if self.notifier.sock is not None:
            fds.append(self.notifier.sock.fileno())
        if fs.lock_owners is not None:
            fds += [fs.lock_owners.memfd, *fs.lock_owners.fds()]
        fds += [e.fd for e in fs.inodes.iter_entries(dying=True)]
        fds += [h.fd for h in fs.handles.iter_handles(released=True)]
        for table in (fs.inodes, fs.handles):
            for fd in table.take_orphaned_fds():
                os.close(fd)
        return sorted({fd for fd in fds if fd >= 0})
