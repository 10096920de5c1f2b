/* heat: per-region heat, per-disk rates, latency histograms and the sampled
 * trace of one disk (see heat.h for what is kept).
 *
 * DESIGN
 * Two halves: the hot path (heat_record, any thread, lock free) only does
 * relaxed atomic adds into "current" counters; the fold (heat_tick, once a
 * second, under `lock`) moves them into the folded state that readers see.
 *
 *   epoch counters   per region: IOs and bytes per kind (read, write) since
 *                    the last fold.  The fold adds them to the region's
 *                    totals and to its heat:  heat = heat * 2^(-dt/half_life)
 *                    + IOs, so heat is an IO count that halves every
 *                    half-life of idleness.
 *   second counters  per kind: IOs and bytes since the last fold.  The fold
 *                    pushes them into a ring of per-second slots (rates over
 *                    1 s and 60 s) and adds them to the totals.
 *   histograms       per kind, cumulative (one bucket add per IO); every
 *                    HEAT_WINDOW_S folds the difference from the previous
 *                    snapshot becomes the "last window".
 *   trace ring       HEAT_TRACE_SIZE slots; a sampled IO claims the next
 *                    slot with one fetch-add and publishes it under a per-slot
 *                    stamp (a seqlock), so readers never see half an entry.
 *
 * Readers (under `lock`) report folded + current counters, so totals are exact
 * at any moment, and heat includes the IOs of the epoch not yet folded.
 *
 * Only reads and writes count in regions (they move data a hot-set prefetch
 * cares about); trim, zero, flush and cache count in the per-disk totals,
 * rates, histograms and trace.  An IO that spans regions counts once in each
 * region it touches, with its bytes split exactly between them.
 *
 * Memory: ~100 bytes per region (at most HEAT_MAX_REGIONS), the trace ring and
 * 3 histograms per kind: bounded by the constants, not by the IO done. */
#include "disk/heat.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

#define HEAT_RING_SLOTS 64             /* >= 60 one-second slots */
#define HEAT_WINDOW_S 10               /* latency window length, in folds */
#define HEAT_TRACE_BUSY UINT64_MAX     /* slot stamp while a writer fills it */
#define HEAT_TINY 1e-9                 /* heat below this is flushed to 0 */

enum { RK_READ = 0, RK_WRITE = 1, RK_KINDS = 2 };  /* region kinds */

struct region_epoch {                  /* hot path: relaxed atomic adds */
  _Atomic uint64_t ops[RK_KINDS];
  _Atomic uint64_t bytes[RK_KINDS];
};

struct region_acc {                    /* folded; guarded by heat.lock */
  uint64_t ops[RK_KINDS];
  uint64_t bytes[RK_KINDS];
  double heat[RK_KINDS];
};

struct second {                        /* one slot of the per-second ring */
  uint64_t ops[IO_KINDS];
  uint64_t bytes[IO_KINDS];
};

struct trace_slot {
  _Atomic uint64_t stamp;              /* claim index + 1 once published */
  _Atomic uint64_t seq, time_ns, offset;
  _Atomic uint32_t length, latency_us;
  _Atomic uint8_t kind;
};

struct heat {
  uint64_t disk_size;
  uint64_t region_size;
  unsigned region_shift;
  uint64_t nregions;
  struct region_epoch *epoch;          /* [nregions] */

  _Atomic uint64_t cur_ops[IO_KINDS];  /* since the last fold */
  _Atomic uint64_t cur_bytes[IO_KINDS];
  _Atomic uint64_t seq;                /* IOs recorded, all kinds */
  _Atomic unsigned trace_every;
  _Atomic unsigned half_life_s;

  struct histogram lat[IO_KINDS];      /* cumulative */

  pthread_mutex_t lock;                /* guards everything below */
  struct region_acc *acc;              /* [nregions] */
  uint64_t total_ops[IO_KINDS], total_bytes[IO_KINDS];   /* folded */
  struct second ring[HEAT_RING_SLOTS];
  unsigned ring_pos;                   /* next slot to fill */
  unsigned ring_valid;                 /* folded seconds, capped at 60 */
  uint64_t last_fold_ns;               /* CLOCK_MONOTONIC of the last fold */
  unsigned window_folds;               /* folds since the window snapshot */
  struct histogram lat_snap[IO_KINDS]; /* cumulative at the window start */
  struct histogram lat_window[IO_KINDS];  /* last completed window */

  _Atomic uint64_t trace_head;         /* slots claimed so far */
  struct trace_slot trace[HEAT_TRACE_SIZE];
};

const char *io_kind_name(enum io_kind k)
{
  static const char *const names[IO_KINDS] = { "read", "write", "trim", "zero", "flush",
                                               "cache" };
  return (unsigned)k < IO_KINDS ? names[k] : "unknown";
}

struct heat *heat_new(uint64_t disk_size)
{
  struct heat *h = calloc(1, sizeof *h);
  if (!h)
    return NULL;
  h->disk_size = disk_size;
  unsigned shift = 20;                 /* HEAT_MIN_REGION */
  while (shift < 63 && DIV_ROUND_UP(disk_size, UINT64_C(1) << shift) > HEAT_MAX_REGIONS)
    shift++;
  h->region_shift = shift;
  h->region_size = UINT64_C(1) << shift;
  h->nregions = MAX(DIV_ROUND_UP(disk_size, h->region_size), 1);
  h->epoch = calloc(h->nregions, sizeof *h->epoch);
  h->acc = calloc(h->nregions, sizeof *h->acc);
  if (!h->epoch || !h->acc) {
    free(h->epoch);
    free(h->acc);
    free(h);
    return NULL;
  }
  atomic_init(&h->trace_every, 1);
  atomic_init(&h->half_life_s, HEAT_DEFAULT_HALF_LIFE_S);
  pthread_mutex_init(&h->lock, NULL);
  h->last_fold_ns = now_ns();
  return h;
}

void heat_free(struct heat *h)
{
  if (!h)
    return;
  pthread_mutex_destroy(&h->lock);
  free(h->epoch);
  free(h->acc);
  free(h);
}

void heat_set_half_life(struct heat *h, unsigned seconds)
{
  atomic_store(&h->half_life_s, seconds ? seconds : 1);
}

unsigned heat_half_life(const struct heat *h)
{
  return atomic_load_explicit(&h->half_life_s, memory_order_relaxed);
}

void heat_set_trace_every(struct heat *h, unsigned every)
{
  atomic_store(&h->trace_every, every);
}

unsigned heat_trace_every(const struct heat *h)
{
  return atomic_load_explicit(&h->trace_every, memory_order_relaxed);
}

uint64_t heat_region_size(const struct heat *h) { return h->region_size; }
uint64_t heat_nregions(const struct heat *h) { return h->nregions; }

/* ---- hot path ---- */

static void trace_push(struct heat *h, uint64_t seq, enum io_kind kind, uint64_t off,
                       uint64_t len, uint64_t latency_ns)
{
  uint64_t i = atomic_fetch_add_explicit(&h->trace_head, 1, memory_order_relaxed);
  struct trace_slot *s = &h->trace[i % HEAT_TRACE_SIZE];
  /* A writer a whole lap behind may still hold the slot: drop this entry
   * rather than interleave two. */
  if (atomic_exchange_explicit(&s->stamp, HEAT_TRACE_BUSY, memory_order_acquire) ==
      HEAT_TRACE_BUSY)
    return;
  /* Seqlock writer: BUSY is visible before any field a reader might copy. */
  atomic_thread_fence(memory_order_release);
  uint64_t us = latency_ns / 1000;
  atomic_store_explicit(&s->seq, seq, memory_order_relaxed);
  atomic_store_explicit(&s->time_ns, realtime_ns(), memory_order_relaxed);
  atomic_store_explicit(&s->offset, off, memory_order_relaxed);
  atomic_store_explicit(&s->length, len > UINT32_MAX ? UINT32_MAX : (uint32_t)len,
                        memory_order_relaxed);
  atomic_store_explicit(&s->latency_us, us > UINT32_MAX ? UINT32_MAX : (uint32_t)us,
                        memory_order_relaxed);
  atomic_store_explicit(&s->kind, (uint8_t)kind, memory_order_relaxed);
  atomic_store_explicit(&s->stamp, i + 1, memory_order_release);
}

void heat_record(struct heat *h, enum io_kind kind, uint64_t off, uint64_t len,
                 uint64_t latency_ns)
{
  if ((unsigned)kind >= IO_KINDS)
    return;
  uint64_t seq = atomic_fetch_add_explicit(&h->seq, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&h->cur_ops[kind], 1, memory_order_relaxed);
  if (len)
    atomic_fetch_add_explicit(&h->cur_bytes[kind], len, memory_order_relaxed);
  histogram_record(&h->lat[kind], latency_ns);

  if ((kind == IO_READ || kind == IO_WRITE) && off < h->disk_size) {
    int rk = kind == IO_READ ? RK_READ : RK_WRITE;
    uint64_t end = len ? MIN(off + len, h->disk_size) : off + 1;
    for (uint64_t r = off >> h->region_shift; r < h->nregions; r++) {
      uint64_t rstart = r << h->region_shift;
      if (rstart >= end)
        break;
      uint64_t part = len ? MIN(end, rstart + h->region_size) - MAX(off, rstart) : 0;
      atomic_fetch_add_explicit(&h->epoch[r].ops[rk], 1, memory_order_relaxed);
      if (part)
        atomic_fetch_add_explicit(&h->epoch[r].bytes[rk], part, memory_order_relaxed);
    }
  }

  unsigned every = atomic_load_explicit(&h->trace_every, memory_order_relaxed);
  if (every && seq % every == 0)
    trace_push(h, seq, kind, off, len, latency_ns);
}

/* ---- fold ---- */

/* Takes (and zeroes) a counter; skips the atomic write when it is 0. */
static uint64_t take(_Atomic uint64_t *v)
{
  if (atomic_load_explicit(v, memory_order_relaxed) == 0)
    return 0;
  return atomic_exchange_explicit(v, 0, memory_order_relaxed);
}

/* __fn: caller holds h->lock. */
static void fold_locked(struct heat *h, uint64_t seconds)
{
  /* Per-second ring: the IO of the elapsed time lands in the newest slot;
   * seconds without a fold before it are empty slots. */
  struct second s;
  for (unsigned k = 0; k < IO_KINDS; k++) {
    s.ops[k] = take(&h->cur_ops[k]);
    s.bytes[k] = take(&h->cur_bytes[k]);
    h->total_ops[k] += s.ops[k];
    h->total_bytes[k] += s.bytes[k];
  }
  for (uint64_t i = 1; i < seconds && i < HEAT_RING_SLOTS; i++) {
    memset(&h->ring[h->ring_pos], 0, sizeof h->ring[0]);
    h->ring_pos = (h->ring_pos + 1) % HEAT_RING_SLOTS;
  }
  h->ring[h->ring_pos] = s;
  h->ring_pos = (h->ring_pos + 1) % HEAT_RING_SLOTS;
  h->ring_valid = (unsigned)MIN((uint64_t)h->ring_valid + seconds, 60);

  /* Regions. */
  double decay = exp2(-(double)seconds / (double)heat_half_life(h));
  for (uint64_t r = 0; r < h->nregions; r++) {
    struct region_acc *a = &h->acc[r];
    for (int rk = 0; rk < RK_KINDS; rk++) {
      uint64_t ops = take(&h->epoch[r].ops[rk]);
      uint64_t bytes = take(&h->epoch[r].bytes[rk]);
      a->ops[rk] += ops;
      a->bytes[rk] += bytes;
      if (a->heat[rk] != 0.0 || ops) {
        double v = a->heat[rk] * decay + (double)ops;
        a->heat[rk] = v < HEAT_TINY ? 0.0 : v;  /* no denormal crawl */
      }
    }
  }

  /* Latency window. */
  h->window_folds += (unsigned)MIN(seconds, HEAT_WINDOW_S);
  if (h->window_folds >= HEAT_WINDOW_S) {
    for (unsigned k = 0; k < IO_KINDS; k++) {
      struct histogram now;
      histogram_copy(&now, &h->lat[k]);
      histogram_diff(&h->lat_window[k], &now, &h->lat_snap[k]);
      histogram_copy(&h->lat_snap[k], &now);
    }
    h->window_folds = 0;
  }
}

void heat_tick_at(struct heat *h, uint64_t now)
{
  pthread_mutex_lock(&h->lock);
  if (now >= h->last_fold_ns + HEAT_EPOCH_NS) {
    uint64_t seconds = (now - h->last_fold_ns) / HEAT_EPOCH_NS;
    h->last_fold_ns += seconds * HEAT_EPOCH_NS;   /* keep the one-second grid */
    fold_locked(h, seconds);
  }
  pthread_mutex_unlock(&h->lock);
}

void heat_tick(struct heat *h)
{
  heat_tick_at(h, now_ns());
}

/* ---- readers ---- */

/* __fn: caller holds h->lock. */
static void region_fill(struct heat *h, uint64_t r, struct heat_region *out)
{
  const struct region_acc *a = &h->acc[r];
  uint64_t pend_ops[RK_KINDS], pend_bytes[RK_KINDS];
  for (int rk = 0; rk < RK_KINDS; rk++) {
    pend_ops[rk] = atomic_load_explicit(&h->epoch[r].ops[rk], memory_order_relaxed);
    pend_bytes[rk] = atomic_load_explicit(&h->epoch[r].bytes[rk], memory_order_relaxed);
  }
  out->offset = r << h->region_shift;
  out->length = MIN(h->region_size, h->disk_size > out->offset ? h->disk_size - out->offset : 0);
  out->reads = a->ops[RK_READ] + pend_ops[RK_READ];
  out->writes = a->ops[RK_WRITE] + pend_ops[RK_WRITE];
  out->read_bytes = a->bytes[RK_READ] + pend_bytes[RK_READ];
  out->write_bytes = a->bytes[RK_WRITE] + pend_bytes[RK_WRITE];
  out->read_heat = a->heat[RK_READ] + (double)pend_ops[RK_READ];
  out->write_heat = a->heat[RK_WRITE] + (double)pend_ops[RK_WRITE];
}

uint64_t heat_regions(struct heat *h, uint64_t first, uint64_t n, struct heat_region *out)
{
  if (first >= h->nregions)
    return 0;
  n = MIN(n, h->nregions - first);
  pthread_mutex_lock(&h->lock);
  for (uint64_t i = 0; i < n; i++)
    region_fill(h, first + i, &out[i]);
  pthread_mutex_unlock(&h->lock);
  return n;
}

struct scored {
  double score;
  uint64_t region;
};

static int scored_cmp(const void *a, const void *b)
{
  const struct scored *x = a, *y = b;
  if (x->score != y->score)
    return x->score > y->score ? -1 : 1;    /* hottest first */
  return x->region < y->region ? -1 : x->region > y->region;
}

unsigned heat_top(struct heat *h, unsigned k, struct heat_region *out)
{
  if (k == 0)
    return 0;
  struct scored *v = malloc(h->nregions * sizeof *v);
  if (!v)
    return 0;
  unsigned n = 0;
  pthread_mutex_lock(&h->lock);
  for (uint64_t r = 0; r < h->nregions; r++) {
    struct heat_region reg;
    region_fill(h, r, &reg);
    double score = reg.read_heat + reg.write_heat;
    if (score > 0.0)
      v[n++] = (struct scored){ score, r };
  }
  qsort(v, n, sizeof *v, scored_cmp);
  n = MIN(n, k);
  for (unsigned i = 0; i < n; i++)
    region_fill(h, v[i].region, &out[i]);
  pthread_mutex_unlock(&h->lock);
  free(v);
  return n;
}

void heat_rates(struct heat *h, struct heat_rates *out)
{
  memset(out, 0, sizeof *out);
  pthread_mutex_lock(&h->lock);
  for (unsigned k = 0; k < IO_KINDS; k++) {
    out->total_ops[k] = h->total_ops[k] + atomic_load_explicit(&h->cur_ops[k], memory_order_relaxed);
    out->total_bytes[k] =
      h->total_bytes[k] + atomic_load_explicit(&h->cur_bytes[k], memory_order_relaxed);
  }
  if (h->ring_valid) {
    const struct second *last = &h->ring[(h->ring_pos + HEAT_RING_SLOTS - 1) % HEAT_RING_SLOTS];
    out->read_iops_1s = (double)last->ops[IO_READ];
    out->write_iops_1s = (double)last->ops[IO_WRITE];
    out->read_bps_1s = (double)last->bytes[IO_READ];
    out->write_bps_1s = (double)last->bytes[IO_WRITE];
    uint64_t ro = 0, wo = 0, rb = 0, wb = 0;
    for (unsigned i = 1; i <= h->ring_valid; i++) {
      const struct second *s = &h->ring[(h->ring_pos + HEAT_RING_SLOTS - i) % HEAT_RING_SLOTS];
      ro += s->ops[IO_READ];
      wo += s->ops[IO_WRITE];
      rb += s->bytes[IO_READ];
      wb += s->bytes[IO_WRITE];
    }
    /* Over the seconds folded so far, up to 60: a disk opened 10 s ago is
     * not averaged over a minute it did not exist for. */
    double secs = (double)h->ring_valid;
    out->read_iops_60s = (double)ro / secs;
    out->write_iops_60s = (double)wo / secs;
    out->read_bps_60s = (double)rb / secs;
    out->write_bps_60s = (double)wb / secs;
  }
  pthread_mutex_unlock(&h->lock);
}

const struct histogram *heat_latency(struct heat *h, enum io_kind kind)
{
  return &h->lat[(unsigned)kind < IO_KINDS ? kind : IO_READ];
}

void heat_latency_window(struct heat *h, enum io_kind kind, struct histogram *out)
{
  if ((unsigned)kind >= IO_KINDS) {
    histogram_reset(out);
    return;
  }
  pthread_mutex_lock(&h->lock);
  histogram_copy(out, &h->lat_window[kind]);
  pthread_mutex_unlock(&h->lock);
}

unsigned heat_trace(struct heat *h, struct heat_trace_entry *out, unsigned max)
{
  uint64_t head = atomic_load_explicit(&h->trace_head, memory_order_acquire);
  uint64_t n = MIN(MIN((uint64_t)max, (uint64_t)HEAT_TRACE_SIZE), head);
  unsigned got = 0;
  for (uint64_t i = head - n; i < head; i++) {
    struct trace_slot *s = &h->trace[i % HEAT_TRACE_SIZE];
    uint64_t st = atomic_load_explicit(&s->stamp, memory_order_acquire);
    if (st != i + 1)
      continue;           /* still being written, dropped, or already lapped */
    struct heat_trace_entry e = {
      .seq = atomic_load_explicit(&s->seq, memory_order_relaxed),
      .time_ns = atomic_load_explicit(&s->time_ns, memory_order_relaxed),
      .offset = atomic_load_explicit(&s->offset, memory_order_relaxed),
      .length = atomic_load_explicit(&s->length, memory_order_relaxed),
      .latency_us = atomic_load_explicit(&s->latency_us, memory_order_relaxed),
      .kind = atomic_load_explicit(&s->kind, memory_order_relaxed),
    };
    atomic_thread_fence(memory_order_acquire);
    if (atomic_load_explicit(&s->stamp, memory_order_relaxed) != st)
      continue;           /* overwritten while we copied */
    out[got++] = e;
  }
  /* Slots are claimed in about the order IOs complete; sort by sequence so
   * the trace reads oldest first exactly (insertion sort: nearly sorted). */
  for (unsigned i = 1; i < got; i++) {
    struct heat_trace_entry e = out[i];
    unsigned j = i;
    while (j > 0 && out[j - 1].seq > e.seq) {
      out[j] = out[j - 1];
      j--;
    }
    out[j] = e;
  }
  return got;
}
