"""The host side of ``migholder`` (holder.c beside this file), the guest program that holds
files, a listing, a mapping, locks and cached dentries on a virtio-fs mount while the guest
is live-migrated, and is driven step by step through a file on the share.

:func:`program` compiles it statically (cached by its source's hash) for the guest's
initramfs; :func:`prepare_share` lays out what it opens; :class:`Holder` sends commands and
reads its reports; :func:`host_lock_probe` checks from the host that its locks still hold.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.support import assets

SOURCE = Path(__file__).with_name("holder.c")
GUEST_PATH = "bin/migholder"
LIST_ENTRIES = 200
BLOCK = 4096
CMD_LEN = 64


def program() -> bytes:
    """The static guest binary (gcc -static; libc6-dev provides libc.a)."""
    source = SOURCE.read_bytes()
    out = assets.cache_dir() / "migholder" / hashlib.sha256(source).hexdigest()[:16]
    if not out.exists():
        compiler = shutil.which("gcc")
        if compiler is None:
            raise assets.AssetError("gcc not found: bash .ci/setup installs gcc and libc6-dev")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        subprocess.run([compiler, "-static", "-O2", "-Wall", "-o", str(tmp), str(SOURCE)],
                       check=True, capture_output=True)
        tmp.rename(out)
    return out.read_bytes()


def guest_script(nfiles: int, unlinked: bool = False, mount_options: str = "") -> str:
    """The guest's /guest-script.sh: mount the share and run the holder on it."""
    opts = f" -o {mount_options}" if mount_options else ""
    return (f"mount -t virtiofs{opts} myfs /mnt || exit 1\n"
            f"/{GUEST_PATH} /mnt {nfiles}{' unlinked' if unlinked else ''}\n")


def prepare_share(share: Path, nfiles: int, unlinked: bool = False) -> None:
    """What the holder opens: held files with known contents, ``list/`` (200 names),
    ``many/`` (``nfiles`` files to stat), ``sub/`` (its cwd), the lock files, ``ctl/``."""
    share.mkdir(exist_ok=True)
    (share / "rw").write_bytes(b"host-rw-0".ljust(31) + b"\n" + b"." * (BLOCK - 32))
    (share / "ro").write_bytes(b"host-ro-0".ljust(31) + b"\n")
    (share / "app").write_bytes(b"")
    (share / "map").write_bytes(b"\0" * 8192)
    for name in ("flk", "plk"):
        (share / name).write_bytes(b"lock\n")
    if unlinked:
        (share / "gone").write_bytes(b"gone-initial\n" + b"\0" * 200)
    (share / "sub").mkdir()
    (share / "list").mkdir()
    for i in range(LIST_ENTRIES):
        (share / "list" / f"e{i:03d}").write_bytes(b"")
    (share / "many").mkdir()
    for i in range(nfiles):
        (share / "many" / f"f{i:05d}").write_bytes(b"")
    (share / "ctl").mkdir()
    (share / "ctl" / "cmd").write_bytes(b"0 none".ljust(CMD_LEN - 1) + b"\n")


def parse_report(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        out[key] = value
    return out


class Holder:
    """Talks to the guest program through ``share/ctl``."""

    def __init__(self, share: Path) -> None:
        self.share = share
        self.seq = 0

    def report(self, seq: int, timeout: float = 120,
               describe: Callable[[], str] = lambda: "") -> dict[str, str]:
        """Wait for report ``seq`` (0: setup) and return it as a dict."""
        path = self.share / "ctl" / f"rep-{seq}"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no report {seq} from the guest in {timeout} s\n{describe()}")
            time.sleep(0.05)
        rep = parse_report(path.read_text())
        assert rep.get("done") == "1", rep
        return rep

    def command(self, word: str, timeout: float = 120,
                describe: Callable[[], str] = lambda: "") -> dict[str, str]:
        """Send ``check`` or ``finish``; returns its report. Before a check the host writes
        new contents at the start of ``rw`` and ``ro`` (same length), which the guest must
        read through its held fds."""
        self.seq += 1
        if word == "check":
            for name in ("rw", "ro"):
                with open(self.share / name, "r+b") as f:
                    f.write(f"host-{name}-{self.seq}".encode().ljust(31) + b"\n")
        line = f"{self.seq} {word}".encode().ljust(CMD_LEN - 1) + b"\n"
        with open(self.share / "ctl" / "cmd", "r+b") as f:
            f.write(line)
        return self.report(self.seq, timeout, describe)


def host_lock_probe(share: Path) -> dict[str, str]:
    """What a host process gets trying the guest's locks without waiting: ``flock`` on
    ``flk`` (LOCK_EX|LOCK_NB) and an OFD write lock on ``plk`` (F_OFD_SETLK, whole file):
    ``"EAGAIN"`` while the guest holds them, ``"got"`` (let go at once) otherwise."""
    result = {}
    with open(share / "flk", "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            result["flock"] = "got"
        except BlockingIOError as e:
            result["flock"] = errno.errorcode[e.errno]
    fd = os.open(share / "plk", os.O_RDWR)
    try:
        lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
            result["fcntl"] = "got"
        except OSError as e:
            result["fcntl"] = errno.errorcode[e.errno]
    finally:
        os.close(fd)
    return result


def direct_blocks(share: Path, count: int) -> list[int]:
    """Indexes of the O_DIRECT writer's first ``count`` blocks that are not on the host as
    written (``block %08d`` then the block's letter); [] when all are."""
    data = (share / "direct").read_bytes()
    bad = []
    for i in range(count):
        block = data[i * BLOCK:(i + 1) * BLOCK]
        head = f"block {i:08d}\n".encode()
        letter = bytes([ord("a") + i % 26])
        want = head + b"\0" + letter * (BLOCK - len(head) - 1)
        if block != want:
            bad.append(i)
    return bad
