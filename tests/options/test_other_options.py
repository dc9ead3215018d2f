"""The remaining virtiofsd 1.13 options: --allow-mmap, --modcaps, --uid-map/--gid-map,
--seccomp and the migration options: accepted with virtiofsd's syntax and rules, with a
log line where pyvirtiofsd does not act on them, refused (naming the options) where
they cannot hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon import options
from daemon.protocol import fuse
from tests.options.helpers import BASE_FLAGS, init, log_of, run_cli, served, start_error


@pytest.mark.parametrize("cache", ["never", "metadata"])
def test_allow_mmap_negotiates_direct_io_allow_mmap(tmp_path: Path, cache: str) -> None:
    with served(tmp_path, "--allow-mmap", "--cache", cache) as (front, _share, proc):
        err, agreed = init(front, BASE_FLAGS | fuse.DIRECT_IO_ALLOW_MMAP)
        assert err == 0 and agreed & fuse.DIRECT_IO_ALLOW_MMAP
    assert fuse.DIRECT_IO_ALLOW_MMAP >> 32 == 1 << 4  # flags2 bit 4 (FUSE 7.39)
    with served(tmp_path, "--cache", cache) as (front, _share, _):
        err, agreed = init(front, BASE_FLAGS | fuse.DIRECT_IO_ALLOW_MMAP)
        assert err == 0 and not agreed & fuse.DIRECT_IO_ALLOW_MMAP


def test_accepted_options_and_their_log_lines(tmp_path: Path) -> None:
    with served(tmp_path, "--modcaps=+sys_admin:-mknod", "--seccomp", "trap",
                "--migration-mode", "find-paths", "--migration-on-error", "guest-error",
                "--migration-verify-handles", "--migration-confirm-paths",
                "--allow-mmap") as (front, _share, proc):
        assert init(front)[0] == 0
        log = log_of(proc)
    assert "capabilities kept:" in log and "sys_admin" in log and "mknod" not in log
    assert "seccomp: " in log and "others raise SIGSYS" in log
    assert "--allow-mmap only matters with --cache metadata or never" in log
    with served(tmp_path, "--seccomp", "none", "--migration-mode", "file-handles") as (
            front, _share, proc):
        assert init(front)[0] == 0
        log = log_of(proc)
    assert "seccomp" not in log


def test_refused_combinations_name_both_options(tmp_path: Path) -> None:
    for flag in ("--migration-verify-handles", "--migration-confirm-paths"):
        err = start_error(tmp_path, "--migration-mode", "file-handles", flag)
        assert flag in err and "--migration-mode=file-handles" in err
    err = start_error(tmp_path, "--uid-map", ":0:100000:65536:")
    assert "--uid-map" in err and "--sandbox" in err
    err = start_error(tmp_path, "--gid-map", "/0/100000/65536/")
    assert "--gid-map" in err and "--sandbox" in err
    err = start_error(tmp_path, "--uid-map", "0:1:2")
    assert "--uid-map" in err and ":namespace_id:host_id:count:" in err
    for bad, what in (("+chown:", "empty"), ("*chown", "'*'"), ("+bogus_cap", "bogus_cap")):
        err = start_error(tmp_path, f"--modcaps={bad}")
        assert "--modcaps" in err and what in err
    err = start_error(tmp_path, "--modcaps=-dac_read_search", "--inode-file-handles=mandatory")
    assert "--modcaps" in err and "--inode-file-handles=mandatory" in err
    err = start_error(tmp_path, "--migration-mode", "sideways")
    assert "--migration-mode" in err


def test_capabilities_announce_migration() -> None:
    """Live migration works end to end (tests/e2e/test_guest_migration.py): announced as
    virtiofsd 1.13 announces it."""
    r = run_cli("--print-capabilities")
    assert r.returncode == 0
    assert json.loads(r.stdout) == {"type": "fs",
                                    "features": ["migrate-precopy", "separate-options"]}


def test_legacy_o_forms(tmp_path: Path) -> None:
    args = options.build_parser().parse_args(
        ["-o", f"source={tmp_path},posix_acl,security_label,killpriv_v2,allow_direct_io",
         "-o", "modcaps=+sys_admin,xattrmap=:map::user.virtiofs.:,loglevel=err",
         "--socket-path", str(tmp_path / "s")])
    options.apply_compat(args)
    options.validate(args)
    assert args.posix_acl and args.security_label and args.killpriv_v2 and args.xattr
    assert args.allow_direct_io and args.modcaps == "+sys_admin"
    assert args.xattrmap_rules is not None and args.log_level == "error"
    args = options.build_parser().parse_args(["-o", "killpriv_v2,no_killpriv_v2,no_posix_acl"])
    options.apply_compat(args)
    assert not args.killpriv_v2 and not args.posix_acl
