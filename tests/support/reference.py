"""Reference virtio-fs daemons, to prove the harness and for differential tests.

Which ones a Debian release has:

* C virtiofsd comes with QEMU 7.2 on Debian 12 (``/usr/lib/qemu/virtiofsd``, package
  qemu-system-common). QEMU 8.0 dropped it, so Debian 13 has none.
* Rust virtiofsd is the package ``virtiofsd`` from Debian 13 on (``/usr/libexec/virtiofsd``).
  Debian 12 has none: trixie's package and the libraries it needs are unpacked with
  ``dpkg -x`` into ``<cache>/rust-virtiofsd`` and started through trixie's own loader (see
  :func:`fetch_rust_virtiofsd`).

A test that asks for C virtiofsd on a release without it gets Rust virtiofsd in its place,
and says so: a :class:`ReferenceNotInRelease` warning (listed in pytest's warnings summary)
and a line on its standard output. Both serve exactly one request queue and exit when the
front-end disconnects, so start a fresh one per guest run.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from tests.support import assets, debian

C_VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")


def c_virtiofsd_present() -> bool:
    """QEMU 7.2's C virtiofsd is a file at C_VIRTIOFSD. Debian 13's qemu-system-common
    keeps the path as a link to Rust virtiofsd (/usr/libexec/virtiofsd), which is not it."""
    return C_VIRTIOFSD.is_file() and not C_VIRTIOFSD.is_symlink()
RUST_VIRTIOFSD = Path("/usr/libexec/virtiofsd")
RUST_VERSION = "1.13.2"
#: the release Rust virtiofsd is taken from where the host's has none, and what it needs
RUST_FROM = "trixie"
RUST_PACKAGES = ["virtiofsd", "libc6", "libseccomp2", "libcap-ng0", "libgcc-s1"]


class ReferenceNotInRelease(UserWarning):
    """The reference daemon a test names is not part of this Debian release; the message
    says what the test used instead."""


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """Terminate a daemon (SIGTERM, then SIGKILL) and return its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def wait_for_socket(proc: subprocess.Popen[bytes], socket_path: Path, timeout: float) -> None:
    """Wait until ``socket_path`` exists; raise (with the daemon's log) if it dies or is slow."""
    deadline = time.monotonic() + timeout
    while not socket_path.is_socket():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_daemon(proc)
            log = getattr(proc, "log_path", None)
            text = Path(log).read_text(errors="replace") if log else ""
            raise RuntimeError(
                f"daemon {proc.args!r} did not create {socket_path} "
                f"(exit code {proc.returncode}):\n{text}"
            )
        time.sleep(0.02)


def say(message: str) -> None:
    """Tell the test's output that a reference daemon came from elsewhere."""
    print(f"reference daemon: {message}")
    warnings.warn(ReferenceNotInRelease(message), stacklevel=3)


# --------------------------------------------------------------------------- Rust virtiofsd


def rust_cache() -> Path:
    return assets.cache_dir() / "rust-virtiofsd"


def _loader_dir(root: Path) -> Path:
    return root / "usr" / "lib" / "x86_64-linux-gnu"


def fetched_rust_command(root: Path) -> list[str]:
    """Trixie's virtiofsd under ``root``, started through trixie's loader and libraries."""
    lib = _loader_dir(root)
    return [str(lib / "ld-linux-x86-64.so.2"), "--library-path", str(lib),
            str(root / "usr" / "libexec" / "virtiofsd")]


def fetch_rust_virtiofsd(root: Path | None = None, quiet: bool = True) -> Path:
    """Download and unpack Rust virtiofsd with trixie's libraries (once); return the root.

    For a release without a ``virtiofsd`` package (Debian 12): the trixie source comes from
    the machine's own mirror, pinned to priority 1 (:func:`debian.ensure_suite`)."""
    root = root or rust_cache()
    binary = root / "usr" / "libexec" / "virtiofsd"
    if binary.exists():
        return root
    out = subprocess.DEVNULL if quiet else None
    debs = root.parent / "rust-virtiofsd-debs"
    debs.mkdir(parents=True, exist_ok=True)
    with assets.file_lock("apt"):
        if binary.exists():
            return root
        source = debian.ensure_suite(RUST_FROM)
        cmd = ["apt-get", "download", *(f"{p}/{RUST_FROM}" for p in RUST_PACKAGES)]
        if subprocess.run(cmd, cwd=debs, stdout=out, stderr=out).returncode != 0:
            debian.update_source(source.file)  # the lists may be missing or stale
            subprocess.run(cmd, cwd=debs, check=True, stdout=out, stderr=out)
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    version = subprocess.run([*fetched_rust_command(root), "--version"], capture_output=True,
                             text=True, check=True).stdout.strip()
    if RUST_VERSION not in version:
        print(f"warning: expected virtiofsd {RUST_VERSION}, got {version!r}", file=sys.stderr)
    return root


def rust_is_packaged(release: str | None = None) -> bool:
    """Whether the release has a ``virtiofsd`` package (Debian 13 on; not Debian 12)."""
    release = debian.host_release() if release is None else release
    return release != "bookworm"


def rust_command() -> list[str]:
    """How to start Rust virtiofsd here: the release's package (installed with apt if
    missing), or trixie's unpacked with its own libc where the release has none."""
    if RUST_VIRTIOFSD.exists():
        return [str(RUST_VIRTIOFSD)]
    if rust_is_packaged():
        with assets.file_lock("apt"):
            debian.install(["virtiofsd"])
        return [str(RUST_VIRTIOFSD)]
    return fetched_rust_command(fetch_rust_virtiofsd())


def rust_origin() -> str:
    """Where Rust virtiofsd comes from here, for reports."""
    if rust_is_packaged():
        return f"Debian {debian.host_release()} package virtiofsd, {RUST_VIRTIOFSD}"
    return f"{RUST_FROM}'s package, unpacked with {RUST_FROM}'s libc into {rust_cache()}"


def rust_version() -> str:
    out = subprocess.run([*rust_command(), "--version"], capture_output=True, text=True)
    return (out.stdout + out.stderr).strip().splitlines()[0] if out.returncode == 0 else "?"


def note_rust_origin() -> None:
    """Say where Rust virtiofsd came from when the release has no package of its own."""
    if not rust_is_packaged():
        say(f"Rust virtiofsd is not packaged in Debian {debian.host_release()}: "
            f"using {rust_version()} from {rust_origin()}")


# --------------------------------------------------------------------------- C virtiofsd


def c_virtiofsd_command(shared_dir: str | Path, socket_path: Path,
                        cache: str = "auto") -> list[str]:
    """C virtiofsd's command line; where the release has none, Rust virtiofsd's with the
    same meaning (its ``--sandbox none`` as the tests' pyvirtiofsd), and the test says so."""
    if c_virtiofsd_present():
        return [
            str(C_VIRTIOFSD), f"--socket-path={socket_path}",
            "-o", f"source={shared_dir}", "-o", f"cache={cache}",
        ]  # fmt: skip
    if debian.host_release() == "bookworm":
        raise RuntimeError(
            f"{C_VIRTIOFSD} not found: apt-get install -y qemu-system-x86 (qemu-system-common)"
        )
    command = rust_command()
    say(f"C virtiofsd is not part of Debian {debian.host_release()} (QEMU 8.0 dropped it): "
        f"this test used {rust_version()} ({rust_origin()}) in its place")
    rust_cache_mode = {"none": "never"}.get(cache, cache)
    return [*command, f"--socket-path={socket_path}", f"--shared-dir={shared_dir}",
            f"--cache={rust_cache_mode}", "--sandbox=none"]


def start_c_virtiofsd(
    shared_dir: str | Path, socket_path: str | Path, cache: str = "auto"
) -> subprocess.Popen[bytes]:
    """Start QEMU 7.2's C virtiofsd (or Rust virtiofsd in its place, see
    :func:`c_virtiofsd_command`) and return once its socket is listening.

    Its stderr goes to ``<socket_path>.log`` (also stored as ``proc.log_path``).
    """
    socket_path = Path(socket_path)
    socket_path.unlink(missing_ok=True)
    log_path = Path(f"{socket_path}.log")
    cmd = c_virtiofsd_command(shared_dir, socket_path, cache)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    proc.log_path = log_path  # type: ignore[attr-defined]
    wait_for_socket(proc, socket_path, timeout=10.0)
    return proc


@contextlib.contextmanager
def c_virtiofsd(
    shared_dir: str | Path, socket_path: str | Path, cache: str = "auto"
) -> Iterator[subprocess.Popen[bytes]]:
    """C virtiofsd for the duration of a ``with`` block; always stopped afterwards."""
    proc = start_c_virtiofsd(shared_dir, socket_path, cache)
    try:
        yield proc
    finally:
        stop_daemon(proc)
