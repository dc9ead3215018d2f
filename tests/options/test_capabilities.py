"""Started as root, the server keeps only virtiofsd's capability set (chown,
dac_override, fowner, fsetid, setgid, setuid, mknod, setfcap, and dac_read_search while
it uses file handles), and --modcaps adds or removes from it: what the guest can do
changes accordingly (device nodes, trusted.* xattrs)."""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

import pytest

from daemon.host import capabilities
from daemon.protocol import fuse
from tests.options.helpers import init, log_of, served

MKNOD_IN = struct.Struct("<IIII")  # mode, rdev, umask, padding


def mask(*names: str) -> int:
    return sum(1 << capabilities.NAMES.index(n) for n in names)


def server_and_workers(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [pid, *(int(c) for c in f.read().split())]


def mknod_chr(front, name: bytes) -> int:  # noqa: ANN001
    err, _ = front.fuse(fuse.Opcode.MKNOD, 1,
                        MKNOD_IN.pack(stat.S_IFCHR | 0o600, os.makedev(1, 3), 0, 0) + name + b"\0")
    return err


def set_trusted(front) -> int:  # noqa: ANN001
    err, _ = front.fuse(fuse.Opcode.SETXATTR, 1, struct.pack("<II", 2, 0) + b"trusted.k\0hi")
    return err


@pytest.mark.parametrize("handles", ["never", "prefer"])
def test_default_set(tmp_path: Path, handles: str) -> None:
    with served(tmp_path, "--xattr", "--inode-file-handles", handles) as (front, share, proc):
        assert init(front)[0] == 0
        assert mknod_chr(front, b"null") == 0
        assert set_trusted(front) == -errno.EPERM  # needs sys_admin, which is gone
        masks = {capabilities.effective_mask(p) for p in server_and_workers(proc.pid)}
        log = log_of(proc)
    expected = mask(*capabilities.SERVING) | (mask("dac_read_search") if handles == "prefer"
                                              else 0)
    assert masks == {expected}
    assert "capabilities kept:" in log
    st = os.lstat(share / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_modcaps_changes_what_the_guest_can_do(tmp_path: Path) -> None:
    with served(tmp_path, "--xattr", "--modcaps=-mknod:+sys_admin") as (front, share, proc):
        assert init(front)[0] == 0
        assert mknod_chr(front, b"null") == -errno.EPERM
        assert set_trusted(front) == 0
        eff = capabilities.effective_mask(proc.pid)
    assert eff & mask("sys_admin") and not eff & mask("mknod")
    assert not (share / "null").exists()
    assert os.getxattr(share, "trusted.k") == b"hi"
    os.removexattr(share, "trusted.k")
