"""The shipped units under a real systemd (PID 1 of a test VM, tests/support/systemd/vm.py).

The VM boots the host's systemd from the host's root and installs packaging/
pyvirtiofsd@.service and pyvirtiofsd@.socket as shipped, with /usr/local/bin/pyvirtiofsd
starting this tree. The project's test front-end (tests/support/frontend.py) runs inside
the VM, in the agent's Python, and talks vhost-user to the daemon systemd started; what it
reads is checked against the files the test put in /srv/virtiofs/<instance>.
The VM boots once for the module; each test uses its own unit instance.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.systemd.vm import SystemdVM

WATCHDOG_SEC = 4

#: Instance drop-ins, in place at boot (no daemon-reload needed).
DROP_INS = {
    # systemd's watchdog, short: a supervisor that stops pinging is killed after 4 s
    "pyvirtiofsd@wd.service.d/watchdog.conf": f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\n",
}


@pytest.fixture(scope="module")
def vm() -> Iterator[SystemdVM]:
    machine = SystemdVM(extra_units=DROP_INS).start()
    try:
        machine.py("from tests.support.systemd.driver import *")
        yield machine
    finally:
        machine.close()


def share(vm: SystemdVM, instance: str, text: str) -> None:
    """/srv/virtiofs/<instance> (the unit's --shared-dir) with one file, hello."""
    vm.sh(f"mkdir -p /srv/virtiofs/{instance} && printf %s '{text}' > "
          f"/srv/virtiofs/{instance}/hello")


def show(vm: SystemdVM, unit: str, *props: str) -> dict[str, str]:
    out = vm.sh(f"systemctl show {' '.join('-p ' + p for p in props)} {unit}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def supervisor_pid(vm: SystemdVM, main_pid: str) -> str:
    """The supervisor: the main process's child is the sandbox's keeper (pyvfs-keeper),
    whose one child is the supervisor (its workers are the supervisor's children)."""
    keeper = vm.sh(f"pgrep -P {main_pid}").split()
    assert len(keeper) == 1, keeper
    assert vm.sh(f"cat /proc/{keeper[0]}/comm").strip() == "pyvfs-keeper"
    supervisor = vm.sh(f"pgrep -P {keeper[0]}").split()
    assert len(supervisor) == 1, supervisor
    return supervisor[0]


def test_socket_activation_starts_the_service_on_connect(vm: SystemdVM) -> None:
    share(vm, "act", "activated\n")
    vm.sh("systemctl start pyvirtiofsd@act.socket")
    assert show(vm, "pyvirtiofsd@act.service", "ActiveState")["ActiveState"] == "inactive"
    sock = "/run/pyvirtiofsd/act.sock"
    for round_ in (1, 2):  # the daemon exits with its front-end; the next connect starts it again
        got = vm.py(f"fe = connect({sock!r}); read_file(fe, b'hello').decode()", timeout=150)
        assert got == "activated\n", f"round {round_}"
        state = show(vm, "pyvirtiofsd@act.service", "ActiveState", "TriggeredBy", "MainPID")
        assert state["ActiveState"] == "active", vm.journal("pyvirtiofsd@act.service")
        assert state["TriggeredBy"] == "pyvirtiofsd@act.socket"
        vm.py("fe.close()")
        deadline = time.monotonic() + 30
        while show(vm, "pyvirtiofsd@act.service", "ActiveState")["ActiveState"] != "inactive":
            assert time.monotonic() < deadline, vm.journal("pyvirtiofsd@act.service")
            time.sleep(0.5)
        result = show(vm, "pyvirtiofsd@act.service", "Result", "NRestarts")
        assert result == {"Result": "success", "NRestarts": "0"}
        # the path is systemd's: still there, still listening, for the next front-end
        assert vm.sh(f"test -S {sock} && systemctl is-active pyvirtiofsd@act.socket").strip() \
            == "active"
    vm.sh("systemctl stop pyvirtiofsd@act.socket")
    assert vm.run(f"test -e {sock}")[0] == 1, "RemoveOnStop= removes the socket"


def test_notify_ready_status_and_metrics(vm: SystemdVM) -> None:
    """Type=notify: the unit turns active with READY=1, which the daemon sends once its
    socket accepts (a QEMU unit ordered after it finds it listening), with a STATUS line
    that `systemctl status` shows. Then the metrics an operator scrapes from it."""
    share(vm, "ntf", "notified\n")
    sock = "/run/pyvirtiofsd/ntf.sock"
    # from inside the VM: the states seen while starting, and at the first "active" the
    # front-end connects at once, with no retry
    seen = vm.py(f"""
import subprocess, time
subprocess.run(["systemctl", "start", "--no-block", "pyvirtiofsd@ntf.service"], check=True)
states = []
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    shown = dict(line.split("=", 1) for line in subprocess.run(
        ["systemctl", "show", "-p", "ActiveState", "-p", "StatusText",
         "pyvirtiofsd@ntf.service"], capture_output=True, text=True).stdout.splitlines())
    state, status = shown["ActiveState"], shown["StatusText"]
    if not states or states[-1] != [state, status]:
        states.append([state, status])
    if state == "active":
        fe = connect({sock!r}, connect_timeout=0)
        break
    time.sleep(0.1)
states""", timeout=150)
    assert [state for state, _ in seen][-2:] == ["activating", "active"], seen
    assert seen[-1] == ["active", f"waiting for the front-end on {sock}"], seen
    assert vm.py("read_file(fe, b'hello').decode()") == "notified\n"
    out = vm.sh("systemctl status --no-pager pyvirtiofsd@ntf.service")
    assert 'Status: "front-end connected"' in out, out
    # the operator's metrics: the shipped node_exporter unit, and stats in OpenMetrics
    vm.sh("systemctl start pyvirtiofsd-metrics@ntf.service", timeout=150)
    prom = vm.sh("cat /var/lib/node_exporter/textfile_collector/pyvirtiofsd-ntf.prom")
    assert 'pyvirtiofsd_requests_total{opcode="READ",queue="1"} 1.0' in prom, prom
    assert "pyvirtiofsd_up 1.0" in prom, prom
    om = vm.sh(f"pyvirtiofsd stats --socket-path {sock} --format openmetrics", timeout=150)
    assert 'pyvirtiofsd_requests_total{opcode="LOOKUP",queue="1"} 1.0' in om, om
    assert om.rstrip().endswith("# EOF"), om[-200:]
    vm.py("fe.close()")
    vm.sh("systemctl stop pyvirtiofsd@ntf.service")


def test_watchdog_restarts_a_stopped_supervisor(vm: SystemdVM) -> None:
    """SIGSTOP the supervisor (the sandboxed server, the main process's child): its event
    loop stops pinging, systemd kills the service after WatchdogSec and starts it again
    (Restart=on-failure); the new daemon resumes the same front-end's connection from
    systemd's fd store (docs/operations.md) and serves it."""
    share(vm, "wd", "watched\n")
    sock = "/run/pyvirtiofsd/wd.sock"
    vm.sh("systemctl start pyvirtiofsd@wd.socket")
    assert vm.py(f"fe = connect({sock!r}); read_file(fe, b'hello').decode()",
                 timeout=150) == "watched\n"
    before = show(vm, "pyvirtiofsd@wd.service", "MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] == f"{WATCHDOG_SEC}s" and before["NRestarts"] == "0"
    vm.sh(f"kill -STOP {supervisor_pid(vm, before['MainPID'])}")
    stopped = time.monotonic()
    deadline = time.monotonic() + 60
    while True:
        after = show(vm, "pyvirtiofsd@wd.service", "MainPID", "NRestarts", "ActiveState")
        if after["NRestarts"] == "1" and after["ActiveState"] == "active":
            break
        assert time.monotonic() < deadline, vm.journal("pyvirtiofsd@wd.service")
        time.sleep(0.5)
    journal = vm.journal("pyvirtiofsd@wd.service", 200)
    assert "Watchdog timeout" in journal, journal
    assert after["MainPID"] != before["MainPID"]
    # the same connection: it never closed
    assert vm.py("read_file(fe, b'hello', 90).decode()", timeout=150) == "watched\n", \
        vm.journal("pyvirtiofsd@wd.service", 80)
    back = time.monotonic() - stopped
    print(f"watchdog: served again on the same connection {back:.1f} s after SIGSTOP "
          f"(WatchdogSec={WATCHDOG_SEC})")
    vm.py("fe.close()")
    vm.sh("systemctl stop pyvirtiofsd@wd.socket pyvirtiofsd@wd.service")


def test_reload_upgrades_under_a_served_front_end(vm: SystemdVM) -> None:
    """systemctl reload (ExecReload=pyvirtiofsd upgrade): the daemon executes the installed
    code again while the front-end keeps sending requests, 4 in flight; every one is
    answered once, none is lost, and the connection and the main process stay."""
    share(vm, "rl", "reloaded\n")
    sock = "/run/pyvirtiofsd/rl.sock"
    vm.sh("systemctl start pyvirtiofsd@rl.socket")
    assert vm.py(f"fe = connect({sock!r}); read_file(fe, b'hello').decode()",
                 timeout=150) == "reloaded\n"
    before = show(vm, "pyvirtiofsd@rl.service", "MainPID", "NRestarts")
    vm.py("loop = RequestLoop(fe)")
    time.sleep(1)
    answered = vm.py("loop.answered")
    assert answered > 0, vm.py("loop.stop()")
    start = time.monotonic()
    vm.sh("systemctl reload pyvirtiofsd@rl.service", timeout=120)
    reload_seconds = time.monotonic() - start
    at_reload = vm.py("loop.answered")
    deadline = time.monotonic() + 30
    while vm.py("loop.answered") < at_reload + 20:  # the new code answers too
        assert time.monotonic() < deadline, vm.py("loop.stop()")
        time.sleep(0.5)
    seen = vm.py("loop.stop()")
    assert seen["failure"] is None and not seen["alive"], seen
    assert seen["unexpected_answers"] == 0, seen
    assert vm.py("read_file(fe, b'hello').decode()") == "reloaded\n"
    after = show(vm, "pyvirtiofsd@rl.service", "MainPID", "NRestarts", "ActiveState")
    assert after == {**before, "ActiveState": "active"}, after
    journal = vm.journal("pyvirtiofsd@rl.service", 200)
    assert "live upgrade 1, serving" in journal, journal
    print(f"reload: systemctl reload took {reload_seconds:.1f} s; {seen['answered']} "
          f"GETATTRs answered (4 in flight), the longest wait {seen['longest_s']} s")
    vm.py("fe.close()")
    vm.sh("systemctl stop pyvirtiofsd@rl.socket pyvirtiofsd@rl.service")


def test_supervisor_kill_is_not_a_service_restart(vm: SystemdVM) -> None:
    """kill -9 of the supervisor under systemd: the sandbox's keeper starts a new one on
    the same fds; the front-end's requests (4 in flight) go on being answered, each once,
    and systemd sees no restart (same MainPID, NRestarts=0, still active)."""
    share(vm, "sk", "kept\n")
    sock = "/run/pyvirtiofsd/sk.sock"
    vm.sh("systemctl start pyvirtiofsd@sk.socket")
    assert vm.py(f"fe = connect({sock!r}); read_file(fe, b'hello').decode()",
                 timeout=150) == "kept\n"
    before = show(vm, "pyvirtiofsd@sk.service", "MainPID", "NRestarts")
    old = supervisor_pid(vm, before["MainPID"])
    vm.py("loop = RequestLoop(fe)")
    time.sleep(1)
    vm.sh(f"kill -KILL {old}")
    at_kill = vm.py("loop.answered")
    deadline = time.monotonic() + 60
    while vm.py("loop.answered") < at_kill + 20:  # the new supervisor's workers answer
        assert time.monotonic() < deadline, (vm.py("loop.stop()"),
                                             vm.journal("pyvirtiofsd@sk.service"))
        time.sleep(0.5)
    seen = vm.py("loop.stop()")
    assert seen["failure"] is None and not seen["alive"], seen
    assert seen["unexpected_answers"] == 0, seen
    assert vm.py("read_file(fe, b'hello').decode()") == "kept\n"
    after = show(vm, "pyvirtiofsd@sk.service", "MainPID", "NRestarts", "ActiveState")
    assert after == {**before, "ActiveState": "active"}, after
    assert supervisor_pid(vm, after["MainPID"]) != old
    print(f"supervisor kill: {seen['answered']} GETATTRs answered (4 in flight), the "
          f"longest wait {seen['longest_s']} s")
    vm.py("fe.close()")
    vm.sh("systemctl stop pyvirtiofsd@sk.socket pyvirtiofsd@sk.service")
