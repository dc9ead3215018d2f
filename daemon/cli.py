"""Command line, compatible with virtiofsd 1.13 (``--shared-dir``, ``--socket-path``,
``--fd``, ``--cache``, ..., and the legacy ``-o source=...`` form), so libvirt and
scripts can start pyvirtiofsd in its place."""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import resource
import socket
import stat
import sys

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
    p.add_argument("--seccomp", choices=["none", "kill", "log", "trap"], default="kill")
    p.add_argument("--inode-file-handles", choices=["never", "prefer", "mandatory", "fallback"],
                   default="prefer")
    p.add_argument("--xattr", action="store_true")
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
                   help="forward fcntl() locks to the host (default; virtiofsd keeps them "
                        "inside the guest)")
    p.add_argument("--no-posix-lock", dest="posix_lock", action="store_false")
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
            elif key == "log_level":
                args.log_level = value
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


def setup_logging(level: str, use_syslog: bool) -> None:
    handler: logging.Handler
    if use_syslog:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("pyvirtiofsd[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("[%(asctime)s %(levelname)s %(name)s %(process)d] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LOG_LEVELS[level])


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
        if args.sandbox != "none":
            log.warning("--sandbox=%s is not implemented yet; running without a sandbox",
                        args.sandbox)
        return serve(args)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"pyvirtiofsd: error: {e}", file=sys.stderr)
        return 2


def serve(args: argparse.Namespace) -> int:
    import supervisor
    from daemon.passthrough import Config, PassthroughFs
    from shm_table import HandleTable, InodeTable

    log = logging.getLogger("pyvirtiofsd")
    raise_nofile(args.rlimit_nofile)
    os.umask(0)  # modes come from the guest, already masked by its umask
    pid_fd = -1
    if args.fd is not None:
        listener = listener_from_fd(args.fd)
    elif args.socket_path:
        pid_fd = supervisor.lock_pid_file(args.socket_path)
        listener = supervisor.create_listener(args.socket_path, args.socket_group)
    else:
        listener = socket.socket(fileno=3)  # systemd socket activation (LISTEN_FDS)
    name = f"/pyvirtiofsd-{os.getpid()}"
    inodes = InodeTable.create(name + "-inodes", args.inode_table_size)
    handles = HandleTable.create(name + "-handles", args.handle_table_size)
    try:
        config = Config(
            cache=args.cache, readdirplus=not args.no_readdirplus, writeback=args.writeback,
            allow_direct_io=args.allow_direct_io, preserve_noatime=args.preserve_noatime,
            announce_submounts=args.announce_submounts, readonly=args.readonly,
            file_handles=args.inode_file_handles, xattr=args.xattr,
            fd_cache_size=fd_cache_budget(args.num_request_queues),
            posix_lock=args.posix_lock, flock=args.flock,
        )
        fs = PassthroughFs(os.path.abspath(args.shared_dir), inodes, handles, config)
        try:
            fs.add_root()
        except OSError as e:
            log.error("cannot share %s: %s", args.shared_dir, e.strerror or e)
            return 1
        log.info("sharing %s on %s", args.shared_dir,
                 args.socket_path or f"fd {listener.fileno()}")
        return supervisor.run(fs, listener, tag=args.tag,
                              num_request_queues=args.num_request_queues,
                              poll_us=max(0, args.poll_us))
    finally:
        inodes.unlink()
        handles.unlink()
        if args.socket_path:
            for path in (args.socket_path, args.socket_path + ".pid"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if pid_fd >= 0:
            os.close(pid_fd)


if __name__ == "__main__":
    sys.exit(main())
