"""A real guest through live upgrades: a Linux 6.12 guest with 2 request queues and 2
vCPUs runs fio with crc32c verification and two integrity checkers while the daemon is
upgraded (``pyvirtiofsd upgrade``) under it; the guest sees no I/O error, no mismatch,
and fio verifies every block. benchmarks/upgrade_stalls.py runs the same with more
events and reports the stalls (docs/operations.md)."""

from __future__ import annotations

import pytest

from benchmarks.upgrade_stalls import run


@pytest.mark.guest
def test_guest_io_survives_live_upgrades() -> None:
    result = run(upgrades=3, interval=3.0)
    assert result.run.rc == 0, result.run.describe()
    assert [kind for kind, _, _ in result.events] == ["upgrade"] * 3, result.events
    for n, (_, _, out) in enumerate(result.events, 1):
        assert f"live upgrade {n}, serving" in out, result.log
    checkers = result.checkers()
    assert len(checkers) == 2, result.run.script_output
    for c in checkers:
        assert int(c["ops"]) > 20 and c["errors"] == "0" and c["mismatches"] == "0", c
    assert result.fio() == "rc=0 err=0", result.run.script_output
    assert "@@UNMOUNTED@@" in result.run.script_output
    assert result.log.count("live upgrade: took over the front-end") == 3
