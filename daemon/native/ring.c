/* The split ring's device side (virtio 1.x 2.7): pushing used entries, and the
 * notifications (2.7.7 / 2.7.10): the used ring's flags or avail_event, and whether the
 * driver wants an interrupt for what was pushed since the last decision. The state,
 * pyvfs_queue_t, is shared by Python's SplitQueue (daemon/guest/virtqueue.py) and the
 * serve loop (serve.c). */
#include <unistd.h>

#include "internal.h"

/* Dirty logging (vhost-user "Migration"): bit (gpa / 4096) of the log, set with an atomic
 * OR since every worker marks the same log. Pages past the log's end are not tracked by
 * the front-end (it sized the log for all of guest memory). */
#define LOG_PAGE_SHIFT 12

static void log_gpa(const pyvfs_queue_t *q, uint64_t gpa, uint64_t len) {
    if (!len) return;
    uint64_t last = (gpa + len - 1) >> LOG_PAGE_SHIFT;
    for (uint64_t page = gpa >> LOG_PAGE_SHIFT; page <= last; page++) {
        uint64_t byte = page >> 3;
        if (byte >= q->log_size) return;
        __atomic_fetch_or((uint8_t *)(uintptr_t)(q->log + byte),
                          (uint8_t)(1u << (page & 7)), __ATOMIC_RELAXED);
    }
}

/* The guest-physical range of a host range inside one region (a chain's ranges are split
   at region borders when walked). */
static void log_host(const pyvfs_queue_t *q, uint64_t host, uint64_t len) {
    for (int i = 0; i < q->nregions; i++) {
        const pyvfs_region_t *r = &q->regions[i];
        if (host >= r->host && host - r->host < r->size) {
            log_gpa(q, r->gpa + (host - r->host), len);
            return;
        }
    }
}

void pyvfs_log_iov(const pyvfs_queue_t *q, const pyvfs_iov_t *iov, int n, uint64_t len) {
    if (!q->log) return;
    for (int i = 0; i < n && len; i++) {
        uint64_t take = iov[i].len < len ? iov[i].len : len;
        log_host(q, iov[i].base, take);
        len -= take;
    }
}

/* a write to the used ring at offset off, length len */
static inline void log_used(const pyvfs_queue_t *q, uint64_t off, uint64_t len) {
    if (q->log) log_gpa(q, q->used_gpa + off, len);
}

void pyvfs_queue_push(pyvfs_queue_t *q, uint32_t head, uint32_t len,
                      const pyvfs_iov_t *wr, int wr_n) {
    uint64_t off = 4 + 8 * (uint64_t)(q->used_idx % q->size);
    uint32_t *e = (uint32_t *)(uintptr_t)(q->used + off);
    e[0] = head;
    e[1] = len;
    q->used_idx++;
    if (q->log) {  /* before the index store: the front-end syncs the log after a stop */
        pyvfs_log_iov(q, wr, wr_n, len);
        log_used(q, off, 8);
        log_used(q, 2, 2);
    }
    __atomic_store_n((uint16_t *)(uintptr_t)(q->used + 2), q->used_idx, __ATOMIC_RELEASE);
    if (q->inflight) pyvfs_inflight_pushed(q, head);
}

/* With EVENT_IDX the driver names, in used_event, the used entry it wants an interrupt for
 * (Linux: the next one, set before it sleeps); the device signals as soon as it writes
 * that entry (virtio 1.x 2.7.10), not at the end of its batch, so the driver takes its
 * completions while the worker answers the rest instead of the two taking turns. The
 * check is a fence and a load; the write(2) to the eventfd (~1 us) happens only when the
 * driver asks, once per time it went to sleep. Without EVENT_IDX a driver that left
 * interrupts on would get one per entry: those are signalled per drained batch by the
 * serve loop instead (the flag is read when the batch ends). */
void pyvfs_queue_push_signal(pyvfs_queue_t *q, uint32_t head, uint32_t len,
                             const pyvfs_iov_t *wr, int wr_n, int call_fd) {
    pyvfs_queue_push(q, head, len, wr, wr_n);
    if (q->event_idx) pyvfs_queue_notify(q, call_fd);
}

void pyvfs_queue_disable(pyvfs_queue_t *q) {
    if (!q->event_idx) {
        __atomic_store_n((uint16_t *)(uintptr_t)q->used, 1, __ATOMIC_RELAXED);
        log_used(q, 0, 2);
    }
}

int pyvfs_queue_enable(pyvfs_queue_t *q) {
    if (q->event_idx) {
        __atomic_store_n((uint16_t *)(uintptr_t)(q->used + 4 + 8 * (uint64_t)q->size),
                         q->last_avail, __ATOMIC_RELAXED);
        log_used(q, 4 + 8 * (uint64_t)q->size, 2);
    } else {
        __atomic_store_n((uint16_t *)(uintptr_t)q->used, 0, __ATOMIC_RELAXED);
        log_used(q, 0, 2);
    }
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

void pyvfs_queue_notify(pyvfs_queue_t *q, int call_fd) {
    static const uint64_t one = 1;
    if (call_fd >= 0 && pyvfs_queue_should_notify(q)) {
        if (write(call_fd, &one, sizeof one) < 0) {
            /* the front-end's eventfd is gone or full: nothing to do but go on */
        } else if (pyvfs_stats_row) {
            pyvfs_bump(&pyvfs_stats_row->notifies, 1);
        }
    }
}
