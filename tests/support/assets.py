"""Guest assets for end-to-end tests: kernels, busybox, initramfs images.

Everything is fetched from the Debian apt mirrors (the only network we have) and cached under
``$PYVIRTIOFSD_CACHE`` (default ``~/.cache/pyvirtiofsd``) so that only the first run pays for
downloads.  All builders take a file lock, so several pytest processes (``pytest -n``, or
parallel CI jobs sharing a cache) can call them at once.

Kernels come as Debian ``linux-image-*`` packages, fetched with ``apt-get download`` and unpacked
with ``dpkg -x`` (never installed), from the host's release or another Debian suite
(:func:`kernel_suite`, added with :mod:`tests.support.debian`).  The initramfs is written in
Python (cpio "newc"), so the host needs neither ``cpio`` nor ``gzip``.  It is split in two: a
cached base image (busybox, modules, ``/init``) and a tiny per-run archive with the guest
script, which :func:`build_run_archive` appends (Linux unpacks concatenated cpio archives
from one initrd).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support import debian


def host_apt_packages(release: str | None = None) -> dict[str, str]:
    """The Debian packages the host needs to boot guests, by a file each provides: QEMU,
    busybox-static, zstd, and the reference daemon of the release (C virtiofsd comes with
    QEMU 7.2 on Debian 12; from Debian 13 on it is gone and Rust virtiofsd is packaged)."""
    release = debian.host_release() if release is None else release
    packages = {
        "qemu-system-x86_64": "qemu-system-x86",
        "/bin/busybox": "busybox-static",
        "zstd": "zstd",  # unpacks the 6.12 kernel image for a faster (PVH) boot
    }
    if release == "bookworm":
        packages["/usr/lib/qemu/virtiofsd"] = "qemu-system-common"
    else:
        packages["/usr/libexec/virtiofsd"] = "virtiofsd"
    return packages


#: Modules we want loaded in the guest; their dependencies are found from ``.modinfo``.
VIRTIOFS_MODULES: tuple[str, ...] = ("virtio_pci", "fuse", "virtiofs")
NINEP_MODULES: tuple[str, ...] = ("9pnet_virtio", "9p")

#: Markers written by ``/init`` on the console; vm.py parses them.
START_MARKER = "@@GUEST-START@@"
EXIT_MARKER_RE = re.compile(r"@@GUEST-EXIT rc=(\d+)@@")
HOST_ROOT_TAG = "pyvfs-hostroot"
HOST_ROOT_CMDLINE = "pyvfs.hostroot=1"

#: The guest kernel flavors and the Debian release whose default kernel each is.
KERNEL_HOME: dict[str, str] = {"6.1": "bookworm", "6.12": "trixie"}


@dataclass(frozen=True)
class KernelAssets:
    """An unpacked Debian guest kernel: image, its modules tree and ``uname -r``."""

    vmlinuz: Path
    modules_dir: Path
    version: str


class AssetError(RuntimeError):
    """A guest asset could not be prepared; the message says what to install or fix."""


def cache_dir() -> Path:
    """Root of the asset cache (``$PYVIRTIOFSD_CACHE`` or ``~/.cache/pyvirtiofsd``)."""
    root = os.environ.get("PYVIRTIOFSD_CACHE") or Path.home() / ".cache" / "pyvirtiofsd"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """Exclusive cross-process lock (flock) named ``name`` inside the cache."""
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_host_packages() -> None:
    """Install (via apt) the host packages guests need: QEMU, busybox-static, zstd and the
    release's reference daemon. ``.ci/setup`` installs them; then this only checks."""
    missing = sorted(
        {
            pkg
            for prog, pkg in host_apt_packages().items()
            if not (Path(prog).exists() if prog.startswith("/") else shutil.which(prog))
        }
    )
    if missing:
        with file_lock("apt"):
            debian.install(missing)


# --------------------------------------------------------------------------- kernels


def kernel_suite(flavor: str, release: str) -> str | None:
    """The apt suite to take ``flavor``'s kernel from on a host of ``release``: None for
    the host's own suites (security updates included), else bookworm-backports for 6.12
    on Debian 12, else the release whose default kernel it is (bookworm for 6.1 on
    Debian 13: the package is only unpacked, so any release's kernel boots a guest)."""
    if flavor not in KERNEL_HOME:
        raise ValueError(f"unknown kernel flavor {flavor!r}; known: {', '.join(KERNEL_HOME)}")
    home = KERNEL_HOME[flavor]
    if release == home:
        return None
    if (release, flavor) == ("bookworm", "6.12"):
        return "bookworm-backports"
    return home


def _apt_depends_kernel(suite: str | None) -> str | None:
    """The ``linux-image-X-amd64`` package that ``linux-image-amd64`` (of ``suite``, or of
    the host's own suites) depends on, or None."""
    spec = "linux-image-amd64" + (f"/{suite}" if suite else "")
    try:
        out = debian.run(["apt-cache", "depends", spec])
    except debian.AptError:
        return None
    match = re.search(r"Depends:\s*(linux-image-\d\S*-amd64)\b", out)
    return match.group(1) if match else None


def _search_kernel(flavor: str) -> str | None:
    """The newest ``linux-image-<flavor>.*-amd64`` apt knows (when ``linux-image-amd64``
    of the suite has moved on to a newer kernel), or None."""
    pattern = rf"linux-image-{re.escape(flavor)}\.[0-9][^ ]*-amd64"
    try:
        out = debian.run(["apt-cache", "search", "--names-only", f"^{pattern}$"])
    except debian.AptError:
        return None
    names = [line.split()[0] for line in out.splitlines()
             if line.split() and re.fullmatch(pattern, line.split()[0])]

    def key(name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", name))

    return max(names, key=key) if names else None


def _resolve_kernel_package(flavor: str) -> str:
    """Map a flavor ("6.1", "6.12") to an exact Debian kernel package name."""
    suite = kernel_suite(flavor, debian.host_release())
    if suite:
        debian.ensure_suite(suite)

    def resolve() -> str | None:
        pkg = _apt_depends_kernel(suite)
        if pkg and pkg.startswith(f"linux-image-{flavor}."):
            return pkg
        return _search_kernel(flavor)

    pkg = resolve()
    if not pkg:
        debian.update()
        pkg = resolve()
    if not pkg:
        raise AssetError(f"apt knows no linux-image-{flavor}.*-amd64 package "
                         f"(looked in {suite or 'the host release'})")
    return pkg


def _kernel_from_root(root: Path) -> KernelAssets:
    # /lib/modules up to Debian 12's kernels, /usr/lib/modules from Debian 13's (the /usr move)
    modules = next((d for d in (root / "lib/modules", root / "usr/lib/modules") if d.is_dir()),
                   root / "lib/modules")
    versions = sorted(p.name for p in modules.iterdir() if p.is_dir()) if modules.is_dir() else []
    if len(versions) != 1:
        raise AssetError(f"expected one kernel under {modules}, found {versions}")
    version = versions[0]
    vmlinuz = root / "boot" / f"vmlinuz-{version}"
    if not vmlinuz.exists():
        raise AssetError(f"{vmlinuz} missing in unpacked kernel package")
    modules_dir = modules / version
    return KernelAssets(vmlinuz=vmlinuz, modules_dir=modules_dir, version=version)


def ensure_kernel(flavor: str = "6.1") -> KernelAssets:
    """Download and unpack the Debian guest kernel for ``flavor`` ("6.1" or "6.12"), cached.

    The package name is remembered per flavor, so later calls work without apt lists; delete
    ``<cache>/kernels/<flavor>.pkg`` to pick up a newer Debian kernel.
    """
    kdir = cache_dir() / "kernels"
    kdir.mkdir(exist_ok=True)
    pin = kdir / f"{flavor}.pkg"
    with file_lock(f"kernel-{flavor}"):
        if pin.exists():
            root = kdir / pin.read_text().strip()
            if (root / ".complete").exists():
                return _kernel_from_root(root)
        with file_lock("apt"):
            pkg = _resolve_kernel_package(flavor)
            root = kdir / pkg
            if not (root / ".complete").exists():
                shutil.rmtree(root, ignore_errors=True)
                with tempfile.TemporaryDirectory(dir=kdir) as tmp:
                    try:
                        debian.run(["apt-get", "download", pkg], cwd=Path(tmp))
                    except debian.AptError:
                        debian.update()
                        debian.run(["apt-get", "download", pkg], cwd=Path(tmp))
                    debs = list(Path(tmp).glob("*.deb"))
                    if len(debs) != 1:
                        raise AssetError(f"apt-get download {pkg} gave {debs}")
                    staging = Path(tmp) / "root"
                    debian.run(["dpkg", "-x", str(debs[0]), str(staging)])
                    (staging / ".complete").write_text(debs[0].name + "\n")
                    staging.rename(root)
        pin.write_text(pkg + "\n")
        return _kernel_from_root(root)


def _elf_is_pvh_bootable(elf: bytes) -> bool:
    """True if ``elf`` is a complete ELF64 with a Xen PVH entry note (QEMU boots it directly)."""
    if elf[:4] != b"\x7fELF" or len(elf) < 64:
        return False
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    pvh = False
    for i in range(phnum):
        p_type, _flags, off, _va, _pa, filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if off + filesz > len(elf):
            return False  # truncated
        if p_type == 4:  # PT_NOTE
            pos = off
            while pos + 12 <= off + filesz:
                namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
                name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
                pvh |= name == b"Xen" and ntype == 18  # XEN_ELFNOTE_PHYS32_ENTRY
                pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return pvh


def _extract_vmlinux(bzimage: bytes) -> bytes | None:
    """Decompress the ELF kernel inside a bzImage (like scripts/extract-vmlinux)."""
    pos = bzimage.find(b"\xfd7zXZ\x00")
    if pos >= 0:
        try:
            return lzma.LZMADecompressor().decompress(bzimage[pos:])
        except lzma.LZMAError:
            return None
    pos = bzimage.find(b"(\xb5/\xfd")
    if pos >= 0 and shutil.which("zstd"):
        # zstd exits 1 on the trailing bytes after the frame; completeness is checked later.
        proc = subprocess.run(["zstd", "-dc"], input=bzimage[pos:], capture_output=True)
        return proc.stdout
    pos = bzimage.find(b"\x1f\x8b\x08\x00")
    if pos >= 0:
        try:
            return zlib.decompressobj(wbits=31).decompress(bzimage[pos:])
        except zlib.error:
            return None
    return None


def boot_image(kernel: KernelAssets) -> Path:
    """The image to pass to QEMU's ``-kernel``: the uncompressed vmlinux when it has a PVH entry.

    Why: under TCG the bzImage's own decompressor is slow (about 3 s for 6.1's xz); QEMU boots an
    ELF vmlinux with a PVH note directly.  Falls back to the bzImage.
    """
    target = kernel.vmlinuz.with_name(f"vmlinux-{kernel.version}.pvh")
    failed = target.with_suffix(".none")
    if target.exists():
        return target
    if failed.exists():
        return kernel.vmlinuz
    with file_lock(f"vmlinux-{kernel.version}"):
        if not target.exists() and not failed.exists():
            elf = _extract_vmlinux(kernel.vmlinuz.read_bytes())
            if elf and _elf_is_pvh_bootable(elf):
                tmp = target.with_suffix(f".tmp{os.getpid()}")
                tmp.write_bytes(elf)
                tmp.rename(target)
            else:
                failed.touch()
    return target if target.exists() else kernel.vmlinuz


# --------------------------------------------------------------------------- modules


def _decompress_module(path: Path) -> bytes:
    """Return the raw ELF of a kernel module (busybox insmod cannot read .ko.xz/.zst)."""
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return zlib.decompress(data, wbits=47)
    if path.name.endswith(".ko.zst"):
        if not shutil.which("zstd"):
            raise AssetError(f"{path.name} is zstd-compressed: apt-get install -y zstd")
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    raise AssetError(f"unknown module format: {path}")


def _modinfo_depends(elf: bytes) -> list[str]:
    """Parse ``depends=`` from an ELF64 module's ``.modinfo`` section (no kmod needed)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise AssetError("kernel module is not ELF64")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize
        )
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = elf.index(b"\0", stroff + name)
        if elf[stroff + name : end] == b".modinfo":
            for entry in elf[off : off + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    value = entry[len(b"depends=") :].decode()
                    return [d for d in value.split(",") if d]
            return []
    return []


def _module_index(kernel: KernelAssets) -> tuple[dict[str, Path], set[str]]:
    """Map module name -> file, and the set of built-in module names."""
    files: dict[str, Path] = {}
    for path in (kernel.modules_dir / "kernel").rglob("*.ko*"):
        name = path.name.split(".ko")[0].replace("-", "_")
        files[name] = path
    builtin: set[str] = set()
    builtin_file = kernel.modules_dir / "modules.builtin"
    if builtin_file.exists():
        for line in builtin_file.read_text().splitlines():
            builtin.add(Path(line).name.split(".ko")[0].replace("-", "_"))
    return files, builtin


def module_load_order(
    kernel: KernelAssets, wanted: tuple[str, ...] = VIRTIOFS_MODULES + NINEP_MODULES
) -> list[tuple[str, Path]]:
    """Loadable modules needed for ``wanted``, dependencies first; built-ins are left out."""
    files, builtin = _module_index(kernel)
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name in files:
            for dep in _modinfo_depends(_decompress_module(files[name])):
                visit(dep)
            order.append((name, files[name]))
        elif name not in builtin:
            raise AssetError(f"module {name} is neither built into {kernel.version} nor shipped")

    for name in wanted:
        visit(name)
    return order


# --------------------------------------------------------------------------- busybox


def busybox_path() -> Path:
    """A statically linked busybox: the installed busybox-static, else one fetched with apt."""
    installed = Path("/bin/busybox")
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", "busybox-static"], capture_output=True, text=True
    )
    if installed.exists() and "install ok installed" in status.stdout:
        return installed
    bdir = cache_dir() / "busybox-static"
    target = bdir / "bin" / "busybox"
    with file_lock("busybox"):
        if target.exists():
            return target
        with file_lock("apt"), tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            try:
                debian.run(["apt-get", "download", "busybox-static"], cwd=Path(tmp))
            except debian.AptError:
                debian.update()
                debian.run(["apt-get", "download", "busybox-static"], cwd=Path(tmp))
            deb = next(Path(tmp).glob("*.deb"))
            debian.run(["dpkg", "-x", str(deb), str(bdir)])
    return target


# --------------------------------------------------------------------------- cpio / initramfs


class CpioWriter:
    """Minimal cpio "newc" writer: what the kernel's initramfs unpacker reads."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        name_b = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name_b), 0)
        self._ino += 1
        self._buf += b"070701" + b"".join(b"%08X" % f for f in fields) + name_b
        self._pad()
        self._buf += data
        self._pad()

    def _pad(self) -> None:
        self._buf += b"\0" * (-len(self._buf) % 4)

    def mkdir(self, name: str) -> None:
        """Add a directory and any missing parents."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and sub not in self._dirs:
                self._dirs.add(sub)
                self._entry(sub, 0o040755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file (parents are created)."""
        name = name.strip("/")
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link (parents are created)."""
        name = name.strip("/")
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        """Add the trailer and return the archive bytes."""
        self._entry("TRAILER!!!", 0)
        self._buf += b"\0" * (-len(self._buf) % 512)
        return bytes(self._buf)


INIT_SCRIPT = rf"""#!/bin/sh
# pyvirtiofsd test guest init: set up a minimal system, run /guest-script.sh, power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run /mnt /host /root
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
for m in $(cat /etc/pyvfs/modules); do
    insmod /lib/modules/pyvfs/$m.ko || echo "@@GUEST-INSMOD-FAILED $m@@"
done
if grep -q '{HOST_ROOT_CMDLINE}' /proc/cmdline; then
    mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144 {HOST_ROOT_TAG} /host \
        || echo "@@GUEST-HOSTROOT-FAILED@@"
fi
# Script output also goes to ttyS1 (raw, no kernel messages) when the host attached one.
out=/dev/null
if [ -e /dev/ttyS1 ] && stty -F /dev/ttyS1 raw -echo 2>/dev/null; then out=/dev/ttyS1; fi
echo "{START_MARKER}"
cd /
(sh /guest-script.sh; echo $? > /run/pyvfs-rc) </dev/null 2>&1 | tee $out
rc=$(cat /run/pyvfs-rc 2>/dev/null || echo 255)
echo "@@GUEST-EXIT rc=$rc@@"
sync
poweroff -f
"""

HOSTRUN_SCRIPT = r"""#!/bin/sh
# hostrun CMD...: run CMD chrooted into the host's / (9p, read-only), with /proc, /sys, /dev,
# a tmpfs /tmp and the guest's /mnt bound in.  Needs run_guest(host_root_9p=True).
grep -q ' /host 9p ' /proc/mounts || { echo "hostrun: host root not mounted" >&2; exit 127; }
ismnt() { grep -q " $1 " /proc/mounts; }
ismnt /host/proc || mount -t proc proc /host/proc
ismnt /host/sys || mount -t sysfs sysfs /host/sys
ismnt /host/dev || mount --bind /dev /host/dev
ismnt /host/tmp || mount -t tmpfs tmpfs /host/tmp
if ismnt /mnt && ! ismnt /host/mnt; then mount --bind /mnt /host/mnt; fi
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin exec chroot /host "$@"
"""


def _busybox_applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True)
    if out.returncode != 0:
        raise AssetError(f"{busybox} --list-full failed; is it busybox-static?")
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def build_initramfs(kernel: KernelAssets, extra_files: dict[str, bytes] | None = None) -> Path:
    """Build (or reuse from cache) the base initramfs for ``kernel``: busybox, modules, /init.

    ``extra_files`` maps guest paths to contents (mode 0755 if it starts with ``#!`` or is an
    ELF file, so a bundled loader or program can be run).  The
    result is an uncompressed cpio (decompressing under TCG costs more than reading it).
    """
    extra_files = dict(extra_files or {})
    busybox = busybox_path()
    bb_bytes = busybox.read_bytes()
    order = module_load_order(kernel)
    digest = hashlib.sha256()
    for part in (INIT_SCRIPT, HOSTRUN_SCRIPT, kernel.version, str(kernel.modules_dir)):
        digest.update(part.encode() + b"\0")
    digest.update(hashlib.sha256(bb_bytes).digest())
    for name, path in order:
        digest.update(f"{name}:{path.stat().st_size}:{path.stat().st_mtime_ns}\0".encode())
    for gpath in sorted(extra_files):
        digest.update(gpath.encode() + b"\0" + hashlib.sha256(extra_files[gpath]).digest())
    out_dir = cache_dir() / "initramfs"
    out_dir.mkdir(exist_ok=True)
    target = out_dir / f"base-{kernel.version}-{digest.hexdigest()[:16]}.cpio"
    with file_lock("initramfs"):
        if target.exists():
            return target
        cpio = CpioWriter()
        for d in "bin sbin usr/bin usr/sbin proc sys dev tmp run mnt host root etc/pyvfs".split():
            cpio.mkdir(d)
        cpio.mkdir("lib/modules/pyvfs")
        cpio.file("bin/busybox", bb_bytes, 0o755)
        for applet in _busybox_applets(busybox):
            if applet.strip("/") != "bin/busybox":
                cpio.symlink(applet, "/bin/busybox")
        cpio.file("init", INIT_SCRIPT.encode(), 0o755)
        cpio.file("bin/hostrun", HOSTRUN_SCRIPT.encode(), 0o755)
        for name, path in order:
            cpio.file(f"lib/modules/pyvfs/{name}.ko", _decompress_module(path))
        cpio.file("etc/pyvfs/modules", "".join(f"{n}\n" for n, _ in order).encode())
        for gpath, data in sorted(extra_files.items()):
            executable = data.startswith((b"#!", b"\x7fELF"))
            cpio.file(gpath, data, 0o755 if executable else 0o644)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cpio.finish())
        tmp.rename(target)
    return target


def build_run_archive(script: str) -> bytes:
    """The small per-run cpio holding ``/guest-script.sh``, to append to the base image."""
    cpio = CpioWriter()
    cpio.file("guest-script.sh", script.encode(), 0o755)
    return cpio.finish()
