"""End-to-end proof of the guest harness, using QEMU 7.2's C virtiofsd as the daemon.

If these fail, the harness (or the machine) is broken, not pyvirtiofsd.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import reference, vm

HOST_CONTENT = "hello from the host\nsecond line: ünïcode\n"
GUEST_BYTES = bytes(range(256)) * 4  # every byte value, including NUL and newline


def _printf_escape(data: bytes) -> str:
    """A busybox-printf format string (octal escapes) that prints exactly ``data``."""
    return "".join(f"\\{b:03o}" for b in data)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for the vhost-user socket (AF_UNIX paths are limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="pyvfs-", dir="/tmp") as tmp:
        yield Path(tmp)


def _read_write_list(shared: Path, socket: Path, kernel: str, smp: int) -> vm.GuestRun:
    """Mount the share in a guest, read a host file, write one back, list the directory."""
    (shared / "hello.txt").write_text(HOST_CONTENT)
    script = f"""
set -e
mount -t virtiofs myfs /mnt
echo "kernel=$(uname -r) cpus=$(nproc)"
echo "--- cat"
cat /mnt/hello.txt
echo "--- end cat"
printf '{_printf_escape(GUEST_BYTES)}' > /mnt/from-guest.bin
sync
echo "size=$(stat -c %s /mnt/from-guest.bin)"
echo "--- ls"
ls -1 /mnt
echo "--- end ls"
umount /mnt
"""
    with reference.c_virtiofsd(shared, socket):
        run = vm.run_guest(socket, script, kernel=kernel, smp=smp, num_request_queues=1)
    print(
        f"kernel {kernel}: boot-to-script {run.boot_seconds}s, script {run.script_seconds}s, "
        f"total {run.total_seconds:.2f}s"
    )
    return run


def _check(run: vm.GuestRun, shared: Path, kernel_prefix: str, smp: int) -> None:
    out = run.script_output
    assert run.rc == 0, run.describe()
    assert run.qemu_returncode == 0, run.describe()
    assert out.startswith(f"kernel={kernel_prefix}"), out
    assert f" cpus={smp}\n" in out, out
    cat = out.split("--- cat\n", 1)[1].split("--- end cat\n", 1)[0]
    assert cat == HOST_CONTENT
    assert f"size={len(GUEST_BYTES)}\n" in out
    listing = out.split("--- ls\n", 1)[1].split("--- end ls\n", 1)[0].split()
    assert sorted(listing) == ["from-guest.bin", "hello.txt"]
    assert (shared / "from-guest.bin").read_bytes() == GUEST_BYTES
    assert run.boot_seconds is not None


@pytest.mark.guest
def test_e2e_harness_c_virtiofsd_linux61(tmp_path: Path, sock_dir: Path) -> None:
    """Debian 12's 6.1 guest reads, writes and lists through C virtiofsd."""
    run = _read_write_list(tmp_path, sock_dir / "vfs.sock", "6.1", smp=1)
    _check(run, tmp_path, "6.1.", smp=1)


@pytest.mark.guest
def test_e2e_harness_c_virtiofsd_linux612_smp2(tmp_path: Path, sock_dir: Path) -> None:
    """The backports 6.12 guest on 2 vCPUs (one request queue: C virtiofsd serves only one)."""
    run = _read_write_list(tmp_path, sock_dir / "vfs.sock", "6.12", smp=2)
    _check(run, tmp_path, "6.12.", smp=2)
