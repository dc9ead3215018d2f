"""Shared pytest configuration for pyvirtiofsd's tests."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Register markers so ``-m guest`` / ``-m 'not guest'`` select the slow QEMU tests."""
    config.addinivalue_line(
        "markers", "guest: end-to-end test that boots a Linux guest under QEMU (slow, needs root)"
    )
