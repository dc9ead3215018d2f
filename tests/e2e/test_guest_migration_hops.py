"""A 6.12 guest with two request queues is live-migrated three times in a row between fresh
pyvirtiofsd daemons on one share (QEMU 10, A -> B -> C -> D) while ``migholder``
(tests/support/live_migration/holder.c) holds a read-write, a read-only and an append-mode file, a
directory part way through its listing, a shared mapping, a cwd in a subdirectory, a flock
and an fcntl lock, 300 cached dentries, an unlinked open file, and writes with O_DIRECT all
the while. After each hop every held fd must read what the host wrote and write what the
host then finds, inode numbers must be those seen before, and the locks must still exclude
a host process; at the end the listing has every name once and the host has every O_DIRECT
block. In both --migration-mode settings; the unlinked file shows --migration-on-error:
with abort the migration fails and the guest goes on on the source with all its files, with
guest-error that fd alone gets EIO (find-paths; file handles find the file again)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support import qemu10
from tests.support.daemon import start_pyvirtiofsd
from tests.support.live_migration import holder as migholder
from tests.support.live_migration.hops import DaemonStarter, Hops
from tests.support.migrate import MigrationPair

KERNEL, QUEUES, NFILES, HOPS = "6.12", 2, 300, 3
LISTING = {".", ".."} | {f"e{i:03d}" for i in range(migholder.LIST_ENTRIES)}


@pytest.fixture(scope="module")
def qemu() -> qemu10.Qemu:
    try:
        return qemu10.ensure_qemu()
    except qemu10.QemuUnavailable as e:
        pytest.fail(f"no QEMU >= 8.2 for the migration tests: {e}; bash .ci/setup fetches it")


def pyvirtiofsd_starter(mode: str) -> DaemonStarter:
    """Fresh pyvirtiofsd daemons for the hops: two request queues, ``mode``, and the
    --migration-on-error each hop asks for."""
    def start(share: Path, sock: Path, on_error: str) -> subprocess.Popen[bytes]:
        return start_pyvirtiofsd(share, sock, "--num-request-queues", str(QUEUES),
                                 "--migration-mode", mode, "--migration-on-error", on_error)
    return start


def check_round(share: Path, rep: dict[str, str], gone: str, hops: Hops) -> None:
    """What one ``check`` report and the share must show after round ``seq``."""
    seq = int(rep["seq"])
    why = f"report {rep}\n{hops.describe()}"
    assert rep["rw_read"].rstrip() == f"ok:host-rw-{seq}", why
    assert rep["ro_read"].rstrip() == f"ok:host-ro-{seq}", why
    for key in ("rw_write", "app_write", "map_sync", "cwd_write"):
        assert rep[key] == "ok", f"{key}: {why}"
    assert rep["held_ino_changed"] == "0", why
    assert (rep["many_ino_changed"], rep["many_errors"]) == ("0", "0"), why
    assert rep["direct_errors"] == "0", why
    assert rep["gone_read"] == gone, why
    assert rep["gone_write"] == ("ok" if gone.startswith("ok") else gone), why
    listed = rep["listed"].split(",")
    assert len(listed) == len(set(listed)) and set(listed) <= LISTING, why
    # and from the host: the guest's writes through each held fd
    assert (share / "rw").read_bytes()[1024:1056] == f"guest-rw-{seq}".encode().ljust(31) + b"\n"
    assert (share / "app").read_text() == "".join(f"append-{k}\n" for k in range(1, seq + 1))
    assert (share / "map").read_bytes()[64 * seq:64 * seq + 8].rstrip(b"\0") == (
        f"map-{seq}".encode())
    assert (share / "sub" / f"cwd-{seq}").read_text() == f"cwd-{seq}\n"
    assert migholder.host_lock_probe(share) == {"flock": "EAGAIN", "fcntl": "EAGAIN"}, why


@pytest.mark.guest
@pytest.mark.parametrize("mode", ["find-paths", "file-handles"])
def test_guest_holding_files_and_locks_migrates_three_times(
        tmp_path: Path, qemu: qemu10.Qemu, mode: str) -> None:
    share = tmp_path / "share"
    migholder.prepare_share(share, NFILES, unlinked=True)
    # find-paths cannot find an unlinked file again: an abort destination fails the
    # migration, and the hops that follow go to guest-error destinations (EIO on that fd).
    # File handles find it (the source still holds it open), so every hop keeps it.
    find_paths = mode == "find-paths"
    gone_after = "err:EIO" if find_paths else "ok:gone-initial"
    on_error = "guest-error" if find_paths else "abort"
    with MigrationPair(qemu, migholder.guest_script(NFILES, unlinked=True), kernel=KERNEL,
                       num_request_queues=QUEUES, smp=QUEUES,
                       files={migholder.GUEST_PATH: migholder.program()}) as pair:
        hops = Hops(pair, share, tmp_path, pyvirtiofsd_starter(mode))
        try:
            hops.boot()
            holder = migholder.Holder(share)
            setup = holder.report(0, 180, hops.describe)
            assert setup["gone_before"] == "gone-initial", setup
            for name in ("rw", "ro", "app", "map", "list", "sub"):
                assert int(setup[f"ino_{name}"]) == os.stat(share / name).st_ino, setup
            assert migholder.host_lock_probe(share) == {"flock": "EAGAIN", "fcntl": "EAGAIN"}

            if find_paths:
                info = hops.hop("abort")
                assert info.get("status") == "failed", f"{info}\n{hops.describe()}"
                check_round(share, holder.command("check", describe=hops.describe),
                            "ok:gone-initial", hops)
            written: list[int] = []  # O_DIRECT blocks written by each check: always more
            pauses: list[int] = []
            for _ in range(HOPS):
                info = hops.hop(on_error)
                assert info.get("status") == "completed", f"{info}\n{hops.describe()}"
                rep = holder.command("check", describe=hops.describe)
                check_round(share, rep, gone_after, hops)
                written.append(int(rep["direct_count"]))
                pauses.append(round(info["guest_pause_ms"]))

            assert written == sorted(set(written)), written
            done = holder.command("finish", describe=hops.describe)
            print(f"{mode}: guest pauses {pauses} ms, {written[-1]} O_DIRECT blocks")
        finally:
            hops.close()
    listed = done["listed"].split(",")
    assert done["list_eof"] == "1" and sorted(listed) == sorted(LISTING), done
    assert (done["unlock_flock"], done["unlock_fcntl"]) == ("ok", "ok"), done
    count = int(done["direct_count"])
    assert done["direct_errors"] == "0" and count > 0, done
    assert (share / "direct").stat().st_size == count * migholder.BLOCK
    assert migholder.direct_blocks(share, count) == []
    assert migholder.host_lock_probe(share) == {"flock": "got", "fcntl": "got"}
