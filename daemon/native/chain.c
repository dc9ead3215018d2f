/* Descriptor chains: walked and bounds-checked in C, their buffers turned into host
 * ranges (pyvfs_iov_t) that the kernel or memory.c's copies move data through. */
#include <string.h>

#include "internal.h"

struct pyvfs_vdesc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
#define VDESC_F_NEXT 1
#define VDESC_F_WRITE 2
#define VDESC_F_INDIRECT 4
/* pyvfs_walk_chain's errors (daemon/guest/virtqueue.py names them) */
enum { WALK_BAD_INDEX = -1, WALK_LOOP = -2, WALK_BAD_ADDRESS = -3, WALK_BAD_INDIRECT = -4,
       WALK_READ_AFTER_WRITE = -5, WALK_TOO_MANY = -6, WALK_BAD_TABLE = -7,
       WALK_OVERFLOW = -8 };

static const pyvfs_region_t *region_of(const pyvfs_region_t *r, int n, uint64_t gpa) {
    for (int i = 0; i < n; i++)
        if (gpa >= r[i].gpa && gpa - r[i].gpa < r[i].size) return &r[i];
    return NULL;
}

/* Append [gpa, gpa+len) to out as host ranges, split at region borders and merged
   with the previous range when contiguous. */
static int add_range(const pyvfs_region_t *r, int n, uint64_t gpa, uint64_t len,
                     pyvfs_iov_t *out, int *count, int max) {
    if (len > UINT64_MAX - gpa) return WALK_OVERFLOW;
    while (len) {
        const pyvfs_region_t *reg = region_of(r, n, gpa);
        if (!reg) return WALK_BAD_ADDRESS;
        uint64_t off = gpa - reg->gpa;
        uint64_t take = reg->size - off;
        if (take > len) take = len;
        uint64_t host = reg->host + off;
        if (*count > 0 && out[*count - 1].base + out[*count - 1].len == host) {
            out[*count - 1].len += take;
        } else {
            if (*count >= max) return WALK_TOO_MANY;
            out[*count].base = host;
            out[*count].len = take;
            (*count)++;
        }
        gpa += take;
        len -= take;
    }
    return 0;
}

int pyvfs_walk_chain(uint64_t desc_host, uint32_t qsize, uint32_t head, int indirect_ok,
                     const pyvfs_region_t *regions, int nregions,
                     pyvfs_iov_t *rd, int *rd_n, uint64_t *rd_len,
                     pyvfs_iov_t *wr, int *wr_n, uint64_t *wr_len, int max_iov,
                     uint64_t *detail) {
    /* on error, detail[0..1] say what was wrong (index and table size, a length) */
    *rd_n = *wr_n = 0;
    *rd_len = *wr_len = 0;
    const struct pyvfs_vdesc *table = (const struct pyvfs_vdesc *)desc_host;
    uint32_t table_len = qsize, idx = head, seen = 0;
    int in_indirect = 0, writing = 0, rc;
    for (;;) {
        if (idx >= table_len) {
            detail[0] = idx;
            detail[1] = table_len | ((uint64_t)(seen == 0 && !in_indirect) << 63);
            return WALK_BAD_INDEX;
        }
        if (++seen > table_len) return WALK_LOOP;
        struct pyvfs_vdesc d;
        memcpy(&d, &table[idx], sizeof d);  /* read once: the guest may change it */
        if (d.flags & VDESC_F_INDIRECT) {
            detail[0] = d.len;
            detail[1] = (d.flags & VDESC_F_NEXT) ? 1 : 0;
            if (!indirect_ok || in_indirect || (d.flags & VDESC_F_NEXT))
                return WALK_BAD_INDIRECT;
            if (d.len == 0 || d.len % sizeof d || d.len / sizeof d > 32768)
                return WALK_BAD_TABLE;
            const pyvfs_region_t *reg = region_of(regions, nregions, d.addr);
            if (!reg || d.len > reg->size - (d.addr - reg->gpa)) return WALK_BAD_TABLE;
            table = (const struct pyvfs_vdesc *)(reg->host + (d.addr - reg->gpa));
            table_len = d.len / sizeof d;
            idx = 0;
            seen = 0;
            in_indirect = 1;
            continue;
        }
        if (d.flags & VDESC_F_WRITE) {
            writing = 1;
            rc = add_range(regions, nregions, d.addr, d.len, wr, wr_n, max_iov);
            *wr_len += d.len;
        } else {
            if (writing) return WALK_READ_AFTER_WRITE;
            rc = add_range(regions, nregions, d.addr, d.len, rd, rd_n, max_iov);
            *rd_len += d.len;
        }
        if (rc) return rc;
        if (!(d.flags & VDESC_F_NEXT)) return 0;
        idx = d.next;
    }
}
