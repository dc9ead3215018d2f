"""Data integrity under random operations: the fsx-style exerciser (``fsx.py``: ~2,000 seeded
writes, truncates, hole punches, fallocates, mmap writes and reads, compared with an
in-memory model; every 200 operations ``sync`` + ``drop_caches`` and a full comparison) in a
Linux 6.1 guest on pyvirtiofsd with ``--cache auto`` (default), ``always``, ``never`` and
``--writeback``.  It runs in the same guest boot as the POSIX suite (``harness.py``)."""

from __future__ import annotations

import pytest

from tests.conformance.harness import FSX_OPS, PYVIRTIOFSD_MODES, Runs


@pytest.mark.guest
@pytest.mark.parametrize("mode", PYVIRTIOFSD_MODES)
def test_fsx_no_mismatches(conformance_runs: Runs, mode: str) -> None:
    run = conformance_runs.get(mode)
    assert run.fsx_ended, run.describe()
    assert run.fsx.get("fsx.ops") == str(FSX_OPS), run.describe()
    # shared mmaps are refused only where the cache mode implies it (FOPEN_DIRECT_IO)
    want_mmap = "ENODEV" if mode in ("cache-never", "cache-metadata") else "ok"
    assert run.fsx.get("fsx.mmap") == want_mmap, run.describe()
    assert run.fsx.get("fsx.punch_hole") == "ok", run.describe()
    assert run.fsx.get("fsx.mismatches") == "0", (
        f"{run.mode.label}: fsx found mismatches:\n" + "\n".join(run.fsx_mismatch_lines)
        + "\n" + run.describe()
    )
