/* The worker's wait/drain/notify loop: wait for a kick, pop, answer, push, all in C while
 * requests are ones pyvfs_fast answers, so a wake-up costs no Python. */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define now_ns pyvfs_now_ns

/* While draining, the control socket is looked at every CONTROL_CHECK_NS: a ring the guest
 * keeps full must not keep the supervisor waiting (it kills a worker silent for 0.5 s).
 * drain returns 0 early when a look is due, with the ring not empty. */
#define CONTROL_CHECK_NS 10000000u
static uint64_t control_check_at;  /* one serve loop per worker process */

/* Pop chains until the ring is empty (0) or one needs Python: 1 = a walked chain in
 * rd/wr (*head), for QueueWorker.handle_chain; 2 + k = a malformed chain at *head (walk
 * error -1 - k, detail filled), to be completed with length 0; -1 = the avail index jumped
 * by more than the ring size. Requests answered here are pushed; *answered counts them.
 * fast == 0: only pop (debug logging: every request goes to Python). With EVENT_IDX each
 * answer is signalled on call_fd as soon as the driver's used_event asks for it. */
static int drain(pyvfs_queue_t *q, pyvfs_iov_t *rd, pyvfs_iov_t *wr, int *counts,
                 uint64_t *lens, uint64_t *detail, uint32_t *head, int max_iov,
                 const pyvfs_fast_ctx_t *c, int fast, int call_fd, uint32_t *answered) {
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
        pyvfs_inflight_popped(q, h);  /* before it acts: a successor re-serves it */
        *head = h;
        /* the latency's start; right after an answer, that answer's clock read stands
           for it (one read a request instead of two while the ring stays busy) */
        if (pyvfs_stats_row) pyvfs_stats_popped_ns = done ? pyvfs_stats_noted_ns : now_ns();
        int w = pyvfs_walk_chain(q->desc, q->size, h, q->indirect, q->regions, q->nregions,
                                 rd, &counts[0], &lens[0], wr, &counts[1], &lens[1], max_iov,
                                 detail);
        if (w) { /* malformed: Python logs it and completes it with length 0 */
            if (pyvfs_stats_row) pyvfs_bump(&pyvfs_stats_row->dropped, 1);
            rc = 1 - w;
            break;
        }
        uint32_t written = 0;
        if (fast && pyvfs_fast(rd, counts[0], lens[0], wr, counts[1], lens[1], c, &written)) {
            pyvfs_stats_note(rd, counts[0], wr, counts[1], written, 1);
            pyvfs_queue_push_signal(q, h, written, wr, counts[1], call_fd);
            done++;
            continue;
        }
        rc = 1;
        break;
    }
    *answered = done;
    return rc;
}

/* The worker's whole wait-and-serve loop while requests are fast-path ones, so a wake-up
 * costs no Python: epoll_wait on the kick eventfd and the control socket, read the kick,
 * drain the ring with notifications off, re-arm them (draining again if work slipped in),
 * signal the call eventfd when the driver asks (with EVENT_IDX right after the push the
 * driver's used_event names, else once the batch is drained). s->flags carries the loop's state between
 * calls. Returns PYVFS_SERVE_CHAIN (a walked chain at *head for Python: answer and push
 * it, set PYVFS_PUSHED, call again), a malformed chain or a jumped avail index exactly as
 * drain, PYVFS_SERVE_CONTROL (the control socket is readable) or
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
            pyvfs_fdc_sweep(c);
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
            if (pyvfs_stats_row) pyvfs_bump(&pyvfs_stats_row->wakeups, 1);
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
        int r = drain(q, rd, wr, counts, lens, detail, head, max_iov, c, s->fast,
                      s->call_fd, &answered);
        if (answered) s->flags |= PYVFS_PUSHED;
        if (r != 0) return r;  /* flags keep DRAINING: the next call goes on draining */
        if (s->poll_ns && (s->flags & PYVFS_PUSHED)) {
            /* hand the guest its answers now, then poll a moment for more before paying
               for a kick and a wake-up (--poll-us) */
            pyvfs_queue_notify(q, s->call_fd);
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
        if (s->flags & PYVFS_PUSHED) pyvfs_queue_notify(q, s->call_fd);
        s->flags &= ~PYVFS_PUSHED;
    }
}
