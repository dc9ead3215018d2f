/* GETATTR, LOOKUP, FORGET, BATCH_FORGET, RELEASE(DIR), UNLINK, READDIRPLUS and CREATE answered
 * wholly in C (appended to daemon.native._sys's
 * source by _sys_build.py, after the chain walker and pyvfs_fast_io).
 *
 * The rule: answer exactly what daemon/fs/passthrough.py would answer, byte for byte, or
 * return 0 ("not handled") and let Python answer. Everything unusual is declined: odd
 * lengths, request extensions, bad names, unknown nodeids, any failing system call, a full
 * inode table, time stamps Python cannot encode. Python then redoes the request from the
 * start and produces the proper errno and log line; a declined request has changed
 * nothing (every reference taken here is given back first).
 *
 * The inode table is reached through the shm_table extension's own functions (addresses
 * from InodeTable.c_api()), so the reference counting is the table's, not a copy. */

/* ---- the worker's cache of O_PATH fds for inodes the table keeps by file handle only.
 * Python's daemon/fs/fd_cache.py is a thin wrapper around it, so the C and Python paths
 * share one cache. Least recently used first out; pinned nodeids (in use by a Python
 * request) are never evicted. */
struct pyvfs_fdc_node {
    uint64_t nodeid;
    int fd;
    struct pyvfs_fdc_node *hnext;      /* hash chain */
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

static inline uint64_t fdc_hash(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

pyvfs_fdcache_t *pyvfs_fdc_new(uint64_t capacity) {
    if (capacity < 1) capacity = 1;
    uint64_t nb = 16;
    while (nb < 2 * capacity && nb < (1ULL << 24)) nb <<= 1;
    pyvfs_fdcache_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->buckets = calloc(nb, sizeof *c->buckets);
    if (!c->buckets) { free(c); return NULL; }
    c->capacity = capacity;
    c->mask = nb - 1;
    c->lru.next = c->lru.prev = &c->lru;
    return c;
}

void pyvfs_fdc_free(pyvfs_fdcache_t *c) {
    /* frees the memory only: the fds belong to the shared fd table */
    struct pyvfs_fdc_node *n = c->lru.next;
    while (n != &c->lru) {
        struct pyvfs_fdc_node *next = n->next;
        free(n);
        n = next;
    }
    free(c->buckets);
    free(c->pins);
    free(c);
}

static struct pyvfs_fdc_node *fdc_find(pyvfs_fdcache_t *c, uint64_t nodeid,
                                       struct pyvfs_fdc_node ***link) {
    struct pyvfs_fdc_node **p = &c->buckets[fdc_hash(nodeid) & c->mask];
    while (*p && (*p)->nodeid != nodeid) p = &(*p)->hnext;
    if (link) *link = p;
    return *p;
}

static void fdc_unlink_lru(struct pyvfs_fdc_node *n) {
    n->prev->next = n->next;
    n->next->prev = n->prev;
}

static void fdc_push_newest(pyvfs_fdcache_t *c, struct pyvfs_fdc_node *n) {
    n->prev = c->lru.prev;
    n->next = &c->lru;
    c->lru.prev->next = n;
    c->lru.prev = n;
}

/* Unlink a node from the hash chain and the LRU list; returns its fd. */
static int fdc_remove(pyvfs_fdcache_t *c, struct pyvfs_fdc_node *n) {
    struct pyvfs_fdc_node **p;
    fdc_find(c, n->nodeid, &p);
    *p = n->hnext;
    fdc_unlink_lru(n);
    int fd = n->fd;
    free(n);
    c->count--;
    return fd;
}

static int fdc_pinned(const pyvfs_fdcache_t *c, uint64_t nodeid) {
    for (uint32_t i = 0; i < c->npins; i++)
        if (c->pins[i].nodeid == nodeid) return 1;
    return 0;
}

int pyvfs_fdc_get(pyvfs_fdcache_t *c, uint64_t nodeid) {
    struct pyvfs_fdc_node *n = fdc_find(c, nodeid, NULL);
    if (!n) return -1;
    fdc_unlink_lru(n);
    fdc_push_newest(c, n);
    c->hits++;
    return n->fd;
}

/* Keep fd for nodeid (the cache owns it from now on), newest; then close the oldest
 * unpinned fds while over capacity. -1 (fd closed) if out of memory. */
int pyvfs_fdc_put(pyvfs_fdcache_t *c, uint64_t nodeid, int fd) {
    struct pyvfs_fdc_node **p;
    struct pyvfs_fdc_node *n = fdc_find(c, nodeid, &p);
    if (n) {
        if (n->fd >= 0 && n->fd != fd) close(n->fd);
        n->fd = fd;
        fdc_unlink_lru(n);
    } else {
        n = malloc(sizeof *n);
        if (!n) { close(fd); return -1; }
        n->nodeid = nodeid;
        n->fd = fd;
        n->hnext = NULL;
        *p = n;
        c->count++;
    }
    fdc_push_newest(c, n);
    struct pyvfs_fdc_node *v = c->lru.next;
    while (c->count > c->capacity && v != &c->lru) {
        struct pyvfs_fdc_node *next = v->next;
        if (!fdc_pinned(c, v->nodeid)) close(fdc_remove(c, v));
        v = next;
    }
    return 0;
}

void pyvfs_fdc_drop(pyvfs_fdcache_t *c, uint64_t nodeid) {
    struct pyvfs_fdc_node *n = fdc_find(c, nodeid, NULL);
    if (n) {
        int fd = fdc_remove(c, n);
        if (fd >= 0) close(fd);
    }
}

void pyvfs_fdc_clear(pyvfs_fdcache_t *c) {
    while (c->lru.next != &c->lru) {
        int fd = fdc_remove(c, c->lru.next);
        if (fd >= 0) close(fd);
    }
}

int pyvfs_fdc_pin(pyvfs_fdcache_t *c, uint64_t nodeid) {
    for (uint32_t i = 0; i < c->npins; i++)
        if (c->pins[i].nodeid == nodeid) { c->pins[i].n++; return 0; }
    if (c->npins == c->pins_cap) {
        uint32_t cap = c->pins_cap ? 2 * c->pins_cap : 8;
        pyvfs_fdc_pin_t *p = realloc(c->pins, cap * sizeof *p);
        if (!p) return -1;
        c->pins = p;
        c->pins_cap = cap;
    }
    c->pins[c->npins].nodeid = nodeid;
    c->pins[c->npins].n = 1;
    c->npins++;
    return 0;
}

void pyvfs_fdc_unpin(pyvfs_fdcache_t *c, uint64_t nodeid) {
    for (uint32_t i = 0; i < c->npins; i++) {
        if (c->pins[i].nodeid != nodeid) continue;
        if (--c->pins[i].n == 0) c->pins[i] = c->pins[--c->npins];
        return;
    }
}

/* ---- the fast path */
typedef struct {
    /* READ/WRITE: the open-file table (HandleTable.c_api()) */
    uint64_t handles, ht_pin, ht_unpin;
    int32_t allow_write;
    /* GETATTR/LOOKUP/FORGET/BATCH_FORGET: 0 = always answered in Python */
    int32_t meta;
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
    /* RELEASE/RELEASEDIR: the open-file table's ht_close (0 = Python) */
    uint64_t ht_close;
    int32_t allow_unlink;    /* UNLINK in C: not on a read-only share */
    /* CREATE: the open-file table's ht_open; 0 = Python (readonly, --posix-acl,
       --security-label, --writeback, --xattrmap, ...) */
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
    /* bit op set: C may answer opcode op (daemon/protocol/opcodes.py's table decides) */
    uint64_t c_ops;
} pyvfs_fast_ctx_t;

/* A call into the shared tables through the address the context holds, typed by the
 * function's declaration in shm_table/native.h. */
#define TABLE(c, fn) ((__typeof__(&fn))(uintptr_t)(c)->fn)

/* Close the cached fds of inodes the guest has forgotten since the last sweep: an O_PATH
 * fd keeps an unlinked file's blocks allocated on the host.  Cheap when nothing was freed
 * (one load); the serve loop calls it before it sleeps and once a second while idle. */
static void fdc_sweep(const pyvfs_fast_ctx_t *c) {
    pyvfs_fdcache_t *fc = c->fd_cache;
    if (!fc || !c->inodes || !c->seg_removals || !fc->count) return;
    uint64_t now = TABLE(c, seg_removals)((void *)c->inodes);
    if (now == fc->swept_at) return;
    fc->swept_at = now;
    struct pyvfs_fdc_node *n = fc->lru.next;
    while (n != &fc->lru) {
        struct pyvfs_fdc_node *next = n->next;
        if (!fdc_pinned(fc, n->nodeid) && TABLE(c, it_lookup)((void *)c->inodes, n->nodeid) < 0)
            close(fdc_remove(fc, n));
        n = next;
    }
}

#define PYVFS_MAX_REQUEST ((1u << 20) + 64 * 1024) /* queue_worker.MAX_REQUEST */
#define PYVFS_ROOT_ID 1
#define PYVFS_MAX_HANDLE 128

struct pyvfs_attr_out { struct fuse_out_header o; struct fuse_attr_out a; };
struct pyvfs_entry_out { struct fuse_out_header o; struct fuse_entry_out e; };
_Static_assert(sizeof(struct fuse_attr) == 88, "fuse_attr");
_Static_assert(sizeof(struct fuse_attr_out) == 104, "fuse_attr_out");
_Static_assert(sizeof(struct fuse_entry_out) == 128, "fuse_entry_out");
_Static_assert(sizeof(struct pyvfs_attr_out) == 120, "attr reply");
_Static_assert(sizeof(struct pyvfs_entry_out) == 144, "entry reply");

static void unpin_inode(const pyvfs_fast_ctx_t *c, uint64_t nodeid) {
    TABLE(c, it_unpin)((void *)c->inodes, nodeid);
}

/* Give back a lookup this request claimed for the guest but could not hand over. */
static void unclaim(const pyvfs_fast_ctx_t *c, uint64_t nodeid) {
    TABLE(c, it_forget)((void *)c->inodes, nodeid, 1);
}

/* A pin on nodeid and its O_PATH fd (the table's, or this worker's cached or freshly
 * re-opened one for an inode kept by file handle): the fd, or -1 with nothing held.
 * Python's InodeRef. */
static int inode_fd(const pyvfs_fast_ctx_t *c, uint64_t nodeid) {
    int64_t r = TABLE(c, it_pin)((void *)c->inodes, nodeid);
    if (r < 0) return -1;
    int fd = (int)((r >> 32) - 1);
    if (fd >= 0) return fd;
    fd = pyvfs_fdc_get(c->fd_cache, nodeid);
    if (fd >= 0) return fd;
    uint8_t handle[PYVFS_MAX_HANDLE];
    int32_t type = 0;
    int32_t n = TABLE(c, it_handle_of)((void *)c->inodes, (uint32_t)r, handle, &type);
    if (n >= 0)
        fd = pyvfs_open_by_handle(c->mount_fd, handle, n, type,
                                  O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd >= 0) {
        c->fd_cache->opened++;
        if (pyvfs_fdc_put(c->fd_cache, nodeid, fd) == 0) return fd;
    }
    unpin_inode(c, nodeid);
    return -1;
}

/* struct stat -> fuse_attr as fuse.pack_attr_into packs it; 0 when Python's struct
 * packing would refuse the values (negative times, nlink beyond 32 bits). */
static int fill_attr(struct fuse_attr *a, const struct stat *st, uint32_t flags) {
    if (st->st_atim.tv_sec < 0 || st->st_mtim.tv_sec < 0 || st->st_ctim.tv_sec < 0 ||
        st->st_nlink > UINT32_MAX || st->st_size < 0 || st->st_blocks < 0 ||
        st->st_blksize < 0 || (uint64_t)st->st_blksize > UINT32_MAX)
        return 0;
    a->ino = st->st_ino;
    a->size = (uint64_t)st->st_size;
    a->blocks = (uint64_t)st->st_blocks;
    a->atime = (uint64_t)st->st_atim.tv_sec;
    a->mtime = (uint64_t)st->st_mtim.tv_sec;
    a->ctime = (uint64_t)st->st_ctim.tv_sec;
    a->atimensec = (uint32_t)st->st_atim.tv_nsec;
    a->mtimensec = (uint32_t)st->st_mtim.tv_nsec;
    a->ctimensec = (uint32_t)st->st_ctim.tv_nsec;
    a->mode = st->st_mode;
    a->nlink = (uint32_t)st->st_nlink;
    a->uid = st->st_uid;
    a->gid = st->st_gid;
    a->rdev = (uint32_t)st->st_rdev;
    a->blksize = (uint32_t)st->st_blksize;
    a->flags = flags;
    return 1;
}

/* passthrough.op_getattr: fstat of the inode's fd (the fh of FUSE_GETATTR_FH is not used,
 * as in Python). */
static int fast_getattr(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                        const pyvfs_iov_t *wr, int wr_n, uint64_t wr_len, uint32_t *written) {
    struct pyvfs_attr_out out;
    if (wr_len < sizeof out) return 0;  /* Python answers ERANGE */
    int fd = inode_fd(c, h->nodeid);
    if (fd < 0) return 0;
    struct stat st;
    int ok = fstat(fd, &st) == 0;
    unpin_inode(c, h->nodeid);
    memset(&out, 0, sizeof out);
    if (!ok || !fill_attr(&out.a.attr, &st, 0)) return 0;
    out.a.attr_valid = c->timeout_sec;
    out.a.attr_valid_nsec = c->timeout_nsec;
    out.o.len = sizeof out;
    out.o.unique = h->unique;
    pyvfs_iov_write(wr, wr_n, 0, &out, sizeof out);
    *written = sizeof out;
    return 1;
}

/* fuse.split_name + passthrough.check_name: the first NUL-terminated string of the
   arguments, 1..255 bytes, no '/', not "." or "..", copied into name[256]. Its length, or
   0 for anything else (Python's EINVAL or ENAMETOOLONG). */
static size_t read_name_at(const struct fuse_in_header *h, const pyvfs_iov_t *rd, int rd_n,
                           uint64_t skip, char *name) {
    if (h->len - sizeof *h < skip) return 0;
    uint64_t args = h->len - sizeof *h - skip;
    uint64_t take = args < 256 ? args : 256;
    if (take == 0 || pyvfs_iov_read(rd, rd_n, sizeof *h + skip, name, take) != take) return 0;
    const char *nul = memchr(name, 0, take);
    if (!nul || nul == name) return 0;
    size_t name_len = (size_t)(nul - name);
    if (memchr(name, '/', name_len) || (name[0] == '.' && (name_len == 1 ||
                                        (name_len == 2 && name[1] == '.'))))
        return 0;
    return name_len;
}

static size_t read_name(const struct fuse_in_header *h, const pyvfs_iov_t *rd, int rd_n,
                        char *name) {
    return read_name_at(h, rd, rd_n, 0, name);
}

/* A reply that is just the out header (error 0). */
static int reply_empty(const struct fuse_in_header *h, const pyvfs_iov_t *wr, int wr_n,
                       uint32_t *written) {
    struct fuse_out_header o = {.len = sizeof o, .error = 0, .unique = h->unique};
    pyvfs_iov_write(wr, wr_n, 0, &o, sizeof o);
    *written = sizeof o;
    return 1;
}

static int reply_error(const struct fuse_in_header *h, int error, const pyvfs_iov_t *wr,
                       int wr_n, uint32_t *written) {
    struct fuse_out_header o = {.len = sizeof o, .error = error, .unique = h->unique};
    pyvfs_iov_write(wr, wr_n, 0, &o, sizeof o);
    *written = sizeof o;
    return 1;
}

/* passthrough.op_flush while no lock owner holds anything (LockOwners' live count is 0,
   or locks are not forwarded): the fh must be open, and that is all. */
static int fast_flush(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                      const pyvfs_iov_t *rd, int rd_n, uint64_t wr_len,
                      const pyvfs_iov_t *wr, int wr_n, uint32_t *written) {
    struct fuse_flush_in a;
    if (wr_len < sizeof(struct fuse_out_header) || h->len - sizeof *h < sizeof a) return 0;
    if (c->lock_live &&
        __atomic_load_n((const uint64_t *)(uintptr_t)c->lock_live, __ATOMIC_ACQUIRE) != 0)
        return 0;  /* Python drops this owner's locks under the table's mutex */
    pyvfs_iov_read(rd, rd_n, sizeof *h, &a, sizeof a);
    if (TABLE(c, ht_pin)((void *)c->handles, a.fh) < 0) return 0;  /* EBADF */
    TABLE(c, ht_unpin)((void *)c->handles, a.fh);
    return reply_empty(h, wr, wr_n, written);
}

/* passthrough.op_release (RELEASE and RELEASEDIR): the guest's reference on the fh goes,
   and the fd with it when no request still uses it. */
static int fast_release(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                        const pyvfs_iov_t *rd, int rd_n, uint64_t wr_len,
                        const pyvfs_iov_t *wr, int wr_n, uint32_t *written) {
    uint64_t fh;
    if (!c->ht_close || wr_len < sizeof(struct fuse_out_header) ||
        h->len - sizeof *h < sizeof fh)
        return 0;
    pyvfs_iov_read(rd, rd_n, sizeof *h, &fh, sizeof fh);
    if (TABLE(c, ht_close)((void *)c->handles, fh) < 0) return 0;  /* pins used up: Python */
    return reply_empty(h, wr, wr_n, written);
}

/* passthrough.op_unlink; a failing unlinkat is left to Python, which gets the same errno. */
static int fast_unlink(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                       const pyvfs_iov_t *rd, int rd_n, uint64_t wr_len,
                       const pyvfs_iov_t *wr, int wr_n, uint32_t *written) {
    if (!c->allow_unlink || wr_len < sizeof(struct fuse_out_header)) return 0;
    char name[256];
    if (!read_name(h, rd, rd_n, name)) return 0;
    int pfd = inode_fd(c, h->nodeid);
    if (pfd < 0) return 0;
    int r = unlinkat(pfd, name, 0);
    unpin_inode(c, h->nodeid);
    return r == 0 ? reply_empty(h, wr, wr_n, written) : 0;
}

/* FUSE_ATTR_SUBMOUNT for a directory on another file system than its parent, as
   PassthroughFs._attr_flags sets it; -1 if the parent cannot be stat'ed. */
static int64_t submount_flag(const pyvfs_fast_ctx_t *c, int pfd, const struct stat *st) {
    if (!S_ISDIR(st->st_mode) ||
        !(*(const uint64_t *)(uintptr_t)c->session & c->submounts_flag))
        return 0;
    struct stat pst;
    if (fstat(pfd, &pst) != 0) return -1;
    return pst.st_dev != st->st_dev ? FUSE_ATTR_SUBMOUNT : 0;
}

/* A name whose inode already has an entry, found without opening it (an open, a close and,
 * with file handles, a name_to_handle_at on the opened fd are most of a LOOKUP's cost):
 * - by file handle: name_to_handle_at on the name itself, the attributes from this
 *   worker's cached fd of that entry (a nodeid is never reused, so it is that inode);
 * - without file handles: by the ids fstatat gives, among entries that hold an O_PATH fd,
 *   which pins the inode, so those ids cannot belong to another file meanwhile.
 * 1: one lookup claimed for the guest and *e filled; 0: not found this way (nothing
 * held). */
static int lookup_known(const pyvfs_fast_ctx_t *c, int pfd, const char *name,
                        struct fuse_entry_out *e) {
    struct stat st;
    uint64_t nodeid;
    if (c->use_handles) {
        struct { struct file_handle fh; unsigned char buf[PYVFS_MAX_HANDLE]; } fh;
        int mnt = 0;
        fh.fh.handle_bytes = PYVFS_MAX_HANDLE;
        if (name_to_handle_at(pfd, name, &fh.fh, &mnt, 0) != 0 ||
            fh.fh.handle_bytes > PYVFS_MAX_HANDLE || (int64_t)mnt != c->root_mnt_id)
            return 0;
        if (TABLE(c, it_claim)((void *)c->inodes, 0, 0, 0, (const char *)fh.fh.f_handle,
                               fh.fh.handle_bytes, fh.fh.handle_type, (uint64_t)mnt,
                               &nodeid) != 0)
            return 0;
        int fd = pyvfs_fdc_get(c->fd_cache, nodeid);
        if (fd < 0 || fstat(fd, &st) != 0) goto drop;
    } else {
        if (fstatat(pfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) return 0;
        if (TABLE(c, it_claim)((void *)c->inodes, st.st_ino, st.st_dev, 0, NULL, 0, 0, 0,
                               &nodeid) != 0)
            return 0;
    }
    int64_t flags = submount_flag(c, pfd, &st);
    memset(e, 0, sizeof *e);
    if (flags < 0 || !fill_attr(&e->attr, &st, (uint32_t)flags)) goto drop;
    e->nodeid = nodeid;
    e->entry_valid = e->attr_valid = c->timeout_sec;
    e->entry_valid_nsec = e->attr_valid_nsec = c->timeout_nsec;
    return 1;
drop:
    unclaim(c, nodeid);
    return 0;
}

/* PassthroughFs.do_lookup + claim + the attr of pack_entry_into: open name
 * O_PATH|O_NOFOLLOW under the parent, fstat, identify it (file handle and mount id as
 * PassthroughFs._file_handle does), then claim_or_insert exactly as PassthroughFs.claim: the
 * lookup it takes is the guest's, given back by FORGET. Fills *e (nodeid, timeouts, attr
 * with FUSE_ATTR_SUBMOUNT as PassthroughFs._attr_flags sets it).
 * is_new: the caller just made the file, so lookup_known would only miss.
 * 1: done; 0: the name does not exist (ENOENT, nothing taken); -1: anything else (nothing
 * taken; Python must answer). */
static int lookup_core(const pyvfs_fast_ctx_t *c, uint64_t parent, int pfd, const char *name,
                       size_t name_len, int is_new, struct fuse_entry_out *e) {
    if (!is_new && lookup_known(c, pfd, name, e)) return 1;
    int fd = openat(pfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? 0 : -1;
    struct stat st;
    if (fstat(fd, &st) != 0) goto fail;
    memset(e, 0, sizeof *e);
    int64_t attr_flags = submount_flag(c, pfd, &st);
    if (attr_flags < 0 || !fill_attr(&e->attr, &st, (uint32_t)attr_flags)) goto fail;
    struct { struct file_handle fh; unsigned char buf[PYVFS_MAX_HANDLE]; } fh;
    const char *hb = NULL;
    uint32_t hn = 0;
    int32_t htype = 0;
    int mnt = 0;
    if (c->use_handles) {
        fh.fh.handle_bytes = PYVFS_MAX_HANDLE;
        if (name_to_handle_at(fd, "", &fh.fh, &mnt, AT_EMPTY_PATH) == 0 &&
            fh.fh.handle_bytes <= PYVFS_MAX_HANDLE) {
            hb = (const char *)fh.fh.f_handle;
            hn = fh.fh.handle_bytes;
            htype = fh.fh.handle_type;
        } else {
            mnt = 0;
        }
    }
    if ((!hb && c->mandatory) || mnt < 0) goto fail;  /* Python: EIO */
    int by_handle = hb != NULL && (int64_t)mnt == c->root_mnt_id;
    uint64_t nodeid;
    int r = TABLE(c, it_claim_or_insert)(
        (void *)c->inodes, st.st_ino, st.st_dev, (uint64_t)mnt, hb, hn, htype, (uint64_t)mnt,
        by_handle ? -1 : fd, st.st_mode, parent, name, (uint32_t)name_len, &nodeid);
    if (r < 0) goto fail;  /* table full: Python answers ENFILE */
    e->nodeid = nodeid;
    if (by_handle)
        pyvfs_fdc_put(c->fd_cache, nodeid, fd);  /* the next request needs no re-open */
    else if (r == 0)
        close(fd);  /* found: the entry keeps its own fd */
    e->entry_valid = e->attr_valid = c->timeout_sec;
    e->entry_valid_nsec = e->attr_valid_nsec = c->timeout_nsec;
    return 1;
fail:
    close(fd);
    return -1;
}

/* passthrough.op_lookup for a name that exists (a missing one is Python's: a negative
   entry or ENOENT by cache mode). */
static int fast_lookup(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                       const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                       uint64_t wr_len, uint32_t *written) {
    struct pyvfs_entry_out out;
    if (wr_len < sizeof out) return 0;  /* ERANGE */
    char name[256];
    size_t name_len = read_name(h, rd, rd_n, name);
    if (!name_len) return 0;
    int pfd = inode_fd(c, h->nodeid);
    if (pfd < 0) return 0;
    /* the parent stays pinned in the fd cache while the child's fd goes in, as Python's
       InodeRef keeps it */
    int pinned = pyvfs_fdc_pin(c->fd_cache, h->nodeid) == 0;
    int r = lookup_core(c, h->nodeid, pfd, name, name_len, 0, &out.e);
    if (pinned) pyvfs_fdc_unpin(c->fd_cache, h->nodeid);
    unpin_inode(c, h->nodeid);
    if (r == 0) {  /* no such name: fuse.negative_entry_out, or ENOENT with --cache never */
        if (!c->negative_lookup) return reply_error(h, -ENOENT, wr, wr_n, written);
        memset(&out, 0, sizeof out);
        out.e.entry_valid = c->timeout_sec;
        out.e.entry_valid_nsec = c->timeout_nsec;
        r = 1;
    }
    if (r < 0) return 0;
    memset(&out.o, 0, sizeof out.o);
    out.o.len = sizeof out;
    out.o.unique = h->unique;
    pyvfs_iov_write(wr, wr_n, 0, &out, sizeof out);
    *written = sizeof out;
    return 1;
}

/* passthrough.op_create for a name that does not exist yet, in the plain case: the file is
 * made O_EXCL with the caller's fsuid/fsgid (Python's Credentials), looked up and claimed as
 * entry() does, and registered in the open-file table as _new_handle does. Anything else is
 * Python's: an existing name (the guest's O_EXCL gets EEXIST there, an open otherwise),
 * O_DIRECTORY/O_TMPFILE, FUSE_OPEN_KILL_SUIDGID, any failure. Once the file is made here a
 * later failure unlinks it again before declining, so Python redoes the whole request. */
struct pyvfs_create_out {
    struct fuse_out_header o;
    struct fuse_entry_out e;
    struct fuse_open_out op;
};
_Static_assert(sizeof(struct fuse_create_in) == 16, "fuse_create_in");
_Static_assert(sizeof(struct fuse_open_out) == 16, "fuse_open_out");
_Static_assert(sizeof(struct pyvfs_create_out) == 160, "create reply");

static int fast_create(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                       const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                       uint64_t wr_len, uint32_t *written) {
    struct pyvfs_create_out out;
    struct fuse_create_in in;
    if (!c->ht_open || wr_len < sizeof out || h->len - sizeof *h < sizeof in) return 0;
    pyvfs_iov_read(rd, rd_n, sizeof *h, &in, sizeof in);
    if (in.flags & (O_DIRECTORY | O_TMPFILE) || in.open_flags & FUSE_OPEN_KILL_SUIDGID)
        return 0;
    char name[256];
    size_t name_len = read_name_at(h, rd, rd_n, sizeof in, name);
    if (!name_len) return 0;
    int pfd = inode_fd(c, h->nodeid);
    if (pfd < 0) return 0;
    int pinned = pyvfs_fdc_pin(c->fd_cache, h->nodeid) == 0;
    int flags = (int)((in.flags & ~c->create_clear) | O_CLOEXEC | O_CREAT | O_NOFOLLOW |
                      O_NONBLOCK | O_EXCL);
    setfsgid(h->gid);
    setfsuid(h->uid);
    int fd = openat(pfd, name, flags, in.mode & 07777);
    pyvfs_own_fsids(c->own_uid, c->own_gid);
    int ok = 0, made = fd >= 0, known = 0;
    struct stat st;
    if (fd >= 0) {
        int fl;
        if ((known = fstat(fd, &st) == 0) && S_ISREG(st.st_mode) &&
            (in.flags & O_NONBLOCK ||
             ((fl = fcntl(fd, F_GETFL)) >= 0 && fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) == 0))) {
            /* a file made just now: no entry can know it yet */
            int r = lookup_core(c, h->nodeid, pfd, name, name_len, 1, &out.e);
            if (r == 0) made = 0;  /* gone meanwhile: not ours to unlink */
            if (r > 0) {
                uint64_t fh = TABLE(c, ht_open)((void *)c->handles, out.e.nodeid, fd,
                                                in.flags);
                if (fh) ok = 1;
                else unclaim(c, out.e.nodeid);
                out.op.fh = fh;
            }
        }
        if (!ok) close(fd);
        else fd = -1;  /* the table owns it */
    }
    if (!ok && made) {
        /* a failed CREATE leaves nothing behind (Python's _unmake): the file made above,
           and only while the name still is that file */
        struct stat now;
        if (!known || (fstatat(pfd, name, &now, AT_SYMLINK_NOFOLLOW) == 0 &&
                       now.st_ino == st.st_ino && now.st_dev == st.st_dev))
            unlinkat(pfd, name, 0);
    }
    if (pinned) pyvfs_fdc_unpin(c->fd_cache, h->nodeid);
    unpin_inode(c, h->nodeid);
    if (!ok) return 0;
    memset(&out.o, 0, sizeof out.o);
    out.o.len = sizeof out;
    out.o.unique = h->unique;
    out.op.open_flags = c->create_fopen;
    out.op.padding = 0;
    pyvfs_iov_write(wr, wr_n, 0, &out, sizeof out);
    *written = sizeof out;
    return 1;
}

/* passthrough.op_readdirplus: getdents64 from the open directory at the guest's offset,
 * each entry looked up (and claimed: the guest FORGETs it) as LOOKUP does, "." and ".."
 * with nodeid 0, as many as fit. On any failure the references taken so far are given back
 * and Python answers the whole request. */
#define PYVFS_DENTS_BUF 32768
#define PYVFS_DENTS_MIN 1024 /* room for the longest dirent64 (19 + 256 bytes) */
struct pyvfs_dirent64 { uint64_t ino; int64_t off; uint16_t reclen; uint8_t type; char name[]; };
static int fast_readdirplus(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                            const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                            uint64_t wr_len, uint32_t *written) {
    struct fuse_read_in a;
    if (!c->ht_pin || wr_len < sizeof(struct fuse_out_header) ||
        h->len - sizeof *h < sizeof a)
        return 0;  /* short arguments: Python's EINVAL */
    pyvfs_iov_read(rd, rd_n, sizeof *h, &a, sizeof a);
    uint64_t size = a.size;
    if (size > PYVFS_MAX_DATA) size = PYVFS_MAX_DATA;
    if (size > wr_len - sizeof(struct fuse_out_header))
        size = wr_len - sizeof(struct fuse_out_header);
    int64_t hr = TABLE(c, ht_pin)((void *)c->handles, a.fh);
    if (hr < 0) return 0;  /* EBADF */
    int dfd = (int)((hr >> 32) - 1);
    int pfd = inode_fd(c, h->nodeid);
    if (pfd < 0) {
        TABLE(c, ht_unpin)((void *)c->handles, a.fh);
        return 0;
    }
    int pinned = pyvfs_fdc_pin(c->fd_cache, h->nodeid) == 0;
    /* every entry is at least 152 bytes: the most lookups this request can claim */
    uint64_t max_refs = size / 152 + 1, nrefs = 0;
    uint64_t *refs = malloc(max_refs * sizeof *refs);
    /* read about as many entries as the reply can take (a dirent64 is at most a quarter of
       its direntplus, often less): the rest would be read again after the next request's
       lseek, and on ext4 every getdents after a seek re-hashes whole directory blocks */
    long dents = (long)(size / 4);
    if (dents < PYVFS_DENTS_MIN) dents = PYVFS_DENTS_MIN;
    if (dents > PYVFS_DENTS_BUF) dents = PYVFS_DENTS_BUF;
    char *buf = malloc((size_t)dents);
    int ok = refs && buf && a.offset <= INT64_MAX &&
             lseek(dfd, (off_t)a.offset, SEEK_SET) >= 0;
    uint64_t used = 0;
    int full = 0;
    while (ok && !full) {
        long n = syscall(SYS_getdents64, dfd, buf, dents);
        if (n < 0) ok = 0;
        if (n <= 0) break;
        for (long pos = 0; pos < n && ok;) {
            struct pyvfs_dirent64 *d = (struct pyvfs_dirent64 *)(buf + pos);
            long reclen = d->reclen;
            if (reclen < 20 || pos + reclen > n) { ok = 0; break; }
            const char *nul = memchr(d->name, 0, (size_t)reclen - 19);
            if (!nul) { ok = 0; break; }
            size_t name_len = (size_t)(nul - d->name);
            if (d->off < 0) { ok = 0; break; }  /* Python's packing refuses it */
            pos += reclen;
            uint64_t rec = (sizeof(struct fuse_entry_out) + sizeof(struct fuse_dirent) +
                            name_len + 7) & ~7ULL;
            if (used + rec > size) { full = 1; break; }
            struct { struct fuse_entry_out e; struct fuse_dirent d; } ent;
            _Static_assert(sizeof ent == 128 + 24, "direntplus head");
            memset(&ent, 0, sizeof ent);
            uint64_t ino = d->ino;
            if (d->name[0] == '.' && (name_len == 1 || (name_len == 2 && d->name[1] == '.'))) {
                /* nodeid 0: the guest makes no dentry and sends no FORGET for it */
                ent.e.attr.ino = d->ino;
                ent.e.attr.mode = (uint32_t)d->type << 12;
            } else {
                if (nrefs == max_refs) { ok = 0; break; }
                int r = lookup_core(c, h->nodeid, pfd, d->name, name_len, 0, &ent.e);
                if (r == 0) continue;  /* gone meanwhile: skipped, as in Python */
                if (r < 0) { ok = 0; break; }
                refs[nrefs++] = ent.e.nodeid;
                ino = ent.e.attr.ino;
            }
            ent.d.ino = ino;
            ent.d.off = (uint64_t)d->off;
            ent.d.namelen = (uint32_t)name_len;
            ent.d.type = d->type;
            uint64_t at = sizeof(struct fuse_out_header) + used;
            pyvfs_iov_write(wr, wr_n, at, &ent, sizeof ent);
            pyvfs_iov_write(wr, wr_n, at + sizeof ent, d->name, name_len);
            static const char zeros[8];
            pyvfs_iov_write(wr, wr_n, at + sizeof ent + name_len, zeros,
                            rec - sizeof ent - name_len);
            used += rec;
        }
    }
    if (!ok)  /* give the lookups back: Python redoes the request from its offset */
        for (uint64_t i = 0; i < nrefs; i++) unclaim(c, refs[i]);
    free(refs);
    free(buf);
    if (pinned) pyvfs_fdc_unpin(c->fd_cache, h->nodeid);
    unpin_inode(c, h->nodeid);
    TABLE(c, ht_unpin)((void *)c->handles, a.fh);
    if (!ok) return 0;
    struct fuse_out_header o = {.len = (uint32_t)(sizeof o + used), .error = 0,
                                .unique = h->unique};
    pyvfs_iov_write(wr, wr_n, 0, &o, sizeof o);
    *written = o.len;
    return 1;
}

/* passthrough._forget */
static void forget_one(const pyvfs_fast_ctx_t *c, uint64_t nodeid, uint64_t n) {
    if (nodeid == PYVFS_ROOT_ID) return;
    TABLE(c, it_forget)((void *)c->inodes, nodeid, n);
    if (TABLE(c, it_lookup)((void *)c->inodes, nodeid) < 0)
        pyvfs_fdc_drop(c->fd_cache, nodeid);
}

/* FORGET and BATCH_FORGET have no reply: the chain completes with length 0. */
static int fast_forget(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                       const pyvfs_iov_t *rd, int rd_n, uint32_t *written) {
    uint64_t args = h->len - sizeof *h;
    if (h->opcode == FUSE_FORGET) {
        struct fuse_forget_in a;
        if (args >= sizeof a) {
            pyvfs_iov_read(rd, rd_n, sizeof *h, &a, sizeof a);
            forget_one(c, h->nodeid, a.nlookup);
        }
    } else if (args >= sizeof(struct fuse_batch_forget_in)) {
        struct fuse_batch_forget_in b;
        pyvfs_iov_read(rd, rd_n, sizeof *h, &b, sizeof b);
        uint64_t count = b.count, room = (args - sizeof b) / sizeof(struct fuse_forget_one);
        if (count > room) count = room;
        struct fuse_forget_one batch[64];
        uint64_t at = sizeof *h + sizeof b;
        while (count) {
            uint64_t k = count < 64 ? count : 64;
            pyvfs_iov_read(rd, rd_n, at, batch, k * sizeof batch[0]);
            for (uint64_t i = 0; i < k; i++) forget_one(c, batch[i].nodeid, batch[i].nlookup);
            at += k * sizeof batch[0];
            count -= k;
        }
    }
    *written = 0;
    return 1;
}

/* One request: 1 when answered here (*written = bytes written to the guest), 0 when the
 * Python path must answer it. */
int pyvfs_fast(const pyvfs_iov_t *rd, int rd_n, uint64_t rd_len,
               const pyvfs_iov_t *wr, int wr_n, uint64_t wr_len,
               const pyvfs_fast_ctx_t *c, uint32_t *written) {
    struct fuse_in_header h;
    if (rd_len < sizeof h) return 0;
    pyvfs_iov_read(rd, rd_n, 0, &h, sizeof h);
    if (h.opcode >= 64 || !((c->c_ops >> h.opcode) & 1)) return 0;
    switch (h.opcode) {
    case FUSE_READ:
    case FUSE_WRITE:
        return pyvfs_fast_io(rd, rd_n, rd_len, wr, wr_n, wr_len, c->handles, c->ht_pin,
                             c->ht_unpin, c->allow_write, written);
    case FUSE_GETATTR:
    case FUSE_LOOKUP:
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:
    case FUSE_UNLINK:
    case FUSE_READDIRPLUS:
    case FUSE_CREATE:
    case FUSE_FLUSH:
        break;
    default:
        return 0;
    }
    /* queue_worker.handle_chain's checks: Python answers ENOMEM / EINVAL */
    if (!c->meta || h.len < sizeof h || h.len > rd_len || h.len > PYVFS_MAX_REQUEST ||
        h.total_extlen)
        return 0;
    switch (h.opcode) {
    case FUSE_GETATTR:
        return fast_getattr(c, &h, wr, wr_n, wr_len, written);
    case FUSE_LOOKUP:
        return fast_lookup(c, &h, rd, rd_n, wr, wr_n, wr_len, written);
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:
        return fast_release(c, &h, rd, rd_n, wr_len, wr, wr_n, written);
    case FUSE_UNLINK:
        return fast_unlink(c, &h, rd, rd_n, wr_len, wr, wr_n, written);
    case FUSE_READDIRPLUS:
        return fast_readdirplus(c, &h, rd, rd_n, wr, wr_n, wr_len, written);
    case FUSE_CREATE:
        return fast_create(c, &h, rd, rd_n, wr, wr_n, wr_len, written);
    case FUSE_FLUSH:
        return fast_flush(c, &h, rd, rd_n, wr_len, wr, wr_n, written);
    default:
        return fast_forget(c, &h, rd, rd_n, written);
    }
}

/* ---- per-queue counters for `pyvirtiofsd stats` (daemon/stats/queue_stats.py): a row per
 * queue in a shared segment. Only that queue's worker writes its row (relaxed stores of
 * aligned words: readers in other processes see whole values), so counting costs no
 * atomics; the row outlives a worker that is restarted. One worker serves one queue, so
 * the row is a process-wide pointer. */
#define PYVFS_STATS_OPCODES 64
typedef struct {
    uint64_t requests, in_c, errors, dropped, read_bytes, write_bytes, wakeups, notifies;
    uint64_t by_opcode[PYVFS_STATS_OPCODES]; /* [0]: opcodes >= 64 and unknown ones */
} pyvfs_qstats_t;

static pyvfs_qstats_t *g_stats;

void pyvfs_stats_attach(pyvfs_qstats_t *row) { g_stats = row; }

static inline void bump(uint64_t *p, uint64_t n) {
    __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

/* A request answered (written > 0) or taken without a reply (written == 0): its opcode
 * from the request, its errno and data bytes from the reply it got. */
void pyvfs_stats_note(const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                      uint32_t written, int in_c) {
    pyvfs_qstats_t *s = g_stats;
    if (!s) return;
    uint32_t op = 0;
    if (rd_n > 0 && rd[0].len >= 8) { /* the usual case: the header in one descriptor */
        memcpy(&op, (const char *)(uintptr_t)rd[0].base + 4, sizeof op);
    } else {
        uint32_t hdr[2] = {0, 0}; /* len, opcode */
        if (pyvfs_iov_read(rd, rd_n, 0, hdr, sizeof hdr) == sizeof hdr) op = hdr[1];
    }
    bump(&s->requests, 1);
    if (in_c) bump(&s->in_c, 1);
    bump(&s->by_opcode[op < PYVFS_STATS_OPCODES ? op : 0], 1);
    if (written < sizeof(struct fuse_out_header)) return;
    struct fuse_out_header out = {0};
    if (wr_n > 0 && wr[0].len >= sizeof out)
        memcpy(&out, (const void *)(uintptr_t)wr[0].base, sizeof out);
    else
        pyvfs_iov_read(wr, wr_n, 0, &out, sizeof out);
    if (out.error != 0) {
        bump(&s->errors, 1);
    } else if (op == FUSE_READ) {
        bump(&s->read_bytes, written - sizeof out);
    } else if (op == FUSE_WRITE && written >= sizeof out + sizeof(uint32_t)) {
        uint32_t size = 0;
        pyvfs_iov_read(wr, wr_n, sizeof out, &size, sizeof size);
        bump(&s->write_bytes, size);
    }
}

/* ---- the ring loop: pop, answer, push, all in C while requests are fast-path ones.
 * The split ring's state lives here so Python's SplitQueue (daemon/guest/virtqueue.py) and this
 * loop share it. */
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
} pyvfs_queue_t;

/* pyvfs_serve's loop state and settings (QueueWorker keeps one) */
typedef struct {
    int32_t epoll_fd, kick_fd, call_fd;
    int32_t timeout_ms;   /* -1: none; LOCK_RETRY while SETLKWs wait */
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

void pyvfs_queue_push(pyvfs_queue_t *q, uint32_t head, uint32_t len) {
    uint32_t *e = (uint32_t *)(uintptr_t)(q->used + 4 + 8 * (uint64_t)(q->used_idx % q->size));
    e[0] = head;
    e[1] = len;
    q->used_idx++;
    __atomic_store_n((uint16_t *)(uintptr_t)(q->used + 2), q->used_idx, __ATOMIC_RELEASE);
}

static uint64_t now_ns(void);
/* While draining, the control socket is looked at every CONTROL_CHECK_NS: a ring the guest
 * keeps full must not keep the supervisor waiting (it kills a worker silent for 0.5 s).
 * pyvfs_drain returns 0 early when a look is due, with the ring not empty. */
#define CONTROL_CHECK_NS 10000000u
static uint64_t control_check_at;  /* one serve loop per worker process */

/* Pop chains until the ring is empty (0) or one needs Python: 1 = a walked chain in
 * rd/wr (*head), for handle_chain; 2 + k = a malformed chain at *head (walk error -1 - k,
 * detail filled), to be completed with length 0; -1 = the avail index jumped by more than
 * the ring size. Requests answered here are pushed; *answered counts them. fast == 0: only
 * pop (debug logging: every request goes to Python). */
int pyvfs_drain(pyvfs_queue_t *q, pyvfs_iov_t *rd, pyvfs_iov_t *wr, int *counts,
                uint64_t *lens, uint64_t *detail, uint32_t *head, int max_iov,
                const pyvfs_fast_ctx_t *c, int fast, uint32_t *answered) {
    uint32_t done = 0;
    int rc = 0;
    for (;;) {
        if (done % 8 == 7 && now_ns() >= control_check_at) break;
        uint16_t avail = __atomic_load_n((uint16_t *)(uintptr_t)(q->avail + 2),
                                         __ATOMIC_ACQUIRE);
        if (avail == q->last_avail) break;
        if ((uint16_t)(avail - q->last_avail) > q->size) { rc = -1; break; }
        uint32_t h = __atomic_load_n(
            (uint16_t *)(uintptr_t)(q->avail + 4 + 2 * (uint64_t)(q->last_avail % q->size)),
            __ATOMIC_ACQUIRE);
        q->last_avail++;
        *head = h;
        int w = pyvfs_walk_chain(q->desc, q->size, h, q->indirect, q->regions, q->nregions,
                                 rd, &counts[0], &lens[0], wr, &counts[1], &lens[1], max_iov,
                                 detail);
        if (w) { /* malformed: Python logs it and completes it with length 0 */
            if (g_stats) bump(&g_stats->dropped, 1);
            rc = 1 - w;
            break;
        }
        uint32_t written = 0;
        if (fast && pyvfs_fast(rd, counts[0], lens[0], wr, counts[1], lens[1], c, &written)) {
            pyvfs_stats_note(rd, counts[0], wr, counts[1], written, 1);
            pyvfs_queue_push(q, h, written);
            done++;
            continue;
        }
        rc = 1;
        break;
    }
    *answered = done;
    return rc;
}

/* ---- notifications (virtio 1.x 2.7.7 / 2.7.10): the used ring's flags or avail_event,
 * and whether the driver wants an interrupt for what was pushed since the last decision */
void pyvfs_queue_disable(pyvfs_queue_t *q) {
    if (!q->event_idx) __atomic_store_n((uint16_t *)(uintptr_t)q->used, 1, __ATOMIC_RELAXED);
}

int pyvfs_queue_enable(pyvfs_queue_t *q) {
    if (q->event_idx)
        __atomic_store_n((uint16_t *)(uintptr_t)(q->used + 4 + 8 * (uint64_t)q->size),
                         q->last_avail, __ATOMIC_RELAXED);
    else
        __atomic_store_n((uint16_t *)(uintptr_t)q->used, 0, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n((uint16_t *)(uintptr_t)(q->avail + 2), __ATOMIC_ACQUIRE) !=
           q->last_avail;
}

int pyvfs_queue_should_notify(pyvfs_queue_t *q) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t new = q->used_idx;
    if (!q->event_idx)
        return !(__atomic_load_n((uint16_t *)(uintptr_t)q->avail, __ATOMIC_ACQUIRE) & 1);
    uint16_t old = q->signalled_used;
    int valid = q->signalled_valid;
    q->signalled_used = new;
    q->signalled_valid = 1;
    if (!valid) return 1;
    uint16_t used_event = __atomic_load_n(
        (uint16_t *)(uintptr_t)(q->avail + 4 + 2 * (uint64_t)q->size), __ATOMIC_ACQUIRE);
    return (uint16_t)(new - used_event - 1) < (uint16_t)(new - old);
}

static void notify(pyvfs_queue_t *q, int call_fd) {
    static const uint64_t one = 1;
    if (call_fd >= 0 && pyvfs_queue_should_notify(q)) {
        if (write(call_fd, &one, sizeof one) < 0) {
            /* the front-end's eventfd is gone or full: nothing to do but go on */
        } else if (g_stats) {
            bump(&g_stats->notifies, 1);
        }
    }
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* The worker's whole wait-and-serve loop while requests are fast-path ones, so a wake-up
 * costs no Python: epoll_wait on the kick eventfd and the control socket, read the kick,
 * drain the ring with notifications off, re-arm them (draining again if work slipped in),
 * signal the call eventfd if the driver asks. s->flags carries the loop's state between
 * calls. Returns PYVFS_SERVE_CHAIN (a walked chain at *head for Python: answer and push
 * it, set PYVFS_PUSHED, call again), a malformed chain or a jumped avail index exactly as
 * pyvfs_drain, PYVFS_SERVE_CONTROL (the control socket is readable) or
 * PYVFS_SERVE_TIMEOUT (timeout_ms passed: waiting locks to retry) or PYVFS_SERVE_ERROR
 * (epoll_wait failed; errno). */
int pyvfs_serve(pyvfs_queue_t *q, pyvfs_iov_t *rd, pyvfs_iov_t *wr, int *counts,
                uint64_t *lens, uint64_t *detail, uint32_t *head, int max_iov,
                const pyvfs_fast_ctx_t *c, pyvfs_serve_t *s) {
    /* with SETLKWs waiting, come back to retry them after timeout_ms even while requests
       keep the loop busy */
    uint64_t deadline = s->timeout_ms >= 0 ? now_ns() + (uint64_t)s->timeout_ms * 1000000u : 0;
    for (;;) {
        if (!(s->flags & PYVFS_DRAINING)) {
            int wait_ms = -1;
            if (deadline) {
                uint64_t t = now_ns();
                if (t >= deadline) return PYVFS_SERVE_TIMEOUT;
                wait_ms = (int)((deadline - t + 999999u) / 1000000u);
            }
            fdc_sweep(c);
            int sweep_tick = c->fd_cache && c->fd_cache->count && (wait_ms < 0 || wait_ms > 1000);
            if (sweep_tick) wait_ms = 1000;  /* forgets on other queues do not wake us */
            struct epoll_event ev[4];
            int n = epoll_wait(s->epoll_fd, ev, 4, wait_ms);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) return PYVFS_SERVE_ERROR;  /* errno says why */
            if (n == 0 && sweep_tick) continue;
            if (n == 0) return PYVFS_SERVE_TIMEOUT;
            int kicked = 0;
            for (int i = 0; i < n; i++) {
                if (ev[i].data.fd != s->kick_fd) return PYVFS_SERVE_CONTROL;
                kicked = 1;
            }
            if (!kicked || !s->enabled) {
                uint64_t v;
                if (kicked && read(s->kick_fd, &v, sizeof v) < 0) { /* EAGAIN: fine */ }
                continue;
            }
            if (s->gather_ns) {
                /* requests nobody waits for (FORGET): let more of them arrive first */
                struct timespec t = {0, (long)s->gather_ns};
                nanosleep(&t, NULL);
            }
            uint64_t v;
            if (read(s->kick_fd, &v, sizeof v) < 0) { /* EAGAIN: fine */ }
            if (g_stats) bump(&g_stats->wakeups, 1);
            s->flags |= PYVFS_DRAINING;
            pyvfs_queue_disable(q);
            control_check_at = now_ns() + CONTROL_CHECK_NS;
        } else if (now_ns() >= control_check_at) {
            struct epoll_event ev[4];
            int n = epoll_wait(s->epoll_fd, ev, 4, 0);
            control_check_at = now_ns() + CONTROL_CHECK_NS;
            for (int i = 0; i < n; i++)
                if (ev[i].data.fd != s->kick_fd) return PYVFS_SERVE_CONTROL;
        }
        uint32_t answered = 0;
        int r = pyvfs_drain(q, rd, wr, counts, lens, detail, head, max_iov, c, s->fast,
                            &answered);
        if (answered) s->flags |= PYVFS_PUSHED;
        if (r != 0) return r;  /* flags keep DRAINING: the next call goes on draining */
        if (s->poll_ns && (s->flags & PYVFS_PUSHED)) {
            /* hand the guest its answers now, then poll a moment for more before paying
               for a kick and a wake-up (--poll-us) */
            notify(q, s->call_fd);
            s->flags &= ~PYVFS_PUSHED;
            uint64_t end = now_ns() + s->poll_ns;
            int more = 0;
            while (!more && now_ns() < end)
                more = __atomic_load_n((uint16_t *)(uintptr_t)(q->avail + 2),
                                       __ATOMIC_ACQUIRE) != q->last_avail;
            if (more) continue;
        }
        if (pyvfs_queue_enable(q)) {
            pyvfs_queue_disable(q);
            continue;
        }
        s->flags &= ~PYVFS_DRAINING;
        if (s->flags & PYVFS_PUSHED) notify(q, s->call_fd);
        s->flags &= ~PYVFS_PUSHED;
    }
}
