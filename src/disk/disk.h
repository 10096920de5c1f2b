/* disk: one VM disk served by ferryd: the "IO filter" that every guest IO
 * passes through.
 *
 * A disk is a backend (raw file or block device, behind an ops table) plus:
 *  - cbt:      the crash-safe changed-block map (cbt.h).  A write, trim or
 *              zero marks its regions before it is acknowledged, and the mark
 *              is durable before the acknowledgement (batched commits).
 *  - heat:     per-region decayed read/write counts, per-disk rates, latency
 *              histograms and a sampled trace of recent IOs (heat.h).
 *  - throttle: the write rate limit that write backpressure drives (throttle.h).
 *
 * Thread model: every disk_* IO function may be called from many threads at
 * once.  Disks are reference counted; the last disk_unref() flushes the backend,
 * closes the CBT map cleanly and frees the disk.
 *
 * IO functions return 0 or a negative errno; they never log the guest's
 * ordinary errors (the NBD layer maps them to NBD errors), but do log backend
 * failures (EIO and friends) with the disk's name. */
#ifndef FERRY_DISK_H
#define FERRY_DISK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/bitmap.h"
#include "disk/heat.h"

struct disk;

struct disk_config {
  const char *name;             /* export name, validated by name_is_valid() */
  const char *image_path;       /* raw image file or block device */
  const char *cbt_path;         /* dirty map file; created if absent */
  uint64_t cbt_granularity;     /* bytes per dirty bit, power of two >= 4096 */
  bool cbt_enabled;             /* false only for benchmarks and diagnostics */
  bool heat_enabled;            /* false only for benchmarks and diagnostics */
  uint64_t write_limit_bps;     /* 0 = unlimited */
  bool cbt_new;                 /* the disk is new to ferry (just created or
                                   added): a clean map is created ("created").
                                   Otherwise an absent map file cannot vouch
                                   for anything: all dirty ("recovered"). */
  const char *cache_path;       /* non-NULL: the disk is a cloud cache over its
                                   image (src/cache/cache.h), this its present
                                   map: a warm migration's destination */
  uint64_t cache_quota;         /* bytes of local space for the cache, 0 = no limit */
  bool cache_new;               /* a new cache: nothing present yet */
  const char *snapshot_path;    /* non-NULL: a restore point is kept (snapshot.h) */
};

/* Opens the backend and loads (or creates) the CBT map.  A missing, corrupt or
 * torn map is never trusted as clean: the regions it cannot vouch for are
 * marked dirty and the reason is kept for disk_cbt_state().  On failure returns
 * NULL and writes a message to err. */
struct disk *disk_open(const struct disk_config *cfg, char *err, size_t errlen);
void disk_ref(struct disk *d);
void disk_unref(struct disk *d);

const char *disk_name(const struct disk *d);
const char *disk_image_path(const struct disk *d);
uint64_t disk_size(const struct disk *d);
bool disk_is_block_device(const struct disk *d);
/* Bytes allocated in the backend (st_blocks * 512 for files, size for devices). */
uint64_t disk_allocated_bytes(struct disk *d);

/* Flags for the IO functions. */
#define DISK_IO_FUA     1u  /* durable before return */
#define DISK_IO_NOWAIT  2u  /* return -EAGAIN instead of blocking (page cache
                               miss, CBT commit, throttle); the caller retries
                               without it from a thread that may block */
#define DISK_IO_MAY_TRIM 4u /* zero: holes are allowed (no NBD_CMD_FLAG_NO_HOLE) */
#define DISK_IO_REPLICA 8u  /* ferry's own replication IO, not the guest's: reads
                               skip heat; writes (into a disk the destination is
                               building, fenced meanwhile) pass the fence and
                               skip the write limit, heat and the dirty map (the
                               map of a disk under construction means nothing
                               until it is activated) */

/* All offsets and lengths must lie inside the disk (the caller checks). */
int disk_read(struct disk *d, void *buf, uint32_t len, uint64_t off, unsigned flags);
int disk_write(struct disk *d, const void *buf, uint32_t len, uint64_t off, unsigned flags);
int disk_trim(struct disk *d, uint32_t len, uint64_t off, unsigned flags);
int disk_zero(struct disk *d, uint32_t len, uint64_t off, unsigned flags);
int disk_flush(struct disk *d);
int disk_cache(struct disk *d, uint32_t len, uint64_t off);

/* Extent reporting for NBD_CMD_BLOCK_STATUS.  fn is called with consecutive
 * extents starting at off, covering at least one byte and at most len bytes
 * (the last extent may be cut at len); fn returns 0 to go on, 1 to stop, or
 * a negative errno.  The function returns 0 or a negative errno. */
#define DISK_EXTENT_HOLE  1u  /* NBD_STATE_HOLE */
#define DISK_EXTENT_ZERO  2u  /* NBD_STATE_ZERO */
#define DISK_EXTENT_DIRTY 1u  /* ferry:dirty bit 0 */
typedef int (*disk_extent_fn)(void *opaque, uint64_t off, uint64_t len, uint32_t flags);
int disk_extents_allocation(struct disk *d, uint64_t off, uint64_t len,
                            disk_extent_fn fn, void *opaque);
int disk_extents_dirty(struct disk *d, uint64_t off, uint64_t len,
                       disk_extent_fn fn, void *opaque);

/* --- Changed-block tracking (for the API and, later, the replicator) --- */
struct disk_dirty_map {
  uint64_t granularity;         /* bytes per bit */
  uint64_t nbits;
  uint64_t *words;              /* malloc'ed, caller frees with free() */
  uint64_t generation;          /* increases by one at every swap */
};
uint64_t disk_cbt_granularity(const struct disk *d);
uint64_t disk_dirty_bytes(struct disk *d);           /* bits set * granularity, capped at size */
/* Copies the current map (no swap). */
int disk_dirty_snapshot(struct disk *d, struct disk_dirty_map *out);
/* Atomically returns the current map and replaces it with a clean one: every
 * write acknowledged before the call is in the returned map, every write
 * that starts after it is in the new one.  The clean map is durable on return. */
int disk_dirty_swap(struct disk *d, struct disk_dirty_map *out);
/* The swap for a consumer that must keep the bits across a crash (the
 * replicator): keep(opaque, bits) runs with writers stalled, after the map is
 * taken and before the clean map file replaces the old one, and must make
 * the bits durable itself (cbt_swap_keep).  -EOPNOTSUPP without CBT. */
int disk_dirty_swap_keep(struct disk *d, int (*keep)(void *opaque, const struct bitmap *bits),
                         void *opaque, uint64_t *new_generation);
/* cbt_swap_fast: the swap without file IO (the map file keeps the bits until
 * the next full rewrite; see cbt.h).  bits must have the map's size. */
int disk_dirty_swap_fast(struct disk *d, struct bitmap *bits, uint64_t *new_generation);
/* The dirty map's consumer: while a migration owns it, nobody else may swap
 * it (`ferry disk dirty --swap` is refused), since the bits it takes would
 * be lost to the migration.  NULL releases. */
void disk_set_cbt_owner(struct disk *d, const char *owner);
/* Copies the owner ("" when none); returns true if owned. */
bool disk_cbt_owner(struct disk *d, char *buf, size_t len);
/* "ok", "created", "recovered: <reason>" (some or all regions set dirty
 * because the map file could not vouch for them), or "off". */
const char *disk_cbt_state(struct disk *d);
bool disk_cbt_enabled(const struct disk *d);
/* The disk's map, NULL when CBT is off (diagnostics and tests). */
struct cbt *disk_cbt(struct disk *d);

/* --- Heat, statistics, trace --- */
struct heat *disk_heat(struct disk *d);   /* NULL when heat is off */

/* --- Write rate limit (write backpressure) --- */
/* Two limits, and writes pass at the lower of those set: the operator's
 * (persisted by the registry, `ferry disk limit`) and the one a migration's
 * write backpressure sets while it runs (runtime only; 0 = none). */
void disk_set_write_limit(struct disk *d, uint64_t bytes_per_sec);  /* 0 = off */
uint64_t disk_write_limit(const struct disk *d);                    /* the operator's */
void disk_set_backpressure_limit(struct disk *d, uint64_t bytes_per_sec);  /* 0 = off */
uint64_t disk_backpressure_limit(const struct disk *d);
uint64_t disk_effective_write_limit(const struct disk *d);          /* what applies */
/* Time writes have spent waiting in the limiter since the disk was opened. */
uint64_t disk_write_throttled_ns(struct disk *d);

/* --- Fence (invariant: one site is authoritative for a disk) ---
 * A fenced disk refuses every write, trim and zero (-EROFS, NBD_EPERM) but
 * ferry's own replica IO, and refuses new NBD clients; reads still work.  The
 * reason ("migrated to SITE", "incoming migration ID") is shown to people.
 * The registry persists it; this is the in-memory switch. */
void disk_set_fence(struct disk *d, const char *reason);   /* NULL = unfence */
bool disk_fenced(const struct disk *d);
/* A fenced disk that admits clients: a destination's incoming QEMU attaches
 * before the switch-over (it reads, and writes nothing until it runs; any
 * write is still refused while fenced).  Unfencing clears it. */
void disk_set_fence_admits(struct disk *d, bool admits);
/* Not fenced, or fenced but admitting (what the NBD server asks). */
bool disk_admits_clients(const struct disk *d);
/* Copies the reason into buf ("" when not fenced). */
void disk_fence_reason(struct disk *d, char *buf, size_t len);

/* --- Clients --- */
void disk_client_attach(struct disk *d);
void disk_client_detach(struct disk *d);
unsigned disk_clients(const struct disk *d);

/* --- Restore point (src/disk/snapshot.h): copy-before-write of every change
 * (the guest's and ferry's own) from the moment it is attached --- */
int disk_attach_snapshot(struct disk *d, const char *path, bool create, char *err, size_t errlen);
/* Detaches (no change is preserved any more); the files stay (snapshot_delete). */
void disk_detach_snapshot(struct disk *d);
bool disk_has_snapshot(struct disk *d);
/* Rolls the disk back to the restore point (which stays).  The caller makes
 * sure nobody writes meanwhile (the disk fenced, its VM stopped). */
int disk_restore_snapshot(struct disk *d, char *err, size_t errlen);
/* Saved bytes and creation time (realtime ns); false without a snapshot. */
bool disk_snapshot_info(struct disk *d, uint64_t *saved_bytes, uint64_t *created_ns);

/* --- Cloud cache (src/cache/cache.h) --- */
struct cache;
struct cache *disk_cache_layer(struct disk *d);   /* NULL: not a cache */
/* Marks a range dirty in the CBT map, durably (a point of write-back that
 * could not be completed is folded back into the next one). */
int disk_mark_dirty(struct disk *d, uint64_t off, uint64_t len);

/* Makes everything durable (backend fdatasync) and writes the CBT map in full.
 * Called on SIGTERM and by disk_unref(). */
int disk_sync_all(struct disk *d);

#endif
