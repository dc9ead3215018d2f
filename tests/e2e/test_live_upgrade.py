"""A real guest through live upgrades and supervisor kills: a Linux 6.12 guest with 2
request queues and 2 vCPUs runs fio with crc32c verification and two integrity checkers
while the daemon (--sandbox namespace, the unit's) is upgraded (``pyvirtiofsd
upgrade``) and its supervisor SIGKILLed under it, in turn; the guest sees no I/O error,
no mismatch, and fio verifies every block. benchmarks/upgrade_stalls.py runs the same with more
events and reports the stalls (docs/operations.md)."""

from __future__ import annotations

import pytest

from benchmarks.upgrade_stalls import run


@pytest.mark.guest
def test_guest_io_survives_live_upgrades_and_supervisor_kills() -> None:
    result = run(upgrades=2, kills=2, interval=3.0, sandbox="namespace")
    assert result.run.rc == 0, result.run.describe()
    assert [kind for kind, _, _ in result.events] == ["upgrade", "kill"] * 2, result.events
    outputs = [out for _, _, out in result.events]
    assert "live upgrade 1, serving" in outputs[0] and "live upgrade 2, serving" in \
        outputs[2], result.log
    assert "restart 1 serving" in outputs[1] and "restart 2 serving" in outputs[3], \
        result.log
    checkers = result.checkers()
    assert len(checkers) == 2, result.run.script_output
    for c in checkers:
        assert int(c["ops"]) > 20 and c["errors"] == "0" and c["mismatches"] == "0", c
    assert result.fio() == "rc=0 err=0", result.run.script_output
    assert "@@UNMOUNTED@@" in result.run.script_output
    assert result.log.count("live upgrade: took over the front-end") == 4
