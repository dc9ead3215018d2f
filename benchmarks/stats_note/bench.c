/* The cost of counting one request (benchmarks/stats_note/run.sh): pyvfs_stats_note on a
 * GETATTR answered in C, with the pop-side clock read of the serve loop (NEW: its read
 * reused 7 times in 8, as in a busy drain). Not a test: numbers for docs/design.md. */
#include <linux/fuse.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include "internal.h"
uint64_t pyvfs_iov_read(const pyvfs_iov_t *v, int n, uint64_t off, void *dst, uint64_t len) {
    (void)v; (void)n; (void)off; (void)dst; (void)len; return 0; }
static uint64_t ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + t.tv_nsec; }
static pyvfs_qstats_t row;
int main(void) {
    struct fuse_in_header in = {.len = 56, .opcode = FUSE_GETATTR};
    struct fuse_out_header out = {.len = 120, .error = 0};
    char reply[120]; memcpy(reply, &out, sizeof out);
    pyvfs_iov_t rd = {.base = (uint64_t)(uintptr_t)&in, .len = sizeof in};
    pyvfs_iov_t wr = {.base = (uint64_t)(uintptr_t)reply, .len = sizeof reply};
    pyvfs_stats_attach(&row);
    const int N = 20000000;
    for (int round = 0; round < 3; round++) {
        uint64_t t0 = ns();
        for (int i = 0; i < N; i++) {
#ifdef NEW
            pyvfs_stats_popped_ns = (i % 8 == 0) ? pyvfs_now_ns() : pyvfs_stats_noted_ns;
#endif
            __asm__ volatile("" ::: "memory");
            pyvfs_stats_note(&rd, 1, &wr, 1, 120, 1);
        }
        printf("%.1f ns/request\n", (double)(ns() - t0) / N);
    }
    return 0;
}
