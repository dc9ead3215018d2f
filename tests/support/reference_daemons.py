"""The three daemons under test, behind one start/stop interface.

* ``pyvirtiofsd``: this repository (``python -m supervisor ... --sandbox none``).

A name may end in ``+namespace`` or ``+chroot``: the same daemon with that ``--sandbox``
(the default an operator and libvirt run is ``namespace``; the benchmarks' plain names run
``none``, which needs no privileges).
* ``rust``: Rust virtiofsd 1.13.2: the release's ``virtiofsd`` package from Debian 13 on;
  on Debian 12 trixie's, unpacked with trixie's libc (``tests/support/reference.py``).
* ``c``: QEMU 7.2's C virtiofsd (``/usr/lib/qemu/virtiofsd``, package qemu-system-common):
  Debian 12 only (QEMU 8.0 dropped it); elsewhere ``c`` says so and stops.

Every daemon exits when the front-end disconnects, so each benchmark run starts a fresh one.
``python3 -m tests.support.reference_daemons`` fetches Rust virtiofsd and prints the versions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import debian, reference
from tests.support.reference import C_VIRTIOFSD, c_virtiofsd_present
from tests.support.reference import stop_daemon as stop

REPO = Path(__file__).resolve().parents[2]


def _wait_for_socket(proc: subprocess.Popen[bytes], path: Path, log: Path,
                     timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_socket():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{proc.args!r} did not create {path}:\n"
                               f"{log.read_text(errors='replace')}")
        time.sleep(0.02)


@dataclass
class Daemon:
    """One kind of daemon; :meth:`start` gives a fresh process for one front-end."""

    name: str
    label: str
    max_request_queues: int
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_path: Path | None = None
    sandbox: str = "none"  # --sandbox

    def command(self, shared_dir: Path, socket_path: Path) -> list[str]:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def start(self, shared_dir: str | Path, socket_path: str | Path) -> subprocess.Popen[bytes]:
        socket_path = Path(socket_path)
        socket_path.unlink(missing_ok=True)
        self.log_path = Path(f"{socket_path}.{self.name}.log")
        cmd = self.command(Path(shared_dir), socket_path)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log)
        _wait_for_socket(self.proc, socket_path, self.log_path, 20.0)
        return self.proc

    def stop(self) -> int:
        if self.proc is None:
            return 0
        code = stop(self.proc)
        self.proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


SNAPSHOT_ROOT = Path("/tmp/pyvirtiofsd-bench-snapshots")
SNAPSHOT_PATHS = ["daemon", "workers", "shm_table", "supervisor.py", "setup.py",
                  "pyproject.toml", "README.md"]


def snapshot_pyvirtiofsd(rev: str = "HEAD") -> tuple[Path, str]:
    """Export a commit of pyvirtiofsd (``git archive``), build its cffi extensions and
    byte-compile it, so a benchmark measures one committed version even while the work
    tree is being edited."""
    full = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], capture_output=True,
                          text=True, check=True).stdout.strip()
    dest = SNAPSHOT_ROOT / full[:12]
    if not (dest / ".built").exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", full, *SNAPSHOT_PATHS],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # byte-compiled as pip installs it, and for -OO (as the daemon runs since it
        # re-executes itself, daemon/host/lean_interpreter.py; its first start writes these where
        # it may): otherwise every start compiles the sources (PYTHONDONTWRITEBYTECODE is
        # set here), which costs time and ~0.5 MB of heap
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-o", "0", "-o", "2",
                        "daemon", "shm_table",
                        "workers", "supervisor.py"], cwd=dest, check=True,
                       stdout=subprocess.DEVNULL)
        (dest / ".built").write_text(full)
    return dest, full


class PyVirtiofsd(Daemon):
    """pyvirtiofsd from a snapshot of a commit (default HEAD at the first start), or from
    the live work tree with ``rev=None``."""

    def __init__(self, rev: str | None = "HEAD") -> None:
        super().__init__("pyvirtiofsd", "pyvirtiofsd", 64)
        self.rev = rev
        self.tree: Path = REPO
        self.commit = ""
        if rev is not None:
            self.tree, self.commit = snapshot_pyvirtiofsd(rev)

    def command(self, shared_dir: Path, socket_path: Path) -> list[str]:
        # commits before the start-up wiring moved into supervisor.py start as daemon.cli
        entry = "daemon.cli" if (self.tree / "daemon" / "cli.py").exists() else "supervisor"
        return [sys.executable, "-m", entry, "--shared-dir", str(shared_dir),
                "--socket-path", str(socket_path), "--sandbox", self.sandbox]

    def start(self, shared_dir: str | Path, socket_path: str | Path) -> subprocess.Popen[bytes]:
        socket_path = Path(socket_path)
        socket_path.unlink(missing_ok=True)
        self.log_path = Path(f"{socket_path}.{self.name}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(Path(shared_dir), socket_path),
                                         cwd=self.tree, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log)
        _wait_for_socket(self.proc, socket_path, self.log_path, 20.0)
        return self.proc

    def version(self) -> str:
        if self.commit:
            subject = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%s",
                                      self.commit], capture_output=True, text=True).stdout
            return (f"pyvirtiofsd commit {self.commit[:10]} ({subject.strip()[:60]}), "
                    f"Python {sys.version.split()[0]}")
        return f"pyvirtiofsd work tree {REPO} (Python {sys.version.split()[0]})"


class RustVirtiofsd(Daemon):
    def __init__(self) -> None:
        super().__init__("rust", "Rust virtiofsd", 1)

    def command(self, shared_dir: Path, socket_path: Path) -> list[str]:
        return [*reference.rust_command(), f"--socket-path={socket_path}",
                f"--shared-dir={shared_dir}", f"--sandbox={self.sandbox}"]

    def start(self, shared_dir: str | Path, socket_path: str | Path) -> subprocess.Popen[bytes]:
        reference.note_rust_origin()
        return super().start(shared_dir, socket_path)

    def version(self) -> str:
        return f"{reference.rust_version()} ({reference.rust_origin()})"


class CVirtiofsd(Daemon):
    def __init__(self) -> None:
        super().__init__("c", "C virtiofsd", 1)

    def command(self, shared_dir: Path, socket_path: Path) -> list[str]:
        if not c_virtiofsd_present():
            if debian.host_release() != "bookworm":
                raise RuntimeError(f"C virtiofsd is not part of Debian {debian.host_release()} "
                                   "(QEMU 8.0 dropped it): leave 'c' out of --daemons")
            raise RuntimeError(f"{C_VIRTIOFSD} missing: apt-get install -y qemu-system-x86")
        return [str(C_VIRTIOFSD), f"--socket-path={socket_path}", "-o",
                f"source={shared_dir}", "-o", "cache=auto"]

    def version(self) -> str:
        out = subprocess.run([str(C_VIRTIOFSD), "--version"], capture_output=True, text=True)
        text = (out.stdout + out.stderr).strip().splitlines()
        return f"C virtiofsd ({text[0] if text else 'QEMU'}, {C_VIRTIOFSD})"


DAEMONS: dict[str, type[Daemon]] = {"pyvirtiofsd": PyVirtiofsd, "rust": RustVirtiofsd,
                                    "c": CVirtiofsd}


SANDBOXES = ("namespace", "chroot")


def make(name: str) -> Daemon:
    """A daemon by name; ``pyvirtiofsd@REV`` is pyvirtiofsd at another commit, so a change
    can be measured against what came before in the same interleaved run; a ``+namespace``
    or ``+chroot`` suffix runs it with that --sandbox (C virtiofsd: not offered)."""
    base, _, sandbox = name.partition("+")
    if sandbox and (sandbox not in SANDBOXES or base.startswith("c")):
        raise ValueError(f"{name}: the suffix is +namespace or +chroot, for pyvirtiofsd "
                         "or rust")
    if base.startswith("pyvirtiofsd@"):
        daemon: Daemon = PyVirtiofsd(rev=base.split("@", 1)[1])
    else:
        daemon = DAEMONS[base]()
    if sandbox:
        daemon.sandbox = sandbox
    if name != daemon.name:
        daemon.name = daemon.label = name
    return daemon


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (threads' children included)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return out


if __name__ == "__main__":
    if not reference.rust_is_packaged():
        reference.fetch_rust_virtiofsd(quiet=False)
    for d in DAEMONS.values():
        print(d().version())
