/* What the requests answered in C share (fuse_ops.c and fuse_meta.c): pins on inodes and
 * their O_PATH fds, attributes in FUSE's layout, names read from the request, empty
 * replies, and the lookup both LOOKUP-like requests and CREATE/MKDIR/MKNOD/SYMLINK end in.
 * The rule of fuse_ops.c holds: answer as Python would, or decline having changed nothing. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"

void pyvfs_unpin_inode(const pyvfs_fast_ctx_t *c, uint64_t nodeid) {
    TABLE(c, it_unpin)((void *)c->inodes, nodeid);
}

/* Give back a lookup this request claimed for the guest but could not hand over. */
void pyvfs_unclaim(const pyvfs_fast_ctx_t *c, uint64_t nodeid) {
    TABLE(c, it_forget)((void *)c->inodes, nodeid, 1);
}

/* A pin on nodeid and its O_PATH fd (the table's, or this worker's cached or freshly
 * re-opened one for an inode kept by file handle): the fd, or -1 with nothing held.
 * Python's InodeRef. */
int pyvfs_inode_fd(const pyvfs_fast_ctx_t *c, uint64_t nodeid) {
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
    pyvfs_unpin_inode(c, nodeid);
    return -1;
}

/* struct stat -> fuse_attr as fuse.pack_attr_into packs it; 0 when Python's struct
 * packing would refuse the values (negative times, nlink beyond 32 bits). */
int pyvfs_fill_attr(struct fuse_attr *a, const struct stat *st, uint32_t flags) {
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

/* fuse.split_name + passthrough.check_name: the first NUL-terminated string of the
   arguments, 1..255 bytes, no '/', not "." or "..", copied into name[256]. Its length, or
   0 for anything else (Python's EINVAL or ENAMETOOLONG). */
size_t pyvfs_read_name_at(const struct fuse_in_header *h, const pyvfs_iov_t *rd, int rd_n,
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

/* A reply that is just the out header (error 0). */
int pyvfs_reply_empty(const struct fuse_in_header *h, const pyvfs_iov_t *wr, int wr_n,
                       uint32_t *written) {
    struct fuse_out_header o = {.len = sizeof o, .error = 0, .unique = h->unique};
    pyvfs_iov_write(wr, wr_n, 0, &o, sizeof o);
    *written = sizeof o;
    return 1;
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
    if (flags < 0 || !pyvfs_fill_attr(&e->attr, &st, (uint32_t)flags)) goto drop;
    e->nodeid = nodeid;
    e->entry_valid = e->attr_valid = c->timeout_sec;
    e->entry_valid_nsec = e->attr_valid_nsec = c->timeout_nsec;
    return 1;
drop:
    pyvfs_unclaim(c, nodeid);
    return 0;
}

/* PassthroughFs.do_lookup + claim + the attr of pack_entry_into: open name
 * O_PATH|O_NOFOLLOW under the parent, fstat, identify it (file handle and mount id as
 * PassthroughFs._file_handle does), then claim_or_insert exactly as PassthroughFs.claim: the
 * lookup it takes is the guest's, given back by FORGET. Fills *e (nodeid, timeouts, attr
 * with FUSE_ATTR_SUBMOUNT as PassthroughFs._attr_flags sets it).
 * made: the file the caller just made under this name (its fstat), so lookup_known would
 * only miss; the name is looked up again, and another queue may have renamed something
 * else onto it meanwhile: only that very file is claimed (else -1), so the entry answered
 * is the file the caller holds open (Python takes it from the open fd itself).
 * 1: done; 0: the name does not exist (ENOENT, nothing taken); -1: anything else (nothing
 * taken; Python must answer). */
int pyvfs_lookup_core(const pyvfs_fast_ctx_t *c, uint64_t parent, int pfd, const char *name,
                       size_t name_len, const struct stat *made, struct fuse_entry_out *e) {
    if (!made && lookup_known(c, pfd, name, e)) return 1;
    int fd = openat(pfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? 0 : -1;
    struct stat st;
    if (fstat(fd, &st) != 0) goto fail;
    if (made && (st.st_ino != made->st_ino || st.st_dev != made->st_dev))
        goto fail;  /* the name is another file's by now */
    memset(e, 0, sizeof *e);
    int64_t attr_flags = submount_flag(c, pfd, &st);
    if (attr_flags < 0 || !pyvfs_fill_attr(&e->attr, &st, (uint32_t)attr_flags)) goto fail;
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
