"""Session-wide cache of the conformance guest runs (one boot per daemon configuration,
shared by test_posix_conformance.py and test_fsx.py)."""

from __future__ import annotations

import pytest

from tests.conformance.harness import Runs


@pytest.fixture(scope="session")
def conformance_runs() -> Runs:
    return Runs()
