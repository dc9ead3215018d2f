/* Live migration's destination: find the device state's inodes below the share in one call
 * (daemon/fs/migration/find.py): by file handle where one is given (mount_fd >= 0:
 * file-handles mode), else (or when it fails) by path. The guest is stopped while this runs, so every system
 * call and every Python round trip per inode counts: an inode whose path is its parent's
 * path and one more name is opened relative to the parent's fd (one openat), others are
 * walked from the share one component at a time, never following a symlink and refusing
 * "..", as daemon/fs/migration/state.py's _walk does. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "pyvfs.h"

#define O_PATH_FLAGS (O_PATH | O_NOFOLLOW | O_CLOEXEC)

/* An O_PATH fd of path (len bytes, relative to root), or -1 with errno. */
static int walk(int root, const uint8_t *path, uint32_t len) {
    int fd = openat(root, ".", O_PATH_FLAGS | O_DIRECTORY);
    uint32_t at = 0;
    char part[256];
    while (fd >= 0 && at < len) {
        uint32_t end = at;
        while (end < len && path[end] != '/') end++;
        uint32_t n = end - at;
        if (n >= sizeof part || memchr(path + at, 0, n)) {
            close(fd);
            errno = n >= sizeof part ? ENAMETOOLONG : EINVAL;
            return -1;
        }
        memcpy(part, path + at, n);
        part[n] = 0;
        at = end + 1;
        if (n == 0 || (n == 1 && part[0] == '.')) continue;
        if (n == 2 && part[0] == '.' && part[1] == '.') {
            close(fd);
            errno = EINVAL;
            return -1;
        }
        int next = openat(fd, part, O_PATH_FLAGS);
        int saved = errno;
        close(fd);
        errno = saved;
        fd = next;
    }
    return fd;
}

/* What inode `fd` is: ids, mode and (want_handles) its file handle, appended to handles.
 * 0 with err[i] set when it cannot be stat'ed. */
static int identify(int fd, uint32_t i, int want_handles, uint64_t *ino, uint64_t *dev,
                    uint32_t *mode, uint64_t *mnt_id, uint8_t *handles, uint64_t *handles_at,
                    uint16_t *handle_len, int32_t *handle_type, int32_t *err) {
    struct stat st;
    if (fstat(fd, &st) != 0) {
        err[i] = errno;
        return 0;
    }
    ino[i] = st.st_ino;
    dev[i] = st.st_dev;
    mode[i] = st.st_mode;
    if (want_handles) {
        int type = 0, mnt = 0;
        int got = pyvfs_name_to_handle(fd, "", AT_EMPTY_PATH, handles + *handles_at,
                                       PYVFS_MIGRATE_HANDLE_MAX, &type, &mnt);
        if (got > 0) {
            handle_len[i] = (uint16_t)got;
            handle_type[i] = type;
            mnt_id[i] = (uint64_t)mnt;
            *handles_at += (uint64_t)got;
        }
    }
    return 1;
}

int pyvfs_migrate_find(int root, uint32_t n, const uint64_t *nodeid, const uint64_t *parent,
                       const uint8_t *paths, const uint32_t *path_len, int want_handles,
                       int mount_fd, const uint8_t *src_handles,
                       const uint16_t *src_handle_len, const int32_t *src_handle_type,
                       int32_t *fd, uint64_t *ino, uint64_t *dev, uint32_t *mode,
                       uint64_t *mnt_id, uint8_t *handles, uint16_t *handle_len,
                       int32_t *handle_type, int32_t *err) {
    /* where each entry's path starts in `paths`, and the entry of each slot (the parent) */
    uint64_t *start = malloc(((size_t)n + 1) * sizeof *start);
    uint32_t max_slot = 0;
    for (uint32_t i = 0; i < n; i++)
        if ((uint32_t)nodeid[i] > max_slot) max_slot = (uint32_t)nodeid[i];
    int32_t *by_slot = malloc(((size_t)max_slot + 1) * sizeof *by_slot);
    if (!start || !by_slot) {
        free(start);
        free(by_slot);
        errno = ENOMEM;
        return -1;
    }
    memset(by_slot, 0xff, ((size_t)max_slot + 1) * sizeof *by_slot);
    uint64_t at = 0;
    for (uint32_t i = 0; i < n; i++) {
        start[i] = at;
        if (path_len[i] != PYVFS_NO_PATH) at += path_len[i];
        by_slot[(uint32_t)nodeid[i]] = (int32_t)i;
    }
    uint64_t handles_at = 0, src_at = 0;
    char name[256];
    for (uint32_t i = 0; i < n; i++) {
        fd[i] = -1;
        err[i] = 0;
        handle_len[i] = 0;
        handle_type[i] = 0;
        mnt_id[i] = 0;
        uint32_t len = path_len[i];
        if (mount_fd >= 0 && src_handle_len[i]) {  /* file-handles: the handle first */
            fd[i] = pyvfs_open_by_handle(mount_fd, src_handles + src_at, src_handle_len[i],
                                         src_handle_type[i], O_PATH_FLAGS);
            src_at += src_handle_len[i];
            if (fd[i] < 0) err[i] = errno;
        }
        if (fd[i] < 0 && len == PYVFS_NO_PATH) {
            if (!err[i]) err[i] = ENOENT;
            continue;
        }
        if (fd[i] >= 0) {
            if (!identify(fd[i], i, want_handles, ino, dev, mode, mnt_id, handles,
                          &handles_at, handle_len, handle_type, err)) {
                close(fd[i]);
                fd[i] = -1;
            }
            continue;
        }
        err[i] = 0;
        const uint8_t *p = paths + start[i];
        /* the parent's fd when the path is the parent's path and one more name */
        int dir = -1;
        uint32_t base = 0;
        const uint8_t *slash = len ? memrchr(p, '/', len) : NULL;
        uint32_t dir_len = slash ? (uint32_t)(slash - p) : 0;
        if (parent[i] == 1 && !slash) {
            dir = root;
        } else if (slash && (uint32_t)parent[i] <= max_slot) {
            int32_t j = by_slot[(uint32_t)parent[i]];
            if (j >= 0 && (uint32_t)j < i && nodeid[j] == parent[i] && fd[j] >= 0 &&
                path_len[j] == dir_len && memcmp(paths + start[j], p, dir_len) == 0)
                dir = fd[j];
        }
        if (dir >= 0) {
            base = slash ? dir_len + 1 : 0;
            uint32_t nlen = len - base;
            if (nlen == 0 || nlen >= sizeof name || memchr(p + base, 0, nlen) ||
                (nlen == 1 && p[base] == '.') ||
                (nlen == 2 && p[base] == '.' && p[base + 1] == '.')) {
                dir = -1;  /* odd: the walk decides */
            } else {
                memcpy(name, p + base, nlen);
                name[nlen] = 0;
                fd[i] = openat(dir, name, O_PATH_FLAGS);
            }
        }
        if (dir < 0) fd[i] = walk(root, p, len);
        if (fd[i] < 0) {
            err[i] = errno;
            continue;
        }
        if (!identify(fd[i], i, want_handles, ino, dev, mode, mnt_id, handles, &handles_at,
                      handle_len, handle_type, err)) {
            close(fd[i]);
            fd[i] = -1;
        }
    }
    free(start);
    free(by_slot);
    return 0;
}

static int by_number(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* Close n fds (skipping -1), runs of consecutive numbers with one close_range each. */
void pyvfs_close_fds(int32_t *fds, uint32_t n) {
    qsort(fds, n, sizeof *fds, by_number);
    uint32_t i = 0;
    while (i < n) {
        if (fds[i] < 0) {
            i++;
            continue;
        }
        uint32_t j = i;
        while (j + 1 < n && fds[j + 1] <= fds[j] + 1) j++;
        if (j > i && syscall(SYS_close_range, (unsigned)fds[i], (unsigned)fds[j], 0) == 0) {
            i = j + 1;
            continue;
        }
        for (; i <= j; i++)
            if (i == 0 || fds[i] != fds[i - 1]) close(fds[i]);
    }
}
