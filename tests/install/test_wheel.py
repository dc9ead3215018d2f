"""An operator's install: the wheel ``pip install .`` builds.

It must carry both cffi extensions (no build left to the first run), keep the daemon's
top-level names (``daemon``, ``workers``, ``shm_table``, ``supervisor``) out of
site-packages, and serve from any working directory through its launcher, re-executing
itself with ``python -S -P -OO -m supervisor``, while python-daemon's top-level ``daemon``
(a test extra, so installed here) stays what its users import.

The wheel is built from a copy of the sources without build isolation (the test extras
bring setuptools and wheel: no network), and "installed" by unpacking it into a directory
on PYTHONPATH, which is what an installer does with its files.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from daemon.protocol import fuse
from tests.support.daemon import REPO
from tests.support.frontend import Frontend
from tests.support.reference import stop_daemon, wait_for_socket

SOURCES = ("pyproject.toml", "setup.py", "README.md", "supervisor.py", "pyvirtiofsd", "daemon",
           "workers", "shm_table")
BUILT = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "_sys.c", "_native.c")
LAUNCH = "import sys, pyvirtiofsd; sys.argv[0] = 'pyvirtiofsd'; sys.exit(pyvirtiofsd.main())"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=BUILT)
        else:
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--no-build-isolation", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("pyvirtiofsd-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(where)
    return where


def env_with(site: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYVIRTIOFSD_SITE")}
    env["PYTHONPATH"] = str(site)
    return env


def test_wheel_has_both_extensions_and_keeps_the_names_private(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/WHEEL"))
        top_level = zf.read(f"{info}/top_level.txt").decode().split()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"pyvirtiofsd", info}
    assert any(re.fullmatch(r"pyvirtiofsd/daemon/native/_sys\..*so", n) for n in names), names
    assert any(re.fullmatch(r"pyvirtiofsd/shm_table/_native\..*so", n) for n in names), names
    assert {"pyvirtiofsd/supervisor.py", "pyvirtiofsd/workers/__init__.py",
            "pyvirtiofsd/__init__.py", "pyvirtiofsd/__main__.py"} <= set(names)
    assert top_level == ["pyvirtiofsd"]
    assert re.search(r"^pyvirtiofsd = pyvirtiofsd:main$", entry_points, re.M), entry_points


def test_python_daemon_is_not_shadowed(site: Path) -> None:
    """Beside our wheel (and after importing its launcher) ``import daemon`` is
    python-daemon's; only pyvirtiofsd's own entry point sees ours."""
    code = ("import pyvirtiofsd, daemon; daemon.DaemonContext; print(daemon.__file__); "
            "print(pyvirtiofsd.root())")
    done = subprocess.run([sys.executable, "-c", code], cwd="/", env=env_with(site),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    theirs, ours = done.stdout.split()
    assert not theirs.startswith(str(site)) and Path(theirs).parent != REPO / "daemon", theirs
    assert ours == str(site / "pyvirtiofsd")


def test_installed_command_line(site: Path) -> None:
    done = subprocess.run([sys.executable, "-c", LAUNCH, "--print-capabilities"], cwd="/",
                          env=env_with(site), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"type": "fs",
                                       "features": ["migrate-precopy", "separate-options"]}
    done = subprocess.run([sys.executable, "-c", LAUNCH, "--help"], cwd="/",
                          env=env_with(site), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--shared-dir" in done.stdout, done.stderr


def test_installed_daemon_serves_from_any_directory(site: Path, tmp_path: Path) -> None:
    """Started from ``/``, with python-daemon importable: the daemon re-executes itself
    without ``site`` from the wheel's private directory, loads the wheel's extensions and
    answers a LOOKUP."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello\n")
    sock = tmp_path / "vfs.sock"
    log_path = tmp_path / "log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "--shared-dir", str(share), "--socket-path",
             str(sock), "--sandbox", "none"],
            cwd="/", env=env_with(site), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    proc.log_path = log_path  # type: ignore[attr-defined]
    try:
        wait_for_socket(proc, sock, timeout=20.0)
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")
        assert argv[1:6] == ["-S", "-P", "-OO", "-m", "supervisor"], argv
        fe = Frontend(str(sock))
        try:
            fe.setup(2)
            fe.init()
            error, _ = fe.lookup(fuse.ROOT_ID, b"hello.txt")
            assert error == 0
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
        finally:
            fe.close()
        assert f"{site}/pyvirtiofsd/daemon/native/_sys" in maps
        assert f"{site}/pyvirtiofsd/shm_table/_native" in maps
        assert f"{REPO}/daemon/" not in maps and f"{REPO}/shm_table/" not in maps
        assert proc.wait(timeout=20) == 0, log_path.read_text()
    finally:
        stop_daemon(proc)
