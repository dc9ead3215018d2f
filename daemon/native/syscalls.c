/* System calls Python's standard library lacks, and the per-thread fs credentials. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

/* fork-like clone whose child shares the parent's fd table (CLONE_FILES): every
   worker sees the same O_PATH and open-file fds, so fd numbers can live in shared
   memory. The caller wraps it in PyOS_BeforeFork/AfterFork. */
long pyvfs_clone_files(void) {
    return syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
}

/* The same, but the child is the caller's sibling (CLONE_PARENT): a worker cloned by the
   template process is the supervisor's child, reaped and watched by it. */
long pyvfs_clone_sibling(void) {
    return syscall(SYS_clone, CLONE_FILES | CLONE_PARENT | SIGCHLD, 0, 0, 0, 0);
}

/* The calling thread's name (/proc/PID/comm): in C, as a ctypes call would write to
   dozens of the objects a worker shares with the template it was cloned from. */
int pyvfs_set_name(const char *name) {
    return prctl(PR_SET_NAME, name, 0, 0, 0);
}

long pyvfs_getdents64(int fd, char *buf, size_t len) {
    return syscall(SYS_getdents64, fd, buf, len);
}

int pyvfs_fchownat_empty(int fd, unsigned int uid, unsigned int gid) {
    return fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW);
}

int pyvfs_errno(void) { return errno; }

int pyvfs_name_to_handle(int dirfd, const char *name, int flags,
                         unsigned char *out, int out_len, int *handle_type,
                         int *mount_id) {
    struct { struct file_handle fh; unsigned char buf[MAX_HANDLE_SZ]; } h;
    h.fh.handle_bytes = MAX_HANDLE_SZ;
    if (name_to_handle_at(dirfd, name, &h.fh, mount_id, flags) < 0) return -1;
    if ((int)h.fh.handle_bytes > out_len) { errno = EOVERFLOW; return -1; }
    memcpy(out, h.fh.f_handle, h.fh.handle_bytes);
    *handle_type = h.fh.handle_type;
    return (int)h.fh.handle_bytes;
}

int pyvfs_open_by_handle(int mount_fd, const unsigned char *handle, int len,
                         int handle_type, int flags) {
    struct { struct file_handle fh; unsigned char buf[MAX_HANDLE_SZ]; } h;
    if (len < 0 || len > MAX_HANDLE_SZ) { errno = EINVAL; return -1; }
    h.fh.handle_bytes = (unsigned int)len;
    h.fh.handle_type = handle_type;
    memcpy(h.fh.f_handle, handle, (size_t)len);
    return open_by_handle_at(mount_fd, &h.fh, flags);
}

int pyvfs_utimensat(int dirfd, const char *path, long long a_sec, long a_nsec,
                    long long m_sec, long m_nsec, int flags) {
    struct timespec ts[2] = {{(time_t)a_sec, a_nsec}, {(time_t)m_sec, m_nsec}};
    return utimensat(dirfd, path, ts, flags);
}

int pyvfs_renameat2(int olddirfd, const char *oldpath, int newdirfd,
                    const char *newpath, unsigned int flags) {
    return syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
}

/* The worker's parent-death signal, and the parent it was set against. */
static int pdeath_sig;
static pid_t pdeath_parent;

int pyvfs_set_pdeathsig(int sig) {
    pdeath_sig = sig;
    pdeath_parent = getppid();
    return prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0);
}

/* A process that only waits for the server it started (the process outside the sandbox,
   the keeper) waits here, in C: any Python it ran while waiting would write to pages it
   still shares with the server, and each such page is then kept twice (the server has
   written most of them since). SIGTERM and SIGINT are forwarded to the child; SIGHUP is
   forwarded and returned (a live upgrade); ``fd`` (-1: none) becoming readable is
   returned. The three signals and SIGCHLD are blocked while it waits and the caller's
   mask is back on return, so one that arrives while Python runs reaches its handler.
   Without an fd it sleeps in sigwaitinfo (no fd of its own: the keeper shares the
   server's fd table); with one, in poll on that fd and a signalfd. Returns
   PYVFS_CHILD_EXITED with the wait status in *status, PYVFS_CHILD_HUP,
   PYVFS_CHILD_FD_READY, or -errno. */
int pyvfs_wait_child(int pid, int fd, int *status) {
    sigset_t wanted, old;
    sigemptyset(&wanted);
    sigaddset(&wanted, SIGTERM);
    sigaddset(&wanted, SIGINT);
    sigaddset(&wanted, SIGHUP);
    sigaddset(&wanted, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &wanted, &old) < 0)
        return -errno;
    int sfd = -1, ret;
    if (fd >= 0 && (sfd = signalfd(-1, &wanted, SFD_CLOEXEC)) < 0) {
        ret = -errno;
        goto out;
    }
    for (;;) {
        pid_t r = waitpid(pid, status, WNOHANG); /* after blocking: no SIGCHLD is lost */
        if (r == pid) {
            ret = PYVFS_CHILD_EXITED;
            break;
        }
        if (r < 0 && errno != EINTR) {
            ret = -errno;
            break;
        }
        int sig = 0;
        if (sfd >= 0) {
            struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
            if (poll(p, 2, -1) < 0 && errno != EINTR) {
                ret = -errno;
                break;
            }
            if (p[1].revents & POLLIN) {
                struct signalfd_siginfo info;
                if (read(sfd, &info, sizeof info) == (ssize_t)sizeof info)
                    sig = (int)info.ssi_signo;
            } else if (p[0].revents) {
                ret = PYVFS_CHILD_FD_READY;
                break;
            }
        } else {
            sig = sigwaitinfo(&wanted, NULL);
        }
        if (sig == SIGTERM || sig == SIGINT || sig == SIGHUP)
            kill(pid, sig);
        if (sig == SIGHUP) {
            ret = PYVFS_CHILD_HUP;
            break;
        }
    }
out:
    if (sfd >= 0)
        close(sfd);
    sigprocmask(SIG_SETMASK, &old, NULL);
    return ret;
}

/* The sandbox's split (daemon/host/sandbox.py), in C from the fork until the server
   runs Python: the process outside, the keeper and the server share every page of the
   interpreter's heap at the split, and each page one of them writes afterwards is kept
   twice (thrice, when the keeper had written it too). CPython's fork bookkeeping and the
   Python around it wrote ~0.9 MB of them in the keeper's process before it cloned the
   server; that is why there is none: the process has one thread here and holds no lock
   of the interpreter's, so there is nothing to repair (as for the template's clones).

   fork(); in the parent (the process outside) tell the child it is alive (a byte on
   ``ready_w``), then wait right here (pyvfs_wait_child, watching ``watch_fd``) and return
   PYVFS_SPLIT_OUTSIDE plus its first event, with the child's pid in *pid: the parent's
   Python between the fork and its wait wrote ~0.7 MB of pages the server writes too. The
   child arms PR_SET_PDEATHSIG and waits for that byte, so a parent that died first is
   seen as end of file (exit 1). Without ``with_keeper`` it returns 0: it is the server.
   Else it clones the server with CLONE_FILES (one fd table for both; 0 is returned
   there, PDEATHSIG armed) and stays as its keeper (workers/handover/keeper.py): named
   pyvfs-keeper, subreaper of the server's orphans, waiting in pyvfs_wait_child (which
   forwards SIGTERM, SIGINT and SIGHUP) until the server exits; then it returns
   PYVFS_SPLIT_KEEPER with the server's pid in *pid and its wait status. -errno if the
   fork fails. */
long pyvfs_split(int ready_r, int ready_w, int with_keeper, int watch_fd, int *pid,
                 int *status) {
    pid_t child = fork();
    if (child < 0)
        return -errno;
    if (child > 0) {
        close(ready_r);
        if (write(ready_w, "1", 1) != 1) {
            /* the child sees end of file and exits: the wait below sees its status */
        }
        close(ready_w);
        *pid = child;
        int event = pyvfs_wait_child(child, watch_fd, status);
        if (event < 0) { /* not our child: cannot be; as if it had failed */
            *status = 1 << 8;
            event = PYVFS_CHILD_EXITED;
        }
        return PYVFS_SPLIT_OUTSIDE + event;
    }
    close(ready_w);
    char alive = 0;
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 || read(ready_r, &alive, 1) != 1 ||
        alive != '1')
        _exit(1); /* the parent is gone */
    close(ready_r);
    if (!with_keeper)
        return 0;
    long s = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
    if (s < 0)
        _exit(1);
    if (s == 0) {
        pyvfs_set_pdeathsig(SIGKILL); /* the server goes with its keeper */
        return 0;
    }
    prctl(PR_SET_NAME, "pyvfs-keeper", 0, 0, 0);
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); /* the workers come to us (chroot) */
    *pid = (int)s;
    int event;
    while ((event = pyvfs_wait_child((int)s, -1, status)) != PYVFS_CHILD_EXITED) {
        if (event < 0)
            _exit(1); /* not our child: cannot be */
    }
    return PYVFS_SPLIT_KEEPER;
}

/* Make files as the guest's caller: the thread's fsuid/fsgid become the caller's
   (setfsuid/setfsgid act on the calling thread only, unlike os.setresuid), and
   pyvfs_own_fsids switches back where this returns 1. A caller with the daemon's own ids
   (a root guest process with a root daemon) needs no switch: setfsuid/setfsgid to the
   ids in force change nothing (the kernel discards the new credentials, and the
   parent-death signal stays armed), so this returns 0 and the four calls and the re-arm
   are skipped. Rust virtiofsd skips them the same way for a caller with its euid/egid. */
int pyvfs_caller_fsids(unsigned int uid, unsigned int gid, unsigned int own_uid,
                       unsigned int own_gid) {
    if (uid == own_uid && gid == own_gid) return 0;
    setfsgid(gid);
    setfsuid(uid);
    return 1;
}

/* Back to the daemon's own fs ids after a request made files as the guest's caller.
   The kernel clears the parent-death signal on every credential change, fsuid
   included, so a worker that ever served a request as another uid outlived a killed
   supervisor (its control socket never reads EOF: the shared fd table keeps the
   other end open). Re-arm it, and go now if the supervisor died meanwhile. */
void pyvfs_own_fsids(unsigned int uid, unsigned int gid) {
    setfsuid(uid);
    setfsgid(gid);
    if (pdeath_sig) {
        prctl(PR_SET_PDEATHSIG, pdeath_sig, 0, 0, 0);
        if (getppid() != pdeath_parent) _exit(1);
    }
}

/* access(2) of an O_PATH fd's inode with the fsuid/fsgid in force (faccessat2, Linux
   5.8+; ENOSYS before). */
#ifndef SYS_faccessat2
#define SYS_faccessat2 439
#endif
int pyvfs_access_fd(int fd, int mode) {
    return (int)syscall(SYS_faccessat2, fd, "", mode, AT_EACCESS | AT_EMPTY_PATH);
}

/* An xattr call on the inode of an O_PATH fd. f*xattr refuse O_PATH fds, and opening
   the inode could block (a FIFO) or reach a device, so the call takes the magic link
   /proc/self/fd/N, which resolves to the inode without opening it. procdir >= 0 is the
   fd directory the sandbox kept (outside the root with --sandbox chroot): the calling
   process's working directory goes there for this one call and back to its root
   before returning, so no Python code runs with a working directory outside the
   share. Workers are single-threaded processes with a working directory each. */
long pyvfs_xattr(int op, int procdir, int fd, const char *name, void *value,
                 size_t size, int flags) {
    char path[40];
    if (procdir < 0) {
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    } else {
        snprintf(path, sizeof path, "%d", fd);
        if (fchdir(procdir) < 0) return -1;
    }
    long r;
    switch (op) {
    case PYVFS_XATTR_GET: r = getxattr(path, name, value, size); break;
    case PYVFS_XATTR_LIST: r = listxattr(path, value, size); break;
    case PYVFS_XATTR_SET: r = setxattr(path, name, value, size, flags); break;
    case PYVFS_XATTR_REMOVE: r = removexattr(path, name); break;
    default: errno = EINVAL; r = -1;
    }
    if (procdir >= 0) {
        int saved = errno;
        if (chdir("/") < 0) abort();  /* never serve on with a cwd outside the root */
        errno = saved;
    }
    return r;
}

int pyvfs_fallocate(int fd, int mode, long long offset, long long len) {
    return fallocate(fd, mode, (off_t)offset, (off_t)len);
}

int pyvfs_syncfs(int fd) { return syncfs(fd); }
