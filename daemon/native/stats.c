/* Per-queue counters for `pyvirtiofsd stats` (daemon/stats/queue_stats.py): a row per
 * queue in a shared segment. Only that queue's worker writes its row (relaxed stores of
 * aligned words: readers in other processes see whole values), so counting costs no
 * atomics; the row outlives a worker that is restarted. One worker serves one queue, so
 * the row is a process-wide pointer. Per opcode: requests, errors, reply bytes and a
 * latency histogram (pop to reply: a vDSO clock read at each, no system call; a pop right
 * after an answer in the C loop reuses that answer's read). */
#include <linux/fuse.h>
#include <string.h>

#include "internal.h"

pyvfs_qstats_t *pyvfs_stats_row;
uint64_t pyvfs_stats_popped_ns, pyvfs_stats_noted_ns;

/* The bucket of a latency: 0 for <= 1 us, b for <= 2^b us, the last for > 2^16 us. */
static inline int latency_bucket(uint64_t ns) {
    uint64_t us = (ns + 999) / 1000; /* rounded up: the bucket bound is inclusive */
    if (us <= 1) return 0;
    int b = 64 - __builtin_clzll(us - 1);
    return b < PYVFS_STATS_BUCKETS - 1 ? b : PYVFS_STATS_BUCKETS - 1;
}

void pyvfs_stats_attach(pyvfs_qstats_t *row) { pyvfs_stats_row = row; }

/* A request answered (written > 0) or taken without a reply (written == 0): its opcode
 * from the request, its errno and data bytes from the reply it got. */
void pyvfs_stats_note(const pyvfs_iov_t *rd, int rd_n, const pyvfs_iov_t *wr, int wr_n,
                      uint32_t written, int in_c) {
    pyvfs_qstats_t *s = pyvfs_stats_row;
    if (!s) return;
    uint32_t op = 0;
    if (rd_n > 0 && rd[0].len >= 8) { /* the usual case: the header in one descriptor */
        memcpy(&op, (const char *)(uintptr_t)rd[0].base + 4, sizeof op);
    } else {
        uint32_t hdr[2] = {0, 0}; /* len, opcode */
        if (pyvfs_iov_read(rd, rd_n, 0, hdr, sizeof hdr) == sizeof hdr) op = hdr[1];
    }
    uint64_t now = pyvfs_now_ns(), ns = now - pyvfs_stats_popped_ns;
    pyvfs_stats_noted_ns = now;
    pyvfs_opstats_t *o = &s->by_opcode[op < PYVFS_STATS_OPCODES ? op : 0];
    pyvfs_bump(&s->requests, 1);
    if (in_c) pyvfs_bump(&s->in_c, 1);
    pyvfs_bump(&o->requests, 1);
    pyvfs_bump(&o->reply_bytes, written);
    pyvfs_bump(&o->latency_ns, ns);
    pyvfs_bump(&o->latency[latency_bucket(ns)], 1);
    if (written < sizeof(struct fuse_out_header)) return;
    struct fuse_out_header out = {0};
    if (wr_n > 0 && wr[0].len >= sizeof out)
        memcpy(&out, (const void *)(uintptr_t)wr[0].base, sizeof out);
    else
        pyvfs_iov_read(wr, wr_n, 0, &out, sizeof out);
    if (out.error != 0) {
        pyvfs_bump(&s->errors, 1);
        pyvfs_bump(&o->errors, 1);
    } else if (op == FUSE_READ) {
        pyvfs_bump(&s->read_bytes, written - sizeof out);
    } else if (op == FUSE_WRITE && written >= sizeof out + sizeof(uint32_t)) {
        uint32_t size = 0;
        pyvfs_iov_read(wr, wr_n, sizeof out, &size, sizeof size);
        pyvfs_bump(&s->write_bytes, size);
    }
}
