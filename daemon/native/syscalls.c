/* System calls Python's standard library lacks, and the per-thread fs credentials. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
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
