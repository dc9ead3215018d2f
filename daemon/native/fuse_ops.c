/* The FUSE requests answered wholly in C: READ and WRITE, GETATTR, LOOKUP, FORGET,
 * BATCH_FORGET, RELEASE(DIR), UNLINK, READDIRPLUS, CREATE and FLUSH (pyvfs_fast), and
 * through fuse_meta.c RMDIR, RENAME, MKDIR, MKNOD, SYMLINK, OPEN and SETATTR, for the
 * opcodes whose bit is set in the context's c_ops.
 *
 * The rule: answer exactly what daemon/fs/passthrough.py would answer, byte for byte, or
 * return 0 ("not handled") and let Python answer. Everything unusual is declined: odd
 * lengths, request extensions, bad names, unknown nodeids, any failing system call, a full
 * inode table, time stamps Python cannot encode. Python then redoes the request from the
 * start and produces the proper errno and log line; a declined request has changed
 * nothing (every reference taken here is given back first).
 *
 * The inode and open-file tables are reached through the shm_table extension's own
 * functions (addresses from InodeTable.c_api() and HandleTable.c_api()), so the reference
 * counting is the tables', not a copy. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"

#define PYVFS_MAX_DATA (1u << 20) /* the largest READ/WRITE payload answered here */
#define PYVFS_MAX_REQUEST ((1u << 20) + 64 * 1024) /* MAX_REQUEST, workers/queue_worker.py */
#define PYVFS_ROOT_ID 1

/* passthrough.op_getattr: fstat of the inode's fd (the fh of FUSE_GETATTR_FH is not used,
 * as in Python). */
static int fast_getattr(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                        const pyvfs_iov_t *wr, int wr_n, uint64_t wr_len, uint32_t *written) {
    struct pyvfs_attr_out out;
    if (wr_len < sizeof out) return 0;  /* Python answers ERANGE */
    int fd = pyvfs_inode_fd(c, h->nodeid);
    if (fd < 0) return 0;
    struct stat st;
    int ok = fstat(fd, &st) == 0;
    pyvfs_unpin_inode(c, h->nodeid);
    memset(&out, 0, sizeof out);
    if (!ok || !pyvfs_fill_attr(&out.a.attr, &st, 0)) return 0;
    out.a.attr_valid = c->timeout_sec;
    out.a.attr_valid_nsec = c->timeout_nsec;
    out.o.len = sizeof out;
    out.o.unique = h->unique;
    pyvfs_iov_write(wr, wr_n, 0, &out, sizeof out);
    *written = sizeof out;
    return 1;
}

static size_t read_name(const struct fuse_in_header *h, const pyvfs_iov_t *rd, int rd_n,
                        char *name) {
    return pyvfs_read_name_at(h, rd, rd_n, 0, name);
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
    return pyvfs_reply_empty(h, wr, wr_n, written);
}

/* passthrough.op_release (RELEASE and RELEASEDIR): the guest's reference on the fh goes,
   and the fd with it when no request still uses it. */
static int fast_release(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                        const pyvfs_iov_t *rd, int rd_n, uint64_t wr_len,
                        const pyvfs_iov_t *wr, int wr_n, uint32_t *written) {
    uint64_t fh;
    if (wr_len < sizeof(struct fuse_out_header) ||
        h->len - sizeof *h < sizeof fh)
        return 0;
    pyvfs_iov_read(rd, rd_n, sizeof *h, &fh, sizeof fh);
    if (TABLE(c, ht_close)((void *)c->handles, fh) < 0) return 0;  /* pins used up: Python */
    return pyvfs_reply_empty(h, wr, wr_n, written);
}

/* passthrough.op_unlink; a failing unlinkat is left to Python, which gets the same errno. */
static int fast_unlink(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                       const pyvfs_iov_t *rd, int rd_n, uint64_t wr_len,
                       const pyvfs_iov_t *wr, int wr_n, uint32_t *written) {
    if (wr_len < sizeof(struct fuse_out_header)) return 0;
    char name[256];
    if (!read_name(h, rd, rd_n, name)) return 0;
    int pfd = pyvfs_inode_fd(c, h->nodeid);
    if (pfd < 0) return 0;
    int r = unlinkat(pfd, name, 0);
    pyvfs_unpin_inode(c, h->nodeid);
    return r == 0 ? pyvfs_reply_empty(h, wr, wr_n, written) : 0;
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
    int pfd = pyvfs_inode_fd(c, h->nodeid);
    if (pfd < 0) return 0;
    /* the parent stays pinned in the fd cache while the child's fd goes in, as Python's
       InodeRef keeps it */
    int pinned = pyvfs_fdc_pin(c->fd_cache, h->nodeid) == 0;
    int r = pyvfs_lookup_core(c, h->nodeid, pfd, name, name_len, NULL, &out.e);
    if (pinned) pyvfs_fdc_unpin(c->fd_cache, h->nodeid);
    pyvfs_unpin_inode(c, h->nodeid);
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
#define PYVFS_OPEN_OUT_TAIL (offsetof(struct fuse_open_out, open_flags) + sizeof(uint32_t))
_Static_assert(sizeof(struct pyvfs_create_out) == 160, "create reply");

static int fast_create(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                       const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                       uint64_t wr_len, uint32_t *written) {
    struct pyvfs_create_out out;
    struct fuse_create_in in;
    if (wr_len < sizeof out || h->len - sizeof *h < sizeof in) return 0;
    pyvfs_iov_read(rd, rd_n, sizeof *h, &in, sizeof in);
    if (in.flags & (O_DIRECTORY | O_TMPFILE) || in.open_flags & FUSE_OPEN_KILL_SUIDGID)
        return 0;
    char name[256];
    size_t name_len = pyvfs_read_name_at(h, rd, rd_n, sizeof in, name);
    if (!name_len) return 0;
    int pfd = pyvfs_inode_fd(c, h->nodeid);
    if (pfd < 0) return 0;
    int pinned = pyvfs_fdc_pin(c->fd_cache, h->nodeid) == 0;
    /* O_EXCL: only a file made by this open, so a regular file; never an existing FIFO
       or device (EEXIST: Python answers), so no O_NONBLOCK to open it without waiting */
    int flags = (int)((in.flags & ~c->create_clear) | O_CLOEXEC | O_CREAT | O_NOFOLLOW |
                      O_EXCL);
    int as_caller = pyvfs_caller_fsids(h->uid, h->gid, c->own_uid, c->own_gid);
    int fd = openat(pfd, name, flags, in.mode & 07777);
    if (as_caller) pyvfs_own_fsids(c->own_uid, c->own_gid);
    int ok = 0, made = fd >= 0, known = 0;
    struct stat st;
    if (fd >= 0) {
        if ((known = fstat(fd, &st) == 0) && S_ISREG(st.st_mode)) {
            /* a file made just now: no entry can know it yet. Its entry is looked up by
               name, so only while the name still is that file (a rename onto it on
               another queue: declined, and the file made here is gone with the name) */
            int r = pyvfs_lookup_core(c, h->nodeid, pfd, name, name_len, &st, &out.e);
            if (r == 0) made = 0;  /* gone meanwhile: not ours to unlink */
            if (r > 0) {
                uint64_t fh = TABLE(c, ht_open)((void *)c->handles, out.e.nodeid, fd,
                                                in.flags);
                if (fh) ok = 1;
                else pyvfs_unclaim(c, out.e.nodeid);
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
    pyvfs_unpin_inode(c, h->nodeid);
    if (!ok) return 0;
    memset(&out.o, 0, sizeof out.o);
    out.o.len = sizeof out;
    out.o.unique = h->unique;
    out.op.open_flags = c->create_fopen;
    /* zero the last 4 bytes: "padding" in <linux/fuse.h> before FUSE 7.40 (Debian 12),
       "backing_id" since (Debian 13), so neither name is used */
    memset((char *)&out.op + PYVFS_OPEN_OUT_TAIL, 0, sizeof out.op - PYVFS_OPEN_OUT_TAIL);
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
    int pfd = pyvfs_inode_fd(c, h->nodeid);
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
                int r = pyvfs_lookup_core(c, h->nodeid, pfd, d->name, name_len, NULL, &ent.e);
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
        for (uint64_t i = 0; i < nrefs; i++) pyvfs_unclaim(c, refs[i]);
    free(refs);
    free(buf);
    if (pinned) pyvfs_fdc_unpin(c->fd_cache, h->nodeid);
    pyvfs_unpin_inode(c, h->nodeid);
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

/* QueueWorker.do_read and do_write (workers/queue_worker.py): header, open-file lookup
   in the shared handle table, preadv/pwritev between the file and guest memory, reply.
   Returns 1 when answered (*written = bytes written to the guest), 0 when Python must
   handle the request (anything unusual: an unknown fh, odd lengths, a read-only share). */
static int fast_io(const pyvfs_fast_ctx_t *c, const pyvfs_iov_t *rd, int rd_n,
                   uint64_t rd_len, const pyvfs_iov_t *wr, int wr_n, uint64_t wr_len,
                   uint32_t *written) {
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
    if (h.opcode == FUSE_WRITE && (a.size > h.len - data_at ||
                                   (a.read_flags & FUSE_WRITE_KILL_SUIDGID) ||
                                   wr_len < sizeof(struct fuse_out_header) +
                                            sizeof(struct fuse_write_out)))
        return 0;
    int64_t r = TABLE(c, ht_pin)((void *)c->handles, a.fh);
    if (r < 0) return 0;  /* Python answers EBADF and logs it */
    int fd = (int)((r >> 32) - 1);
    if (h.opcode == FUSE_WRITE && h.uid != 0) {
        /* a non-root writer must clear setuid/setgid: Python drops CAP_FSETID */
        struct stat st;
        if (fstat(fd, &st) != 0 || (st.st_mode & (S_ISUID | S_ISGID))) {
            TABLE(c, ht_unpin)((void *)c->handles, a.fh);
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
    TABLE(c, ht_unpin)((void *)c->handles, a.fh);
    *written = total;
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
    if (h.opcode >= 64 || !((c->c_ops >> h.opcode) & 1)) return 0;  /* not asked of C */
    switch (h.opcode) {
    case FUSE_READ:
    case FUSE_WRITE:
        return fast_io(c, rd, rd_n, rd_len, wr, wr_n, wr_len, written);
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
    case FUSE_RMDIR:
    case FUSE_RENAME:
    case FUSE_MKDIR:
    case FUSE_MKNOD:
    case FUSE_SYMLINK:
    case FUSE_OPEN:
    case FUSE_SETATTR:
        break;
    default:
        return 0;
    }
    /* QueueWorker.handle_chain's checks (workers/queue_worker.py): Python answers ENOMEM /
       EINVAL */
    if (h.len < sizeof h || h.len > rd_len || h.len > PYVFS_MAX_REQUEST ||
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
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
        return fast_forget(c, &h, rd, rd_n, written);
    default:
        return pyvfs_fast_meta(c, &h, rd, rd_n, wr, wr_n, wr_len, written);
    }
}
