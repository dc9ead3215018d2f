/* In-flight records (pyvfs.h, "inflight.c"): what a ring's worker popped and has not
 * answered yet, kept in shared memory at every pop, park and push, so that whoever serves
 * the ring next (a restarted worker, the worker of an upgraded daemon) re-serves exactly
 * those requests and none that was answered. Each record is one 64-bit word written with
 * one store, so a worker killed between two instructions leaves either the old or the new
 * record, never half of one; the used index kept in a record tells at recovery whether
 * the push that was to follow it happened (workers/inflight.py, InflightRecords.recover). */
#include <string.h>

#include "internal.h"

static inline pyvfs_inflight_t *record(const pyvfs_queue_t *q) {
    return (pyvfs_inflight_t *)(uintptr_t)q->inflight;
}

static inline void store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* after the used index store: the request at head is answered */
void pyvfs_inflight_pushed(pyvfs_queue_t *q, uint32_t head) {
    pyvfs_inflight_t *r = record(q);
    uint64_t cur = __atomic_load_n(&r->current, __ATOMIC_RELAXED);
    if ((cur & PYVFS_INFLIGHT_BUSY) && ((cur >> 16) & 0xFFFF) == (head & 0xFFFF))
        store(&r->current, q->last_avail);
    else if (head < PYVFS_INFLIGHT_HEADS && r->heads[head])
        store(&r->heads[head], 0);
}

void pyvfs_inflight_park(pyvfs_queue_t *q, uint32_t head) {
    pyvfs_inflight_t *r = record(q);
    if (!r || head >= PYVFS_INFLIGHT_HEADS) return;
    store(&r->heads[head], PYVFS_INFLIGHT_PARKED);  /* first: the request is never unrecorded */
    uint64_t cur = __atomic_load_n(&r->current, __ATOMIC_RELAXED);
    if ((cur & PYVFS_INFLIGHT_BUSY) && ((cur >> 16) & 0xFFFF) == head)
        store(&r->current, q->last_avail);
}

void pyvfs_inflight_completing(pyvfs_queue_t *q, uint32_t head) {
    pyvfs_inflight_t *r = record(q);
    if (!r || head >= PYVFS_INFLIGHT_HEADS) return;
    store(&r->heads[head], PYVFS_INFLIGHT_PARKED | PYVFS_INFLIGHT_COMPLETING
          | (uint64_t)q->used_idx << 32);
}

/* Only the ring's own heads are cleared: a head is a descriptor index, below the ring's
   size, and recovery reads no other. Clearing all 32768 wrote 256 KiB of shared memory
   per ring, which every ring then kept (the records' pages are allocated when written). */
void pyvfs_inflight_reset(pyvfs_inflight_t *r, uint16_t last_avail, uint32_t size) {
    if (size > PYVFS_INFLIGHT_HEADS) size = PYVFS_INFLIGHT_HEADS;
    memset(r->heads, 0, size * sizeof r->heads[0]);
    store(&r->current, last_avail);
}
