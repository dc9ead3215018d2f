"""cffi build of the load generator's inner loop (``benchmarks._loadgen``).

Built on first use by :func:`load` (or ``python3 -m benchmarks._loadgen_build``). The loop
plays a Linux guest's virtio-fs driver on one request queue: every request is one ring
descriptor pointing to an indirect table (as Linux does for any request with more than one
scatter-gather entry), the in header and each argument are separate descriptors, data is
4 KiB pages, one descriptor each. It keeps ``qd`` requests in flight, publishes the avail
index with release order, kicks only when the device's ``avail_event`` asks for it
(VIRTIO_RING_F_EVENT_IDX), sets ``used_event`` before sleeping on the call eventfd, and
records each operation's latency. FORGETs go to the high-priority queue, shared by all
driver threads under a mutex. The loop releases the GIL, so one Python thread per queue is
enough.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
typedef struct {
    uint64_t mem_host;
    uint64_t gpa_base;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint32_t size;
    int kick_fd, call_fd;
    int event_idx;
    uint16_t next_avail, last_used;
    uint64_t kicks;
} lg_ring;

typedef struct {
    int workload;
    int qd;
    double seconds;
    uint64_t max_ops;
    uint64_t slot_gpa;
    uint64_t slot_stride;
    uint64_t nodeid;
    uint64_t fh[64];
    uint32_t io_size;
    uint64_t file_size;
    char name[64];
    uint32_t tag;
    uint64_t seed;
    uint64_t *lat_ns;
    uint64_t lat_cap;
    uint64_t unique_base;
    int frontend;            /* 0: batch, 1: driver (see lg_run) */
    uint32_t completion_ns;  /* driver: busy time per completion */
    uint32_t variant;        /* workload variant (mknod type, setattr kind) */
    /* results */
    uint64_t ops, requests, errors, bytes, lat_n, stalls, waits, wakeups, kicks;
    int first_error;
    int first_error_opcode;
    uint64_t elapsed_ns;
} lg_job;

void *lg_hiprio_new(lg_ring *ring, uint64_t buf_gpa);
void lg_hiprio_free(void *h);
uint64_t lg_hiprio_sent(void *h);
int lg_run(lg_ring *ring, lg_job *job, void *hiprio);
"""

SOURCE = r"""
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    uint64_t mem_host;
    uint64_t gpa_base;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint32_t size;
    int kick_fd, call_fd;
    int event_idx;
    uint16_t next_avail, last_used;
    uint64_t kicks;
} lg_ring;

typedef struct {
    int workload;
    int qd;
    double seconds;
    uint64_t max_ops;
    uint64_t slot_gpa;
    uint64_t slot_stride;
    uint64_t nodeid;
    uint64_t fh[64];
    uint32_t io_size;
    uint64_t file_size;
    char name[64];
    uint32_t tag;
    uint64_t seed;
    uint64_t *lat_ns;
    uint64_t lat_cap;
    uint64_t unique_base;
    int frontend;
    uint32_t completion_ns;
    uint32_t variant;
    uint64_t ops, requests, errors, bytes, lat_n, stalls, waits, wakeups, kicks;
    int first_error;
    int first_error_opcode;
    uint64_t elapsed_ns;
} lg_job;

enum { W_GETATTR = 0, W_LOOKUP_FORGET = 1, W_CREATE = 2, W_READDIRPLUS = 3, W_READ = 4,
       W_WRITE = 5, W_MKDIR = 6, W_MKNOD = 7, W_SYMLINK = 8, W_RENAME = 9, W_SETATTR = 10,
       W_OPEN_RELEASE = 11 };
enum { OP_LOOKUP = 1, OP_FORGET = 2, OP_GETATTR = 3, OP_SETATTR = 4, OP_SYMLINK = 6,
       OP_MKNOD = 8, OP_MKDIR = 9, OP_UNLINK = 10, OP_RMDIR = 11, OP_RENAME = 12,
       OP_OPEN = 14, OP_READ = 15, OP_WRITE = 16, OP_RELEASE = 18, OP_CREATE = 35,
       OP_READDIRPLUS = 44 };
/* SETATTR variants and their fuse_setattr_in valid bits */
enum { SA_CHMOD = 0, SA_TRUNCATE = 1, SA_UTIMES = 2 };
#define FATTR_MODE 1
#define FATTR_SIZE 8
#define FATTR_ATIME 16
#define FATTR_MTIME 32
#define S_TYPE 0170000
#define S_REG 0100000
#define S_DIR 0040000
#define S_LNK 0120000
/* a reply that arrived without error but says the wrong thing */
#define E_BADREPLY (-74) /* -EBADMSG */
#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4
#define PAGE 4096
/* slot layout (offsets inside a slot) */
#define S_REQ 0          /* in header at +0, first argument at +64, name at +256 */
#define S_OUT 4096       /* out header at +0, reply argument at +16 (up to 8 KiB) */
#define S_TABLE 16384    /* indirect table (up to 512 descriptors) */
#define S_DATA 32768     /* data pages */

struct __attribute__((packed)) in_header {
    uint32_t len, opcode; uint64_t unique, nodeid; uint32_t uid, gid, pid;
    uint16_t extlen, pad;
};
struct out_header { uint32_t len; int32_t error; uint64_t unique; };

static inline uint8_t *H(lg_ring *r, uint64_t gpa) {
    return (uint8_t *)(uintptr_t)(r->mem_host + (gpa - r->gpa_base));
}
static inline uint64_t now_ns(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}
static inline uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s; x ^= x << 13; x ^= x >> 7; x ^= x << 17; return *s = x;
}
static inline void put_desc(uint8_t *t, int i, uint64_t addr, uint32_t len, uint16_t flags,
                            uint16_t next) {
    uint8_t *d = t + 16 * i;
    memcpy(d, &addr, 8); memcpy(d + 8, &len, 4); memcpy(d + 12, &flags, 2);
    memcpy(d + 14, &next, 2);
}
static inline uint16_t *avail_idx(lg_ring *r) { return (uint16_t *)H(r, r->avail_gpa + 2); }
static inline uint16_t *avail_slot(lg_ring *r, uint32_t i) {
    return (uint16_t *)H(r, r->avail_gpa + 4 + 2 * i);
}
static inline uint16_t *used_event(lg_ring *r) {
    return (uint16_t *)H(r, r->avail_gpa + 4 + 2 * r->size);
}
static inline uint16_t *used_idx(lg_ring *r) { return (uint16_t *)H(r, r->used_gpa + 2); }
static inline uint16_t *used_flags(lg_ring *r) { return (uint16_t *)H(r, r->used_gpa); }
static inline uint16_t *avail_event(lg_ring *r) {
    return (uint16_t *)H(r, r->used_gpa + 4 + 8 * r->size);
}

/* Put head on the avail ring (not yet published). */
static inline void add_avail(lg_ring *r, uint16_t head) {
    *avail_slot(r, r->next_avail % r->size) = head;
    r->next_avail++;
}
/* Publish the avail index and kick if the device asks for it. */
static void publish(lg_ring *r, uint16_t old) {
    uint16_t nw = r->next_avail;
    if (nw == old) return;
    __atomic_store_n(avail_idx(r), nw, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int kick;
    if (r->event_idx) {
        uint16_t ev = __atomic_load_n(avail_event(r), __ATOMIC_ACQUIRE);
        kick = (uint16_t)(nw - ev - 1) < (uint16_t)(nw - old);
    } else {
        kick = !(__atomic_load_n(used_flags(r), __ATOMIC_ACQUIRE) & 1);
    }
    if (kick) {
        uint64_t one = 1;
        if (write(r->kick_fd, &one, 8) == 8) r->kicks++;
    }
}
static void force_kick(lg_ring *r) {
    uint64_t one = 1;
    if (write(r->kick_fd, &one, 8) == 8) r->kicks++;
}

/* ---------------------------------------------------------------- high-priority queue */
typedef struct {
    lg_ring ring;
    uint64_t buf_gpa;
    pthread_mutex_t lock;
    uint16_t *free;
    uint32_t nfree;
    uint64_t unique;
    uint64_t sent;
} hiprio;

void *lg_hiprio_new(lg_ring *ring, uint64_t buf_gpa) {
    hiprio *h = calloc(1, sizeof(*h));
    h->ring = *ring;
    h->buf_gpa = buf_gpa;
    pthread_mutex_init(&h->lock, NULL);
    h->free = calloc(ring->size, sizeof(uint16_t));
    for (uint32_t i = 0; i < ring->size; i++) h->free[h->nfree++] = (uint16_t)(ring->size - 1 - i);
    h->unique = 1ull << 62;
    return h;
}
void lg_hiprio_free(void *p) {
    hiprio *h = p;
    if (!h) return;
    free(h->free);
    free(h);
}
uint64_t lg_hiprio_sent(void *p) { return p ? ((hiprio *)p)->sent : 0; }

static void hiprio_reclaim(hiprio *h) {
    lg_ring *r = &h->ring;
    uint16_t u = __atomic_load_n(used_idx(r), __ATOMIC_ACQUIRE);
    while (r->last_used != u) {
        uint32_t id;
        memcpy(&id, H(r, r->used_gpa + 4 + 8 * (r->last_used % r->size)), 4);
        if (id < r->size) h->free[h->nfree++] = (uint16_t)id;
        r->last_used++;
    }
}

static int send_forget(hiprio *h, uint64_t nodeid, uint64_t nlookup) {
    lg_ring *r = &h->ring;
    pthread_mutex_lock(&h->lock);
    int spins = 0;
    for (;;) {
        hiprio_reclaim(h);
        if (h->nfree) break;
        pthread_mutex_unlock(&h->lock);
        struct pollfd p = {r->call_fd, POLLIN, 0};
        poll(&p, 1, 1);
        uint64_t v; (void)!read(r->call_fd, &v, 8);
        if (++spins % 100 == 0) force_kick(r);   /* a device that missed a kick */
        if (spins > 10000) return -1;
        pthread_mutex_lock(&h->lock);
    }
    uint16_t id = h->free[--h->nfree];
    uint64_t gpa = h->buf_gpa + 64ull * id;
    struct in_header *ih = (struct in_header *)H(r, gpa);
    memset(ih, 0, 48);
    ih->len = 48; ih->opcode = OP_FORGET; ih->unique = h->unique++; ih->nodeid = nodeid;
    memcpy(H(r, gpa + 40), &nlookup, 8);
    put_desc(H(r, r->desc_gpa), id, gpa, 48, 0, 0);
    uint16_t old = r->next_avail;
    add_avail(r, id);
    publish(r, old);
    h->sent++;
    pthread_mutex_unlock(&h->lock);
    return 0;
}

/* ---------------------------------------------------------------- request builders */
typedef struct {
    uint64_t gpa;          /* slot base */
    int stage;
    uint64_t t0;
    uint64_t nodeid, fh, counter, dir_off;
    uint32_t nd;           /* descriptors in the current table */
    uint32_t expect_out;
    int opcode;
} slot;

static void hdr(lg_ring *r, lg_job *j, slot *s, uint32_t opcode, uint64_t nodeid,
                uint32_t len) {
    struct in_header *ih = (struct in_header *)H(r, s->gpa + S_REQ);
    memset(ih, 0, sizeof(*ih));
    ih->len = len; ih->opcode = opcode; ih->unique = ++j->unique_base; ih->nodeid = nodeid;
    ih->pid = 1;
    s->opcode = (int)opcode;
}
static inline void td(lg_ring *r, slot *s, uint64_t addr, uint32_t len, uint16_t flags) {
    put_desc(H(r, s->gpa + S_TABLE), s->nd, addr, len, flags, 0);
    s->nd++;
}
/* Link the table and put the slot's ring descriptor on the avail ring. */
static void submit(lg_ring *r, slot *s, uint16_t head) {
    uint8_t *t = H(r, s->gpa + S_TABLE);
    for (uint32_t i = 0; i + 1 < s->nd; i++) {
        uint16_t f; memcpy(&f, t + 16 * i + 12, 2); f |= F_NEXT;
        memcpy(t + 16 * i + 12, &f, 2);
        uint16_t n = (uint16_t)(i + 1); memcpy(t + 16 * i + 14, &n, 2);
    }
    put_desc(H(r, r->desc_gpa), head, s->gpa + S_TABLE, 16 * s->nd, F_INDIRECT, 0);
    add_avail(r, head);
    memset(H(r, s->gpa + S_OUT), 0, 16);
}

/* The slot's current file name (with a suffix: RENAME's two names); returns its length
 * with the NUL. Names carry the queue, the slot and a counter of completed life cycles,
 * so a name is never reused while its last owner may still exist. */
static uint32_t slot_name(lg_job *j, slot *s, const char *suffix, char *out) {
    snprintf(out, 64, "lg%u_%u_%llu%s", j->tag,
             (unsigned)((s->gpa - j->slot_gpa) / j->slot_stride),
             (unsigned long long)s->counter, suffix);
    return (uint32_t)strlen(out) + 1;
}

/* A request whose reply is an entry (MKDIR, MKNOD, SYMLINK): in header, arguments,
 * then the out header and the 128-byte entry_out. */
static void entry_reply(lg_ring *r, slot *s) {
    uint64_t out = s->gpa + S_OUT;
    td(r, s, out, 16, F_WRITE); td(r, s, out + 16, 128, F_WRITE);
}

/* A name-only request in the slot's directory (UNLINK, RMDIR): header-only reply. */
static void name_request(lg_ring *r, lg_job *j, slot *s, uint32_t opcode, const char *name) {
    uint64_t req = s->gpa + S_REQ;
    uint32_t nl = (uint32_t)strlen(name) + 1;
    hdr(r, j, s, opcode, j->nodeid, 40 + nl);
    memcpy(H(r, req + 256), name, nl);
    td(r, s, req, 40, 0); td(r, s, req + 256, nl, 0);
    td(r, s, s->gpa + S_OUT, 16, F_WRITE);
}

/* The metadata workloads beyond CREATE: each cycles through stages and leaves nothing
 * behind once it is back at stage 0 (the generator stops a slot only there). */
static void build_meta(lg_ring *r, lg_job *j, slot *s) {
    uint64_t req = s->gpa + S_REQ, out = s->gpa + S_OUT;
    char name[64];
    switch (j->workload) {
    case W_MKDIR: {                     /* MKDIR, RMDIR */
        uint32_t nl = slot_name(j, s, "", name);
        if (s->stage == 0) {
            hdr(r, j, s, OP_MKDIR, j->nodeid, 40 + 8 + nl);
            uint32_t a[2] = {0755, 022};
            memcpy(H(r, req + 64), a, 8);
            memcpy(H(r, req + 256), name, nl);
            td(r, s, req, 40, 0); td(r, s, req + 64, 8, 0); td(r, s, req + 256, nl, 0);
            entry_reply(r, s);
        } else {
            name_request(r, j, s, OP_RMDIR, name);
        }
        break;
    }
    case W_MKNOD: {                     /* MKNOD (variant = file type), UNLINK */
        uint32_t nl = slot_name(j, s, "", name);
        if (s->stage == 0) {
            hdr(r, j, s, OP_MKNOD, j->nodeid, 40 + 16 + nl);
            uint32_t a[4] = {j->variant | 0644, 0, 022, 0};
            memcpy(H(r, req + 64), a, 16);
            memcpy(H(r, req + 256), name, nl);
            td(r, s, req, 40, 0); td(r, s, req + 64, 16, 0); td(r, s, req + 256, nl, 0);
            entry_reply(r, s);
        } else {
            name_request(r, j, s, OP_UNLINK, name);
        }
        break;
    }
    case W_SYMLINK: {                   /* SYMLINK (to the workload's name), UNLINK */
        uint32_t nl = slot_name(j, s, "", name);
        if (s->stage == 0) {
            uint32_t tl = (uint32_t)strlen(j->name) + 1;
            hdr(r, j, s, OP_SYMLINK, j->nodeid, 40 + nl + tl);
            memcpy(H(r, req + 256), name, nl);
            memcpy(H(r, req + 256 + nl), j->name, tl);
            td(r, s, req, 40, 0); td(r, s, req + 256, nl, 0);
            td(r, s, req + 256 + nl, tl, 0);
            entry_reply(r, s);
        } else {
            name_request(r, j, s, OP_UNLINK, name);
        }
        break;
    }
    case W_RENAME: {    /* MKNOD a; RENAME a->b, b->a, ... (the ops); UNLINK a or b */
        char other[64];
        if (s->stage == 0) {
            uint32_t nl = slot_name(j, s, "_a", name);
            hdr(r, j, s, OP_MKNOD, j->nodeid, 40 + 16 + nl);
            uint32_t a[4] = {S_REG | 0644, 0, 022, 0};
            memcpy(H(r, req + 64), a, 16);
            memcpy(H(r, req + 256), name, nl);
            td(r, s, req, 40, 0); td(r, s, req + 64, 16, 0); td(r, s, req + 256, nl, 0);
            entry_reply(r, s);
        } else if (s->stage == 1 || s->stage == 2) {
            uint32_t nl = slot_name(j, s, s->stage == 1 ? "_a" : "_b", name);
            uint32_t ol = slot_name(j, s, s->stage == 1 ? "_b" : "_a", other);
            hdr(r, j, s, OP_RENAME, j->nodeid, 40 + 8 + nl + ol);
            memcpy(H(r, req + 64), &j->nodeid, 8);
            memcpy(H(r, req + 256), name, nl);
            memcpy(H(r, req + 256 + nl), other, ol);
            td(r, s, req, 40, 0); td(r, s, req + 64, 8, 0); td(r, s, req + 256, nl, 0);
            td(r, s, req + 256 + nl, ol, 0);
            td(r, s, out, 16, F_WRITE);
        } else {                        /* 3: UNLINK a, 4: UNLINK b */
            slot_name(j, s, s->stage == 3 ? "_a" : "_b", name);
            name_request(r, j, s, OP_UNLINK, name);
        }
        break;
    }
    case W_SETATTR: {   /* chmod / truncate / utimes of one file, as Linux sends them */
        uint8_t a[88] = {0};
        uint32_t valid = 0;
        uint64_t v = s->counter & 1;
        if (j->variant == SA_CHMOD) {
            uint32_t mode = S_REG | (v ? 0600 : 0644);
            valid = FATTR_MODE; memcpy(a + 68, &mode, 4);
        } else if (j->variant == SA_TRUNCATE) {
            uint64_t size = v ? PAGE : 0;
            valid = FATTR_SIZE; memcpy(a + 16, &size, 8);
        } else {
            uint64_t t = 1000000000ull + s->counter;
            valid = FATTR_ATIME | FATTR_MTIME;
            memcpy(a + 32, &t, 8); memcpy(a + 40, &t, 8);
        }
        memcpy(a, &valid, 4);
        hdr(r, j, s, OP_SETATTR, j->nodeid, 40 + 88);
        memcpy(H(r, req + 64), a, 88);
        td(r, s, req, 40, 0); td(r, s, req + 64, 88, 0);
        td(r, s, out, 16, F_WRITE); td(r, s, out + 16, 104, F_WRITE);
        break;
    }
    case W_OPEN_RELEASE: {              /* OPEN read-only, RELEASE */
        if (s->stage == 0) {
            hdr(r, j, s, OP_OPEN, j->nodeid, 48);
            uint32_t a[2] = {0 /* O_RDONLY */, 0};
            memcpy(H(r, req + 64), a, 8);
            td(r, s, req, 40, 0); td(r, s, req + 64, 8, 0);
            td(r, s, out, 16, F_WRITE); td(r, s, out + 16, 16, F_WRITE);
        } else {
            hdr(r, j, s, OP_RELEASE, j->nodeid, 64);
            uint8_t a[24] = {0};
            memcpy(a, &s->fh, 8);
            memcpy(H(r, req + 64), a, 24);
            td(r, s, req, 40, 0); td(r, s, req + 64, 24, 0);
            td(r, s, out, 16, F_WRITE);
        }
        break;
    }
    }
}

static void build(lg_ring *r, lg_job *j, slot *s, uint64_t *rng) {
    s->nd = 0;
    uint64_t req = s->gpa + S_REQ, out = s->gpa + S_OUT;
    switch (j->workload) {
    case W_GETATTR: {
        hdr(r, j, s, OP_GETATTR, j->nodeid, 56);
        memset(H(r, req + 64), 0, 16);
        td(r, s, req, 40, 0); td(r, s, req + 64, 16, 0);
        td(r, s, out, 16, F_WRITE); td(r, s, out + 16, 104, F_WRITE);
        break;
    }
    case W_LOOKUP_FORGET: {
        uint32_t nl = (uint32_t)strlen(j->name) + 1;
        hdr(r, j, s, OP_LOOKUP, j->nodeid, 40 + nl);
        memcpy(H(r, req + 256), j->name, nl);
        td(r, s, req, 40, 0); td(r, s, req + 256, nl, 0);
        td(r, s, out, 16, F_WRITE); td(r, s, out + 16, 128, F_WRITE);
        break;
    }
    case W_CREATE: {
        char name[64];
        snprintf(name, sizeof name, "lg%u_%u_%llu", j->tag,
                 (unsigned)((s->gpa - j->slot_gpa) / j->slot_stride),
                 (unsigned long long)s->counter);
        uint32_t nl = (uint32_t)strlen(name) + 1;
        if (s->stage == 0) {            /* CREATE */
            hdr(r, j, s, OP_CREATE, j->nodeid, 40 + 16 + nl);
            uint32_t a[4] = {0102 /* O_RDWR|O_CREAT */, 0100644, 022, 0};
            memcpy(H(r, req + 64), a, 16);
            memcpy(H(r, req + 256), name, nl);
            td(r, s, req, 40, 0); td(r, s, req + 64, 16, 0); td(r, s, req + 256, nl, 0);
            td(r, s, out, 16, F_WRITE); td(r, s, out + 16, 144, F_WRITE);
        } else if (s->stage == 1) {     /* RELEASE */
            hdr(r, j, s, OP_RELEASE, s->nodeid, 64);
            uint8_t a[24] = {0};
            memcpy(a, &s->fh, 8); uint32_t fl = 02; memcpy(a + 8, &fl, 4);
            memcpy(H(r, req + 64), a, 24);
            td(r, s, req, 40, 0); td(r, s, req + 64, 24, 0);
            td(r, s, out, 16, F_WRITE);
        } else {                        /* UNLINK */
            hdr(r, j, s, OP_UNLINK, j->nodeid, 40 + nl);
            memcpy(H(r, req + 256), name, nl);
            td(r, s, req, 40, 0); td(r, s, req + 256, nl, 0);
            td(r, s, out, 16, F_WRITE);
        }
        break;
    }
    case W_READDIRPLUS: {
        hdr(r, j, s, OP_READDIRPLUS, j->nodeid, 80);
        uint8_t a[40] = {0};
        memcpy(a, &s->fh, 8); memcpy(a + 8, &s->dir_off, 8);
        uint32_t sz = PAGE; memcpy(a + 16, &sz, 4);
        memcpy(H(r, req + 64), a, 40);
        td(r, s, req, 40, 0); td(r, s, req + 64, 40, 0);
        td(r, s, out, 16, F_WRITE); td(r, s, out + 16, PAGE, F_WRITE);
        break;
    }
    case W_READ:
    case W_WRITE: {
        uint32_t sz = j->io_size;
        uint64_t slots = j->file_size / sz;
        uint64_t off = (xorshift(rng) % slots) * sz;
        int wr = j->workload == W_WRITE;
        hdr(r, j, s, wr ? OP_WRITE : OP_READ, s->nodeid, wr ? 80 + sz : 80);
        uint8_t a[40] = {0};
        memcpy(a, &s->fh, 8); memcpy(a + 8, &off, 8); memcpy(a + 16, &sz, 4);
        memcpy(H(r, req + 64), a, 40);
        td(r, s, req, 40, 0); td(r, s, req + 64, 40, 0);
        uint32_t pages = (sz + PAGE - 1) / PAGE;
        uint64_t data = s->gpa + S_DATA;
        if (wr) {
            for (uint32_t p = 0; p < pages; p++) {
                uint32_t n = sz - p * PAGE < PAGE ? sz - p * PAGE : PAGE;
                td(r, s, data + (uint64_t)p * PAGE, n, 0);
            }
            td(r, s, out, 16, F_WRITE); td(r, s, out + 16, 8, F_WRITE);
        } else {
            td(r, s, out, 16, F_WRITE);
            for (uint32_t p = 0; p < pages; p++) {
                uint32_t n = sz - p * PAGE < PAGE ? sz - p * PAGE : PAGE;
                td(r, s, data + (uint64_t)p * PAGE, n, F_WRITE);
            }
        }
        break;
    }
    default:
        build_meta(r, j, s);
    }
}

/* Last `off` of a READDIRPLUS reply, or 0 when the listing ended. */
static uint64_t last_dir_off(const uint8_t *p, uint32_t n) {
    uint64_t off = 0; uint32_t pos = 0;
    while (pos + 128 + 24 <= n) {
        uint64_t o; uint32_t nl;
        memcpy(&o, p + pos + 128 + 8, 8); memcpy(&nl, p + pos + 128 + 16, 4);
        off = o;
        pos += 128 + ((24 + nl + 7) & ~7u);
    }
    return off;
}

static void error(lg_job *j, int err, int opcode) {
    j->errors++;
    if (!j->first_error) { j->first_error = err; j->first_error_opcode = opcode; }
}

static inline uint32_t reply_u32(lg_ring *r, slot *s, uint32_t off) {
    uint32_t v; memcpy(&v, H(r, s->gpa + S_OUT + 16 + off), 4); return v;
}
static inline uint64_t reply_u64(lg_ring *r, slot *s, uint32_t off) {
    uint64_t v; memcpy(&v, H(r, s->gpa + S_OUT + 16 + off), 8); return v;
}

/* Check a reply's entry_out (a new entry of file type `type`), keep its nodeid; 0 if
 * it is sound. */
static int take_entry(lg_ring *r, slot *s, uint32_t written, uint32_t type) {
    if (written < 16 + 128) return -1;
    s->nodeid = reply_u64(r, s, 0);
    uint32_t mode = reply_u32(r, s, 40 + 60);
    return s->nodeid && (mode & S_TYPE) == type ? 0 : -1;
}

/* The metadata workloads' replies (see build_meta): 0 when a stage finished, 1 when an
 * operation did, 2 when a stage finished and the next operation's clock starts now, or
 * E_BADREPLY when a reply without error says the wrong thing. */
static int complete_meta(lg_ring *r, lg_job *j, slot *s, uint32_t written, hiprio *h,
                         int stopping) {
    switch (j->workload) {
    case W_MKDIR:
    case W_MKNOD:
    case W_SYMLINK: {
        if (s->stage == 0) {
            uint32_t type = j->workload == W_MKDIR ? S_DIR
                            : j->workload == W_SYMLINK ? S_LNK : j->variant;
            if (take_entry(r, s, written, type)) return E_BADREPLY;
            s->stage = 1;
            return 0;
        }
        if (h && s->nodeid) send_forget(h, s->nodeid, 1);
        s->stage = 0; s->counter++;
        return 1;
    }
    case W_RENAME:
        switch (s->stage) {
        case 0:
            if (take_entry(r, s, written, S_REG)) return E_BADREPLY;
            s->stage = stopping ? 3 : 1;
            return 2;
        case 1: s->stage = stopping ? 4 : 2; return 1;
        case 2: s->stage = stopping ? 3 : 1; return 1;
        default:
            if (h && s->nodeid) send_forget(h, s->nodeid, 1);
            s->stage = 0; s->counter++;
            return 0;
        }
    case W_SETATTR: {
        if (written < 16 + 104) return E_BADREPLY;
        uint32_t mode = reply_u32(r, s, 16 + 60);
        uint64_t size = reply_u64(r, s, 16 + 8);
        if ((mode & S_TYPE) != S_REG) return E_BADREPLY;
        /* other slots change the same file: the reply shows one of the two states */
        if (j->variant == SA_CHMOD && (mode & 07777) != 0600 && (mode & 07777) != 0644)
            return E_BADREPLY;
        if (j->variant == SA_TRUNCATE && size != 0 && size != PAGE) return E_BADREPLY;
        s->counter++;
        return 1;
    }
    case W_OPEN_RELEASE:
        if (s->stage == 0) {
            if (written < 16 + 16) return E_BADREPLY;
            s->fh = reply_u64(r, s, 0);
            s->stage = 1;
            return 0;
        }
        s->stage = 0;
        return 1;
    }
    return 1;
}

/* Handle a completed request; returns 1 when an operation finished, 2 when the next one's
 * clock starts now, 0 otherwise. */
static int complete(lg_ring *r, lg_job *j, slot *s, uint32_t written, hiprio *h,
                    int stopping) {
    struct out_header *oh = (struct out_header *)H(r, s->gpa + S_OUT);
    j->requests++;
    int err = (written >= 16) ? oh->error : -EPROTO;
    if (written < 16 && s->opcode == OP_FORGET) err = 0;
    if (!err && j->workload >= W_MKDIR) {
        int rc = complete_meta(r, j, s, written, h, stopping);
        if (rc >= 0) return rc;
        err = rc;
    }
    /* a failed stage leaves its name behind: the next cycle takes a fresh one */
    if (err) { error(j, err, s->opcode); s->stage = 0; s->counter++; return 1; }
    switch (j->workload) {
    case W_LOOKUP_FORGET: {
        uint64_t nodeid; memcpy(&nodeid, H(r, s->gpa + S_OUT + 16), 8);
        if (h && nodeid) send_forget(h, nodeid, 1);
        return 1;
    }
    case W_CREATE:
        if (s->stage == 0) {
            memcpy(&s->nodeid, H(r, s->gpa + S_OUT + 16), 8);
            memcpy(&s->fh, H(r, s->gpa + S_OUT + 16 + 128), 8);
            s->stage = 1; return 0;
        }
        if (s->stage == 1) { s->stage = 2; return 0; }
        if (h && s->nodeid) send_forget(h, s->nodeid, 1);
        s->stage = 0; s->counter++;
        return 1;
    case W_READDIRPLUS:
        s->dir_off = last_dir_off(H(r, s->gpa + S_OUT + 16), written - 16);
        j->bytes += written - 16;
        return 1;
    case W_READ:
        j->bytes += written - 16;
        return 1;
    case W_WRITE: {
        uint32_t n; memcpy(&n, H(r, s->gpa + S_OUT + 16), 4);
        j->bytes += n;
        return 1;
    }
    default:
        return 1;
    }
}

/* Busy for ns: the guest's own work per completion in the driver front-end. */
static void spin_ns(uint64_t ns) {
    if (!ns) return;
    uint64_t end = now_ns() + ns;
    while (now_ns() < end) {}
}

/* Sleep on the call eventfd for at most 100 ms (then re-kick: a stall). Returns -1 when
 * the device stayed silent for 10 s. */
static int sleep_interrupt(lg_ring *r, lg_job *j, int *idle_ms) {
    struct pollfd p = {r->call_fd, POLLIN, 0};
    j->waits++;
    int n = poll(&p, 1, 100);
    if (n > 0) {
        uint64_t v;
        if (read(r->call_fd, &v, 8) == 8) j->wakeups++;
        *idle_ms = 0;
    } else if (n == 0) {
        *idle_ms += 100;
        j->stalls++;
        force_kick(r);
        if (*idle_ms >= 10000) { error(j, -ETIMEDOUT, 0); return -1; }
    }
    return 0;
}

/* Take a completed request, build its successor (unless stopping) and put it on the avail
 * ring (not yet published); returns 1 when one was put there. */
static int recycle(lg_ring *r, lg_job *j, slot *slots, uint32_t id, uint32_t len, uint64_t t,
                   int stopping, uint64_t *rng, hiprio *h) {
    slot *s = &slots[id];
    int done = complete(r, j, s, len, h, stopping);
    if (done == 1) {
        j->ops++;
        if (j->lat_n < j->lat_cap) j->lat_ns[j->lat_n++] = t - s->t0;
    }
    if (done) s->t0 = t;
    if (stopping && s->stage == 0) return 0;
    build(r, j, s, rng);
    submit(r, s, (uint16_t)id);
    return 1;
}

/* The batch front-end (see lg_run). */
static void run_batch(lg_ring *r, lg_job *j, slot *slots, uint64_t *rng, hiprio *h,
                      uint64_t deadline, int inflight) {
    int stopping = 0, idle_ms = 0;
    while (inflight) {
        uint16_t u = __atomic_load_n(used_idx(r), __ATOMIC_ACQUIRE);
        if (u == r->last_used) {
            /* used_event names the next entry, then sleep unless the ring moved */
            if (r->event_idx) {
                __atomic_store_n(used_event(r), r->last_used, __ATOMIC_RELEASE);
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                if (__atomic_load_n(used_idx(r), __ATOMIC_ACQUIRE) != r->last_used) continue;
            }
            if (sleep_interrupt(r, j, &idle_ms)) return;
            continue;
        }
        uint16_t old = r->next_avail;
        uint64_t t = now_ns();
        if (t >= deadline || (j->max_ops && j->ops >= j->max_ops)) stopping = 1;
        while (r->last_used != u) {
            uint32_t id, len;
            uint8_t *e = H(r, r->used_gpa + 4 + 8 * (r->last_used % r->size));
            memcpy(&id, e, 4); memcpy(&len, e + 4, 4);
            r->last_used++;
            if (id >= (uint32_t)j->qd) { error(j, -EPROTO, 0); continue; }
            inflight--;
            inflight += recycle(r, j, slots, id, len, t, stopping, rng, h);
        }
        publish(r, old);
    }
}

/* The driver front-end (see lg_run): one pass per interrupt. */
static void run_driver(lg_ring *r, lg_job *j, slot *slots, uint32_t *taken, uint64_t *rng,
                       hiprio *h, uint64_t deadline, int inflight) {
    int stopping = 0, idle_ms = 0;
    if (r->event_idx) __atomic_store_n(used_event(r), r->last_used, __ATOMIC_RELEASE);
    while (inflight) {
        if (sleep_interrupt(r, j, &idle_ms)) return;
        /* the completion work: take every used entry, re-arm (used_event = the next
           entry), look again */
        uint32_t n = 0;
        uint16_t u = __atomic_load_n(used_idx(r), __ATOMIC_ACQUIRE);
        for (;;) {
            while (r->last_used != u && n < r->size) {
                uint8_t *e = H(r, r->used_gpa + 4 + 8 * (r->last_used % r->size));
                memcpy(&taken[2 * n], e, 4);
                memcpy(&taken[2 * n + 1], e + 4, 4);
                n++;
                r->last_used++;
            }
            if (r->event_idx)
                __atomic_store_n(used_event(r), r->last_used, __ATOMIC_RELEASE);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            u = __atomic_load_n(used_idx(r), __ATOMIC_ACQUIRE);
            if (u == r->last_used || n >= r->size) break;
        }
        /* then each request's completion, and its waiter's next request, on its own */
        for (uint32_t k = 0; k < n; k++) {
            uint32_t id = taken[2 * k], len = taken[2 * k + 1];
            spin_ns(j->completion_ns);
            uint64_t t = now_ns();
            if (t >= deadline || (j->max_ops && j->ops >= j->max_ops)) stopping = 1;
            if (id >= (uint32_t)j->qd) { error(j, -EPROTO, 0); continue; }
            inflight--;
            uint16_t old = r->next_avail;
            if (recycle(r, j, slots, id, len, t, stopping, rng, h)) {
                inflight++;
                publish(r, old);
            }
        }
    }
}

/* Keep qd requests in flight with one of two front-ends:
 *
 * batch (frontend 0): when the used ring has entries, take them all, resubmit each at
 * once and publish the lot with one kick decision; sleep only when the ring is empty. It
 * costs the guest nothing per completion, so a device that signals late loses little.
 *
 * driver (frontend 1): as Linux's virtio-fs driver with a process per request: only an
 * interrupt runs the completion work, which takes every used entry, re-arms interrupts
 * (used_event = the next entry) and looks again, then completes the requests one by one,
 * each costing completion_ns of guest time (waking the waiter, its next system call);
 * each new request is published on its own, kicking only when avail_event asks. Entries
 * the device pushes meanwhile are taken after the interrupt they raise: against a device
 * that signals once per drained batch, guest and device take turns. */
int lg_run(lg_ring *r, lg_job *j, void *hp) {
    hiprio *h = hp;
    int qd = j->qd;
    if (qd < 1 || qd > 64 || (uint32_t)qd > r->size) return -EINVAL;
    slot *slots = calloc(qd, sizeof(slot));
    uint32_t *taken = calloc(2 * (size_t)r->size, sizeof(uint32_t));
    uint64_t rng = j->seed | 1;
    uint64_t start = now_ns();
    uint64_t deadline = start + (uint64_t)(j->seconds * 1e9);
    uint64_t kicks0 = r->kicks;
    uint16_t old = r->next_avail;
    for (int i = 0; i < qd; i++) {
        slot *s = &slots[i];
        s->gpa = j->slot_gpa + (uint64_t)i * j->slot_stride;
        s->fh = j->fh[i];
        s->nodeid = j->nodeid;
        build(r, j, s, &rng);
        s->t0 = now_ns();
        submit(r, s, (uint16_t)i);
    }
    publish(r, old);
    if (j->frontend == 1)
        run_driver(r, j, slots, taken, &rng, h, deadline, qd);
    else
        run_batch(r, j, slots, &rng, h, deadline, qd);
    j->elapsed_ns = now_ns() - start;
    j->kicks = r->kicks - kicks0;
    if (r->event_idx) __atomic_store_n(used_event(r), r->last_used, __ATOMIC_RELEASE);
    free(slots);
    free(taken);
    return 0;
}
"""


def build(tmpdir: str | Path | None = None) -> None:
    """Compile in a scratch directory and move the module next to this file: compiled in
    the repository root, setuptools' package discovery trips over its several top-level
    packages."""
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source("benchmarks._loadgen", SOURCE, extra_compile_args=["-O2"],
                   libraries=["pthread"])
    with tempfile.TemporaryDirectory(dir=tmpdir) as scratch:
        built = Path(ffi.compile(tmpdir=scratch, verbose=False))
        shutil.move(str(built), HERE / built.name)


def load() -> ModuleType:
    """Import the compiled module, building it first if it is missing or stale."""
    so = list(HERE.glob("_loadgen*.so"))
    me = Path(__file__).stat().st_mtime
    if not so or any(p.stat().st_mtime < me for p in so):
        for p in so:
            p.unlink()
        build()
        importlib.invalidate_caches()
        sys.modules.pop("benchmarks._loadgen", None)
    return importlib.import_module("benchmarks._loadgen")


if __name__ == "__main__":
    build()
    print("built", *sorted(os.path.basename(p) for p in map(str, HERE.glob("_loadgen*.so"))))
