"""Shared helpers for the option tests: a daemon with a front-end, INIT with chosen
guest flags, requests from a chosen caller, and decoders for the replies."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon.protocol import fuse
from tests.support.daemon import REPO, daemon_log, pyvirtiofsd
from tests.support.frontend import Frontend

# what a 6.x guest kernel offers, without the opt-in flags the tests add themselves
BASE_FLAGS = (
    fuse.ASYNC_READ | fuse.BIG_WRITES | fuse.ATOMIC_O_TRUNC | fuse.AUTO_INVAL_DATA
    | fuse.DO_READDIRPLUS | fuse.READDIRPLUS_AUTO | fuse.ASYNC_DIO | fuse.PARALLEL_DIROPS
    | fuse.MAX_PAGES_FLAG | fuse.SUBMOUNTS | fuse.INIT_EXT
)
ACL_FLAGS = fuse.POSIX_ACL | fuse.DONT_MASK | fuse.SETXATTR_EXT


@dataclass
class Attr:
    ino: int
    size: int
    mode: int
    uid: int
    gid: int


def attr_at(payload: bytes, offset: int) -> Attr:
    f = fuse.ATTR.unpack_from(payload, offset)
    return Attr(ino=f[0], size=f[1], mode=f[9], uid=f[11], gid=f[12])


def entry(payload: bytes) -> tuple[int, Attr]:
    """(nodeid, attr) of an entry reply."""
    return struct.unpack_from("<Q", payload)[0], attr_at(payload, fuse.ENTRY_HEAD.size)


def attr_reply(payload: bytes) -> Attr:
    return attr_at(payload, fuse.ATTR_OUT_HEAD.size)


def init(front: Frontend, flags: int = BASE_FLAGS) -> tuple[int, int]:
    """INIT offering ``flags`` (bits 32-63 go in flags2); (errno, agreed flags)."""
    arg = fuse.INIT_IN.pack(7, 38, 131072, flags & 0xFFFFFFFF, flags >> 32) + bytes(44)
    err, payload = front.fuse(fuse.Opcode.INIT, 0, arg)
    if err:
        return err, 0
    out = fuse.INIT_OUT.unpack_from(payload)
    return 0, out[3] | out[10] << 32


def request(front: Frontend, opcode: int, nodeid: int, arg: bytes = b"", *, uid: int = 0,
            gid: int = 0, ext: bytes = b"", out_size: int = 4096) -> tuple[int, bytes]:
    """One request with a chosen caller and request extensions (total_extlen)."""
    assert len(ext) % 8 == 0
    front.unique += 1
    length = fuse.IN_HEADER_SIZE + len(arg) + len(ext)
    hdr = fuse.IN_HEADER.pack(length, opcode, front.unique, nodeid, uid, gid, 1,
                              len(ext) // 8, 0)
    bufs = front.make_buffers([hdr, arg + ext], [out_size])
    head = front.submit_descs(1, bufs)
    got, written = front.wait_used(1)
    assert got == head
    raw = front.read_gpa(bufs[-1][0], written)
    total, error, unique = fuse.OUT_HEADER.unpack_from(raw)
    assert unique == front.unique and total == written
    return error, raw[fuse.OUT_HEADER_SIZE:]


def lookup(front: Frontend, parent: int, name: str) -> tuple[int, Attr]:
    err, payload = front.lookup(parent, name.encode())
    assert err == 0, f"LOOKUP {name}: {err}"
    return entry(payload)


def mkdir_arg(name: str, mode: int = 0o755, umask: int = 0) -> bytes:
    return fuse.MKDIR_IN.pack(mode, umask) + name.encode() + b"\0"


def create_arg(name: str, flags: int, mode: int = 0o644, umask: int = 0,
               open_flags: int = 0) -> bytes:
    return fuse.CREATE_IN.pack(flags, mode, umask, open_flags) + name.encode() + b"\0"


def setattr_arg(valid: int, *, size: int = 0, mode: int = 0, uid: int = 0, gid: int = 0,
                fh: int = 0) -> bytes:
    return fuse.SETATTR_IN.pack(valid, 0, fh, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, uid, gid, 0)


@contextlib.contextmanager
def served(tmp_path: Path, *options: str, share: Path | None = None
           ) -> Iterator[tuple[Frontend, Path, subprocess.Popen[bytes]]]:
    """The daemon on ``share`` (default tmp_path/share) with a connected front-end whose
    rings are set up; INIT is left to the test."""
    if share is None:
        share = tmp_path / "share"
        share.mkdir(exist_ok=True)
    sock = tmp_path / "vfs.sock"
    with pyvirtiofsd(share, sock, *options) as proc:
        front = Frontend(str(sock))
        try:
            front.setup(2)
            yield front, share, proc
        finally:
            front.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=30)


def start_error(tmp_path: Path, *options: str) -> str:
    """Start the daemon with options that must be refused; returns its stderr."""
    share = tmp_path / "share"
    share.mkdir(exist_ok=True)
    r = run_cli("--shared-dir", str(share), "--socket-path", str(tmp_path / "x.sock"),
                "--sandbox", "none", *options)
    assert r.returncode != 0, f"accepted {options}: {r.stdout}{r.stderr}"
    assert not (tmp_path / "x.sock").exists()
    return r.stderr


def log_of(proc: subprocess.Popen[bytes]) -> str:
    return daemon_log(proc)


def chown(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)
