"""One guest boot per daemon configuration, running the POSIX suite and fsx in a single
python3 program (see ``posix_suite.py``); results are parsed and cached per session.

Configurations (:data:`MODES`): pyvirtiofsd with default options (``--cache auto``),
``--cache always``, ``--cache never``, ``--cache metadata`` and ``--writeback``; QEMU
7.2's C virtiofsd (``-o cache=auto``); Rust virtiofsd 1.13.2 (``--sandbox none``, Debian
13 package, see ``tests/support/reference_daemons.py``).
Each gets a fresh, empty share (mode 0755, root-owned) on the host's ext4 ``/tmp``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.conformance import posix_suite
from tests.support import assets, reference
from tests.support.daemon import daemon_log, pyvirtiofsd
from tests.support.reference_daemons import RustVirtiofsd
from tests.support.vm import GuestRun, run_guest

SOURCES = Path(posix_suite.__file__).resolve().parent


def staged_suite() -> Path:
    """The suite and fsx copied where the guest's `hostrun` sees them: it binds a fresh
    tmpfs over the host's /tmp, so a checkout under /tmp (as CI's may be) is invisible."""
    dest = assets.cache_dir() / "conformance"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("posix_suite.py", "fsx.py"):
        shutil.copyfile(SOURCES / name, dest / name)
    return dest / "posix_suite.py"


SUITE = staged_suite()
FSX_OPS = 2000
FSX_SEED = 20261125
GUEST_TIMEOUT = 420.0


@dataclass(frozen=True)
class Mode:
    name: str
    label: str
    daemon: str  # pyvirtiofsd | c | rust
    args: tuple[str, ...] = ()


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("pyvirtiofsd", "pyvirtiofsd", "pyvirtiofsd"),
        Mode("c", "C virtiofsd (QEMU 7.2)", "c"),
        Mode("rust", "Rust virtiofsd 1.13.2", "rust"),
        Mode("cache-always", "pyvirtiofsd --cache always", "pyvirtiofsd", ("--cache", "always")),
        Mode("cache-never", "pyvirtiofsd --cache never", "pyvirtiofsd", ("--cache", "never")),
        Mode("cache-metadata", "pyvirtiofsd --cache metadata", "pyvirtiofsd",
             ("--cache", "metadata")),
        Mode("writeback", "pyvirtiofsd --writeback", "pyvirtiofsd", ("--writeback",)),
    )
}
PYVIRTIOFSD_MODES = [n for n, m in MODES.items() if m.daemon == "pyvirtiofsd"]

GUEST_SCRIPT = f"""
mount -t virtiofs myfs /mnt || {{ echo "@@MOUNT-FAILED"; exit 1; }}
hostrun python3 {SUITE} /mnt --fsx {FSX_OPS} --seed {FSX_SEED}
echo "@@PYTHON-RC $?"
umount /mnt
"""


@dataclass
class SuiteRun:
    mode: Mode
    guest: GuestRun
    daemon_log: str
    results: dict[str, str] = field(default_factory=dict)
    fsx: dict[str, str] = field(default_factory=dict)
    fsx_mismatch_lines: list[str] = field(default_factory=list)
    suite_ended: bool = False
    fsx_ended: bool = False
    python_rc: int | None = None
    duplicates: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"{self.mode.label}: python rc={self.python_rc} suite_ended={self.suite_ended} "
                f"fsx_ended={self.fsx_ended}\n--- script output ---\n"
                f"{self.guest.script_output}\n--- guest ---\n{self.guest.describe()}\n"
                f"--- daemon log (tail) ---\n{self.daemon_log[-4000:]}")


def parse(run: SuiteRun) -> SuiteRun:
    for line in run.guest.script_output.splitlines():
        if line.startswith("@@SUITE-END"):
            run.suite_ended = True
        elif line.startswith("@@PYTHON-RC "):
            run.python_rc = int(line.split()[1])
        elif line == "fsx.end":
            run.fsx_ended = True
        elif line.startswith("fsx.mismatch "):
            run.fsx_mismatch_lines.append(line)
        elif line.startswith("fsx."):
            key, _, value = line.partition(" ")
            run.fsx[key] = value
        elif " " in line and not line.startswith("@@"):
            key, _, value = line.partition(" ")
            if key in run.results:
                run.duplicates.append(key)
            run.results[key] = value
    return run


@contextlib.contextmanager
def _daemon(mode: Mode, share: Path, sock: Path) -> Iterator[Callable[[], str]]:
    """Start the daemon of ``mode``; yields a function returning its log."""
    if mode.daemon == "pyvirtiofsd":
        with pyvirtiofsd(share, sock, *mode.args) as proc:
            yield lambda: daemon_log(proc)
    elif mode.daemon == "c":
        with reference.c_virtiofsd(share, sock) as proc:
            log = Path(proc.log_path)  # type: ignore[attr-defined]
            yield lambda: log.read_text(errors="replace")
    else:
        rust = RustVirtiofsd()
        rust.start(share, sock)
        try:
            yield rust.log
        finally:
            rust.stop()


def run_mode(mode: Mode) -> SuiteRun:
    """Boot one guest against a fresh daemon of ``mode`` on a fresh share, run everything."""
    work = Path(tempfile.mkdtemp(prefix=f"pyvfs-conformance-{mode.name}-"))
    try:
        share = work / "share"
        share.mkdir()
        share.chmod(0o755)
        sock = work / "vfs.sock"
        with _daemon(mode, share, sock) as log:
            guest = run_guest(sock, GUEST_SCRIPT, kernel="6.1", smp=1, num_request_queues=1,
                              host_root_9p=True, timeout=GUEST_TIMEOUT)
            text = log()
        return parse(SuiteRun(mode=mode, guest=guest, daemon_log=text))
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Runs:
    """Lazily boots each mode once per pytest session."""

    def __init__(self) -> None:
        self._runs: dict[str, SuiteRun] = {}

    def get(self, name: str) -> SuiteRun:
        if name not in self._runs:
            self._runs[name] = run_mode(MODES[name])
        return self._runs[name]


def diff(expected: dict[str, str], got: dict[str, str]) -> list[str]:
    """Human-readable lines for every check whose result is not the expected one."""
    out = []
    for key in sorted(set(expected) | set(got)):
        want, have = expected.get(key, "<not expected>"), got.get(key, "<missing>")
        if want != have:
            out.append(f"  {key}: expected {want!r}, got {have!r}")
    return out
