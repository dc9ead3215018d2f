"""--killpriv-v2 (default off): the guest then leaves clearing setuid/setgid to the daemon,
which drops CAP_FSETID so the host kernel clears them on truncate (SETATTR with
FATTR_KILL_SUIDGID) and on open/create with O_TRUNC and FUSE_OPEN_KILL_SUIDGID."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from daemon.protocol import fuse
from tests.options.helpers import (
    BASE_FLAGS,
    create_arg,
    init,
    lookup,
    request,
    served,
    setattr_arg,
)


def make_files(share: Path) -> None:
    for name in ("t", "o", "c"):
        (share / name).write_text("content")
        os.chmod(share / name, 0o6755)


def kill_everything(front, share: Path) -> dict[str, int]:  # noqa: ANN001
    """Truncate t, open o and create c with O_TRUNC, all asking for the kill; returns the
    host modes afterwards."""
    node, _ = lookup(front, 1, "t")
    err, _ = front.fuse(fuse.Opcode.SETATTR, node,
                        setattr_arg(fuse.FATTR_SIZE | fuse.FATTR_KILL_SUIDGID, size=0))
    assert err == 0
    node, _ = lookup(front, 1, "o")
    err, opened = front.fuse(fuse.Opcode.OPEN, node, fuse.OPEN_IN.pack(
        os.O_WRONLY | os.O_TRUNC, fuse.OPEN_KILL_SUIDGID))
    assert err == 0
    front.fuse(fuse.Opcode.RELEASE, node, fuse.RELEASE_IN.pack(
        struct.unpack_from("<Q", opened)[0], 0, 0, 0))
    err, _ = request(front, fuse.Opcode.CREATE, 1, create_arg(
        "c", os.O_WRONLY | os.O_TRUNC, open_flags=fuse.OPEN_KILL_SUIDGID))
    assert err == 0
    return {n: stat.S_IMODE(os.stat(share / n).st_mode) for n in ("t", "o", "c")}


@pytest.mark.parametrize("options", [["--killpriv-v2"], ["-o", "killpriv_v2"],
                                     ["--no-killpriv-v2", "--killpriv-v2"]])
def test_suid_and_sgid_cleared(tmp_path: Path, options: list[str]) -> None:
    share = tmp_path / "share"
    share.mkdir()
    make_files(share)
    with served(tmp_path, *options) as (front, share, _):
        err, agreed = init(front, BASE_FLAGS | fuse.HANDLE_KILLPRIV_V2)
        assert err == 0 and agreed & fuse.HANDLE_KILLPRIV_V2
        modes = kill_everything(front, share)
    assert modes == {"t": 0o755, "o": 0o755, "c": 0o755}
    assert (share / "t").stat().st_size == 0


@pytest.mark.parametrize("options", [[], ["--killpriv-v2", "--no-killpriv-v2"]])
def test_off_by_default(tmp_path: Path, options: list[str]) -> None:
    """Without the option FUSE_HANDLE_KILLPRIV_V2 is not agreed, and the daemon (root, with
    CAP_FSETID) keeps the bits: the guest kernel handles them itself in that mode."""
    share = tmp_path / "share"
    share.mkdir()
    make_files(share)
    with served(tmp_path, *options) as (front, share, _):
        err, agreed = init(front, BASE_FLAGS | fuse.HANDLE_KILLPRIV_V2)
        assert err == 0 and not agreed & fuse.HANDLE_KILLPRIV_V2
        modes = kill_everything(front, share)
    if os.geteuid() == 0:
        assert modes == {"t": 0o6755, "o": 0o6755, "c": 0o6755}


def test_write_with_kill_suidgid_clears_the_bits(tmp_path: Path) -> None:
    """WRITE with FUSE_WRITE_KILL_SUIDGID goes the slow way (the C fast path declines
    it) and drops CAP_FSETID around pwritev; a plain WRITE keeps the bits."""
    share = tmp_path / "share"
    share.mkdir()
    for name in ("kill", "keep"):
        (share / name).write_text("content")
        os.chmod(share / name, 0o6755)
    with served(tmp_path, "--killpriv-v2") as (front, share, _):
        err, agreed = init(front, BASE_FLAGS | fuse.HANDLE_KILLPRIV_V2)
        assert err == 0 and agreed & fuse.HANDLE_KILLPRIV_V2
        for name, wflags in (("kill", fuse.WRITE_KILL_SUIDGID), ("keep", 0)):
            node, _ = lookup(front, 1, name)
            err, opened = front.fuse(fuse.Opcode.OPEN, node, fuse.OPEN_IN.pack(os.O_WRONLY, 0))
            assert err == 0
            fh = struct.unpack_from("<Q", opened)[0]
            err, out = front.fuse(fuse.Opcode.WRITE, node,
                                  fuse.WRITE_IN.pack(fh, 0, 3, wflags, 0, 0, 0),
                                  extra_readable=[b"new"])
            assert (err, fuse.WRITE_OUT.unpack(out)[0]) == (0, 3)
    assert (share / "kill").read_text() == "newtent"
    assert stat.S_IMODE((share / "kill").stat().st_mode) == 0o755
    if os.geteuid() == 0:
        assert stat.S_IMODE((share / "keep").stat().st_mode) == 0o6755


def test_non_root_write_clears_setuid_without_killpriv(tmp_path: Path) -> None:
    """POSIX: write(2) by someone without CAP_FSETID clears setuid/setgid. A guest in
    direct-I/O mode (--cache never) leaves that to the file system, so the daemon (root,
    with CAP_FSETID) drops the capability for such writes; root's own writes keep them."""
    share = tmp_path / "share"
    share.mkdir()
    for name in ("by-user", "by-root"):
        (share / name).write_text("content")
        os.chmod(share / name, 0o6777)
    with served(tmp_path, "--cache", "never") as (front, share, _):
        err, _ = init(front, BASE_FLAGS)
        assert err == 0
        for name, uid in (("by-user", 1234), ("by-root", 0)):
            node, _ = lookup(front, 1, name)
            err, opened = front.fuse(fuse.Opcode.OPEN, node, fuse.OPEN_IN.pack(os.O_WRONLY, 0),
                                     uid=uid, gid=uid)
            assert err == 0
            fh = struct.unpack_from("<Q", opened)[0]
            err, out = front.fuse(fuse.Opcode.WRITE, node,
                                  fuse.WRITE_IN.pack(fh, 0, 3, 0, 0, 0, 0),
                                  extra_readable=[b"new"], uid=uid, gid=uid)
            assert (err, fuse.WRITE_OUT.unpack(out)[0]) == (0, 3)
    assert stat.S_IMODE((share / "by-user").stat().st_mode) == 0o777
    if os.geteuid() == 0:
        assert stat.S_IMODE((share / "by-root").stat().st_mode) == 0o6777
