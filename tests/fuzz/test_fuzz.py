"""The fuzzer in the suite: a CI-sized run (about 60 s, fixed seed corpus and seed) that
fails on any invariant the daemon breaks, printing each finding with its reproducer; and
checks that the fuzzer's own detectors see what they are meant to see (so a quiet run
means a sound daemon, not a blind fuzzer)."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fuzz import checks, covtrace, share
from tests.fuzz.guest import Finding
from tests.fuzz.harness import Instance, Reader

REPO = Path(__file__).resolve().parents[2]
CI_SECONDS = 55


def test_fuzz_ci_run(tmp_path: Path) -> None:
    """~60 s of coverage-guided fuzzing (random inputs where atheris is missing)."""
    cmd = [sys.executable, "-m", "tests.fuzz.run", "--time", str(CI_SECONDS), "--seed", "1",
           "--findings", str(tmp_path / "findings"), "--status", "15"]
    if importlib.util.find_spec("atheris") is None:
        cmd.append("--random")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          timeout=CI_SECONDS + 120)
    out = proc.stdout
    assert "fuzz: summary" in out, f"the fuzzer did not finish:\n{out[-4000:]}\n" \
        f"{proc.stderr[-4000:]}"
    lines = out.splitlines()
    first = [ "\n".join(lines[i : i + 4]) for i, line in enumerate(lines)
              if line.startswith("fuzz: FINDING")]
    summary = out[out.find("fuzz: summary"):]
    assert proc.returncode == 0, (
        "the fuzzer found invariants broken (reproducers in "
        f"{tmp_path / 'findings'}):\n" + "\n".join(first) + "\n" + summary)


# ----- the detectors ---------------------------------------------------------------------


def test_reader_reads_any_bytes_as_a_program() -> None:
    r = Reader(b"\x05\xff")
    assert r.byte() == 5 and r.below(10) == 5 and r.exhausted
    assert r.byte() == 0 and r.u64() == 0  # past the end: zeros, never an error
    assert r.pick([7, 8]) == 7


def test_share_reset_rebuilds_what_changed(tmp_path: Path) -> None:
    root, outside = tmp_path / "share", tmp_path / "outside"
    root.mkdir()
    tree = share.Share(root, outside)
    before = {names: share.signature(root, names) for names in share.GROUPS}
    (root / "dir" / "dir_a").write_bytes(b"changed")
    (root / "n0").mkdir()
    os.unlink(root / "many" / "many_3")
    tree.reset()
    assert not (root / "n0").exists()
    assert (root / "dir" / "dir_a").read_bytes() == b"dir_a" * 10
    assert (root / "many" / "many_3").exists()
    assert stat.S_ISFIFO(os.lstat(root / "fifo").st_mode)
    untouched = ("deep0",)
    assert share.signature(root, untouched) == before[untouched]


def _child(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)


def _audit_after(tmp: Path, root: Path, opens: str) -> Finding | None:
    """Audit a process's fds after it ran ``opens`` (what it had before is its own)."""
    proc = _child(f"import os, sys; sys.stdin.readline(); {opens}; print('ok', flush=True); "
                  "sys.stdin.readline()")
    proc_out = None
    try:
        time.sleep(0.3)
        baseline = {i.fd: i.target for i in checks.list_fds(proc.pid)}
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        time.sleep(0.3)
        try:
            checks.audit_fds(proc.pid, str(root), baseline, set())
        except Finding as e:
            proc_out = e
    finally:
        proc.kill()
        proc.wait()
    return proc_out


def test_fd_audit_sees_special_files_and_files_outside(tmp_path: Path) -> None:
    root = tmp_path / "share"
    root.mkdir()
    os.mkfifo(root / "fifo")
    (root / "file").write_bytes(b"x")
    (tmp_path / "outside").write_bytes(b"x")
    found = _audit_after(tmp_path, root, f"os.open({str(root / 'fifo')!r}, os.O_RDONLY | "
                         f"os.O_NONBLOCK); os.open({str(root)!r}, os.O_PATH)")
    assert found is not None and found.kind == "fd-special", found
    found = _audit_after(tmp_path, root, f"os.open({str(tmp_path / 'outside')!r}, os.O_RDONLY)")
    assert found is not None and found.kind == "fd-outside", found
    found = _audit_after(tmp_path, root, f"os.open({str(root / 'file')!r}, os.O_RDONLY)")
    assert found is not None and found.kind == "fd-leak", found
    assert _audit_after(tmp_path, root, f"os.open({str(root / 'fifo')!r}, os.O_PATH)") is None


def test_blocked_process_is_seen(tmp_path: Path) -> None:
    """A process asleep in open() of a FIFO (what a worker would do on SYNCFS of one)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = _child(f"import os; os.open({str(fifo)!r}, os.O_RDONLY)")
    try:
        deadline = time.monotonic() + 5
        while not checks.blocked_workers([proc.pid]) and time.monotonic() < deadline:
            time.sleep(0.05)
        stuck = checks.blocked_workers([proc.pid])
        assert stuck and stuck[0].syscall in (2, 257), [checks.describe(t) for t in stuck]
        assert "open" in checks.describe(stuck[0])
    finally:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # lets it go
        proc.wait(5)
        os.close(fd)
    assert proc.returncode == 0  # the writer let it out of open(): it was asleep there


def test_open_watch_sees_opens_of_special_files_only(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_bytes(b"")
    watch = checks.OpenWatch()
    try:
        watch.watch_tree(str(tmp_path))
        for name in ("fifo", "file"):
            os.close(os.open(tmp_path / name, os.O_PATH))
        assert watch.special_opens() == []
        os.close(os.open(tmp_path / "file", os.O_RDONLY))
        assert watch.special_opens() == []
        os.close(os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK))
        assert watch.special_opens() == [(str(tmp_path / "fifo"), "FIFO")]
    finally:
        watch.close()


def test_log_scan_names_the_cause() -> None:
    with pytest.raises(Finding) as e:
        checks.scan_log("x\n[... ERROR pyvirtiofsd 1] queue 2: worker 77 died (signal 7); "
                        "restarting it\n")
    assert e.value.kind == "worker-died-SIGBUS"
    with pytest.raises(Finding) as e:
        checks.scan_log("Traceback (most recent call last):\n  boom\n")
    assert e.value.kind == "exception"
    checks.scan_log("[... WARNING] queue 1: opcode 3: unknown nodeid 5\n")


def test_tracer_marks_the_daemons_lines(tmp_path: Path) -> None:
    path = f"/dev/shm/pyvfs-fuzz-test-{os.getpid()}"
    cov = covtrace.CoverageMap(path, create=True)
    try:
        code = ("import sys; from tests.fuzz import covtrace; "
                f"covtrace.start_tracing({path!r}); from daemon.protocol import fuse; "
                "fuse.split_name(b'ab\\0')")
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
        assert any(cov.edges())
        hit, total = covtrace.lines_covered(cov.lines(), covtrace.executable_lines())
        assert 0 < hit < total
    finally:
        cov.close()
        cov.unlink()


def test_c_coverage_marks_edges_of_daemon_sys() -> None:
    """daemon/native/_sys rebuilt with gcc's basic-block hooks takes the plain one's place."""
    path = f"/dev/shm/pyvfs-fuzz-test-c-{os.getpid()}"
    cov = covtrace.CoverageMap(path, create=True)
    try:
        code = ("from tests.fuzz import covtrace; "
                f"covtrace.install_c_coverage(covtrace.CoverageMap({path!r})); "
                "from daemon.native._sys import ffi, lib; "
                "iov = ffi.new('pyvfs_iov_t[1]'); buf = ffi.new('char[8]'); "
                "iov[0].base = int(ffi.cast('uintptr_t', buf)); iov[0].len = 8; "
                "lib.pyvfs_iov_read(iov, 1, 2, buf, 4)")
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
        assert any(cov.c_edges())
        assert not any(cov.edges())  # no Python tracer in this process
    finally:
        cov.close()
        cov.unlink()


def test_used_ring_entries_are_checked(tmp_path: Path) -> None:
    """A used element for a head that is not in flight is a finding."""
    inst = Instance(tmp_path / "i", ["--inode-table-size", "64"], None)
    try:
        g = inst.guest
        ring = g.fe.rings[1]
        u = g.fe.off(ring.used)
        elem = u + 4 + 8 * (ring.last_used % ring.size)
        g.mem[elem : elem + 8] = (77).to_bytes(4, "little") + (16).to_bytes(4, "little")
        g.u16[(u + 2) // 2] = (ring.last_used + 1) & 0xFFFF
        with pytest.raises(Finding) as e:
            g.poll()
        assert e.value.kind == "used-ring" and "77" in e.value.message
    finally:
        inst.close()
