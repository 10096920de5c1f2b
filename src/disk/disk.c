/* disk: one VM disk, the "IO filter" every guest IO passes through (see
 * disk.h for the contract).
 *
 * DESIGN
 * A write, trim or zero goes:
 *   throttle (writes only) -> cbt_write_begin -> cbt_mark -> backend op ->
 *   cbt_write_end -> cbt_wait(ticket) -> heat_record
 * so the data write overlaps the map commit it needs, and the write is
 * acknowledged only once its dirty bits are durable (cbt.h).  The shared
 * lock from mark to data written is what lets cbt_swap() put every write on
 * exactly one side of a swap.
 *
 * NOWAIT (the NBD reader thread tries each request inline first): nothing
 * may block, and a request that returns -EAGAIN is run again from a worker.
 * So the mark comes first: if it needs a commit that is not durable yet, the
 * data is not touched and -EAGAIN goes back; the bits stay set (the retry
 * sets the same bits, so this is no change of meaning) and the commit is
 * already under way when the worker's retry waits for it.  A swap holding the
 * map's lock, a throttle that says wait, FUA, and zeroing a block device
 * (BLKZEROOUT writes the whole range) are -EAGAIN as well.
 *
 * With bits already durable and no limit set, a 4 KiB write costs: one shared
 * lock, a few atomic loads, the pwrite and the heat adds; no system call but
 * the pwrite.
 *
 * A map in fail mode makes writes to clean regions fail with -EIO before the
 * data is touched; a commit that fails under a write already done makes that
 * write fail (its data may be on disk: the guest sees an error, never a false
 * acknowledgement).
 *
 * Thread model: IO functions are lock free apart from the map's shared lock
 * and the throttle's mutex when a limit is set.  A ticker thread per disk
 * (heat on) folds heat once a second; disk_unref() stops it before anything
 * is freed. */
#include <stddef.h>

#include "disk/disk.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "common/util.h"
#include "cache/cache.h"
#include "disk/backend.h"
#include "disk/cbt.h"
#include "disk/snapshot.h"
#include "disk/throttle.h"

#define ERRLOG_INTERVAL_NS 1000000000ull   /* at most one IO error line a second */

struct disk {
  _Atomic unsigned refs;
  char *name, *image_path;
  struct backend *be;                  /* the image, or the cloud cache over it */
  struct cache *cache;                 /* non-NULL: be is this cache's backend */
  _Atomic(struct snapshot *) snap;     /* restore point, NULL when none */
  pthread_rwlock_t snap_lock;          /* shared by preservers, exclusive by detach */
  uint64_t size;
  uint64_t granularity;                /* of the map, also when CBT is off */
  struct cbt *cbt;                     /* NULL: CBT off */
  struct heat *heat;                   /* NULL: heat off */
  struct throttle throttle;
  _Atomic uint64_t limit_operator;     /* bytes/s, 0 = none (registry) */
  _Atomic uint64_t limit_backpressure; /* bytes/s, 0 = none (a migration) */
  pthread_mutex_t limit_lock;          /* orders updates of the two limits */
  _Atomic bool fenced;
  _Atomic bool fence_admits;           /* fenced, yet new clients may attach (read only) */
  pthread_mutex_t fence_lock;          /* guards fence_reason and cbt_owner */
  char fence_reason[160];
  char cbt_owner[64];                  /* "" or the migration that consumes the map */
  _Atomic unsigned clients;

  _Atomic uint64_t errlog_last_ns;     /* rate limit of IO error lines */
  _Atomic uint64_t errlog_suppressed;

  pthread_t ticker;                    /* heat folding, once a second */
  bool ticker_started;
  pthread_mutex_t tick_lock;           /* guards tick_stop */
  pthread_cond_t tick_cond;
  bool tick_stop;
};

/* ---- helpers ---- */

static void set_err(char *err, size_t errlen, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
  if (!err || !errlen)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/* Logs a backend failure, at most once a second per disk (a failing device
 * would otherwise flood the log at the guest's IO rate). */
static void log_io_error(struct disk *d, const char *op, uint64_t off, uint64_t len, int err)
{
  uint64_t now = now_ns();
  uint64_t last = atomic_load_explicit(&d->errlog_last_ns, memory_order_relaxed);
  if ((last && now - last < ERRLOG_INTERVAL_NS) ||
      !atomic_compare_exchange_strong(&d->errlog_last_ns, &last, now)) {
    atomic_fetch_add_explicit(&d->errlog_suppressed, 1, memory_order_relaxed);
    return;
  }
  uint64_t sup = atomic_exchange(&d->errlog_suppressed, 0);
  char more[64] = "";
  if (sup)
    snprintf(more, sizeof more, " (%llu more IO errors not shown)", (unsigned long long)sup);
  log_error(d->name, "%s of %llu bytes at %llu failed: %s%s", op, (unsigned long long)len,
            (unsigned long long)off, strerror(-err), more);
}

static void *ticker_main(void *arg)
{
  struct disk *d = arg;
  pthread_mutex_lock(&d->tick_lock);
  uint64_t next = now_ns() + HEAT_EPOCH_NS;
  while (!d->tick_stop) {
    struct timespec ts = { .tv_sec = (time_t)(next / 1000000000u),
                           .tv_nsec = (long)(next % 1000000000u) };
    pthread_cond_timedwait(&d->tick_cond, &d->tick_lock, &ts);
    if (d->tick_stop)
      break;
    uint64_t now = now_ns();
    if (now < next)
      continue;
    pthread_mutex_unlock(&d->tick_lock);
    heat_tick(d->heat);
    pthread_mutex_lock(&d->tick_lock);
    next += HEAT_EPOCH_NS;
    if (next <= now)
      next = now + HEAT_EPOCH_NS;    /* we fell behind (suspend): no catch-up burst */
  }
  pthread_mutex_unlock(&d->tick_lock);
  return NULL;
}

static void ticker_stop(struct disk *d)
{
  if (!d->ticker_started)
    return;
  pthread_mutex_lock(&d->tick_lock);
  d->tick_stop = true;
  pthread_cond_signal(&d->tick_cond);
  pthread_mutex_unlock(&d->tick_lock);
  pthread_join(d->ticker, NULL);
  d->ticker_started = false;
}

static void disk_free(struct disk *d)
{
  ticker_stop(d);
  if (d->cbt)
    cbt_close(d->cbt);
  heat_free(d->heat);
  if (d->be)
    d->be->ops->close(d->be);
  if (atomic_load(&d->snap))
    snapshot_close(atomic_load(&d->snap));
  pthread_rwlock_destroy(&d->snap_lock);
  throttle_destroy(&d->throttle);
  pthread_mutex_destroy(&d->limit_lock);
  pthread_mutex_destroy(&d->fence_lock);
  pthread_cond_destroy(&d->tick_cond);
  pthread_mutex_destroy(&d->tick_lock);
  free(d->name);
  free(d->image_path);
  free(d);
}

/* ---- open / close ---- */

struct disk *disk_open(const struct disk_config *cfg, char *err, size_t errlen)
{
  if (!cfg->name || !name_is_valid(cfg->name)) {
    set_err(err, errlen, "invalid disk name '%s'", cfg->name ? cfg->name : "");
    return NULL;
  }
  if (!cfg->image_path || !*cfg->image_path) {
    set_err(err, errlen, "disk '%s': no image path", cfg->name);
    return NULL;
  }
  uint64_t gran = cfg->cbt_granularity ? cfg->cbt_granularity : CBT_DEFAULT_GRANULARITY;
  if (gran < 4096 || (gran & (gran - 1))) {
    set_err(err, errlen, "disk '%s': cbt granularity %llu is not a power of two >= 4096",
            cfg->name, (unsigned long long)gran);
    return NULL;
  }
  if (cfg->cbt_enabled && (!cfg->cbt_path || !*cfg->cbt_path)) {
    set_err(err, errlen, "disk '%s': CBT on but no map path", cfg->name);
    return NULL;
  }

  struct disk *d = calloc(1, sizeof *d);
  if (!d) {
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  atomic_init(&d->refs, 1);
  d->granularity = gran;
  throttle_init(&d->throttle, cfg->write_limit_bps);
  atomic_init(&d->limit_operator, cfg->write_limit_bps);
  pthread_mutex_init(&d->limit_lock, NULL);
  pthread_mutex_init(&d->fence_lock, NULL);
  pthread_rwlock_init(&d->snap_lock, NULL);
  pthread_mutex_init(&d->tick_lock, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&d->tick_cond, &ca);
  pthread_condattr_destroy(&ca);
  d->name = strdup(cfg->name);
  d->image_path = strdup(cfg->image_path);
  if (!d->name || !d->image_path) {
    set_err(err, errlen, "out of memory");
    goto fail;
  }

  char berr[256];
  d->be = backend_file_open(cfg->image_path, d->name, berr, sizeof berr);
  if (!d->be) {
    set_err(err, errlen, "%s", berr);
    goto fail;
  }
  d->size = d->be->size;
  if (cfg->cache_path) {
    /* The cache takes the image's backend over and serves in its place. */
    struct cache_config cc = {
      .meta_path = cfg->cache_path,
      .disk_name = d->name,
      .granularity = gran,
      .quota_bytes = cfg->cache_quota,
      .create = cfg->cache_new,
      .hydrate_bps = 0,              /* the warm migration sets the rate once it runs */
    };
    struct backend *local = d->be;
    d->be = NULL;
    d->cache = cache_open(&cc, local, berr, sizeof berr);
    if (!d->cache) {
      set_err(err, errlen, "disk '%s': cloud cache: %s", cfg->name, berr);
      goto fail;
    }
    d->be = cache_backend(d->cache);
  }
  if (cfg->snapshot_path &&
      disk_attach_snapshot(d, cfg->snapshot_path, false, err, errlen) < 0)
    goto fail;

  if (cfg->cbt_enabled) {
    char cerr[256];
    d->cbt = cbt_open_ex(cfg->cbt_path, d->name, d->size, gran,
                         cfg->cbt_new ? CBT_OPEN_NEW : 0, cerr, sizeof cerr);
    if (!d->cbt) {
      set_err(err, errlen, "%s", cerr);
      goto fail;
    }
    if (d->cache)
      cache_set_dirty_map(d->cache, cbt_bitmap(d->cbt));
  } else if (cfg->cbt_path && *cfg->cbt_path) {
    /* Writes will go untracked: the map must not be trusted later. */
    int r = cbt_invalidate(cfg->cbt_path, d->name);
    if (r < 0) {
      set_err(err, errlen, "cannot flag the dirty map %s before serving without CBT: %s",
              cfg->cbt_path, strerror(-r));
      goto fail;
    }
  }

  if (cfg->heat_enabled) {
    d->heat = heat_new(d->size);
    if (!d->heat) {
      set_err(err, errlen, "out of memory for heat");
      goto fail;
    }
    if (pthread_create(&d->ticker, NULL, ticker_main, d) != 0) {
      set_err(err, errlen, "cannot start the heat ticker thread");
      goto fail;
    }
    d->ticker_started = true;
  }
  return d;

fail:
  disk_free(d);
  return NULL;
}

void disk_ref(struct disk *d)
{
  atomic_fetch_add_explicit(&d->refs, 1, memory_order_relaxed);
}

void disk_unref(struct disk *d)
{
  if (!d || atomic_fetch_sub_explicit(&d->refs, 1, memory_order_acq_rel) != 1)
    return;
  ticker_stop(d);
  disk_sync_all(d);
  disk_free(d);   /* cbt_close writes the map once more and fsyncs */
}

int disk_sync_all(struct disk *d)
{
  int r = d->be->ops->flush(d->be);
  if (r < 0)
    log_io_error(d, "flush", 0, d->size, r);
  if (d->cbt) {
    int rc = cbt_sync(d->cbt);
    if (r == 0)
      r = rc;
  }
  return r;
}

/* ---- accessors ---- */

const char *disk_name(const struct disk *d) { return d->name; }
const char *disk_image_path(const struct disk *d) { return d->image_path; }
uint64_t disk_size(const struct disk *d) { return d->size; }
bool disk_is_block_device(const struct disk *d) { return d->be->is_block_device; }
uint64_t disk_allocated_bytes(struct disk *d) { return d->be->ops->allocated(d->be); }
struct heat *disk_heat(struct disk *d) { return d->heat; }
struct cbt *disk_cbt(struct disk *d) { return d->cbt; }
bool disk_cbt_enabled(const struct disk *d) { return d->cbt != NULL; }
uint64_t disk_cbt_granularity(const struct disk *d) { return d->granularity; }
const char *disk_cbt_state(struct disk *d) { return d->cbt ? cbt_state(d->cbt) : "off"; }

/* The throttle runs at the lower of the limits that are set. */
static void apply_limits_locked(struct disk *d)
{
  uint64_t op = atomic_load(&d->limit_operator), bp = atomic_load(&d->limit_backpressure);
  uint64_t rate = !op ? bp : !bp ? op : MIN(op, bp);
  if (rate != throttle_rate(&d->throttle))
    throttle_set_rate(&d->throttle, rate);
}

void disk_set_write_limit(struct disk *d, uint64_t bytes_per_sec)
{
  pthread_mutex_lock(&d->limit_lock);
  atomic_store(&d->limit_operator, bytes_per_sec);
  apply_limits_locked(d);
  pthread_mutex_unlock(&d->limit_lock);
}

void disk_set_backpressure_limit(struct disk *d, uint64_t bytes_per_sec)
{
  pthread_mutex_lock(&d->limit_lock);
  atomic_store(&d->limit_backpressure, bytes_per_sec);
  apply_limits_locked(d);
  pthread_mutex_unlock(&d->limit_lock);
}

uint64_t disk_write_limit(const struct disk *d) { return atomic_load(&d->limit_operator); }
uint64_t disk_backpressure_limit(const struct disk *d)
{
  return atomic_load(&d->limit_backpressure);
}
uint64_t disk_effective_write_limit(const struct disk *d) { return throttle_rate(&d->throttle); }

void disk_set_fence(struct disk *d, const char *reason)
{
  pthread_mutex_lock(&d->fence_lock);
  snprintf(d->fence_reason, sizeof d->fence_reason, "%s", reason ? reason : "");
  atomic_store(&d->fenced, reason != NULL);
  if (!reason)
    atomic_store(&d->fence_admits, false);
  pthread_mutex_unlock(&d->fence_lock);
}

bool disk_fenced(const struct disk *d) { return atomic_load(&d->fenced); }

void disk_set_fence_admits(struct disk *d, bool admits) { atomic_store(&d->fence_admits, admits); }

bool disk_admits_clients(const struct disk *d)
{
  return !atomic_load(&d->fenced) || atomic_load(&d->fence_admits);
}

void disk_fence_reason(struct disk *d, char *buf, size_t len)
{
  pthread_mutex_lock(&d->fence_lock);
  snprintf(buf, len, "%s", atomic_load(&d->fenced) ? d->fence_reason : "");
  pthread_mutex_unlock(&d->fence_lock);
}

uint64_t disk_write_throttled_ns(struct disk *d)
{
  return atomic_load_explicit(&d->throttle.waited_ns, memory_order_relaxed);
}

void disk_client_attach(struct disk *d) { atomic_fetch_add(&d->clients, 1); }
void disk_client_detach(struct disk *d) { atomic_fetch_sub(&d->clients, 1); }
unsigned disk_clients(const struct disk *d) { return atomic_load(&d->clients); }

/* ---- IO ---- */

int disk_read(struct disk *d, void *buf, uint32_t len, uint64_t off, unsigned flags)
{
  struct heat *heat = flags & DISK_IO_REPLICA ? NULL : d->heat;   /* not the guest's IO */
  uint64_t t0 = heat ? now_ns() : 0;
  int r = d->be->ops->pread(d->be, buf, len, off, flags & DISK_IO_NOWAIT);
  if (r == 0) {
    if (heat)
      heat_record(heat, IO_READ, off, len, now_ns() - t0);
  } else if (r != -EAGAIN) {
    log_io_error(d, "read", off, len, r);
  }
  return r;
}

/* The write path shared by write, trim and zero (see the file comment). */
static int modify(struct disk *d, enum io_kind kind, const void *buf, uint32_t len, uint64_t off,
                  unsigned flags)
{
  bool replica = flags & DISK_IO_REPLICA;
  if (!replica && atomic_load_explicit(&d->fenced, memory_order_acquire))
    return -EROFS;               /* another site is authoritative (disk.h) */
  if (atomic_load_explicit(&d->snap, memory_order_acquire)) {
    /* The restore point keeps what is about to change, before it changes. */
    pthread_rwlock_rdlock(&d->snap_lock);
    struct snapshot *snap = atomic_load(&d->snap);
    int pr = snap ? snapshot_preserve(snap, d->be, off, len, flags & DISK_IO_NOWAIT) : 0;
    pthread_rwlock_unlock(&d->snap_lock);
    if (pr < 0) {
      if (pr != -EAGAIN)
        log_io_error(d, "restore point copy", off, len, pr);
      return pr;
    }
  }
  struct heat *heat = replica ? NULL : d->heat;
  struct cbt *cbt = replica ? NULL : d->cbt;
  uint64_t t0 = heat ? now_ns() : 0;
  bool nowait = flags & DISK_IO_NOWAIT;
  bool fua = flags & DISK_IO_FUA;
  uint64_t ticket = 0;
  int r;

  if (nowait) {
    /* A cloud cache makes every change durable before it returns. */
    if (fua || d->cache || (kind == IO_ZERO && d->be->is_block_device))
      return -EAGAIN;
    if (cbt) {
      if (!cbt_write_trybegin(cbt))
        return -EAGAIN;                        /* a swap is running */
      ticket = cbt_mark(cbt, off, len);
      if (ticket == CBT_TICKET_FAILED) {
        cbt_write_end(cbt);
        return -EIO;
      }
      if (!cbt_ticket_done(cbt, ticket)) {
        cbt_write_end(cbt);                 /* data untouched; commit under way */
        return -EAGAIN;
      }
      ticket = 0;
    }
    if (kind == IO_WRITE && !replica && (r = throttle_wait(&d->throttle, len, true)) < 0) {
      if (cbt)
        cbt_write_end(cbt);
      return r;
    }
  } else {
    /* Sleep in the limiter before taking the map's lock, so a throttled
     * writer never holds up a swap. */
    if (kind == IO_WRITE && !replica)
      throttle_wait(&d->throttle, len, false);
    if (cbt) {
      cbt_write_begin(cbt);
      ticket = cbt_mark(cbt, off, len);
      if (ticket == CBT_TICKET_FAILED) {
        cbt_write_end(cbt);
        return -EIO;
      }
    }
  }

  const char *op;
  switch (kind) {
  case IO_WRITE:
    op = "write";
    r = d->be->ops->pwrite(d->be, buf, len, off, fua);
    break;
  case IO_TRIM:
    op = "trim";
    r = d->be->ops->trim(d->be, len, off);
    break;
  default:
    op = "zero";
    r = d->be->ops->zero(d->be, len, off, flags & DISK_IO_MAY_TRIM);
    break;
  }
  if (cbt)
    cbt_write_end(cbt);
  if (r == 0 && fua && kind != IO_WRITE)
    r = d->be->ops->flush(d->be);
  if (r < 0)
    log_io_error(d, op, off, len, r);

  if (ticket) {
    int w = cbt_wait(cbt, ticket);
    if (w < 0 && r == 0)
      r = w;           /* the map says nothing of this write: never acknowledge it */
  }
  if (r == 0 && heat)
    heat_record(heat, kind, off, len, now_ns() - t0);
  return r;
}

int disk_write(struct disk *d, const void *buf, uint32_t len, uint64_t off, unsigned flags)
{
  return modify(d, IO_WRITE, buf, len, off, flags);
}

int disk_trim(struct disk *d, uint32_t len, uint64_t off, unsigned flags)
{
  return modify(d, IO_TRIM, NULL, len, off, flags);
}

int disk_zero(struct disk *d, uint32_t len, uint64_t off, unsigned flags)
{
  return modify(d, IO_ZERO, NULL, len, off, flags);
}

int disk_flush(struct disk *d)
{
  uint64_t t0 = d->heat ? now_ns() : 0;
  int r = d->be->ops->flush(d->be);
  if (r < 0)
    log_io_error(d, "flush", 0, d->size, r);
  else if (d->heat)
    heat_record(d->heat, IO_FLUSH, 0, 0, now_ns() - t0);
  return r;
}

int disk_cache(struct disk *d, uint32_t len, uint64_t off)
{
  uint64_t t0 = d->heat ? now_ns() : 0;
  int r = d->be->ops->cache(d->be, len, off);
  if (r < 0)
    log_io_error(d, "cache", off, len, r);
  else if (d->heat)
    heat_record(d->heat, IO_CACHE, off, len, now_ns() - t0);
  return r;
}

/* ---- extents ---- */

int disk_extents_allocation(struct disk *d, uint64_t off, uint64_t len, disk_extent_fn fn,
                            void *opaque)
{
  return d->be->ops->extents(d->be, off, len, fn, opaque);
}

int disk_extents_dirty(struct disk *d, uint64_t off, uint64_t len, disk_extent_fn fn,
                       void *opaque)
{
  uint64_t end = MIN(off + len, d->size);
  if (off >= end)
    return 0;
  if (!d->cbt) {                 /* nothing tracked: nothing can be called clean */
    int r = fn(opaque, off, end - off, DISK_EXTENT_DIRTY);
    return r < 0 ? r : 0;
  }
  const struct bitmap *bm = cbt_bitmap(d->cbt);
  unsigned shift = (unsigned)__builtin_ctzll(d->granularity);
  uint64_t pos = off;
  while (pos < end) {
    uint64_t bit = pos >> shift;
    bool dirty = bitmap_test(bm, bit);
    uint64_t next = bitmap_next(bm, bit + 1, !dirty);
    uint64_t stop = next >= bm->nbits ? end : MIN(next << shift, end);
    int r = fn(opaque, pos, stop - pos, dirty ? DISK_EXTENT_DIRTY : 0);
    if (r)
      return r < 0 ? r : 0;
    pos = stop;
  }
  return 0;
}

/* ---- dirty maps ---- */

uint64_t disk_dirty_bytes(struct disk *d)
{
  if (!d->cbt)
    return d->size;
  uint64_t bytes = cbt_dirty_count(d->cbt) * d->granularity;
  /* The last region may be short: count it at its real length, so this
   * agrees with the extents (which are cut at the disk size). */
  uint64_t nbits = cbt_nbits(d->cbt);
  if (nbits && bitmap_test(cbt_bitmap(d->cbt), nbits - 1))
    bytes -= nbits * d->granularity - d->size;
  return bytes;
}

/* Copies a bitmap into out (a plain malloc'ed word array, allocated by the
 * caller beforehand so that nothing can fail after a swap). */
static void map_out(struct disk *d, const struct bitmap *bm, uint64_t *words,
                    uint64_t generation, struct disk_dirty_map *out)
{
  for (uint64_t i = 0; i < bm->nwords; i++)
    words[i] = atomic_load_explicit(&bm->words[i], memory_order_relaxed);
  out->granularity = d->granularity;
  out->nbits = bm->nbits;
  out->words = words;
  out->generation = generation;
}

/* A map-sized bitmap and the word array it will be handed out in. */
static int map_alloc(struct disk *d, struct bitmap *bm, uint64_t **words)
{
  if (bitmap_init(bm, cbt_nbits(d->cbt)) < 0)
    return -ENOMEM;
  *words = malloc(MAX(bm->nwords, 1) * sizeof **words);
  if (!*words) {
    bitmap_free(bm);
    return -ENOMEM;
  }
  return 0;
}

int disk_dirty_snapshot(struct disk *d, struct disk_dirty_map *out)
{
  if (!d->cbt)
    return -EOPNOTSUPP;
  struct bitmap bm;
  uint64_t *words;
  int r = map_alloc(d, &bm, &words);
  if (r < 0)
    return r;
  uint64_t gen;
  do {         /* a swap in between would pair this map with the wrong generation */
    gen = cbt_generation(d->cbt);
    r = cbt_snapshot(d->cbt, &bm);
  } while (r == 0 && gen != cbt_generation(d->cbt));
  if (r == 0)
    map_out(d, &bm, words, gen, out);
  else
    free(words);
  bitmap_free(&bm);
  return r;
}

int disk_dirty_swap(struct disk *d, struct disk_dirty_map *out)
{
  if (!d->cbt)
    return -EOPNOTSUPP;
  struct bitmap bm;
  uint64_t *words;
  int r = map_alloc(d, &bm, &words);
  if (r < 0)
    return r;
  uint64_t newgen = 0;
  r = cbt_swap(d->cbt, &bm, &newgen);
  if (r == 0)
    map_out(d, &bm, words, newgen - 1, out);
  else
    free(words);
  bitmap_free(&bm);
  return r;
}

int disk_dirty_swap_keep(struct disk *d, int (*keep)(void *opaque, const struct bitmap *bits),
                         void *opaque, uint64_t *new_generation)
{
  if (!d->cbt)
    return -EOPNOTSUPP;
  struct bitmap bm;
  if (bitmap_init(&bm, cbt_nbits(d->cbt)) < 0)
    return -ENOMEM;
  int r = cbt_swap_keep(d->cbt, &bm, new_generation, keep, opaque);
  bitmap_free(&bm);
  return r;
}

int disk_dirty_swap_fast(struct disk *d, struct bitmap *bits, uint64_t *new_generation)
{
  if (!d->cbt)
    return -EOPNOTSUPP;
  return cbt_swap_fast(d->cbt, bits, new_generation);
}

void disk_set_cbt_owner(struct disk *d, const char *owner)
{
  pthread_mutex_lock(&d->fence_lock);
  snprintf(d->cbt_owner, sizeof d->cbt_owner, "%s", owner ? owner : "");
  pthread_mutex_unlock(&d->fence_lock);
}

bool disk_cbt_owner(struct disk *d, char *buf, size_t len)
{
  pthread_mutex_lock(&d->fence_lock);
  bool owned = d->cbt_owner[0] != '\0';
  if (buf && len)
    snprintf(buf, len, "%s", d->cbt_owner);
  pthread_mutex_unlock(&d->fence_lock);
  return owned;
}

/* ---- restore point ---- */

int disk_attach_snapshot(struct disk *d, const char *path, bool create, char *err, size_t errlen)
{
  char serr[256];
  struct snapshot *snap = snapshot_open(path, d->name, d->size, d->granularity, create, serr,
                                        sizeof serr);
  if (!snap) {
    set_err(err, errlen, "disk '%s': restore point %s: %s", d->name, path, serr);
    return -EIO;
  }
  pthread_rwlock_wrlock(&d->snap_lock);
  struct snapshot *old = atomic_exchange(&d->snap, snap);
  pthread_rwlock_unlock(&d->snap_lock);
  if (old)
    snapshot_close(old);
  return 0;
}

void disk_detach_snapshot(struct disk *d)
{
  pthread_rwlock_wrlock(&d->snap_lock);
  struct snapshot *old = atomic_exchange(&d->snap, NULL);
  pthread_rwlock_unlock(&d->snap_lock);
  if (old)
    snapshot_close(old);
}

bool disk_has_snapshot(struct disk *d) { return atomic_load(&d->snap) != NULL; }

int disk_restore_snapshot(struct disk *d, char *err, size_t errlen)
{
  pthread_rwlock_wrlock(&d->snap_lock);
  struct snapshot *snap = atomic_load(&d->snap);
  int r = snap ? snapshot_restore(snap, d->be) : -ENOENT;
  pthread_rwlock_unlock(&d->snap_lock);
  if (r == -ENOENT)
    set_err(err, errlen, "disk '%s' has no restore point", d->name);
  else if (r < 0)
    set_err(err, errlen, "disk '%s': restoring the restore point failed: %s", d->name,
            strerror(-r));
  return r;
}

bool disk_snapshot_info(struct disk *d, uint64_t *saved_bytes, uint64_t *created_ns)
{
  pthread_rwlock_rdlock(&d->snap_lock);
  struct snapshot *snap = atomic_load(&d->snap);
  if (snap) {
    *saved_bytes = snapshot_saved_bytes(snap);
    *created_ns = snapshot_created_ns(snap);
  }
  pthread_rwlock_unlock(&d->snap_lock);
  return snap != NULL;
}

/* ---- cloud cache ---- */

struct cache *disk_cache_layer(struct disk *d) { return d->cache; }

int disk_mark_dirty(struct disk *d, uint64_t off, uint64_t len)
{
  if (!d->cbt)
    return 0;
  cbt_write_begin(d->cbt);
  uint64_t ticket = cbt_mark(d->cbt, off, len);
  cbt_write_end(d->cbt);
  if (ticket == CBT_TICKET_FAILED)
    return -EIO;
  return ticket ? cbt_wait(d->cbt, ticket) : 0;
}
