"""A test VM that boots a real systemd as PID 1, to test the shipped units under it.

The container the tests run in has no systemd as PID 1, but its root holds an installed
systemd (Debian's ``systemd`` package). The VM (TCG, the 6.12 guest kernel) shares that
root: QEMU exports the host's ``/`` read-only over virtio-9p, a tiny initramfs ``/init``
puts a tmpfs overlay on top of it (overlayfs), copies the test's files into the overlay,
mounts a tmpfs on ``/srv/virtiofs`` (the shared directories) and switch_roots into
``/lib/systemd/systemd``. So the VM runs the host's systemd, Python and this very work tree
(at the same absolute path), without an image to build.

What is in the overlay (``/etc`` and ``/usr/local/bin``):

- ``packaging/pyvirtiofsd@.service``, ``pyvirtiofsd@.socket`` and
  ``pyvirtiofsd-metrics@.service``/``.timer`` as shipped, in ``/etc/systemd/system``,
  and ``/usr/local/bin/pyvirtiofsd`` (the path the units name): a two-line launcher for
  this tree with the test's Python;
- ``pyvfs-agent.service``, the command server (tests/support/systemd/agent.py) on a
  virtio-serial port: :meth:`SystemdVM.sh` and :meth:`SystemdVM.py` talk to it;
- ``pyvfs-test.target``, the boot target (``systemd.unit=``): sysinit, basic and the
  agent, nothing of multi-user.target;
- masks for what is slow or means nothing here (udev, getty, timers, timesyncd, fsck,
  utmp, ...) and an empty fstab.

Boot once per test module (a fixture); it takes about 10 s to the agent's first answer
on an idle machine (``boot_seconds``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support import assets, debian

TREE = Path(__file__).resolve().parents[3]
AGENT_PORT = "pyvfs.agent"
KERNEL = "6.12"
MODULES = ("9pnet_virtio", "9p", "overlay")

#: Units that cost boot time or mean nothing in a throwaway VM without disks or network.
MASKED = (
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service",
    "systemd-hwdb-update.service", "systemd-timesyncd.service", "systemd-pstore.service",
    "systemd-random-seed.service", "systemd-journal-flush.service",
    "systemd-update-utmp.service", "systemd-update-utmp-runlevel.service",
    "systemd-firstboot.service", "systemd-machine-id-commit.service",
    "systemd-sysusers.service", "systemd-modules-load.service", "systemd-binfmt.service",
    "systemd-remount-fs.service", "systemd-fsck-root.service", "systemd-repart.service",
    "systemd-pcrphase.service", "systemd-pcrphase-sysinit.service", "ldconfig.service",
    "systemd-ask-password-console.path", "systemd-ask-password-wall.path",
    "proc-sys-fs-binfmt_misc.automount", "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount", "sys-kernel-config.mount", "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount", "cryptsetup.target", "integritysetup.target",
    "veritysetup.target", "getty.target", "getty@tty1.service", "serial-getty@ttyS0.service",
    "console-getty.service", "timers.target", "dbus.socket", "dbus.service",
    "systemd-logind.service", "remote-fs.target", "swap.target", "e2scrub_reap.service",
    "postgresql.service", "kmod-static-nodes.service", "systemd-initctl.socket",
    "systemd-journald-audit.socket", "apt-daily.timer", "apt-daily-upgrade.timer",
    "systemd-tmpfiles-setup.service", "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.timer", "systemd-user-sessions.service",
)  # fmt: skip

INIT = r"""#!/bin/sh
# pyvirtiofsd systemd test VM: host / (9p, ro) + tmpfs overlay, then systemd as PID 1.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/pyvfs/modules); do
    insmod /lib/modules/pyvfs/$m.ko || echo "@@PYVFS-INSMOD-FAILED $m@@"
done
mkdir -p /lower /rw /newroot
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose \
    HOSTROOT_TAG /lower || echo "@@PYVFS-HOSTROOT-FAILED@@"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || echo "@@PYVFS-OVERLAY-FAILED@@"
cp -a /overlay/. /newroot/
# the host's own /run and /tmp mean nothing here (and tmpfiles would walk /tmp over 9p);
# /.dockerenv would make systemd think it runs in a container and ignore the kernel's
# command line (systemd.unit=)
rm -f /newroot/.dockerenv /newroot/run/.containerenv
mkdir -p /newroot/srv/virtiofs
for d in run tmp var/tmp srv/virtiofs; do mount -t tmpfs -o mode=0755 tmpfs /newroot/$d; done
chmod 1777 /newroot/tmp /newroot/var/tmp
for d in dev proc sys; do mount --move /$d /newroot/$d; done
echo "@@PYVFS-SWITCH-ROOT@@"
exec switch_root /newroot /lib/systemd/systemd
"""

TARGET = """[Unit]
Description=pyvirtiofsd systemd test VM
Requires=sysinit.target basic.target pyvfs-agent.service
After=sysinit.target basic.target
AllowIsolate=yes
"""

AGENT = """[Unit]
Description=pyvirtiofsd test agent (commands from the host over virtio-serial)
DefaultDependencies=no

[Service]
Environment=PYVFS_TREE={tree} PYTHONDONTWRITEBYTECODE=1
WorkingDirectory={tree}
ExecStart={python} {tree}/tests/support/systemd/agent.py
Restart=always
"""

LAUNCHER = """#!/bin/sh
# pyvirtiofsd from the work tree {tree}, for the systemd test VM
PYTHONPATH={tree} exec {python} -m pyvirtiofsd "$@"
"""


#: What the VM takes from the host's root, by a file each package provides (.ci/setup
#: installs them; a stock Debian minbase has neither).
HOST_PACKAGES = {"/lib/systemd/systemd": "systemd", "/usr/bin/pgrep": "procps"}


def ensure_host_systemd() -> None:
    """Install (via apt) systemd and procps where the host lacks them."""
    missing = sorted({pkg for path, pkg in HOST_PACKAGES.items() if not Path(path).exists()})
    if missing:
        with assets.file_lock("apt"):
            debian.install(missing)


class AgentError(RuntimeError):
    """A command in the VM failed, or the VM stopped answering."""


def _base_initramfs(kernel: assets.KernelAssets) -> Path:
    """busybox, the 9p and overlay modules and /init (cached like the guests' base)."""
    busybox = assets.busybox_path()
    order = assets.module_load_order(kernel, MODULES)
    init = INIT.replace("HOSTROOT_TAG", assets.HOST_ROOT_TAG)
    digest = hashlib.sha256(init.encode() + kernel.version.encode())
    digest.update(hashlib.sha256(busybox.read_bytes()).digest())
    name = f"systemd-{kernel.version}-{digest.hexdigest()[:16]}.cpio"
    target = assets.cache_dir() / "initramfs" / name
    target.parent.mkdir(exist_ok=True)
    with assets.file_lock("initramfs"):
        if target.exists():
            return target
        cpio = assets.CpioWriter()
        for d in "bin sbin proc sys dev etc/pyvfs lib/modules/pyvfs".split():
            cpio.mkdir(d)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in "sh mount mkdir cp cat rm chmod insmod switch_root echo".split():
            cpio.symlink(f"bin/{applet}", "/bin/busybox")
        cpio.file("init", init.encode(), 0o755)
        for name, path in order:
            cpio.file(f"lib/modules/pyvfs/{name}.ko", assets._decompress_module(path))
        cpio.file("etc/pyvfs/modules", "".join(f"{n}\n" for n, _ in order).encode())
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cpio.finish())
        tmp.rename(target)
    return target


def overlay_archive(extra_units: dict[str, str] | None = None) -> bytes:
    """The per-boot cpio with /overlay/: what init copies over the host's root."""
    python = sys.executable
    cpio = assets.CpioWriter()
    units = "overlay/etc/systemd/system"
    for name in ("pyvirtiofsd@.service", "pyvirtiofsd@.socket",
                 "pyvirtiofsd-metrics@.service", "pyvirtiofsd-metrics@.timer"):
        cpio.file(f"{units}/{name}", (TREE / "packaging" / name).read_bytes())
    cpio.file(f"{units}/pyvfs-test.target", TARGET.encode())
    cpio.file(f"{units}/pyvfs-agent.service",
              AGENT.format(tree=TREE, python=python).encode())
    for name, text in (extra_units or {}).items():
        cpio.file(f"{units}/{name}", text.encode())
    for name in MASKED:
        cpio.symlink(f"{units}/{name}", "/dev/null")
    cpio.file("overlay/usr/local/bin/pyvirtiofsd",
              LAUNCHER.format(tree=TREE, python=python).encode(), 0o755)
    cpio.file("overlay/etc/fstab", b"")
    cpio.file("overlay/etc/machine-id", b"0123456789abcdef0123456789abcdef\n")
    return cpio.finish()


class SystemdVM:
    """One booted VM; :meth:`sh` and :meth:`py` run commands in it through the agent."""

    def __init__(self, *, memory_mb: int = 1024, smp: int = 1,
                 extra_units: dict[str, str] | None = None) -> None:
        self.memory_mb = memory_mb
        self.smp = smp
        self.extra_units = extra_units
        self.proc: subprocess.Popen[bytes] | None = None
        self.boot_seconds: float | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="pyvfs-systemd-vm-")
        self.work = Path(self._tmp.name)
        self.console = self.work / "console.log"
        self._conn: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0

    def qemu_command(self, kernel: assets.KernelAssets, initrd: Path, agent: Path) -> list[str]:
        append = (f"console=ttyS0 quiet panic=-1 {assets.HOST_ROOT_CMDLINE} "
                  "systemd.unit=pyvfs-test.target systemd.show_status=error "
                  "systemd.journald.forward_to_console=0")
        return [
            "qemu-system-x86_64", "-accel", "tcg,thread=single", "-M", "q35", "-cpu", "max",
            "-smp", str(self.smp), "-m", str(self.memory_mb), "-nographic", "-no-reboot",
            "-nic", "none", "-kernel", str(assets.boot_image(kernel)), "-initrd", str(initrd),
            "-serial", "mon:stdio",
            "-virtfs", f"local,path=/,mount_tag={assets.HOST_ROOT_TAG},security_model=none,"
                       "readonly=on,multidevs=remap",
            "-device", "virtio-serial-pci,id=vser",
            "-chardev", f"socket,id=agent,path={agent}",
            "-device", f"virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT}",
            "-append", append,
        ]  # fmt: skip

    def start(self, timeout: float = 180) -> SystemdVM:
        """Boot and wait for the agent's first line (``boot_seconds``)."""
        assets.ensure_host_packages()
        ensure_host_systemd()
        kernel = assets.ensure_kernel(KERNEL)
        initrd = self.work / "initrd.cpio"
        initrd.write_bytes(_base_initramfs(kernel).read_bytes()
                           + overlay_archive(self.extra_units))
        agent = self.work / "agent.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(agent))
        listener.listen(1)
        start = time.monotonic()
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen(
                self.qemu_command(kernel, initrd, agent), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            listener.settimeout(30)
            self._conn, _ = listener.accept()
            listener.close()
            ready = self._read_line(timeout)
            if not ready.get("ready"):
                raise AgentError(f"agent said {ready} first")
        except BaseException:
            self.close()
            raise
        self.boot_seconds = time.monotonic() - start
        return self

    def _read_line(self, timeout: float) -> dict:
        assert self._conn is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                raise AgentError(f"no answer from the VM within {timeout} s\n"
                                 f"--- console ---\n{self.console_text()[-6000:]}")
            self._conn.settimeout(min(left, 0.5))
            try:
                chunk = self._conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise AgentError("the VM closed the agent channel\n--- console ---\n"
                                 + self.console_text()[-6000:])
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _request(self, request: dict, timeout: float) -> dict:
        assert self._conn is not None, "the VM is not started"
        self._next_id += 1
        request["id"] = self._next_id
        self._conn.sendall(json.dumps(request).encode() + b"\n")
        answer = self._read_line(timeout)
        if answer.get("id") != request["id"]:
            raise AgentError(f"answer {answer} to request {request['id']}")
        return answer

    def run(self, command: str, timeout: float = 60) -> tuple[int | None, str]:
        """Exit status (None on timeout) and merged output of a shell command."""
        answer = self._request({"sh": command, "timeout": timeout}, timeout + 10)
        return answer["rc"], answer["out"]

    def sh(self, command: str, timeout: float = 60) -> str:
        """Output of a shell command that must succeed."""
        rc, out = self.run(command, timeout)
        if rc != 0:
            raise AgentError(f"in the VM: {command!r} exited {rc}:\n{out}")
        return out

    def py(self, code: str, timeout: float = 60) -> object:
        """Run Python in the agent's lasting namespace; the final expression's value."""
        answer = self._request({"py": code}, timeout)
        if "error" in answer:
            raise AgentError(f"in the VM's Python:\n{answer['error']}")
        return answer["value"]

    def journal(self, unit: str, lines: int = 60) -> str:
        """The unit's journal, for assertion messages."""
        _rc, out = self.run(f"journalctl --no-pager -o short-monotonic -n {lines} -u "
                            + shlex.quote(unit), 30)
        return out

    def console_text(self) -> str:
        return self.console.read_bytes().decode("utf-8", "replace").replace("\r\n", "\n")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._tmp.cleanup()

    def __enter__(self) -> SystemdVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
