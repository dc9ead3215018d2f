"""cffi builder for ``daemon._sys``: the few system calls and memory-ordering primitives
Python's standard library lacks (clone with a shared fd table, per-thread fs credentials,
getdents64, fences, guest-memory mapping)."""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    long pyvfs_clone_files(void);
    void pyvfs_fence(void);
    int pyvfs_setfsuid(unsigned int uid);
    int pyvfs_setfsgid(unsigned int gid);
    long pyvfs_getdents64(int fd, char *buf, size_t len);
    uintptr_t pyvfs_mmap_shared(int fd, size_t len, long long offset);
    int pyvfs_munmap(uintptr_t addr, size_t len);
    int pyvfs_fchownat_empty(int fd, unsigned int uid, unsigned int gid);
    int pyvfs_errno(void);
    uint16_t pyvfs_load_u16(uintptr_t addr);
    void pyvfs_store_u16(uintptr_t addr, uint16_t value);
    void pyvfs_store_used(uintptr_t elem, uint32_t id, uint32_t len);
    int pyvfs_name_to_handle(int dirfd, const char *name, int flags,
                             unsigned char *out, int out_len, int *handle_type,
                             int *mount_id);
    int pyvfs_open_by_handle(int mount_fd, const unsigned char *handle, int len,
                             int handle_type, int flags);
    int pyvfs_utimensat(int dirfd, const char *path, long long a_sec, long a_nsec,
                        long long m_sec, long m_nsec, int flags);
    int pyvfs_renameat2(int olddirfd, const char *oldpath, int newdirfd,
                        const char *newpath, unsigned int flags);
    int pyvfs_set_pdeathsig(int sig);
    int pyvfs_fallocate(int fd, int mode, long long offset, long long len);
    int pyvfs_syncfs(int fd);
    #define PYVFS_UTIME_NOW ...
    #define PYVFS_UTIME_OMIT ...
    """
)

ffibuilder.set_source(
    "daemon._sys",
    r"""
    #include <errno.h>
    #include <fcntl.h>
    #include <sched.h>
    #include <signal.h>
    #include <stdint.h>
    #include <stdlib.h>
    #include <string.h>
    #include <sys/fsuid.h>
    #include <sys/mman.h>
    #include <sys/prctl.h>
    #include <sys/stat.h>
    #include <time.h>
    #include <sys/syscall.h>
    #include <unistd.h>

    /* fork-like clone whose child shares the parent's fd table (CLONE_FILES): every
       worker sees the same O_PATH and open-file fds, so fd numbers can live in shared
       memory. The caller wraps it in PyOS_BeforeFork/AfterFork. */
    long pyvfs_clone_files(void) {
        return syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
    }
    void pyvfs_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    /* setfsuid/setfsgid act on the calling thread only, unlike os.setresuid. */
    int pyvfs_setfsuid(unsigned int uid) { return setfsuid(uid); }
    int pyvfs_setfsgid(unsigned int gid) { return setfsgid(gid); }
    long pyvfs_getdents64(int fd, char *buf, size_t len) {
        return syscall(SYS_getdents64, fd, buf, len);
    }
    uintptr_t pyvfs_mmap_shared(int fd, size_t len, long long offset) {
        void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)offset);
        return p == MAP_FAILED ? 0 : (uintptr_t)p;
    }
    int pyvfs_munmap(uintptr_t addr, size_t len) { return munmap((void *)addr, len); }
    int pyvfs_fchownat_empty(int fd, unsigned int uid, unsigned int gid) {
        return fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW);
    }
    int pyvfs_errno(void) { return errno; }
    uint16_t pyvfs_load_u16(uintptr_t addr) {
        return __atomic_load_n((uint16_t *)addr, __ATOMIC_ACQUIRE);
    }
    void pyvfs_store_u16(uintptr_t addr, uint16_t value) {
        __atomic_store_n((uint16_t *)addr, value, __ATOMIC_RELEASE);
    }
    void pyvfs_store_used(uintptr_t elem, uint32_t id, uint32_t len) {
        uint32_t *e = (uint32_t *)elem;
        e[0] = id;
        e[1] = len;
    }
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
    #define PYVFS_UTIME_NOW UTIME_NOW
    #define PYVFS_UTIME_OMIT UTIME_OMIT
    int pyvfs_utimensat(int dirfd, const char *path, long long a_sec, long a_nsec,
                        long long m_sec, long m_nsec, int flags) {
        struct timespec ts[2] = {{(time_t)a_sec, a_nsec}, {(time_t)m_sec, m_nsec}};
        return utimensat(dirfd, path, ts, flags);
    }
    int pyvfs_set_pdeathsig(int sig) { return prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0); }
    int pyvfs_fallocate(int fd, int mode, long long offset, long long len) {
        return fallocate(fd, mode, (off_t)offset, (off_t)len);
    }
    int pyvfs_syncfs(int fd) { return syncfs(fd); }
    int pyvfs_renameat2(int olddirfd, const char *oldpath, int newdirfd,
                        const char *newpath, unsigned int flags) {
        return syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
    }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
