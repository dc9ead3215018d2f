"""cffi builder for ``daemon.native._sys``: the few system calls and memory-ordering primitives
Python's standard library lacks (clone with a shared fd table, per-thread fs credentials,
getdents64, fences, guest-memory mapping)."""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _fast_path_source() -> str:
    """GETATTR/LOOKUP/FORGET in C and the workers' fd cache (daemon/native/fast_path.c)."""
    with open(os.path.join(HERE, "fast_path.c")) as f:
        return f.read()


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
    void pyvfs_own_fsids(unsigned int uid, unsigned int gid);
    #define PYVFS_XATTR_GET ...
    #define PYVFS_XATTR_LIST ...
    #define PYVFS_XATTR_SET ...
    #define PYVFS_XATTR_REMOVE ...
    long pyvfs_xattr(int op, int procdir, int fd, const char *name, void *value,
                     size_t size, int flags);
    int pyvfs_access_fd(int fd, int mode);
    typedef struct { uint64_t gpa; uint64_t size; uint64_t host; } pyvfs_region_t;
    typedef struct { uint64_t base; uint64_t len; } pyvfs_iov_t;
    int pyvfs_walk_chain(uint64_t desc_host, uint32_t qsize, uint32_t head, int indirect_ok,
                         const pyvfs_region_t *regions, int nregions,
                         pyvfs_iov_t *rd, int *rd_n, uint64_t *rd_len,
                         pyvfs_iov_t *wr, int *wr_n, uint64_t *wr_len, int max_iov,
                         uint64_t *detail);
    uint64_t pyvfs_iov_read(const pyvfs_iov_t *iov, int n, uint64_t offset, void *dst,
                            uint64_t len);
    uint64_t pyvfs_iov_write(const pyvfs_iov_t *iov, int n, uint64_t offset, const void *src,
                             uint64_t len);
    long long pyvfs_iov_preadv(int fd, const pyvfs_iov_t *iov, int n, uint64_t skip,
                               uint64_t len, long long file_offset);
    long long pyvfs_iov_pwritev(int fd, const pyvfs_iov_t *iov, int n, uint64_t skip,
                                uint64_t len, long long file_offset);
    int pyvfs_fast_io(const pyvfs_iov_t *rd, int rd_n, uint64_t rd_len,
                      const pyvfs_iov_t *wr, int wr_n, uint64_t wr_len,
                      uint64_t handles, uint64_t pin_fn, uint64_t unpin_fn,
                      int allow_write, uint32_t *written);
    int pyvfs_fallocate(int fd, int mode, long long offset, long long len);
    int pyvfs_syncfs(int fd);
    /* daemon/native/fast_path.c */
    typedef struct {
        uint64_t capacity;
        uint64_t count;
        uint64_t opened;
        uint64_t hits;
        ...;
    } pyvfs_fdcache_t;
    pyvfs_fdcache_t *pyvfs_fdc_new(uint64_t capacity);
    void pyvfs_fdc_free(pyvfs_fdcache_t *c);
    int pyvfs_fdc_get(pyvfs_fdcache_t *c, uint64_t nodeid);
    int pyvfs_fdc_put(pyvfs_fdcache_t *c, uint64_t nodeid, int fd);
    void pyvfs_fdc_drop(pyvfs_fdcache_t *c, uint64_t nodeid);
    void pyvfs_fdc_clear(pyvfs_fdcache_t *c);
    int pyvfs_fdc_pin(pyvfs_fdcache_t *c, uint64_t nodeid);
    void pyvfs_fdc_unpin(pyvfs_fdcache_t *c, uint64_t nodeid);
    typedef struct {
        uint64_t handles, ht_pin, ht_unpin;
        int32_t allow_write;
        int32_t meta;
        uint64_t inodes, it_pin, it_unpin, it_claim_or_insert, it_forget, it_lookup,
                 it_handle_of, it_claim, seg_removals;
        pyvfs_fdcache_t *fd_cache;
        uint64_t session;
        uint64_t submounts_flag;
        int64_t root_mnt_id;
        int32_t mount_fd;
        int32_t use_handles;
        int32_t mandatory;
        uint32_t timeout_nsec;
        uint64_t timeout_sec;
        uint64_t ht_close;
        int32_t allow_unlink;
        uint64_t ht_open;
        uint32_t create_clear;
        uint32_t create_fopen;
        uint32_t own_uid, own_gid;
        int32_t negative_lookup;
        uint64_t lock_live;
        uint64_t c_ops;
    } pyvfs_fast_ctx_t;
    int pyvfs_fast(const pyvfs_iov_t *rd, int rd_n, uint64_t rd_len,
                   const pyvfs_iov_t *wr, int wr_n, uint64_t wr_len,
                   const pyvfs_fast_ctx_t *c, uint32_t *written);
    typedef struct {
        uint64_t desc, avail, used;
        const pyvfs_region_t *regions;
        int32_t nregions;
        uint32_t size;
        int32_t indirect;
        uint16_t last_avail;
        uint16_t used_idx;
        int32_t event_idx;
        uint16_t signalled_used;
        uint16_t signalled_valid;
    } pyvfs_queue_t;
    typedef struct {
        int32_t epoll_fd, kick_fd, call_fd;
        int32_t timeout_ms;
        int32_t enabled;
        int32_t fast;
        uint64_t gather_ns;
        uint64_t poll_ns;
        uint32_t flags;
    } pyvfs_serve_t;
    #define PYVFS_DRAINING ...
    #define PYVFS_PUSHED ...
    #define PYVFS_SERVE_CHAIN ...
    #define PYVFS_SERVE_CONTROL ...
    #define PYVFS_SERVE_TIMEOUT ...
    #define PYVFS_SERVE_ERROR ...
    void pyvfs_queue_disable(pyvfs_queue_t *q);
    int pyvfs_queue_enable(pyvfs_queue_t *q);
    int pyvfs_queue_should_notify(pyvfs_queue_t *q);
    typedef struct {
        uint64_t requests, in_c, errors, dropped, read_bytes, write_bytes, wakeups, notifies;
        uint64_t by_opcode[64];
    } pyvfs_qstats_t;
    void pyvfs_stats_attach(pyvfs_qstats_t *row);
    void pyvfs_stats_note(const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                          uint32_t written, int in_c);
    int pyvfs_serve(pyvfs_queue_t *q, pyvfs_iov_t *rd, pyvfs_iov_t *wr, int *counts,
                    uint64_t *lens, uint64_t *detail, uint32_t *head, int max_iov,
                    const pyvfs_fast_ctx_t *c, pyvfs_serve_t *s);
    void pyvfs_queue_push(pyvfs_queue_t *q, uint32_t head, uint32_t len);
    int pyvfs_drain(pyvfs_queue_t *q, pyvfs_iov_t *rd, pyvfs_iov_t *wr, int *counts,
                    uint64_t *lens, uint64_t *detail, uint32_t *head, int max_iov,
                    const pyvfs_fast_ctx_t *c, int fast, uint32_t *answered);
    #define PYVFS_UTIME_NOW ...
    #define PYVFS_UTIME_OMIT ...
    """
)

ffibuilder.set_source(
    "daemon.native._sys",
    r"""
    #include <errno.h>
    #include <fcntl.h>
    #include <sched.h>
    #include <signal.h>
    #include <stdint.h>
    #include <stdlib.h>
    #include <string.h>
    #include <sys/epoll.h>
    #include <sys/fsuid.h>
    #include <sys/mman.h>
    #include <sys/prctl.h>
    #include <sys/stat.h>
    #include <time.h>
    #include <sys/syscall.h>
    #include <sys/uio.h>
    #include <sys/xattr.h>
    #include <stdio.h>
    #include <linux/fuse.h>
    #include <limits.h>
    #include <unistd.h>
    /* the shared tables' functions, called through addresses the tables hand over
       (InodeTable.c_api, HandleTable.c_api): their declarations type-check every call */
    #include "native.h"

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
    /* The worker's parent-death signal, and the parent it was set against. */
    static int pdeath_sig;
    static pid_t pdeath_parent;
    int pyvfs_set_pdeathsig(int sig) {
        pdeath_sig = sig;
        pdeath_parent = getppid();
        return prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0);
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
    /* An xattr call on the inode of an O_PATH fd. f*xattr refuse O_PATH fds, and opening
       the inode could block (a FIFO) or reach a device, so the call takes the magic link
       /proc/self/fd/N, which resolves to the inode without opening it. procdir >= 0 is the
       fd directory the sandbox kept (outside the root with --sandbox chroot): the calling
       process's working directory goes there for this one call and back to its root
       before returning, so no Python code runs with a working directory outside the
       share. Workers are single-threaded processes with a working directory each. */
    /* access(2) of an O_PATH fd's inode with the fsuid/fsgid in force (faccessat2, Linux
       5.8+; ENOSYS before). */
    #ifndef SYS_faccessat2
    #define SYS_faccessat2 439
    #endif
    int pyvfs_access_fd(int fd, int mode) {
        return (int)syscall(SYS_faccessat2, fd, "", mode, AT_EACCESS | AT_EMPTY_PATH);
    }
    #define PYVFS_XATTR_GET 0
    #define PYVFS_XATTR_LIST 1
    #define PYVFS_XATTR_SET 2
    #define PYVFS_XATTR_REMOVE 3
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
    /* ---- descriptor chains: walked and bounds-checked in C, data moved by the kernel */
    typedef struct { uint64_t gpa; uint64_t size; uint64_t host; } pyvfs_region_t;
    typedef struct { uint64_t base; uint64_t len; } pyvfs_iov_t;
    _Static_assert(sizeof(pyvfs_iov_t) == sizeof(struct iovec), "iovec layout");
    struct pyvfs_vdesc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
    #define VDESC_F_NEXT 1
    #define VDESC_F_WRITE 2
    #define VDESC_F_INDIRECT 4
    enum { WALK_BAD_INDEX = -1, WALK_LOOP = -2, WALK_BAD_ADDRESS = -3, WALK_BAD_INDIRECT = -4,
           WALK_READ_AFTER_WRITE = -5, WALK_TOO_MANY = -6, WALK_BAD_TABLE = -7,
           WALK_OVERFLOW = -8 };

    static const pyvfs_region_t *region_of(const pyvfs_region_t *r, int n, uint64_t gpa) {
        for (int i = 0; i < n; i++)
            if (gpa >= r[i].gpa && gpa - r[i].gpa < r[i].size) return &r[i];
        return NULL;
    }

    /* Append [gpa, gpa+len) to out as host ranges, split at region borders and merged
       with the previous range when contiguous. */
    static int add_range(const pyvfs_region_t *r, int n, uint64_t gpa, uint64_t len,
                         pyvfs_iov_t *out, int *count, int max) {
        if (len > UINT64_MAX - gpa) return WALK_OVERFLOW;
        while (len) {
            const pyvfs_region_t *reg = region_of(r, n, gpa);
            if (!reg) return WALK_BAD_ADDRESS;
            uint64_t off = gpa - reg->gpa;
            uint64_t take = reg->size - off;
            if (take > len) take = len;
            uint64_t host = reg->host + off;
            if (*count > 0 && out[*count - 1].base + out[*count - 1].len == host) {
                out[*count - 1].len += take;
            } else {
                if (*count >= max) return WALK_TOO_MANY;
                out[*count].base = host;
                out[*count].len = take;
                (*count)++;
            }
            gpa += take;
            len -= take;
        }
        return 0;
    }

    int pyvfs_walk_chain(uint64_t desc_host, uint32_t qsize, uint32_t head, int indirect_ok,
                         const pyvfs_region_t *regions, int nregions,
                         pyvfs_iov_t *rd, int *rd_n, uint64_t *rd_len,
                         pyvfs_iov_t *wr, int *wr_n, uint64_t *wr_len, int max_iov,
                         uint64_t *detail) {
        /* on error, detail[0..1] say what was wrong (index and table size, a length) */
        *rd_n = *wr_n = 0;
        *rd_len = *wr_len = 0;
        const struct pyvfs_vdesc *table = (const struct pyvfs_vdesc *)desc_host;
        uint32_t table_len = qsize, idx = head, seen = 0;
        int in_indirect = 0, writing = 0, rc;
        for (;;) {
            if (idx >= table_len) {
                detail[0] = idx;
                detail[1] = table_len | ((uint64_t)(seen == 0 && !in_indirect) << 63);
                return WALK_BAD_INDEX;
            }
            if (++seen > table_len) return WALK_LOOP;
            struct pyvfs_vdesc d;
            memcpy(&d, &table[idx], sizeof d);  /* read once: the guest may change it */
            if (d.flags & VDESC_F_INDIRECT) {
                detail[0] = d.len;
                detail[1] = (d.flags & VDESC_F_NEXT) ? 1 : 0;
                if (!indirect_ok || in_indirect || (d.flags & VDESC_F_NEXT))
                    return WALK_BAD_INDIRECT;
                if (d.len == 0 || d.len % sizeof d || d.len / sizeof d > 32768)
                    return WALK_BAD_TABLE;
                const pyvfs_region_t *reg = region_of(regions, nregions, d.addr);
                if (!reg || d.len > reg->size - (d.addr - reg->gpa)) return WALK_BAD_TABLE;
                table = (const struct pyvfs_vdesc *)(reg->host + (d.addr - reg->gpa));
                table_len = d.len / sizeof d;
                idx = 0;
                seen = 0;
                in_indirect = 1;
                continue;
            }
            if (d.flags & VDESC_F_WRITE) {
                writing = 1;
                rc = add_range(regions, nregions, d.addr, d.len, wr, wr_n, max_iov);
                *wr_len += d.len;
            } else {
                if (writing) return WALK_READ_AFTER_WRITE;
                rc = add_range(regions, nregions, d.addr, d.len, rd, rd_n, max_iov);
                *rd_len += d.len;
            }
            if (rc) return rc;
            if (!(d.flags & VDESC_F_NEXT)) return 0;
            idx = d.next;
        }
    }

    uint64_t pyvfs_iov_read(const pyvfs_iov_t *iov, int n, uint64_t offset, void *dst,
                            uint64_t len) {
        uint64_t done = 0;
        for (int i = 0; i < n && done < len; i++) {
            if (offset >= iov[i].len) { offset -= iov[i].len; continue; }
            uint64_t take = iov[i].len - offset;
            if (take > len - done) take = len - done;
            memcpy((char *)dst + done, (const char *)(uintptr_t)iov[i].base + offset, take);
            done += take;
            offset = 0;
        }
        return done;
    }

    uint64_t pyvfs_iov_write(const pyvfs_iov_t *iov, int n, uint64_t offset, const void *src,
                             uint64_t len) {
        uint64_t done = 0;
        for (int i = 0; i < n && done < len; i++) {
            if (offset >= iov[i].len) { offset -= iov[i].len; continue; }
            uint64_t take = iov[i].len - offset;
            if (take > len - done) take = len - done;
            memcpy((char *)(uintptr_t)iov[i].base + offset, (const char *)src + done, take);
            done += take;
            offset = 0;
        }
        return done;
    }

    /* The sub-list [skip, skip+len) of iov, as struct iovec, at most IOV_MAX entries. */
    static int sub_iov(const pyvfs_iov_t *iov, int n, uint64_t skip, uint64_t len,
                       struct iovec *out) {
        int k = 0;
        for (int i = 0; i < n && len && k < IOV_MAX; i++) {
            if (skip >= iov[i].len) { skip -= iov[i].len; continue; }
            uint64_t take = iov[i].len - skip;
            if (take > len) take = len;
            out[k].iov_base = (char *)(uintptr_t)iov[i].base + skip;
            out[k].iov_len = take;
            k++;
            len -= take;
            skip = 0;
        }
        return k;
    }

    long long pyvfs_iov_preadv(int fd, const pyvfs_iov_t *iov, int n, uint64_t skip,
                               uint64_t len, long long file_offset) {
        struct iovec v[IOV_MAX];
        int k = sub_iov(iov, n, skip, len, v);
        if (k == 0) return 0;
        ssize_t r = preadv(fd, v, k, (off_t)file_offset);
        return r < 0 ? -(long long)errno : (long long)r;
    }

    long long pyvfs_iov_pwritev(int fd, const pyvfs_iov_t *iov, int n, uint64_t skip,
                                uint64_t len, long long file_offset) {
        struct iovec v[IOV_MAX];
        int k = sub_iov(iov, n, skip, len, v);
        if (k == 0) return 0;
        ssize_t r = pwritev(fd, v, k, (off_t)file_offset);
        return r < 0 ? -(long long)errno : (long long)r;
    }

    /* READ and WRITE answered wholly in C: header, open-file lookup in the shared
       handle table (through the shm_table extension's functions), preadv/pwritev
       between the file and guest memory, reply. Returns 1 when answered (*written =
       bytes written to the guest), 0 when Python must handle the request (any other
       opcode, anything unusual: an unknown fh, odd lengths, a read-only share). */
    #define PYVFS_MAX_DATA (1u << 20)
    int pyvfs_fast_io(const pyvfs_iov_t *rd, int rd_n, uint64_t rd_len,
                      const pyvfs_iov_t *wr, int wr_n, uint64_t wr_len,
                      uint64_t handles, uint64_t pin_fn, uint64_t unpin_fn,
                      int allow_write, uint32_t *written) {
        struct fuse_in_header h;
        struct fuse_read_in a;  /* same layout as fuse_write_in */
        _Static_assert(sizeof(struct fuse_read_in) == sizeof(struct fuse_write_in), "io in");
        if (rd_len < sizeof h + sizeof a || wr_len < sizeof(struct fuse_out_header))
            return 0;
        pyvfs_iov_read(rd, rd_n, 0, &h, sizeof h);
        if (h.opcode != FUSE_READ && h.opcode != FUSE_WRITE) return 0;
        if (h.len > rd_len || h.len < sizeof h + sizeof a || h.total_extlen) return 0;
        pyvfs_iov_read(rd, rd_n, sizeof h, &a, sizeof a);
        if (a.offset >> 63) return 0;
        uint64_t data_at = sizeof h + sizeof a;
        if (h.opcode == FUSE_WRITE && (!allow_write || a.size > h.len - data_at ||
                                       (a.read_flags & FUSE_WRITE_KILL_SUIDGID) ||
                                       wr_len < sizeof(struct fuse_out_header) +
                                                sizeof(struct fuse_write_out)))
            return 0;
        __typeof__(&ht_pin) pin = (__typeof__(&ht_pin))(uintptr_t)pin_fn;
        __typeof__(&ht_unpin) unpin = (__typeof__(&ht_unpin))(uintptr_t)unpin_fn;
        int64_t r = pin((void *)handles, a.fh);
        if (r < 0) return 0;  /* Python answers EBADF and logs it */
        int fd = (int)((r >> 32) - 1);
        if (h.opcode == FUSE_WRITE && h.uid != 0) {
            /* a non-root writer must clear setuid/setgid: Python drops CAP_FSETID */
            struct stat st;
            if (fstat(fd, &st) != 0 || (st.st_mode & (S_ISUID | S_ISGID))) {
                unpin((void *)handles, a.fh);
                return 0;
            }
        }
        struct { struct fuse_out_header o; struct fuse_write_out w; } out;
        memset(&out, 0, sizeof out);
        out.o.unique = h.unique;
        uint32_t total;
        if (h.opcode == FUSE_READ) {
            uint64_t size = a.size;
            if (size > wr_len - sizeof out.o) size = wr_len - sizeof out.o;
            if (size > PYVFS_MAX_DATA) size = PYVFS_MAX_DATA;
            long long n = size ? pyvfs_iov_preadv(fd, wr, wr_n, sizeof out.o, size,
                                                  (long long)a.offset) : 0;
            if (n < 0) { out.o.error = (int32_t)n; n = 0; }
            total = (uint32_t)(sizeof out.o + n);
            out.o.len = total;
            pyvfs_iov_write(wr, wr_n, 0, &out.o, sizeof out.o);
        } else {
            long long n = a.size ? pyvfs_iov_pwritev(fd, rd, rd_n, data_at, a.size,
                                                     (long long)a.offset) : 0;
            if (n < 0) {
                out.o.error = (int32_t)n;
                total = sizeof out.o;
            } else {
                out.w.size = (uint32_t)n;
                total = sizeof out;
            }
            out.o.len = total;
            pyvfs_iov_write(wr, wr_n, 0, &out, total);
        }
        unpin((void *)handles, a.fh);
        *written = total;
        return 1;
    }

    int pyvfs_fallocate(int fd, int mode, long long offset, long long len) {
        return fallocate(fd, mode, (off_t)offset, (off_t)len);
    }
    int pyvfs_syncfs(int fd) { return syncfs(fd); }
    int pyvfs_renameat2(int olddirfd, const char *oldpath, int newdirfd,
                        const char *newpath, unsigned int flags) {
        return syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
    }
    """ + _fast_path_source(),
    # relative to the project root, so setuptools rebuilds when it changes
    depends=["daemon/native/fast_path.c", "shm_table/native.h"],
    include_dirs=[os.path.join(ROOT, "shm_table")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
