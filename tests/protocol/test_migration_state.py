"""Device state for live migration (SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE): the source
daemon writes its inode and open-file tables into the front-end's pipe, a fresh
destination daemon reads them back, and the guest's nodeids and fhs go on working there,
on the same share, without a new INIT or LOOKUP."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from daemon.fs.migration import inode_records
from daemon.protocol import fuse
from daemon.protocol import vhost_user as vu
from tests.support.daemon import daemon_log, start_pyvirtiofsd
from tests.support.frontend import Frontend
from tests.support.reference import stop_daemon

R = vu.Request
SAVE, LOAD = 0, 1
DATA = b"migrated bytes\n" * 100


@contextlib.contextmanager
def daemon(share: Path, sock: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_pyvirtiofsd(share, sock, *extra)
    try:
        yield proc
    except BaseException:
        print(f"--- {sock.name} ---\n{daemon_log(proc)}")
        raise
    finally:
        stop_daemon(proc)


def connect(sock: Path, rings: int) -> Frontend:
    fe = Frontend(str(sock), memory_size=16 << 20, queue_size=64)
    fe.setup(rings, protocol_features=vu.ProtocolFeature.DEVICE_STATE)
    return fe


def stop_rings(fe: Frontend) -> None:
    """As QEMU stops the device before saving: GET_VRING_BASE stops each worker."""
    for index in fe.rings:
        fe.call(R.GET_VRING_BASE, vu.VRING_STATE.pack(index, 0))


def transfer(fe: Frontend, direction: int, blob: bytes = b"") -> tuple[int, bytes]:
    """One SET_DEVICE_STATE_FD/CHECK_DEVICE_STATE round as QEMU drives it: the back-end
    gets one end of a pipe, the front-end reads (save) or writes (load) the other after
    the reply, closes it, then checks. Returns (check result, what was read)."""
    r, w = os.pipe()
    theirs, ours = (w, r) if direction == SAVE else (r, w)
    reply = fe.call(R.SET_DEVICE_STATE_FD, vu.DEVICE_STATE.pack(direction, 0), [theirs])
    os.close(theirs)
    assert vu.decode_u64(reply) == 1 << 8, "back-end should use our pipe (no fd of its own)"
    got = b""
    if direction == SAVE:
        while chunk := os.read(ours, 1 << 16):
            got += chunk
    else:
        with os.fdopen(ours, "wb") as f:
            f.write(blob)
        ours = -1
    if ours >= 0:
        os.close(ours)
    return vu.decode_u64(fe.call(R.CHECK_DEVICE_STATE)), got


def make_share(base: Path) -> Path:
    share = base / "share"
    (share / "dir").mkdir(parents=True)
    (share / "dir" / "file").write_bytes(DATA)
    (share / "other").write_bytes(b"other\n")
    return share


def guest_session(fe: Frontend) -> dict[str, int]:
    """A guest's work on the source: INIT, look-ups, an open file and an open directory."""
    fe.init()
    err, entry = fe.lookup(1, b"dir")
    assert err == 0
    d = fuse.ENTRY_HEAD.unpack_from(entry)[0]
    err, entry = fe.lookup(d, b"file")
    assert err == 0
    f = fuse.ENTRY_HEAD.unpack_from(entry)[0]
    err, entry = fe.lookup(1, b"other")
    o = fuse.ENTRY_HEAD.unpack_from(entry)[0]
    fe.lookup(1, b"other")  # two lookups: the count must survive
    err, out = fe.fuse(fuse.Opcode.OPEN, f, fuse.OPEN_IN.pack(os.O_RDWR, 0))
    assert err == 0
    fh = fuse.OPEN_OUT.unpack_from(out)[0]
    err, out = fe.fuse(fuse.Opcode.OPENDIR, d, fuse.OPEN_IN.pack(0, 0))
    assert err == 0
    dh = fuse.OPEN_OUT.unpack_from(out)[0]
    return {"dir": d, "file": f, "other": o, "fh": fh, "dh": dh}


def save_from(share: Path, sock: Path, *extra: str) -> tuple[dict[str, int], bytes]:
    with daemon(share, sock, *extra):
        fe = connect(sock, 2)
        ids = guest_session(fe)
        stop_rings(fe)
        result, blob = transfer(fe, SAVE)
        assert result == 0
        fe.close()
    return ids, blob


def load_into(share: Path, sock: Path, blob: bytes, *extra: str) -> tuple[Frontend, int]:
    fe = connect(sock, 0)  # QEMU loads the state before it starts the rings
    result, _ = transfer(fe, LOAD, blob)
    if result == 0:
        fe.add_ring(0)
        fe.add_ring(1)
    return fe, result


def read(fe: Frontend, nodeid: int, fh: int, size: int = len(DATA)) -> tuple[int, bytes]:
    return fe.fuse(fuse.Opcode.READ, nodeid, fuse.READ_IN.pack(fh, 0, size, 0, 0, 0, 0),
                   out_size=size + 64)


@pytest.mark.parametrize("mode", ["find-paths", "file-handles"])
def test_nodeids_and_fhs_work_on_the_destination(tmp_path: Path, mode: str) -> None:
    share = make_share(tmp_path)
    ids, blob = save_from(share, tmp_path / "a.sock", "--migration-mode", mode)
    state = msgpack.unpackb(blob)
    assert state["format"] == "pyvirtiofsd-device-state" and state["version"] == 2
    with daemon(share, tmp_path / "b.sock", "--migration-mode", mode) as proc:
        fe, result = load_into(share, tmp_path / "b.sock", blob)
        assert result == 0, daemon_log(proc)
        err, out = fe.fuse(fuse.Opcode.GETATTR, ids["file"], fuse.GETATTR_IN.pack(0, 0, 0))
        assert err == 0
        attr = fuse.ATTR.unpack_from(out, fuse.ATTR_OUT_HEAD.size)
        assert attr[0] == (share / "dir" / "file").stat().st_ino
        assert read(fe, ids["file"], ids["fh"]) == (0, DATA)
        # opened O_RDWR on the source: writable on the destination
        err, out = fe.fuse(fuse.Opcode.WRITE, ids["file"],
                           fuse.WRITE_IN.pack(ids["fh"], 0, 4, 0, 0, 0, 0),
                           extra_readable=[b"MIGR"])
        assert err == 0 and fuse.WRITE_OUT.unpack_from(out)[0] == 4
        assert (share / "dir" / "file").read_bytes()[:4] == b"MIGR"
        err, out = fe.fuse(fuse.Opcode.READDIR, ids["dir"],
                           fuse.READ_IN.pack(ids["dh"], 0, 4096, 0, 0, 0, 0))
        assert err == 0 and b"file" in out
        # the lookup counts came along: two FORGETs of "other" would be one too many
        err, entry = fe.lookup(ids["dir"], b"file")
        assert err == 0 and fuse.ENTRY_HEAD.unpack_from(entry)[0] == ids["file"]
        (share / "late").write_bytes(b"x")
        err, entry = fe.lookup(1, b"late")
        assert err == 0
        assert fuse.ENTRY_HEAD.unpack_from(entry)[0] not in ids.values()
        fe.close()


@pytest.mark.parametrize("sandbox", ["none", "namespace", "chroot"])
def test_paths_are_read_at_the_switch_over(tmp_path: Path, sandbox: str) -> None:
    """find-paths follows a rename the host made after the guest's lookup; in a sandbox
    the fd directory's links are relative to the sandbox's root, the share."""
    share = make_share(tmp_path)
    sock = tmp_path / "a.sock"
    with daemon(share, sock, "--sandbox", sandbox):
        fe = connect(sock, 2)
        ids = guest_session(fe)
        (share / "dir").rename(share / "moved")
        stop_rings(fe)
        result, blob = transfer(fe, SAVE)
        assert result == 0
        fe.close()
    paths = {r["nodeid"]: r["path"] for r in inode_records(msgpack.unpackb(blob))}
    assert paths[ids["file"]] == b"moved/file"
    with daemon(share, tmp_path / "b.sock", "--sandbox", sandbox):
        fe, result = load_into(share, tmp_path / "b.sock", blob)
        assert result == 0
        assert read(fe, ids["file"], ids["fh"]) == (0, DATA)
        fe.close()


@pytest.mark.parametrize("policy", ["abort", "guest-error"])
def test_an_inode_gone_on_the_destination(tmp_path: Path, policy: str) -> None:
    share = make_share(tmp_path)
    ids, blob = save_from(share, tmp_path / "a.sock")
    copy = tmp_path / "copy"
    shutil.copytree(share, copy)
    (copy / "other").unlink()
    with daemon(copy, tmp_path / "b.sock", "--migration-on-error", policy):
        fe, result = load_into(copy, tmp_path / "b.sock", blob)
        if policy == "abort":
            assert result != 0
        else:
            assert result == 0
            err, _ = fe.fuse(fuse.Opcode.GETATTR, ids["other"], fuse.GETATTR_IN.pack(0, 0, 0))
            assert err == -errno.EIO  # as virtiofsd's invalid inode
            assert read(fe, ids["file"], ids["fh"]) == (0, DATA)
        fe.close()


def test_state_is_refused_while_queues_run_and_in_other_phases(tmp_path: Path) -> None:
    share = make_share(tmp_path)
    with daemon(share, tmp_path / "a.sock"):
        fe = connect(tmp_path / "a.sock", 2)
        r, w = os.pipe()
        reply = fe.call(R.SET_DEVICE_STATE_FD, vu.DEVICE_STATE.pack(SAVE, 0), [w])
        assert reply == b"" or vu.decode_u64(reply) & 0xFF  # an error
        stop_rings(fe)
        reply = fe.call(R.SET_DEVICE_STATE_FD, vu.DEVICE_STATE.pack(SAVE, 1), [w])
        assert reply == b"" or vu.decode_u64(reply) & 0xFF
        assert vu.decode_u64(fe.call(R.CHECK_DEVICE_STATE)) != 0
        for fd in (r, w):
            os.close(fd)
        assert fe.call(R.GET_QUEUE_NUM)  # still serving
        fe.close()


def test_garbage_state_fails_the_check(tmp_path: Path) -> None:
    share = make_share(tmp_path)
    with daemon(share, tmp_path / "b.sock"):
        fe, result = load_into(share, tmp_path / "b.sock", b"\x93not a state")
        assert result != 0
        fe.close()


def test_device_state_is_offered(tmp_path: Path) -> None:
    share = make_share(tmp_path)
    with daemon(share, tmp_path / "a.sock"):
        fe = connect(tmp_path / "a.sock", 0)
        pf = vu.decode_u64(fe.call(R.GET_PROTOCOL_FEATURES))
        assert pf & vu.ProtocolFeature.DEVICE_STATE
        fe.close()


@pytest.mark.parametrize("damage", ["short column", "huge slot", "path lengths", "order"])
def test_inconsistent_columns_fail_the_check(tmp_path: Path, damage: str) -> None:
    """A state whose columns do not fit together is refused, never half-used."""
    share = make_share(tmp_path)
    _ids, blob = save_from(share, tmp_path / "a.sock")
    state = msgpack.unpackb(blob)
    inodes = state["inodes"]
    if damage == "short column":
        inodes["lookups"] = inodes["lookups"][:-8]
    elif damage == "huge slot":
        inodes["nodeid"] = inodes["nodeid"][:-8] + (1 << 32 | 0xFFFFFFF0).to_bytes(8, "little")
    elif damage == "path lengths":
        inodes["paths"] += b"x"
    else:  # slots must rise
        n = inodes["nodeid"]
        inodes["nodeid"] = n[8:16] + n[:8] + n[16:]
    with daemon(share, tmp_path / "b.sock") as proc:
        fe, result = load_into(share, tmp_path / "b.sock", msgpack.packb(state))
        assert result != 0
        assert "device state transfer failed" in daemon_log(proc)
        assert fe.call(R.GET_QUEUE_NUM)  # still serving
        fe.close()
