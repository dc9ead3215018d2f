"""``python -m tests.support``: fetch what the tests take from Debian, before they run.

``.ci/setup`` runs it (as root) after installing the Debian packages: the guest kernels
(unpacked from their packages into the cache, never installed on the host), the guests'
base initramfs, the reference daemons of this release, and a QEMU >= 8.2 for the
migration tests (bookworm-backports' unpacked on Debian 12). Everything is cached, so a
second run only checks. Prints one line per asset.
"""

from __future__ import annotations

import sys

from tests.support import assets, debian, qemu10, reference


def main() -> int:
    release = debian.host_release() or "an unknown release"
    assets.ensure_host_packages()
    for flavor in assets.KERNEL_HOME:
        kernel = assets.ensure_kernel(flavor)
        assets.build_initramfs(kernel)
        where = kernel.vmlinuz.parents[1]
        print(f"guest kernel {flavor}: {kernel.version} (unpacked in {where})")
    if reference.c_virtiofsd_present():
        print(f"C virtiofsd: {reference.C_VIRTIOFSD}")
    else:
        print(f"C virtiofsd: not part of Debian {release}; tests that name it use Rust virtiofsd")
    print(f"Rust virtiofsd: {reference.rust_version()} ({reference.rust_origin()})")
    try:
        qemu = qemu10.ensure_qemu()
        print(f"QEMU for migration tests: {'.'.join(map(str, qemu.version))} ({qemu.origin})")
    except qemu10.QemuUnavailable as e:
        print(f"QEMU for migration tests: none ({e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
