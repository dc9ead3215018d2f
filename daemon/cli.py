"""Command line, compatible with virtiofsd 1.13 (``--shared-dir``, ``--socket-path``,
``--fd``, ``--cache``, ..., and the legacy ``-o source=...`` form), so libvirt and
scripts can start pyvirtiofsd in its place."""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import socket
import stat
import sys
from typing import TYPE_CHECKING

from daemon import capabilities, no_site, sd_notify, seccomp

if TYPE_CHECKING:
    from daemon.queue_stats import QueueStats
    from shm_table import HandleTable, InodeTable

VERSION = "0.1.0"
CAPABILITIES = {"type": "fs", "features": ["separate-options"]}
MAX_TAG_LEN = 36
POLL_US_DEFAULT = 0
LOG_LEVELS = {
    "error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
    "debug": logging.DEBUG, "trace": logging.DEBUG, "off": logging.CRITICAL + 10,
}


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
                   help="accepted and checked for compatibility: capabilities are not "
                        "changed (pyvirtiofsd runs as with --sandbox none)")
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
                   default="find-paths", help="accepted: migration is not implemented yet")
    p.add_argument("--migration-on-error", choices=["abort", "guest-error"], default="abort",
                   help="accepted: migration is not implemented yet")
    p.add_argument("--migration-verify-handles", action="store_true",
                   help="accepted (find-paths only): migration is not implemented yet")
    p.add_argument("--migration-confirm-paths", action="store_true",
                   help="accepted (find-paths only): migration is not implemented yet")
    p.add_argument("--writeback", action="store_true")
    p.add_argument("--no-readdirplus", action="store_true")
    p.add_argument("--allow-direct-io", action="store_true")
    p.add_argument("--preserve-noatime", action="store_true")
    p.add_argument("--announce-submounts", dest="announce_submounts", action="store_true",
                   default=True)
    p.add_argument("--no-announce-submounts", dest="announce_submounts", action="store_false")
    p.add_argument("--readonly", action="store_true")
    p.add_argument("--rlimit-nofile", type=int)
    p.add_argument("--log-level", choices=sorted(LOG_LEVELS), default="info")
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
    p.add_argument("--inode-table-size", type=int, default=1 << 20,
                   help="inode table capacity in shared memory (default 1,048,576)")
    p.add_argument("--handle-table-size", type=int, default=1 << 16,
                   help="open-file table capacity in shared memory (default 65,536)")
    return p


def apply_compat(args: argparse.Namespace) -> None:
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


def validate(args: argparse.Namespace) -> None:
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


def validate_virtiofsd_options(args: argparse.Namespace) -> None:
    """The options of virtiofsd 1.13 whose values or combinations can be wrong."""
    from daemon.idmap import IdMap, IdMapError
    from daemon.xattrmap import XattrMap, XattrMapError

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
    from daemon.sandbox import IdMap

    for option, attr in (("--uid-map", "uid_map"), ("--gid-map", "gid_map")):
        values = getattr(args, attr)
        setattr(args, attr + "s", [IdMap(*parse_ns_map(option, v)) for v in values])
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


SYSLOG_SOCKET = "/dev/log"


def syslog_reachable(path: str = SYSLOG_SOCKET) -> str | None:
    """None if a syslog daemon listens on path, else why not."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(path)
                return None
            except OSError as e:
                why = e.strerror or str(e)
    return why


def setup_logging(level: str, use_syslog: bool) -> None:
    handler: logging.Handler
    unreachable = syslog_reachable() if use_syslog else None
    if use_syslog and unreachable is None:
        # only here: logging.handlers brings pickle and more (~1 MB per daemon)
        from logging.handlers import SysLogHandler

        handler = SysLogHandler(address=SYSLOG_SOCKET)
        handler.setFormatter(logging.Formatter("pyvirtiofsd[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("[%(asctime)s %(levelname)s %(name)s %(process)d] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LOG_LEVELS[level])
    if unreachable is not None:
        logging.getLogger("pyvirtiofsd").warning(
            "--syslog: no syslog daemon on %s (%s); logging to standard error instead",
            SYSLOG_SOCKET, unreachable)


def raise_nofile(limit: int | None) -> None:
    """Like virtiofsd: min(1,000,000, fs.nr_open) unless told otherwise; 0 = leave."""
    if limit == 0:
        return
    if limit is None:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                limit = min(1_000_000, int(f.read()))
        except OSError:
            limit = 1_000_000
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    except (ValueError, OSError):
        # without CAP_SYS_RESOURCE the hard limit is the ceiling
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        logging.getLogger("pyvirtiofsd").info(
            "RLIMIT_NOFILE is %d (the hard limit; %d needs CAP_SYS_RESOURCE)", hard, limit)


def fd_cache_budget(num_request_queues: int) -> int:
    """Each worker's share of RLIMIT_NOFILE for re-opened inode fds: a quarter of what is
    left after memory slots and the daemon's own fds, so open files keep the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    reserve = 509 + 200
    return max(32, min(4096, (soft - reserve) // (4 * (num_request_queues + 1))))


def listener_from_fd(fd: int) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise UsageError(f"--fd {fd}: not an open file descriptor ({e.strerror})") from e
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"--fd {fd}: not a socket")
    return socket.socket(fileno=fd)


SD_LISTEN_FDS_START = 3


def listener_from_systemd() -> socket.socket:
    """The listening socket systemd passed (socket activation: LISTEN_FDS, LISTEN_PID);
    its variables are taken out of the environment, as sd_listen_fds() does."""
    count = os.environ.pop("LISTEN_FDS", "")
    owner = os.environ.pop("LISTEN_PID", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if owner and owner != str(os.getpid()):
        raise UsageError(f"socket activation: LISTEN_PID={owner} names another process "
                         f"(this is {os.getpid()}); give --socket-path or --fd")
    if count != "1":
        raise UsageError(f"socket activation: LISTEN_FDS={count or '(unset)'}, expected "
                         "exactly one socket (one vhost-user socket per daemon); give "
                         "--socket-path or --fd")
    listener = listener_from_fd(SD_LISTEN_FDS_START)
    if listener.type != socket.SOCK_STREAM or listener.family != socket.AF_UNIX:
        raise UsageError("socket activation: fd 3 is not a UNIX stream socket "
                         "(ListenStream= with a path in the .socket unit)")
    return listener


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        no_site.reexec_without_site(argv)  # returns only where it does not apply
    if argv[:1] == ["stats"]:
        from daemon import stats

        return stats.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    try:
        apply_compat(args)
        validate(args)
        setup_logging(args.log_level, args.syslog)
        log = logging.getLogger("pyvirtiofsd")
        if args.allow_mmap and args.cache not in ("metadata", "never"):
            log.info("--allow-mmap only matters with --cache metadata or never (files are "
                     "not opened direct-io with --cache %s)", args.cache)
        return serve(args)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"pyvirtiofsd: error: {e}", file=sys.stderr)
        return 2


def serve(args: argparse.Namespace) -> int:
    from daemon import no_tls

    no_tls.install()  # before supervisor imports asyncio
    import supervisor
    from daemon import sandbox
    from daemon.queue_stats import QueueStats
    from shm_table import HandleTable, InodeTable

    log = logging.getLogger("pyvirtiofsd")
    # connected now: inside the sandbox its path or abstract name is out of reach
    notifier = sd_notify.Notifier.from_environment()
    raise_nofile(args.rlimit_nofile)
    os.umask(0)  # modes come from the guest, already masked by its umask
    pid_fd = -1
    if args.fd is not None:
        listener = listener_from_fd(args.fd)
    elif args.socket_path:
        pid_fd = supervisor.lock_pid_file(args.socket_path)
        listener = supervisor.create_listener(args.socket_path, args.socket_group)
    else:
        listener = listener_from_systemd()
    name = f"/pyvirtiofsd-{os.getpid()}"
    inodes = InodeTable.create(name + "-inodes", args.inode_table_size)
    handles = HandleTable.create(name + "-handles", args.handle_table_size)
    stats = QueueStats.create(name + "-stats", 1 + args.num_request_queues)
    shared_dir = os.path.abspath(args.shared_dir)
    # read while /proc is still there: the sandboxed server sees only its fds in it
    args.cap_last = capabilities.last_cap() if os.geteuid() == 0 else -1
    if args.seccomp != "none":
        try:
            seccomp.load()
        except seccomp.SeccompError as e:
            log.error("--seccomp %s: %s", args.seccomp, e)
            return 1
    try:
        if args.sandbox != "none":
            import uvloop  # noqa: F401 - nothing can be imported once inside

            try:
                outside = sandbox.enter(args.sandbox, shared_dir, args.uid_maps,
                                        args.gid_maps)
            except sandbox.SandboxError as e:
                log.error("--sandbox %s: %s", args.sandbox, e)
                return 1
            if outside is not None:
                listener.close()  # the sandboxed server has its own copy
                return outside.wait()
            # the sandboxed server: it must not clean up host paths (the same names in
            # here are files of the shared directory); the process outside does that
            try:
                code = run_server(args, "/", listener, inodes, handles, notifier, stats)
            finally:
                logging.shutdown()
            os._exit(code)
        return run_server(args, shared_dir, listener, inodes, handles, notifier, stats)
    finally:
        inodes.unlink()
        handles.unlink()
        stats.unlink()
        if args.socket_path:
            for path in (args.socket_path, args.socket_path + ".pid"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if pid_fd >= 0:
            os.close(pid_fd)


def run_server(args: argparse.Namespace, shared_dir: str, listener: socket.socket,
               inodes: InodeTable, handles: HandleTable,
               notifier: sd_notify.Notifier | None = None,
               stats: QueueStats | None = None) -> int:
    import supervisor
    from daemon.passthrough import Config, PassthroughFs

    log = logging.getLogger("pyvirtiofsd")
    config = Config(
        cache=args.cache, readdirplus=not args.no_readdirplus, writeback=args.writeback,
        allow_direct_io=args.allow_direct_io, preserve_noatime=args.preserve_noatime,
        announce_submounts=args.announce_submounts, readonly=args.readonly,
        file_handles=args.inode_file_handles, xattr=args.xattr,
        fd_cache_size=fd_cache_budget(args.num_request_queues),
        posix_lock=args.posix_lock, flock=args.flock,
        uid_map=args.translate_uid_map, gid_map=args.translate_gid_map,
        xattrmap=args.xattrmap_rules, posix_acl=args.posix_acl,
        security_label=args.security_label, killpriv_v2=args.killpriv_v2,
        allow_mmap=args.allow_mmap,
    )
    fs = PassthroughFs(shared_dir, inodes, handles, config)
    try:
        fs.add_root()
    except OSError as e:
        log.error("cannot share %s: %s", args.shared_dir, e.strerror or e)
        return 1
    if args.cap_last >= 0:  # started as root: keep only what serving files needs
        keep = capabilities.retained(fs.use_handles,
                                     parse_modcaps(args.modcaps) if args.modcaps else ())
        try:
            capabilities.drop_all_but(keep, args.cap_last)
        except OSError as e:
            log.error("cannot drop capabilities: %s", e.strerror or e)
            return 1
        log.info("capabilities kept: %s", " ".join(sorted(keep)))
    if args.seccomp != "none":
        try:
            allowed = seccomp.install(args.seccomp)
        except seccomp.SeccompError as e:
            log.error("--seccomp %s: %s", args.seccomp, e)
            return 1
        log.info("seccomp: %d system calls allowed, others %s", allowed,
                 {"kill": "kill the process", "log": "are logged by the kernel",
                  "trap": "raise SIGSYS"}[args.seccomp])
    log.info("sharing %s on %s%s", args.shared_dir,
             args.socket_path or f"fd {listener.fileno()}",
             "" if args.sandbox == "none" else f" (--sandbox {args.sandbox})")
    return supervisor.run(fs, listener, tag=args.tag,
                          num_request_queues=args.num_request_queues,
                          poll_us=max(0, args.poll_us), notifier=notifier, stats=stats,
                          where=args.socket_path or f"fd {listener.fileno()}")


if __name__ == "__main__":
    sys.exit(main())
