/* The worker's cache of O_PATH fds for inodes the inode table keeps by file handle only.
 * Python's daemon/fs/fd_cache.py is a thin wrapper around it, so the C and Python paths
 * share one cache. Least recently used first out; pinned nodeids (in use by a Python
 * request) are never evicted. */
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

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
 * unpinned fds while over capacity. A nodeid that is cached already and pinned keeps the
 * fd it has (a request holds it: LINK's target, claimed again by the new name) and fd is
 * closed instead: both name the nodeid's one inode. -1 (fd closed) if out of memory. */
int pyvfs_fdc_put(pyvfs_fdcache_t *c, uint64_t nodeid, int fd) {
    struct pyvfs_fdc_node **p;
    struct pyvfs_fdc_node *n = fdc_find(c, nodeid, &p);
    if (n) {
        if (n->fd >= 0 && n->fd != fd) {
            if (fdc_pinned(c, nodeid)) {
                close(fd);
                fd = n->fd;
            } else {
                close(n->fd);
            }
        }
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

/* Close nodeid's cached fd (the guest forgot it) unless a request pins it: then the sweep
 * or an eviction closes it once that request has let go. */
void pyvfs_fdc_drop(pyvfs_fdcache_t *c, uint64_t nodeid) {
    struct pyvfs_fdc_node *n = fdc_find(c, nodeid, NULL);
    if (n && !fdc_pinned(c, nodeid)) {
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

/* Close the cached fds of inodes the guest has forgotten since the last sweep: an O_PATH
 * fd keeps an unlinked file's blocks allocated on the host.  Cheap when nothing was freed
 * (one load); the serve loop calls it before it sleeps and once a second while idle. */
void pyvfs_fdc_sweep(const pyvfs_fast_ctx_t *c) {
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
