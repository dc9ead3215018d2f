"""Demo: share a directory with pyvirtiofsd and boot a small Linux guest against it.

    python3 -m tests.guest.demo [--shared-dir DIR] [--request-queues N]

The guest mounts the share, lists it, writes a file into it and reads it back; the demo
prints what the guest saw, then what the host directory holds afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from tests.support import assets
from tests.support.daemon import daemon_log, pyvirtiofsd
from tests.support.vm import run_guest

GUEST_SCRIPT = """
mount -t virtiofs myfs /mnt || exit 1
echo "guest: kernel $(uname -r), $(nproc) vCPU(s); the share contains:"
ls -l /mnt
echo "hello from the guest, $(date -u)" > /mnt/written-by-guest.txt
echo "guest: wrote written-by-guest.txt, reading it back:"
cat /mnt/written-by-guest.txt
df -h /mnt | tail -1
umount /mnt
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-dir", help="directory to share (default: a fresh demo dir)")
    parser.add_argument("--request-queues", type=int, default=1,
                        help="request queues; 2 or more boots Linux 6.12 with 2 vCPUs")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root (QEMU's guest memory and the daemon's file handles)",
              file=sys.stderr)
        return 1
    assets.ensure_host_packages()
    work = Path(tempfile.mkdtemp(prefix="pyvirtiofsd-demo-"))
    share = Path(args.shared_dir) if args.shared_dir else work / "share"
    if not args.shared_dir:
        share.mkdir()
        (share / "hello.txt").write_text("hello from the host\n")
        (share / "docs").mkdir()
    multi = args.request_queues > 1
    socket_path = work / "vfs.sock"
    print(f"host: serving {share} on {socket_path}")
    with pyvirtiofsd(share, socket_path) as proc:
        run = run_guest(socket_path, GUEST_SCRIPT, kernel="6.12" if multi else "6.1",
                        smp=2 if multi else 1, num_request_queues=args.request_queues,
                        timeout=180)
    print(run.script_output, end="")
    if run.rc != 0:
        print(run.describe(), file=sys.stderr)
        print(daemon_log(proc), file=sys.stderr)
        return 1
    print(f"host: {share} now holds:")
    for entry in sorted(share.iterdir()):
        print(f"  {entry.name}: " + (entry.read_text().strip() if entry.is_file() else "<dir>"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
