"""The QEMU 10 finder the migration tests use: which suite a release takes it from, how
its version is read, and how an unpacked tree is run (its own firmware and modules)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import qemu10


def test_version_is_read_from_the_first_line() -> None:
    text = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"
    assert qemu10.parse_version(text) == (10, 0, 2)
    assert qemu10.parse_version("QEMU emulator version 7.2.22 (Debian)") == (7, 2, 22)
    assert qemu10.parse_version("QEMU emulator version 7.2.22") < qemu10.MIN_VERSION
    assert qemu10.parse_version("nothing") == ()


def test_debian_12_takes_backports_and_13_its_own() -> None:
    assert qemu10.backport_suite("bookworm") == "bookworm-backports"
    assert qemu10.backport_suite("trixie") is None


def fake_tree(root: Path, version: str = "10.0.2") -> None:
    binary = root / "usr/bin/qemu-system-x86_64"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\necho \"QEMU emulator version "
                      f"{version} (module dir $QEMU_MODULE_DIR)\"\n")
    binary.chmod(0o755)
    for d in ("usr/share/qemu", "usr/share/seabios", "usr/lib/x86_64-linux-gnu/qemu"):
        (root / d).mkdir(parents=True)


def test_an_unpacked_tree_runs_with_its_own_firmware_and_modules(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    q = qemu10.unpacked_qemu(tmp_path)
    assert q.version == (10, 0, 2)
    cmd = q.command()
    assert cmd[0] == str(tmp_path / "usr/bin/qemu-system-x86_64")
    assert cmd[1:] == ["-L", str(tmp_path / "usr/share/qemu"),
                       "-L", str(tmp_path / "usr/share/seabios"), "-audio", "none"]
    assert q.env()["QEMU_MODULE_DIR"] == str(tmp_path / "usr/lib/x86_64-linux-gnu/qemu")


def test_a_tree_without_seabios_is_refused(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    (tmp_path / "usr/share/seabios").rmdir()
    with pytest.raises(qemu10.QemuUnavailable, match="seabios"):
        qemu10.unpacked_qemu(tmp_path)


def test_the_cached_qemu_runs() -> None:
    """Where setup has unpacked (or the system has) a QEMU >= 8.2, it starts."""
    root = qemu10.cache_root() / "bookworm-backports"
    assert qemu10.system_qemu() is not None or (root / ".complete").exists(), \
        "no QEMU >= 8.2 unpacked: bash .ci/setup (python -m tests.support) fetches it"
    q = qemu10.ensure_qemu()
    assert q.version >= qemu10.MIN_VERSION
    assert os.access(q.binary, os.X_OK)
