/* cache: the cloud cache, a backend that serves a disk at a warm migration's
 * destination while the disk's data is still at the source.
 *
 * The VM runs at the destination at once.  The cache is a `struct backend`
 * (backend.h) layered over a local backend: a sparse raw image of the disk's
 * full size.  A region (granularity bytes) present locally is served
 * locally; a missing one is fetched from the source through the fetcher and
 * the guest waits for it; the rest arrives in the background (hydration).
 * Guest writes land locally and are durable before they are acknowledged.
 * A quota bounds the local space, clean regions being evicted (and fetched
 * again if needed).  At each RPO point (the write-back to the source) the
 * content of the point's regions is captured even while the guest goes on
 * writing.  See cache.c for the design, the locks and the meta file.
 *
 * Present map (meta file): one bit per region, "the local image holds this
 * region's right data".  It is always a SUBSET of the truth: a bit is made
 * durable only after the region's data is, and an eviction's cleared bit is
 * durable before the region is punched.  So after kill -9 or a power cut a
 * region the file says present holds its data, and every acknowledged write
 * is there (its regions are present).
 *
 * Thread model: every function may be called from any thread, except that
 * cache_open and the backend's close are not concurrent with anything, and
 * the fetcher's request() must not call back into the cache but for
 * cache_fill/cache_fetch_failed.  Naming: cache_* are public; cache.c's
 * statics have no prefix. */
#ifndef FERRY_CACHE_H
#define FERRY_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/bitmap.h"
#include "disk/backend.h"

struct cache;

#define CACHE_MAX_FETCH_REGIONS 16          /* regions per fetch request at most */

/* Meta file format (little endian; page size 4096):
 *   page 0: header: 0 magic "FERRYCCH", 8 u32 version (1), 12 u32 page size
 *           (4096), 16 u64 granularity, 24 u64 disk size, 32 u64 nbits
 *           (regions), 40 u64 flags (0), 48 u64 reserved (0), 56 u64
 *           XXH64(bytes 0..55, seed 0); the rest zero.
 *   page k>=1: 4088 bytes of bits (32704 regions: 511 u64 words, bit i of
 *           word w being region (k-1) * 32704 + 64 * w + i; bits past nbits
 *           zero) + u64 XXH64 of those bytes seeded with k.
 * Pages are rewritten in place (only changed ones) and fdatasynced at each
 * commit.  Any bad checksum, size or field refuses the whole file. */
#define CACHE_META_MAGIC     "FERRYCCH"
#define CACHE_META_VERSION   1
#define CACHE_META_PAGE_SIZE 4096
#define CACHE_META_PAGE_BITS ((CACHE_META_PAGE_SIZE - 8) * 8)   /* 32704 regions per page */

/* An urgent request unanswered this long is sent again (a lost frame);
 * background ones after CACHE_RETRY_BG_NS. */
#define CACHE_RETRY_NS    (5ull * 1000000000ull)
#define CACHE_RETRY_BG_NS (30ull * 1000000000ull)

struct cache_fetcher {
  /* Asks the source for regions [first, first+n).  Called with no cache lock
   * held; must not block for long.  0: sent (the answer comes later by
   * cache_fill or cache_fetch_failed, possibly before request() returns);
   * -ENOTCONN: cannot send now (no link): the cache keeps the request and
   * sends it again at cache_link_up().  Any other error fails the request's
   * waiters with it. */
  int (*request)(void *opaque, uint64_t first, uint32_t n, bool urgent);  /* urgent: a guest waits */
  void *opaque;
};

struct cache_config {
  const char *meta_path;      /* the present map file */
  const char *disk_name;      /* for log lines */
  uint64_t granularity;       /* region size, power of two >= 4096 (and <= 1 GiB) */
  uint64_t quota_bytes;       /* local space (allocated bytes of the local image) at most; 0 = no limit */
  bool create;                /* new cache: nothing present; an existing meta file is replaced */
  uint64_t hydrate_bps;       /* background hydration rate, bytes/s; 0 = off */
  unsigned hydrate_inflight;  /* hydration requests outstanding at most; 0 = 8 */
};

/* Takes ownership of local (closed by the backend's close, or here if the
 * open fails).  The disk's size is local->size.  With create, a new meta
 * file (nothing present) replaces any old one, then the local image is
 * punched whole.  Otherwise the meta file must exist: one that is corrupt or
 * does not match (size, granularity) is refused with a clear message: it
 * can never be assumed present or absent (a region the guest wrote here
 * would be fetched again over it).  Starts the hydration thread.  Returns
 * NULL with a message in err on failure. */
struct cache *cache_open(const struct cache_config *cfg, struct backend *local, char *err,
                         size_t errlen);
/* The cache as a backend; ops->close closes and frees the cache (no IO,
 * fill or fetcher call may be running or come later: detach the fetcher
 * and stop the link first).
 *   pread    a miss fetches urgently and waits; nowait: -EAGAIN, the fetch
 *            being under way.
 *   pwrite, trim, zero  durable (local data and present bits) on return,
 *            whatever fua says; a partial write or zero of a missing region
 *            fetches it first; a trim of part of a missing region is a no-op
 *            there (trim is advisory; the source's bytes stay valid).  They
 *            always need a sync, so a NOWAIT caller must not call them: see
 *            cache_backend_is().
 *   flush    a commit.   cache  fetches missing regions (no wait).
 *   extents  present regions as the local image says; missing ones data (0).
 *   allocated  the local image's. */
struct backend *cache_backend(struct cache *c);
/* True if b is a cache's backend: its writes always wait for a sync, so the
 * disk service answers a NOWAIT write -EAGAIN without calling it. */
bool cache_backend_is(const struct backend *b);
/* NULL detaches (and waits for request() calls in progress to return).
 * Requests not answered yet are sent again to a new fetcher. */
void cache_set_fetcher(struct cache *c, const struct cache_fetcher *f);
void cache_link_up(struct cache *c);    /* every outstanding request is sent again */
void cache_link_down(struct cache *c);  /* outstanding requests are lost; waiting misses keep waiting */
/* Data for regions [first, first+n) arrived: data holds exactly the bytes of
 * that range clipped at the disk's end, or NULL for zeros.  Regions present
 * meanwhile are skipped (a guest write made them present: never overwrite
 * it).  Unrequested fills are fine.  Returns when the data and its present
 * bits are durable: 0, or -errno (-EINVAL: range outside the disk). */
int cache_fill(struct cache *c, uint64_t first, uint32_t n, const void *data);
void cache_fetch_failed(struct cache *c, uint64_t first, uint32_t n, int err);  /* waiters get err */
/* At activation: regions the source does not hold (holes) are present as
 * zeros, durably (zero_regions has one bit per region).  0 or -errno. */
int cache_set_present_zero(struct cache *c, const struct bitmap *zero_regions);
void cache_set_hot(struct cache *c, const uint64_t *regions, size_t n);  /* hydrated first, in order */
void cache_set_hydration(struct cache *c, uint64_t bps);                 /* 0 = off */
/* 0 = no limit.  A lower quota evicts at once what it can. */
void cache_set_quota(struct cache *c, uint64_t bytes);
/* The disk's live changed-block map (the CBT, same granularity): regions set
 * there were written since the last RPO point and are never evicted.  Must
 * be set before the first write if a quota may evict (a region written here
 * and not yet at the source must never be evicted); it must stay valid
 * until close. */
void cache_set_dirty_map(struct cache *c, const struct bitmap *dirty);

typedef int (*cache_capture_fn)(void *opaque, uint64_t region, const void *data, uint32_t len);
/* RPO point.  Called while the caller keeps the disk's writers stalled, and
 * before the dirty map is cleared (e.g. from cbt_swap_keep's keeper), so
 * that the point's regions are never evictable in between: bits (one per
 * region) are the point's regions.  Until cache_rpo_end they are never
 * evicted; until a region is captured, a guest write/trim/zero touching it
 * first passes the region's current (= point-time) content to fn and waits
 * for it (fn != 0: the guest's write fails with that error, data
 * untouched).  fn runs with the region's write lock held: it must not do IO
 * on this cache.  -EBUSY if a point is active, -EINVAL on a size mismatch. */
int cache_rpo_begin(struct cache *c, const struct bitmap *bits, cache_capture_fn fn, void *opaque);
/* The flusher: captures region (calls fn) unless a writer already did.  0,
 * 1 = skipped because the region is not present (never written here: a
 * superset bit) or not in the point, or fn's error (-EINVAL: no point). */
int cache_rpo_capture(struct cache *c, uint64_t region);
void cache_rpo_end(struct cache *c);    /* the point is applied at the source (or given up) */

bool cache_complete(struct cache *c);   /* every region present */
/* Region present locally (diagnostics and tests). */
bool cache_present(struct cache *c, uint64_t region);
int cache_sync(struct cache *c);        /* present map durable now: 0 or -errno */

struct cache_stats {
  uint64_t regions, present;            /* counts of regions */
  uint64_t local_bytes, quota_bytes;    /* allocated in the local image; the quota (0 none) */
  uint64_t read_hits, read_misses;      /* read requests: a hit = every region present on arrival */
  uint64_t write_fetches;               /* writes that had to fetch first */
  uint64_t fetch_requests, fetched_bytes, hydrated_bytes;  /* from the source; hydrated = background */
  uint64_t evictions;                   /* regions evicted */
  uint64_t waiting;                     /* guest requests waiting for data now */
  uint64_t oldest_wait_ns;              /* how long the oldest of them has waited (0: none) */
  uint64_t miss_p50_ns, miss_p90_ns, miss_p99_ns, miss_max_ns;  /* read miss latency */
};
/* fetch_requests counts request() calls that returned 0 (re-sends too);
 * fetched_bytes the bytes filled into regions (skipped ones not counted),
 * hydrated_bytes those of them no guest waited for.  A NOWAIT read that
 * misses counts as a miss (its retry counts again). */
/* ferryd stops: guest requests waiting for data, and every later miss, fail
 * with -ESHUTDOWN instead of waiting for a source that will not answer now. */
void cache_shutdown(struct cache *c);
void cache_get_stats(struct cache *c, struct cache_stats *out);

/* Fault injection for tests.  commit_error: commits fail from now on, as a
 * failing fdatasync would, and the cache enters fail mode (every later
 * commit fails, so no write is acknowledged again; reads go on).
 * read_delay: a read that found its regions present sleeps us microseconds
 * before reading them (0: off), widening the window no evictor may enter. */
void cache_inject_commit_error(struct cache *c);
void cache_inject_read_delay(struct cache *c, unsigned us);

#endif
