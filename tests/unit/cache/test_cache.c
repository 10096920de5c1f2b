/* test_cache: the cloud cache (src/cache/cache.c) against a fake source, and
 * the group commit helper (src/common/group_commit.c).
 *   - group commit: concurrent callers share commits; each caller returns
 *     only after a commit that started after its call; a failure reaches
 *     the waiters of that commit
 *   - reads equal the source byte for byte (whole disk, random offsets and
 *     sizes crossing regions, from several threads; the source answers
 *     late, out of order, coalescing and splitting); one fetch per region;
 *     extents (missing = data, zero fills = holes); the cache hint
 *   - N threads on one missing region: exactly one fetch; waiting and
 *     oldest_wait_ns while they wait; NOWAIT: -EAGAIN, the fetch under way
 *   - writes: a partial write to a missing region merges with the source's
 *     bytes (one fetch, write_fetches); a whole-region write fetches
 *     nothing; a write while the region's fetch is in flight survives the
 *     fill; zero and trim, whole and partial
 *   - hydration: every region present, fetched bytes exact, zero regions
 *     never fetched, hot regions first and in order, paced to the rate;
 *     at most one request while a miss waits
 *   - link down: reads wait, link up: they complete; requests lost with the
 *     link are sent again; -ENOTCONN; an unanswered urgent request is sent
 *     again after 5 s
 *   - quota under a skewed read workload: allocated bytes never above the
 *     quota, evictions happen, dirty-map and RPO-point regions are never
 *     evicted, hits/misses equal the test's own count, hydration stops
 *     near the quota; readers racing the evictor always read right data
 *   - RPO points with concurrent writers: every region captured exactly
 *     once with its point-time content; a failing capture fails the write
 *     and leaves the data; a region absent at the point is skipped (1)
 *   - close + reopen keeps the present map
 *   - kill -9 of a child that writes, reads, hydrates and evicts: every
 *     write it reported acknowledged is there, every region marked present
 *     reads right
 *   - a meta file with a flipped byte, another granularity or disk size, or
 *     none at all is refused with a message
 * Everything lives in a mkdtemp directory, removed at the end. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cache/cache.h"
#include "common/bitmap.h"
#include "common/group_commit.h"
#include "common/log.h"
#include "common/util.h"

#include "check.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)
#define MS 1000000ull

static char dir[256];

#define WAIT_FOR(cond, ms)                                                   \
  do {                                                                       \
    uint64_t until_ = now_ns() + (uint64_t)(ms) * MS;                        \
    while (!(cond) && now_ns() < until_)                                     \
      usleep(1000);                                                          \
  } while (0)

static void path_of(char *buf, size_t len, const char *name)
{
  snprintf(buf, len, "%s/%s", dir, name);
}

static uint64_t rng_next(uint64_t *s)
{
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

static uint64_t rng_below(uint64_t *s, uint64_t n) { return n ? rng_next(s) % n : 0; }

static void fill_random(unsigned char *p, size_t len, uint64_t seed)
{
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < len; i++) {
    if ((i & 7) == 0)
      rng_next(&s);
    p[i] = (unsigned char)(s >> ((i & 7) * 8)) | 1;   /* never zero: a hole shows */
  }
}

/* ---- the fake source ---- */

struct req {
  uint64_t first;
  uint32_t n;
  bool urgent;
};

struct source {
  unsigned char *img;          /* the disk's content at the source */
  uint64_t size, gran, nregions;
  struct bitmap zero;          /* regions that are all zeros at the source */
  struct cache *c;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  struct req *q;               /* queued, not answered yet */
  size_t nq, capq;
  struct req *log;             /* every request, in order */
  size_t nlog, caplog;
  unsigned *per_region;        /* requests that named each region */
  bool cut;                    /* request() says -ENOTCONN */
  bool hold;                   /* answer nothing until released */
  unsigned drop;               /* lose the next N requests (lost frames) */
  bool in_order;               /* no shuffling, coalescing or splitting */
  bool stop, answering;
  unsigned fills;              /* cache_fill calls made */
  unsigned delay_us;           /* answer delay at most */
  uint64_t rng;
  pthread_t thread;
};

static void push(struct req **v, size_t *n, size_t *cap, struct req r)
{
  if (*n == *cap) {
    *cap = *cap ? 2 * *cap : 64;
    *v = realloc(*v, *cap * sizeof **v);
    if (!*v)
      abort();
  }
  (*v)[(*n)++] = r;
}

static int source_request(void *opaque, uint64_t first, uint32_t n, bool urgent)
{
  struct source *s = opaque;
  CHECK(n >= 1 && n <= CACHE_MAX_FETCH_REGIONS && first + n <= s->nregions);
  pthread_mutex_lock(&s->lock);
  if (s->cut) {
    pthread_mutex_unlock(&s->lock);
    return -ENOTCONN;
  }
  struct req r = { first, n, urgent };
  push(&s->log, &s->nlog, &s->caplog, r);
  for (uint32_t i = 0; i < n && first + i < s->nregions; i++)
    s->per_region[first + i]++;
  if (s->drop) {
    s->drop--;
  } else {
    push(&s->q, &s->nq, &s->capq, r);
    pthread_cond_broadcast(&s->cond);
  }
  pthread_mutex_unlock(&s->lock);
  return 0;
}

static bool range_zero(struct source *s, uint64_t first, uint32_t n)
{
  for (uint32_t i = 0; i < n; i++)
    if (!bitmap_test(&s->zero, first + i))
      return false;
  return true;
}

static void answer(struct source *s, uint64_t first, uint32_t n)
{
  const void *data = range_zero(s, first, n) ? NULL : s->img + first * s->gran;
  int r = cache_fill(s->c, first, n, data);
  CHECK(r == 0);
}

static void *source_main(void *arg)
{
  struct source *s = arg;
  pthread_mutex_lock(&s->lock);
  for (;;) {
    while (!s->stop && (s->hold || s->nq == 0))
      pthread_cond_wait(&s->cond, &s->lock);
    if (s->stop)
      break;
    /* Usually the oldest; sometimes another (out of order); sometimes two
     * adjacent requests in one fill (coalescing); sometimes split. */
    size_t i = s->in_order || rng_below(&s->rng, 4) ? 0 : rng_below(&s->rng, s->nq);
    struct req r = s->q[i];
    memmove(s->q + i, s->q + i + 1, (s->nq - i - 1) * sizeof *s->q);
    s->nq--;
    if (!s->in_order && rng_below(&s->rng, 4) == 0) {
      for (size_t k = 0; k < s->nq; k++) {
        if (s->q[k].first == r.first + r.n) {
          r.n += s->q[k].n;
          s->q[k] = s->q[--s->nq];
          break;
        }
      }
    }
    unsigned delay = s->delay_us ? (unsigned)rng_below(&s->rng, s->delay_us) : 0;
    bool split = !s->in_order && r.n > 1 && rng_below(&s->rng, 5) == 0;
    s->answering = true;
    pthread_mutex_unlock(&s->lock);
    if (delay)
      usleep(delay);
    if (split) {
      uint32_t h = r.n / 2;
      answer(s, r.first + h, r.n - h);   /* the second half first */
      answer(s, r.first, h);
    } else {
      answer(s, r.first, r.n);
    }
    pthread_mutex_lock(&s->lock);
    s->answering = false;
    s->fills++;
    pthread_cond_broadcast(&s->cond);
  }
  pthread_mutex_unlock(&s->lock);
  return NULL;
}

/* A source of nregions regions (the last one last_len bytes, 0: whole) with
 * random content, and all-zero regions at zeros[]. */
static void source_init(struct source *s, uint64_t gran, uint64_t nregions, uint64_t last_len,
                        const uint64_t *zeros, size_t nzeros, uint64_t seed)
{
  memset(s, 0, sizeof *s);
  s->gran = gran;
  s->nregions = nregions;
  s->size = (nregions - 1) * gran + (last_len ? last_len : gran);
  s->img = malloc(s->size);
  fill_random(s->img, s->size, seed);
  bitmap_init(&s->zero, nregions);
  for (size_t i = 0; i < nzeros; i++) {
    bitmap_set(&s->zero, zeros[i]);
    memset(s->img + zeros[i] * gran, 0, MIN(gran, s->size - zeros[i] * gran));
  }
  s->per_region = calloc(nregions, sizeof *s->per_region);
  pthread_mutex_init(&s->lock, NULL);
  pthread_cond_init(&s->cond, NULL);
  s->rng = seed * 7919 + 13;
  s->delay_us = 300;
}

static void source_attach(struct source *s, struct cache *c)
{
  s->c = c;
  pthread_create(&s->thread, NULL, source_main, s);
  struct cache_fetcher f = { source_request, s };
  cache_set_fetcher(c, &f);
}

static void source_detach(struct source *s)
{
  cache_set_fetcher(s->c, NULL);
  pthread_mutex_lock(&s->lock);
  s->stop = true;
  pthread_cond_broadcast(&s->cond);
  pthread_mutex_unlock(&s->lock);
  pthread_join(s->thread, NULL);
}

static void source_free(struct source *s)
{
  free(s->img);
  free(s->q);
  free(s->log);
  free(s->per_region);
  bitmap_free(&s->zero);
  pthread_mutex_destroy(&s->lock);
  pthread_cond_destroy(&s->cond);
}

static void source_set(struct source *s, bool *field, bool v)
{
  pthread_mutex_lock(&s->lock);
  *field = v;
  pthread_cond_broadcast(&s->cond);
  pthread_mutex_unlock(&s->lock);
}

static unsigned source_count(struct source *s, uint64_t region)
{
  pthread_mutex_lock(&s->lock);
  unsigned n = s->per_region[region];
  pthread_mutex_unlock(&s->lock);
  return n;
}

static size_t source_nlog(struct source *s)
{
  pthread_mutex_lock(&s->lock);
  size_t n = s->nlog;
  pthread_mutex_unlock(&s->lock);
  return n;
}

static unsigned source_fills(struct source *s)
{
  pthread_mutex_lock(&s->lock);
  unsigned n = s->fills;
  pthread_mutex_unlock(&s->lock);
  return n;
}

/* Waits until the source has answered everything queued. */
static void source_drain(struct source *s)
{
  WAIT_FOR(({ pthread_mutex_lock(&s->lock); bool idle_ = s->nq == 0 && !s->answering;
              pthread_mutex_unlock(&s->lock); idle_; }), 5000);
}

/* ---- cache helpers ---- */

static void make_image(const char *path, uint64_t size)
{
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
  CHECK(fd >= 0);
  CHECK(ftruncate(fd, (off_t)size) == 0);
  close(fd);
}

struct opts {
  uint64_t quota, bps;
  unsigned inflight;
  bool create;
};

static struct cache *open_cache_err(const char *name, uint64_t gran, struct opts o, char *err,
                                    size_t errlen)
{
  char meta[300], img[300];
  snprintf(meta, sizeof meta, "%s/%s.meta", dir, name);
  snprintf(img, sizeof img, "%s/%s.img", dir, name);
  struct backend *local = backend_file_open(img, "test", err, errlen);
  if (!local)
    return NULL;
  struct cache_config cfg = {
    .meta_path = meta, .disk_name = "test", .granularity = gran, .quota_bytes = o.quota,
    .create = o.create, .hydrate_bps = o.bps, .hydrate_inflight = o.inflight,
  };
  return cache_open(&cfg, local, err, errlen);
}

static struct cache *open_cache(const char *name, uint64_t gran, struct opts o)
{
  char err[512] = "";
  struct cache *c = open_cache_err(name, gran, o, err, sizeof err);
  if (!c)
    fprintf(stderr, "cache_open(%s): %s\n", name, err);
  CHECK(c != NULL);
  return c;
}

/* A new cache on a new image of the source's size, fetching from s. */
static struct cache *new_cache(const char *name, struct source *s, struct opts o)
{
  char img[300];
  snprintf(img, sizeof img, "%s/%s.img", dir, name);
  make_image(img, s->size);
  o.create = true;
  struct cache *c = open_cache(name, s->gran, o);
  if (c)
    source_attach(s, c);
  return c;
}

static void close_cache(struct cache *c) { cache_backend(c)->ops->close(cache_backend(c)); }

static int rd(struct cache *c, void *buf, uint64_t len, uint64_t off)
{
  return cache_backend(c)->ops->pread(cache_backend(c), buf, (uint32_t)len, off, false);
}

static int wr(struct cache *c, const void *buf, uint64_t len, uint64_t off)
{
  return cache_backend(c)->ops->pwrite(cache_backend(c), buf, (uint32_t)len, off, false);
}

static struct cache_stats stats_of(struct cache *c)
{
  struct cache_stats st;
  cache_get_stats(c, &st);
  return st;
}

static uint64_t allocated_of(const char *name)
{
  char img[300];
  snprintf(img, sizeof img, "%s/%s.img", dir, name);
  struct stat st;
  CHECK(stat(img, &st) == 0);
  return (uint64_t)st.st_blocks * 512;
}

/* Reads [off, off+len) and compares with want. */
static bool read_equals(struct cache *c, const unsigned char *want, uint64_t len, uint64_t off)
{
  unsigned char *buf = malloc(len);
  int r = rd(c, buf, len, off);
  bool ok = r == 0 && memcmp(buf, want, len) == 0;
  if (!ok)
    fprintf(stderr, "read of %llu bytes at %llu: r=%d, %s\n", (unsigned long long)len,
            (unsigned long long)off, r, r ? strerror(-r) : "content differs");
  free(buf);
  return ok;
}

/* ---- group commit ---- */

struct gc_test {
  struct group_commit g;
  _Atomic uint64_t requests;     /* calls made (each takes a number first) */
  _Atomic uint64_t covered;      /* every request numbered <= this is covered */
  _Atomic unsigned commits, running;
  _Atomic int fail_next;
  _Atomic bool overlap;
};

static int gc_commit(void *opaque)
{
  struct gc_test *t = opaque;
  if (atomic_fetch_add(&t->running, 1) != 0)
    atomic_store(&t->overlap, true);
  uint64_t snap = atomic_load(&t->requests);   /* what this commit covers */
  usleep(3000);
  atomic_fetch_add(&t->commits, 1);
  atomic_fetch_sub(&t->running, 1);
  int fail = atomic_exchange(&t->fail_next, 0);
  if (!fail) {
    uint64_t c = atomic_load(&t->covered);
    while (snap > c && !atomic_compare_exchange_weak(&t->covered, &c, snap))
      ;
  }
  return fail ? -EIO : 0;
}

static void *gc_thread(void *arg)
{
  struct gc_test *t = arg;
  for (int i = 0; i < 20; i++) {
    uint64_t me = atomic_fetch_add(&t->requests, 1) + 1;
    int r = group_commit_wait(&t->g);
    CHECK(r == 0);
    CHECK(atomic_load(&t->covered) >= me);
  }
  return NULL;
}

static void test_group_commit(void)
{
  static struct gc_test t;
  group_commit_init(&t.g, gc_commit, &t);
  pthread_t th[16];
  for (int i = 0; i < 16; i++)
    pthread_create(&th[i], NULL, gc_thread, &t);
  for (int i = 0; i < 16; i++)
    pthread_join(th[i], NULL);
  unsigned n = atomic_load(&t.commits);
  CHECK(n >= 20 && n < 16 * 20 / 2);   /* shared: far fewer commits than calls */
  CHECK(!atomic_load(&t.overlap));
  CHECK(group_commit_count(&t.g) == n);

  atomic_store(&t.fail_next, 1);
  CHECK(group_commit_wait(&t.g) == -EIO);
  CHECK(group_commit_wait(&t.g) == 0);   /* the helper itself is not sticky */
  group_commit_destroy(&t.g);
}

/* ---- reads ---- */

struct reader_arg {
  struct cache *c;
  struct source *s;
  uint64_t seed;
  int nreads;
  uint64_t off, len;        /* one fixed read when nreads == 0 */
  int result;
  _Atomic bool done;
};

static void *random_reader(void *arg)
{
  struct reader_arg *a = arg;
  uint64_t s = a->seed;
  unsigned char *buf = malloc(400 * KiB);
  for (int i = 0; i < a->nreads; i++) {
    uint64_t off = rng_below(&s, a->s->size);
    uint64_t len = 1 + rng_below(&s, MIN(400 * KiB, a->s->size - off));
    int r = rd(a->c, buf, len, off);
    CHECK(r == 0);
    if (r == 0 && memcmp(buf, a->s->img + off, len) != 0) {
      fprintf(stderr, "random read %llu+%llu differs\n", (unsigned long long)off,
              (unsigned long long)len);
      CHECK(!"random read equals the source");
    }
  }
  free(buf);
  return NULL;
}

struct ext_list {
  uint64_t off[64], len[64];
  uint32_t flags[64];
  int n;
};

static int ext_collect(void *opaque, uint64_t off, uint64_t len, uint32_t flags)
{
  struct ext_list *l = opaque;
  if (l->n < 64) {
    l->off[l->n] = off;
    l->len[l->n] = len;
    l->flags[l->n] = flags;
    l->n++;
  }
  return 0;
}

static void test_read_through(void)
{
  struct source s;
  const uint64_t G = 64 * KiB, N = 41;
  uint64_t zeros[] = { 3, 7, 20 };
  source_init(&s, G, N, 1000, zeros, 3, 1);   /* last region: 1000 bytes */
  struct cache *c = new_cache("rt", &s, (struct opts){ 0 });
  CHECK(cache_backend_is(cache_backend(c)));

  /* Before anything is present: missing regions are data (flags 0). */
  struct ext_list el = { .n = 0 };
  CHECK(cache_backend(c)->ops->extents(cache_backend(c), 0, 3 * G, ext_collect, &el) == 0);
  CHECK(el.n == 1 && el.off[0] == 0 && el.len[0] == 3 * G && el.flags[0] == 0);

  pthread_t th[4];
  struct reader_arg ra[4];
  for (int i = 0; i < 4; i++) {
    ra[i] = (struct reader_arg){ .c = c, .s = &s, .seed = 100 + (uint64_t)i, .nreads = 60 };
    pthread_create(&th[i], NULL, random_reader, &ra[i]);
  }
  for (int i = 0; i < 4; i++)
    pthread_join(th[i], NULL);
  for (uint64_t off = 0; off < s.size; off += 1 * MiB)
    CHECK(read_equals(c, s.img + off, MIN(1 * MiB, s.size - off), off));
  CHECK(read_equals(c, s.img + s.size - 10, 10, s.size - 10));   /* the short last region */
  CHECK(cache_complete(c));
  for (uint64_t r = 0; r < N; r++)
    CHECK(source_count(&s, r) == 1);       /* each region fetched once, whatever the readers */
  struct cache_stats st = stats_of(c);
  CHECK(st.regions == N && st.present == N);
  CHECK(st.fetched_bytes == s.size);
  CHECK(st.read_hits + st.read_misses == 4 * 60 + DIV_ROUND_UP(s.size, 1 * MiB) + 1);
  CHECK(st.read_misses > 0 && st.miss_p50_ns > 0 && st.miss_max_ns >= st.miss_p50_ns);
  CHECK(st.waiting == 0 && st.oldest_wait_ns == 0);

  /* Zero regions arrived as NULL fills: holes, not written zeros. */
  el.n = 0;
  CHECK(cache_backend(c)->ops->extents(cache_backend(c), 7 * G, G, ext_collect, &el) == 0);
  CHECK(el.n == 1 && el.flags[0] == (DISK_EXTENT_HOLE | DISK_EXTENT_ZERO));
  el.n = 0;
  CHECK(cache_backend(c)->ops->extents(cache_backend(c), 8 * G, G, ext_collect, &el) == 0);
  CHECK(el.n == 1 && el.flags[0] == 0);
  source_detach(&s);
  close_cache(c);
  source_free(&s);
}

static void *fixed_reader(void *arg)
{
  struct reader_arg *a = arg;
  unsigned char *buf = malloc(a->len);
  a->result = rd(a->c, buf, a->len, a->off);
  if (a->result == 0 && memcmp(buf, a->s->img + a->off, a->len) != 0)
    a->result = 1000;   /* content differs from the source */
  free(buf);
  atomic_store(&a->done, true);
  return NULL;
}

static void test_single_fetch(void)
{
  struct source s;
  const uint64_t G = 64 * KiB;
  source_init(&s, G, 32, 0, NULL, 0, 2);
  struct cache *c = new_cache("one", &s, (struct opts){ 0 });
  source_set(&s, &s.hold, true);
  pthread_t th[8];
  struct reader_arg ra[8];
  for (int i = 0; i < 8; i++) {
    ra[i] = (struct reader_arg){ .c = c, .s = &s, .off = 5 * G + (uint64_t)i * 1000,
                                 .len = 3000 + (uint64_t)i * 7000 };
    pthread_create(&th[i], NULL, fixed_reader, &ra[i]);
  }
  WAIT_FOR(stats_of(c).waiting == 8, 5000);
  usleep(20000);
  struct cache_stats st = stats_of(c);
  CHECK(st.waiting == 8);
  CHECK(st.oldest_wait_ns >= 20 * MS);
  CHECK(source_nlog(&s) == 1 && source_count(&s, 5) == 1);
  CHECK(s.log[0].urgent && s.log[0].first == 5 && s.log[0].n == 1);

  /* NOWAIT on another missing region: -EAGAIN, nothing fetched nor counted
   * (its retry without NOWAIT does both: one count per guest read). */
  unsigned char b[100];
  CHECK(cache_backend(c)->ops->pread(cache_backend(c), b, 100, 9 * G, true) == -EAGAIN);
  CHECK(source_count(&s, 9) == 0);

  source_set(&s, &s.hold, false);
  for (int i = 0; i < 8; i++) {
    pthread_join(th[i], NULL);
    CHECK(ra[i].result == 0);
  }
  CHECK(source_count(&s, 5) == 1);
  CHECK(!cache_present(c, 9));
  CHECK(read_equals(c, s.img + 9 * G, 100, 9 * G));   /* the retry: a miss */
  CHECK(source_count(&s, 9) == 1);
  st = stats_of(c);
  CHECK(st.read_misses == 9 && st.read_hits == 0);
  CHECK(st.waiting == 0);

  /* The cache hint fetches (not urgently) and does not wait. */
  CHECK(cache_backend(c)->ops->cache(cache_backend(c), 10, 20 * G) == 0);
  WAIT_FOR(cache_present(c, 20), 5000);
  CHECK(cache_present(c, 20) && source_count(&s, 20) == 1);
  CHECK(!s.log[source_nlog(&s) - 1].urgent);
  source_detach(&s);
  close_cache(c);
  source_free(&s);
}

/* ---- writes ---- */

static void test_writes(void)
{
  struct source s;
  const uint64_t G = 64 * KiB, N = 32;
  source_init(&s, G, N, 0, NULL, 0, 3);
  struct cache *c = new_cache("wr", &s, (struct opts){ 0 });
  unsigned char *model = malloc(s.size);   /* what the disk must read */
  memcpy(model, s.img, s.size);
  unsigned char *buf = malloc(3 * G);
  struct backend *b = cache_backend(c);

  /* A partial write to a missing region: fetched first, merged. */
  fill_random(buf, 100, 50);
  CHECK(wr(c, buf, 100, 10 * G + 50) == 0);
  memcpy(model + 10 * G + 50, buf, 100);
  CHECK(source_count(&s, 10) == 1);
  CHECK(stats_of(c).write_fetches == 1);
  CHECK(read_equals(c, model + 10 * G, G, 10 * G));

  /* A whole-region write: no fetch. */
  fill_random(buf, G, 51);
  CHECK(wr(c, buf, G, 11 * G) == 0);
  memcpy(model + 11 * G, buf, G);
  CHECK(source_count(&s, 11) == 0 && cache_present(c, 11));
  CHECK(stats_of(c).write_fetches == 1);
  CHECK(read_equals(c, model + 11 * G, G, 11 * G));
  CHECK(source_count(&s, 11) == 0);

  /* Across three regions: the two partial ones are fetched, the middle not. */
  fill_random(buf, 2 * G, 52);
  CHECK(wr(c, buf, 2 * G, 12 * G + G / 2) == 0);
  memcpy(model + 12 * G + G / 2, buf, 2 * G);
  CHECK(source_count(&s, 12) == 1 && source_count(&s, 13) == 0 && source_count(&s, 14) == 1);
  CHECK(read_equals(c, model + 12 * G, 3 * G, 12 * G));

  /* A whole-region write while the region's fetch is in flight: the fill
   * that comes later must not overwrite it; the waiting reader sees it. */
  source_set(&s, &s.hold, true);
  struct reader_arg ra = { .c = c, .s = &s, .off = 15 * G, .len = G };
  pthread_t th;
  pthread_create(&th, NULL, fixed_reader, &ra);
  WAIT_FOR(source_count(&s, 15) == 1, 5000);
  CHECK(source_count(&s, 15) == 1);
  fill_random(buf, G, 53);
  unsigned fills = source_fills(&s);
  CHECK(wr(c, buf, G, 15 * G) == 0);
  memcpy(model + 15 * G, buf, G);
  pthread_join(th, NULL);
  CHECK(ra.result == 1000);            /* it read the write, not the source */
  source_set(&s, &s.hold, false);
  WAIT_FOR(source_fills(&s) > fills, 5000);
  CHECK(source_fills(&s) > fills);
  CHECK(read_equals(c, model + 15 * G, G, 15 * G));

  /* Zero: partial on a missing region is a read-modify-write; whole, no fetch. */
  CHECK(b->ops->zero(b, 1000, 16 * G + 4096, true) == 0);
  memset(model + 16 * G + 4096, 0, 1000);
  CHECK(source_count(&s, 16) == 1);
  CHECK(b->ops->zero(b, (uint32_t)G, 17 * G, false) == 0);
  memset(model + 17 * G, 0, G);
  CHECK(source_count(&s, 17) == 0 && cache_present(c, 17));
  /* Trim: part of a missing region: nothing (advisory); a whole one: zeros. */
  CHECK(b->ops->trim(b, 4096, 18 * G) == 0);
  CHECK(source_count(&s, 18) == 0 && !cache_present(c, 18));
  CHECK(b->ops->trim(b, (uint32_t)G, 19 * G) == 0);
  memset(model + 19 * G, 0, G);
  CHECK(source_count(&s, 19) == 0 && cache_present(c, 19));
  CHECK(b->ops->flush(b) == 0);

  for (uint64_t off = 0; off < s.size; off += 256 * KiB)
    CHECK(read_equals(c, model + off, MIN(256 * KiB, s.size - off), off));
  CHECK(source_count(&s, 18) == 1 && source_count(&s, 19) == 0 && source_count(&s, 11) == 0);

  /* The present map and the data survive close + reopen (no fetcher). */
  source_detach(&s);
  bool was[32];
  for (uint64_t r = 0; r < N; r++)
    was[r] = cache_present(c, r);
  close_cache(c);
  c = open_cache("wr", G, (struct opts){ 0 });
  for (uint64_t r = 0; r < N; r++)
    CHECK(cache_present(c, r) == was[r]);
  CHECK(cache_complete(c));
  for (uint64_t off = 0; off < s.size; off += 256 * KiB)
    CHECK(read_equals(c, model + off, MIN(256 * KiB, s.size - off), off));

  /* Fail mode: a commit fails; that write and every later one fail, reads
   * go on; the meta file keeps what was durable. */
  cache_inject_commit_error(c);
  fill_random(buf, G, 54);
  CHECK(wr(c, buf, G, 18 * G) == -EIO);
  CHECK(wr(c, buf, 10, 0) == -EIO);
  b = cache_backend(c);
  CHECK(b->ops->flush(b) == -EIO);
  CHECK(read_equals(c, model + 20 * G, G, 20 * G));
  close_cache(c);
  c = open_cache("wr", G, (struct opts){ 0 });
  for (uint64_t r = 0; r < N; r++)
    CHECK(cache_present(c, r) == was[r]);
  for (uint64_t r = 0; r < N; r++)
    if (r != 0 && r != 18)           /* the failed writes' regions may hold either */
      CHECK(read_equals(c, model + r * G, G, r * G));
  close_cache(c);
  free(buf);
  free(model);
  source_free(&s);
}

/* ---- hydration ---- */

static void test_hydration(void)
{
  struct source s;
  const uint64_t G = 64 * KiB, N = 64;
  uint64_t zeros[] = { 2, 30, 31, 63 };
  source_init(&s, G, N, 0, zeros, 4, 4);
  s.in_order = true;
  struct cache *c = new_cache("hy", &s, (struct opts){ .bps = 0, .inflight = 4 });
  struct bitmap zb;
  bitmap_init(&zb, N);
  for (int i = 0; i < 4; i++)
    bitmap_set(&zb, zeros[i]);
  CHECK(cache_set_present_zero(c, &zb) == 0);
  for (int i = 0; i < 4; i++)
    CHECK(cache_present(c, zeros[i]));
  uint64_t hot[] = { 40, 10, 50 };
  cache_set_hot(c, hot, 3);
  usleep(50000);
  CHECK(source_nlog(&s) == 0);            /* hydration off: nothing */

  const uint64_t bps = 16 * MiB;
  uint64_t t0 = now_ns();
  cache_set_hydration(c, bps);
  WAIT_FOR(cache_complete(c), 20000);
  uint64_t elapsed = now_ns() - t0;
  CHECK(cache_complete(c));
  /* Paced: (60 regions - one burst - the first run) at 16 MiB/s >= ~0.1 s. */
  CHECK(elapsed >= 100 * MS);
  pthread_mutex_lock(&s.lock);
  CHECK(s.nlog >= 3);
  for (int i = 0; i < 3 && i < (int)s.nlog; i++)
    CHECK(s.log[i].first == hot[i] && s.log[i].n == 1);
  for (size_t i = 0; i < s.nlog; i++)
    CHECK(!s.log[i].urgent && s.log[i].n <= CACHE_MAX_FETCH_REGIONS);
  for (uint64_t r = 0; r < N; r++)
    CHECK(s.per_region[r] == (bitmap_test(&zb, r) ? 0u : 1u));
  pthread_mutex_unlock(&s.lock);
  source_drain(&s);
  struct cache_stats st = stats_of(c);
  CHECK(st.fetched_bytes == (N - 4) * G);
  CHECK(st.hydrated_bytes == st.fetched_bytes);
  CHECK(st.present == N);
  CHECK(read_equals(c, s.img, s.size, 0));
  CHECK(stats_of(c).read_hits == 1);
  source_detach(&s);
  close_cache(c);
  source_free(&s);

  /* While a miss waits, hydration keeps at most one request out. */
  source_init(&s, G, N, 0, NULL, 0, 5);
  c = new_cache("hy2", &s, (struct opts){ .bps = 0, .inflight = 64 });
  source_set(&s, &s.hold, true);
  struct reader_arg ra = { .c = c, .s = &s, .off = 33 * G, .len = 10 };
  pthread_t th;
  pthread_create(&th, NULL, fixed_reader, &ra);
  WAIT_FOR(source_nlog(&s) == 1, 5000);
  cache_set_hydration(c, 1024 * MiB);
  WAIT_FOR(source_nlog(&s) == 2, 5000);
  usleep(150000);
  CHECK(source_nlog(&s) == 2);                 /* the miss and one hydration request */
  pthread_mutex_lock(&s.lock);
  CHECK(s.log[0].urgent && !s.log[1].urgent);
  pthread_mutex_unlock(&s.lock);
  source_set(&s, &s.hold, false);
  pthread_join(th, NULL);
  CHECK(ra.result == 0);
  WAIT_FOR(cache_complete(c), 20000);
  CHECK(cache_complete(c));
  CHECK(source_nlog(&s) > 1);
  source_detach(&s);
  close_cache(c);
  bitmap_free(&zb);
  source_free(&s);
}

/* ---- link ---- */

static void test_link(void)
{
  struct source s;
  const uint64_t G = 64 * KiB;
  source_init(&s, G, 16, 0, NULL, 0, 6);
  struct cache *c = new_cache("ln", &s, (struct opts){ 0 });

  /* Link down: the read waits, nothing is sent; link up: it completes. */
  source_set(&s, &s.cut, true);
  cache_link_down(c);
  struct reader_arg ra = { .c = c, .s = &s, .off = 3 * G + 5, .len = G };
  pthread_t th;
  pthread_create(&th, NULL, fixed_reader, &ra);
  WAIT_FOR(stats_of(c).waiting == 1, 5000);
  usleep(50000);
  CHECK(!atomic_load(&ra.done));
  source_set(&s, &s.cut, false);
  cache_link_up(c);
  pthread_join(th, NULL);
  CHECK(ra.result == 0);
  CHECK(source_count(&s, 3) == 1 && source_count(&s, 4) == 1);

  /* A request lost with the link is sent again at link up. */
  source_set(&s, &s.hold, true);
  ra = (struct reader_arg){ .c = c, .s = &s, .off = 6 * G, .len = 100 };
  pthread_create(&th, NULL, fixed_reader, &ra);
  WAIT_FOR(source_count(&s, 6) == 1, 5000);
  cache_link_down(c);
  pthread_mutex_lock(&s.lock);
  s.nq = 0;                    /* the frames in the link are gone */
  s.hold = false;
  pthread_mutex_unlock(&s.lock);
  usleep(50000);
  CHECK(!atomic_load(&ra.done));
  cache_link_up(c);
  pthread_join(th, NULL);
  CHECK(ra.result == 0);
  CHECK(source_count(&s, 6) == 2);

  /* -ENOTCONN without a link_down: kept, sent at link up. */
  source_set(&s, &s.cut, true);
  ra = (struct reader_arg){ .c = c, .s = &s, .off = 8 * G, .len = 100 };
  pthread_create(&th, NULL, fixed_reader, &ra);
  WAIT_FOR(stats_of(c).waiting == 1, 5000);
  usleep(30000);
  CHECK(!atomic_load(&ra.done));
  source_set(&s, &s.cut, false);
  cache_link_up(c);
  pthread_join(th, NULL);
  CHECK(ra.result == 0);
  CHECK(source_count(&s, 8) == 1);

  /* A lost frame with the link up: sent again after CACHE_RETRY_NS. */
  pthread_mutex_lock(&s.lock);
  s.drop = 1;
  pthread_mutex_unlock(&s.lock);
  uint64_t t0 = now_ns();
  ra = (struct reader_arg){ .c = c, .s = &s, .off = 12 * G, .len = 100 };
  pthread_create(&th, NULL, fixed_reader, &ra);
  pthread_join(th, NULL);
  uint64_t took = now_ns() - t0;
  CHECK(ra.result == 0);
  CHECK(source_count(&s, 12) == 2);
  CHECK(took >= CACHE_RETRY_NS && took < CACHE_RETRY_NS + 2000 * MS);

  /* A failed fetch reaches the waiter. */
  pthread_mutex_lock(&s.lock);
  s.drop = 1;
  pthread_mutex_unlock(&s.lock);
  ra = (struct reader_arg){ .c = c, .s = &s, .off = 13 * G, .len = 100 };
  pthread_create(&th, NULL, fixed_reader, &ra);
  WAIT_FOR(source_count(&s, 13) == 1, 5000);
  cache_fetch_failed(c, 13, 1, -EIO);
  pthread_join(th, NULL);
  CHECK(ra.result == -EIO);
  CHECK(!cache_present(c, 13));
  source_detach(&s);
  close_cache(c);
  source_free(&s);
}

/* ---- quota ---- */

struct qreader {
  struct cache *c;
  struct source *s;
  const unsigned char *model;
  uint64_t seed;
  int n;
};

static void *quota_reader(void *arg)
{
  struct qreader *q = arg;
  uint64_t rs = q->seed;
  unsigned char *buf = malloc(q->s->gran * 2);
  for (int i = 0; i < q->n; i++) {
    uint64_t rg = rng_below(&rs, 10) < 7 ? rng_below(&rs, 6) : rng_below(&rs, q->s->nregions);
    uint64_t off = rg * q->s->gran + rng_below(&rs, q->s->gran);
    uint64_t len = 1 + rng_below(&rs, MIN(q->s->gran * 2, q->s->size - off));
    int r = rd(q->c, buf, len, off);
    CHECK(r == 0);
    if (r == 0 && memcmp(buf, q->model + off, len) != 0) {
      fprintf(stderr, "read %llu+%llu under eviction differs\n", (unsigned long long)off,
              (unsigned long long)len);
      CHECK(!"a read racing the evictor reads right data");
      break;
    }
  }
  free(buf);
  return NULL;
}

static int capture_ok(void *opaque, uint64_t region, const void *data, uint32_t len)
{
  (void)opaque; (void)region; (void)data; (void)len;
  return 0;
}

static void test_quota(void)
{
  struct source s;
  const uint64_t G = 64 * KiB, N = 128, Q = 16 * G;
  source_init(&s, G, N, 0, NULL, 0, 7);
  s.in_order = true;
  struct cache *c = new_cache("qt", &s, (struct opts){ .quota = Q });
  struct bitmap dirty;
  bitmap_init(&dirty, N);
  cache_set_dirty_map(c, &dirty);
  unsigned char *model = malloc(s.size);
  memcpy(model, s.img, s.size);
  unsigned char *buf = malloc(G);

  /* Two regions written here (dirty, as the CBT marks before the write). */
  for (uint64_t r = 100; r <= 101; r++) {
    bitmap_set(&dirty, r);
    fill_random(buf, G, 900 + r);
    CHECK(wr(c, buf, G, r * G) == 0);
    memcpy(model + r * G, buf, G);
  }
  /* An RPO point over regions 5, 6 (present) and 101. */
  CHECK(read_equals(c, model + 5 * G, 2 * G, 5 * G));
  struct bitmap point;
  bitmap_init(&point, N);
  bitmap_set(&point, 5);
  bitmap_set(&point, 6);
  bitmap_set(&point, 101);
  CHECK(cache_rpo_begin(c, &point, capture_ok, NULL) == 0);

  /* Skewed single-threaded reads; the test predicts hits itself. */
  uint64_t rs = 77, hits = 0, misses = 0, h0 = stats_of(c).read_hits,
           m0 = stats_of(c).read_misses;
  bool quota_held = true, pinned = true, fetch_per_miss = true, right = true;
  for (int i = 0; i < 400; i++) {
    uint64_t rg = rng_below(&rs, 10) < 8 ? rng_below(&rs, 8) : 8 + rng_below(&rs, N - 8);
    uint64_t off = rg * G + rng_below(&rs, G / 2), len = 1 + rng_below(&rs, G / 2);
    bool hit = cache_present(c, rg);
    unsigned before = source_count(&s, rg);
    hit ? hits++ : misses++;
    right &= read_equals(c, model + off, len, off);
    fetch_per_miss &= source_count(&s, rg) == before + (hit ? 0 : 1);
    quota_held &= allocated_of("qt") <= Q;
    pinned &= cache_present(c, 5) && cache_present(c, 6) && cache_present(c, 100) &&
              cache_present(c, 101);
  }
  CHECK(right);
  CHECK(fetch_per_miss);
  CHECK(quota_held);
  CHECK(pinned);
  struct cache_stats st = stats_of(c);
  CHECK(st.read_hits - h0 == hits && st.read_misses - m0 == misses);
  CHECK(st.evictions > 0);
  CHECK(st.local_bytes <= Q && st.quota_bytes == Q);
  CHECK(hits > misses);         /* the hot part stays */
  fprintf(stderr, "quota: %llu hits %llu misses %llu evictions, %llu of %llu bytes\n",
          (unsigned long long)hits, (unsigned long long)misses,
          (unsigned long long)st.evictions, (unsigned long long)st.local_bytes,
          (unsigned long long)Q);

  /* Hydration stops short of the quota: nothing new is fetched. */
  size_t nlog = source_nlog(&s);
  uint64_t ev = stats_of(c).evictions;
  cache_set_hydration(c, 1024 * MiB);
  usleep(300000);
  CHECK(source_nlog(&s) == nlog);
  CHECK(stats_of(c).evictions == ev);
  cache_set_hydration(c, 0);
  cache_rpo_end(c);

  /* Readers racing the evictor (several threads, a tight quota) never read
   * a punched hole for data they found present. */
  cache_set_quota(c, 6 * G);
  CHECK(allocated_of("qt") <= 6 * G);
  cache_inject_read_delay(c, 300);    /* each read lingers between check and read */
  pthread_t th[4];
  struct qreader qr[4];
  for (int i = 0; i < 4; i++) {
    qr[i] = (struct qreader){ c, &s, model, 300 + (uint64_t)i, 150 };
    pthread_create(&th[i], NULL, quota_reader, &qr[i]);
  }
  for (int i = 0; i < 4; i++)
    pthread_join(th[i], NULL);
  cache_inject_read_delay(c, 0);
  CHECK(cache_present(c, 100) && cache_present(c, 101));   /* dirty: never evicted */
  CHECK(stats_of(c).evictions > ev);

  source_detach(&s);
  close_cache(c);
  bitmap_free(&dirty);
  bitmap_free(&point);
  free(model);
  free(buf);
  source_free(&s);
}

/* ---- RPO points ---- */

struct rpo_test {
  struct cache *c;
  uint64_t size, gran, nregions;
  pthread_rwlock_t stall;        /* the disk's writers: shared per write */
  _Atomic bool stop;
  pthread_mutex_t lock;
  unsigned *captured;            /* fn calls per region */
  unsigned char *cap;            /* captured content */
  _Atomic unsigned fail_region;  /* fn fails for it (UINT_MAX: none) */
  _Atomic uint64_t writes;
};

static int capture_fn(void *opaque, uint64_t region, const void *data, uint32_t len)
{
  struct rpo_test *t = opaque;
  if (region == atomic_load(&t->fail_region))
    return -EIO;
  CHECK(len == MIN(t->gran, t->size - region * t->gran));
  pthread_mutex_lock(&t->lock);
  t->captured[region]++;
  memcpy(t->cap + region * t->gran, data, len);
  pthread_mutex_unlock(&t->lock);
  usleep(200);          /* a writer waits for it */
  return 0;
}

static void *rpo_writer(void *arg)
{
  struct rpo_test *t = arg;
  uint64_t rs = (uint64_t)pthread_self() | 1;
  unsigned char *buf = malloc(3 * t->gran);
  struct backend *b = cache_backend(t->c);
  while (!atomic_load(&t->stop)) {
    uint64_t off = rng_below(&rs, t->size);
    uint64_t len = 1 + rng_below(&rs, MIN(2 * t->gran, t->size - off));
    pthread_rwlock_rdlock(&t->stall);
    int r, kind = (int)rng_below(&rs, 10);
    if (kind == 0) {
      r = b->ops->zero(b, (uint32_t)len, off, rng_below(&rs, 2));
    } else if (kind == 1) {
      r = b->ops->trim(b, (uint32_t)len, off);
    } else {
      fill_random(buf, len, rng_next(&rs));
      r = b->ops->pwrite(b, buf, (uint32_t)len, off, false);
    }
    pthread_rwlock_unlock(&t->stall);
    CHECK(r == 0);
    atomic_fetch_add(&t->writes, 1);
  }
  free(buf);
  return NULL;
}

static void test_rpo(void)
{
  struct source s;
  const uint64_t G = 16 * KiB, N = 64;
  source_init(&s, G, N, 5000, NULL, 0, 8);
  struct cache *c = new_cache("rpo", &s, (struct opts){ .bps = 1024 * MiB });
  WAIT_FOR(cache_complete(c), 10000);
  CHECK(cache_complete(c));

  static struct rpo_test t;
  t.c = c;
  t.size = s.size;
  t.gran = G;
  t.nregions = N;
  pthread_rwlockattr_t ra;           /* writer-preferring, as a stall must be */
  pthread_rwlockattr_init(&ra);
  pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init(&t.stall, &ra);
  pthread_rwlockattr_destroy(&ra);
  pthread_mutex_init(&t.lock, NULL);
  t.captured = calloc(N, sizeof *t.captured);
  t.cap = malloc(s.size);
  atomic_store(&t.fail_region, UINT32_MAX);
  unsigned char *point = malloc(s.size);
  pthread_t th[4];
  for (int i = 0; i < 4; i++)
    pthread_create(&th[i], NULL, rpo_writer, &t);

  uint64_t rs = 99;
  for (int round = 0; round < 4; round++) {
    usleep(20000);
    struct bitmap bits;
    bitmap_init(&bits, N);
    for (uint64_t r = 0; r < N; r++)
      if (round == 0 || rng_below(&rs, 3))
        bitmap_set(&bits, r);
    /* The point: writers stalled, content taken, capture armed. */
    pthread_rwlock_wrlock(&t.stall);
    CHECK(rd(c, point, s.size, 0) == 0);
    memset(t.captured, 0, N * sizeof *t.captured);
    CHECK(cache_rpo_begin(c, &bits, capture_fn, &t) == 0);
    CHECK(cache_rpo_begin(c, &bits, capture_fn, &t) == -EBUSY);
    uint64_t w0 = atomic_load(&t.writes);
    pthread_rwlock_unlock(&t.stall);
    /* The flusher goes slowly, in a random order, while writers write. */
    uint64_t order[64];
    for (uint64_t r = 0; r < N; r++)
      order[r] = r;
    for (uint64_t r = N - 1; r > 0; r--) {
      uint64_t k = rng_below(&rs, r + 1), x = order[r];
      order[r] = order[k];
      order[k] = x;
    }
    for (uint64_t i = 0; i < N; i++) {
      int r = cache_rpo_capture(c, order[i]);
      CHECK(r == (bitmap_test(&bits, order[i]) ? 0 : 1));
      usleep(1000);
    }
    cache_rpo_end(c);
    CHECK(atomic_load(&t.writes) > w0 + 20);   /* writers did go on */
    pthread_mutex_lock(&t.lock);
    for (uint64_t r = 0; r < N; r++) {
      uint64_t len = MIN(G, s.size - r * G);
      if (bitmap_test(&bits, r)) {
        CHECK(t.captured[r] == 1);
        CHECK(memcmp(t.cap + r * G, point + r * G, len) == 0);
      } else {
        CHECK(t.captured[r] == 0);
      }
    }
    pthread_mutex_unlock(&t.lock);
    bitmap_free(&bits);
  }
  atomic_store(&t.stop, true);
  for (int i = 0; i < 4; i++)
    pthread_join(th[i], NULL);

  /* A capture that fails fails the write, which leaves the data as it was;
   * the flusher captures it later. */
  struct bitmap bits;
  bitmap_init(&bits, N);
  bitmap_set(&bits, 9);
  CHECK(rd(c, point, G, 9 * G) == 0);
  memset(t.captured, 0, N * sizeof *t.captured);
  atomic_store(&t.fail_region, 9);
  CHECK(cache_rpo_begin(c, &bits, capture_fn, &t) == 0);
  unsigned char *buf = malloc(G);
  fill_random(buf, 100, 4242);
  CHECK(wr(c, buf, 100, 9 * G + 10) == -EIO);
  CHECK(read_equals(c, point, G, 9 * G));
  CHECK(cache_rpo_capture(c, 9) == -EIO);
  atomic_store(&t.fail_region, UINT32_MAX);
  CHECK(wr(c, buf, 100, 9 * G + 10) == 0);     /* captures, then writes */
  CHECK(cache_rpo_capture(c, 9) == 0);         /* done by the writer */
  CHECK(t.captured[9] == 1 && memcmp(t.cap + 9 * G, point, G) == 0);
  cache_rpo_end(c);
  CHECK(cache_rpo_capture(c, 9) == -EINVAL);   /* no point */
  source_detach(&s);
  close_cache(c);
  source_free(&s);

  /* A region not present at the point was never written here: skipped,
   * even once a write makes it present. */
  source_init(&s, G, N, 0, NULL, 0, 9);
  c = new_cache("rpo2", &s, (struct opts){ 0 });
  memset(t.captured, 0, N * sizeof *t.captured);
  CHECK(cache_rpo_begin(c, &bits, capture_fn, &t) == 0);
  fill_random(buf, G, 4343);
  CHECK(wr(c, buf, G, 9 * G) == 0);
  CHECK(cache_rpo_capture(c, 9) == 1);
  CHECK(t.captured[9] == 0);
  cache_rpo_end(c);
  source_detach(&s);
  close_cache(c);
  source_free(&s);

  bitmap_free(&bits);
  free(buf);
  free(point);
  free(t.captured);
  free(t.cap);
  pthread_rwlock_destroy(&t.stall);
  pthread_mutex_destroy(&t.lock);
}

/* ---- crash safety (kill -9) ----
 * Sectors of 512 bytes are self-describing: magic, the id of the write that
 * wrote them (0: the source), their own index, then bytes derived from both.
 * The child's writer threads own disjoint regions (region % T), write one
 * region at a time, and report each write's start and acknowledgement. */

#define SECTOR 512
#define CRASH_T 3
#define CRASH_WRITTEN 48
#define SECT_MAGIC 0x5345435446455259ull

struct rec {
  uint32_t type;     /* 1 start, 2 ack, 3 ready */
  uint32_t thread;
  uint64_t id, off;
  uint32_t len, pad;
};

static void sector_fill(unsigned char *p, uint64_t id, uint64_t sector)
{
  uint64_t h[3] = { SECT_MAGIC, id, sector };
  memcpy(p, h, sizeof h);
  fill_random(p + 24, SECTOR - 24, id * 1000003 + sector);
}

static bool sector_is(const unsigned char *p, uint64_t id, uint64_t sector)
{
  unsigned char want[SECTOR];
  sector_fill(want, id, sector);
  return memcmp(p, want, SECTOR) == 0;
}

struct child_ctx {
  struct cache *c;
  struct source *s;
  struct bitmap *dirty;
  int wfd;
  unsigned t;
  unsigned kill_after;   /* > 0: SIGKILL itself right after that many acks */
};

static void send_rec(int fd, struct rec r)
{
  if (write(fd, &r, sizeof r) != (ssize_t)sizeof r)
    _exit(3);
}

static void *child_writer(void *arg)
{
  struct child_ctx *x = arg;
  uint64_t G = x->s->gran, rs = 1234567 + x->t * 7;
  unsigned char *buf = malloc(G);
  for (uint64_t k = 1;; k++) {
    /* The first CRASH_WRITTEN regions only: the rest stays clean, so that a
     * quota evicts there while the child is killed. */
    uint64_t rg = rng_below(&rs, CRASH_WRITTEN / CRASH_T) * CRASH_T + x->t;
    bool last = x->kill_after && k >= x->kill_after;
    if (last)
      rg = CRASH_WRITTEN + x->t;   /* whole and missing: only its own commit makes it durable */
    uint64_t spr = G / SECTOR, a = 0, n = spr;
    if (!last && rng_below(&rs, 10) >= 3) {        /* a part of the region */
      a = rng_below(&rs, spr);
      n = 1 + rng_below(&rs, spr - a);
    }
    uint64_t id = k * CRASH_T + x->t, off = rg * G + a * SECTOR;
    for (uint64_t i = 0; i < n; i++)
      sector_fill(buf + i * SECTOR, id, off / SECTOR + i);
    send_rec(x->wfd, (struct rec){ 1, x->t, id, off, (uint32_t)(n * SECTOR), 0 });
    bitmap_set(x->dirty, rg);                      /* as the CBT: before the write */
    if (wr(x->c, buf, n * SECTOR, off) == 0) {
      send_rec(x->wfd, (struct rec){ 2, x->t, id, off, (uint32_t)(n * SECTOR), 0 });
      if (last)
        raise(SIGKILL);   /* no commit of anyone else's can follow the ack */
    }
  }
  return NULL;
}

static void *child_reader(void *arg)
{
  struct child_ctx *x = arg;
  uint64_t rs = 99991;
  unsigned char *buf = malloc(x->s->gran);
  for (;;) {
    uint64_t off = rng_below(&rs, x->s->size - x->s->gran);
    rd(x->c, buf, x->s->gran, off);
  }
  return NULL;
}

/* kill_after 0: writers, a reader and hydration until the parent kills it;
 * else one writer alone that kills itself after kill_after acks. */
static void __attribute__((noreturn)) crash_child(struct source *s, int wfd, uint64_t quota,
                                                  unsigned kill_after)
{
  struct cache *c = new_cache("crash", s, (struct opts){ .quota = quota,
                                                         .bps = kill_after ? 0 : 64 * MiB });
  if (!c)
    _exit(2);
  struct bitmap dirty;
  bitmap_init(&dirty, s->nregions);
  cache_set_dirty_map(c, &dirty);
  send_rec(wfd, (struct rec){ .type = 3 });
  struct child_ctx x[CRASH_T + 1];
  pthread_t th[CRASH_T + 1];
  for (unsigned i = 0; i <= (kill_after ? 0 : CRASH_T); i++) {
    x[i] = (struct child_ctx){ c, s, &dirty, wfd, i, kill_after };
    pthread_create(&th[i], NULL, i < CRASH_T ? child_writer : child_reader, &x[i]);
  }
  for (;;)
    pause();
}

static void test_crash_round(int round, uint64_t quota, unsigned kill_after)
{
  const uint64_t G = 16 * KiB, N = 256, NS = N * G / SECTOR;
  struct source s;
  source_init(&s, G, N, 0, NULL, 0, 10);
  for (uint64_t i = 0; i < NS; i++)
    sector_fill(s.img + i * SECTOR, 0, i);
  int pfd[2];
  CHECK(pipe(pfd) == 0);
  pid_t pid = fork();
  if (pid == 0) {
    close(pfd[0]);
    crash_child(&s, pfd[1], quota, kill_after);
  }
  close(pfd[1]);

  struct rec *recs = NULL;
  size_t nrec = 0, cap = 0;
  bool ready = false;
  uint64_t deadline = 0, seed = (uint64_t)now_ns() ^ (uint64_t)round;
  unsigned char part[sizeof(struct rec)];
  size_t have = 0;
  for (;;) {
    uint64_t now = now_ns();
    if (ready && now >= deadline && pid > 0) {
      kill(pid, SIGKILL);
      pid = -pid;
    }
    struct pollfd pf = { pfd[0], POLLIN, 0 };
    int to = pid > 0 ? (ready ? (int)((deadline - now) / MS) + 1 : 10000) : 1000;
    if (poll(&pf, 1, to) <= 0) {
      if (pid > 0 && !ready)
        break;   /* the child never got ready */
      continue;
    }
    ssize_t r = read(pfd[0], part + have, sizeof part - have);
    if (r <= 0)
      break;
    have += (size_t)r;
    if (have < sizeof part)
      continue;
    have = 0;
    struct rec rec;
    memcpy(&rec, part, sizeof rec);
    if (rec.type == 3) {
      ready = true;
      deadline = now_ns() + (100 + rng_below(&seed, 250)) * MS;
      continue;
    }
    if (nrec == cap) {
      cap = cap ? 2 * cap : 1024;
      recs = realloc(recs, cap * sizeof *recs);
    }
    recs[nrec++] = rec;
  }
  close(pfd[0]);
  if (pid > 0)
    kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid > 0 ? pid : -pid, &status, 0);
  CHECK(ready);
  CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);

  /* What each sector may hold: the last acknowledged write over it (0: the
   * source), or its thread's write in progress if that covers it. */
  uint64_t *acked = calloc(NS, sizeof *acked);
  struct rec inflight[CRASH_T];
  memset(inflight, 0, sizeof inflight);
  size_t nack = 0;
  for (size_t i = 0; i < nrec; i++) {
    struct rec *r = &recs[i];
    if (r->type == 1) {
      inflight[r->thread] = *r;
    } else if (r->type == 2) {
      for (uint64_t k = r->off / SECTOR; k < (r->off + r->len) / SECTOR; k++)
        acked[k] = r->id;
      inflight[r->thread].type = 0;
      nack++;
    }
  }
  char err[512] = "";
  struct cache *c = open_cache_err("crash", G, (struct opts){ 0 }, err, sizeof err);
  if (!c)
    fprintf(stderr, "reopen after kill -9: %s\n", err);
  CHECK(c != NULL);
  if (c) {
    bool all_acked_present = true, all_right = true;
    for (size_t i = 0; i < nrec; i++)
      if (recs[i].type == 2 && !cache_present(c, recs[i].off / G))
        all_acked_present = false;
    unsigned char *buf = malloc(G);
    uint64_t npresent = 0;
    for (uint64_t rg = 0; rg < N; rg++) {
      if (!cache_present(c, rg))
        continue;
      npresent++;
      CHECK(rd(c, buf, G, rg * G) == 0);
      for (uint64_t k = rg * G / SECTOR; k < (rg + 1) * G / SECTOR; k++) {
        const unsigned char *p = buf + (k - rg * G / SECTOR) * SECTOR;
        struct rec *f = &inflight[rg % CRASH_T];
        bool ok = sector_is(p, acked[k], k) ||
                  (f->type == 1 && k >= f->off / SECTOR && k < (f->off + f->len) / SECTOR &&
                   sector_is(p, f->id, k));
        if (!ok && all_right)
          fprintf(stderr, "crash round %d: region %llu sector %llu is wrong (acked id %llu)\n",
                  round, (unsigned long long)rg, (unsigned long long)k,
                  (unsigned long long)acked[k]);
        all_right &= ok;
      }
    }
    CHECK(all_acked_present);
    CHECK(all_right);
    CHECK(nack > 0);
    fprintf(stderr, "crash round %d: %zu writes acknowledged, %llu regions present after "
            "kill -9\n", round, nack, (unsigned long long)npresent);
    free(buf);
    close_cache(c);
  }
  free(acked);
  free(recs);
  source_free(&s);
}

static void test_crash(void)
{
  const uint64_t G = 16 * KiB;
  test_crash_round(0, 0, 0);
  for (int i = 1; i <= 5; i++)                 /* a quota: evictions too */
    test_crash_round(i, (uint64_t)(56 + 8 * i) * G, 0);
  uint64_t seed = now_ns();
  for (int i = 6; i < 9; i++)
    test_crash_round(i, 0, 1 + (unsigned)rng_below(&seed, 40));   /* killed at an ack */
}

/* ---- a refused meta file ---- */

static void copy_file(const char *from, const char *to)
{
  int a = open(from, O_RDONLY), b = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  CHECK(a >= 0 && b >= 0);
  char buf[65536];
  ssize_t n;
  while ((n = read(a, buf, sizeof buf)) > 0)
    CHECK(write(b, buf, (size_t)n) == n);
  close(a);
  close(b);
}

static void flip_byte(const char *path, off_t off)
{
  int fd = open(path, O_RDWR);
  unsigned char ch;
  CHECK(pread(fd, &ch, 1, off) == 1);
  ch ^= 0x40;
  CHECK(pwrite(fd, &ch, 1, off) == 1);
  close(fd);
}

static void expect_refused(const char *name, uint64_t gran, const char *needle)
{
  char err[512] = "";
  struct cache *c = open_cache_err(name, gran, (struct opts){ 0 }, err, sizeof err);
  CHECK(c == NULL);
  if (c)
    close_cache(c);
  CHECK(strstr(err, "refused") != NULL);
  CHECK(strstr(err, needle) != NULL);
  if (!strstr(err, needle))
    fprintf(stderr, "wanted \"%s\" in: %s\n", needle, err);
}

static void test_corrupt(void)
{
  struct source s;
  const uint64_t G = 64 * KiB;
  source_init(&s, G, 16, 0, NULL, 0, 11);
  struct cache *c = new_cache("bad", &s, (struct opts){ 0 });
  CHECK(read_equals(c, s.img + 3 * G, 100, 3 * G));
  source_detach(&s);
  close_cache(c);
  char meta[300], keep[300], img[300];
  path_of(meta, sizeof meta, "bad.meta");
  path_of(keep, sizeof keep, "bad.meta.keep");
  path_of(img, sizeof img, "bad.img");
  copy_file(meta, keep);

  flip_byte(meta, 20);                       /* header */
  expect_refused("bad", G, "corrupt");
  copy_file(keep, meta);
  flip_byte(meta, CACHE_META_PAGE_SIZE + 0);  /* the bit page (region 3's word) */
  expect_refused("bad", G, "corrupt");
  copy_file(keep, meta);
  expect_refused("bad", 2 * G, "granularity");
  CHECK(truncate(img, (off_t)(17 * G)) == 0);
  expect_refused("bad", G, "disk of");
  CHECK(truncate(img, (off_t)(16 * G)) == 0);
  CHECK(truncate(meta, CACHE_META_PAGE_SIZE) == 0);
  expect_refused("bad", G, "truncated");
  copy_file(keep, meta);
  c = open_cache("bad", G, (struct opts){ 0 });   /* the good one opens */
  if (c) {
    CHECK(cache_present(c, 3) && !cache_present(c, 4));
    CHECK(read_equals(c, s.img + 3 * G, G, 3 * G));
    close_cache(c);
  }
  unlink(meta);
  expect_refused("bad", G, "does not exist");
  source_free(&s);
}

/* ---- main ---- */

static void remove_dir(const char *d)
{
  DIR *dp = opendir(d);
  if (!dp)
    return;
  struct dirent *e;
  char p[600];
  while ((e = readdir(dp))) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
      continue;
    snprintf(p, sizeof p, "%s/%s", d, e->d_name);
    unlink(p);
  }
  closedir(dp);
  rmdir(d);
}

static const char *volatile current_test = "";

static void on_alarm(int sig)
{
  (void)sig;
  static const char msg[] = "test_cache: timed out (a wait that never ends) in test ";
  if (write(2, msg, sizeof msg - 1) < 0 || write(2, current_test, strlen(current_test)) < 0 ||
      write(2, "\n", 1) < 0)
    _exit(1);
  _exit(1);
}

int main(void)
{
  signal(SIGALRM, on_alarm);
  log_init("test_cache");
  log_set_level(LOG_WARN);
  snprintf(dir, sizeof dir, "%s/ferry-cache-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 1;
  }
  struct { const char *name; void (*fn)(void); } tests[] = {
    { "group_commit", test_group_commit },
    { "read_through", test_read_through },
    { "single_fetch", test_single_fetch },
    { "writes", test_writes },
    { "hydration", test_hydration },
    { "link", test_link },
    { "quota", test_quota },
    { "rpo", test_rpo },
    { "crash", test_crash },
    { "corrupt", test_corrupt },
  };
  const char *only = getenv("TEST_ONLY");
  for (size_t i = 0; i < ARRAY_SIZE(tests); i++) {
    if (only && strcmp(only, tests[i].name) != 0)
      continue;
    uint64_t t0 = now_ns();
    int before = failures;
    current_test = tests[i].name;
    alarm(40);                          /* a hang fails the test, and says where */
    tests[i].fn();
    alarm(0);
    fprintf(stderr, "%-14s %s (%.2f s)\n", tests[i].name, failures == before ? "ok" : "FAILED",
            (double)(now_ns() - t0) / 1e9);
  }
  remove_dir(dir);
  if (failures)
    fprintf(stderr, "%d check(s) failed\n", failures);
  return failures ? 1 : 0;
}
