/* What the C files of daemon.native._sys share among themselves and Python never sees
 * (cffi does not read this header). Everything here is hidden from the extension's
 * symbol table. */
#ifndef PYVFS_INTERNAL_H
#define PYVFS_INTERNAL_H
#include "pyvfs.h"
/* the shared tables' functions, called through addresses the tables hand over
   (InodeTable.c_api, HandleTable.c_api): their declarations type-check every call */
#include "native.h"
#include <linux/fuse.h>
#include <time.h>

#define PYVFS_HIDDEN __attribute__((visibility("hidden")))

/* A call into the shared tables through the address the context holds, typed by the
 * function's declaration in shm_table/native.h. */
#define TABLE(c, fn) ((__typeof__(&fn))(uintptr_t)(c)->fn)

/* fd_cache.c: close the cached fds of inodes the guest has forgotten since the last sweep
 * (the serve loop calls it before it sleeps and once a second while idle) */
PYVFS_HIDDEN void pyvfs_fdc_sweep(const pyvfs_fast_ctx_t *c);

/* stats.c: the row of the queue this worker serves (NULL: not counting) */
PYVFS_HIDDEN extern pyvfs_qstats_t *pyvfs_stats_row;
/* stats.c: when the chain being answered was popped (CLOCK_MONOTONIC ns; set by the serve
   loop's drain only while counting) */
PYVFS_HIDDEN extern uint64_t pyvfs_stats_popped_ns;
/* stats.c: the clock read of the last pyvfs_stats_note */
PYVFS_HIDDEN extern uint64_t pyvfs_stats_noted_ns;

/* CLOCK_MONOTONIC in ns: clock_gettime through the vDSO, no system call */
static inline uint64_t pyvfs_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Add n to a counter only this process writes: a relaxed load and store of an aligned
 * word (readers in other processes see whole values), no atomic read-modify-write. */
static inline void pyvfs_bump(uint64_t *p, uint64_t n) {
    __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

/* inflight.c: a chain was popped (q->last_avail already counts it): record it before it
   acts; and a used element was published: clear its record */
static inline void pyvfs_inflight_popped(pyvfs_queue_t *q, uint32_t head) {
    if (q->inflight)
        __atomic_store_n(&((pyvfs_inflight_t *)(uintptr_t)q->inflight)->current,
                         (uint64_t)q->last_avail | (uint64_t)(head & 0xFFFF) << 16
                         | (uint64_t)q->used_idx << 32 | PYVFS_INFLIGHT_BUSY, __ATOMIC_RELEASE);
}
PYVFS_HIDDEN void pyvfs_inflight_pushed(pyvfs_queue_t *q, uint32_t head);

#define PYVFS_MAX_HANDLE 128 /* bytes of a file handle kept in the inode table */

/* fuse_common.c: what the requests answered in C share (fuse_meta.c answers more of them) */
struct stat;
/* the ATTR and ENTRY replies as written to the guest: out header, then the body */
struct pyvfs_attr_out { struct fuse_out_header o; struct fuse_attr_out a; };
struct pyvfs_entry_out { struct fuse_out_header o; struct fuse_entry_out e; };
_Static_assert(sizeof(struct fuse_attr) == 88, "fuse_attr");
_Static_assert(sizeof(struct fuse_attr_out) == 104, "fuse_attr_out");
_Static_assert(sizeof(struct fuse_entry_out) == 128, "fuse_entry_out");
_Static_assert(sizeof(struct pyvfs_attr_out) == 120, "attr reply");
_Static_assert(sizeof(struct pyvfs_entry_out) == 144, "entry reply");
/* a pin on nodeid and its O_PATH fd (-1: nothing held); pyvfs_unpin_inode gives it back */
PYVFS_HIDDEN int pyvfs_inode_fd(const pyvfs_fast_ctx_t *c, uint64_t nodeid);
PYVFS_HIDDEN void pyvfs_unpin_inode(const pyvfs_fast_ctx_t *c, uint64_t nodeid);
/* give back a lookup claimed for the guest that could not be handed over */
PYVFS_HIDDEN void pyvfs_unclaim(const pyvfs_fast_ctx_t *c, uint64_t nodeid);
PYVFS_HIDDEN int pyvfs_fill_attr(struct fuse_attr *a, const struct stat *st, uint32_t flags);
PYVFS_HIDDEN size_t pyvfs_read_name_at(const struct fuse_in_header *h, const pyvfs_iov_t *rd,
                                       int rd_n, uint64_t skip, char *name);
PYVFS_HIDDEN int pyvfs_reply_empty(const struct fuse_in_header *h, const pyvfs_iov_t *wr,
                                   int wr_n, uint32_t *written);
PYVFS_HIDDEN int pyvfs_lookup_core(const pyvfs_fast_ctx_t *c, uint64_t parent, int pfd,
                                   const char *name, size_t name_len, const struct stat *made,
                                   struct fuse_entry_out *e);
/* fuse_meta.c: RMDIR, RENAME, MKDIR, MKNOD, SYMLINK, OPEN, SETATTR (same contract as
   pyvfs_fast; h already checked there) */
PYVFS_HIDDEN int pyvfs_fast_meta(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                                 const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr,
                                 int wr_n, uint64_t wr_len, uint32_t *written);

/* ring.c: signal the call eventfd if the driver asks for an interrupt (counted) */
PYVFS_HIDDEN void pyvfs_queue_notify(pyvfs_queue_t *q, int call_fd);

#endif
