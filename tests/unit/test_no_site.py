"""The daemon serves from an interpreter that ran no ``site`` hooks
(daemon/host/lean_interpreter.py, reexec_without_site).

A ``.pth`` file in the user site directory (in a virtual environment: its site-packages)
imports ``_decimal``, an extension module the daemon itself never loads; whether its
library is mapped in the serving processes tells whether the hook ran in them."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import daemon_log, daemon_processes, pyvirtiofsd
from tests.support.frontend import Frontend
from tests.support.reference import stop_daemon

HOOK = "import _decimal\n"


@pytest.fixture
def user_site_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A ``.pth`` hook where ``site`` reads it: the user site directory, or in a virtual
    environment (which ignores the user site) the environment's own site-packages, for
    the duration of the test."""
    if site.ENABLE_USER_SITE:
        base = tmp_path / "userbase"
        v = sys.version_info
        site_dir = base / "lib" / f"python{v.major}.{v.minor}" / "site-packages"
        site_dir.mkdir(parents=True)
        monkeypatch.setenv("PYTHONUSERBASE", str(base))
    else:
        site_dir = Path(sysconfig.get_paths()["purelib"])
    hook = site_dir / f"zz_pyvirtiofsd_test_hook_{os.getpid()}.pth"
    hook.write_text(HOOK)
    try:
        # the hook runs in a plain interpreter: the test would prove nothing otherwise
        out = subprocess.run([sys.executable, "-c",
                              "import sys; print('_decimal' in sys.modules)"],
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "True", out.stderr
        yield site_dir
    finally:
        hook.unlink()


def serve_and_look(tmp_path: Path) -> tuple[list[str], list[bool], str]:
    """The server's argv, and for each of its processes whether _decimal is mapped,
    read while a front-end is connected (the daemon exits when it disconnects)."""
    share = tmp_path / "share"
    share.mkdir()
    sock = tmp_path / "vfs.sock"
    with pyvirtiofsd(share, sock, "--sandbox", "none") as proc:
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")
        fe = Frontend(str(sock))
        try:
            fe.setup(2)
            fe.init()
            pids = daemon_processes(proc, 3)  # supervisor, template+hiprio, request worker
            hooked = ["_decimal" in Path(f"/proc/{pid}/maps").read_text() for pid in pids]
        finally:
            fe.close()
        log = daemon_log(proc)
    return argv, hooked, log


def test_site_hooks_do_not_run_in_the_daemon(user_site_hook: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYVIRTIOFSD_SITE", raising=False)
    argv, hooked, log = serve_and_look(tmp_path)
    assert argv[1:6] == ["-S", "-P", "-OO", "-m", "supervisor"], argv
    assert "--shared-dir" in argv and "--sandbox" in argv  # its arguments carried over
    assert hooked == [False] * 3, log
    assert "sharing" in log


def test_pyvirtiofsd_site_keeps_the_interpreter(user_site_hook: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVIRTIOFSD_SITE", "1")
    argv, hooked, _ = serve_and_look(tmp_path)
    assert "-S" not in argv
    assert hooked == [True] * 3


def test_listening_fd_survives_the_reexec(tmp_path: Path) -> None:
    """libvirt passes a listening socket with --fd: it must still be ours after exec."""
    import socket

    share = tmp_path / "share"
    share.mkdir()
    sock_path = tmp_path / "vfs.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    log_path = tmp_path / "log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "--shared-dir", str(share), "--fd", str(fd),
             "--sandbox", "none"],
            cwd=Path(__file__).resolve().parents[2], pass_fds=(fd,), stdout=log, stderr=log)
    listener.close()
    try:
        fe = Frontend(str(sock_path))
        try:
            fe.setup(2)
            fe.init()
            argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")
            assert argv[1:4] == ["-S", "-P", "-OO"]
        finally:
            fe.close()
        assert proc.wait(timeout=20) == 0, log_path.read_text()
    finally:
        stop_daemon(proc)
