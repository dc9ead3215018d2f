/* The interface of daemon.native._sys: every function, type and constant Python uses.
 *
 * One text for both sides: the .c files include this header, and daemon/native/build.py
 * hands the part between the BEGIN/END CDEF markers to cffi's cdef, so the two cannot
 * drift. cffi reads no preprocessor directives, so between the markers there are only
 * declarations and `#define NAME value` lines (build.py turns a value that is not a plain
 * integer into cffi's `...`: the compiler supplies it). What only the C files share lives
 * in internal.h. */
#ifndef PYVFS_H
#define PYVFS_H
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h> /* UTIME_NOW, UTIME_OMIT */

/* BEGIN CDEF */

/* ---- syscalls.c: system calls the standard library lacks, and credentials */
long pyvfs_clone_files(void);
long pyvfs_clone_sibling(void);
int pyvfs_set_name(const char *name);
long pyvfs_getdents64(int fd, char *buf, size_t len);
int pyvfs_fchownat_empty(int fd, unsigned int uid, unsigned int gid);
int pyvfs_errno(void);
int pyvfs_name_to_handle(int dirfd, const char *name, int flags,
                         unsigned char *out, int out_len, int *handle_type,
                         int *mount_id);
int pyvfs_open_by_handle(int mount_fd, const unsigned char *handle, int len,
                         int handle_type, int flags);
#define PYVFS_UTIME_NOW UTIME_NOW
#define PYVFS_UTIME_OMIT UTIME_OMIT
int pyvfs_utimensat(int dirfd, const char *path, long long a_sec, long a_nsec,
                    long long m_sec, long m_nsec, int flags);
int pyvfs_renameat2(int olddirfd, const char *oldpath, int newdirfd,
                    const char *newpath, unsigned int flags);
int pyvfs_set_pdeathsig(int sig);
int pyvfs_caller_fsids(unsigned int uid, unsigned int gid, unsigned int own_uid,
                       unsigned int own_gid);
void pyvfs_own_fsids(unsigned int uid, unsigned int gid);
#define PYVFS_XATTR_GET 0
#define PYVFS_XATTR_LIST 1
#define PYVFS_XATTR_SET 2
#define PYVFS_XATTR_REMOVE 3
long pyvfs_xattr(int op, int procdir, int fd, const char *name, void *value,
                 size_t size, int flags);
int pyvfs_access_fd(int fd, int mode);
int pyvfs_fallocate(int fd, int mode, long long offset, long long len);
int pyvfs_syncfs(int fd);

/* ---- sandbox.c: the processes that only wait around the sandboxed server */
typedef struct {
    int ready_r, ready_w; /* the pipe that tells the child its parent is alive */
    int watch_fd;         /* the process outside: the handover socket (-1: none) */
    int exec_first;       /* it: a SIGHUP executes the successor at once */
    int journal_fd;       /* it: kept open for the program that finishes (-1: none) */
    int handed_over;      /* the server's exit status after handing its fds over */
    int parent_exits;     /* the parent only exits with the child's status
                             (the helper of an unprivileged sandbox) */
    /* the program the process outside and the keeper execute when their wait ends:
       the executable, argc arguments and envc environment entries, each ended by a NUL */
    const char *plan;
    size_t plan_len;
    int argc, envc;
} pyvfs_split_t;
long pyvfs_split(pyvfs_split_t *s);
void pyvfs_outside(pyvfs_split_t *s, int child);

/* ---- migrate.c: live migration's destination finds the device state's inodes */
#define PYVFS_NO_PATH 0xFFFFFFFF
#define PYVFS_MIGRATE_HANDLE_MAX 128
int pyvfs_migrate_find(int root, uint32_t n, const uint64_t *nodeid, const uint64_t *parent,
                       const uint8_t *paths, const uint32_t *path_len, int want_handles,
                       int mount_fd, const uint8_t *src_handles,
                       const uint16_t *src_handle_len, const int32_t *src_handle_type,
                       int32_t *fd, uint64_t *ino, uint64_t *dev, uint32_t *mode,
                       uint64_t *mnt_id, uint8_t *handles, uint16_t *handle_len,
                       int32_t *handle_type, int32_t *err);
void pyvfs_close_fds(int32_t *fds, uint32_t n);

/* ---- memory.c: guest memory mapping, ring loads, copies to and from a chain's buffers */
/* a guest memory region: guest-physical start, size, where it is mapped here */
typedef struct { uint64_t gpa; uint64_t size; uint64_t host; } pyvfs_region_t;
/* a host range of a chain's buffers (struct iovec's layout) */
typedef struct { uint64_t base; uint64_t len; } pyvfs_iov_t;
uintptr_t pyvfs_mmap_shared(int fd, size_t len, long long offset);
int pyvfs_munmap(uintptr_t addr, size_t len);
uint16_t pyvfs_load_u16(uintptr_t addr);
uint64_t pyvfs_iov_read(const pyvfs_iov_t *iov, int n, uint64_t offset, void *dst,
                        uint64_t len);
uint64_t pyvfs_iov_write(const pyvfs_iov_t *iov, int n, uint64_t offset, const void *src,
                         uint64_t len);
long long pyvfs_iov_preadv(int fd, const pyvfs_iov_t *iov, int n, uint64_t skip,
                           uint64_t len, long long file_offset);
long long pyvfs_iov_pwritev(int fd, const pyvfs_iov_t *iov, int n, uint64_t skip,
                            uint64_t len, long long file_offset);

/* ---- chain.c: the descriptor-chain walker */
int pyvfs_walk_chain(uint64_t desc_host, uint32_t qsize, uint32_t head, int indirect_ok,
                     const pyvfs_region_t *regions, int nregions,
                     pyvfs_iov_t *rd, int *rd_n, uint64_t *rd_len,
                     pyvfs_iov_t *wr, int *wr_n, uint64_t *wr_len, int max_iov,
                     uint64_t *detail);

/* ---- fd_cache.c: the worker's cache of O_PATH fds for inodes kept by file handle only.
 * Python reads capacity, count, opened and hits; the rest is fd_cache.c's. */
struct pyvfs_fdc_node {
    uint64_t nodeid;
    int fd;
    struct pyvfs_fdc_node *hnext;       /* hash chain */
    struct pyvfs_fdc_node *prev, *next; /* LRU list, sentinel in the cache */
};
typedef struct { uint64_t nodeid; uint64_t n; } pyvfs_fdc_pin_t;
typedef struct {
    uint64_t capacity;
    uint64_t count;
    uint64_t opened;   /* open_by_handle_at calls (statistics) */
    uint64_t hits;
    struct pyvfs_fdc_node **buckets;
    uint64_t mask;
    struct pyvfs_fdc_node lru;  /* lru.next: oldest, lru.prev: newest */
    pyvfs_fdc_pin_t *pins;
    uint32_t npins, pins_cap;
    uint64_t swept_at;  /* the inode table's removal count at the last sweep */
} pyvfs_fdcache_t;
pyvfs_fdcache_t *pyvfs_fdc_new(uint64_t capacity);
void pyvfs_fdc_free(pyvfs_fdcache_t *c);
int pyvfs_fdc_get(pyvfs_fdcache_t *c, uint64_t nodeid);
int pyvfs_fdc_put(pyvfs_fdcache_t *c, uint64_t nodeid, int fd);
void pyvfs_fdc_drop(pyvfs_fdcache_t *c, uint64_t nodeid);
void pyvfs_fdc_clear(pyvfs_fdcache_t *c);
int pyvfs_fdc_pin(pyvfs_fdcache_t *c, uint64_t nodeid);
void pyvfs_fdc_unpin(pyvfs_fdcache_t *c, uint64_t nodeid);

/* ---- fuse_ops.c: the requests answered in C, and what they need to answer them as
 * PassthroughFs would (workers/fast_path.py fills it) */
typedef struct {
    /* bit n set: opcode n may be answered in C (n < 64); any other opcode goes to Python.
       The only switch: workers/fast_path.py sets it from daemon/protocol/opcodes.py. */
    uint64_t c_ops;
    /* READ/WRITE: the open-file table (HandleTable.c_api()) */
    uint64_t handles, ht_pin, ht_unpin;
    /* InodeTable.c_api() */
    uint64_t inodes, it_pin, it_unpin, it_claim_or_insert, it_forget, it_lookup,
             it_handle_of, it_claim, seg_removals;
    pyvfs_fdcache_t *fd_cache;
    uint64_t session;        /* address of the INIT flags both sides agreed on (u64) */
    uint64_t submounts_flag; /* FUSE_SUBMOUNTS in that word */
    int64_t root_mnt_id;
    int32_t mount_fd;        /* for open_by_handle_at */
    int32_t use_handles;     /* inodes are identified by file handle (name_to_handle_at) */
    int32_t mandatory;       /* --inode-file-handles=mandatory */
    uint32_t timeout_nsec;   /* entry and attr timeout of the cache mode */
    uint64_t timeout_sec;
    /* RELEASE/RELEASEDIR: the open-file table's ht_close */
    uint64_t ht_close;
    /* CREATE: the open-file table's ht_open */
    uint64_t ht_open;
    uint32_t create_clear;   /* open flags _open_flags strips (OPEN_STRIP, O_DIRECT, ...) */
    uint32_t create_fopen;   /* _open_reply_flags(False) */
    uint32_t own_uid, own_gid; /* Credentials.own_uid/own_gid */
    /* LOOKUP of a missing name: 1 = negative entry (entry timeout), 0 = ENOENT
       (--cache never) */
    int32_t negative_lookup;
    /* FLUSH: address of LockOwners' live-entry count (0: no fcntl lock forwarding); while
       it is 0 no owner has locks to drop */
    uint64_t lock_live;
    /* OPEN, SETATTR: the fd directory an O_PATH fd is reopened through by its number
       (daemon/fs/proc_fd.py's PROC_DIR_FD: -1 for /proc/self/fd) */
    int32_t procdir;
} pyvfs_fast_ctx_t;
int pyvfs_fast(const pyvfs_iov_t *rd, int rd_n, uint64_t rd_len,
               const pyvfs_iov_t *wr, int wr_n, uint64_t wr_len,
               const pyvfs_fast_ctx_t *c, uint32_t *written);

/* ---- stats.c: per-queue counters for `pyvirtiofsd stats` (daemon/stats/queue_stats.py) */
#define PYVFS_STATS_OPCODES 64
/* request latency, from the pop to the reply, in log2 buckets: <= 1 us, 2 us, 4 us, ...,
   65.536 ms (2^16 us), then everything longer; counts per bucket, not cumulative */
#define PYVFS_STATS_BUCKETS 18
typedef struct {
    uint64_t requests, errors;
    uint64_t reply_bytes;  /* bytes written into the guest's buffers, reply header included */
    uint64_t latency_ns;   /* sum of the latencies (the histogram's _sum) */
    uint64_t latency[PYVFS_STATS_BUCKETS];
} pyvfs_opstats_t;
typedef struct {
    uint64_t requests, in_c, errors, dropped, read_bytes, write_bytes, wakeups, notifies;
    uint64_t worker_restarts;  /* written by the supervisor, not the worker */
    pyvfs_opstats_t by_opcode[PYVFS_STATS_OPCODES]; /* [0]: opcodes >= 64, unknown ones */
} pyvfs_qstats_t;
void pyvfs_stats_attach(pyvfs_qstats_t *row);
/* Count a request the worker popped (at pyvfs_stats_popped_ns) and answered now. */
void pyvfs_stats_note(const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                      uint32_t written, int in_c);

/* ---- ring.c: the split ring's state, shared by Python's SplitQueue
 * (daemon/guest/virtqueue.py) and the serve loop */
typedef struct {
    uint64_t desc, avail, used;  /* host addresses of the three ring parts */
    const pyvfs_region_t *regions;
    int32_t nregions;
    uint32_t size;
    int32_t indirect;
    uint16_t last_avail;         /* next avail entry to pop */
    uint16_t used_idx;           /* next used entry to write */
    int32_t event_idx;           /* VIRTIO_RING_F_EVENT_IDX negotiated */
    uint16_t signalled_used;     /* used_idx at the last interrupt decision */
    uint16_t signalled_valid;    /* 0 until the first decision: always notify then */
    /* live migration (VHOST_F_LOG_ALL): the front-end's dirty log, a bit per 4 KiB page
       of guest-physical memory, mapped here (0: not logging), and the used ring's
       guest-physical address, whose writes are logged too */
    uint64_t log, log_size, used_gpa;
    /* the ring's in-flight record (pyvfs_inflight_t in shared memory; 0: none), kept at
       every pop and push so that a restarted worker re-serves exactly what was popped
       and not answered (inflight.c) */
    uint64_t inflight;
} pyvfs_queue_t;
/* Publish a used element; the first len bytes of wr (what the reply wrote) and the used
   ring's entry and index are marked in the dirty log while logging. */
void pyvfs_queue_push(pyvfs_queue_t *q, uint32_t head, uint32_t len,
                      const pyvfs_iov_t *wr, int wr_n);
/* push, then with EVENT_IDX signal call_fd (if >= 0) at once when used_event asks */
void pyvfs_queue_push_signal(pyvfs_queue_t *q, uint32_t head, uint32_t len,
                             const pyvfs_iov_t *wr, int wr_n, int call_fd);
/* Mark the first len bytes of a chain's host ranges in the dirty log (no-op when off). */
void pyvfs_log_iov(const pyvfs_queue_t *q, const pyvfs_iov_t *iov, int n, uint64_t len);
void pyvfs_queue_disable(pyvfs_queue_t *q);
int pyvfs_queue_enable(pyvfs_queue_t *q);
int pyvfs_queue_should_notify(pyvfs_queue_t *q);

/* ---- inflight.c: what a ring's worker popped and has not answered, in shared memory
 * (workers/inflight.py), so that a worker's successor re-serves it, exactly once.
 * `current` is one word, stored whole: bits 0-15 the next avail entry to pop, 16-31
 * the head being answered, 32-47 the used index before its answer, bit 48 BUSY. heads[h]
 * is the state of a SETLKW parked at head h: PARKED, or PARKED|COMPLETING with the used
 * index before its answer's push in bits 32-47. A record whose used index differs from
 * the ring's at recovery was answered (its push is the only one after the record). */
#define PYVFS_INFLIGHT_HEADS 32768
#define PYVFS_INFLIGHT_BUSY 0x1000000000000
#define PYVFS_INFLIGHT_PARKED 0x1000000000000
#define PYVFS_INFLIGHT_COMPLETING 0x2000000000000
typedef struct {
    uint64_t current;
    uint64_t heads[32768];
} pyvfs_inflight_t;
/* the request at head was parked (answered later): its record moves to heads[] */
void pyvfs_inflight_park(pyvfs_queue_t *q, uint32_t head);
/* a parked request at head is about to be answered and pushed */
void pyvfs_inflight_completing(pyvfs_queue_t *q, uint32_t head);
/* a ring of size entries (re)started from last_avail with nothing in flight */
void pyvfs_inflight_reset(pyvfs_inflight_t *r, uint16_t last_avail, uint32_t size);

/* ---- serve.c: the worker's wait/drain/notify loop */
/* pyvfs_serve's loop state and settings (QueueWorker keeps one) */
typedef struct {
    int32_t epoll_fd, kick_fd, call_fd;
    int32_t timeout_ms;   /* -1: none; LOCK_RETRY_MS while SETLKWs wait */
    int32_t enabled;      /* SET_VRING_ENABLE: kicks are read but the ring is left alone */
    int32_t fast;         /* 0: every request goes to Python (debug logging) */
    uint64_t gather_ns;   /* sleep after a kick before draining (high-priority queue) */
    uint64_t poll_ns;     /* --poll-us */
    uint32_t flags;       /* PYVFS_DRAINING, PYVFS_PUSHED */
} pyvfs_serve_t;
#define PYVFS_DRAINING 1u  /* notifications are off and the ring is being drained */
#define PYVFS_PUSHED 2u    /* used entries pushed since the last notification decision */
#define PYVFS_SERVE_CHAIN 1
#define PYVFS_SERVE_CONTROL (-100)
#define PYVFS_SERVE_TIMEOUT (-101)
#define PYVFS_SERVE_ERROR (-102)
int pyvfs_serve(pyvfs_queue_t *q, pyvfs_iov_t *rd, pyvfs_iov_t *wr, int *counts,
                uint64_t *lens, uint64_t *detail, uint32_t *head, int max_iov,
                const pyvfs_fast_ctx_t *c, pyvfs_serve_t *s);

/* END CDEF */
#endif
