"""Live migration of a guest with a virtio-fs mount between two QEMU 10 processes on this
host, each with its own pyvirtiofsd on the same shared directory: a file the guest opened
before the migration is read and written after it, on the destination daemon, through
the same nodeids and fhs (the device state), and the mount goes on working."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import qemu10
from tests.support.daemon import daemon_log, pyvirtiofsd
from tests.support.migrate import MigrationPair, wait_for

SCRIPT = """
mount -t virtiofs myfs /mnt || exit 1
exec 3< /mnt/held
exec 4>> /mnt/written
echo before >&4
echo "@@READY@@"
i=0
while [ ! -e /mnt/go ] && [ $i -lt 1200 ]; do
    cat /mnt/held >/dev/null; echo $i > /mnt/tick; i=$((i+1)); sleep 0.1
done
echo "go: $(cat /mnt/go)"
echo "held: $(cat <&3)"
echo after >&4
exec 4>&-
exec 3<&-
echo "written: $(cat /mnt/written | tr '\\n' ' ')"
echo new > /mnt/made-after && echo "made: $(cat /mnt/made-after)"
umount /mnt && echo unmounted
"""


@pytest.fixture(scope="module")
def qemu() -> qemu10.Qemu:
    try:
        return qemu10.ensure_qemu()
    except qemu10.QemuUnavailable as e:
        pytest.fail(f"no QEMU >= 8.2 for the migration tests: {e}; bash .ci/setup fetches it")


@pytest.mark.guest
@pytest.mark.parametrize("kernel,queues", [("6.1", 1), ("6.12", 2)])
def test_guest_keeps_its_open_files_across_migration(tmp_path: Path, qemu: qemu10.Qemu,
                                                     kernel: str, queues: int) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "held").write_text("opened before the migration\n")
    src_sock, dst_sock = tmp_path / "src.sock", tmp_path / "dst.sock"
    incoming = tmp_path / "migration.sock"
    uri = f"unix:{incoming}"
    opts = ("--num-request-queues", str(queues))
    with pyvirtiofsd(share, src_sock, *opts) as src_daemon, \
            MigrationPair(qemu, SCRIPT, kernel=kernel, num_request_queues=queues,
                          smp=queues) as pair:
        src = pair.start("src", src_sock)
        wait_for(lambda: "@@READY@@" in src.output(), 180, "guest ready",
                 lambda: src.describe() + daemon_log(src_daemon))
        with pyvirtiofsd(share, dst_sock, *opts) as dst_daemon:
            dst = pair.start("dst", dst_sock, incoming=uri)
            wait_for(incoming.exists, 60, "incoming migration socket",
                     lambda: dst.describe() + daemon_log(dst_daemon))
            info = pair.migrate(src, uri)
            assert info.get("status") == "completed", (
                f"{info}\n{src.describe()}\n{daemon_log(src_daemon)}\n{dst.describe()}\n"
                f"{daemon_log(dst_daemon)}")
            (share / "go").write_text("yes\n")
            wait_for(lambda: dst.proc.poll() is not None, 180, "guest exit on the destination",
                     lambda: dst.describe() + daemon_log(dst_daemon))
            out = dst.output()
            log = daemon_log(dst_daemon)
        assert "go: yes" in out, dst.describe() + log
        assert "held: opened before the migration" in out, dst.describe() + log
        assert "written: before after" in out, dst.describe() + log
        assert "made: new" in out and "unmounted" in out, dst.describe() + log
        assert (share / "written").read_text() == "before\nafter\n"
        assert "device state loaded" in log
        assert "dirty-page logging started" in daemon_log(src_daemon)
        assert "saving the device state" in daemon_log(src_daemon)


@pytest.mark.guest
def test_sandboxed_daemons_migrate(tmp_path: Path, qemu: qemu10.Qemu) -> None:
    """The same with the default --sandbox namespace: paths come from the sandbox's fd
    directory, relative to its root (the share)."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "held").write_text("opened before the migration\n")
    src_sock, dst_sock = tmp_path / "src.sock", tmp_path / "dst.sock"
    incoming = tmp_path / "migration.sock"
    opts = ("--sandbox", "namespace")
    with pyvirtiofsd(share, src_sock, *opts), MigrationPair(qemu, SCRIPT) as pair:
        src = pair.start("src", src_sock)
        wait_for(lambda: "@@READY@@" in src.output(), 180, "guest ready", src.describe)
        with pyvirtiofsd(share, dst_sock, *opts) as dst_daemon:
            dst = pair.start("dst", dst_sock, incoming=f"unix:{incoming}")
            wait_for(incoming.exists, 60, "incoming migration socket", dst.describe)
            assert pair.migrate(src, f"unix:{incoming}").get("status") == "completed"
            (share / "go").write_text("yes\n")
            wait_for(lambda: dst.proc.poll() is not None, 180, "guest exit",
                     lambda: dst.describe() + daemon_log(dst_daemon))
            out = dst.output()
        assert "held: opened before the migration" in out, dst.describe()
        assert "written: before after" in out and "unmounted" in out, dst.describe()


@pytest.mark.guest
def test_a_failed_migration_leaves_the_guest_running_on_the_source(
        tmp_path: Path, qemu: qemu10.Qemu) -> None:
    """The destination's share lacks a file the guest holds open: its daemon fails
    CHECK_DEVICE_STATE (--migration-on-error abort), QEMU fails the migration, and the
    source starts its rings again: new workers go on where the stopped ones were."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "held").write_text("opened before the migration\n")
    other = tmp_path / "other"
    other.mkdir()
    src_sock, dst_sock = tmp_path / "src.sock", tmp_path / "dst.sock"
    incoming = tmp_path / "migration.sock"
    with pyvirtiofsd(share, src_sock) as src_daemon, MigrationPair(qemu, SCRIPT) as pair:
        src = pair.start("src", src_sock)
        wait_for(lambda: "@@READY@@" in src.output(), 180, "guest ready", src.describe)
        with pyvirtiofsd(other, dst_sock) as dst_daemon:
            dst = pair.start("dst", dst_sock, incoming=f"unix:{incoming}")
            wait_for(incoming.exists, 60, "incoming migration socket", dst.describe)
            info = pair.migrate(src, f"unix:{incoming}", destination=dst)
            assert info.get("status") == "failed", info
            assert "device state transfer failed" in daemon_log(dst_daemon)
        (share / "go").write_text("yes\n")
        wait_for(lambda: src.proc.poll() is not None, 180, "guest exit on the source",
                 lambda: src.describe() + daemon_log(src_daemon))
        out = src.output()
        assert "held: opened before the migration" in out, src.describe()
        assert "written: before after" in out and "unmounted" in out, src.describe()
