"""Boot a throwaway Linux guest under QEMU (TCG) with a vhost-user-fs-pci device.

:func:`run_guest` is the one entry point: it connects QEMU to a vhost-user socket served by the
daemon under test, boots a Debian kernel with a busybox initramfs, runs a shell script in the
guest and returns what it printed and its exit code.  KVM is never used (it hangs here).
The kernel is booted as an uncompressed vmlinux through its PVH entry when possible, which
saves about 3 s of in-guest xz decompression under TCG (see ``assets.boot_image``); a boot
to the first line of the script takes about 3 s for both 6.1 and 6.12.

What the guest script sees:

- It runs as root under busybox ``sh`` (ash), with ``cwd=/`` and stdin from ``/dev/null``;
  stdout and stderr are merged.  ``/proc``, ``/sys``, ``/dev`` (devtmpfs), and tmpfs ``/tmp`` and
  ``/run`` are mounted; ``/mnt`` and ``/host`` are empty directories.
- Every busybox applet is on ``PATH`` (sh, mount, umount, cat, ls, stat, dd, cmp, md5sum,
  sha256sum, find, grep, sed, awk, xxd, hexdump, truncate, fallocate, sync, timeout, ...).
  There is no ``mountpoint``; use ``grep ' /mnt ' /proc/mounts``.
- The virtio-fs modules are loaded, so ``mount -t virtiofs <tag> /mnt`` works (the default tag
  is ``myfs``).  The script must mount it itself: tests choose mount options.
- With ``host_root_9p=True`` the host's ``/`` is mounted read-only on ``/host`` (QEMU virtio-9p)
  and ``hostrun CMD...`` runs CMD chrooted there (python3, fio, ... from the host), with the
  guest's /proc, /sys, /dev, a tmpfs /tmp and the guest's ``/mnt`` (if mounted) bound in,
  and the host's ``/usr/local/bin`` first on PATH.  Startup over 9p is slow (python3 -c about
  1 s under TCG).
- Kernel messages at warning level and above still go to the console, so ``GuestRun.output``
  may contain them; ``GuestRun.script_output`` comes from a second serial port that only the
  script writes to (raw, no ``\\r\\n`` translation).
- After the script, init prints ``@@GUEST-EXIT rc=N@@``, syncs and powers off.  The virtio-fs
  mount is not unmounted, so the daemon sees the front-end disconnect without a DESTROY
  unless the script runs ``umount /mnt`` itself.
"""

from __future__ import annotations

import codecs
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support import assets
from tests.support.qemu10 import Qemu

QEMU = "qemu-system-x86_64"


@dataclass
class GuestRun:
    """Result of one guest boot: console text, script output, and exit codes."""

    output: str
    script_output: str
    rc: int | None
    qemu_returncode: int | None
    qemu_stderr: str = ""
    timed_out: bool = False
    boot_seconds: float | None = None
    script_seconds: float | None = None
    total_seconds: float = 0.0

    def describe(self) -> str:
        """Everything useful for an assertion message when a guest run went wrong."""
        return (
            f"rc={self.rc} qemu_returncode={self.qemu_returncode} timed_out={self.timed_out}\n"
            f"--- qemu stderr ---\n{self.qemu_stderr}\n--- console ---\n{self.output}"
        )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill QEMU (it runs in its own session) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def qemu_command(
    *,
    kernel: assets.KernelAssets,
    initrd: Path,
    socket_path: str | Path,
    script_out: Path,
    tag: str,
    num_request_queues: int,
    smp: int,
    memory_mb: int,
    queue_size: int,
    host_root_9p: bool,
    qemu: Qemu | None = None,
) -> list[str]:
    """The QEMU command line for one guest (exposed so tests and demos can show it);
    ``qemu``: another QEMU than the system's (migration tests: tests/support/qemu10.py)."""
    append = "console=ttyS0 quiet panic=-1"
    device = f"vhost-user-fs-pci,queue-size={queue_size},chardev=char0,tag={tag}"
    if num_request_queues != 1:
        device += f",num-request-queues={num_request_queues}"
    cmd = [
        # One TCG thread for all vCPUs: with multi-threaded TCG a 6.12 guest with 2 vCPUs
        # now and then oopses on an int3 while the kernel patches its own text at boot
        # (seen in CI: sched_clock_cpu). The guest still has 2 CPUs and uses 2 queues.
        *(qemu.command() if qemu else [QEMU]), "-accel", "tcg,thread=single",
        "-M", "q35", "-cpu", "max", "-smp", str(smp), "-m", str(memory_mb),
        "-nographic", "-no-reboot", "-nic", "none",  # no NIC: skips iPXE's boot ROM
        "-kernel", str(assets.boot_image(kernel)), "-initrd", str(initrd),
        "-chardev", f"socket,id=char0,path={socket_path}",
        "-device", device,
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-numa", "node,memdev=mem",
        # ttyS0 is the console (the -nographic default, but any -serial replaces that default);
        # ttyS1 only carries the script's output.
        "-serial", "mon:stdio", "-serial", f"file:{script_out}",
    ]  # fmt: skip
    if host_root_9p:
        append += " " + assets.HOST_ROOT_CMDLINE
        cmd += [
            "-virtfs",
            f"local,path=/,mount_tag={assets.HOST_ROOT_TAG},security_model=none,readonly=on,"
            "multidevs=remap",
        ]
    return [*cmd, "-append", append]


def run_guest(
    socket_path: str | Path,
    script: str,
    *,
    tag: str = "myfs",
    kernel: str = "6.1",
    num_request_queues: int = 1,
    smp: int = 1,
    memory_mb: int = 512,
    queue_size: int = 1024,
    timeout: float = 300,
    host_root_9p: bool = False,
    initramfs_files: dict[str, bytes] | None = None,
    on_script_output: Callable[[str], None] | None = None,
    qemu: Qemu | None = None,
) -> GuestRun:
    """Boot a guest against the vhost-user socket, run ``script`` with sh, and power off.

    Never leaves QEMU behind: it is killed on timeout and on any exception (including
    KeyboardInterrupt).  ``rc`` is None when the script's end marker never appeared.
    ``initramfs_files`` adds files (guest path -> contents) to the cached base initramfs:
    cheaper than reading them over 9p at every boot for large programs.
    ``on_script_output`` is called from the polling loop (every 50 ms) with each new piece
    of the script's output, so a caller can follow the script while it runs.
    ``qemu``: run another QEMU than the system's (tests/support/qemu10.py).
    """
    assets.ensure_host_packages()
    kassets = assets.ensure_kernel(kernel)
    base = assets.build_initramfs(kassets, initramfs_files)
    with tempfile.TemporaryDirectory(prefix="pyvfs-guest-") as tmp:
        work = Path(tmp)
        initrd = work / "initrd.cpio"
        with open(initrd, "wb") as fh:
            fh.write(base.read_bytes())
            fh.write(assets.build_run_archive(script))
        console = work / "console.log"
        script_out = work / "script.out"
        stderr_path = work / "qemu.stderr"
        script_out.touch()
        cmd = qemu_command(
            kernel=kassets, initrd=initrd, socket_path=socket_path, script_out=script_out,
            tag=tag, num_request_queues=num_request_queues, smp=smp, memory_mb=memory_mb,
            queue_size=queue_size, host_root_9p=host_root_9p, qemu=qemu,
        )  # fmt: skip
        start = time.monotonic()
        boot_seconds = script_seconds = None
        timed_out = False
        start_marker = assets.START_MARKER.encode()
        exit_marker = b"@@GUEST-EXIT rc="
        seen_out = 0
        decoder = codecs.getincrementaldecoder("utf-8")("replace")

        def follow() -> None:
            nonlocal seen_out
            if on_script_output is None:
                return
            with open(script_out, "rb") as fh:
                fh.seek(seen_out)
                new = fh.read()
            if new:
                seen_out += len(new)
                on_script_output(decoder.decode(new))

        with open(console, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                env=qemu.env() if qemu else None,
            )
            try:
                deadline = start + timeout
                while proc.poll() is None:
                    now = time.monotonic()
                    if now >= deadline:
                        timed_out = True
                        break
                    if boot_seconds is None or script_seconds is None:
                        seen = console.read_bytes()
                        if boot_seconds is None and start_marker in seen:
                            boot_seconds = now - start
                        if boot_seconds is not None and exit_marker in seen:
                            script_seconds = now - start - boot_seconds
                    follow()
                    time.sleep(0.05)
            finally:
                _kill_group(proc)
            follow()
        total = time.monotonic() - start
        text = console.read_bytes().decode("utf-8", "replace").replace("\r\n", "\n")
        match = assets.EXIT_MARKER_RE.search(text)
        if boot_seconds is None and assets.START_MARKER in text:
            boot_seconds = total  # booted and finished between two polls
        if script_seconds is None and match:
            script_seconds = total - boot_seconds  # finished between two polls
        return GuestRun(
            output=text,
            script_output=script_out.read_bytes().decode("utf-8", "replace"),
            rc=int(match.group(1)) if match else None,
            qemu_returncode=proc.returncode,
            qemu_stderr=stderr_path.read_text(errors="replace"),
            timed_out=timed_out,
            boot_seconds=boot_seconds,
            script_seconds=script_seconds,
            total_seconds=total,
        )
