"""``python -m tests.support``: fetch what the tests take from Debian, before they run.

``.ci/setup`` runs it (as root) after installing the Debian packages: the guest kernels
(unpacked from their packages into the cache, never installed on the host), the guests'
base initramfs, and the reference daemons of this release. Everything is cached, so a
second run only checks. Prints one line per asset.
"""

from __future__ import annotations

import sys

from tests.support import assets, debian, reference


def main() -> int:
    release = debian.host_release() or "an unknown release"
    assets.ensure_host_packages()
    for flavor in assets.KERNEL_HOME:
        kernel = assets.ensure_kernel(flavor)
        assets.build_initramfs(kernel)
        where = kernel.vmlinuz.parents[1]
        print(f"guest kernel {flavor}: {kernel.version} (unpacked in {where})")
    if reference.C_VIRTIOFSD.exists():
        print(f"C virtiofsd: {reference.C_VIRTIOFSD}")
    else:
        print(f"C virtiofsd: not part of Debian {release}; tests that name it use Rust virtiofsd")
    print(f"Rust virtiofsd: {reference.rust_version()} ({reference.rust_origin()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
