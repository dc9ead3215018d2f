"""The daemon keeps OpenSSL out of its processes (daemon/host/lean_interpreter.py,
install_no_tls)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.daemon import daemon_processes, pyvirtiofsd
from tests.support.frontend import Frontend

REPO = Path(__file__).resolve().parents[2]

PROBE = """
from daemon.host import lean_interpreter
print(lean_interpreter.install_no_tls())
import asyncio, ssl, uvloop
maps = open("/proc/self/maps").read()
print("libssl" in maps or "libcrypto" in maps)
async def main():
    r, w = await asyncio.open_unix_connection(sock=__import__("socket").socketpair()[0])
    return 42
print(uvloop.run(main()))
try:
    ssl.create_default_context()
except ssl.SSLError as e:
    print("refused:", e)
"""


def run_probe(prelude: str = "") -> list[str]:
    out = subprocess.run([sys.executable, "-c", prelude + PROBE], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_uvloop_runs_without_openssl_loaded() -> None:
    lines = run_probe()
    assert lines[0] == "True"  # placeholder in use
    assert lines[1] == "False"  # neither libssl nor libcrypto mapped
    assert lines[2] == "42"  # the event loop works
    assert lines[3].startswith("refused:") and "TLS is not available" in lines[3]


def test_real_ssl_is_used_when_the_placeholder_does_not_fit() -> None:
    # a uvloop that reads a name the placeholder lacks: the real module is loaded instead
    prelude = ("from daemon.host import lean_interpreter\n"
               "_orig = lean_interpreter._ssl_placeholder\n"
               "def _thin():\n"
               "    m = _orig(); del m.MemoryBIO; return m\n"
               "lean_interpreter._ssl_placeholder = _thin\n")
    lines = run_probe(prelude)
    assert lines[0] == "False"
    assert lines[1] == "True"  # the real OpenSSL is loaded
    assert lines[2] == "42"


def test_running_daemon_maps_no_openssl(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    sock = tmp_path / "vfs.sock"
    with pyvirtiofsd(share, sock, "--sandbox", "none") as proc:
        fe = Frontend(str(sock))
        try:
            fe.setup(2)
            fe.init()
            pids = daemon_processes(proc, 3)  # supervisor, template+hiprio, request worker
            for pid in pids:
                maps = Path(f"/proc/{pid}/maps").read_text()
                assert "libcrypto" not in maps and "libssl" not in maps, pid
        finally:
            fe.close()
