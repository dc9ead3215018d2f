"""A QEMU new enough for vhost-user device-state migration (8.2 or later), for migration tests.

Debian 13's own QEMU (10.0) is. Debian 12's is 7.2 and must stay the system's: there the
tests take QEMU 10 from bookworm-backports (added from the machine's own mirror, pinned to
priority 1, by :func:`tests.support.debian.ensure_suite`) and unpack its packages with
``dpkg -x`` into the cache, never installing them. The unpacked binary is told where its
firmware (``-L``: its own data directory, then backports' seabios, which QEMU 10's x86
machines need in version 1.16.3 or later) and its modules (``QEMU_MODULE_DIR``) are, so
nothing of the host's QEMU 7.2 is mixed in.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import assets, debian

#: QEMU gained SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE for vhost-user-fs in 8.2
MIN_VERSION = (8, 2)
#: what a Debian 12 host unpacks from bookworm-backports: the binary, its modules and
#: firmware, and the seabios its data package's x86 machines expect
BACKPORT_PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios")
SYSTEM_QEMU = Path("/usr/bin/qemu-system-x86_64")


class QemuUnavailable(RuntimeError):
    """No QEMU >= 8.2 here, and none can be unpacked (the message says why)."""


@dataclass(frozen=True)
class Qemu:
    """How to run one QEMU: its binary, firmware directories and module directory."""

    binary: Path
    version: tuple[int, ...]
    data_dirs: tuple[Path, ...] = ()
    module_dir: Path | None = None
    origin: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)

    def command(self) -> list[str]:
        """The start of a command line: the binary, its ``-L`` firmware directories, and
        no audio: probing the host's default audio back-end loads modules, and where one
        of ours is missing QEMU takes the system QEMU's from its built-in module directory
        and aborts ("Only modules from the same build can be loaded")."""
        cmd = [str(self.binary)]
        for path in self.data_dirs:
            cmd += ["-L", str(path)]
        return [*cmd, "-audio", "none"]

    def env(self) -> dict[str, str]:
        """The environment to start it in (its own module directory when unpacked)."""
        env = dict(os.environ)
        if self.module_dir is not None:
            env["QEMU_MODULE_DIR"] = str(self.module_dir)
        env.update(self.extra_env)
        return env


def parse_version(text: str) -> tuple[int, ...]:
    """(major, minor, micro) from ``qemu-system-x86_64 --version``'s first line; () if none."""
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        return ()
    return tuple(int(x) for x in match.groups() if x is not None)


def backport_suite(release: str) -> str | None:
    """Where a host of ``release`` takes a migration-capable QEMU from: None for the
    system's own (trixie and later), bookworm-backports on Debian 12."""
    return "bookworm-backports" if release == "bookworm" else None


def unpacked_qemu(root: Path, origin: str = "") -> Qemu:
    """The QEMU unpacked under ``root`` (a ``dpkg -x`` tree of :data:`BACKPORT_PACKAGES`),
    with its own firmware and modules; QemuUnavailable if the tree lacks one of them."""
    binary = root / "usr" / "bin" / "qemu-system-x86_64"
    data = root / "usr" / "share" / "qemu"
    seabios = root / "usr" / "share" / "seabios"
    modules = root / "usr" / "lib" / "x86_64-linux-gnu" / "qemu"
    for path in (binary, data, seabios):
        if not path.exists():
            raise QemuUnavailable(f"{path} is missing from the unpacked QEMU in {root}")
    version = _version_of([str(binary), "--version"], {"QEMU_MODULE_DIR": str(modules)})
    return Qemu(binary, version, (data, seabios), modules if modules.is_dir() else None,
                origin or f"unpacked in {root}")


def _version_of(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, ...]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                             env={**os.environ, **(env or {})})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QemuUnavailable(f"{cmd[0]} does not run: {e}") from e
    if out.returncode != 0:
        raise QemuUnavailable(f"{' '.join(cmd)} failed: {out.stderr.strip()[:500]}")
    return parse_version(out.stdout)


def system_qemu() -> Qemu | None:
    """The host's own QEMU if it is new enough for device-state migration."""
    binary = shutil.which("qemu-system-x86_64") or str(SYSTEM_QEMU)
    if not Path(binary).exists():
        return None
    version = _version_of([binary, "--version"])
    if version < MIN_VERSION:
        return None
    return Qemu(Path(binary), version, origin="the system's")


def cache_root() -> Path:
    return assets.cache_dir() / "qemu10"


def ensure_qemu(release: str | None = None) -> Qemu:
    """A QEMU >= 8.2: the system's (Debian 13), else bookworm-backports' unpacked into
    the cache once (Debian 12). Raises QemuUnavailable when neither works."""
    own = system_qemu()
    if own is not None:
        return own
    release = debian.host_release() if release is None else release
    suite = backport_suite(release)
    if suite is None:
        raise QemuUnavailable(f"the system's QEMU is older than "
                              f"{'.'.join(map(str, MIN_VERSION))} and Debian {release} has "
                              "no suite this test knows to take a newer one from")
    root = cache_root() / suite
    done = root / ".complete"
    with assets.file_lock("qemu10"):
        if not done.exists():
            _unpack_from(suite, root)
    return unpacked_qemu(root, origin=f"{suite}, unpacked in {root}")


def _unpack_from(suite: str, root: Path) -> None:
    """``apt-get download`` the packages from ``suite`` and ``dpkg -x`` them into root."""
    with assets.file_lock("apt"):
        try:
            source = debian.ensure_suite(suite)
        except debian.AptError as e:
            raise QemuUnavailable(str(e)) from e
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            cmd = ["apt-get", "download", *(f"{p}/{suite}" for p in BACKPORT_PACKAGES)]
            try:
                debian.run(cmd, cwd=Path(tmp))
            except debian.AptError:
                debian.update_source(source.file)  # lists missing or stale
                try:
                    debian.run(cmd, cwd=Path(tmp))
                except debian.AptError as e:
                    raise QemuUnavailable(str(e)) from e
            staging = Path(tmp) / "root"
            for deb in sorted(Path(tmp).glob("*.deb")):
                debian.run(["dpkg", "-x", str(deb), str(staging)])
            names = sorted(d.name for d in Path(tmp).glob("*.deb"))
            (staging / ".complete").write_text("\n".join(names) + "\n")
            shutil.rmtree(root, ignore_errors=True)
            staging.rename(root)
