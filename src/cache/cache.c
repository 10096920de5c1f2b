/* cache: the cloud cache (see cache.h for the role, the interface and the
 * meta file format).
 *
 * DESIGN
 * Region state, atomic bitmaps of one bit per region:
 *   present  the local image holds the region's right data: IO serves it
 *            locally.  Set only after the data is written (under the
 *            region's stripe lock), cleared only by the evictor (under `rw`
 *            exclusive).  Every change happens under meta_lock together
 *            with the mark of the meta page that holds the bit.
 *   hole     present regions known to hold no data (zero fills, punched
 *            zeroes): nothing to gain by evicting them.
 *   ref      CLOCK's referenced bit: set by read hits and urgent fills.
 *   busy     the region has an entry in the flight table (mirror of it).
 * The flight table (a hash under `lock`) has one entry per region being
 * fetched (FETCH: requested, or being filled) or evicted (EVICT).  However
 * many readers miss on a region, it has one entry and one request; each
 * waits on the entry's condition variable (woken when the fill is durable,
 * the fetch failed, or a guest write made the region present).  Any number
 * of entries are in flight at once: nothing serialises misses.  An entry
 * leaves the table only when its answer arrives (fill or failure), so a
 * late fill never lands on a region evicted meanwhile.
 *
 * Durability (the meta file is a subset of `present`, never a superset):
 * commits go through a group commit (common/group_commit.h) whose commit
 * takes, under meta_lock, a snapshot of the changed pages (from `present`),
 * then fdatasyncs the local image, then writes those pages and fdatasyncs
 * the meta file.  A bit in the snapshot was set after its region's data was
 * written, so its data is durable before the page is.  A writer, a fill,
 * the evictor waits for a commit that started after its change: a write is
 * acknowledged only when its data and any bit it set are durable (and a
 * bit it relied on, set by a fill: the fill set it under meta_lock before
 * the writer could see it).  The evictor clears the bits, waits for the
 * commit, and only then punches the holes.  Pages are written in place;
 * any mix of old and new pages after a crash is safe, since each page
 * alone keeps the subset rule.  A commit that fails puts the cache in fail
 * mode: every later commit fails (-EIO), so writes are never acknowledged
 * again, and the evictor punches nothing.
 *
 * Concurrency with eviction: IO holds `rw` shared over "check present +
 * local IO"; the evictor takes it exclusive only to pick its victims (CLOCK
 * from `hand`: present, holding data, not dirty, not in an active RPO
 * point, no flight entry; a set ref bit is cleared and the region passed
 * over once), clear their bits and give them EVICT entries; then it commits
 * the map, punches, and completes the entries (waking who waits: they then
 * fetch).  So no read returns a hole for data it found present.  Readers
 * and writers never wait for data while holding `rw` or a stripe.  A guest
 * request that waits for data is on the waiters list with its region range,
 * and those regions are not evictable until it is done: with a quota
 * smaller than what concurrent requests need, a region a reader waited for
 * would otherwise be evicted for another's before it reads it, again and
 * again (the fill goes over the quota instead).
 *
 * Writes (write, trim, zero) take `rw` shared and the stripe locks of their
 * regions (ascending), then: a region they cover whole needs no fetch (a
 * fill arriving later skips it: present); a part of a missing one is
 * fetched first (locks dropped while waiting), then written over
 * (read-modify-write); a region being evicted is waited for.  Before the
 * data changes, every region of an active RPO point not captured yet is
 * captured (its content passed to the point's fn) under the same stripe
 * locks, which the flusher (cache_rpo_capture) takes too: a region is
 * captured once, with its point-time content.  Fills take the stripe of
 * each region they write, so a fill and a guest write never interleave.
 *
 * Quota: fills reserve their bytes (plus a block per region for the
 * filesystem's extent tree) under quota_lock; when the estimate (the last
 * fstat plus what was written since, refreshed every 100 ms) says the
 * reservation would pass the quota, an fstat checks, and the evictor frees
 * the difference (and quota/64 more).  With nothing to evict the fill
 * still happens: a guest must be served.
 *
 * Hydration: one thread per cache.  Hot regions first, then ascending from
 * a cursor (wrapping), runs of up to CACHE_MAX_FETCH_REGIONS contiguous
 * missing regions with no entry, non-urgent; at most hydrate_inflight
 * requests (slots) outstanding; paced by a token bucket (a run may take
 * the bucket below zero; the thread sleeps until it is back at zero);
 * nothing new while an urgent request is outstanding, without a fetcher,
 * while the link is down, or while usage + hydration in flight would pass
 * 90% of the quota.  The same thread re-sends requests unanswered for
 * CACHE_RETRY_NS (urgent) or CACHE_RETRY_BG_NS (lost frames).  It sleeps on
 * a condition variable with a timeout, never spinning.
 *
 * Link: requests that could not be sent (no fetcher, link down, -ENOTCONN)
 * are kept UNSENT; cache_link_up and a new fetcher send every outstanding
 * request again.  `epoch` changes at every link_down/link_up, so a request
 * whose request() call straddled a link change is not taken as sent.
 *
 * Locks, in order (a thread takes them only in this order):
 *   quota_lock  fills' reservation and quota eviction
 *   evict_lock  one evictor at a time
 *   rw          writer-preferring rwlock: IO shared, evictor exclusive (and
 *               rpo_begin/rpo_end, to fence writers)
 *   stripes[]   region group locks: writers, fills, zero marking, captures
 *   lock        flights, fetcher, link, hydration state, waiters, hot list
 *   meta_lock   present-bit changes + changed-page marks vs the snapshot
 * Commits are waited for with none of rw, the stripes, lock or meta_lock
 * held (the evictor holds evict_lock and perhaps quota_lock, which the
 * commit never takes).  No lock of ours is held while request() runs or
 * while waiting for data.  The RPO point's fn runs under rw shared and the
 * region's stripe (it must not do IO on the cache).
 *
 * Thread model: the backend ops, cache_fill/cache_fetch_failed (the link's
 * receiving thread) and the control calls may come from any threads at
 * once.  request() is called from a missing reader's or writer's thread and
 * from the hydration thread, with no cache lock held.  cache_fill returns
 * when its data and bits are durable (one shared commit).  The hydration
 * thread is started by cache_open and joined by close.
 * Naming: cache_* are public (cache.h); statics have no prefix; __fn or a
 * comment says which lock the caller holds. */
#include "cache/cache.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/group_commit.h"
#include "common/histogram.h"
#include "common/log.h"
#include "common/util.h"

#define PAGE CACHE_META_PAGE_SIZE
#define PAGE_WORDS ((PAGE - 8) / 8)             /* 511 u64 words of bits per page */
#define HDR_CSUM_OFF 56
#define IO_PAGES 64                              /* pages per meta read/write call */
#define NSTRIPES 256                             /* stripe locks */
#define STRIPE_SHIFT 2                           /* 4 neighbouring regions per stripe */
#define BUCKET_BITS 10
#define NBUCKETS (1u << BUCKET_BITS)
#define EVICT_BATCH 64                           /* victims per eviction round */
#define MAX_GRANULARITY (UINT64_C(1) << 30)      /* IO lengths are u32 */
#define ZERO_RUN_BYTES (UINT64_C(1) << 30)       /* zero marking: bytes per call */
#define SEC_NS UINT64_C(1000000000)
#define RETRY_SCAN_NS (SEC_NS / 4)               /* lost-frame scan period */
#define USAGE_REFRESH_NS (SEC_NS / 10)           /* the usage estimate is re-measured */
#define FAIL_BACKOFF_NS SEC_NS                   /* hydration pause after a failed fetch */
#define OVER_LOG_NS (30 * SEC_NS)                /* "over quota" said at most this often */
#define META_ALLOWANCE 4096                      /* a filesystem block (extent tree) per region
                                                    written, reserved against the quota */

_Static_assert(CACHE_META_PAGE_BITS == PAGE_WORDS * 64, "meta page layout");

enum flight_kind { FETCH, EVICT };
enum flight_state {
  UNSENT,    /* not sent: no fetcher or link; sent at link_up / a new fetcher */
  SENDING,   /* someone is calling request() for it */
  SENT,      /* request() returned 0: the answer is awaited */
};

struct flight {
  struct flight *next;        /* hash chain */
  uint64_t region;
  uint64_t sent_ns;           /* last sent (SENT) */
  unsigned refs;              /* the table's, a sender's, each waiter's */
  unsigned char kind, state;
  bool urgent;                /* a guest waits (or waited) for it */
  bool filling;               /* a fill is writing it: no second fill, no re-send */
  bool done;                  /* answered or evicted: out of the table */
  int err;                    /* for the waiters: the fetch's error */
  unsigned slot;              /* hydration request slot + 1; 0: not hydration's */
  pthread_cond_t cond;        /* done, or the region became present */
};

struct hslot {                /* one outstanding hydration request */
  uint32_t left;              /* its regions not answered yet (0: free) */
  uint64_t bytes;
};

struct waiter {               /* a guest request waiting for data */
  struct waiter *prev, *next;
  uint64_t since;             /* its arrival (stats) */
  uint64_t first, last;       /* its regions: pinned, never evicted meanwhile */
};

struct cache {
  struct backend b;                  /* first: the ops get a struct backend * */
  struct backend *local;             /* the sparse local image (owned) */
  char *disk_name, *meta_path;
  uint64_t gran, size, nregions, npages;
  unsigned shift;                    /* log2(gran) */
  int meta_fd;

  struct bitmap present, hole, ref, busy;   /* see DESIGN */
  _Atomic uint64_t npresent;

  pthread_rwlock_t rw;
  pthread_mutex_t stripes[NSTRIPES];

  pthread_mutex_t meta_lock;
  struct bitmap pending;             /* [npages] pages changed since the last snapshot */
  unsigned char *cbuf;               /* the committer's page images */
  uint64_t *cpages;                  /* [npages] their page numbers */
  _Atomic bool failed;               /* fail mode: commits fail */
  _Atomic bool inject_fail;          /* test hook: commits fail (fail mode) */
  _Atomic unsigned inject_read_us;   /* test hook: local reads linger in the window */
  struct group_commit gc;

  pthread_mutex_t lock;
  struct flight *buckets[NBUCKETS];
  struct cache_fetcher fetcher;
  bool have_fetcher;
  bool link_up;
  bool shut;                         /* cache_shutdown: misses fail at once */
  uint64_t epoch;                    /* +1 at each link change */
  unsigned calls;                    /* request() calls running */
  pthread_cond_t calls_cond;         /* calls reached 0 */
  uint64_t n_urgent;                 /* urgent FETCH entries outstanding */
  struct waiter waiters;             /* list head */
  uint64_t nwaiting;

  /* hydration (under lock) */
  pthread_t hyd_thread;
  bool hyd_started, stop;
  pthread_cond_t hyd_cond;           /* CLOCK_MONOTONIC; anything hydration waits for */
  uint64_t bps;
  unsigned hyd_max, hyd_inflight;
  uint64_t hyd_inflight_bytes;
  struct hslot *hslots;              /* [hyd_max] */
  uint64_t cursor;
  uint64_t *hot;
  size_t nhot, hot_pos;
  double tokens;                     /* bytes; may be below zero (debt) */
  uint64_t tokens_ns;
  uint64_t backoff_until, next_retry_scan;
  bool complete_logged;

  /* quota */
  pthread_mutex_t quota_lock;
  uint64_t reserved;                 /* fills' bytes not yet written (quota_lock) */
  uint64_t over_logged_ns;           /* last "over quota" line (quota_lock) */
  _Atomic uint64_t quota;
  _Atomic uint64_t usage_est;        /* allocated bytes: last fstat + written since */
  _Atomic uint64_t usage_ns;         /* time of that fstat */
  pthread_mutex_t evict_lock;
  uint64_t hand;                     /* CLOCK hand (evict_lock) */
  _Atomic bool no_punch;             /* the local image cannot punch holes */

  /* RPO point */
  _Atomic bool rpo_active;           /* changed under rw exclusive */
  struct bitmap rpo_bits;            /* the point's regions: never evicted */
  struct bitmap rpo_pending;         /* present at begin, not captured yet */
  struct bitmap rpo_absent;          /* not present at begin: nothing to capture */
  cache_capture_fn rpo_fn;
  void *rpo_opaque;
  const struct bitmap *_Atomic dirty;   /* the disk's CBT map, or NULL */

  /* stats */
  _Atomic uint64_t read_hits, read_misses, write_fetches, fetch_requests;
  _Atomic uint64_t fetched_bytes, hydrated_bytes, evictions;
  struct histogram miss_hist;
};

static const struct backend_ops cache_ops;

static struct cache *cache_of(struct backend *b) { return (struct cache *)b; }

/* ---- small helpers ---- */

static void put32(unsigned char *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static void put64(unsigned char *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }
static uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
static uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }

static uint64_t region_off(const struct cache *c, uint64_t rg) { return rg << c->shift; }

static uint32_t region_len(const struct cache *c, uint64_t rg)
{
  return (uint32_t)MIN(c->gran, c->size - region_off(c, rg));
}

static uint64_t blocks_of(uint64_t len) { return (len + 4095) & ~UINT64_C(4095); }

static bool is_zero(const unsigned char *p, size_t len)
{
  return len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0);
}

static bool test_and_clear(struct bitmap *b, uint64_t i)
{
  uint64_t mask = UINT64_C(1) << (i & 63);
  if (!(atomic_load_explicit(&b->words[i >> 6], memory_order_relaxed) & mask))
    return false;
  return atomic_fetch_and(&b->words[i >> 6], ~mask) & mask;
}

static void stat_add(_Atomic uint64_t *s, uint64_t v)
{
  atomic_fetch_add_explicit(s, v, memory_order_relaxed);
}

static void cond_init_monotonic(pthread_cond_t *cv)
{
  pthread_condattr_t a;
  pthread_condattr_init(&a);
  pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
  pthread_cond_init(cv, &a);
  pthread_condattr_destroy(&a);
}

static void cond_wait_ns(pthread_cond_t *cv, pthread_mutex_t *m, uint64_t ns)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  uint64_t t = (uint64_t)ts.tv_sec * SEC_NS + (uint64_t)ts.tv_nsec + ns;
  ts.tv_sec = (time_t)(t / SEC_NS);
  ts.tv_nsec = (long)(t % SEC_NS);
  pthread_cond_timedwait(cv, m, &ts);
}

/* ---- stripes ---- */

static pthread_mutex_t *stripe_of(struct cache *c, uint64_t rg)
{
  return &c->stripes[(rg >> STRIPE_SHIFT) % NSTRIPES];
}

/* Locks the stripes of regions [first, last] in ascending stripe order. */
static void stripes_lock(struct cache *c, uint64_t first, uint64_t last)
{
  uint64_t s0 = first >> STRIPE_SHIFT, s1 = last >> STRIPE_SHIFT;
  if (s1 - s0 + 1 >= NSTRIPES) {
    for (unsigned i = 0; i < NSTRIPES; i++)
      pthread_mutex_lock(&c->stripes[i]);
    return;
  }
  unsigned a = (unsigned)(s0 % NSTRIPES), z = (unsigned)(s1 % NSTRIPES);
  if (a <= z) {
    for (unsigned i = a; i <= z; i++)
      pthread_mutex_lock(&c->stripes[i]);
  } else {   /* wrapped: [0, z] then [a, N) is still ascending */
    for (unsigned i = 0; i <= z; i++)
      pthread_mutex_lock(&c->stripes[i]);
    for (unsigned i = a; i < NSTRIPES; i++)
      pthread_mutex_lock(&c->stripes[i]);
  }
}

static void stripes_unlock(struct cache *c, uint64_t first, uint64_t last)
{
  uint64_t s0 = first >> STRIPE_SHIFT, s1 = last >> STRIPE_SHIFT;
  if (s1 - s0 + 1 >= NSTRIPES) {
    for (unsigned i = 0; i < NSTRIPES; i++)
      pthread_mutex_unlock(&c->stripes[i]);
    return;
  }
  for (uint64_t s = s0; s <= s1; s++)
    pthread_mutex_unlock(&c->stripes[s % NSTRIPES]);
}

/* ---- present bits (meta_lock) ---- */

/* __fn: caller holds the stripe of [first, first+n) and wrote their data. */
static void present_set_range(struct cache *c, uint64_t first, uint64_t n)
{
  pthread_mutex_lock(&c->meta_lock);
  for (uint64_t rg = first; rg < first + n; rg++) {
    if (!bitmap_set(&c->present, rg)) {
      atomic_fetch_add(&c->npresent, 1);
      bitmap_set(&c->pending, rg / CACHE_META_PAGE_BITS);
    }
  }
  pthread_mutex_unlock(&c->meta_lock);
}

/* __fn: caller holds rw exclusive (the evictor). */
static void present_clear(struct cache *c, const uint64_t *rgs, size_t n)
{
  pthread_mutex_lock(&c->meta_lock);
  for (size_t i = 0; i < n; i++) {
    if (bitmap_test(&c->present, rgs[i])) {
      bitmap_clear(&c->present, rgs[i]);
      atomic_fetch_sub(&c->npresent, 1);
      bitmap_set(&c->pending, rgs[i] / CACHE_META_PAGE_BITS);
    }
  }
  pthread_mutex_unlock(&c->meta_lock);
}

/* ---- meta file ---- */

static void header_build(const struct cache *c, unsigned char *buf)
{
  memset(buf, 0, PAGE);
  memcpy(buf, CACHE_META_MAGIC, 8);
  put32(buf + 8, CACHE_META_VERSION);
  put32(buf + 12, PAGE);
  put64(buf + 16, c->gran);
  put64(buf + 24, c->size);
  put64(buf + 32, c->nregions);
  put64(buf + 40, 0);
  put64(buf + 48, 0);
  put64(buf + HDR_CSUM_OFF, XXH64(buf, HDR_CSUM_OFF, 0));
}

/* Meta page p (file page p + 1) from bm, NULL for none. */
static void page_build(const struct cache *c, const struct bitmap *bm, uint64_t p,
                       unsigned char *buf)
{
  uint64_t w0 = p * PAGE_WORDS, nwords = DIV_ROUND_UP(c->nregions, 64);
  for (uint64_t i = 0; i < PAGE_WORDS; i++) {
    uint64_t w = 0;
    if (bm && w0 + i < nwords)
      w = atomic_load_explicit(&bm->words[w0 + i], memory_order_acquire);
    put64(buf + i * 8, w);
  }
  put64(buf + PAGE_WORDS * 8, XXH64(buf, PAGE_WORDS * 8, p + 1));
}

/* The group commit's commit: snapshot the changed pages, make the local
 * image durable, then those pages (see DESIGN: that order is the subset
 * rule). */
static int commit_fn(void *opaque)
{
  struct cache *c = opaque;
  if (atomic_load(&c->failed))
    return -EIO;
  uint64_t n = 0;
  pthread_mutex_lock(&c->meta_lock);
  for (uint64_t p = bitmap_next(&c->pending, 0, true); p < c->npages;
       p = bitmap_next(&c->pending, p + 1, true)) {
    bitmap_clear(&c->pending, p);
    page_build(c, &c->present, p, c->cbuf + n * PAGE);
    c->cpages[n++] = p;
  }
  pthread_mutex_unlock(&c->meta_lock);

  const char *what = "sync the local image";
  int r = c->local->ops->flush(c->local);
  if (r == 0 && atomic_load(&c->inject_fail)) {
    what = "write the meta file (injected)";
    r = -EIO;
  }
  for (uint64_t i = 0; r == 0 && i < n;) {
    uint64_t run = 1;   /* consecutive pages in one pwrite */
    while (i + run < n && run < IO_PAGES && c->cpages[i + run] == c->cpages[i] + run)
      run++;
    what = "write the meta file";
    if (pwrite_full(c->meta_fd, c->cbuf + i * PAGE, run * PAGE,
                    (off_t)((c->cpages[i] + 1) * PAGE)) < 0)
      r = -errno;
    i += run;
  }
  if (r == 0 && n) {
    what = "sync the meta file";
    while (fdatasync(c->meta_fd) < 0) {
      if (errno != EINTR) {
        r = -errno;
        break;
      }
    }
  }
  if (r < 0 && !atomic_exchange(&c->failed, true))
    log_error(c->disk_name, "cache: cannot %s (%s): failing every write from now on; the "
              "meta file %s still holds only regions whose data was durable", what,
              strerror(-r), c->meta_path);
  return r < 0 ? -EIO : 0;
}

/* Refuses the meta file: err gets why, the log too. */
static void meta_refuse(struct cache *c, char *err, size_t errlen, const char *why)
{
  snprintf(err, errlen, "cache: meta file %s %s: it cannot vouch for which regions are "
           "present, so it is refused (a region the guest wrote here would be fetched again "
           "over it); restore it, or recreate the cache (create) and lose what was written "
           "here and not yet at the source", c->meta_path, why);
  log_error(c->disk_name, "%s", err);
}

static int meta_create(struct cache *c, char *err, size_t errlen)
{
  size_t len = (size_t)((1 + c->npages) * PAGE);
  unsigned char *buf = malloc(len);
  if (!buf) {
    snprintf(err, errlen, "cache: out of memory");
    return -1;
  }
  header_build(c, buf);
  for (uint64_t p = 0; p < c->npages; p++)
    page_build(c, NULL, p, buf + (p + 1) * PAGE);
  char e2[256];
  int r = write_file_atomic(c->meta_path, buf, len, 0644, e2, sizeof e2);
  free(buf);
  if (r < 0) {
    snprintf(err, errlen, "cache: cannot create the meta file: %s", e2);
    log_error(c->disk_name, "%s", err);
    return -1;
  }
  c->meta_fd = open(c->meta_path, O_RDWR | O_CLOEXEC);
  if (c->meta_fd < 0) {
    snprintf(err, errlen, "cache: cannot open the meta file %s: %s", c->meta_path,
             strerror(errno));
    log_error(c->disk_name, "%s", err);
    return -1;
  }
  return 0;
}

static int meta_load(struct cache *c, char *err, size_t errlen)
{
  char why[200];
  c->meta_fd = open(c->meta_path, O_RDWR | O_CLOEXEC);
  if (c->meta_fd < 0) {
    if (errno == ENOENT) {
      meta_refuse(c, err, errlen, "does not exist");
    } else {
      snprintf(err, errlen, "cache: cannot open the meta file %s: %s", c->meta_path,
               strerror(errno));
      log_error(c->disk_name, "%s", err);
    }
    return -1;
  }
  struct stat st;
  unsigned char *buf = malloc((size_t)IO_PAGES * PAGE);
  if (!buf) {
    snprintf(err, errlen, "cache: out of memory");
    return -1;
  }
  int r = -1;
  if (fstat(c->meta_fd, &st) < 0 || pread_full(c->meta_fd, buf, PAGE, 0) < 0) {
    snprintf(why, sizeof why, "cannot be read (%s)", errno ? strerror(errno) : "too short");
    goto refuse;
  }
  if (memcmp(buf, CACHE_META_MAGIC, 8) != 0) {
    snprintf(why, sizeof why, "is not a cache meta file (bad magic)");
    goto refuse;
  }
  if (get64(buf + HDR_CSUM_OFF) != XXH64(buf, HDR_CSUM_OFF, 0)) {
    snprintf(why, sizeof why, "is corrupt (header checksum mismatch)");
    goto refuse;
  }
  if (get32(buf + 8) != CACHE_META_VERSION || get32(buf + 12) != PAGE) {
    snprintf(why, sizeof why, "has an unsupported version %u (page size %u)", get32(buf + 8),
             get32(buf + 12));
    goto refuse;
  }
  if (get64(buf + 16) != c->gran) {
    snprintf(why, sizeof why, "was made for a granularity of %llu bytes, not %llu",
             (unsigned long long)get64(buf + 16), (unsigned long long)c->gran);
    goto refuse;
  }
  if (get64(buf + 24) != c->size || get64(buf + 32) != c->nregions) {
    snprintf(why, sizeof why, "was made for a disk of %llu bytes (%llu regions), not %llu",
             (unsigned long long)get64(buf + 24), (unsigned long long)get64(buf + 32),
             (unsigned long long)c->size);
    goto refuse;
  }
  if (get64(buf + 40) != 0) {
    snprintf(why, sizeof why, "has unknown flags %#llx", (unsigned long long)get64(buf + 40));
    goto refuse;
  }
  if ((uint64_t)st.st_size != (1 + c->npages) * PAGE) {
    snprintf(why, sizeof why, "has %llu bytes, not %llu (truncated?)",
             (unsigned long long)st.st_size, (unsigned long long)((1 + c->npages) * PAGE));
    goto refuse;
  }
  uint64_t nwords = DIV_ROUND_UP(c->nregions, 64);
  for (uint64_t p = 0; p < c->npages; p += IO_PAGES) {
    uint64_t n = MIN((uint64_t)IO_PAGES, c->npages - p);
    if (pread_full(c->meta_fd, buf, n * PAGE, (off_t)((p + 1) * PAGE)) < 0) {
      snprintf(why, sizeof why, "cannot be read (%s)", errno ? strerror(errno) : "too short");
      goto refuse;
    }
    for (uint64_t k = 0; k < n; k++) {
      const unsigned char *pg = buf + k * PAGE;
      if (get64(pg + PAGE_WORDS * 8) != XXH64(pg, PAGE_WORDS * 8, p + k + 1)) {
        snprintf(why, sizeof why, "is corrupt (page %llu checksum mismatch)",
                 (unsigned long long)(p + k + 1));
        goto refuse;
      }
      for (uint64_t i = 0; i < PAGE_WORDS; i++) {
        uint64_t wi = (p + k) * PAGE_WORDS + i, w = get64(pg + i * 8);
        uint64_t valid = wi >= nwords ? 0
                         : wi == nwords - 1 && (c->nregions & 63)
                           ? (UINT64_C(1) << (c->nregions & 63)) - 1 : UINT64_MAX;
        if (w & ~valid) {
          snprintf(why, sizeof why, "is corrupt (page %llu has bits past the disk's end)",
                   (unsigned long long)(p + k + 1));
          goto refuse;
        }
        if (w) {
          atomic_store(&c->present.words[wi], w);
          atomic_fetch_add(&c->npresent, (uint64_t)__builtin_popcountll(w));
        }
      }
    }
  }
  r = 0;
  goto out;
refuse:
  meta_refuse(c, err, errlen, why);
out:
  free(buf);
  return r;
}

/* Regions lying whole in a hole of the local image get their hole bit. */
static void scan_holes(struct cache *c)
{
  if (c->local->is_block_device)
    return;
  uint64_t pos = 0;
  while (pos < c->size) {
    off_t d = lseek(c->local->fd, (off_t)pos, SEEK_DATA);
    uint64_t data;
    if (d >= 0)
      data = MIN((uint64_t)d, c->size);
    else if (errno == ENXIO)
      data = c->size;
    else
      return;                       /* no hole reporting: all data */
    uint64_t rg = (pos + c->gran - 1) >> c->shift;
    while (rg < c->nregions && region_off(c, rg) + region_len(c, rg) <= data)
      bitmap_set(&c->hole, rg++);
    if (data >= c->size)
      break;
    off_t h = lseek(c->local->fd, (off_t)data, SEEK_HOLE);
    if (h < 0 || (uint64_t)h <= data)
      break;
    pos = (uint64_t)h;
  }
}

/* Punches [off, off+len) of the local image; false if it cannot. */
static bool punch(struct cache *c, uint64_t off, uint64_t len)
{
  if (c->local->is_block_device || atomic_load(&c->no_punch))
    return false;
  while (fallocate(c->local->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                   (off_t)len) < 0) {
    if (errno == EINTR)
      continue;
    if (errno == EOPNOTSUPP || errno == ENOSYS) {
      if (!atomic_exchange(&c->no_punch, true))
        log_warn(c->disk_name, "cache: the local image cannot punch holes (%s): evicted "
                 "regions keep their space, so the quota cannot be held", strerror(errno));
    } else {
      log_error(c->disk_name, "cache: cannot punch %llu bytes at %llu of the local image: %s",
                (unsigned long long)len, (unsigned long long)off, strerror(errno));
    }
    return false;
  }
  return true;
}

/* ---- usage and quota ---- */

static uint64_t usage(struct cache *c, bool exact)
{
  uint64_t now = now_ns();
  if (exact || now - atomic_load(&c->usage_ns) > USAGE_REFRESH_NS) {
    uint64_t a = c->local->ops->allocated(c->local);
    atomic_store(&c->usage_est, a);
    atomic_store(&c->usage_ns, now);
    return a;
  }
  return atomic_load(&c->usage_est);
}

static void usage_add(struct cache *c, uint64_t bytes) { atomic_fetch_add(&c->usage_est, bytes); }

static void usage_sub(struct cache *c, uint64_t bytes)
{
  uint64_t u = atomic_load(&c->usage_est);
  while (!atomic_compare_exchange_weak(&c->usage_est, &u, u > bytes ? u - bytes : 0))
    ;
}

/* ---- flight table (lock) ---- */

static unsigned bucket_of(uint64_t rg)
{
  return (unsigned)((rg * UINT64_C(0x9E3779B97F4A7C15)) >> (64 - BUCKET_BITS));
}

/* __fn: lock */
static struct flight *flight_find_locked(struct cache *c, uint64_t rg)
{
  if (!bitmap_test(&c->busy, rg))
    return NULL;
  for (struct flight *e = c->buckets[bucket_of(rg)]; e; e = e->next)
    if (e->region == rg)
      return e;
  return NULL;
}

/* __fn: lock; rg has no entry.  The table holds the returned ref. */
static struct flight *flight_add_locked(struct cache *c, uint64_t rg, enum flight_kind kind)
{
  struct flight *e = calloc(1, sizeof *e);
  if (!e)
    return NULL;
  e->region = rg;
  e->kind = (unsigned char)kind;
  e->state = UNSENT;
  e->refs = 1;
  pthread_cond_init(&e->cond, NULL);
  unsigned h = bucket_of(rg);
  e->next = c->buckets[h];
  c->buckets[h] = e;
  bitmap_set(&c->busy, rg);
  return e;
}

/* __fn: lock */
static void flight_unref_locked(struct flight *e)
{
  if (--e->refs == 0) {
    pthread_cond_destroy(&e->cond);
    free(e);
  }
}

/* __fn: lock */
static void flight_urgent_locked(struct cache *c, struct flight *e)
{
  if (e->kind == FETCH && !e->urgent && !e->done) {
    e->urgent = true;
    c->n_urgent++;
  }
}

/* The entry's answer is in (or the eviction is over): out of the table,
 * waiters woken.  __fn: lock */
static void flight_done_locked(struct cache *c, struct flight *e, int err)
{
  if (e->done)
    return;
  e->done = true;
  e->err = err;
  for (struct flight **pp = &c->buckets[bucket_of(e->region)]; *pp; pp = &(*pp)->next) {
    if (*pp == e) {
      *pp = e->next;
      break;
    }
  }
  bitmap_clear(&c->busy, e->region);
  if (e->urgent)
    c->n_urgent--;
  if (e->slot) {
    struct hslot *s = &c->hslots[e->slot - 1];
    if (--s->left == 0) {
      c->hyd_inflight--;
      c->hyd_inflight_bytes -= s->bytes;
      s->bytes = 0;
    }
    if (err)
      c->backoff_until = now_ns() + FAIL_BACKOFF_NS;
    e->slot = 0;
  }
  pthread_cond_broadcast(&e->cond);
  pthread_cond_signal(&c->hyd_cond);
  flight_unref_locked(e);
}

/* Wakes whoever waits on rg's entry (the region became present). */
static void wake_region(struct cache *c, uint64_t rg)
{
  if (!bitmap_test(&c->busy, rg))
    return;
  pthread_mutex_lock(&c->lock);
  struct flight *e = flight_find_locked(c, rg);
  if (e)
    pthread_cond_broadcast(&e->cond);
  pthread_mutex_unlock(&c->lock);
}

static bool region_evicting(struct cache *c, uint64_t rg)
{
  if (!bitmap_test(&c->busy, rg))
    return false;
  pthread_mutex_lock(&c->lock);
  struct flight *e = flight_find_locked(c, rg);
  bool r = e && e->kind == EVICT;
  pthread_mutex_unlock(&c->lock);
  return r;
}

/* ---- sending requests (lock) ---- */

static int flight_cmp(const void *a, const void *b)
{
  uint64_t x = (*(struct flight *const *)a)->region, y = (*(struct flight *const *)b)->region;
  return x < y ? -1 : x > y;
}

/* __fn: lock */
static void run_set_state_locked(struct flight **v, uint32_t n, enum flight_state s)
{
  uint64_t now = now_ns();
  for (uint32_t i = 0; i < n; i++) {
    if (v[i]->done)
      continue;
    v[i]->state = (unsigned char)s;
    if (s == SENT)
      v[i]->sent_ns = now;
  }
}

/* Sends the run of entries v[0..n) (contiguous regions, state SENDING, each
 * holding a sender's ref, dropped here).  __fn: lock, released while
 * request() runs. */
static void send_run_locked(struct cache *c, struct flight **v, uint32_t n)
{
  for (;;) {
    bool urgent = false, live = false;
    for (uint32_t i = 0; i < n; i++) {
      if (!v[i]->done) {
        live = true;
        urgent |= v[i]->urgent;
      }
    }
    if (!live)
      break;
    if (!c->have_fetcher || !c->link_up || c->stop) {
      run_set_state_locked(v, n, UNSENT);
      break;
    }
    struct cache_fetcher f = c->fetcher;
    uint64_t epoch = c->epoch;
    c->calls++;
    pthread_mutex_unlock(&c->lock);
    int r = f.request(f.opaque, v[0]->region, n, urgent);
    pthread_mutex_lock(&c->lock);
    if (--c->calls == 0)
      pthread_cond_broadcast(&c->calls_cond);
    if (r == 0)
      stat_add(&c->fetch_requests, 1);
    if (r == 0 && epoch == c->epoch) {
      run_set_state_locked(v, n, SENT);
      break;
    }
    if (r == 0 || r == -ENOTCONN) {
      /* Lost in a link change, or no link now: again at once if the link
       * came back meanwhile, else at link_up. */
      if (epoch != c->epoch && c->link_up && c->have_fetcher && !c->stop)
        continue;
      run_set_state_locked(v, n, UNSENT);
      break;
    }
    log_error(c->disk_name, "cache: cannot request regions [%llu, %llu) from the source: %s",
              (unsigned long long)v[0]->region, (unsigned long long)(v[0]->region + n),
              strerror(r < 0 ? -r : EIO));
    for (uint32_t i = 0; i < n; i++)
      if (!v[i]->done && !v[i]->filling)
        flight_done_locked(c, v[i], r < 0 ? r : -EIO);
    break;
  }
  for (uint32_t i = 0; i < n; i++)
    flight_unref_locked(v[i]);
}

/* Sends entries (state SENDING, a sender's ref each) in runs of contiguous
 * regions.  __fn: lock */
static void send_locked(struct cache *c, struct flight **v, size_t n)
{
  qsort(v, n, sizeof *v, flight_cmp);
  for (size_t i = 0; i < n;) {
    uint32_t k = 1;
    while (i + k < n && k < CACHE_MAX_FETCH_REGIONS && v[i + k]->region == v[i + k - 1]->region + 1)
      k++;
    send_run_locked(c, v + i, k);
    i += k;
  }
}

/* Sends again the outstanding fetches: all of them (link up, new fetcher),
 * or those unanswered too long (lost frames).  Returns how many.  __fn: lock */
static size_t resend_locked(struct cache *c, bool all)
{
  uint64_t now = now_ns();
  struct flight **v = NULL;
  size_t n = 0, cap = 0;
  for (unsigned h = 0; h < NBUCKETS; h++) {
    for (struct flight *e = c->buckets[h]; e; e = e->next) {
      if (e->kind != FETCH || e->filling || e->state == SENDING)
        continue;
      if (!all && !(e->state == SENT &&
                    now - e->sent_ns >= (e->urgent ? CACHE_RETRY_NS : CACHE_RETRY_BG_NS)))
        continue;
      if (n == cap) {
        size_t ncap = cap ? 2 * cap : 64;
        struct flight **nv = realloc(v, ncap * sizeof *nv);
        if (!nv)
          goto send;
        v = nv;
        cap = ncap;
      }
      e->state = SENDING;
      e->refs++;
      v[n++] = e;
    }
  }
send:
  if (n && !all)
    log_warn(c->disk_name, "cache: %zu region request(s) unanswered for too long (a lost "
             "frame?): sending them again", n);
  if (n)
    send_locked(c, v, n);
  free(v);
  return n;
}

/* ---- waiting for data ---- */

static void waiter_add(struct cache *c, struct waiter *w, uint64_t since, uint64_t first,
                       uint64_t last)
{
  pthread_mutex_lock(&c->lock);
  w->since = since;
  w->first = first;
  w->last = last;
  w->prev = c->waiters.prev;
  w->next = &c->waiters;
  c->waiters.prev->next = w;
  c->waiters.prev = w;
  c->nwaiting++;
  pthread_mutex_unlock(&c->lock);
}

static void waiter_del(struct cache *c, struct waiter *w)
{
  pthread_mutex_lock(&c->lock);
  w->prev->next = w->next;
  w->next->prev = w->prev;
  c->nwaiting--;
  pthread_mutex_unlock(&c->lock);
}

/* Makes sure every missing region of rgs[] is being fetched (urgent: a
 * guest waits) and, with wait, waits until each is present, or its fetch
 * failed, or its eviction is over (the caller looks again).  Returns 0,
 * -ENOMEM, or the error of a failed fetch. */
static int fetch_regions(struct cache *c, const uint64_t *rgs, size_t n, bool urgent, bool wait)
{
  if (n == 0)
    return 0;
  struct flight **held = calloc(2 * n, sizeof *held);
  if (!held)
    return -ENOMEM;
  struct flight **tosend = held + n;
  size_t nh = 0, ns = 0;
  int r = 0;
  pthread_mutex_lock(&c->lock);
  if (c->shut) {
    pthread_mutex_unlock(&c->lock);
    free(held);
    return -ESHUTDOWN;
  }
  for (size_t i = 0; i < n; i++) {
    uint64_t rg = rgs[i];
    if (bitmap_test(&c->present, rg))
      continue;
    struct flight *e = flight_find_locked(c, rg);
    if (!e) {
      if (!(e = flight_add_locked(c, rg, FETCH))) {
        r = -ENOMEM;
        break;
      }
      e->state = SENDING;
      e->refs++;
      tosend[ns++] = e;
    }
    if (urgent)
      flight_urgent_locked(c, e);
    if (wait) {
      e->refs++;
      held[nh++] = e;
    }
  }
  if (ns)
    send_locked(c, tosend, ns);
  for (size_t i = 0; i < nh; i++) {
    struct flight *e = held[i];
    while (!e->done && !bitmap_test(&c->present, e->region) && !c->shut)
      pthread_cond_wait(&e->cond, &c->lock);
    if (c->shut && !e->done && !bitmap_test(&c->present, e->region) && r == 0)
      r = -ESHUTDOWN;
    if (!bitmap_test(&c->present, e->region) && e->err && r == 0)
      r = e->err;
    flight_unref_locked(e);
  }
  pthread_mutex_unlock(&c->lock);
  free(held);
  return r;
}

/* Regions of [first, last] not present, into *v (grown as needed). */
static size_t missing_regions(struct cache *c, uint64_t first, uint64_t last, uint64_t **v,
                              size_t *cap)
{
  size_t n = 0;
  for (uint64_t rg = bitmap_next(&c->present, first, false); rg <= last;
       rg = bitmap_next(&c->present, rg + 1, false)) {
    if (n == *cap) {
      size_t ncap = *cap ? 2 * *cap : 16;
      uint64_t *nv = realloc(*v, ncap * sizeof *nv);
      if (!nv)
        break;          /* the caller fetches these first, then looks again */
      *v = nv;
      *cap = ncap;
    }
    (*v)[n++] = rg;
  }
  return n;
}

/* ---- eviction ---- */

/* __fn: rw exclusive + lock */
static bool evictable_locked(struct cache *c, uint64_t rg)
{
  if (bitmap_test(&c->hole, rg) || bitmap_test(&c->busy, rg))
    return false;
  /* A guest request waiting for data keeps what it already has: else, with
   * a small quota, regions it waited for could go before it reads them. */
  for (struct waiter *w = c->waiters.next; w != &c->waiters; w = w->next)
    if (rg >= w->first && rg <= w->last)
      return false;
  const struct bitmap *d = atomic_load(&c->dirty);
  if (d && rg < d->nbits && bitmap_test(d, rg))
    return false;
  if (atomic_load(&c->rpo_active) && bitmap_test(&c->rpo_bits, rg))
    return false;
  return true;
}

/* Evicts clean regions (CLOCK) until about want bytes are freed or none is
 * left; returns the bytes freed. */
static uint64_t evict(struct cache *c, uint64_t want)
{
  uint64_t victims[EVICT_BATCH];
  struct flight *ents[EVICT_BATCH];
  size_t nv = 0;
  uint64_t bytes = 0;

  pthread_mutex_lock(&c->evict_lock);
  pthread_rwlock_wrlock(&c->rw);
  pthread_mutex_lock(&c->lock);
  uint64_t rg = c->hand, steps = 0, limit = 2 * c->nregions + 2;
  while (nv < EVICT_BATCH && bytes < want && steps < limit && atomic_load(&c->npresent)) {
    rg = bitmap_next(&c->present, rg, true);
    steps++;
    if (rg >= c->nregions) {
      rg = 0;
      continue;
    }
    if (evictable_locked(c, rg) && !test_and_clear(&c->ref, rg)) {
      struct flight *e = flight_add_locked(c, rg, EVICT);
      if (!e)
        break;
      ents[nv] = e;
      victims[nv++] = rg;
      bytes += region_len(c, rg);
    }
    rg++;
  }
  c->hand = rg;
  present_clear(c, victims, nv);
  pthread_mutex_unlock(&c->lock);
  pthread_rwlock_unlock(&c->rw);

  int r = 0;
  if (nv) {
    /* The cleared bits are durable before any hole exists. */
    r = group_commit_wait(&c->gc);
    for (size_t i = 0; r == 0 && i < nv;) {
      size_t k = 1;
      while (i + k < nv && victims[i + k] == victims[i + k - 1] + 1)
        k++;
      uint64_t off = region_off(c, victims[i]);
      punch(c, off, region_off(c, victims[i + k - 1]) + region_len(c, victims[i + k - 1]) - off);
      i += k;
    }
    pthread_mutex_lock(&c->lock);
    for (size_t i = 0; i < nv; i++)
      flight_done_locked(c, ents[i], 0);
    c->complete_logged = false;
    pthread_mutex_unlock(&c->lock);
    stat_add(&c->evictions, nv);
    if (r == 0)
      usage_sub(c, bytes);
  }
  pthread_mutex_unlock(&c->evict_lock);
  return r == 0 ? bytes : 0;
}

/* A fill of need bytes is about to be written: evicts first what the quota
 * needs (see DESIGN). */
static void quota_reserve(struct cache *c, uint64_t need)
{
  pthread_mutex_lock(&c->quota_lock);
  c->reserved += need;
  uint64_t q = atomic_load(&c->quota);
  if (q && need) {
    uint64_t u = usage(c, false);
    if (u + c->reserved > q)
      u = usage(c, true);       /* the estimate may be off: measure */
    while (u + c->reserved > q) {
      uint64_t freed = evict(c, u + c->reserved - q + q / 64);
      uint64_t u2 = usage(c, true);
      if (freed == 0 || u2 >= u) {
        uint64_t now = now_ns();
        if (!c->over_logged_ns || now - c->over_logged_ns >= OVER_LOG_NS) {
          c->over_logged_ns = now;
          log_warn(c->disk_name, "cache: over its quota (%llu of %llu bytes used) with nothing "
                   "left to evict (the rest is dirty, in an RPO point or in use); fills go on",
                   (unsigned long long)(u2 + c->reserved), (unsigned long long)q);
        }
        break;
      }
      u = u2;
    }
  }
  pthread_mutex_unlock(&c->quota_lock);
}

static void quota_release(struct cache *c, uint64_t need)
{
  pthread_mutex_lock(&c->quota_lock);
  c->reserved -= need;
  pthread_mutex_unlock(&c->quota_lock);
}

/* ---- RPO capture ---- */

/* Passes region rg's current content to the point's fn.  __fn: caller holds
 * rg's stripe; rg is pending (so present, and never evicted meanwhile). */
static int capture_locked(struct cache *c, uint64_t rg)
{
  uint32_t len = region_len(c, rg);
  void *buf = malloc(len);
  if (!buf)
    return -ENOMEM;
  int r = c->local->ops->pread(c->local, buf, len, region_off(c, rg), false);
  if (r == 0) {
    r = c->rpo_fn(c->rpo_opaque, rg, buf, len);
    if (r > 0)
      r = -EIO;
    if (r < 0)
      log_warn(c->disk_name, "cache: RPO capture of region %llu failed: %s",
               (unsigned long long)rg, strerror(-r));
  } else {
    log_error(c->disk_name, "cache: cannot read region %llu for the RPO point: %s",
              (unsigned long long)rg, strerror(-r));
  }
  if (r == 0)
    bitmap_clear(&c->rpo_pending, rg);
  free(buf);
  return r;
}

/* ---- backend ops ---- */

static int cache_pread(struct backend *b, void *buf, uint32_t len, uint64_t off, bool nowait)
{
  struct cache *c = cache_of(b);
  if (len == 0)
    return 0;
  if (off > c->size || len > c->size - off)
    return -EINVAL;
  uint64_t t0 = now_ns();
  uint64_t first = off >> c->shift, last = (off + len - 1) >> c->shift;
  uint64_t *miss = NULL;
  size_t cap = 0;
  bool missed = false, waiting = false;
  struct waiter w;
  int r;
  for (;;) {
    if (nowait) {
      if (pthread_rwlock_tryrdlock(&c->rw) != 0) {
        r = -EAGAIN;                   /* an eviction is picking its victims */
        break;
      }
    } else {
      pthread_rwlock_rdlock(&c->rw);
    }
    if (bitmap_next(&c->present, first, false) > last) {
      unsigned us = atomic_load_explicit(&c->inject_read_us, memory_order_relaxed);
      if (us)
        usleep(us);
      r = c->local->ops->pread(c->local, buf, len, off, nowait);
      pthread_rwlock_unlock(&c->rw);
      for (uint64_t rg = first; rg <= last; rg++)
        bitmap_set(&c->ref, rg);
      /* Counted once per guest read: a NOWAIT try that the page cache
       * sends back (-EAGAIN) is counted by its retry. */
      if (!missed && r != -EAGAIN)
        stat_add(&c->read_hits, 1);
      break;
    }
    pthread_rwlock_unlock(&c->rw);
    if (nowait) {
      /* Neither counted nor fetched here: the retry without NOWAIT (a
       * worker, microseconds later) does both, so that every guest read
       * counts exactly once, as a hit or as a miss. */
      r = -EAGAIN;
      break;
    }
    if (!missed) {
      missed = true;
      stat_add(&c->read_misses, 1);
    }
    size_t n = missing_regions(c, first, last, &miss, &cap);
    if (!waiting) {
      waiter_add(c, &w, t0, first, last);
      waiting = true;
    }
    if ((r = fetch_regions(c, miss, n, true, true)) < 0)
      break;
  }
  if (waiting)
    waiter_del(c, &w);
  if (missed && r == 0)
    histogram_record(&c->miss_hist, now_ns() - t0);
  free(miss);
  return r;
}

enum op { OP_WRITE, OP_TRIM, OP_ZERO };

/* Trim: regions covered whole become present zeros (punched); the covered
 * part of a present region is trimmed (advisory); a part of a missing one
 * is left alone (the source's bytes are valid contents after a trim).
 * __fn: rw shared + the stripes; partial regions are present or skipped. */
static int trim_locked(struct cache *c, uint32_t len, uint64_t off)
{
  uint64_t end = off + len, pos = off;
  while (pos < end) {
    uint64_t rg = pos >> c->shift;
    uint64_t rend = MIN(region_off(c, rg) + region_len(c, rg), end);
    bool whole = pos == region_off(c, rg) && rend == region_off(c, rg) + region_len(c, rg);
    int r = 0;
    if (whole) {
      uint64_t k = rg + 1;   /* the whole regions that follow go in one call */
      while (k < c->nregions && region_off(c, k) + region_len(c, k) <= end)
        k++;
      rend = region_off(c, k - 1) + region_len(c, k - 1);
      r = c->local->ops->zero(c->local, (uint32_t)(rend - pos), pos, true);
    } else if (bitmap_test(&c->present, rg)) {
      r = c->local->ops->trim(c->local, (uint32_t)(rend - pos), pos);
    }
    if (r < 0)
      return r;
    pos = rend;
  }
  return 0;
}

/* write, trim and zero (see DESIGN). */
static int modify(struct cache *c, enum op op, const void *buf, uint32_t len, uint64_t off,
                  bool may_trim)
{
  if (len == 0)
    return 0;
  if (off > c->size || len > c->size - off)
    return -EINVAL;
  uint64_t t0 = now_ns();
  uint64_t end = off + len, first = off >> c->shift, last = (end - 1) >> c->shift;
  bool waiting = false;
  struct waiter w;
  int r;
  for (;;) {
    pthread_rwlock_rdlock(&c->rw);
    stripes_lock(c, first, last);

    /* Missing regions: a part of one is fetched first; one being evicted
     * is waited for; one covered whole needs nothing. */
    uint64_t need[3];
    size_t nneed = 0;
    bool partial = false;
    for (uint64_t rg = bitmap_next(&c->present, first, false); rg <= last && nneed < 3;
         rg = bitmap_next(&c->present, rg + 1, false)) {
      bool whole = off <= region_off(c, rg) && end >= region_off(c, rg) + region_len(c, rg);
      if (region_evicting(c, rg)) {
        need[nneed++] = rg;
        break;
      }
      if (!whole && op != OP_TRIM) {
        need[nneed++] = rg;   /* only the first and the last can be partial */
        partial = true;
      }
    }
    if (nneed) {
      stripes_unlock(c, first, last);
      pthread_rwlock_unlock(&c->rw);
      if (!waiting) {
        waiter_add(c, &w, t0, first, last);
        waiting = true;
        if (partial)
          stat_add(&c->write_fetches, 1);
      }
      if ((r = fetch_regions(c, need, nneed, true, true)) < 0)
        break;
      continue;
    }

    /* The point-time content of regions about to change goes first. */
    r = 0;
    if (atomic_load(&c->rpo_active)) {
      for (uint64_t rg = bitmap_next(&c->rpo_pending, first, true); r == 0 && rg <= last;
           rg = bitmap_next(&c->rpo_pending, rg + 1, true))
        r = capture_locked(c, rg);
    }

    if (r == 0) {
      switch (op) {
      case OP_WRITE:
        r = c->local->ops->pwrite(c->local, buf, len, off, false);
        break;
      case OP_ZERO:
        r = c->local->ops->zero(c->local, len, off, may_trim);
        break;
      default:
        r = trim_locked(c, len, off);
        break;
      }
      if (r < 0)
        log_error(c->disk_name, "cache: cannot %s %u bytes at %llu of the local image: %s",
                  op == OP_WRITE ? "write" : op == OP_ZERO ? "zero" : "trim", len,
                  (unsigned long long)off, strerror(-r));
    }
    if (r == 0) {
      for (uint64_t rg = first; rg <= last; rg++) {
        uint64_t ro = region_off(c, rg), rl = region_len(c, rg);
        bool whole = off <= ro && end >= ro + rl;
        bool was = bitmap_test(&c->present, rg);
        if (op == OP_WRITE) {
          if (!was || bitmap_test(&c->hole, rg))
            usage_add(c, blocks_of(MIN(end, ro + rl) - MAX(off, ro)));
          bitmap_clear(&c->hole, rg);
        } else if (whole && (op == OP_TRIM || may_trim)) {
          bitmap_set(&c->hole, rg);
        }
        if (!was && whole) {
          present_set_range(c, rg, 1);
          wake_region(c, rg);
        }
      }
    }
    stripes_unlock(c, first, last);
    pthread_rwlock_unlock(&c->rw);
    break;
  }
  if (waiting)
    waiter_del(c, &w);
  if (r == 0)
    r = group_commit_wait(&c->gc);   /* data and present bits durable */
  return r;
}

static int cache_pwrite(struct backend *b, const void *buf, uint32_t len, uint64_t off, bool fua)
{
  return modify(cache_of(b), OP_WRITE, buf, len, off, false);   /* always durable */
}

static int cache_trim(struct backend *b, uint32_t len, uint64_t off)
{
  return modify(cache_of(b), OP_TRIM, NULL, len, off, true);
}

static int cache_zero(struct backend *b, uint32_t len, uint64_t off, bool may_trim)
{
  return modify(cache_of(b), OP_ZERO, NULL, len, off, may_trim);
}

static int cache_flush(struct backend *b)
{
  return group_commit_wait(&cache_of(b)->gc);
}

static int cache_cache(struct backend *b, uint32_t len, uint64_t off)
{
  struct cache *c = cache_of(b);
  if (len == 0)
    return 0;
  if (off > c->size || len > c->size - off)
    return -EINVAL;
  uint64_t first = off >> c->shift, last = (off + len - 1) >> c->shift;
  uint64_t *miss = NULL;
  size_t cap = 0;
  size_t n = missing_regions(c, first, last, &miss, &cap);
  int r = fetch_regions(c, miss, n, false, false);
  free(miss);
  if (r == 0 && n == 0)
    r = c->local->ops->cache(c->local, len, off);
  return r;
}

struct ext_ctx {
  disk_extent_fn fn;
  void *opaque;
  int stop;         /* fn's non-zero answer */
};

static int ext_forward(void *opaque, uint64_t off, uint64_t len, uint32_t flags)
{
  struct ext_ctx *x = opaque;
  int r = x->fn(x->opaque, off, len, flags);
  if (r)
    x->stop = r;
  return r;
}

static int cache_extents(struct backend *b, uint64_t off, uint64_t len, disk_extent_fn fn,
                         void *opaque)
{
  struct cache *c = cache_of(b);
  uint64_t end = off < c->size ? MIN(c->size - off, len) + off : off;
  uint64_t pos = off;
  while (pos < end) {
    uint64_t rg = pos >> c->shift;
    bool p = bitmap_test(&c->present, rg);
    uint64_t nx = bitmap_next(&c->present, rg, !p);
    uint64_t run_end = MIN(nx >= c->nregions ? c->size : region_off(c, nx), end);
    if (p) {
      struct ext_ctx x = { fn, opaque, 0 };
      int r = c->local->ops->extents(c->local, pos, run_end - pos, ext_forward, &x);
      if (r < 0)
        return r;
      if (x.stop)
        return x.stop < 0 ? x.stop : 0;
    } else {
      int r = fn(opaque, pos, run_end - pos, 0);   /* at the source: data */
      if (r)
        return r < 0 ? r : 0;
    }
    pos = run_end;
  }
  return 0;
}

static uint64_t cache_allocated(struct backend *b)
{
  struct cache *c = cache_of(b);
  return c->local->ops->allocated(c->local);
}

static void cache_free(struct cache *c)
{
  for (unsigned h = 0; h < NBUCKETS; h++) {
    struct flight *e = c->buckets[h];
    while (e) {
      struct flight *nx = e->next;
      pthread_cond_destroy(&e->cond);
      free(e);
      e = nx;
    }
  }
  if (c->meta_fd >= 0)
    close(c->meta_fd);
  if (c->local)
    c->local->ops->close(c->local);
  bitmap_free(&c->present);
  bitmap_free(&c->hole);
  bitmap_free(&c->ref);
  bitmap_free(&c->busy);
  bitmap_free(&c->pending);
  bitmap_free(&c->rpo_bits);
  bitmap_free(&c->rpo_pending);
  bitmap_free(&c->rpo_absent);
  pthread_rwlock_destroy(&c->rw);
  for (unsigned i = 0; i < NSTRIPES; i++)
    pthread_mutex_destroy(&c->stripes[i]);
  pthread_mutex_destroy(&c->meta_lock);
  pthread_mutex_destroy(&c->lock);
  pthread_mutex_destroy(&c->quota_lock);
  pthread_mutex_destroy(&c->evict_lock);
  pthread_cond_destroy(&c->calls_cond);
  pthread_cond_destroy(&c->hyd_cond);
  group_commit_destroy(&c->gc);
  free(c->cbuf);
  free(c->cpages);
  free(c->hslots);
  free(c->hot);
  free(c->disk_name);
  free(c->meta_path);
  free(c);
}

static void cache_close(struct backend *b)
{
  struct cache *c = cache_of(b);
  pthread_mutex_lock(&c->lock);
  c->stop = true;
  pthread_cond_broadcast(&c->hyd_cond);
  pthread_mutex_unlock(&c->lock);
  if (c->hyd_started)
    pthread_join(c->hyd_thread, NULL);
  pthread_mutex_lock(&c->lock);
  while (c->calls)
    pthread_cond_wait(&c->calls_cond, &c->lock);
  pthread_mutex_unlock(&c->lock);
  int r = group_commit_wait(&c->gc);
  if (r < 0)
    log_error(c->disk_name, "cache: the present map could not be made durable at close: %s",
              strerror(-r));
  else
    log_info(c->disk_name, "cache: closed (%llu of %llu regions present)",
             (unsigned long long)atomic_load(&c->npresent), (unsigned long long)c->nregions);
  cache_free(c);
}

static const struct backend_ops cache_ops = {
  .name = "cache",
  .pread = cache_pread,
  .pwrite = cache_pwrite,
  .flush = cache_flush,
  .trim = cache_trim,
  .zero = cache_zero,
  .cache = cache_cache,
  .extents = cache_extents,
  .allocated = cache_allocated,
  .close = cache_close,
};

/* ---- hydration ---- */

/* The next run to hydrate, without moving the cursor: hot regions first,
 * then ascending from the cursor.  n = 0: none (all present or in flight).
 * __fn: lock */
static void hydrate_pick_locked(struct cache *c, uint64_t *first, uint32_t *n, bool *from_hot)
{
  *n = 0;
  while (c->hot_pos < c->nhot) {
    uint64_t rg = c->hot[c->hot_pos];
    if (rg >= c->nregions || bitmap_test(&c->present, rg) || bitmap_test(&c->busy, rg)) {
      c->hot_pos++;
      continue;
    }
    uint32_t k = 1;   /* hot regions listed one after another go in one request */
    while (c->hot_pos + k < c->nhot && k < CACHE_MAX_FETCH_REGIONS &&
           c->hot[c->hot_pos + k] == rg + k && rg + k < c->nregions &&
           !bitmap_test(&c->present, rg + k) && !bitmap_test(&c->busy, rg + k))
      k++;
    *first = rg;
    *n = k;
    *from_hot = true;
    return;
  }
  uint64_t from = c->cursor < c->nregions ? c->cursor : 0;
  for (int pass = 0; pass < 2; pass++) {
    uint64_t rg = bitmap_next(&c->present, from, false);
    while (rg < c->nregions && bitmap_test(&c->busy, rg))
      rg = bitmap_next(&c->present, rg + 1, false);
    if (rg < c->nregions) {
      uint32_t k = 1;
      while (rg + k < c->nregions && k < CACHE_MAX_FETCH_REGIONS &&
             !bitmap_test(&c->present, rg + k) && !bitmap_test(&c->busy, rg + k))
        k++;
      *first = rg;
      *n = k;
      *from_hot = false;
      return;
    }
    if (from == 0)
      break;
    from = 0;   /* wrap: regions passed over while in flight, failed or evicted */
  }
}

/* One step of hydration: 0 when it sent a request (go on at once), else how
 * long to sleep at most.  __fn: lock */
static uint64_t hydrate_step_locked(struct cache *c, uint64_t now)
{
  if (!c->bps || !c->have_fetcher || !c->link_up)
    return SEC_NS;                         /* off or paused */
  /* Misses first: while one waits, at most one hydration request is out, so
   * a miss never queues behind more than one on the link, and a VM that
   * always has a miss outstanding does not starve hydration. */
  if (c->n_urgent && c->hyd_inflight >= 1)
    return RETRY_SCAN_NS;
  if (c->hyd_inflight >= c->hyd_max)
    return SEC_NS;
  if (now < c->backoff_until)
    return c->backoff_until - now;
  if (atomic_load(&c->npresent) == c->nregions) {
    if (!c->complete_logged)
      log_info(c->disk_name, "cache: hydration complete (%llu regions present)",
               (unsigned long long)c->nregions);
    c->complete_logged = true;
    return SEC_NS;
  }

  double burst = MAX((double)c->bps / 20, (double)c->gran);
  c->tokens += (double)(now - c->tokens_ns) * (double)c->bps / 1e9;
  if (c->tokens > burst)
    c->tokens = burst;
  c->tokens_ns = now;
  if (c->tokens < 0)
    return (uint64_t)(-c->tokens * 1e9 / (double)c->bps) + 1;

  uint64_t first;
  uint32_t n;
  bool from_hot;
  hydrate_pick_locked(c, &first, &n, &from_hot);
  if (n == 0)
    return SEC_NS;
  uint64_t q = atomic_load(&c->quota);
  if (q) {
    /* A cache smaller than the disk keeps the hot part: hydration stops
     * short of 90% of the quota, counting what it has in flight. */
    uint64_t limit = q / 10 * 9, u = usage(c, false) + c->hyd_inflight_bytes;
    if (u >= limit)
      return RETRY_SCAN_NS;
    uint64_t fit = (limit - u) >> c->shift;
    if (fit == 0)
      return RETRY_SCAN_NS;
    n = (uint32_t)MIN((uint64_t)n, fit);
  }
  unsigned slot = 0;
  while (slot < c->hyd_max && c->hslots[slot].left)
    slot++;
  if (slot == c->hyd_max)
    return SEC_NS;

  struct flight *v[CACHE_MAX_FETCH_REGIONS];
  uint64_t bytes = 0;
  uint32_t k = 0;
  for (; k < n; k++) {
    struct flight *e = flight_add_locked(c, first + k, FETCH);
    if (!e)
      break;
    e->state = SENDING;
    e->slot = slot + 1;
    e->refs++;
    v[k] = e;
    bytes += region_len(c, first + k);
  }
  if (k == 0)
    return SEC_NS;
  if (from_hot)
    c->hot_pos += k;
  else
    c->cursor = first + k;
  c->hslots[slot].left = k;
  c->hslots[slot].bytes = bytes;
  c->hyd_inflight++;
  c->hyd_inflight_bytes += bytes;
  c->tokens -= (double)bytes;
  send_run_locked(c, v, k);
  return 0;
}

static void *hydrate_main(void *arg)
{
  struct cache *c = arg;
  pthread_mutex_lock(&c->lock);
  while (!c->stop) {
    uint64_t now = now_ns();
    if (now >= c->next_retry_scan) {
      c->next_retry_scan = now + RETRY_SCAN_NS;
      if (resend_locked(c, false))
        continue;
    }
    uint64_t sleep_ns = hydrate_step_locked(c, now);
    if (sleep_ns == 0)
      continue;
    if (sleep_ns > RETRY_SCAN_NS)
      sleep_ns = RETRY_SCAN_NS;   /* the lost-frame scan goes on */
    cond_wait_ns(&c->hyd_cond, &c->lock, sleep_ns);
  }
  pthread_mutex_unlock(&c->lock);
  return NULL;
}

/* ---- public ---- */

struct cache *cache_open(const struct cache_config *cfg, struct backend *local, char *err,
                         size_t errlen)
{
  const char *name = cfg->disk_name ? cfg->disk_name : "";
  if (!local) {
    snprintf(err, errlen, "cache: no local image");
    return NULL;
  }
  uint64_t g = cfg->granularity;
  if (g < 4096 || g > MAX_GRANULARITY || (g & (g - 1)) || local->size == 0 || !cfg->meta_path) {
    snprintf(err, errlen, "cache: bad configuration (granularity %llu: a power of two from "
             "4096 to 1 GiB; disk size %llu; meta path %s)", (unsigned long long)g,
             (unsigned long long)local->size, cfg->meta_path ? cfg->meta_path : "missing");
    log_error(name, "%s", err);
    local->ops->close(local);
    return NULL;
  }
  struct cache *c = calloc(1, sizeof *c);
  if (!c) {
    snprintf(err, errlen, "cache: out of memory");
    local->ops->close(local);
    return NULL;
  }
  c->local = local;
  c->meta_fd = -1;
  c->gran = g;
  c->shift = (unsigned)__builtin_ctzll(g);
  c->size = local->size;
  c->nregions = DIV_ROUND_UP(c->size, g);
  c->npages = DIV_ROUND_UP(c->nregions, (uint64_t)CACHE_META_PAGE_BITS);
  c->disk_name = strdup(name);
  c->meta_path = strdup(cfg->meta_path);
  c->hyd_max = cfg->hydrate_inflight ? cfg->hydrate_inflight : 8;
  c->hslots = calloc(c->hyd_max, sizeof *c->hslots);
  c->cbuf = malloc((size_t)(c->npages * PAGE));
  c->cpages = calloc(c->npages, sizeof *c->cpages);

  pthread_rwlockattr_t ra;
  pthread_rwlockattr_init(&ra);
  pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init(&c->rw, &ra);
  pthread_rwlockattr_destroy(&ra);
  for (unsigned i = 0; i < NSTRIPES; i++)
    pthread_mutex_init(&c->stripes[i], NULL);
  pthread_mutex_init(&c->meta_lock, NULL);
  pthread_mutex_init(&c->lock, NULL);
  pthread_mutex_init(&c->quota_lock, NULL);
  pthread_mutex_init(&c->evict_lock, NULL);
  pthread_cond_init(&c->calls_cond, NULL);
  cond_init_monotonic(&c->hyd_cond);
  group_commit_init(&c->gc, commit_fn, c);
  c->waiters.prev = c->waiters.next = &c->waiters;
  histogram_reset(&c->miss_hist);

  bool oom = !c->disk_name || !c->meta_path || !c->hslots || !c->cbuf || !c->cpages;
  oom = oom || bitmap_init(&c->present, c->nregions) < 0 || bitmap_init(&c->hole, c->nregions) < 0;
  oom = oom || bitmap_init(&c->ref, c->nregions) < 0 || bitmap_init(&c->busy, c->nregions) < 0;
  oom = oom || bitmap_init(&c->pending, c->npages) < 0;
  oom = oom || bitmap_init(&c->rpo_bits, c->nregions) < 0;
  oom = oom || bitmap_init(&c->rpo_pending, c->nregions) < 0;
  oom = oom || bitmap_init(&c->rpo_absent, c->nregions) < 0;
  if (oom) {
    snprintf(err, errlen, "cache: out of memory for %llu regions",
             (unsigned long long)c->nregions);
    cache_free(c);
    return NULL;
  }

  c->b.ops = &cache_ops;
  c->b.fd = local->fd;
  c->b.size = c->size;
  c->b.is_block_device = false;
  c->b.disk_name = c->disk_name;

  if (cfg->create) {
    /* The new map first: once it is durable nothing is present, so the old
     * contents may go. */
    if (meta_create(c, err, errlen) < 0) {
      cache_free(c);
      return NULL;
    }
    for (uint64_t pos = 0; pos < c->size; pos += MAX_GRANULARITY)
      if (!punch(c, pos, MIN(MAX_GRANULARITY, c->size - pos)))
        break;
  } else {
    if (meta_load(c, err, errlen) < 0) {
      cache_free(c);
      return NULL;
    }
    scan_holes(c);
  }
  atomic_store(&c->quota, cfg->quota_bytes);
  usage(c, true);
  c->link_up = true;
  c->bps = cfg->hydrate_bps;
  c->tokens_ns = now_ns();
  if (pthread_create(&c->hyd_thread, NULL, hydrate_main, c) != 0) {
    snprintf(err, errlen, "cache: cannot start the hydration thread");
    cache_free(c);
    return NULL;
  }
  c->hyd_started = true;
  log_info(c->disk_name, "cache: %s %s: %llu of %llu regions of %llu bytes present",
           cfg->create ? "created" : "opened", c->meta_path,
           (unsigned long long)atomic_load(&c->npresent), (unsigned long long)c->nregions,
           (unsigned long long)c->gran);
  return c;
}

struct backend *cache_backend(struct cache *c) { return &c->b; }

bool cache_backend_is(const struct backend *b) { return b && b->ops == &cache_ops; }

void cache_set_fetcher(struct cache *c, const struct cache_fetcher *f)
{
  pthread_mutex_lock(&c->lock);
  if (f && f->request) {
    c->fetcher = *f;
    c->have_fetcher = true;
    resend_locked(c, true);
  } else {
    c->have_fetcher = false;
    while (c->calls)   /* the old fetcher may go once we return */
      pthread_cond_wait(&c->calls_cond, &c->lock);
  }
  pthread_cond_signal(&c->hyd_cond);
  pthread_mutex_unlock(&c->lock);
}

void cache_link_up(struct cache *c)
{
  pthread_mutex_lock(&c->lock);
  c->link_up = true;
  c->epoch++;
  resend_locked(c, true);
  pthread_cond_signal(&c->hyd_cond);
  pthread_mutex_unlock(&c->lock);
}

void cache_link_down(struct cache *c)
{
  pthread_mutex_lock(&c->lock);
  c->link_up = false;
  c->epoch++;
  for (unsigned h = 0; h < NBUCKETS; h++)
    for (struct flight *e = c->buckets[h]; e; e = e->next)
      if (e->kind == FETCH && e->state == SENT)
        e->state = UNSENT;   /* lost with the link */
  pthread_mutex_unlock(&c->lock);
}

struct fill_item {
  struct flight *e;         /* held entry to complete (NULL: none) */
  bool zero, filled;
};

int cache_fill(struct cache *c, uint64_t first, uint32_t n, const void *data)
{
  if (n == 0)
    return 0;
  if (first >= c->nregions || n > c->nregions - first)
    return -EINVAL;
  struct fill_item *it = calloc(n, sizeof *it);
  if (!it)
    return -ENOMEM;
  const unsigned char *src = data;
  uint64_t need = 0;
  for (uint32_t i = 0; i < n; i++) {
    uint64_t rg = first + i;
    it[i].zero = !src || is_zero(src + (uint64_t)i * c->gran, region_len(c, rg));
    if (!it[i].zero && !bitmap_test(&c->present, rg))
      need += blocks_of(region_len(c, rg)) + META_ALLOWANCE;
  }
  quota_reserve(c, need);

  int err = 0;
  bool any = false;
  for (uint32_t i = 0; i < n; i++) {
    uint64_t rg = first + i, off = region_off(c, rg);
    uint32_t len = region_len(c, rg);
    pthread_mutex_t *s = stripe_of(c, rg);
    pthread_mutex_lock(s);
    pthread_mutex_lock(&c->lock);
    struct flight *e = flight_find_locked(c, rg);
    if (bitmap_test(&c->present, rg) || (e && (e->kind == EVICT || e->filling))) {
      /* Present (a guest write, a zero region): its fetch is answered.
       * Being evicted or filled by another fill: not ours to touch. */
      if (e && e->kind == FETCH && !e->filling) {
        e->refs++;
        it[i].e = e;
      }
      pthread_mutex_unlock(&c->lock);
      pthread_mutex_unlock(s);
      continue;
    }
    if (!e) {   /* unrequested: an entry all the same, so nobody else touches it */
      if (!(e = flight_add_locked(c, rg, FETCH))) {
        pthread_mutex_unlock(&c->lock);
        pthread_mutex_unlock(s);
        err = err ? err : -ENOMEM;
        continue;
      }
      e->state = SENT;
    }
    e->filling = true;
    e->refs++;
    it[i].e = e;
    bool urgent = e->urgent;
    pthread_mutex_unlock(&c->lock);

    int r = it[i].zero ? c->local->ops->zero(c->local, len, off, true)
                       : c->local->ops->pwrite(c->local, src + (uint64_t)i * c->gran, len, off,
                                               false);
    if (r == 0) {
      if (it[i].zero)
        bitmap_set(&c->hole, rg);
      else
        bitmap_clear(&c->hole, rg);
      if (urgent)
        bitmap_set(&c->ref, rg);   /* a guest wants it: not the first to go */
      present_set_range(c, rg, 1);
      it[i].filled = any = true;
      if (!it[i].zero)
        usage_add(c, blocks_of(len));
    } else {
      if (!err)
        log_error(c->disk_name, "cache: cannot write region %llu to the local image: %s",
                  (unsigned long long)rg, strerror(-r));
      err = err ? err : r;
      e->err = r;
    }
    pthread_mutex_unlock(s);
  }
  quota_release(c, need);

  int cr = any ? group_commit_wait(&c->gc) : 0;   /* data, then bits, durable */
  uint64_t filled = 0, hydrated = 0;
  pthread_mutex_lock(&c->lock);
  for (uint32_t i = 0; i < n; i++) {
    if (it[i].e && it[i].filled) {
      uint32_t len = region_len(c, first + i);
      filled += len;
      if (!it[i].e->urgent)
        hydrated += len;
    }
  }
  stat_add(&c->fetched_bytes, filled);   /* before any waiter wakes */
  stat_add(&c->hydrated_bytes, hydrated);
  for (uint32_t i = 0; i < n; i++) {
    struct flight *e = it[i].e;
    if (!e)
      continue;
    flight_done_locked(c, e, it[i].filled ? cr : e->err);
    flight_unref_locked(e);
  }
  pthread_mutex_unlock(&c->lock);
  free(it);
  return err ? err : cr;
}

void cache_fetch_failed(struct cache *c, uint64_t first, uint32_t n, int err)
{
  if (err >= 0)
    err = -EIO;
  if (first >= c->nregions)
    return;
  uint64_t end = first + MIN((uint64_t)n, c->nregions - first);
  unsigned nfailed = 0;
  pthread_mutex_lock(&c->lock);
  for (uint64_t rg = first; rg < end; rg++) {
    struct flight *e = flight_find_locked(c, rg);
    if (e && e->kind == FETCH && !e->filling) {
      flight_done_locked(c, e, err);
      nfailed++;
    }
  }
  pthread_mutex_unlock(&c->lock);
  if (nfailed)
    log_warn(c->disk_name, "cache: the source could not send regions [%llu, %llu): %s",
             (unsigned long long)first, (unsigned long long)end, strerror(-err));
}

int cache_set_present_zero(struct cache *c, const struct bitmap *zero_regions)
{
  if (zero_regions->nbits != c->nregions)
    return -EINVAL;
  uint64_t max_run = MAX(UINT64_C(1), ZERO_RUN_BYTES >> c->shift);
  int r = 0;
  for (uint64_t rg = bitmap_next(zero_regions, 0, true); r == 0 && rg < c->nregions;) {
    uint64_t n = 1;
    while (rg + n < c->nregions && n < max_run && bitmap_test(zero_regions, rg + n))
      n++;
    pthread_rwlock_rdlock(&c->rw);
    stripes_lock(c, rg, rg + n - 1);
    /* Not present and nobody else's (being evicted or filled): zeros.  A
     * fetch in flight finds them present when its fill comes. */
    for (uint64_t a = rg; r == 0 && a < rg + n;) {
      bool ok;
      uint64_t z = a;
      do {
        ok = !bitmap_test(&c->present, z);
        if (ok && bitmap_test(&c->busy, z)) {
          pthread_mutex_lock(&c->lock);
          struct flight *e = flight_find_locked(c, z);
          ok = !e || (e->kind == FETCH && !e->filling);
          pthread_mutex_unlock(&c->lock);
        }
        if (ok)
          z++;
      } while (ok && z < rg + n);
      if (z > a) {
        r = c->local->ops->zero(c->local,
                                (uint32_t)(region_off(c, z - 1) + region_len(c, z - 1) -
                                           region_off(c, a)),
                                region_off(c, a), true);
        if (r == 0) {
          bitmap_set_range(&c->hole, a, z - a);
          present_set_range(c, a, z - a);
          for (uint64_t k = a; k < z; k++)
            wake_region(c, k);
        } else {
          log_error(c->disk_name, "cache: cannot zero regions [%llu, %llu) of the local "
                    "image: %s", (unsigned long long)a, (unsigned long long)z, strerror(-r));
        }
      }
      a = ok ? z : z + 1;
    }
    stripes_unlock(c, rg, rg + n - 1);
    pthread_rwlock_unlock(&c->rw);
    rg = bitmap_next(zero_regions, rg + n, true);
  }
  if (r == 0)
    r = group_commit_wait(&c->gc);
  return r;
}

void cache_set_hot(struct cache *c, const uint64_t *regions, size_t n)
{
  uint64_t *v = n ? malloc(n * sizeof *v) : NULL;
  if (n && !v) {
    log_warn(c->disk_name, "cache: out of memory for %zu hot regions: ignored", n);
    return;
  }
  if (n)
    memcpy(v, regions, n * sizeof *v);
  pthread_mutex_lock(&c->lock);
  free(c->hot);
  c->hot = v;
  c->nhot = n;
  c->hot_pos = 0;
  pthread_cond_signal(&c->hyd_cond);
  pthread_mutex_unlock(&c->lock);
}

void cache_set_hydration(struct cache *c, uint64_t bps)
{
  pthread_mutex_lock(&c->lock);
  if (bps && !c->bps) {
    c->tokens = 0;             /* no burst saved up while off */
    c->tokens_ns = now_ns();
  }
  c->bps = bps;
  pthread_cond_signal(&c->hyd_cond);
  pthread_mutex_unlock(&c->lock);
}

void cache_set_quota(struct cache *c, uint64_t bytes)
{
  atomic_store(&c->quota, bytes);
  if (bytes) {
    pthread_mutex_lock(&c->quota_lock);
    uint64_t u = usage(c, true);
    while (u + c->reserved > bytes) {
      uint64_t freed = evict(c, u + c->reserved - bytes + bytes / 64);
      uint64_t u2 = usage(c, true);
      if (freed == 0 || u2 >= u)
        break;
      u = u2;
    }
    pthread_mutex_unlock(&c->quota_lock);
  }
  pthread_mutex_lock(&c->lock);
  pthread_cond_signal(&c->hyd_cond);
  pthread_mutex_unlock(&c->lock);
}

void cache_set_dirty_map(struct cache *c, const struct bitmap *dirty)
{
  if (dirty && dirty->nbits != c->nregions)
    log_warn(c->disk_name, "cache: the dirty map has %llu bits for %llu regions (granularity "
             "mismatch?)", (unsigned long long)dirty->nbits, (unsigned long long)c->nregions);
  atomic_store(&c->dirty, dirty);
}

int cache_rpo_begin(struct cache *c, const struct bitmap *bits, cache_capture_fn fn, void *opaque)
{
  if (bits->nbits != c->nregions || !fn)
    return -EINVAL;
  pthread_rwlock_wrlock(&c->rw);
  if (atomic_load(&c->rpo_active)) {
    pthread_rwlock_unlock(&c->rw);
    return -EBUSY;
  }
  /* A region not present was never written here (it would be present: a
   * dirty region is never evicted): the source holds its point content. */
  for (uint64_t w = 0; w < bits->nwords; w++) {
    uint64_t b = atomic_load_explicit(&bits->words[w], memory_order_relaxed);
    uint64_t p = atomic_load_explicit(&c->present.words[w], memory_order_acquire);
    atomic_store_explicit(&c->rpo_bits.words[w], b, memory_order_relaxed);
    atomic_store_explicit(&c->rpo_pending.words[w], b & p, memory_order_relaxed);
    atomic_store_explicit(&c->rpo_absent.words[w], b & ~p, memory_order_relaxed);
  }
  c->rpo_fn = fn;
  c->rpo_opaque = opaque;
  atomic_store(&c->rpo_active, true);
  pthread_rwlock_unlock(&c->rw);
  return 0;
}

int cache_rpo_capture(struct cache *c, uint64_t region)
{
  if (!atomic_load(&c->rpo_active) || region >= c->nregions)
    return -EINVAL;
  pthread_mutex_t *s = stripe_of(c, region);
  pthread_mutex_lock(s);
  int r;
  if (!bitmap_test(&c->rpo_bits, region) || bitmap_test(&c->rpo_absent, region))
    r = 1;
  else if (!bitmap_test(&c->rpo_pending, region))
    r = 0;                               /* a writer captured it */
  else
    r = capture_locked(c, region);
  pthread_mutex_unlock(s);
  return r;
}

void cache_rpo_end(struct cache *c)
{
  pthread_rwlock_wrlock(&c->rw);   /* no writer is capturing */
  atomic_store(&c->rpo_active, false);
  bitmap_clear_all(&c->rpo_bits);
  bitmap_clear_all(&c->rpo_pending);
  bitmap_clear_all(&c->rpo_absent);
  c->rpo_fn = NULL;
  c->rpo_opaque = NULL;
  pthread_rwlock_unlock(&c->rw);
  pthread_mutex_lock(&c->lock);
  pthread_cond_signal(&c->hyd_cond);
  pthread_mutex_unlock(&c->lock);
}

bool cache_complete(struct cache *c) { return atomic_load(&c->npresent) == c->nregions; }

bool cache_present(struct cache *c, uint64_t region)
{
  return region < c->nregions && bitmap_test(&c->present, region);
}

int cache_sync(struct cache *c) { return group_commit_wait(&c->gc); }

void cache_get_stats(struct cache *c, struct cache_stats *out)
{
  memset(out, 0, sizeof *out);
  out->regions = c->nregions;
  out->present = atomic_load(&c->npresent);
  out->local_bytes = usage(c, true);
  out->quota_bytes = atomic_load(&c->quota);
  out->read_hits = atomic_load(&c->read_hits);
  out->read_misses = atomic_load(&c->read_misses);
  out->write_fetches = atomic_load(&c->write_fetches);
  out->fetch_requests = atomic_load(&c->fetch_requests);
  out->fetched_bytes = atomic_load(&c->fetched_bytes);
  out->hydrated_bytes = atomic_load(&c->hydrated_bytes);
  out->evictions = atomic_load(&c->evictions);
  uint64_t now = now_ns();
  pthread_mutex_lock(&c->lock);
  out->waiting = c->nwaiting;
  for (struct waiter *w = c->waiters.next; w != &c->waiters; w = w->next)
    if (now - w->since > out->oldest_wait_ns)
      out->oldest_wait_ns = now - w->since;
  pthread_mutex_unlock(&c->lock);
  out->miss_p50_ns = histogram_percentile(&c->miss_hist, 0.50);
  out->miss_p90_ns = histogram_percentile(&c->miss_hist, 0.90);
  out->miss_p99_ns = histogram_percentile(&c->miss_hist, 0.99);
  out->miss_max_ns = atomic_load(&c->miss_hist.max);
}

void cache_inject_commit_error(struct cache *c) { atomic_store(&c->inject_fail, true); }

void cache_inject_read_delay(struct cache *c, unsigned us) { atomic_store(&c->inject_read_us, us); }

void cache_shutdown(struct cache *c)
{
  pthread_mutex_lock(&c->lock);
  c->shut = true;
  for (size_t b = 0; b < NBUCKETS; b++)
    for (struct flight *e = c->buckets[b]; e; e = e->next)
      pthread_cond_broadcast(&e->cond);
  pthread_mutex_unlock(&c->lock);
}
