"""Command-line options, compatible with virtiofsd 1.13 (``--shared-dir``, ``--socket-path``,
``--fd``, ``--cache``, ..., and the legacy ``-o source=...`` form), so libvirt and
scripts can start pyvirtiofsd in its place."""

from __future__ import annotations

import gc
import logging
import os
import sys
import types
from typing import TYPE_CHECKING

from daemon.host import capabilities

if TYPE_CHECKING:
    import argparse

VERSION = "0.1.0"
# as virtiofsd 1.13: libvirt allows migrating a guest whose back-end lists migrate-precopy
CAPABILITIES = {"type": "fs", "features": ["migrate-precopy", "separate-options"]}
MAX_TAG_LEN = 36
POLL_US_DEFAULT = 0
C_PATH_ENV = "PYVIRTIOFSD_C_PATH"  # --c-fast-path's default: on (unset) or off
C_PATH_CHOICES = ("on", "off")
LOG_LEVELS = {
    "error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
    "debug": logging.DEBUG, "trace": logging.DEBUG, "off": logging.CRITICAL + 10,
}


class UsageError(Exception):
    pass


# imported only to parse the command line, then dropped (``parse``)
PARSING_MODULES = ("argparse", "gettext")


def parse(argv: list[str]) -> tuple[types.SimpleNamespace, str]:
    """The options as a plain namespace, and the usage line for errors found later.

    argparse and gettext are needed only here, yet their modules and the parser would stay
    in the heap for the daemon's lifetime (~0.35 MB, shared by every process cloned from
    the supervisor): the parser is dropped, the options copied out of argparse's
    Namespace, and both modules taken out of ``sys.modules`` and collected. Nothing in
    the daemon imports them again (a ``stats`` or ``upgrade`` command is a process of its
    own)."""
    already = [name for name in PARSING_MODULES if name in sys.modules]
    parser = build_parser()
    parsed = parser.parse_args(argv)
    usage = parser.format_usage()
    del parser
    for name in PARSING_MODULES:
        if name not in already:
            sys.modules.pop(name, None)
    options = types.SimpleNamespace(**vars(parsed))
    del parsed
    # collected now rather than just before the first clone: the rest of the start-up
    # fills the holes they leave, where the supervisor would fill them after the clone
    # (each page it writes then is copied)
    gc.collect()
    return options, usage


def help_width() -> int:
    """The width argparse would ask ``shutil.get_terminal_size`` for, found without
    importing shutil: that loads bz2 and lzma, libraries the daemon would then carry."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


def build_parser() -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=help_width()),
        prog="pyvirtiofsd",
        description="virtio-fs vhost-user device daemon (drop-in for virtiofsd 1.13)",
    )
    p.add_argument("--shared-dir", help="directory to share with the guest")
    p.add_argument("--socket-path", help="vhost-user UNIX socket to create and listen on")
    p.add_argument("--socket", dest="socket_path_deprecated", help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, help="already-listening vhost-user socket fd (libvirt)")
    p.add_argument("--socket-group", help="give this group read/write access to the socket")
    p.add_argument("--tag", help="mount tag served in the device config space (<= 36 bytes)")
    p.add_argument("--cache", choices=["auto", "always", "metadata", "never"], default="auto")
    p.add_argument("--thread-pool-size", type=int, default=0,
                   help="accepted for compatibility: each queue has its own worker process")
    p.add_argument("--sandbox", choices=["namespace", "chroot", "none"], default="namespace")
    p.add_argument("--keeper", action="store_true",
                   help="with --sandbox none: serve from a child process whose fds a keeper "
                        "holds, so a killed supervisor is replaced as in the sandbox modes")
    p.add_argument("--seccomp", choices=["none", "kill", "log", "trap"], default="kill",
                   help="what a system call outside the server's allow-list does (default "
                        "kill)")
    p.add_argument("--inode-file-handles", choices=["never", "prefer", "mandatory", "fallback"],
                   default="prefer")
    p.add_argument("--xattr", action="store_true")
    p.add_argument("--posix-acl", action="store_true",
                   help="POSIX ACLs (implies --xattr; the guest must offer POSIX_ACL, "
                        "DONT_MASK and SETXATTR_EXT)")
    p.add_argument("--security-label", action="store_true",
                   help="store the security label the guest sends at file creation "
                        "(implies --xattr)")
    p.add_argument("--xattrmap", metavar="RULES",
                   help="xattr name translation rules, e.g. :map::user.virtiofs.: "
                        "(implies --xattr)")
    p.add_argument("--killpriv-v2", dest="killpriv_v2", action="store_true", default=False,
                   help="negotiate FUSE_HANDLE_KILLPRIV_V2: the daemon clears setuid/setgid "
                        "on write, truncate and open(O_TRUNC)")
    p.add_argument("--no-killpriv-v2", dest="killpriv_v2", action="store_false",
                   help="do not negotiate FUSE_HANDLE_KILLPRIV_V2 (default)")
    p.add_argument("--allow-mmap", action="store_true",
                   help="with --cache metadata or never, let the guest mmap files shared "
                        "(FUSE_DIRECT_IO_ALLOW_MMAP)")
    p.add_argument("--modcaps", metavar="[+-]CAP:...",
                   help="started as root, add (+) or remove (-) capabilities from the set "
                        f"the server keeps (virtiofsd's: {', '.join(capabilities.SERVING)}, "
                        "and dac_read_search while it uses file handles); all others are "
                        "dropped")
    p.add_argument("--uid-map", action="append", default=[], metavar=":NS:HOST:COUNT:",
                   help="uid map of the user namespace --sandbox namespace creates when "
                   "not started as root (repeatable; beyond the daemon's own uid it needs "
                   "newuidmap and /etc/subuid)")
    p.add_argument("--gid-map", action="append", default=[], metavar=":NS:HOST:COUNT:",
                   help="gid map of the user namespace, as --uid-map (newgidmap, /etc/subgid)")
    p.add_argument("--translate-uid", action="append", default=[], metavar="TYPE:A:B:COUNT",
                   help="translate uids between guest and host in the daemon; types guest, "
                        "host, squash-guest, squash-host, forbid-guest, map (repeatable)")
    p.add_argument("--translate-gid", action="append", default=[], metavar="TYPE:A:B:COUNT",
                   help="same as --translate-uid, for gids")
    p.add_argument("--migration-mode", choices=["find-paths", "file-handles"],
                   default="find-paths", help="how the destination finds each inode again "
                   "after a live migration: its path, or its file handle")
    p.add_argument("--migration-on-error", choices=["abort", "guest-error"], default="abort",
                   help="destination: an inode that cannot be found fails the migration "
                   "(abort) or gives the guest errors for it (guest-error)")
    p.add_argument("--migration-verify-handles", action="store_true",
                   help="find-paths: the destination compares the file handles of what it "
                   "found with the source's")
    p.add_argument("--migration-confirm-paths", action="store_true",
                   help="find-paths: the source re-opens each path at the switch-over and "
                   "checks that it is the same inode")
    p.add_argument("--writeback", action="store_true")
    p.add_argument("--no-readdirplus", action="store_true")
    p.add_argument("--allow-direct-io", action="store_true")
    p.add_argument("--preserve-noatime", action="store_true")
    p.add_argument("--announce-submounts", dest="announce_submounts", action="store_true",
                   default=True)
    p.add_argument("--no-announce-submounts", dest="announce_submounts", action="store_false")
    p.add_argument("--readonly", action="store_true")
    p.add_argument("--rlimit-nofile", type=int)
    p.add_argument("--log-level", choices=sorted(LOG_LEVELS), default="info",
                   help="debug logs each request answered in Python; requests answered in "
                        "C (see --c-fast-path) are not logged one by one")
    p.add_argument("--syslog", action="store_true")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user backend capabilities as JSON and exit")
    p.add_argument("-V", "--version", action="version", version=f"pyvirtiofsd {VERSION}")
    p.add_argument("-o", dest="compat", action="append", default=[],
                   help="legacy C virtiofsd options: source=DIR,cache=...,xattr,...")
    p.add_argument("-d", dest="compat_debug", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-f", dest="compat_foreground", action="store_true", help=argparse.SUPPRESS)
    # pyvirtiofsd's own
    p.add_argument("--posix-lock", dest="posix_lock", action="store_true", default=True,
                   help="forward fcntl() locks to the host, owned by the guest's lock owner "
                        "(POSIX semantics), so host processes and other guests are excluded "
                        "(default)")
    p.add_argument("--no-posix-lock", dest="posix_lock", action="store_false",
                   help="keep fcntl() locks inside the guest, as virtiofsd does")
    p.add_argument("--flock", dest="flock", action="store_true", default=True,
                   help="forward flock() locks to the host (default)")
    p.add_argument("--no-flock", dest="flock", action="store_false")
    p.add_argument("--num-request-queues", type=int, default=16,
                   help="most request queues served (one worker process each; default 16)")
    p.add_argument("--poll-us", type=int, default=POLL_US_DEFAULT,
                   help="after draining a request queue, busy-poll it this many microseconds "
                        "before sleeping (saves guest kicks and wake-ups; 0 = off)")
    p.add_argument("--c-fast-path", choices=C_PATH_CHOICES,
                   default=os.environ.get(C_PATH_ENV, "on"),
                   help="pyvirtiofsd's own, for debugging and differential tests: off "
                        "answers every request in Python (logged one by one at --log-level "
                        "debug), on (default) lets the C fast path answer the common ones; "
                        f"the default can be set with the environment variable {C_PATH_ENV}")
    p.add_argument("--inode-table-size", type=int, default=1 << 20,
                   help="inode table capacity in shared memory (default 1,048,576)")
    p.add_argument("--handle-table-size", type=int, default=1 << 16,
                   help="open-file table capacity in shared memory (default 65,536)")
    return p


def apply_compat(args: argparse.Namespace | types.SimpleNamespace) -> None:
    for group in args.compat:
        for item in group.split(","):
            if not item:
                continue
            key, _, value = item.partition("=")
            if key == "source":
                args.shared_dir = value
            elif key == "cache":
                args.cache = {"none": "never"}.get(value, value)
                if args.cache not in ("auto", "always", "metadata", "never"):
                    raise UsageError(f"-o cache={value}: expected auto, always, metadata or none")
            elif key == "sandbox":
                args.sandbox = value
            elif key == "xattr":
                args.xattr = True
            elif key == "no_xattr":
                args.xattr = False
            elif key == "readdirplus":
                args.no_readdirplus = False
            elif key == "no_readdirplus":
                args.no_readdirplus = True
            elif key == "writeback":
                args.writeback = True
            elif key == "no_writeback":
                args.writeback = False
            elif key == "announce_submounts":
                args.announce_submounts = True
            elif key in ("log_level", "loglevel"):
                args.log_level = {"err": "error"}.get(value, value)
                if args.log_level not in LOG_LEVELS:
                    raise UsageError(f"-o {item}: expected debug, info, warn or err")
            elif key in ("allow_direct_io", "no_allow_direct_io"):
                args.allow_direct_io = key == "allow_direct_io"
            elif key in ("killpriv_v2", "no_killpriv_v2"):
                args.killpriv_v2 = key == "killpriv_v2"
            elif key in ("posix_acl", "no_posix_acl"):
                args.posix_acl = key == "posix_acl"
            elif key in ("security_label", "no_security_label"):
                args.security_label = key == "security_label"
            elif key == "modcaps":
                args.modcaps = value
            elif key == "xattrmap":
                args.xattrmap = value
            elif key in ("posix_lock", "no_posix_lock"):
                args.posix_lock = key == "posix_lock"
            elif key in ("flock", "no_flock"):
                args.flock = key == "flock"
            else:
                raise UsageError(f"-o {item}: unknown legacy option")
    if args.socket_path_deprecated and not args.socket_path:
        args.socket_path = args.socket_path_deprecated


def validate(args: argparse.Namespace | types.SimpleNamespace) -> None:
    if args.shared_dir is None:
        raise UsageError("--shared-dir is required (the directory to share)")
    if not os.path.isdir(args.shared_dir):
        raise UsageError(f"--shared-dir {args.shared_dir}: not a directory")
    if (args.socket_path is None) == (args.fd is None) and not os.environ.get("LISTEN_FDS"):
        raise UsageError("give exactly one of --socket-path and --fd")
    if args.socket_path is not None and args.fd is not None:
        raise UsageError("--socket-path and --fd cannot be used together")
    if args.tag is not None and len(args.tag.encode()) > MAX_TAG_LEN:
        raise UsageError(f"--tag {args.tag!r} is longer than {MAX_TAG_LEN} bytes")
    if not 1 <= args.num_request_queues <= 256:
        raise UsageError("--num-request-queues must be between 1 and 256")
    if args.inode_table_size < 16 or args.handle_table_size < 16:
        raise UsageError("--inode-table-size and --handle-table-size must be at least 16")
    if args.c_fast_path not in C_PATH_CHOICES:  # a default from the environment
        raise UsageError(f"{C_PATH_ENV}={args.c_fast_path}: expected on or off")
    if args.inode_file_handles == "fallback":
        args.inode_file_handles = "prefer"
    validate_virtiofsd_options(args)


# Linux capability names (capability.h), as libcap-ng knows them
LINUX_CAPABILITIES = capabilities.NAMES


def parse_modcaps(value: str) -> list[tuple[str, str]]:
    """``+cap:-cap``: (action, name) pairs, checked like virtiofsd."""
    out = []
    for item in value.split(":"):
        if not item:
            raise UsageError(f"--modcaps={value}: empty entry (expected (+|-)capability:...)")
        action, name = item[0], item[1:].lower()
        if action not in "+-":
            raise UsageError(f"--modcaps={value}: invalid action {action!r} in {item!r} "
                             "(expected '+' or '-')")
        if name not in LINUX_CAPABILITIES:
            raise UsageError(f"--modcaps={value}: unknown capability {item[1:]!r}")
        out.append((action, name))
    return out


def parse_ns_map(option: str, value: str) -> tuple[int, int, int]:
    """``:inside:outside:count:`` with any non-alphanumeric separator (virtiofsd's
    --uid-map/--gid-map syntax)."""
    if not value or value[-1].isalnum() or value[0] != value[-1] or len(value) < 2:
        raise UsageError(f"{option}={value}: expected :namespace_id:host_id:count:")
    sep = value[-1]
    fields = value[1:-1].split(sep)
    if len(fields) != 3 or not all(f.isdigit() and int(f) < 1 << 32 for f in fields):
        raise UsageError(f"{option}={value}: expected :namespace_id:host_id:count:")
    return int(fields[0]), int(fields[1]), int(fields[2])


def validate_virtiofsd_options(args: argparse.Namespace | types.SimpleNamespace) -> None:
    """The options of virtiofsd 1.13 whose values or combinations can be wrong."""
    from daemon.fs.idmap import IdMap, IdMapError
    from daemon.fs.xattrmap import XattrMap, XattrMapError

    for option, attr in (("--translate-uid", "translate_uid"),
                         ("--translate-gid", "translate_gid")):
        texts = getattr(args, attr)
        if texts and args.posix_acl:
            raise UsageError(f"{option} cannot be used with --posix-acl (translating ids "
                             "in the daemon would break POSIX ACLs)")
        try:
            setattr(args, attr + "_map",
                    IdMap.parse(attr[-3:], texts) if texts else None)
        except IdMapError as e:
            raise UsageError(f"{option}: {e}") from None
    args.xattrmap_rules = None
    if args.xattrmap is not None:
        try:
            args.xattrmap_rules = XattrMap(args.xattrmap)
        except XattrMapError as e:
            raise UsageError(f"--xattrmap {args.xattrmap!r}: {e}") from None
    if args.posix_acl or args.security_label or args.xattrmap is not None:
        args.xattr = True
    if args.modcaps is not None:
        mods = parse_modcaps(args.modcaps)
        if (("-", "dac_read_search") in mods and args.inode_file_handles != "never"
                and os.geteuid() == 0):
            raise UsageError(f"--modcaps={args.modcaps} cannot remove dac_read_search with "
                             f"--inode-file-handles={args.inode_file_handles} (file handles "
                             "need it)")
    from daemon.host.sandbox import NamespaceIdMap

    for option, attr in (("--uid-map", "uid_map"), ("--gid-map", "gid_map")):
        values = getattr(args, attr)
        setattr(args, attr + "s", [NamespaceIdMap(*parse_ns_map(option, v)) for v in values])
        if values and args.sandbox != "namespace":
            raise UsageError(f"{option} maps ids in the user namespace that --sandbox "
                             f"namespace creates; it cannot be used with --sandbox "
                             f"{args.sandbox}")
        if values and os.geteuid() == 0:
            raise UsageError(f"{option} is for an unprivileged daemon (as root no user "
                             "namespace is created); use --translate-uid/--translate-gid")
    if args.sandbox == "chroot" and os.geteuid() != 0:
        raise UsageError("--sandbox chroot needs root; use --sandbox namespace or none")
    if args.migration_mode == "file-handles":
        for flag in ("--migration-verify-handles", "--migration-confirm-paths"):
            if getattr(args, flag[2:].replace("-", "_")):
                raise UsageError(f"{flag} cannot be used with --migration-mode=file-handles "
                                 "(only with find-paths, where it is needed)")
