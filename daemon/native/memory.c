/* Guest memory: mapping the front-end's regions, ring index loads, and copies between
 * a chain's buffers (host ranges, pyvfs_iov_t) and local memory or a file. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>

#include "internal.h"

_Static_assert(sizeof(pyvfs_iov_t) == sizeof(struct iovec), "iovec layout");

uintptr_t pyvfs_mmap_shared(int fd, size_t len, long long offset) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)offset);
    return p == MAP_FAILED ? 0 : (uintptr_t)p;
}

int pyvfs_munmap(uintptr_t addr, size_t len) { return munmap((void *)addr, len); }

/* A ring index the guest publishes: what it wrote before it is visible after this. */
uint16_t pyvfs_load_u16(uintptr_t addr) {
    return __atomic_load_n((uint16_t *)addr, __ATOMIC_ACQUIRE);
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
