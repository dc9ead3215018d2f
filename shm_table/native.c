/* Shared-memory inode and file-handle tables for pyvirtiofsd.
 *
 * Everything that reads-modifies-writes shared memory lives here: Python only calls in.
 * See docs/shm_table.md for the layout, the lock and the reader protocol.
 *
 * Two kinds of reference keep an entry, as in virtiofsd's inode store:
 *  - the guest's: an inode's lookup count (LOOKUP, CREATE, READDIRPLUS add one; FORGET,
 *    BATCH_FORGET and DESTROY take away at most what is there), an open file's guest_open
 *    flag (RELEASE clears it once).  Only these make an entry findable.
 *  - a pin: held by one thread of a worker while it serves a request with the entry's fd.
 *    Pins are hazard pointers in the pinning thread's own row of the segment's pin board,
 *    not counts in the slot: a guest that forgets more than it looked up cannot drop them,
 *    a release names the nodeid or fh it pinned (never a bare slot, so it cannot touch a
 *    later occupant), and a process that dies leaves its row behind for seg_reap_pins to
 *    give back exactly what it held.
 * An entry whose guest reference is gone leaves the key indexes at once (nobody can find or
 * pin it any more) and is freed, its fd closed, when no pin names it: by whoever drops the
 * last of the two.
 *
 * Rules that every function below keeps:
 *  - One writer at a time per segment (the PID lock in the header).  Pins and the guest's
 *    count are changed lock-free, except that the guest's count reaches 0 and a slot is
 *    freed only under the lock.
 *  - A slot's identity (nodeid / fh generation) changes only under the lock, bracketed by
 *    seq++ (odd) ... seq++ (even).
 *  - Before a multi-step change the writer records an intent (op, slot, nodeid, fd) in the
 *    header.  Whoever takes the lock over from a dead holder rolls that operation forward or
 *    back, then rebuilds every derived structure (indexes, free list, counters) from the
 *    slots, which are the single source of truth.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "native.h"

#define LD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LD_RLX(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define ST_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define ST_RLX(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define ST_SC(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define LD_SC(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define CAS(p, expp, d) \
    __atomic_compare_exchange_n((p), (expp), (d), 0, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)
#define FADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_SEQ_CST)
#define FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define CPU_RELAX() __builtin_ia32_pause()

#define SEG_MAGIC 0x3142415448534650ULL /* "PFSHTAB1" little endian */
#define SEG_VERSION 3u
#define KIND_INODE 1u
#define KIND_HANDLE 2u
#define HDR_SIZE 4096u
#define NONE32 0xFFFFFFFFu
#define TOMB 0xFFFFFFFFu
#define MAX_HANDLE 128u
#define MAX_NAME 255u
#define N_ORPHANS 64
#define ROOT_ID 1ULL
#define KEY_MIN_BITS 9u /* 512 buckets: one 4 KiB page per key index */
#define GEN_MAX 0xFFFFFFFFu /* a slot whose generation reached this is retired */
#define PIN_ROWS 64u         /* threads that can hold pins at once, per segment */
#define PINS_PER_ROW 7u      /* pins one thread can hold at once (a request needs <= 3) */
#define PINS_SIZE 4096u      /* the pin board: PIN_ROWS rows of one cache line */

enum { OP_NONE = 0, OP_INSERT = 1, OP_REMOVE = 2, OP_REBUILD = 3, OP_SETINFO = 4,
       OP_CLAIM = 5, OP_OPEN = 6, OP_FREE = 7, OP_CLOSE = 8 };

/* Segment header: 4096 bytes, shared by both table kinds.  Offsets are fixed by the
 * _Static_asserts below and listed in docs/shm_table.md. */
typedef struct {
    /* cache line 0: written once at init (key_bits: when the key indexes grow) */
    uint64_t magic;          /* 0  written last at init */
    uint32_t version;        /* 8 */
    uint32_t kind;           /* 12 */
    uint32_t capacity;       /* 16 */
    uint32_t slot_size;      /* 20 */
    uint32_t index_bits;     /* 24 room per key index: 1 << index_bits buckets */
    uint32_t owner_pid;      /* 28 creator (supervisor) */
    uint64_t segment_size;   /* 32 */
    uint64_t slots_off;      /* 40 */
    uint64_t index_off;      /* 48 */
    uint32_t key_bits;       /* 56 key indexes in use: 1 << key_bits buckets (<= index_bits) */
    uint32_t retired;        /* 60 slots retired: their generation is used up */
    /* cache line 1: the writer lock and everything only the holder writes */
    uint32_t lock;           /* 64 TID of holder, 0 = free */
    uint32_t waiters;        /* 68 */
    uint32_t intent_op;      /* 72 */
    uint32_t intent_slot;    /* 76 */
    uint64_t intent_nodeid;  /* 80 */
    int32_t intent_fd;       /* 88 */
    uint32_t root_slot;      /* 92 NONE32 until the root is inserted */
    uint64_t next_nodeid;    /* 96 2 + nodeids handed out (statistics) */
    uint32_t free_head;      /* 104 NONE32 = empty */
    uint32_t hwm;            /* 108 slots >= hwm were never used */
    uint64_t entries;        /* 112 live entries */
    uint64_t with_handle;    /* 120 live entries that are in the handle index */
    /* cache line 2: statistics */
    uint64_t lookups;        /* 128 claim_or_insert hits */
    uint64_t inserts;        /* 136 */
    uint64_t removals;       /* 144 */
    uint64_t acquire_misses; /* 152 */
    uint64_t rebuilds;       /* 160 */
    uint64_t takeovers;      /* 168 */
    uint64_t tombs[3];       /* 176 [0] unused (was the nodeid index), ids, handle */
    uint64_t full_errors;    /* 200 */
    uint64_t owner_start;    /* 208 owner's start time (/proc/pid/stat field 22): PID reuse */
    uint32_t pin_rows;       /* 216 pin-board rows ever claimed (scans stop here) */
    uint32_t pin_full;       /* 220 pins refused: the thread's row was full */
    uint64_t deferred;       /* 224 entries whose guest reference went while pinned */
    uint64_t dying;          /* 232 entries without a guest reference, still pinned */
    uint64_t reaped;         /* 240 pins given back for threads that died */
    uint64_t _pad2;          /* 248 */
    /* cache line 4: fds whose owner died inside the table (supervisor closes them) */
    uint32_t n_orphans;      /* 256 */
    uint32_t orphans_lost;   /* 260 */
    int32_t orphans[N_ORPHANS]; /* 264 */
} hdr_t;

_Static_assert(sizeof(hdr_t) <= HDR_SIZE, "header too big");
_Static_assert(offsetof(hdr_t, lock) == 64, "lock offset");
_Static_assert(offsetof(hdr_t, lookups) == 128, "stats offset");
_Static_assert(offsetof(hdr_t, n_orphans) == 256, "orphans offset");
_Static_assert(offsetof(hdr_t, pin_rows) == 216, "pin rows offset");

/* One thread's pins: the nodeids (inode table) or fhs (handle table) it is using.  Only
 * the owner writes its pins, except a reaper clearing the row of a dead owner. */
typedef struct {
    uint32_t owner;          /* TID, 0 = free row */
    uint32_t _pad;
    uint64_t pin[PINS_PER_ROW]; /* 0 = unused */
} pinrow_t;
_Static_assert(sizeof(pinrow_t) == 64, "pin row size");
_Static_assert(PIN_ROWS * sizeof(pinrow_t) <= PINS_SIZE, "pin board size");

/* Inode slot: 512 bytes; the first cache line holds what pin and forget touch. */
typedef struct {
    uint64_t lookups;        /* 0 the guest's lookup count; 0 = free or dying */
    uint32_t seq;            /* 8 odd while identity changes */
    uint32_t info_seq;       /* 12 odd while migration info changes */
    uint64_t nodeid;         /* 16 0 = free */
    int32_t fd;              /* 24 */
    uint32_t mode;           /* 28 */
    uint64_t ino;            /* 32 */
    uint64_t dev;            /* 40 */
    uint64_t mnt_id;         /* 48 */
    uint32_t next_free;      /* 56 */
    uint32_t has_handle;     /* 60 */
    int32_t handle_type;     /* 64 */
    uint32_t handle_bytes;   /* 68 */
    uint64_t handle_mnt_id;  /* 72 */
    uint64_t parent;         /* 80 */
    uint64_t ids_hash;       /* 88 */
    uint64_t handle_hash;    /* 96 */
    uint32_t name_len;       /* 104 */
    uint32_t gen;            /* 108 generation: nodeid = gen << 32 | slot (not the root) */
    uint8_t handle[MAX_HANDLE]; /* 112 */
    uint8_t name[256];       /* 240 */
    uint8_t _tail[16];       /* 496 */
} islot_t;
_Static_assert(sizeof(islot_t) == 512, "inode slot size");

/* Handle slot: 64 bytes. */
typedef struct {
    uint64_t busy;           /* 0 1 while the slot holds an open file (live or dying) */
    uint32_t seq;            /* 8 fh generation; odd while changing */
    uint32_t guest_open;     /* 12 1 while the guest's reference is held */
    uint64_t nodeid;         /* 16 */
    int32_t fd;              /* 24 */
    uint32_t flags;          /* 28 */
    uint32_t next_free;      /* 32 */
    uint32_t _pad;           /* 36 */
    uint64_t _pad2[3];       /* 40 */
} hslot_t;
_Static_assert(sizeof(hslot_t) == 64, "handle slot size");

/* ------------------------------------------------------------------ helpers */

static uint64_t dbg_countdown; /* process-local: tests make a writer kill itself mid-op */

#define CRASH_POINT()                                                          \
    do {                                                                       \
        if (__builtin_expect(dbg_countdown != 0, 0) && --dbg_countdown == 0)   \
            syscall(SYS_kill, syscall(SYS_getpid), SIGKILL);                   \
    } while (0)

void seg_debug_crash_after(uint64_t n) { dbg_countdown = n; }

static inline hdr_t *H(void *base) { return (hdr_t *)base; }
static inline islot_t *ISLOT(hdr_t *h, uint32_t i) {
    return (islot_t *)((char *)h + h->slots_off) + i;
}
static inline hslot_t *HSLOT(hdr_t *h, uint32_t i) {
    return (hslot_t *)((char *)h + h->slots_off) + i;
}
/* Buckets in use per key index; each index has room for 1 << index_bits. */
static inline uint64_t isize(hdr_t *h) { return 1ULL << h->key_bits; }
/* index k: 2 = ids, 3 = handle (0 and 1 were the nodeid index of layout version 1; a nodeid
 * now names its slot). */
static inline uint64_t *IDX(hdr_t *h, int k) {
    return (uint64_t *)((char *)h + h->index_off) + (uint64_t)(k - 2) * (1ULL << h->index_bits);
}

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}
static inline uint64_t hash_ids(uint64_t ino, uint64_t dev, uint64_t mnt) {
    return mix64(ino ^ mix64(dev ^ mix64(mnt + 0x9e3779b97f4a7c15ULL)));
}
static uint64_t hash_handle(const uint8_t *b, uint32_t n, int32_t type, uint64_t mnt) {
    uint64_t x = 0xcbf29ce484222325ULL ^ mix64(((uint64_t)(uint32_t)type << 32) | n) ^ mnt;
    for (uint32_t i = 0; i < n; i++) x = (x ^ b[i]) * 0x100000001b3ULL;
    return mix64(x);
}
static inline uint32_t tag_hash(uint64_t h) { return (uint32_t)(h >> 32); }
static inline uint64_t mkb(uint32_t tag, uint32_t slot) {
    return ((uint64_t)tag << 32) | (uint64_t)(slot + 1);
}

/* The caller's TID without a syscall on the fast path (gettid costs ~0.4 us on this VM).
 *
 * A TID cached in TLS goes stale in a child made by a raw clone() (no CLONE_VM): the child
 * gets a copy of the parent's memory, TLS included, and no at-fork handler runs.  So the
 * cache is validated against a per-process epoch kept in a MADV_WIPEONFORK page, which the
 * kernel hands to every such child zero-filled.  The epoch is the process's PID, so it also
 * differs from any epoch a child could have copied.  Without MADV_WIPEONFORK (Linux < 4.14)
 * every call makes the syscall. */
static uint64_t *wof_page;
static int wof_state; /* 0 untried, 1 ok, -1 unavailable */
/* Everything a thread keeps to itself, in one TLS block: in a shared object every TLS
 * variable costs a __tls_get_addr call, so the hot path takes the block's address once. */
#define PIN_CACHE 8
typedef struct {
    uint64_t epoch;
    uint32_t tid;
    uint32_t next;                               /* pin_cache slot to reuse next */
    struct { hdr_t *h; uint32_t row; } pin_cache[PIN_CACHE];
} tstate_t;
static __thread tstate_t tls;

static uint32_t my_tid_slow(void) {
    uint32_t tid = (uint32_t)syscall(SYS_gettid);
    if (__atomic_load_n(&wof_state, __ATOMIC_ACQUIRE) == 0) {
        void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        int ok = p != MAP_FAILED && madvise(p, 4096, MADV_WIPEONFORK) == 0;
        void *expected = NULL;
        if (ok && !__atomic_compare_exchange_n(&wof_page, &expected, p, 0, __ATOMIC_ACQ_REL,
                                               __ATOMIC_ACQUIRE))
            munmap(p, 4096); /* another thread won */
        else if (!ok && p != MAP_FAILED)
            munmap(p, 4096);
        __atomic_store_n(&wof_state, ok ? 1 : -1, __ATOMIC_RELEASE);
    }
    uint64_t *page = __atomic_load_n(&wof_page, __ATOMIC_ACQUIRE);
    if (page && __atomic_load_n(&wof_state, __ATOMIC_ACQUIRE) == 1) {
        uint64_t e = __atomic_load_n(page, __ATOMIC_ACQUIRE);
        if (e == 0) {
            uint64_t mine = (uint64_t)syscall(SYS_getpid);
            if (!__atomic_compare_exchange_n(page, &e, mine, 0, __ATOMIC_ACQ_REL,
                                             __ATOMIC_ACQUIRE))
                mine = e;
            e = mine;
        }
        tls.epoch = e;
        tls.tid = tid;
    }
    return tid;
}

static inline uint32_t my_tid(void) {
    uint64_t *page = __atomic_load_n(&wof_page, __ATOMIC_RELAXED);
    if (__builtin_expect(page != NULL, 1)) {
        uint64_t e = __atomic_load_n(page, __ATOMIC_RELAXED);
        tstate_t *ts = &tls;
        if (__builtin_expect(e != 0 && e == ts->epoch, 1)) return ts->tid;
    }
    return my_tid_slow();
}

uint32_t seg_my_tid(void) { return my_tid(); }

/* Is the task with this TID gone?  kill(0) also succeeds for a zombie (a killed worker
 * stays one until the supervisor reaps it), so ask a pidfd, which polls readable once the
 * process has exited.  Never /proc/<tid>: inside the sandbox /proc is the server's own fd
 * directory, where "<tid>/stat" names whatever the fd of that number is (a directory of
 * the share, say), so a guest could make a live lock holder look dead.  A TID that is not
 * a thread-group leader has no pidfd (before Linux 6.9): threads are reaped as they exit,
 * so kill(0) alone is the answer for them. */
static int task_dead(uint32_t tid) {
    if (tid == 0) return 0;
    if (kill((pid_t)tid, 0) != 0) return errno == ESRCH;
    int fd = (int)syscall(SYS_pidfd_open, (pid_t)tid, 0u);
    if (fd < 0) return 0;
    struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
    int r = poll(&p, 1, 0);
    close(fd);
    return r == 1 && (p.revents & POLLIN);
}

/* Start time of a task in clock ticks since boot (field 22 of /proc/pid/stat), 0 if unknown.
 * (pid, start time) names a process even after its PID is reused. */
static uint64_t task_starttime(uint32_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return 0;
    /* after ")": field 3 (state) ... field 22 (starttime) */
    int field = 2;
    for (; *p && field < 22; p++)
        if (*p == ' ') field++;
    unsigned long long v = 0;
    if (sscanf(p, "%llu", &v) != 1) return 0;
    return v;
}

/* ------------------------------------------------------------------ the lock */

static void repair(hdr_t *h);

/* Take the writer lock.  Spins briefly, then sleeps on the futex with a 2 ms timeout; after
 * each timeout checks whether the holder died and, if so, takes the lock over and repairs. */
static void lock_acquire(hdr_t *h) {
    uint32_t me = my_tid();
    uint32_t z = 0;
    if (CAS(&h->lock, &z, me)) return;
    for (unsigned spins = 0;; spins++) {
        uint32_t cur = LD_ACQ(&h->lock);
        if (cur == 0) {
            z = 0;
            if (CAS(&h->lock, &z, me)) return;
            continue;
        }
        if (spins < 200) {
            CPU_RELAX();
            continue;
        }
        FADD(&h->waiters, 1);
        struct timespec ts = {0, 2000000};
        long r = syscall(SYS_futex, &h->lock, FUTEX_WAIT, cur, &ts, NULL, 0);
        int timed_out = (r != 0 && errno == ETIMEDOUT);
        __atomic_fetch_sub(&h->waiters, 1, __ATOMIC_SEQ_CST);
        if (!timed_out && cur != me) continue;
        cur = LD_ACQ(&h->lock);
        if (cur != 0 && (cur == me || task_dead(cur))) {
            /* cur == me: a dead task's TID was reused by us; it cannot be a recursive lock
             * because no code path here re-enters the lock. */
            if (CAS(&h->lock, &cur, me)) {
                FADD(&h->takeovers, 1);
                repair(h);
                return;
            }
        }
    }
}

static void lock_release(hdr_t *h) {
    ST_SC(&h->lock, 0u);
    if (LD_SC(&h->waiters)) syscall(SYS_futex, &h->lock, FUTEX_WAKE, 1, NULL, NULL, 0);
}

static inline void set_intent(hdr_t *h, uint32_t op, uint32_t slot, uint64_t nodeid, int32_t fd) {
    h->intent_slot = slot;
    h->intent_nodeid = nodeid;
    h->intent_fd = fd;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    ST_REL(&h->intent_op, op);
}
static inline void clear_intent(hdr_t *h) { ST_REL(&h->intent_op, (uint32_t)OP_NONE); }

static void add_orphan(hdr_t *h, int32_t fd) {
    if (fd < 0) return;
    /* A repairer that dies mid-repair leaves the intent set: the next one must not queue the
     * same fd twice (closing it twice could close an unrelated file). */
    for (uint32_t i = 0; i < h->n_orphans && i < N_ORPHANS; i++)
        if (h->orphans[i] == fd) return;
    if (h->n_orphans < N_ORPHANS) {
        h->orphans[h->n_orphans] = fd;
        h->n_orphans++;
    } else {
        h->orphans_lost++;
    }
}

int seg_take_orphans(void *base, int32_t *out, int max) {
    hdr_t *h = H(base);
    lock_acquire(h);
    int n = (int)h->n_orphans;
    if (n > max) n = max;
    for (int i = 0; i < n; i++) out[i] = h->orphans[i];
    memmove(h->orphans, h->orphans + n, (h->n_orphans - n) * sizeof(int32_t));
    h->n_orphans -= n;
    lock_release(h);
    return n;
}

uint32_t seg_lock_word(void *base) { return LD_ACQ(&H(base)->lock); }

int seg_check(void *base, uint64_t size, uint32_t kind) {
    hdr_t *h = H(base);
    if (size < HDR_SIZE) return -4;
    if (LD_ACQ(&h->magic) != SEG_MAGIC) return -1;
    if (h->version != SEG_VERSION) return -2;
    if (h->kind != kind) return -3;
    if (h->segment_size > size) return -4;
    return 0;
}

uint32_t seg_owner_pid(void *base) { return H(base)->owner_pid; }
int seg_owner_alive(void *base) {
    hdr_t *h = H(base);
    if (task_dead(h->owner_pid)) return 0;
    uint64_t st = task_starttime(h->owner_pid);
    return st == 0 || h->owner_start == 0 || st == h->owner_start;
}

int seg_stats(void *base, uint64_t *out, int n) {
    hdr_t *h = H(base);
    uint64_t v[] = {
        h->capacity, LD_RLX(&h->entries), LD_RLX(&h->hwm), isize(h),
        LD_RLX(&h->tombs[0]), LD_RLX(&h->tombs[1]), LD_RLX(&h->tombs[2]),
        LD_RLX(&h->lookups), LD_RLX(&h->inserts), LD_RLX(&h->removals),
        LD_RLX(&h->acquire_misses), LD_RLX(&h->rebuilds), LD_RLX(&h->takeovers),
        LD_RLX(&h->full_errors), LD_RLX(&h->n_orphans), LD_RLX(&h->next_nodeid),
        LD_RLX(&h->with_handle), 0 /* was the nodeid index generation */,
        LD_RLX(&h->retired), LD_RLX(&h->dying), LD_RLX(&h->deferred), LD_RLX(&h->reaped),
        LD_RLX(&h->pin_full), LD_RLX(&h->pin_rows),
    };
    int m = (int)(sizeof v / sizeof v[0]);
    if (n > m) n = m;
    memcpy(out, v, (size_t)n * sizeof(uint64_t));
    return m;
}

static void init_header(hdr_t *h, uint32_t kind, uint32_t capacity, uint32_t slot_size,
                        uint32_t index_bits, uint64_t index_off, uint64_t size,
                        uint32_t owner) {
    h->version = SEG_VERSION;
    h->kind = kind;
    h->capacity = capacity;
    h->slot_size = slot_size;
    h->index_bits = index_bits;
    h->owner_pid = owner;
    h->owner_start = task_starttime(owner);
    h->segment_size = size;
    h->slots_off = HDR_SIZE + PINS_SIZE;
    h->index_off = index_off;
    h->pin_rows = 0;
    h->key_bits = index_bits < KEY_MIN_BITS ? index_bits : KEY_MIN_BITS;
    h->retired = 0;
    h->lock = 0;
    h->intent_op = OP_NONE;
    h->root_slot = NONE32;
    h->next_nodeid = 2;
    h->free_head = NONE32;
    h->hwm = 0;
    ST_REL(&h->magic, SEG_MAGIC);
}

/* ================================================================ the pin board */

static inline pinrow_t *PINROW(hdr_t *h, uint32_t r) {
    return (pinrow_t *)((char *)h + HDR_SIZE) + r;
}

static void it_after_unpin(hdr_t *h, uint64_t nodeid);
static void ht_after_unpin(hdr_t *h, uint64_t fh);

/* What to do after a pin was dropped: free the entry if it was the last thing holding it. */
static void after_unpin(hdr_t *h, uint64_t v) {
    if (h->kind == KIND_INODE)
        it_after_unpin(h, v);
    else
        ht_after_unpin(h, v);
}

/* A row's owner with this bit set: the reaper with that TID is giving the row back.  TIDs
 * are below 2^22 (PID_MAX_LIMIT), so a marked owner never equals a thread's TID. */
#define ROW_REAPING 0x80000000u

/* Give back the pins of threads that are gone (exited, killed, zombie), then free their rows.
 * Anyone may call it; the supervisor does after a worker dies, before reaping it, so the
 * worker's TIDs cannot have been reused yet.  One reaper at a time gives a row back: the one
 * whose CAS marks it.  (Unmarked, a reaper that read a dead owner and was then overtaken by
 * another, which freed the row, could clear the pins of a live thread that had claimed the
 * row meanwhile.)  A row marked by a reaper that died is taken over like a dead owner's. */
static uint32_t reap_rows(hdr_t *h) {
    uint32_t n = LD_ACQ(&h->pin_rows), freed = 0, me = my_tid() | ROW_REAPING;
    for (uint32_t r = 0; r < n && r < PIN_ROWS; r++) {
        pinrow_t *row = PINROW(h, r);
        uint32_t owner = LD_ACQ(&row->owner);
        if (owner == 0 || !task_dead(owner & ~ROW_REAPING) || !CAS(&row->owner, &owner, me))
            continue;
        for (uint32_t i = 0; i < PINS_PER_ROW; i++) {
            uint64_t v = __atomic_exchange_n(&row->pin[i], 0ULL, __ATOMIC_SEQ_CST);
            if (v) {
                FADD(&h->reaped, 1);
                CRASH_POINT();
                after_unpin(h, v);
            }
        }
        ST_SC(&row->owner, 0u);
        freed++;
    }
    return freed;
}

/* Entries freed so far: a worker whose fd cache holds fds of inodes sweeps it when this
 * moves. */
uint64_t seg_removals(void *base) { return LD_ACQ(&H(base)->removals); }

/* The calling thread's row, claimed on first use.  Cached per thread; the cache is only
 * trusted while the row still names this thread, which also covers a child made by clone()
 * (new TID) and a segment mapped where an old one was. */

static pinrow_t *my_row(hdr_t *h) {
    uint32_t tid = my_tid();
    tstate_t *ts = &tls;
    for (int i = 0; i < PIN_CACHE; i++) {
        if (ts->pin_cache[i].h != h) continue;
        pinrow_t *row = PINROW(h, ts->pin_cache[i].row);
        if (LD_RLX(&row->owner) == tid) return row;
        ts->pin_cache[i].h = NULL;
    }
    for (int attempt = 0; attempt < 2; attempt++) {
        uint32_t n = LD_ACQ(&h->pin_rows);
        int32_t found = -1;
        for (uint32_t r = 0; r < n && r < PIN_ROWS; r++)
            if (LD_ACQ(&PINROW(h, r)->owner) == tid) { found = (int32_t)r; break; }
        for (uint32_t r = 0; found < 0 && r < PIN_ROWS; r++) {
            uint32_t z = 0;
            if (LD_RLX(&PINROW(h, r)->owner) == 0 && CAS(&PINROW(h, r)->owner, &z, tid))
                found = (int32_t)r;
        }
        if (found >= 0) {
            /* Scanners must see this row before it holds a pin: raise pin_rows first. */
            uint32_t cur = LD_ACQ(&h->pin_rows);
            while (cur < (uint32_t)found + 1 && !CAS(&h->pin_rows, &cur, (uint32_t)found + 1)) {}
            uint32_t k = ts->next++ % PIN_CACHE;
            ts->pin_cache[k].h = h;
            ts->pin_cache[k].row = (uint32_t)found;
            return PINROW(h, (uint32_t)found);
        }
        reap_rows(h);
    }
    return NULL;
}

/* Publish a pin (full barrier: the caller's loads that follow are ordered after it).
 * Returns the pin's address, or NULL when the row is full. */
static inline uint64_t *pin_put(pinrow_t *row, uint64_t v) {
    for (uint32_t i = 0; i < PINS_PER_ROW; i++) {
        if (row->pin[i] == 0) {
            __atomic_store_n(&row->pin[i], v, __ATOMIC_SEQ_CST);
            return &row->pin[i];
        }
    }
    return NULL;
}

static inline void pin_clear(uint64_t *pin) { __atomic_store_n(pin, 0ULL, __ATOMIC_SEQ_CST); }

/* Is v pinned by anyone (other than the pin at `except`)?  Callers have made the entry
 * unfindable first (seq-cst), so a pin published after this scan finds nothing to use. */
static int pinned(hdr_t *h, uint64_t v, const uint64_t *except) {
    uint32_t n = LD_SC(&h->pin_rows);
    for (uint32_t r = 0; r < n && r < PIN_ROWS; r++) {
        pinrow_t *row = PINROW(h, r);
        for (uint32_t i = 0; i < PINS_PER_ROW; i++)
            if (&row->pin[i] != except && LD_SC(&row->pin[i]) == v) return 1;
    }
    return 0;
}

/* Drop this thread's pin on v: 0, or -1 when it holds none (a caller's bug: nothing is
 * touched, so a stale release can never free someone else's entry). */
static int unpin(hdr_t *h, uint64_t v) {
    pinrow_t *row = my_row(h);
    if (!row || v == 0) return -1;
    for (uint32_t i = 0; i < PINS_PER_ROW; i++) {
        if (row->pin[i] == v) {
            pin_clear(&row->pin[i]);
            CRASH_POINT(); /* tests: killed before freeing what the pin alone held */
            after_unpin(h, v);
            return 0;
        }
    }
    return -1;
}

/* Pins this thread holds in this segment (tests, leak checks). */
int seg_my_pins(void *base) {
    hdr_t *h = H(base);
    pinrow_t *row = my_row(h);
    int n = 0;
    if (row)
        for (uint32_t i = 0; i < PINS_PER_ROW; i++) n += row->pin[i] != 0;
    return n;
}

/* Pins held in this segment by all threads (stats). */
int seg_pins_held(void *base) {
    hdr_t *h = H(base);
    uint32_t n = LD_ACQ(&h->pin_rows);
    int total = 0;
    for (uint32_t r = 0; r < n && r < PIN_ROWS; r++)
        for (uint32_t i = 0; i < PINS_PER_ROW; i++) total += LD_RLX(&PINROW(h, r)->pin[i]) != 0;
    return total;
}

/* ================================================================ inode table */

static uint32_t index_bits_for(uint32_t capacity) {
    uint32_t bits = 4;
    while ((1ULL << bits) < 2ULL * capacity) bits++;
    return bits;
}

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) & ~(a - 1); }

uint64_t it_segment_size(uint32_t capacity) {
    uint64_t idx_off =
        align_up(HDR_SIZE + PINS_SIZE + (uint64_t)capacity * sizeof(islot_t), 4096);
    return idx_off + 2ULL * 8ULL * (1ULL << index_bits_for(capacity));
}

int it_init(void *base, uint32_t capacity, uint32_t owner_pid) {
    if (capacity == 0 || capacity > 0x7FFFFFFFu) return -1;
    uint64_t idx_off =
        align_up(HDR_SIZE + PINS_SIZE + (uint64_t)capacity * sizeof(islot_t), 4096);
    init_header(H(base), KIND_INODE, capacity, sizeof(islot_t), index_bits_for(capacity),
                idx_off, it_segment_size(capacity), owner_pid);
    return 0;
}

/* A slot holds an entry (live or waiting for its last pin) while it has a nodeid. */
static inline int slot_used(islot_t *s) { return LD_RLX(&s->nodeid) != 0; }
/* A live entry: the guest holds it, it is in the key indexes and can be pinned. */
static inline int slot_indexed(islot_t *s) {
    return LD_RLX(&s->nodeid) != 0 && LD_RLX(&s->lookups) != 0;
}

static inline int handle_eq(islot_t *s, const uint8_t *hb, uint32_t n, int32_t type,
                            uint64_t mnt) {
    return s->has_handle && s->handle_bytes == n && s->handle_type == type &&
           s->handle_mnt_id == mnt && memcmp(s->handle, hb, n) == 0;
}

/* Writer-side index primitives (lock held). */
static void idx_put(hdr_t *h, uint64_t *idx, int tk, uint64_t hash, uint32_t tag,
                    uint32_t slot) {
    uint64_t mask = isize(h) - 1, i = hash & mask;
    for (;;) {
        uint32_t lo = (uint32_t)LD_RLX(&idx[i]);
        if (lo == 0 || lo == TOMB) {
            ST_REL(&idx[i], mkb(tag, slot));
            if (lo == TOMB) h->tombs[tk]--;
            return;
        }
        i = (i + 1) & mask;
    }
}

static int idx_del(hdr_t *h, uint64_t *idx, int tk, uint64_t hash, uint32_t slot) {
    uint64_t mask = isize(h) - 1, i = hash & mask;
    for (uint64_t n = 0; n <= mask; n++, i = (i + 1) & mask) {
        uint32_t lo = (uint32_t)LD_RLX(&idx[i]);
        if (lo == 0) return -1;
        if (lo == slot + 1) {
            ST_REL(&idx[i], (uint64_t)TOMB);
            h->tombs[tk]++;
            return 0;
        }
    }
    return -1;
}

static void clear_index(uint64_t *idx, uint64_t n) {
    for (uint64_t i = 0; i < n; i++) ST_RLX(&idx[i], 0ULL);
}

/* Key-index size for `hwm` slots in use: at least twice as many buckets (so the load stays
 * <= 1/2 even if every slot is live), at least one page, at most the room reserved.  The
 * resident size of the indexes thus follows the high-water mark of live entries, not the
 * capacity or the number of nodeids ever handed out. */
static uint32_t key_bits_for(hdr_t *h, uint64_t hwm) {
    uint32_t b = KEY_MIN_BITS;
    while (b < h->index_bits && (1ULL << b) < 2 * hwm) b++;
    return b < h->index_bits ? b : h->index_bits;
}

/* Rebuild the ids (k=2) or handle (k=3) index in place; only writers read them. */
static void rebuild_key_index(hdr_t *h, int k) {
    uint64_t *idx = IDX(h, k);
    clear_index(idx, isize(h));
    h->tombs[k - 1] = 0;
    for (uint32_t i = 0; i < h->hwm; i++) {
        islot_t *s = ISLOT(h, i);
        if (!slot_indexed(s)) continue;
        if (k == 2)
            idx_put(h, idx, 1, s->ids_hash, tag_hash(s->ids_hash), i);
        else if (s->has_handle)
            idx_put(h, idx, 2, s->handle_hash, tag_hash(s->handle_hash), i);
        CRASH_POINT();
    }
}

/* Grow or clean the key indexes before an insert (lock held).  `fd` is the insert's: the
 * rebuild's intent carries it, so that a repair after a crash in here still hands it on, and
 * stays set until the insert's own intent replaces it (no moment without one). */
static void maybe_rebuild(hdr_t *h, int32_t fd) {
    uint32_t want = key_bits_for(h, (uint64_t)h->hwm + 1);
    if (want > h->key_bits) {
        /* Grow both key indexes in place: the larger one starts where the smaller one did. */
        set_intent(h, OP_REBUILD, NONE32, 0, fd);
        h->key_bits = want;
        CRASH_POINT();
        rebuild_key_index(h, 2);
        rebuild_key_index(h, 3);
        h->rebuilds++;
        return;
    }
    uint64_t limit = isize(h) / 4 * 3;
    uint64_t live = h->entries + 1;
    if (live + h->tombs[1] > limit) {
        set_intent(h, OP_REBUILD, NONE32, 0, fd);
        rebuild_key_index(h, 2);
        h->rebuilds++;
    }
    if (h->with_handle + 1 + h->tombs[2] > limit) {
        set_intent(h, OP_REBUILD, NONE32, 0, fd);
        rebuild_key_index(h, 3);
        h->rebuilds++;
    }
}

static void islot_clear(islot_t *s) {
    ST_REL(&s->seq, s->seq + 1);
    ST_RLX(&s->nodeid, 0ULL);
    ST_RLX(&s->lookups, 0ULL);
    s->fd = -1;
    s->mode = 0;
    s->ino = s->dev = s->mnt_id = 0;
    s->has_handle = 0;
    s->handle_type = 0;
    s->handle_bytes = 0;
    s->handle_mnt_id = 0;
    s->parent = 0;
    s->name_len = 0;
    s->ids_hash = s->handle_hash = 0;
    ST_REL(&s->seq, s->seq + 1);
}

/* The guest's last lookup just went (lock held, lookups now 0): the entry leaves the key
 * indexes, so no LOOKUP finds it again; it stays in its slot while pinned. */
static void it_unindex_locked(hdr_t *h, uint32_t slot) {
    islot_t *s = ISLOT(h, slot);
    idx_del(h, IDX(h, 2), 1, s->ids_hash, slot);
    CRASH_POINT();
    if (s->has_handle) {
        idx_del(h, IDX(h, 3), 2, s->handle_hash, slot);
        h->with_handle--;
    }
    h->dying++;
}

/* Free an unindexed, unpinned slot (lock held).  Returns its fd, for the caller to close. */
static int32_t it_free_locked(hdr_t *h, uint32_t slot) {
    islot_t *s = ISLOT(h, slot);
    int32_t fd = s->fd;
    islot_clear(s);
    CRASH_POINT();
    if (s->gen == GEN_MAX) {
        h->retired++; /* every nodeid this slot can name was handed out: never reuse it */
    } else {
        s->next_free = h->free_head;
        h->free_head = slot;
    }
    h->entries--;
    h->dying--;
    ST_REL(&h->removals, h->removals + 1);
    return fd;
}

/* Free `slot` if it still holds `nodeid` without a guest reference and nobody but the pin
 * at `except` pins it (lock held).  1 when freed, with *fd the fd to close (-1 for an entry
 * kept by file handle only); 0 when it stays. */
static int it_free_if_unpinned_locked(hdr_t *h, uint32_t slot, uint64_t nodeid,
                                      const uint64_t *except, int32_t *fd) {
    islot_t *s = ISLOT(h, slot);
    *fd = -1;
    if (slot >= h->hwm || s->nodeid != nodeid || s->lookups != 0 || (s->seq & 1) ||
        nodeid == ROOT_ID || pinned(h, nodeid, except))
        return 0;
    set_intent(h, OP_FREE, slot, nodeid, s->fd);
    CRASH_POINT();
    *fd = it_free_locked(h, slot);
    CRASH_POINT();
    clear_intent(h);
    return 1;
}

static inline void close_fd(int32_t fd) {
    if (fd >= 0) close(fd);
}

/* Full rebuild of everything derived from the slots: after a takeover.  Entries without a
 * guest reference (their remover died) are freed here unless pinned; a pinner frees them
 * when it lets go, and the pins of dead threads are given back by seg_reap_pins. */
static void rebuild_all(hdr_t *h) {
    uint32_t cap = h->capacity;
    if (h->hwm > cap) h->hwm = cap;
    uint64_t used = 0, wh = 0, dying = 0;
    uint32_t head = NONE32, retired = 0;
    h->root_slot = NONE32;
    for (uint32_t i = h->hwm; i-- > 0;) {
        islot_t *s = ISLOT(h, i);
        if (s->seq & 1) s->seq++; /* a writer died mid-change; the intent step fixed it */
        if (slot_used(s)) {
            used++;
            if (s->lookups == 0)
                dying++;
            else if (s->has_handle)
                wh++;
            if (s->nodeid == ROOT_ID) h->root_slot = i;
        } else if (s->gen == GEN_MAX) {
            retired++;
        } else {
            s->next_free = head;
            head = i;
        }
    }
    h->free_head = head;
    h->entries = used;
    h->dying = dying;
    h->with_handle = wh;
    h->retired = retired;
    uint32_t bits = key_bits_for(h, h->hwm);
    if (h->key_bits > bits && h->key_bits <= h->index_bits) bits = h->key_bits;
    h->key_bits = bits;
    rebuild_key_index(h, 2);
    rebuild_key_index(h, 3);
    h->rebuilds++;
    for (uint32_t i = 0; dying && i < h->hwm; i++) {
        islot_t *s = ISLOT(h, i);
        if (slot_used(s) && s->lookups == 0) {
            dying--;
            int32_t fd;
            if (it_free_if_unpinned_locked(h, i, s->nodeid, NULL, &fd)) add_orphan(h, fd);
        }
    }
}

/* Decrement with saturation at the slot's floor (1 for the root, else 0). */
static inline uint64_t sat_sub(uint64_t rc, uint64_t n, uint64_t floor) {
    uint64_t nv = rc > n ? rc - n : 0;
    return nv < floor ? floor : nv;
}

static void it_repair(hdr_t *h) {
    uint32_t op = h->intent_op, slot = h->intent_slot;
    if (slot >= h->hwm) slot = NONE32;
    islot_t *s = slot != NONE32 ? ISLOT(h, slot) : NULL;
    if (op == OP_INSERT && s) {
        if (LD_ACQ(&s->lookups) == 0) {
            /* Died before the slot was complete: nobody can hold a pin on it. */
            islot_clear(s);
            if (s->seq & 1) s->seq++;
            add_orphan(h, h->intent_fd);
        } else {
            if (s->seq & 1) s->seq++; /* lookups = 1 is written last: the fields are complete */
            /* The creator died before handing the nodeid to the guest: drop the guest's
             * lookup it stood for (the root keeps its own).  Nobody else could have claimed
             * it meanwhile: the creator held the lock throughout. */
            if (s->nodeid != ROOT_ID) ST_REL(&s->lookups, 0ULL);
        }
    } else if (op == OP_INSERT) {
        /* Died before a fresh slot (at the high-water mark) joined the table: only its fd,
         * which the table owned from the start of the insert, is left to hand on. */
        add_orphan(h, h->intent_fd);
    } else if (op == OP_CLAIM || op == OP_REBUILD) {
        /* The dead caller's own fd, which it would have closed, or the fd of the insert a
         * rebuild ran for (rebuild_all below redoes the rebuild). */
        add_orphan(h, h->intent_fd);
    } else if (op == OP_FREE && s) {
        if ((s->seq & 1) || s->nodeid != h->intent_nodeid) {
            /* Past the start of the clear: finish it; the fd was not closed yet. */
            islot_clear(s);
            if (s->seq & 1) s->seq++;
            add_orphan(h, h->intent_fd);
        }
    } else if (op == OP_SETINFO && s) {
        if (s->info_seq & 1) {
            s->parent = 0;
            s->name_len = 0;
            ST_REL(&s->info_seq, s->info_seq + 1);
        }
    }
    /* OP_REMOVE: lookups == 0 is its commit point, and rebuild_all unindexes and frees such
     * entries; before it nothing had changed. */
    clear_intent(h);
    rebuild_all(h);
}

static void ht_repair(hdr_t *h);

static void repair(hdr_t *h) {
    if (h->kind == KIND_INODE)
        it_repair(h);
    else
        ht_repair(h);
}

/* The slot a nodeid names: the root's is in the header, any other nodeid is
 * gen << 32 | slot with gen >= 1.  NONE32 for a nodeid no insert can have made. */
static inline uint32_t nodeid_slot(hdr_t *h, uint64_t nodeid) {
    if (nodeid == ROOT_ID) return LD_ACQ(&h->root_slot);
    if ((nodeid >> 32) == 0) return NONE32;
    uint32_t slot = (uint32_t)nodeid;
    return slot < LD_ACQ(&h->hwm) ? slot : NONE32;
}

/* Free a slot whose guest reference is gone, unless pinned. */
static void it_reclaim(hdr_t *h, uint32_t slot, uint64_t nodeid) {
    int32_t fd;
    lock_acquire(h);
    it_free_if_unpinned_locked(h, slot, nodeid, NULL, &fd);
    lock_release(h);
    close_fd(fd);
}

static void it_after_unpin(hdr_t *h, uint64_t nodeid) {
    uint32_t slot = nodeid_slot(h, nodeid);
    if (slot == NONE32) return;
    islot_t *s = ISLOT(h, slot);
    if (LD_ACQ(&s->nodeid) != nodeid || LD_ACQ(&s->lookups) != 0) return;
    it_reclaim(h, slot, nodeid);
}

/* Pin `nodeid` for this thread: lock-free; never on an entry the guest no longer holds.
 * 0 with *slot_out, *fd_out and *pin_out set; -1 not found; -4 this thread's pins are used
 * up. */
static int it_pin_internal(hdr_t *h, uint64_t nodeid, uint32_t *slot_out, int32_t *fd_out,
                           uint64_t **pin_out) {
    uint32_t slot = nodeid_slot(h, nodeid);
    if (slot == NONE32 || nodeid == 0) goto miss;
    pinrow_t *row = my_row(h);
    uint64_t *pin = row ? pin_put(row, nodeid) : NULL;
    if (!pin) {
        FADD(&h->pin_full, 1);
        return -4;
    }
    /* The pin is visible before these loads (seq-cst store).  Whoever takes lookups to 0
     * does so before it scans the pins: either we read 0 here, or it sees our pin. */
    islot_t *s = ISLOT(h, slot);
    uint32_t seq = LD_ACQ(&s->seq);
    if (!(seq & 1) && LD_ACQ(&s->nodeid) == nodeid && LD_ACQ(&s->lookups) != 0) {
        int32_t fd = LD_ACQ(&s->fd);
        if (LD_ACQ(&s->seq) == seq) {
            *slot_out = slot;
            *fd_out = fd;
            *pin_out = pin;
            return 0;
        }
    }
    pin_clear(pin);
    it_after_unpin(h, nodeid); /* our pin may have kept a remover from freeing it */
miss:
    FADD(&h->acquire_misses, 1);
    return -1;
}

/* ((fd + 1) << 32) | slot (fds are < 2^30 on Linux), -1 not found, -4 no room for a pin. */
int64_t it_pin(void *base, uint64_t nodeid) {
    uint32_t slot;
    int32_t fd;
    uint64_t *pin;
    int r = it_pin_internal(H(base), nodeid, &slot, &fd, &pin);
    if (r < 0) return r;
    return ((int64_t)(uint32_t)(fd + 1) << 32) | slot;
}

int it_unpin(void *base, uint64_t nodeid) { return unpin(H(base), nodeid); }

/* Is nodeid live (the guest holds it)?  Its slot, or -1; takes nothing. */
int64_t it_lookup(void *base, uint64_t nodeid) {
    hdr_t *h = H(base);
    uint32_t slot = nodeid_slot(h, nodeid);
    if (slot == NONE32 || nodeid == 0) return -1;
    islot_t *s = ISLOT(h, slot);
    for (unsigned spins = 0;; spins++) {
        uint32_t seq = LD_ACQ(&s->seq);
        if (seq & 1) return -1;
        int live = LD_ACQ(&s->nodeid) == nodeid && LD_ACQ(&s->lookups) != 0;
        FENCE();
        if (LD_ACQ(&s->seq) == seq) return live ? (int64_t)slot : -1;
    }
}

/* The guest's count went to 0 (lock taken here).  Returns 1 if it did, with *fd_out the fd
 * to close when the entry could be freed at once (nobody but `mine` pins it). */
static int it_remove(hdr_t *h, uint32_t slot, uint64_t nodeid, uint64_t n,
                     const uint64_t *mine, int32_t *fd_out) {
    islot_t *s = ISLOT(h, slot);
    int gone = 0;
    lock_acquire(h);
    set_intent(h, OP_REMOVE, slot, nodeid, s->fd);
    CRASH_POINT();
    uint64_t rc = LD_ACQ(&s->lookups);
    for (;;) {
        uint64_t nv = sat_sub(rc, n, 0);
        if (nv == rc) break;
        if (CAS(&s->lookups, &rc, nv)) { /* nv == 0 is the commit point */
            gone = nv == 0;
            break;
        }
    }
    if (gone) {
        CRASH_POINT();
        it_unindex_locked(h, slot);
        CRASH_POINT();
        clear_intent(h);
        if (!it_free_if_unpinned_locked(h, slot, nodeid, mine, fd_out)) h->deferred++;
    }
    clear_intent(h);
    lock_release(h);
    return gone;
}

/* FUSE FORGET / BATCH_FORGET / DESTROY: drop up to n of the guest's lookups (never the pins
 * of requests in flight).  1 when the last lookup went, 0 otherwise (unknown nodeid too),
 * -4 when this thread cannot pin. */
int it_forget(void *base, uint64_t nodeid, uint64_t n) {
    hdr_t *h = H(base);
    if (n == 0) return 0;
    uint32_t slot;
    int32_t fd = -1;
    uint64_t *pin;
    int r = it_pin_internal(h, nodeid, &slot, &fd, &pin);
    if (r < 0) return r == -4 ? -4 : 0;
    islot_t *s = ISLOT(h, slot);
    uint64_t floor = nodeid == ROOT_ID ? 1 : 0;
    int gone = 0;
    fd = -1;
    uint64_t rc = LD_ACQ(&s->lookups);
    for (;;) {
        uint64_t nv = sat_sub(rc, n, floor);
        if (nv == rc) break;
        if (nv == 0) {
            gone = it_remove(h, slot, nodeid, n, pin, &fd);
            break;
        }
        if (CAS(&s->lookups, &rc, nv)) break;
    }
    pin_clear(pin);
    close_fd(fd);
    /* Our pin may have kept another forget's remover from freeing it (or our own, when
     * another request pinned it too). */
    it_after_unpin(h, nodeid);
    return gone;
}

/* Under the lock: find a live entry by handle, else by ids (with an fd), and add one lookup.
 * Returns the slot or -1. */
static int64_t it_claim_locked(hdr_t *h, uint64_t ino, uint64_t dev, uint64_t mnt,
                               const uint8_t *hb, uint32_t hn, int32_t htype, uint64_t hmnt,
                               uint64_t ih, uint64_t hh) {
    uint64_t mask = isize(h) - 1;
    for (int pass = 0; pass < 2; pass++) {
        uint64_t hash;
        uint64_t *idx;
        if (pass == 0) {
            if (!hb) continue;
            hash = hh;
            idx = IDX(h, 3);
        } else {
            hash = ih;
            idx = IDX(h, 2);
        }
        uint32_t tag = tag_hash(hash);
        uint64_t i = hash & mask;
        for (uint64_t n = 0; n <= mask; n++, i = (i + 1) & mask) {
            uint64_t b = idx[i];
            uint32_t lo = (uint32_t)b;
            if (lo == 0) break;
            if (lo == TOMB || (uint32_t)(b >> 32) != tag) continue;
            uint32_t slot = lo - 1;
            islot_t *s = ISLOT(h, slot);
            if (!slot_indexed(s)) continue;
            if (pass == 0) {
                if (!handle_eq(s, hb, hn, htype, hmnt)) continue;
            } else {
                if (s->ino != ino || s->dev != dev || s->mnt_id != mnt || s->fd < 0) continue;
            }
            /* Indexed entries have lookups > 0, and only the lock holder takes them to 0. */
            FADD(&s->lookups, 1);
            return slot;
        }
    }
    return -1;
}

static int64_t it_insert_locked(hdr_t *h, uint64_t nodeid, uint64_t ino, uint64_t dev,
                                uint64_t mnt, const uint8_t *hb, uint32_t hn, int32_t htype,
                                uint64_t hmnt, int32_t fd, uint32_t mode, uint64_t parent,
                                const uint8_t *name, uint32_t name_len, uint64_t ih,
                                uint64_t hh) {
    uint32_t slot = h->free_head;
    if (slot == NONE32 && h->hwm >= h->capacity) {
        h->full_errors++;
        return -1;
    }
    maybe_rebuild(h, fd);
    if (slot == NONE32) slot = h->hwm;
    islot_t *s = ISLOT(h, slot);
    /* A nodeid names its slot and the slot's next generation, so it is never handed out
     * twice and a pin needs no index; a slot whose generations are used up is retired
     * when freed.  (Slots at hwm were never used: their generation is 0.) */
    uint32_t gen = s->gen;
    if (nodeid == 0) {
        gen++;
        nodeid = ((uint64_t)gen << 32) | slot;
        h->next_nodeid++;
    }
    set_intent(h, OP_INSERT, slot, nodeid, fd);
    CRASH_POINT();
    if (slot == h->hwm) {
        s->seq = 0;
        s->info_seq = 0;
        h->hwm = slot + 1;
    } else {
        h->free_head = s->next_free;
    }
    CRASH_POINT();
    ST_REL(&s->seq, s->seq + 1);
    s->gen = gen;
    s->next_free = NONE32;
    s->fd = fd;
    s->mode = mode;
    s->ino = ino;
    s->dev = dev;
    s->mnt_id = mnt;
    s->ids_hash = ih;
    s->has_handle = hb != NULL;
    s->handle_type = hb ? htype : 0;
    s->handle_bytes = hb ? hn : 0;
    s->handle_mnt_id = hb ? hmnt : 0;
    s->handle_hash = hb ? hh : 0;
    if (hb) memcpy(s->handle, hb, hn);
    s->parent = parent;
    s->name_len = name_len;
    if (name_len) memcpy(s->name, name, name_len);
    s->name[name_len] = 0;
    ST_REL(&s->nodeid, nodeid);
    CRASH_POINT();
    ST_REL(&s->lookups, 1ULL); /* last field: repair treats lookups != 0 as complete */
    CRASH_POINT();
    ST_REL(&s->seq, s->seq + 1);
    CRASH_POINT();
    idx_put(h, IDX(h, 2), 1, ih, tag_hash(ih), slot);
    CRASH_POINT();
    if (hb) {
        idx_put(h, IDX(h, 3), 2, hh, tag_hash(hh), slot);
        h->with_handle++;
    }
    h->entries++;
    h->inserts++;
    CRASH_POINT();
    if (nodeid == ROOT_ID) h->root_slot = slot;
    clear_intent(h);
    return slot;
}

static int args_ok(uint32_t hn, uint32_t name_len) {
    return hn <= MAX_HANDLE && name_len <= MAX_NAME;
}

int64_t it_insert_root(void *base, uint64_t ino, uint64_t dev, uint64_t mnt_id,
                       const char *handle, uint32_t handle_bytes, int32_t handle_type,
                       uint64_t handle_mnt_id, int32_t fd, uint32_t mode) {
    hdr_t *h = H(base);
    if (!args_ok(handle_bytes, 0)) return -3;
    const uint8_t *hb = (const uint8_t *)handle;
    uint64_t ih = hash_ids(ino, dev, mnt_id);
    uint64_t hh = hb ? hash_handle(hb, handle_bytes, handle_type, handle_mnt_id) : 0;
    lock_acquire(h);
    int64_t r;
    if (h->root_slot != NONE32)
        r = -2;
    else
        r = it_insert_locked(h, ROOT_ID, ino, dev, mnt_id, hb, handle_bytes, handle_type,
                             handle_mnt_id, fd, mode, 0, NULL, 0, ih, hh);
    lock_release(h);
    return r;
}

/* Live migration's destination: the entry the source had under `nodeid` (its slot and
 * generation), with the guest's lookup count. The supervisor restores before any worker
 * exists, in rising slot order, into a table that holds only the root: the slots skipped
 * on the way go on the free list as never used. (Not crash-safe like the other writers:
 * a destination that dies while loading is discarded by the migration anyway.) */
int it_restore(void *base, uint64_t nodeid, uint64_t lookups, uint64_t ino, uint64_t dev,
               uint64_t mnt_id, const char *handle, uint32_t handle_bytes,
               int32_t handle_type, uint64_t handle_mnt_id, int32_t fd, uint32_t mode,
               uint64_t parent, const char *name, uint32_t name_len) {
    hdr_t *h = H(base);
    uint32_t slot = (uint32_t)nodeid, gen = (uint32_t)(nodeid >> 32);
    if (!args_ok(handle_bytes, name_len) || gen == 0 || gen == GEN_MAX || lookups == 0)
        return -3;
    const uint8_t *hb = (const uint8_t *)handle;
    uint64_t ih = hash_ids(ino, dev, mnt_id);
    uint64_t hh = hb ? hash_handle(hb, handle_bytes, handle_type, handle_mnt_id) : 0;
    lock_acquire(h);
    int r = 0;
    if (slot < h->hwm || slot >= h->capacity) {
        r = -2;
    } else {
        while (h->hwm < slot) {  /* never used: generation 0, on the free list */
            islot_t *g = ISLOT(h, h->hwm);
            g->seq = g->info_seq = 0;
            g->gen = 0;
            ST_RLX(&g->nodeid, 0ULL);
            ST_RLX(&g->lookups, 0ULL);
            g->fd = -1;
            g->next_free = h->free_head;
            h->free_head = h->hwm;
            h->hwm++;
        }
        uint32_t free_head = h->free_head;
        h->free_head = NONE32;  /* so the insert takes the slot at hwm: ours */
        it_insert_locked(h, nodeid, ino, dev, mnt_id, hb, handle_bytes, handle_type,
                         handle_mnt_id, fd, mode, parent, (const uint8_t *)name, name_len,
                         ih, hh);
        h->free_head = free_head;
        islot_t *s = ISLOT(h, slot);
        s->gen = gen;
        ST_REL(&s->lookups, lookups);
    }
    lock_release(h);
    return r;
}

/* One lookup on the entry with this file handle, else these ids (among entries holding an
 * fd), or a new entry with lookups 1 that owns `fd`.  *nodeid_out is read under the lock:
 * once it is released a guest's FORGET may free the slot.  Returns 0 found (the caller
 * keeps its fd), 1 inserted, -1 table full, -3 bad arguments. */
int it_claim_or_insert(void *base, uint64_t ino, uint64_t dev, uint64_t mnt_id,
                       const char *handle, uint32_t handle_bytes, int32_t handle_type,
                       uint64_t handle_mnt_id, int32_t fd, uint32_t mode, uint64_t parent,
                       const char *name, uint32_t name_len, uint64_t *nodeid_out) {
    hdr_t *h = H(base);
    if (!args_ok(handle_bytes, name_len)) return -3;
    const uint8_t *hb = (const uint8_t *)handle;
    uint64_t ih = hash_ids(ino, dev, mnt_id);
    uint64_t hh = hb ? hash_handle(hb, handle_bytes, handle_type, handle_mnt_id) : 0;
    lock_acquire(h);
    set_intent(h, OP_CLAIM, NONE32, 0, fd);
    int64_t r = it_claim_locked(h, ino, dev, mnt_id, hb, handle_bytes, handle_type,
                                handle_mnt_id, ih, hh);
    CRASH_POINT();
    int ret;
    if (r >= 0) {
        h->lookups++;
        *nodeid_out = ISLOT(h, (uint32_t)r)->nodeid;
        ret = 0;
    } else {
        r = it_insert_locked(h, 0, ino, dev, mnt_id, hb, handle_bytes, handle_type,
                             handle_mnt_id, fd, mode, parent, (const uint8_t *)name,
                             name_len, ih, hh);
        ret = r >= 0 ? 1 : -1;
        if (r >= 0) *nodeid_out = ISLOT(h, (uint32_t)r)->nodeid;
    }
    clear_intent(h);
    lock_release(h);
    return ret;
}

/* claim_or_insert without the insert: one lookup on the entry that has this file handle
 * (when one is given) or these ids (among entries that hold an fd).  0 with *nodeid_out, or
 * -1 when there is none.  ino 0 matches no ids (a handle-only lookup). */
int it_claim(void *base, uint64_t ino, uint64_t dev, uint64_t mnt_id, const char *handle,
             uint32_t handle_bytes, int32_t handle_type, uint64_t handle_mnt_id,
             uint64_t *nodeid_out) {
    hdr_t *h = H(base);
    if (!args_ok(handle_bytes, 0)) return -3;
    const uint8_t *hb = (const uint8_t *)handle;
    uint64_t ih = hash_ids(ino, dev, mnt_id);
    uint64_t hh = hb ? hash_handle(hb, handle_bytes, handle_type, handle_mnt_id) : 0;
    lock_acquire(h);
    int64_t r = it_claim_locked(h, ino, dev, mnt_id, hb, handle_bytes, handle_type,
                                handle_mnt_id, ih, hh);
    if (r >= 0) {
        h->lookups++;
        *nodeid_out = ISLOT(h, (uint32_t)r)->nodeid;
    }
    lock_release(h);
    return r >= 0 ? 0 : -1;
}

int32_t it_fd(void *base, uint32_t slot) {
    hdr_t *h = H(base);
    return slot < h->capacity ? LD_ACQ(&ISLOT(h, slot)->fd) : -1;
}
uint64_t it_nodeid(void *base, uint32_t slot) {
    hdr_t *h = H(base);
    return slot < h->capacity ? LD_ACQ(&ISLOT(h, slot)->nodeid) : 0;
}
uint32_t it_hwm(void *base) { return LD_ACQ(&H(base)->hwm); }

/* The file handle of a slot the caller pins (so its identity cannot change meanwhile):
 * copies handle_bytes bytes into out (room for MAX_HANDLE) and returns their number, or -1
 * when the entry has no handle. */
int32_t it_handle_of(void *base, uint32_t slot, uint8_t *out, int32_t *handle_type) {
    hdr_t *h = H(base);
    if (slot >= h->capacity) return -1;
    islot_t *s = ISLOT(h, slot);
    uint32_t n = s->handle_bytes;
    if (!s->has_handle || n > MAX_HANDLE) return -1;
    memcpy(out, s->handle, n);
    *handle_type = s->handle_type;
    return (int32_t)n;
}

/* A reader that keeps seeing an odd seq may be looking at a slot whose writer died: after a
 * while, pass through the lock, which repairs the table if its holder is dead. */
static void reader_backoff(hdr_t *h, unsigned *spins) {
    if (++*spins % 4096 == 0) {
        lock_acquire(h);
        lock_release(h);
    } else {
        CPU_RELAX();
    }
}

/* Seqlock snapshot of one slot.  1 = live entry copied, 2 = an entry the guest no longer
 * holds, still pinned by a request in flight (copied too), 0 = free slot. */
int it_snapshot(void *base, uint32_t slot, it_entry_t *out) {
    hdr_t *h = H(base);
    if (slot >= LD_ACQ(&h->hwm)) return 0;
    islot_t *s = ISLOT(h, slot);
    unsigned spins = 0;
    for (;;) {
        uint32_t q1 = LD_ACQ(&s->seq), i1 = LD_ACQ(&s->info_seq);
        if ((q1 | i1) & 1) {
            reader_backoff(h, &spins);
            continue;
        }
        out->nodeid = LD_RLX(&s->nodeid);
        out->lookups = LD_RLX(&s->lookups);
        out->ino = s->ino;
        out->dev = s->dev;
        out->mnt_id = s->mnt_id;
        out->fd = s->fd;
        out->mode = s->mode;
        out->has_handle = (int32_t)s->has_handle;
        out->handle_type = s->handle_type;
        out->handle_bytes = s->handle_bytes;
        out->handle_mnt_id = s->handle_mnt_id;
        out->parent = s->parent;
        out->name_len = s->name_len;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (out->handle_bytes > MAX_HANDLE || out->name_len > MAX_NAME) goto retry;
        memcpy(out->handle, s->handle, out->handle_bytes);
        memcpy(out->name, s->name, out->name_len);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (LD_ACQ(&s->seq) == q1 && LD_ACQ(&s->info_seq) == i1)
            return out->nodeid == 0 ? 0 : out->lookups != 0 ? 1 : 2;
    retry:
        reader_backoff(h, &spins);
    }
}

/* Migration info (parent nodeid, name) of a live nodeid; -1 when it is not live. */
int it_set_info(void *base, uint64_t nodeid, uint64_t parent, const char *name,
                uint32_t name_len) {
    hdr_t *h = H(base);
    if (name_len > MAX_NAME) return -1;
    uint32_t slot = nodeid_slot(h, nodeid);
    if (slot == NONE32) return -1;
    islot_t *s = ISLOT(h, slot);
    lock_acquire(h);
    int r = -1;
    if (slot < h->hwm && s->nodeid == nodeid && slot_indexed(s)) {
        set_intent(h, OP_SETINFO, slot, s->nodeid, -1);
        ST_REL(&s->info_seq, s->info_seq + 1);
        CRASH_POINT();
        s->parent = parent;
        s->name_len = name_len;
        memcpy(s->name, name, name_len);
        s->name[name_len] = 0;
        ST_REL(&s->info_seq, s->info_seq + 1);
        clear_intent(h);
        r = 0;
    }
    lock_release(h);
    return r;
}

#define FAIL(...)                                    \
    do {                                             \
        snprintf(msg, msglen, __VA_ARGS__);          \
        lock_release(h);                             \
        return -1;                                   \
    } while (0)

/* Full consistency check (tests, stats command).  Takes the lock. */
int it_check(void *base, char *msg, size_t msglen) {
    hdr_t *h = H(base);
    lock_acquire(h);
    uint64_t mask = isize(h) - 1;
    if (h->intent_op != OP_NONE) FAIL("intent %u left set", h->intent_op);
    if (h->hwm > h->capacity) FAIL("hwm %u > capacity", h->hwm);
    if (h->key_bits > h->index_bits || h->key_bits < key_bits_for(h, h->hwm))
        FAIL("key index bits %u for hwm %u (room %u)", h->key_bits, h->hwm, h->index_bits);
    uint64_t used = 0, wh = 0, nfree = 0, retired = 0, dying = 0;
    for (uint32_t i = 0; i < h->hwm; i++) {
        islot_t *s = ISLOT(h, i);
        if ((s->seq | s->info_seq) & 1) FAIL("slot %u seq odd", i);
        if (slot_used(s)) {
            used++;
            int live = s->lookups != 0;
            if (!live) {
                dying++;
                if (s->nodeid == ROOT_ID) FAIL("root without a lookup");
                if (!pinned(h, s->nodeid, NULL))
                    FAIL("slot %u has no guest reference and no pin, but is not free", i);
            }
            if (s->nodeid != ROOT_ID &&
                (s->gen == 0 || s->nodeid != (((uint64_t)s->gen << 32) | i)))
                FAIL("slot %u nodeid %llu does not name it (generation %u)", i,
                     (unsigned long long)s->nodeid, s->gen);
            if (s->nodeid == ROOT_ID && h->root_slot != i) FAIL("root slot mismatch");
            if (live && s->has_handle) wh++;
            if (s->ids_hash != hash_ids(s->ino, s->dev, s->mnt_id)) FAIL("slot %u ids hash", i);
            /* each live slot is in every key index exactly once, a dying one in none, and
             * keys are unique among live slots */
            for (int k = 1; k < 3; k++) {
                if (k == 2 && !s->has_handle) continue;
                uint64_t *idx = IDX(h, k + 1);
                uint64_t hash = k == 1 ? s->ids_hash : s->handle_hash;
                uint64_t j = hash & mask;
                int found = 0;
                for (uint64_t n = 0; n <= mask; n++, j = (j + 1) & mask) {
                    uint32_t lo = (uint32_t)idx[j];
                    if (lo == 0) break;
                    if (lo == TOMB) continue;
                    islot_t *o = ISLOT(h, lo - 1);
                    if (lo - 1 == i) {
                        found++;
                        continue;
                    }
                    if (!live || !slot_indexed(o)) continue;
                    if (k == 1 && s->fd >= 0 && o->fd >= 0 && o->ino == s->ino &&
                        o->dev == s->dev && o->mnt_id == s->mnt_id)
                        FAIL("ids dup (with fd) slots %u %u", i, lo - 1);
                    if (k == 2 && handle_eq(o, s->handle, s->handle_bytes, s->handle_type,
                                            s->handle_mnt_id))
                        FAIL("handle dup slots %u %u", i, lo - 1);
                }
                if (found != (int)live) FAIL("slot %u found %d times in index %d", i, found, k);
            }
        } else {
            if (s->lookups != 0) FAIL("free slot %u lookups %llu", i,
                                      (unsigned long long)s->lookups);
            if (s->gen == GEN_MAX) retired++;
        }
    }
    if (retired != h->retired) FAIL("retired %llu != %u", (unsigned long long)retired,
                                    h->retired);
    if (used != h->entries) FAIL("entries %llu != used %llu", (unsigned long long)h->entries,
                                 (unsigned long long)used);
    if (dying != h->dying) FAIL("dying %llu != %llu", (unsigned long long)h->dying,
                                (unsigned long long)dying);
    if (wh != h->with_handle) FAIL("with_handle mismatch");
    for (uint32_t f = h->free_head; f != NONE32; f = ISLOT(h, f)->next_free) {
        if (f >= h->hwm) FAIL("free list slot %u >= hwm", f);
        if (slot_used(ISLOT(h, f))) FAIL("used slot %u on free list", f);
        if (ISLOT(h, f)->gen == GEN_MAX) FAIL("retired slot %u on free list", f);
        if (++nfree > h->hwm) FAIL("free list cycle");
    }
    if (nfree + used + retired != h->hwm)
        FAIL("free %llu + used %llu + retired %llu != hwm %u", (unsigned long long)nfree,
             (unsigned long long)used, (unsigned long long)retired, h->hwm);
    if (h->tombs[0] != 0) FAIL("nodeid tombstones %llu", (unsigned long long)h->tombs[0]);
    /* bucket counts and tombstone counters */
    for (int k = 1; k < 3; k++) {
        uint64_t *idx = IDX(h, k + 1);
        uint64_t nb = 0, tombs = 0;
        for (uint64_t j = 0; j <= mask; j++) {
            uint32_t lo = (uint32_t)idx[j];
            if (lo == TOMB)
                tombs++;
            else if (lo != 0) {
                if (lo - 1 >= h->hwm || !slot_indexed(ISLOT(h, lo - 1)))
                    FAIL("index %d bucket %llu -> slot %u that is not live", k,
                         (unsigned long long)j, lo - 1);
                nb++;
            }
        }
        if (nb != (k == 2 ? wh : used - dying)) FAIL("index %d has %llu buckets", k,
                                                     (unsigned long long)nb);
        if (tombs != h->tombs[k]) FAIL("index %d tombs %llu != %llu", k,
                                       (unsigned long long)tombs,
                                       (unsigned long long)h->tombs[k]);
    }
    lock_release(h);
    msg[0] = 0;
    return 0;
}

/* ================================================================ handle table */

uint64_t ht_segment_size(uint32_t capacity) {
    return align_up(HDR_SIZE + PINS_SIZE + (uint64_t)capacity * sizeof(hslot_t), 4096);
}

int ht_init(void *base, uint32_t capacity, uint32_t owner_pid) {
    if (capacity == 0 || capacity > 0x7FFFFFFFu) return -1;
    init_header(H(base), KIND_HANDLE, capacity, sizeof(hslot_t), 0, ht_segment_size(capacity),
                ht_segment_size(capacity), owner_pid);
    return 0;
}

static inline int hslot_used(hslot_t *s) { return LD_RLX(&s->busy) != 0; }

static void hslot_clear(hslot_t *s) {
    ST_REL(&s->seq, s->seq + 1);
    s->nodeid = 0;
    s->fd = -1;
    s->flags = 0;
    s->guest_open = 0;
    ST_REL(&s->busy, 0ULL);
    ST_REL(&s->seq, s->seq + 1);
}

static int32_t ht_free_locked(hdr_t *h, uint32_t slot) {
    hslot_t *s = HSLOT(h, slot);
    int32_t fd = s->fd;
    hslot_clear(s);
    CRASH_POINT();
    s->next_free = h->free_head;
    h->free_head = slot;
    h->entries--;
    __atomic_fetch_sub(&h->dying, 1, __ATOMIC_RELAXED);
    ST_REL(&h->removals, h->removals + 1);
    return fd;
}

/* The slot an fh names, or NONE32 for one no open can have made (generations are even and
 * >= 2, so fh 0 is never valid). */
static inline uint32_t fh_slot(hdr_t *h, uint64_t fh) {
    uint32_t slot = (uint32_t)fh, gen = (uint32_t)(fh >> 32);
    if ((gen & 1) || gen == 0 || slot >= LD_ACQ(&h->hwm)) return NONE32;
    return slot;
}

/* Free the slot of `fh` if the guest released it and nobody but the pin at `except` pins it
 * (lock held).  1 when freed, with *fd the fd to close; 0 when it stays. */
static int ht_free_if_unpinned_locked(hdr_t *h, uint32_t slot, uint64_t fh,
                                      const uint64_t *except, int32_t *fd) {
    hslot_t *s = HSLOT(h, slot);
    *fd = -1;
    if (slot >= h->hwm || s->seq != (uint32_t)(fh >> 32) || !s->busy || s->guest_open ||
        pinned(h, fh, except))
        return 0;
    set_intent(h, OP_FREE, slot, fh, s->fd);
    CRASH_POINT();
    *fd = ht_free_locked(h, slot);
    CRASH_POINT();
    clear_intent(h);
    return 1;
}

static void ht_rebuild(hdr_t *h) {
    uint64_t used = 0, dying = 0;
    uint32_t head = NONE32;
    if (h->hwm > h->capacity) h->hwm = h->capacity;
    for (uint32_t i = h->hwm; i-- > 0;) {
        hslot_t *s = HSLOT(h, i);
        if (s->seq & 1) s->seq++;
        if (hslot_used(s)) {
            used++;
            dying += !s->guest_open;
        } else {
            s->next_free = head;
            head = i;
        }
    }
    h->free_head = head;
    h->entries = used;
    h->dying = dying;
    h->rebuilds++;
    for (uint32_t i = 0; dying && i < h->hwm; i++) {
        hslot_t *s = HSLOT(h, i);
        if (hslot_used(s) && !s->guest_open) {
            dying--;
            int32_t fd;
            if (ht_free_if_unpinned_locked(h, i, ((uint64_t)s->seq << 32) | i, NULL, &fd))
                add_orphan(h, fd);
        }
    }
}

static void ht_repair(hdr_t *h) {
    uint32_t op = h->intent_op, slot = h->intent_slot;
    hslot_t *s = (slot < h->hwm) ? HSLOT(h, slot) : NULL;
    if (op == OP_OPEN && s) {
        if (LD_ACQ(&s->busy) == 0) {
            hslot_clear(s);
            if (s->seq & 1) s->seq++;
            add_orphan(h, h->intent_fd);
        } else {
            if (s->seq & 1) s->seq++;
            s->guest_open = 0; /* the guest never learnt this fh: ht_rebuild frees it */
        }
    } else if (op == OP_OPEN) {
        add_orphan(h, h->intent_fd); /* died before a fresh slot joined the table */
    } else if (op == OP_FREE && s) {
        if ((s->seq & 1) || s->seq != (uint32_t)(h->intent_nodeid >> 32)) {
            /* Past the start of the clear: finish it; the fd was not closed yet. */
            hslot_clear(s);
            if (s->seq & 1) s->seq++;
            add_orphan(h, h->intent_fd);
        }
    }
    clear_intent(h);
    ht_rebuild(h);
}

/* Returns fh, or 0 when the table is full (0 is never a valid fh: live generations are
 * even and >= 2). */
uint64_t ht_open(void *base, uint64_t nodeid, int32_t fd, uint32_t flags) {
    hdr_t *h = H(base);
    lock_acquire(h);
    uint32_t slot = h->free_head;
    if (slot == NONE32 && h->hwm >= h->capacity) {
        h->full_errors++;
        lock_release(h);
        return 0;
    }
    if (slot == NONE32) slot = h->hwm;
    set_intent(h, OP_OPEN, slot, nodeid, fd);
    CRASH_POINT();
    hslot_t *s = HSLOT(h, slot);
    if (slot == h->hwm) {
        s->seq = 0;
        h->hwm = slot + 1;
    } else {
        h->free_head = s->next_free;
    }
    CRASH_POINT();
    ST_REL(&s->seq, s->seq + 1);
    s->next_free = NONE32;
    s->nodeid = nodeid;
    s->fd = fd;
    s->flags = flags;
    s->guest_open = 1;
    CRASH_POINT();
    ST_REL(&s->busy, 1ULL);
    CRASH_POINT();
    uint32_t gen = s->seq + 1;
    ST_REL(&s->seq, gen);
    h->entries++;
    h->inserts++;
    CRASH_POINT();
    clear_intent(h);
    lock_release(h);
    return ((uint64_t)gen << 32) | slot;
}

/* Live migration's destination: an open file under the fh the source gave it (slot and
 * generation), like it_restore: rising slots, before any worker exists. */
int ht_restore(void *base, uint64_t fh, uint64_t nodeid, int32_t fd, uint32_t flags) {
    hdr_t *h = H(base);
    uint32_t slot = (uint32_t)fh, seq = (uint32_t)(fh >> 32);
    if (seq < 2 || (seq & 1)) return -3;
    lock_acquire(h);
    int r = 0;
    if (slot < h->hwm || slot >= h->capacity) {
        r = -2;
    } else {
        while (h->hwm < slot) {  /* never used: on the free list */
            hslot_t *g = HSLOT(h, h->hwm);
            g->seq = 0;
            g->busy = 0;
            g->guest_open = 0;
            g->next_free = h->free_head;
            h->free_head = h->hwm;
            h->hwm++;
        }
        hslot_t *s = HSLOT(h, slot);
        s->next_free = NONE32;
        s->nodeid = nodeid;
        s->fd = fd;
        s->flags = flags;
        s->guest_open = 1;
        ST_REL(&s->busy, 1ULL);
        ST_REL(&s->seq, seq);
        h->hwm = slot + 1;
        h->entries++;
        h->inserts++;
    }
    lock_release(h);
    return r;
}

/* Live migration's source: the live entries but the root, in rising slot order, as the
 * device state's columns (at most max; names and handles concatenated, handles only when
 * `handles` is not NULL). The count, or -1 when a column or buffer is too small. */
int64_t it_export(void *base, uint32_t max, uint64_t *nodeid, uint64_t *lookups,
                  uint64_t *parent, uint32_t *mode, int32_t *fd, uint16_t *name_len,
                  uint8_t *names, uint64_t names_cap, uint16_t *handle_len,
                  int32_t *handle_type, uint8_t *handles, uint64_t handles_cap) {
    hdr_t *h = H(base);
    uint32_t hwm = LD_ACQ(&h->hwm);
    uint64_t n = 0, names_at = 0, handles_at = 0;
    it_entry_t e;
    for (uint32_t slot = 0; slot < hwm; slot++) {
        if (it_snapshot(base, slot, &e) != 1 || e.nodeid == 1) continue;
        if (n >= max || names_at + e.name_len > names_cap ||
            (handles && e.has_handle && handles_at + e.handle_bytes > handles_cap))
            return -1;
        nodeid[n] = e.nodeid;
        lookups[n] = e.lookups;
        parent[n] = e.parent;
        mode[n] = e.mode;
        fd[n] = e.fd;
        name_len[n] = (uint16_t)e.name_len;
        memcpy(names + names_at, e.name, e.name_len);
        names_at += e.name_len;
        handle_len[n] = 0;
        handle_type[n] = 0;
        if (handles && e.has_handle) {
            handle_len[n] = (uint16_t)e.handle_bytes;
            handle_type[n] = e.handle_type;
            memcpy(handles + handles_at, e.handle, e.handle_bytes);
            handles_at += e.handle_bytes;
        }
        n++;
    }
    return (int64_t)n;
}

/* Live migration's destination: it_restore for n entries given as columns (handles and
 * names concatenated; handle_len 0: none; the handle's mount is the entry's mnt_id).
 * status[i]: it_restore's result. Returns the number restored. */
uint32_t it_restore_many(void *base, uint32_t n, const uint64_t *nodeid,
                         const uint64_t *lookups, const uint64_t *ino, const uint64_t *dev,
                         const uint64_t *mnt_id, const uint8_t *handles,
                         const uint16_t *handle_len, const int32_t *handle_type,
                         const int32_t *fd, const uint32_t *mode, const uint64_t *parent,
                         const uint8_t *names, const uint16_t *name_len, int32_t *status) {
    uint64_t names_at = 0, handles_at = 0;
    uint32_t done = 0;
    for (uint32_t i = 0; i < n; i++) {
        const char *hb = handle_len[i] ? (const char *)handles + handles_at : NULL;
        status[i] = it_restore(base, nodeid[i], lookups[i], ino[i], dev[i], mnt_id[i], hb,
                               handle_len[i], handle_type[i], mnt_id[i], fd[i], mode[i],
                               parent[i], (const char *)names + names_at, name_len[i]);
        if (status[i] == 0) done++;
        handles_at += handle_len[i];
        names_at += name_len[i];
    }
    return done;
}

static void ht_after_unpin(hdr_t *h, uint64_t fh) {
    uint32_t slot = fh_slot(h, fh);
    if (slot == NONE32) return;
    hslot_t *s = HSLOT(h, slot);
    if (LD_ACQ(&s->seq) != (uint32_t)(fh >> 32) || LD_ACQ(&s->guest_open) ||
        !LD_ACQ(&s->busy))
        return;
    int32_t fd;
    lock_acquire(h);
    ht_free_if_unpinned_locked(h, slot, fh, NULL, &fd);
    lock_release(h);
    close_fd(fd);
}

/* Pin an open file for this thread (lock-free; never one the guest released). */
static int ht_pin_internal(hdr_t *h, uint64_t fh, uint32_t *slot_out, int32_t *fd_out,
                           uint64_t **pin_out) {
    uint32_t slot = fh_slot(h, fh);
    if (slot == NONE32) goto miss;
    pinrow_t *row = my_row(h);
    uint64_t *pin = row ? pin_put(row, fh) : NULL;
    if (!pin) {
        FADD(&h->pin_full, 1);
        return -4;
    }
    hslot_t *s = HSLOT(h, slot);
    uint32_t gen = (uint32_t)(fh >> 32);
    if (LD_ACQ(&s->seq) == gen && LD_ACQ(&s->guest_open)) {
        int32_t fd = LD_ACQ(&s->fd);
        if (LD_ACQ(&s->seq) == gen) {
            *slot_out = slot;
            *fd_out = fd;
            *pin_out = pin;
            return 0;
        }
    }
    pin_clear(pin);
    ht_after_unpin(h, fh);
miss:
    FADD(&h->acquire_misses, 1);
    return -1;
}

/* ((fd + 1) << 32) | slot, -1 not open, -4 no room for a pin, -5 open but broken (a
 * migration could not carry its lock over: every request but RELEASE answers EIO). */
int64_t ht_pin(void *base, uint64_t fh) {
    uint32_t slot;
    int32_t fd;
    uint64_t *pin;
    hdr_t *h = H(base);
    int r = ht_pin_internal(h, fh, &slot, &fd, &pin);
    if (r < 0) return r;
    if (LD_ACQ(&HSLOT(h, slot)->flags) & HT_BROKEN) {
        unpin(h, fh);
        return -5;
    }
    return ((int64_t)(uint32_t)(fd + 1) << 32) | slot;
}

/* Mark an open file broken (see ht_pin): 0, or -1 when fh is not open. */
int ht_set_broken(void *base, uint64_t fh) {
    hdr_t *h = H(base);
    uint32_t slot;
    int32_t fd;
    uint64_t *pin;
    int r = ht_pin_internal(h, fh, &slot, &fd, &pin);
    if (r < 0) return -1;
    __atomic_fetch_or(&HSLOT(h, slot)->flags, HT_BROKEN, __ATOMIC_RELEASE);
    unpin(h, fh);
    return 0;
}

int ht_unpin(void *base, uint64_t fh) { return unpin(H(base), fh); }

/* The guest's RELEASE: drop its reference, once per fh however many RELEASEs arrive; the fd
 * is closed now or by the last request still using it.  1 when this call dropped it, 0 when
 * the fh was not open, -4 when this thread cannot pin. */
int ht_close(void *base, uint64_t fh) {
    hdr_t *h = H(base);
    uint32_t slot;
    int32_t fd;
    uint64_t *pin;
    int r = ht_pin_internal(h, fh, &slot, &fd, &pin);
    if (r < 0) return r == -4 ? -4 : 0;
    hslot_t *s = HSLOT(h, slot);
    uint32_t one = 1;
    fd = -1;
    /* The commit point, under the lock (as an inode's last lookup goes): if we die right
     * after it, whoever takes the lock over recounts `dying` from the slots.  Our pin holds
     * the slot; a duplicate RELEASE that loses the CAS is the only one taking the lock for
     * nothing. */
    lock_acquire(h);
    int dropped = CAS(&s->guest_open, &one, 0u);
    if (dropped) {
        CRASH_POINT();
        FADD(&h->dying, 1);
        if (!ht_free_if_unpinned_locked(h, slot, fh, pin, &fd) && s->seq == (uint32_t)(fh >> 32))
            h->deferred++;
    }
    lock_release(h);
    pin_clear(pin);
    close_fd(fd);
    ht_after_unpin(h, fh);
    return dropped;
}

int32_t ht_fd(void *base, uint32_t slot) {
    hdr_t *h = H(base);
    return slot < h->capacity ? LD_ACQ(&HSLOT(h, slot)->fd) : -1;
}
uint32_t ht_hwm(void *base) { return LD_ACQ(&H(base)->hwm); }

/* 1 = open file copied, 2 = released by the guest but still pinned, 0 = free slot. */
int ht_snapshot(void *base, uint32_t slot, ht_entry_t *out) {
    hdr_t *h = H(base);
    if (slot >= LD_ACQ(&h->hwm)) return 0;
    hslot_t *s = HSLOT(h, slot);
    unsigned spins = 0;
    for (;;) {
        uint32_t q = LD_ACQ(&s->seq);
        if (q & 1) {
            reader_backoff(h, &spins);
            continue;
        }
        out->fh = ((uint64_t)q << 32) | slot;
        uint64_t busy = LD_RLX(&s->busy);
        out->nodeid = s->nodeid;
        out->fd = s->fd;
        out->flags = s->flags;
        out->guest_open = LD_RLX(&s->guest_open);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (LD_ACQ(&s->seq) == q) return !busy ? 0 : out->guest_open ? 1 : 2;
        reader_backoff(h, &spins);
    }
}

int ht_check(void *base, char *msg, size_t msglen) {
    hdr_t *h = H(base);
    lock_acquire(h);
    if (h->intent_op != OP_NONE) FAIL("intent %u left set", h->intent_op);
    if (h->hwm > h->capacity) FAIL("hwm > capacity");
    uint64_t used = 0, nfree = 0, dying = 0;
    for (uint32_t i = 0; i < h->hwm; i++) {
        hslot_t *s = HSLOT(h, i);
        if (s->seq & 1) FAIL("slot %u seq odd", i);
        if (hslot_used(s)) {
            used++;
            if (s->seq == 0) FAIL("used slot %u with generation 0", i);
            if (!s->guest_open) {
                dying++;
                if (!pinned(h, ((uint64_t)s->seq << 32) | i, NULL))
                    FAIL("slot %u released and unpinned, but not free", i);
            }
        } else if (s->guest_open) {
            FAIL("free slot %u marked open", i);
        }
    }
    if (used != h->entries) FAIL("entries %llu != used %llu", (unsigned long long)h->entries,
                                 (unsigned long long)used);
    if (dying != LD_RLX(&h->dying)) FAIL("dying %llu != %llu", (unsigned long long)h->dying,
                                         (unsigned long long)dying);
    for (uint32_t f = h->free_head; f != NONE32; f = HSLOT(h, f)->next_free) {
        if (f >= h->hwm) FAIL("free list slot %u >= hwm", f);
        if (hslot_used(HSLOT(h, f))) FAIL("used slot %u on free list", f);
        if (++nfree > h->hwm) FAIL("free list cycle");
    }
    if (nfree + used != h->hwm) FAIL("free + used != hwm");
    lock_release(h);
    msg[0] = 0;
    return 0;
}

/* ================================================================ after a worker died */

/* Free every entry the guest let go of that no pin names, closing its fd (lock held).  Only a
 * thread killed between dropping an entry's last pin and freeing it leaves one behind: it
 * has no pin left for reap_rows to give back.  A live thread in that window that finds the
 * entry gone when it gets the lock does nothing. */
static void sweep_locked(hdr_t *h) {
    if (LD_RLX(&h->dying) == 0) return;
    for (uint32_t i = 0; i < h->hwm; i++) {
        int32_t fd = -1;
        if (h->kind == KIND_INODE) {
            islot_t *s = ISLOT(h, i);
            if (slot_used(s) && s->lookups == 0)
                it_free_if_unpinned_locked(h, i, s->nodeid, NULL, &fd);
        } else {
            hslot_t *s = HSLOT(h, i);
            if (hslot_used(s) && !s->guest_open)
                ht_free_if_unpinned_locked(h, i, ((uint64_t)s->seq << 32) | i, NULL, &fd);
        }
        close_fd(fd);
    }
}

/* The supervisor, when a worker died (while it is a zombie): give back the pins of dead
 * threads, then free what they left unpinned.  Returns the rows freed. */
int seg_reap_pins(void *base) {
    hdr_t *h = H(base);
    int freed = (int)reap_rows(h);
    lock_acquire(h);
    sweep_locked(h);
    lock_release(h);
    return freed;
}
