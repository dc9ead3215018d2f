/* More FUSE requests answered wholly in C, handed here by pyvfs_fast (fuse_ops.c): RMDIR,
 * RENAME, MKDIR, MKNOD, SYMLINK, OPEN of a regular file, and SETATTR of mode, size and
 * times. Through Python each costs 30-60 µs of a worker's time where Rust virtiofsd
 * spends 5-10, and a guest's metadata work (untar, git checkout, make) is mostly these
 * (docs/performance.md, "Metadata requests in C").
 *
 * Same rule as fuse_ops.c: answer exactly what daemon/fs would, byte for byte, or return
 * 0 with nothing changed and let Python answer from the start. A failing system call is
 * declined, so Python makes it again and answers its errno with its log line; the calls
 * here either change nothing when they fail or are made again the same way (chmod,
 * truncate and utimes of a SETATTR), so the guest sees one request's effect. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <stdio.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define PYVFS_SYMLINK_MAX 4096 /* op_symlink: a longer target is ENAMETOOLONG */

struct pyvfs_open_reply { struct fuse_out_header o; struct fuse_open_out op; };
_Static_assert(sizeof(struct fuse_setattr_in) == 88, "fuse_setattr_in");
_Static_assert(sizeof(struct fuse_mkdir_in) == 8, "fuse_mkdir_in");
_Static_assert(sizeof(struct fuse_mknod_in) == 16, "fuse_mknod_in");
_Static_assert(sizeof(struct fuse_open_in) == 8, "fuse_open_in");
_Static_assert(sizeof(struct pyvfs_open_reply) == 32, "open reply");

/* The name that reaches an O_PATH fd's inode through the fd directory (proc_fd.proc_name):
 * the dirfd for the *at call, path filled in. */
static int proc_name(const pyvfs_fast_ctx_t *c, int fd, char path[32]) {
    if (c->procdir < 0) {
        snprintf(path, 32, "/proc/self/fd/%d", fd);
        return AT_FDCWD;
    }
    snprintf(path, 32, "%d", fd);
    return c->procdir;
}

/* passthrough.op_rmdir */
static int fast_rmdir(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                      const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                      uint64_t wr_len, uint32_t *written) {
    if (wr_len < sizeof(struct fuse_out_header)) return 0;
    char name[256];
    if (!pyvfs_read_name_at(h, rd, rd_n, 0, name)) return 0;
    int pfd = pyvfs_inode_fd(c, h->nodeid);
    if (pfd < 0) return 0;
    int r = unlinkat(pfd, name, AT_REMOVEDIR);
    pyvfs_unpin_inode(c, h->nodeid);
    return r == 0 ? pyvfs_reply_empty(h, wr, wr_n, written) : 0;
}

/* passthrough.op_rename (FUSE_RENAME: no flags; RENAME2 stays Python's) */
static int fast_rename(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                       const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                       uint64_t wr_len, uint32_t *written) {
    struct fuse_rename_in in;
    if (wr_len < sizeof(struct fuse_out_header) || h->len - sizeof *h < sizeof in) return 0;
    pyvfs_iov_read(rd, rd_n, sizeof *h, &in, sizeof in);
    char old[256], new[256];
    size_t old_len = pyvfs_read_name_at(h, rd, rd_n, sizeof in, old);
    if (!old_len || !pyvfs_read_name_at(h, rd, rd_n, sizeof in + old_len + 1, new)) return 0;
    int src = pyvfs_inode_fd(c, h->nodeid);
    if (src < 0) return 0;
    /* the source stays in the fd cache while the target's fd goes in (as in LOOKUP) */
    int pinned = pyvfs_fdc_pin(c->fd_cache, h->nodeid) == 0;
    int dst = pyvfs_inode_fd(c, in.newdir);
    int r = -1;
    if (dst >= 0) {
        r = renameat(src, old, dst, new);
        pyvfs_unpin_inode(c, in.newdir);
    }
    if (pinned) pyvfs_fdc_unpin(c->fd_cache, h->nodeid);
    pyvfs_unpin_inode(c, h->nodeid);
    return r == 0 ? pyvfs_reply_empty(h, wr, wr_n, written) : 0;
}

/* What a MKDIR, MKNOD or SYMLINK asks for: the name, and how to make it. */
typedef struct {
    uint32_t opcode;
    const char *name;
    size_t name_len;
    uint32_t mode, rdev;
    const char *target;
} pyvfs_make_t;

static int make_node(int pfd, const pyvfs_make_t *m) {
    switch (m->opcode) {
    case FUSE_MKDIR: return mkdirat(pfd, m->name, m->mode & 07777);
    case FUSE_MKNOD: return mknodat(pfd, m->name, m->mode, m->rdev);
    default: return symlinkat(m->target, pfd, m->name);
    }
}

/* EntryOps._create_node + _new_entry: the node made with the caller's fsuid/fsgid
 * (Credentials), looked up and claimed for the guest. A node made here and not handed
 * over is removed again while the name still is that node (EntryOps._unmake), so Python
 * redoes the whole request. */
static int make_entry(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                      const pyvfs_make_t *m, const pyvfs_iov_t *wr, int wr_n,
                      uint64_t wr_len, uint32_t *written) {
    struct pyvfs_entry_out out;
    if (wr_len < sizeof out) return 0;  /* Python answers ERANGE */
    int pfd = pyvfs_inode_fd(c, h->nodeid);
    if (pfd < 0) return 0;
    int pinned = pyvfs_fdc_pin(c->fd_cache, h->nodeid) == 0;
    int as_caller = pyvfs_caller_fsids(h->uid, h->gid, c->own_uid, c->own_gid);
    int made = make_node(pfd, m) == 0;
    if (as_caller) pyvfs_own_fsids(c->own_uid, c->own_gid);
    int ok = 0;
    struct stat st;
    if (made && fstatat(pfd, m->name, &st, AT_SYMLINK_NOFOLLOW) == 0) {
        int r = pyvfs_lookup_core(c, h->nodeid, pfd, m->name, m->name_len, &st, &out.e);
        if (r == 0) made = 0;  /* gone meanwhile: not ours to remove */
        ok = r > 0;
        if (!ok && made) {
            struct stat now;
            if (fstatat(pfd, m->name, &now, AT_SYMLINK_NOFOLLOW) == 0 &&
                now.st_ino == st.st_ino && now.st_dev == st.st_dev)
                unlinkat(pfd, m->name, m->opcode == FUSE_MKDIR ? AT_REMOVEDIR : 0);
        }
    } else if (made) {
        unlinkat(pfd, m->name, m->opcode == FUSE_MKDIR ? AT_REMOVEDIR : 0);
    }
    if (pinned) pyvfs_fdc_unpin(c->fd_cache, h->nodeid);
    pyvfs_unpin_inode(c, h->nodeid);
    if (!ok) return 0;
    memset(&out.o, 0, sizeof out.o);
    out.o.len = sizeof out;
    out.o.unique = h->unique;
    pyvfs_iov_write(wr, wr_n, 0, &out, sizeof out);
    *written = sizeof out;
    return 1;
}

/* op_mkdir, op_mknod, op_symlink: their arguments, then make_entry. */
static int fast_make(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                     const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                     uint64_t wr_len, uint32_t *written) {
    pyvfs_make_t m = {.opcode = h->opcode};
    uint64_t skip = 0;
    if (h->opcode == FUSE_MKDIR) {
        struct fuse_mkdir_in in;
        if (h->len - sizeof *h < sizeof in) return 0;
        pyvfs_iov_read(rd, rd_n, sizeof *h, &in, sizeof in);
        m.mode = in.mode;
        skip = sizeof in;
    } else if (h->opcode == FUSE_MKNOD) {
        struct fuse_mknod_in in;
        if (h->len - sizeof *h < sizeof in) return 0;
        pyvfs_iov_read(rd, rd_n, sizeof *h, &in, sizeof in);
        m.mode = in.mode;
        m.rdev = in.rdev;
        skip = sizeof in;
    }
    char name[256];
    m.name_len = pyvfs_read_name_at(h, rd, rd_n, skip, name);
    if (!m.name_len) return 0;
    m.name = name;
    char target[PYVFS_SYMLINK_MAX];
    if (h->opcode == FUSE_SYMLINK) {
        /* the target: NUL-terminated, 1..4095 bytes (else Python's EINVAL/ENAMETOOLONG) */
        uint64_t at = sizeof *h + m.name_len + 1;
        if (h->len <= at) return 0;
        uint64_t take = h->len - at < sizeof target ? h->len - at : sizeof target;
        if (pyvfs_iov_read(rd, rd_n, at, target, take) != take) return 0;
        const char *nul = memchr(target, 0, take);
        if (!nul || nul == target) return 0;
        m.target = target;
    }
    return make_entry(c, h, &m, wr, wr_n, wr_len, written);
}

/* passthrough.op_open of a regular file: reopened through the fd directory with the
 * guest's flags less those _open_flags strips (the CREATE context's create_clear: no
 * --writeback here), registered in the open-file table as _new_handle does.
 * Directories, other file types (EBADF), O_TMPFILE and FUSE_OPEN_KILL_SUIDGID are
 * Python's. */
static int fast_open(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                     const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                     uint64_t wr_len, uint32_t *written) {
    struct pyvfs_open_reply out;
    struct fuse_open_in in;
    if (!c->ht_open || wr_len < sizeof out || h->len - sizeof *h < sizeof in) return 0;
    pyvfs_iov_read(rd, rd_n, sizeof *h, &in, sizeof in);
    if ((in.flags & (O_TMPFILE & ~O_DIRECTORY)) || (in.open_flags & FUSE_OPEN_KILL_SUIDGID))
        return 0;
    int ifd = pyvfs_inode_fd(c, h->nodeid);
    if (ifd < 0) return 0;
    struct stat st;
    uint64_t fh = 0;
    if (fstat(ifd, &st) == 0 && S_ISREG(st.st_mode)) {
        char path[32];
        int dir = proc_name(c, ifd, path);
        int fd = openat(dir, path, (int)(in.flags & ~c->create_clear) | O_CLOEXEC);
        if (fd >= 0) {
            fh = TABLE(c, ht_open)((void *)c->handles, h->nodeid, fd, in.flags);
            if (!fh) close(fd);
        }
    }
    pyvfs_unpin_inode(c, h->nodeid);
    if (!fh) return 0;
    memset(&out, 0, sizeof out);
    out.o.len = sizeof out;
    out.o.unique = h->unique;
    out.op.fh = fh;
    out.op.open_flags = c->create_fopen;  /* _open_reply_flags(False) */
    pyvfs_iov_write(wr, wr_n, 0, &out, sizeof out);
    *written = sizeof out;
    return 1;
}

/* The SETATTRs answered here: mode, size (by name, not through a handle) and times.
 * Owners, a handle (FATTR_FH, FATTR_LOCKOWNER) and
 * FATTR_KILL_SUIDGID are Python's. FATTR_CTIME is ignored, as Python does. */
#define PYVFS_SETATTR_HERE (FATTR_MODE | FATTR_SIZE | FATTR_ATIME | FATTR_MTIME | \
                            FATTR_ATIME_NOW | FATTR_MTIME_NOW | FATTR_CTIME)

/* AttributeOps._set_times: a time the request leaves out is UTIME_OMIT; 0 when Python
 * would refuse it (nanoseconds out of range, seconds beyond 63 bits). */
static int setattr_time(uint32_t valid, uint32_t bit, uint32_t now_bit, uint64_t sec,
                        uint32_t nsec, struct timespec *ts) {
    ts->tv_sec = 0;
    ts->tv_nsec = UTIME_OMIT;
    if (!(valid & bit)) return 1;
    if (valid & now_bit) {
        ts->tv_nsec = UTIME_NOW;
        return 1;
    }
    if (nsec >= 1000000000u || sec >> 63) return 0;
    ts->tv_sec = (time_t)sec;
    ts->tv_nsec = nsec;
    return 1;
}

/* AttributeOps.op_setattr, in its order: the type check of a truncate, chmod, truncate
 * through a file opened for it, times; then the attributes as GETATTR gives them. */
static int fast_setattr(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                        const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                        uint64_t wr_len, uint32_t *written) {
    struct pyvfs_attr_out out;
    struct fuse_setattr_in in;
    if (wr_len < sizeof out || h->len - sizeof *h < sizeof in) return 0;
    pyvfs_iov_read(rd, rd_n, sizeof *h, &in, sizeof in);
    if (in.valid & ~(uint32_t)PYVFS_SETATTR_HERE) return 0;
    struct timespec ts[2];
    if (!setattr_time(in.valid, FATTR_ATIME, FATTR_ATIME_NOW, in.atime, in.atimensec,
                      &ts[0]) ||
        !setattr_time(in.valid, FATTR_MTIME, FATTR_MTIME_NOW, in.mtime, in.mtimensec, &ts[1]) ||
        in.size >> 63)
        return 0;
    int fd = pyvfs_inode_fd(c, h->nodeid);
    if (fd < 0) return 0;
    struct stat st;
    int ok = 1;
    /* a truncate of anything but a regular file: Python's EISDIR or EBADF (the other
       calls are the ones Python makes, on whatever the inode is) */
    if (in.valid & FATTR_SIZE) ok = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
    char path[32];
    int dir = proc_name(c, fd, path);
    if (ok && (in.valid & FATTR_MODE)) ok = fchmodat(dir, path, in.mode & 07777, 0) == 0;
    if (ok && (in.valid & FATTR_SIZE)) {
        int wfd = openat(dir, path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        ok = wfd >= 0 && ftruncate(wfd, (off_t)in.size) == 0;
        if (wfd >= 0) close(wfd);
    }
    if (ok && (in.valid & (FATTR_ATIME | FATTR_MTIME))) ok = utimensat(dir, path, ts, 0) == 0;
    memset(&out, 0, sizeof out);
    if (ok) ok = fstat(fd, &st) == 0 && pyvfs_fill_attr(&out.a.attr, &st, 0);
    pyvfs_unpin_inode(c, h->nodeid);
    if (!ok) return 0;
    out.a.attr_valid = c->timeout_sec;
    out.a.attr_valid_nsec = c->timeout_nsec;
    out.o.len = sizeof out;
    out.o.unique = h->unique;
    pyvfs_iov_write(wr, wr_n, 0, &out, sizeof out);
    *written = sizeof out;
    return 1;
}

int pyvfs_fast_meta(const pyvfs_fast_ctx_t *c, const struct fuse_in_header *h,
                    const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                    uint64_t wr_len, uint32_t *written) {
    switch (h->opcode) {
    case FUSE_RMDIR: return fast_rmdir(c, h, rd, rd_n, wr, wr_n, wr_len, written);
    case FUSE_RENAME: return fast_rename(c, h, rd, rd_n, wr, wr_n, wr_len, written);
    case FUSE_MKDIR:
    case FUSE_MKNOD:
    case FUSE_SYMLINK: return fast_make(c, h, rd, rd_n, wr, wr_n, wr_len, written);
    case FUSE_OPEN: return fast_open(c, h, rd, rd_n, wr, wr_n, wr_len, written);
    case FUSE_SETATTR: return fast_setattr(c, h, rd, rd_n, wr, wr_n, wr_len, written);
    default: return 0;
    }
}
