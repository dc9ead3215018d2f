/* Declarations shared by the cffi cdef (see _native_build.py) and native.c.
 * Keep this file free of preprocessor directives other than the include guard:
 * _native_build.py feeds the part between the BEGIN/END markers to ffi.cdef(). */
#ifndef SHM_TABLE_NATIVE_H
#define SHM_TABLE_NATIVE_H
#include <stdint.h>
#include <stddef.h>
/* BEGIN CDEF */
typedef struct {
    uint64_t nodeid;
    uint64_t lookups;    /* the guest's lookup count; 0 once it forgot the inode */
    uint64_t ino;
    uint64_t dev;
    uint64_t mnt_id;
    int32_t fd;
    uint32_t mode;
    int32_t has_handle;
    int32_t handle_type;
    uint32_t handle_bytes;
    uint64_t handle_mnt_id;
    uint64_t parent;
    uint32_t name_len;
    uint8_t handle[128];
    uint8_t name[256];
} it_entry_t;

typedef struct {
    uint64_t fh;
    uint64_t nodeid;
    int32_t fd;
    uint32_t flags;
    uint32_t guest_open;
} ht_entry_t;

/* common */
int seg_check(void *base, uint64_t size, uint32_t kind);
int seg_owner_alive(void *base);
uint32_t seg_owner_pid(void *base);
int seg_take_orphans(void *base, int32_t *out, int max);
void seg_debug_crash_after(uint64_t n);
uint32_t seg_lock_word(void *base);
uint32_t seg_my_tid(void);
int seg_stats(void *base, uint64_t *out, int n);
int seg_reap_pins(void *base);
uint64_t seg_removals(void *base);
int seg_my_pins(void *base);
int seg_pins_held(void *base);

/* inode table */
uint64_t it_segment_size(uint32_t capacity);
int it_init(void *base, uint32_t capacity, uint32_t owner_pid);
int64_t it_insert_root(void *base, uint64_t ino, uint64_t dev, uint64_t mnt_id,
                       const char *handle, uint32_t handle_bytes, int32_t handle_type,
                       uint64_t handle_mnt_id, int32_t fd, uint32_t mode);
int it_claim_or_insert(void *base, uint64_t ino, uint64_t dev, uint64_t mnt_id,
                       const char *handle, uint32_t handle_bytes, int32_t handle_type,
                       uint64_t handle_mnt_id, int32_t fd, uint32_t mode, uint64_t parent,
                       const char *name, uint32_t name_len, uint64_t *nodeid_out);
int it_claim(void *base, uint64_t ino, uint64_t dev, uint64_t mnt_id, const char *handle,
             uint32_t handle_bytes, int32_t handle_type, uint64_t handle_mnt_id,
             uint64_t *nodeid_out);
int64_t it_pin(void *base, uint64_t nodeid);
int it_unpin(void *base, uint64_t nodeid);
int it_forget(void *base, uint64_t nodeid, uint64_t n);
int64_t it_lookup(void *base, uint64_t nodeid);
int32_t it_fd(void *base, uint32_t slot);
uint64_t it_nodeid(void *base, uint32_t slot);
uint32_t it_hwm(void *base);
int32_t it_handle_of(void *base, uint32_t slot, uint8_t *out, int32_t *handle_type);
int it_snapshot(void *base, uint32_t slot, it_entry_t *out);
int it_set_info(void *base, uint64_t nodeid, uint64_t parent, const char *name,
                uint32_t name_len);
int it_check(void *base, char *msg, size_t msglen);
/* migration: re-create an entry under the nodeid it had on the source (slots in rising
   order, into a table holding only the root); 0, -2 slot taken or below the highest
   restored, -3 bad arguments */
int it_restore(void *base, uint64_t nodeid, uint64_t lookups, uint64_t ino, uint64_t dev,
               uint64_t mnt_id, const char *handle, uint32_t handle_bytes,
               int32_t handle_type, uint64_t handle_mnt_id, int32_t fd, uint32_t mode,
               uint64_t parent, const char *name, uint32_t name_len);

/* handle table */
uint64_t ht_segment_size(uint32_t capacity);
int ht_init(void *base, uint32_t capacity, uint32_t owner_pid);
uint64_t ht_open(void *base, uint64_t nodeid, int32_t fd, uint32_t flags);
int64_t ht_pin(void *base, uint64_t fh);
int ht_unpin(void *base, uint64_t fh);
int ht_close(void *base, uint64_t fh);
int32_t ht_fd(void *base, uint32_t slot);
uint32_t ht_hwm(void *base);
int ht_snapshot(void *base, uint32_t slot, ht_entry_t *out);
int ht_check(void *base, char *msg, size_t msglen);
/* migration: an open file under the fh it had on the source (rising slots, empty table) */
int ht_restore(void *base, uint64_t fh, uint64_t nodeid, int32_t fd, uint32_t flags);
/* migration: the live entries as the device state's columns; and their restore */
int64_t it_export(void *base, uint32_t max, uint64_t *nodeid, uint64_t *lookups,
                  uint64_t *parent, uint32_t *mode, int32_t *fd, uint16_t *name_len,
                  uint8_t *names, uint64_t names_cap, uint16_t *handle_len,
                  int32_t *handle_type, uint8_t *handles, uint64_t handles_cap);
uint32_t it_restore_many(void *base, uint32_t n, const uint64_t *nodeid,
                         const uint64_t *lookups, const uint64_t *ino, const uint64_t *dev,
                         const uint64_t *mnt_id, const uint8_t *handles,
                         const uint16_t *handle_len, const int32_t *handle_type,
                         const int32_t *fd, const uint32_t *mode, const uint64_t *parent,
                         const uint8_t *names, const uint16_t *name_len, int32_t *status);
/* an open file whose requests (but RELEASE) answer EIO from now on: ht_pin returns -5 */
int ht_set_broken(void *base, uint64_t fh);
#define HT_BROKEN 0x80000000
/* END CDEF */
#endif
