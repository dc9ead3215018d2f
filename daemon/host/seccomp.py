"""--seccomp kill|log|trap|none: a system-call allow-list for the server, as virtiofsd's.

Installed in the server once it is set up (sandbox entered, capabilities dropped),
before it reads anything from QEMU; workers are cloned later and inherit it. Calls that
are not on the list kill the process (``kill``, the default: the supervisor then sees a
worker die and restarts it, or the daemon ends), are logged by the kernel (``log``, to
find what a new code path needs) or raise SIGSYS (``trap``).

The list is what CPython, uvloop, the cffi extensions and the FUSE operations call on
Linux, taken from traces of the whole test suite (guests included) plus the calls of
rare paths (errors, every FUSE operation and option). libseccomp (Debian package
libseccomp2) turns names into this architecture's numbers and builds the BPF program.

Two calls are allowed only with the arguments the daemon passes (virtiofsd allows clone
and clone3 whatever their flags, and no ioctl at all):

* ioctl: only the requests in IOCTLS. The daemon issues none itself; CPython asks
  TCGETS (isatty, whenever ``open()`` picks a buffering: e.g. linecache reading source
  lines for a logged traceback) and FIONBIO (sockets, ``os.set_blocking``), and may
  toggle close-on-exec with FIOCLEX/FIONCLEX; libuv (uvloop) uses FIONBIO. Anything else
  (TIOCSTI, FICLONE, a device's requests) meets the mode's action.
* clone: only with CLONE_FILES|SIGCHLD, the workers' template's (``pyvfs_clone_files``),
  and with CLONE_FILES|CLONE_PARENT|SIGCHLD, the workers' (``pyvfs_clone_sibling``,
  workers/template/process.py); the server makes no threads and forks nothing else once the
  filter is in (the sandbox forks before). So no namespace flag (CLONE_NEWUSER...), no
  thread. clone3 passes its flags in memory, out of a filter's sight: it fails with
  ENOSYS, which makes glibc fall back to clone.
"""

from __future__ import annotations

import ctypes
import errno
import os

ALLOWED = """
accept accept4 access arch_prctl bind brk capget capset chdir chmod chown clock_getres
clock_gettime clock_nanosleep close close_range connect copy_file_range dup
dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait
eventfd eventfd2 exit exit_group faccessat faccessat2 fadvise64 fallocate fchdir fchmod
fchmodat fchown fchownat fcntl fdatasync fgetxattr flistxattr flock fremovexattr
fsetxattr fstat fstatfs fsync ftruncate futex futex_waitv get_robust_list getcwd
getdents64 getegid geteuid getgid getgroups getpeername getpgid getpgrp getpid getppid
getpriority getrandom getresgid getresuid getrlimit getrusage getsockname getsockopt
gettid gettimeofday getuid getxattr kill lgetxattr link linkat listen listxattr
llistxattr lremovexattr lseek lsetxattr lstat madvise membarrier memfd_create mincore
mkdir mkdirat mknod mknodat mlock mmap mprotect mremap msync munlock munmap name_to_handle_at
nanosleep newfstatat open open_by_handle_at openat openat2 pidfd_open pidfd_send_signal
pipe pipe2 poll ppoll prctl pread64 preadv preadv2 prlimit64 pselect6 pwrite64 pwritev
pwritev2 read readlink readlinkat readv recvfrom recvmmsg recvmsg removexattr rename
renameat renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask
rt_sigqueueinfo rt_sigreturn rt_sigtimedwait rt_tgsigqueueinfo sched_getaffinity
sched_yield select sendfile sendmmsg sendmsg sendto set_robust_list set_tid_address
setfsgid setfsuid setgid setgroups setresgid setresuid setsockopt setuid setxattr
shutdown sigaltstack socket socketpair stat statfs statx symlink symlinkat sync
sync_file_range syncfs sysinfo tgkill time timerfd_create timerfd_gettime
timerfd_settime times tkill truncate umask uname unlink unlinkat utime utimensat utimes
wait4 waitid write writev
""".split()

# ioctl requests (second argument) allowed; see the module's docstring
TCGETS, FIONBIO, FIONCLEX, FIOCLEX = 0x5401, 0x5421, 0x5450, 0x5451
IOCTLS = {"TCGETS": TCGETS, "FIONBIO": FIONBIO, "FIONCLEX": FIONCLEX, "FIOCLEX": FIOCLEX}
# clone flags allowed: the workers' template (pyvfs_clone_files) and a worker
# (pyvfs_clone_sibling), daemon/native/syscalls.c
CLONE_FILES, CLONE_PARENT, SIGCHLD = 0x400, 0x8000, 17
CLONE_FLAGS = [CLONE_FILES | SIGCHLD, CLONE_FILES | CLONE_PARENT | SIGCHLD]
# which argument of clone holds the flags (s390 swaps the first two)
CLONE_FLAGS_ARG = {"s390x": 1, "s390": 1}

# probed by libraries that fall back when told the call does not exist (libuv tries
# io_uring when its loop starts; glibc tries clone3 before clone): ENOSYS rather than the
# mode's action
UNAVAILABLE = ["io_uring_setup", "io_uring_enter", "io_uring_register", "clone3"]

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_TRAP = 0x00030000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000
SCMP_CMP_EQ = 4


class ArgCmp(ctypes.Structure):
    """libseccomp's struct scmp_arg_cmp: argument ``arg`` compared with ``datum_a``."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]
ACTIONS = {"kill": SCMP_ACT_KILL_PROCESS, "trap": SCMP_ACT_TRAP, "log": SCMP_ACT_LOG}


class SeccompError(Exception):
    """The filter could not be built or installed; the message says why."""


_lib: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """Load libseccomp; call it before entering the sandbox, where the library's file
    is out of sight."""
    global _lib
    if _lib is not None:
        return _lib
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as e:
        raise SeccompError(f"libseccomp is not installed ({e}); install the libseccomp2 "
                           "package or run with --seccomp none") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                     ctypes.c_uint]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    _lib = lib
    return lib


def install(mode: str, allowed: list[str] = ALLOWED) -> int:
    """Install the allow-list for this thread and everything it clones later; returns
    the number of calls allowed on this architecture."""
    if mode == "none":
        return 0
    lib = load()
    ctx = lib.seccomp_init(ACTIONS[mode])
    if not ctx:
        raise SeccompError("seccomp_init failed")
    try:
        count = 0
        for name in allowed:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # not a call on this architecture (e.g. open on aarch64)
            rc = lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, number, 0)
            if rc < 0:
                raise SeccompError(f"seccomp_rule_add({name}): error {-rc}")
            count += 1
        for name in UNAVAILABLE:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number >= 0:
                rc = lib.seccomp_rule_add(ctx, SCMP_ACT_ERRNO | errno.ENOSYS, number, 0)
                if rc < 0:
                    raise SeccompError(f"seccomp_rule_add({name}): error {-rc}")
        flags_arg = CLONE_FLAGS_ARG.get(os.uname().machine, 0)
        for name, arg, values in (("ioctl", 1, IOCTLS.values()),
                                  ("clone", flags_arg, CLONE_FLAGS)):
            number = lib.seccomp_syscall_resolve_name(name.encode())
            for value in values:
                cmp = ArgCmp(arg, SCMP_CMP_EQ, value, 0)
                rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 1,
                                                ctypes.byref(cmp))
                if rc < 0:
                    raise SeccompError(f"seccomp_rule_add({name} {value:#x}): error {-rc}")
            count += 1
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise SeccompError(f"seccomp_load: error {-rc}")
        return count
    finally:
        lib.seccomp_release(ctx)
