"""A share with another file system mounted inside it (a tmpfs at sub/): with
--announce-submounts (the default) the guest sees it as a submount, with its own st_dev,
so (st_dev, st_ino) stays unique although both file systems number their inodes on their
own; renames across it are EXDEV; SYNCFS works on both. With --no-announce-submounts
the guest sees one file system, as virtiofsd.

The tmpfs is mounted in a private mount namespace the daemon runs in (unshare -m), so the
host's mount table is never touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.daemon import pyvirtiofsd
from tests.support.vm import run_guest

SCRIPT = r"""
mount -t virtiofs myfs /mnt || exit 1
echo top > /mnt/top-file
echo sub > /mnt/sub/sub-file
mkdir /mnt/sub/dir
echo "dev-differs $( [ "$(stat -c %d /mnt)" != "$(stat -c %d /mnt/sub)" ] && echo yes || echo no)"
echo "submount-listed $(grep -c ' /mnt/sub ' /proc/mounts)"
hostrun python3 -c '
import errno, os
try:
    os.rename("/mnt/top-file", "/mnt/sub/moved")
    print("rename ok")
except OSError as e:
    print("rename", errno.errorcode[e.errno])
'
ls /mnt/sub | sort | tr '\n' ' '; echo
stat -c '%d %i %n' /mnt /mnt/top-file /mnt/sub /mnt/sub/sub-file /mnt/sub/dir \
    2>/dev/null | sort -u | awk '{print $1" "$2}' | sort | uniq -d | wc -l \
    | sed 's/^/duplicate-ids /'
sync -f /mnt/sub/sub-file && sync -f /mnt/top-file 2>/dev/null; echo "syncfs $?"
cat /mnt/sub/sub-file
umount /mnt/sub 2>/dev/null
umount /mnt
"""


@pytest.mark.guest
@pytest.mark.parametrize("announce", [True, False], ids=["announced", "not-announced"])
def test_submount_in_the_share(tmp_path: Path, announce: bool) -> None:
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    sock = tmp_path / "vfs.sock"
    wrapper = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
               f"mount -t tmpfs -o size=16m pyvfs-sub {share / 'sub'} && exec \"$@\"", "sh"]
    flag = "--announce-submounts" if announce else "--no-announce-submounts"
    with pyvirtiofsd(share, sock, flag, wrapper=wrapper):
        run = run_guest(sock, SCRIPT, host_root_9p=True, timeout=300)
    assert run.rc == 0, run.describe()
    lines = run.script_output.strip().split("\n")
    if announce:
        assert lines == ["dev-differs yes", "submount-listed 1", "rename EXDEV",
                         "dir sub-file ", "duplicate-ids 0", "syncfs 0", "sub"], lines
    else:
        # one file system as far as the guest knows: the host refuses the rename (EXDEV)
        assert lines == ["dev-differs no", "submount-listed 0", "rename EXDEV",
                         "dir sub-file ", "duplicate-ids 0", "syncfs 0", "sub"], lines
    # the tmpfs lived only in the daemon's mount namespace
    assert list((share / "sub").iterdir()) == []
    assert (share / "top-file").read_text() == "top\n"
