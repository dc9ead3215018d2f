"""The command line as libvirt and scripts use it: virtiofsd's options, the legacy -o
form, --fd with a socket the caller made, and clear errors."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import options
from daemon.protocol import fuse
from tests.support.daemon import REPO
from tests.support.frontend import Frontend


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=30)


def parse(*argv: str) -> object:
    args = options.build_parser().parse_args(list(argv))
    options.apply_compat(args)
    return args


def test_legacy_o_options_map_to_virtiofsd_1_13_options(tmp_path: Path) -> None:
    args = parse("-o", f"source={tmp_path},cache=none,xattr,no_posix_lock", "-o", "writeback")
    assert args.shared_dir == str(tmp_path)
    assert args.cache == "never"
    assert args.xattr and args.writeback


def test_unknown_legacy_option_is_named() -> None:
    args = options.build_parser().parse_args(["-o", "source=/tmp,bogus=1"])
    try:
        options.apply_compat(args)
    except options.UsageError as e:
        assert "bogus=1" in str(e)
    else:
        raise AssertionError("unknown -o option accepted")


def test_errors_name_the_option(tmp_path: Path) -> None:
    r = run_cli("--socket-path", str(tmp_path / "s"))
    assert r.returncode == 2 and "--shared-dir is required" in r.stderr
    r = run_cli("--shared-dir", str(tmp_path / "missing"), "--socket-path", str(tmp_path / "s"))
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = run_cli("--shared-dir", str(tmp_path), "--socket-path", "s", "--tag", "x" * 37)
    assert r.returncode == 2 and "--tag" in r.stderr and "36 bytes" in r.stderr
    r = run_cli("--shared-dir", str(tmp_path), "--socket-path", "s", "--fd", "3")
    assert r.returncode == 2 and "--socket-path and --fd" in r.stderr
    r = run_cli("--shared-dir", str(tmp_path), "--fd", "97")
    assert r.returncode == 2 and "--fd 97" in r.stderr
    r = run_cli("--shared-dir", str(tmp_path), "--socket-path", "s", "--cache", "sometimes")
    assert r.returncode == 2 and "--cache" in r.stderr


def test_c_fast_path_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--c-fast-path, default on, or what PYVIRTIOFSD_C_PATH says; the option wins."""
    monkeypatch.delenv(options.C_PATH_ENV, raising=False)
    assert parse().c_fast_path == "on"
    monkeypatch.setenv(options.C_PATH_ENV, "off")
    assert parse().c_fast_path == "off"
    assert parse("--c-fast-path", "on").c_fast_path == "on"
    r = subprocess.run([sys.executable, "-m", "supervisor", "--shared-dir", str(tmp_path),
                        "--socket-path", str(tmp_path / "s")], cwd=REPO, capture_output=True,
                       text=True, timeout=30, env={**os.environ, options.C_PATH_ENV: "fast"})
    assert r.returncode == 2 and "PYVIRTIOFSD_C_PATH=fast" in r.stderr
    r = run_cli("--shared-dir", str(tmp_path), "--socket-path", "s", "--c-fast-path", "x")
    assert r.returncode == 2 and "--c-fast-path" in r.stderr


def test_version_and_capabilities() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("pyvirtiofsd ")
    r = run_cli("--print-capabilities")
    assert r.returncode == 0 and '"type": "fs"' in r.stdout


def test_fd_option_serves_a_socket_the_caller_created(tmp_path: Path) -> None:
    """libvirt creates and labels the listening socket itself and passes --fd=N."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"served through --fd")
    path = str(tmp_path / "vfs.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "--shared-dir", str(share), f"--fd={fd}",
         "--sandbox", "none"],
        cwd=REPO, pass_fds=[fd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    listener.close()
    try:
        front = Frontend(path)
        front.setup(2)
        front.init()
        err, entry = front.lookup(1, b"f")
        assert err == 0
        nodeid = struct.unpack_from("<Q", entry)[0]
        err, opened = front.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(0, 0))
        fh = struct.unpack_from("<Q", opened)[0]
        err, data = front.fuse(fuse.Opcode.READ, nodeid, fuse.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
        assert (err, data) == (0, b"served through --fd")
        front.close()
        assert proc.wait(timeout=20) == 0  # exits when the front-end disconnects
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (tmp_path / "vfs.sock.pid").exists()  # no pid file in --fd mode
