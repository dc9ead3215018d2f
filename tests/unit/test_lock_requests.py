"""Lock requests through the ring: a refused SETLKW gives the open file's reference back
exactly once, so the guest's file stays usable."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

from daemon import fuse
from tests.daemon import pyvirtiofsd
from tests.frontend import Frontend


def test_refused_setlkw_leaves_the_file_open(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"still readable")
    sock = tmp_path / "vfs.sock"
    with pyvirtiofsd(share, sock, "--posix-lock"):
        front = Frontend(str(sock))
        front.setup(2)
        front.init()
        err, entry = front.lookup(1, b"f")
        nodeid = struct.unpack_from("<Q", entry)[0]
        err, opened = front.fuse(fuse.Opcode.OPEN, nodeid, fuse.OPEN_IN.pack(os.O_RDWR, 0))
        fh = struct.unpack_from("<Q", opened)[0]
        for _ in range(3):  # lock type 7 does not exist: EINVAL, each time
            err, _ = front.fuse(fuse.Opcode.SETLKW, nodeid,
                                fuse.LK_IN.pack(fh, 1, 0, 9, 7, 0, 0, 0))
            assert err == -errno.EINVAL
        err, data = front.fuse(fuse.Opcode.READ, nodeid,
                               fuse.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0))
        assert (err, data) == (0, b"still readable")
        # a real lock still works on the same file
        err, _ = front.fuse(fuse.Opcode.SETLKW, nodeid,
                            fuse.LK_IN.pack(fh, 1, 0, 9, 1, 0, 0, 0))
        assert err == 0
        front.close()
