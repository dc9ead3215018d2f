"""A Linux guest on a share served with --translate-uid/--translate-gid and --xattrmap:
ownership as the guest's stat sees it, chown from the guest, and xattrs set by a guest
program stored under their mapped names on the host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.daemon import pyvirtiofsd
from tests.support.vm import run_guest

SCRIPT = """
mount -t virtiofs myfs /mnt || exit 1
echo "owned $(stat -c %u:%g /mnt/owned)"
mkdir /mnt/made || exit 2
echo "made $(stat -c %u:%g /mnt/made)"
chown 1005:105 /mnt/made || exit 3
echo "chowned $(stat -c %u:%g /mnt/made)"
echo data > /mnt/x
hostrun python3 -c '
import os
os.setxattr("/mnt/x", "user.test", b"v")
os.setxattr("/mnt/x", "trusted.t", b"w")
names = ",".join(sorted(os.listxattr("/mnt/x")))
print("xattrs", names, os.getxattr("/mnt/x", "trusted.t").decode())
'
umount /mnt
"""


@pytest.mark.guest
def test_translated_ownership_and_mapped_xattrs_in_a_guest(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    share.chmod(0o777)  # the guest's root creates as host uid 5000
    (share / "owned").write_text("x")
    os.chown(share / "owned", 2003, 3004)
    sock = tmp_path / "vfs.sock"
    with pyvirtiofsd(share, sock,
                     "--translate-uid", "map:1000:2000:10", "--translate-uid", "map:0:5000:1",
                     "--translate-gid", "map:100:3000:10", "--translate-gid", "map:0:5000:1",
                     "--xattrmap", ":map::user.virtiofs.:"):
        run = run_guest(sock, SCRIPT, host_root_9p=True, timeout=240)
    assert run.rc == 0, run.describe()
    lines = run.script_output.splitlines()
    assert "owned 1003:104" in lines, run.script_output
    assert "made 0:0" in lines, run.script_output
    assert "chowned 1005:105" in lines, run.script_output
    assert "xattrs trusted.t,user.test w" in lines, run.script_output
    st = os.stat(share / "made")
    assert (st.st_uid, st.st_gid) == (2005, 3005)
    st = os.stat(share / "x")
    assert (st.st_uid, st.st_gid) == (5000, 5000)
    assert sorted(os.listxattr(share / "x")) == ["user.virtiofs.trusted.t",
                                                 "user.virtiofs.user.test"]
