/* test_cbt: the crash-safe dirty map.
 *   - marks persist exactly across a clean close; tickets and the fast path
 *   - persist coarse: writes inside one persist neighbourhood cost one commit;
 *     a sync drops the persisted neighbourhoods and makes the file exact
 *   - kill -9 (a forked child SIGKILLs itself while marking): every mark it
 *     had acknowledged is in the reopened map, and nothing outside the persist
 *     neighbourhoods of what it marked or was marking; "recovered: unclean"
 *   - a corrupt header: all dirty, "recovered: ..."; a flipped byte in one
 *     page: exactly that page's regions dirty; truncated file; mismatched
 *     granularity or size; a map flagged by cbt_invalidate; a missing map
 *   - swap under concurrent writers: every write lands in exactly one map, on
 *     the right side of each swap; swap_fast (no IO: the file keeps the bits
 *     until a full write) and swap_keep (its keeper runs first, may refuse)
 *   - fail mode: a map write error fails the waiters with -EIO, removes the
 *     file, refuses new marks; sync/swap leave it
 * Each test works in its own temporary directory. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/bitmap.h"
#include "common/util.h"
#include "disk/cbt.h"

#include "check.h"

#define G 4096ull                    /* granularity used by most tests */
#define PB ((uint64_t)CBT_PAGE_BITS)
#define SP ((uint64_t)CBT_PERSIST_SPAN)  /* regions per persist neighbourhood */

static char dir[256];

static void path_of(char *buf, size_t len, const char *name)
{
  snprintf(buf, len, "%s/%s", dir, name);
}

static struct cbt *open_map(const char *path, uint64_t size, uint64_t gran, unsigned flags)
{
  char err[256] = "";
  struct cbt *c = cbt_open_ex(path, "test", size, gran, flags, err, sizeof err);
  if (!c)
    fprintf(stderr, "cbt_open_ex(%s): %s\n", path, err);
  CHECK(c != NULL);
  return c;
}

/* A writer's mark as disk.c does it; returns cbt_wait's result. */
static int mark_wait(struct cbt *c, uint64_t off, uint64_t len)
{
  cbt_write_begin(c);
  uint64_t t = cbt_mark(c, off, len);
  cbt_write_end(c);
  return cbt_wait(c, t);
}

static bool starts_with(const char *s, const char *prefix)
{
  return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* Compares the live map with a model (bool per bit); prints the first diff. */
static bool map_equals(struct cbt *c, const bool *model)
{
  const struct bitmap *b = cbt_bitmap(c);
  uint64_t n = 0;
  for (uint64_t i = 0; i < b->nbits; i++) {
    if (bitmap_test(b, i) != model[i]) {
      fprintf(stderr, "  bit %llu: map %d, expected %d\n", (unsigned long long)i,
              bitmap_test(b, i), model[i]);
      return false;
    }
    n += model[i];
  }
  if (cbt_dirty_count(c) != n) {
    fprintf(stderr, "  dirty count %llu, expected %llu\n",
            (unsigned long long)cbt_dirty_count(c), (unsigned long long)n);
    return false;
  }
  return true;
}

static void model_mark(bool *model, uint64_t nbits, uint64_t off, uint64_t len, uint64_t gran)
{
  for (uint64_t i = off / gran; i <= (off + len - 1) / gran && i < nbits; i++)
    model[i] = true;
}

static void flip_byte(const char *path, off_t off, unsigned char mask)
{
  int fd = open(path, O_RDWR);
  CHECK(fd >= 0);
  unsigned char b;
  CHECK(pread(fd, &b, 1, off) == 1);
  b ^= mask;
  CHECK(pwrite(fd, &b, 1, off) == 1);
  close(fd);
}

/* ---- tests ---- */

static void test_persist_exact(void)
{
  printf("marks persist exactly across a clean close; fast path and tickets\n");
  char path[300];
  path_of(path, sizeof path, "exact.cbt");
  const uint64_t gran = 64 * 1024, size = 3 * PB * gran + 12345;   /* 4 pages */
  const uint64_t nbits = DIV_ROUND_UP(size, gran);
  bool *model = calloc(nbits, 1);

  struct cbt *c = open_map(path, size, gran, CBT_OPEN_NEW);
  CHECK(strcmp(cbt_state(c), "created") == 0);
  CHECK(cbt_nbits(c) == nbits && cbt_granularity(c) == gran && cbt_generation(c) == 0);
  CHECK(cbt_dirty_count(c) == 0);

  static const struct { uint64_t off, len; } ios[] = {
    { 1000, 3333 }, { 64 * 1024 - 1, 2 }, { 10 * 1024 * 1024 + 7, 200000 },
    { PB * 64 * 1024 - 5, 10 },              /* across the page 1/2 boundary */
    { 3 * PB * 64 * 1024 + 12000, 345 },     /* last, partial region */
    { 0, 1 },
  };
  bool *nb_seen = calloc(DIV_ROUND_UP(nbits, SP), 1);
  for (size_t i = 0; i < ARRAY_SIZE(ios); i++) {
    /* A ticket iff the write reaches a neighbourhood not persisted yet:
     * (64K-1, 2) and (0, 1) stay inside the first write's. */
    bool new_nb = false;
    for (uint64_t n = ios[i].off / gran / SP; n <= (ios[i].off + ios[i].len - 1) / gran / SP; n++) {
      new_nb |= !nb_seen[n];
      nb_seen[n] = true;
    }
    cbt_write_begin(c);
    uint64_t t = cbt_mark(c, ios[i].off, ios[i].len);
    cbt_write_end(c);
    CHECK((t > 0) == new_nb);
    CHECK(cbt_wait(c, t) == 0);
    CHECK(cbt_ticket_done(c, t));
    model_mark(model, nbits, ios[i].off, ios[i].len, gran);
  }
  /* Already set and durable: no ticket, no lock. */
  for (size_t i = 0; i < ARRAY_SIZE(ios); i++)
    CHECK(cbt_mark(c, ios[i].off, ios[i].len) == 0);
  CHECK(cbt_mark(c, 0, 0) == 0);
  CHECK(cbt_mark(c, size, 10) == 0);            /* beyond the end: nothing */
  CHECK(map_equals(c, model));                  /* exact, not coarse */
  free(nb_seen);
  cbt_close(c);

  c = open_map(path, size, gran, 0);
  CHECK(strcmp(cbt_state(c), "ok") == 0);
  CHECK(map_equals(c, model));
  CHECK(cbt_generation(c) == 0);

  /* A snapshot is a copy; the live map is untouched. */
  struct bitmap snap;
  bitmap_init(&snap, nbits);
  CHECK(cbt_snapshot(c, &snap) == 0);
  bool same = true;
  for (uint64_t i = 0; i < nbits; i++)
    same &= bitmap_test(&snap, i) == model[i];
  CHECK(same);
  bitmap_free(&snap);
  cbt_close(c);

  /* A reopen without changes leaves the file as it was. */
  c = open_map(path, size, gran, 0);
  CHECK(map_equals(c, model));
  cbt_close(c);

  /* CBT_OPEN_NEW replaces any map. */
  c = open_map(path, size, gran, CBT_OPEN_NEW);
  CHECK(strcmp(cbt_state(c), "created") == 0 && cbt_dirty_count(c) == 0);
  cbt_close(c);
  free(model);
}

static void test_missing_map(void)
{
  printf("a missing map file (not a new disk) cannot vouch for anything: all dirty\n");
  char path[300];
  path_of(path, sizeof path, "missing.cbt");
  struct cbt *c = open_map(path, 100 * G + 1, G, 0);
  CHECK(starts_with(cbt_state(c), "recovered: "));
  CHECK(cbt_dirty_count(c) == 101);
  cbt_close(c);
  c = open_map(path, 100 * G + 1, G, 0);      /* the new file holds it */
  CHECK(strcmp(cbt_state(c), "ok") == 0 && cbt_dirty_count(c) == 101);
  cbt_close(c);
}

#define CRASH_THREADS 4
#define CRASH_ACKS 3000

struct crash_arg {
  struct cbt *c;
  int fd;            /* pipe to the parent */
  unsigned seed;
  uint64_t nbits;
  _Atomic uint64_t *acks;
};

/* Records to the parent (each one atomic pipe write): kind 0 before a mark
 * (it may be in flight at the kill), kind 1 once it is acknowledged. */
static void crash_report(int fd, uint64_t kind, uint64_t region, uint64_t len)
{
  uint64_t rec[3] = { kind, region, len };
  if (write(fd, rec, sizeof rec) != sizeof rec)
    _exit(3);
}

static void *crash_marker(void *arg)
{
  struct crash_arg *a = arg;
  unsigned s = a->seed;
  for (;;) {
    s = s * 1103515245u + 12345u;
    uint64_t region = ((uint64_t)(s >> 1) % (a->nbits / 2)) * 2;   /* even regions only */
    uint64_t len = (s & 3) == 0 ? 3 * G : 1;                      /* some span 3 regions */
    crash_report(a->fd, 0, region, len);
    if (mark_wait(a->c, region * G, len) == 0) {
      crash_report(a->fd, 1, region, len);
      if (atomic_fetch_add(a->acks, 1) + 1 == CRASH_ACKS)
        kill(getpid(), SIGKILL);   /* die mid-stream: other threads are marking */
    }
  }
  return NULL;
}

static void test_crash(void)
{
  printf("kill -9 while marking: every acknowledged mark is in the reopened map, and\n"
         "  nothing outside the neighbourhoods of the marks made or under way\n");
  char path[300];
  path_of(path, sizeof path, "crash.cbt");
  const uint64_t nbits = 23 * PB + 1000;       /* 24 pages: marked neighbourhoods stay sparse */
  struct cbt *c = open_map(path, nbits * G, G, CBT_OPEN_NEW);
  cbt_close(c);

  int p[2];
  CHECK(pipe(p) == 0);
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    close(p[0]);
    char err[256];
    struct cbt *cc = cbt_open(path, "child", nbits * G, G, err, sizeof err);
    if (!cc)
      _exit(2);
    _Atomic uint64_t acks = 0;
    struct crash_arg a[CRASH_THREADS];
    pthread_t th[CRASH_THREADS];
    for (int i = 0; i < CRASH_THREADS; i++) {
      a[i] = (struct crash_arg){ cc, p[1], 17u + (unsigned)i * 7919u, nbits, &acks };
      pthread_create(&th[i], NULL, crash_marker, &a[i]);
    }
    for (int i = 0; i < CRASH_THREADS; i++)
      pthread_join(th[i], NULL);
    _exit(4);   /* not reached: the child kills itself */
  }
  close(p[1]);
  bool *acked = calloc(nbits, 1);
  bool *touched_nb = calloc(DIV_ROUND_UP(nbits, SP), 1);   /* acked or in flight */
  uint64_t rec[3], nacks = 0;
  while (read_full(p[0], rec, sizeof rec) == 0) {
    for (uint64_t r = rec[1]; r <= (rec[1] * G + rec[2] - 1) / G && r < nbits; r++) {
      if (rec[0] == 1)
        acked[r] = true;
      touched_nb[r / SP] = true;
    }
    nacks += rec[0] == 1;
  }
  close(p[0]);
  int status;
  waitpid(pid, &status, 0);
  CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  printf("  child acknowledged %llu marks before SIGKILL\n", (unsigned long long)nacks);
  CHECK(nacks >= CRASH_ACKS);

  c = open_map(path, nbits * G, G, 0);
  printf("  reopened: state \"%s\", %llu regions dirty\n", cbt_state(c),
         (unsigned long long)cbt_dirty_count(c));
  /* Whole 4 KiB page writes cannot tear on a process kill: the map is intact,
   * but it was not closed cleanly, so it is exact only to the neighbourhood. */
  CHECK(starts_with(cbt_state(c), "recovered: unclean shutdown"));
  CHECK(strstr(cbt_state(c), "checksum") == NULL);
  uint64_t missing = 0, stray = 0, extra = 0;
  const struct bitmap *b = cbt_bitmap(c);
  for (uint64_t i = 0; i < nbits; i++) {
    if (acked[i] && !bitmap_test(b, i))
      missing++;
    if (bitmap_test(b, i) && !acked[i]) {
      extra++;
      if (!touched_nb[i / SP])
        stray++;      /* not in the neighbourhood of any mark made or under way */
    }
  }
  printf("  %llu regions beyond the acknowledged ones, %llu outside their neighbourhoods\n",
         (unsigned long long)extra, (unsigned long long)stray);
  CHECK(missing == 0);
  CHECK(stray == 0);
  bool *loaded = calloc(nbits, 1);
  for (uint64_t i = 0; i < nbits; i++)
    loaded[i] = bitmap_test(b, i);
  cbt_close(c);

  /* The clean close wrote the map (what was loaded) as exact: "ok" again. */
  c = open_map(path, nbits * G, G, 0);
  CHECK(strcmp(cbt_state(c), "ok") == 0);
  CHECK(map_equals(c, loaded));
  cbt_close(c);
  free(loaded);
  free(acked);
  free(touched_nb);
}

static void test_corrupt_header(void)
{
  printf("a corrupt header: the whole map dirty, \"recovered: <reason>\"\n");
  char path[300];
  path_of(path, sizeof path, "hdr.cbt");
  const uint64_t nbits = 2 * PB + 5;
  struct cbt *c = open_map(path, nbits * G, G, CBT_OPEN_NEW);
  CHECK(mark_wait(c, 5 * G, 1) == 0);
  cbt_close(c);
  flip_byte(path, 40, 0xff);                   /* generation, under the checksum */
  c = open_map(path, nbits * G, G, 0);
  printf("  state: %s\n", cbt_state(c));
  CHECK(starts_with(cbt_state(c), "recovered: ") && strlen(cbt_state(c)) > 12);
  CHECK(strstr(cbt_state(c), "checksum") != NULL);
  CHECK(cbt_dirty_count(c) == nbits);
  cbt_close(c);
  /* The map was rewritten: now trusted, and still all dirty. */
  c = open_map(path, nbits * G, G, 0);
  CHECK(strcmp(cbt_state(c), "ok") == 0 && cbt_dirty_count(c) == nbits);
  cbt_close(c);

  /* Bad magic and a truncated header likewise. */
  flip_byte(path, 0, 0x20);
  c = open_map(path, nbits * G, G, 0);
  CHECK(starts_with(cbt_state(c), "recovered: ") && cbt_dirty_count(c) == nbits);
  cbt_close(c);
  CHECK(truncate(path, 100) == 0);
  c = open_map(path, nbits * G, G, 0);
  CHECK(starts_with(cbt_state(c), "recovered: ") && cbt_dirty_count(c) == nbits);
  CHECK(strstr(cbt_state(c), "truncated") != NULL);
  cbt_close(c);
}

static void test_corrupt_page(void)
{
  printf("a flipped byte in page 2: exactly its regions dirty, the others exact\n");
  char path[300];
  path_of(path, sizeof path, "page.cbt");
  const uint64_t nbits = 3 * PB - 100;         /* 3 bit pages */
  bool *model = calloc(nbits, 1);
  struct cbt *c = open_map(path, nbits * G, G, CBT_OPEN_NEW);
  const uint64_t marks[] = { 5, 1000, PB + 7, 2 * PB + 3, nbits - 1 };
  for (size_t i = 0; i < ARRAY_SIZE(marks); i++) {
    CHECK(mark_wait(c, marks[i] * G, 1) == 0);
    model[marks[i]] = true;
  }
  cbt_close(c);
  flip_byte(path, 2 * CBT_PAGE_SIZE + 100, 0x01);   /* file page 2 = regions [PB, 2PB) */
  for (uint64_t i = PB; i < 2 * PB; i++)
    model[i] = true;
  c = open_map(path, nbits * G, G, 0);
  printf("  state: %s\n", cbt_state(c));
  CHECK(starts_with(cbt_state(c), "recovered: "));
  CHECK(strstr(cbt_state(c), "page 2") != NULL);
  CHECK(map_equals(c, model));
  cbt_close(c);
  c = open_map(path, nbits * G, G, 0);         /* rewritten in place: now ok */
  CHECK(strcmp(cbt_state(c), "ok") == 0);
  CHECK(map_equals(c, model));
  cbt_close(c);

  printf("a torn checksum field and a truncated file: only the pages affected\n");
  memset(model, 0, nbits);
  c = open_map(path, nbits * G, G, CBT_OPEN_NEW);
  for (size_t i = 0; i < ARRAY_SIZE(marks); i++) {
    CHECK(mark_wait(c, marks[i] * G, 1) == 0);
    model[marks[i]] = true;
  }
  cbt_close(c);
  flip_byte(path, 2 * CBT_PAGE_SIZE - 3, 0x80);     /* page 1's checksum itself */
  CHECK(truncate(path, 3 * CBT_PAGE_SIZE) == 0);    /* page 3 gone */
  for (uint64_t i = 0; i < PB; i++)
    model[i] = true;
  for (uint64_t i = 2 * PB; i < nbits; i++)
    model[i] = true;
  c = open_map(path, nbits * G, G, 0);
  printf("  state: %s\n", cbt_state(c));
  CHECK(starts_with(cbt_state(c), "recovered: "));
  CHECK(strstr(cbt_state(c), "truncated") != NULL);
  CHECK(map_equals(c, model));
  cbt_close(c);
  free(model);
}

static void test_mismatch(void)
{
  printf("a map of another granularity or disk size: all dirty\n");
  char path[300];
  path_of(path, sizeof path, "mis.cbt");
  struct cbt *c = open_map(path, 1000 * G, G, CBT_OPEN_NEW);
  CHECK(mark_wait(c, 0, 1) == 0);
  struct bitmap out;
  bitmap_init(&out, cbt_nbits(c));
  uint64_t gen = 0;
  CHECK(cbt_swap(c, &out, &gen) == 0 && gen == 1);
  bitmap_free(&out);
  CHECK(mark_wait(c, 0, 1) == 0);
  cbt_close(c);

  c = open_map(path, 1000 * G, 2 * G, 0);
  printf("  state: %s\n", cbt_state(c));
  CHECK(starts_with(cbt_state(c), "recovered: ") && strstr(cbt_state(c), "granularity"));
  CHECK(cbt_dirty_count(c) == 500);
  CHECK(cbt_generation(c) == 1);               /* a valid header keeps its generation */
  cbt_close(c);
  c = open_map(path, 2000 * G, 2 * G, 0);
  printf("  state: %s\n", cbt_state(c));
  CHECK(starts_with(cbt_state(c), "recovered: ") && strstr(cbt_state(c), "disk of"));
  CHECK(cbt_dirty_count(c) == 1000);
  cbt_close(c);
  c = open_map(path, 2000 * G, 2 * G, 0);
  CHECK(strcmp(cbt_state(c), "ok") == 0 && cbt_dirty_count(c) == 1000);
  cbt_close(c);

  char err[128];
  CHECK(cbt_open(path, "t", 100 * G, 3000, err, sizeof err) == NULL);   /* not a power of 2 */
}

static void test_invalidate(void)
{
  printf("a map flagged by cbt_invalidate (CBT off meanwhile): all dirty at the next open\n");
  char path[300];
  path_of(path, sizeof path, "inv.cbt");
  struct cbt *c = open_map(path, 100 * G, G, CBT_OPEN_NEW);
  cbt_close(c);
  CHECK(cbt_invalidate(path, "t") == 0);
  CHECK(cbt_invalidate(path, "t") == 0);       /* twice is fine */
  c = open_map(path, 100 * G, G, 0);
  printf("  state: %s\n", cbt_state(c));
  CHECK(starts_with(cbt_state(c), "recovered: ") && strstr(cbt_state(c), "tracking off"));
  CHECK(cbt_dirty_count(c) == 100);
  cbt_close(c);
  c = open_map(path, 100 * G, G, 0);           /* flag cleared by the rewrite */
  CHECK(strcmp(cbt_state(c), "ok") == 0 && cbt_dirty_count(c) == 100);
  cbt_close(c);
  char gone[300];
  path_of(gone, sizeof gone, "never.cbt");
  CHECK(cbt_invalidate(gone, "t") == 0);       /* nothing to flag */
}

/* ---- swap under writers ---- */

#define SW_THREADS 4
#define SW_PER_THREAD 6000
#define SW_SWAPS 25
#define SW_NBITS (SW_THREADS * SW_PER_THREAD + 1000)

static _Atomic uint64_t lclock;               /* logical clock for ordering */
static uint64_t w_start[SW_NBITS], w_ack[SW_NBITS];

struct sw_arg {
  struct cbt *c;
  int id;
};

static void *sw_writer(void *arg)
{
  struct sw_arg *a = arg;
  for (uint64_t j = 0; j < SW_PER_THREAD; j++) {
    uint64_t r = j * SW_THREADS + (uint64_t)a->id;   /* every region written once */
    w_start[r] = atomic_fetch_add(&lclock, 1);
    int rc = mark_wait(a->c, r * G, G);
    w_ack[r] = atomic_fetch_add(&lclock, 1);
    if (rc != 0)
      w_ack[r] = UINT64_MAX;
  }
  return NULL;
}

static void test_swap_concurrent(void)
{
  printf("swap under %d writer threads: each write in exactly one map, on the right side\n",
         SW_THREADS);
  char path[300];
  path_of(path, sizeof path, "swap.cbt");
  struct cbt *c = open_map(path, SW_NBITS * G, G, CBT_OPEN_NEW);
  struct bitmap maps[SW_SWAPS + 1];
  uint64_t before[SW_SWAPS], after[SW_SWAPS];
  pthread_t th[SW_THREADS];
  struct sw_arg a[SW_THREADS];
  for (int i = 0; i < SW_THREADS; i++) {
    a[i] = (struct sw_arg){ c, i };
    pthread_create(&th[i], NULL, sw_writer, &a[i]);
  }
  for (int k = 0; k < SW_SWAPS; k++) {
    usleep(2000);
    bitmap_init(&maps[k], SW_NBITS);
    uint64_t gen = 0;
    before[k] = atomic_fetch_add(&lclock, 1);
    CHECK(cbt_swap(c, &maps[k], &gen) == 0);
    after[k] = atomic_fetch_add(&lclock, 1);
    CHECK(gen == (uint64_t)k + 1 && cbt_generation(c) == gen);
  }
  for (int i = 0; i < SW_THREADS; i++)
    pthread_join(th[i], NULL);
  bitmap_init(&maps[SW_SWAPS], SW_NBITS);
  CHECK(cbt_snapshot(c, &maps[SW_SWAPS]) == 0);

  uint64_t lost = 0, twice = 0, early = 0, late = 0, failed = 0, stray = 0;
  uint64_t per_map[SW_SWAPS + 1] = { 0 };
  for (uint64_t r = 0; r < SW_NBITS; r++) {
    bool written = r < SW_THREADS * SW_PER_THREAD;
    int found = -1, count = 0;
    for (int m = 0; m <= SW_SWAPS; m++) {
      if (bitmap_test(&maps[m], r)) {
        if (found < 0)
          found = m;
        count++;
      }
    }
    if (!written) {
      stray += count;
      continue;
    }
    if (w_ack[r] == UINT64_MAX) {
      failed++;
      continue;
    }
    if (count == 0) {
      lost++;
      continue;
    }
    if (count > 1)
      twice++;
    per_map[found]++;
    for (int k = 0; k < SW_SWAPS; k++) {
      if (w_ack[r] < before[k] && found > k)
        late++;       /* acknowledged before swap k yet not in its map or earlier */
      if (w_start[r] > after[k] && found <= k)
        early++;      /* started after swap k returned yet in its map or earlier */
    }
  }
  printf("  writes per map:");
  for (int m = 0; m <= SW_SWAPS; m++)
    printf(" %llu", (unsigned long long)per_map[m]);
  printf("\n  lost %llu, in two maps %llu, wrong side %llu/%llu, failed %llu, stray %llu\n",
         (unsigned long long)lost, (unsigned long long)twice, (unsigned long long)late,
         (unsigned long long)early, (unsigned long long)failed, (unsigned long long)stray);
  CHECK(lost == 0 && twice == 0 && late == 0 && early == 0 && failed == 0 && stray == 0);

  /* The file holds the live map exactly (the last swap's clean map + later marks). */
  bool *model = calloc(SW_NBITS, 1);
  for (uint64_t r = 0; r < SW_NBITS; r++)
    model[r] = bitmap_test(&maps[SW_SWAPS], r);
  cbt_close(c);
  c = open_map(path, SW_NBITS * G, G, 0);
  CHECK(strcmp(cbt_state(c), "ok") == 0);
  CHECK(cbt_generation(c) == SW_SWAPS);
  CHECK(map_equals(c, model));
  cbt_close(c);
  free(model);
  for (int m = 0; m <= SW_SWAPS; m++)
    bitmap_free(&maps[m]);
}

static void test_swap_durable(void)
{
  printf("a swap is durable at once: a restart right after it finds the clean map\n");
  char path[300];
  path_of(path, sizeof path, "swapd.cbt");
  const uint64_t nbits = 2 * PB;
  struct cbt *c = open_map(path, nbits * G, G, CBT_OPEN_NEW);
  for (uint64_t r = 0; r < nbits; r += 1000)
    CHECK(mark_wait(c, r * G, 1) == 0);
  struct bitmap out;
  bitmap_init(&out, nbits);
  uint64_t gen = 0;
  CHECK(cbt_swap(c, &out, &gen) == 0 && gen == 1);
  CHECK(bitmap_count(&out) == DIV_ROUND_UP(nbits, 1000));
  bitmap_free(&out);
  /* What a daemon restarted now (no clean close) would load: the clean map,
   * exact ("ok": no coarse page was written since the swap). */
  struct cbt *r = open_map(path, nbits * G, G, 0);
  CHECK(strcmp(cbt_state(r), "ok") == 0);
  CHECK(cbt_generation(r) == 1 && cbt_dirty_count(r) == 0);
  cbt_close(r);
  CHECK(mark_wait(c, 77 * G, 1) == 0);
  /* And after a write: the new file holds 77's neighbourhood, no more. */
  r = open_map(path, nbits * G, G, 0);
  printf("  as a restart sees it: state \"%s\", generation %llu, %llu dirty\n", cbt_state(r),
         (unsigned long long)cbt_generation(r), (unsigned long long)cbt_dirty_count(r));
  CHECK(starts_with(cbt_state(r), "recovered: unclean shutdown"));
  CHECK(cbt_generation(r) == 1);
  CHECK(cbt_dirty_count(r) == SP && bitmap_test(cbt_bitmap(r), 77));
  CHECK(bitmap_next(cbt_bitmap(r), 0, true) == 77 / SP * SP);
  cbt_close(r);
  cbt_close(c);
}

/* cbt_swap_fast takes the bits without file IO: the file keeps holding them
 * (a crash reloads them: over-reporting, never under), the persisted
 * neighbourhoods stay persisted (no new commit for writes there), and the
 * next full write (sync) makes the file exact again. */
static void test_swap_fast(void)
{
  printf("swap_fast: no IO; the file keeps the swapped bits until the next full write\n");
  char path[300];
  path_of(path, sizeof path, "swapf.cbt");
  const uint64_t nbits = 2 * PB;
  struct cbt *c = open_map(path, nbits * G, G, CBT_OPEN_NEW);
  CHECK(mark_wait(c, 5 * G, 1) == 0);
  CHECK(mark_wait(c, (PB + 3) * G, 1) == 0);
  uint64_t commits = cbt_commit_count(c);
  struct bitmap out;
  bitmap_init(&out, nbits);
  uint64_t gen = 0;
  CHECK(cbt_swap_fast(c, &out, &gen) == 0 && gen == 1);
  CHECK(bitmap_count(&out) == 2 && bitmap_test(&out, 5) && bitmap_test(&out, PB + 3));
  CHECK(cbt_dirty_count(c) == 0 && cbt_generation(c) == 1);
  CHECK(cbt_commit_count(c) == commits);             /* no IO at all */
  /* A write in a neighbourhood already persisted needs no commit. */
  CHECK(mark_wait(c, 6 * G, 1) == 0);
  CHECK(cbt_commit_count(c) == commits);
  CHECK(cbt_dirty_count(c) == 1);
  /* A write elsewhere commits a page: the retained bits stay in it. */
  CHECK(mark_wait(c, (PB + 1000) * G, 1) == 0);
  CHECK(cbt_commit_count(c) > commits);
  struct cbt *r = open_map(path, nbits * G, G, 0);    /* a crash now */
  CHECK(bitmap_test(cbt_bitmap(r), 5) && bitmap_test(cbt_bitmap(r), 6));
  CHECK(bitmap_test(cbt_bitmap(r), PB + 3) && bitmap_test(cbt_bitmap(r), PB + 1000));
  cbt_close(r);
  /* A clean sync writes the exact map only: what swap_fast took is gone
   * from the file (its consumer had to keep it). */
  CHECK(cbt_sync(c) == 0);
  r = open_map(path, nbits * G, G, 0);
  CHECK(strcmp(cbt_state(r), "ok") == 0);
  CHECK(cbt_dirty_count(r) == 2);
  CHECK(bitmap_test(cbt_bitmap(r), 6) && bitmap_test(cbt_bitmap(r), PB + 1000));
  CHECK(!bitmap_test(cbt_bitmap(r), 5) && !bitmap_test(cbt_bitmap(r), PB + 3));
  cbt_close(r);
  /* And a close right after a fast swap rewrites the file (it is not exact). */
  CHECK(cbt_swap_fast(c, &out, &gen) == 0 && bitmap_count(&out) == 2);
  cbt_close(c);
  r = open_map(path, nbits * G, G, 0);
  CHECK(strcmp(cbt_state(r), "ok") == 0 && cbt_dirty_count(r) == 0);
  cbt_close(r);
  bitmap_free(&out);
}

struct keeper {
  int result;
  uint64_t seen;
  bool file_still_holds;          /* the old file held the bits while keep ran */
  const char *path;
};

static int keep_cb(void *opaque, const struct bitmap *bits)
{
  struct keeper *k = opaque;
  k->seen = bitmap_count(bits);
  char err[256];
  struct cbt *r = cbt_open_ex(k->path, "test", 2 * PB * G, G, 0, err, sizeof err);
  k->file_still_holds = r && bitmap_test(cbt_bitmap(r), 9);
  cbt_close(r);
  return k->result;
}

/* cbt_swap_keep: the keeper runs before the old file is replaced, and a
 * keeper that fails leaves the map as it was. */
static void test_swap_keep(void)
{
  printf("swap_keep: the keeper runs before the clean file replaces the old one\n");
  char path[300];
  path_of(path, sizeof path, "swapk.cbt");
  const uint64_t nbits = 2 * PB;
  struct cbt *c = open_map(path, nbits * G, G, CBT_OPEN_NEW);
  CHECK(mark_wait(c, 9 * G, 1) == 0);
  struct bitmap out;
  bitmap_init(&out, nbits);
  struct keeper k = { .result = -EIO, .path = path };
  uint64_t gen = 0;
  CHECK(cbt_swap_keep(c, &out, &gen, keep_cb, &k) == -EIO);
  CHECK(k.seen == 1 && k.file_still_holds);
  CHECK(cbt_dirty_count(c) == 1 && cbt_generation(c) == 0);     /* unchanged */
  k.result = 0;
  CHECK(cbt_swap_keep(c, &out, &gen, keep_cb, &k) == 0 && gen == 1);
  CHECK(k.seen == 1 && k.file_still_holds && bitmap_test(&out, 9));
  CHECK(cbt_dirty_count(c) == 0);
  struct cbt *r = open_map(path, nbits * G, G, 0);
  CHECK(cbt_dirty_count(r) == 0);                /* the clean file, durable */
  cbt_close(r);
  cbt_close(c);
  bitmap_free(&out);
}

static void test_fail_mode(void)
{
  printf("fail mode: a map write error fails waiters (-EIO) and new marks; sync leaves it\n");
  char path[300];
  path_of(path, sizeof path, "fail.cbt");
  const uint64_t nbits = 2 * PB;
  /* Regions: 1 (neighbourhood 0), PB + 1 (another nbhd word), R2 and R3 in
   * neighbourhoods 1 and 2, not persisted yet, in the same nbhd word as 1. */
  const uint64_t R2 = SP + 2, R3 = 2 * SP + 3;
  struct cbt *c = open_map(path, nbits * G, G, CBT_OPEN_NEW);
  CHECK(mark_wait(c, 1 * G, 1) == 0);
  CHECK(mark_wait(c, (PB + 1) * G, 1) == 0);
  cbt_inject_write_error(c, EIO);
  CHECK(cbt_mark(c, 5 * G, 1) == 0);            /* neighbourhood 0 is durable: no commit */
  CHECK(mark_wait(c, 1 * G, 1) == 0);
  cbt_write_begin(c);
  uint64_t t = cbt_mark(c, R2 * G, 1);
  cbt_write_end(c);
  CHECK(t > 0 && t != CBT_TICKET_FAILED);
  CHECK(cbt_wait(c, t) == -EIO);
  CHECK(cbt_failed(c));
  CHECK(starts_with(cbt_state(c), "failed"));
  struct stat st;
  CHECK(stat(path, &st) < 0 && errno == ENOENT);   /* a stale map is not left behind */
  CHECK(cbt_mark(c, R3 * G, 1) == CBT_TICKET_FAILED);
  CHECK(cbt_wait(c, CBT_TICKET_FAILED) == -EIO);
  CHECK(!cbt_ticket_done(c, CBT_TICKET_FAILED));
  CHECK(cbt_mark(c, (PB + 1) * G, 1) == 0);        /* durable, in a group without a failed change */
  /* Durability is kept per nbhd word (64 neighbourhoods): a region durable
   * before, in the group whose commit failed, cannot be told apart from the
   * failed ones. */
  CHECK(cbt_wait(c, cbt_mark(c, 1 * G, 1)) == -EIO);
  CHECK(cbt_wait(c, cbt_mark(c, R2 * G, 1)) == -EIO);  /* set, never durable */
  CHECK(cbt_sync(c) == -EIO);                       /* still failing */
  struct bitmap out;
  bitmap_init(&out, nbits);
  uint64_t gen = 0;
  CHECK(cbt_swap(c, &out, &gen) == -EIO);
  CHECK(cbt_dirty_count(c) == 4);                   /* swap failed: map unchanged (1, 5, PB+1, R2) */

  cbt_inject_write_error(c, 0);
  CHECK(cbt_sync(c) == 0);
  CHECK(!cbt_failed(c) && strcmp(cbt_state(c), "created") == 0);
  CHECK(stat(path, &st) == 0);
  CHECK(mark_wait(c, R3 * G, 1) == 0);
  cbt_close(c);
  c = open_map(path, nbits * G, G, 0);
  CHECK(strcmp(cbt_state(c), "ok") == 0);
  CHECK(cbt_dirty_count(c) == 5);                   /* regions 1, 5, PB+1, R2 (failed write), R3 */
  CHECK(bitmap_test(cbt_bitmap(c), R2) && bitmap_test(cbt_bitmap(c), R3));

  printf("fail mode: a swap that writes a new map leaves it too\n");
  cbt_inject_write_error(c, ENOSPC);
  CHECK(mark_wait(c, 500 * G, 1) == -EIO);
  CHECK(cbt_failed(c));
  cbt_inject_write_error(c, 0);
  CHECK(cbt_swap(c, &out, &gen) == 0 && gen == 1);
  CHECK(bitmap_count(&out) == 6 && bitmap_test(&out, 500));
  CHECK(!cbt_failed(c) && cbt_dirty_count(c) == 0);
  CHECK(mark_wait(c, 600 * G, 1) == 0);
  bitmap_free(&out);
  cbt_close(c);

  printf("fail mode then a crash: the restart finds no map and marks all dirty\n");
  c = open_map(path, nbits * G, G, 0);
  CHECK(strcmp(cbt_state(c), "ok") == 0 && cbt_dirty_count(c) == 1);
  cbt_inject_write_error(c, EIO);
  CHECK(mark_wait(c, 700 * G, 1) == -EIO);
  struct cbt *r = open_map(path, nbits * G, G, 0);  /* as a restarted daemon would */
  CHECK(starts_with(cbt_state(r), "recovered: ") && cbt_dirty_count(r) == nbits);
  cbt_close(r);
  cbt_close(c);   /* still failing: logs, writes nothing */
}

static void test_persist_coarse(void)
{
  printf("persist coarse: random writes inside one neighbourhood cost one commit\n");
  char path[300];
  path_of(path, sizeof path, "coarse.cbt");
  const uint64_t gran = 64 * 1024, nbits = 2 * PB;   /* 2 bit pages */
  const uint64_t size = nbits * gran;
  bool *model = calloc(nbits, 1), *coarse = calloc(nbits, 1);
  struct cbt *c = open_map(path, size, gran, CBT_OPEN_NEW);
  CHECK(cbt_commit_count(c) == 0);

  /* 200 random 4 KiB writes inside neighbourhood 37. */
  const uint64_t nb = 37;
  unsigned s = 4242;
  for (int i = 0; i < 200; i++) {
    s = s * 1103515245u + 12345u;
    uint64_t region = nb * SP + (s >> 8) % SP;
    uint64_t off = region * gran + ((s >> 20) % (gran / 4096)) * 4096;
    CHECK(mark_wait(c, off, 4096) == 0);
    model[region] = true;
  }
  printf("  200 writes in one neighbourhood: %llu commit(s)\n",
         (unsigned long long)cbt_commit_count(c));
  CHECK(cbt_commit_count(c) == 1);
  CHECK(map_equals(c, model));                 /* the live map stays exact */
  for (uint64_t r = nb * SP; r < nb * SP + SP; r++)
    coarse[r] = true;

  /* Another neighbourhood (in the other page): one more; a write across two
   * new neighbourhoods: one more (both in one commit). */
  const uint64_t far = PB + 5 * SP + 3;
  CHECK(mark_wait(c, far * gran + 100, 1) == 0);
  model[far] = true;
  CHECK(cbt_commit_count(c) == 2);
  const uint64_t across = 100 * SP - 1;         /* last region of 99, first of 100 */
  CHECK(mark_wait(c, across * gran, 2 * gran) == 0);
  model[across] = model[across + 1] = true;
  CHECK(cbt_commit_count(c) == 3);
  for (uint64_t r = 0; r < nbits; r++)
    if (r / SP == far / SP || r / SP == 99 || r / SP == 100)
      coarse[r] = true;
  /* Durable neighbourhoods: no ticket, no commit. */
  CHECK(cbt_mark(c, (nb * SP + SP - 1) * gran, 1) == 0);
  model[nb * SP + SP - 1] = true;
  CHECK(cbt_mark(c, (far / SP * SP) * gran, 1) == 0);
  model[far / SP * SP] = true;
  CHECK(map_equals(c, model));
  CHECK(cbt_commit_count(c) == 3);

  /* The file (as a kill -9 would leave it) holds the whole neighbourhoods. */
  struct cbt *r = open_map(path, size, gran, 0);
  printf("  as a restart sees it: state \"%s\", %llu dirty\n", cbt_state(r),
         (unsigned long long)cbt_dirty_count(r));
  CHECK(strcmp(cbt_state(r), "recovered: unclean shutdown; regions marked at 2 MiB precision") == 0);
  CHECK(map_equals(r, coarse));
  cbt_close(r);

  /* A sync writes the exact map and forgets the neighbourhoods: a new
   * region in one of them needs a commit again. */
  CHECK(cbt_sync(c) == 0);
  r = open_map(path, size, gran, 0);
  CHECK(strcmp(cbt_state(r), "ok") == 0);
  CHECK(map_equals(r, model));
  cbt_close(r);
  uint64_t fresh = nb * SP;                     /* a region of nbhd 37 not written yet */
  while (model[fresh])
    fresh++;
  cbt_write_begin(c);
  uint64_t t = cbt_mark(c, fresh * gran, 1);
  cbt_write_end(c);
  CHECK(t > 0);
  CHECK(cbt_wait(c, t) == 0);
  model[fresh] = true;
  CHECK(cbt_commit_count(c) == 4);
  r = open_map(path, size, gran, 0);             /* the flag is set again */
  CHECK(starts_with(cbt_state(r), "recovered: unclean shutdown"));
  CHECK(cbt_dirty_count(r) >= SP);
  cbt_close(r);

  /* A clean close: exact again. */
  cbt_close(c);
  c = open_map(path, size, gran, 0);
  CHECK(strcmp(cbt_state(c), "ok") == 0);
  CHECK(map_equals(c, model));
  cbt_close(c);
  free(model);
  free(coarse);
}

static _Atomic bool bench_stop;

static void *bench_marker(void *arg)
{
  struct cbt *c = arg;
  uint64_t n = 0;
  while (!atomic_load_explicit(&bench_stop, memory_order_relaxed)) {
    cbt_write_begin(c);
    uint64_t t = cbt_mark(c, (n % 1000) * 4096, 4096);
    cbt_write_end(c);
    if (t)
      cbt_wait(c, t);
    n++;
  }
  return (void *)(uintptr_t)n;
}

static void test_fast_path_speed(void)
{
  printf("fast path: marks of durable regions from 2 threads (information, no bound)\n");
  char path[300];
  path_of(path, sizeof path, "speed.cbt");
  struct cbt *c = open_map(path, 1000 * 4096, 64 * 1024, CBT_OPEN_NEW);
  CHECK(mark_wait(c, 0, 1000 * 4096) == 0);
  atomic_store(&bench_stop, false);
  pthread_t th[2];
  for (int i = 0; i < 2; i++)
    pthread_create(&th[i], NULL, bench_marker, c);
  usleep(300000);
  atomic_store(&bench_stop, true);
  uint64_t total = 0;
  for (int i = 0; i < 2; i++) {
    void *n;
    pthread_join(th[i], &n);
    total += (uint64_t)(uintptr_t)n;
  }
  printf("  %.1f M begin+mark+end per second\n", (double)total / 0.3 / 1e6);
  CHECK(total > 0);
  cbt_close(c);
}

#define BATCH_THREADS 8
#define BATCH_PER_THREAD 400

static void *batch_writer(void *arg)
{
  struct sw_arg *a = arg;
  for (uint64_t j = 0; j < BATCH_PER_THREAD; j++)
    CHECK(mark_wait(a->c, (j * BATCH_THREADS + (uint64_t)a->id) * 40 * G, 1) == 0);
  return NULL;
}

static void test_commit_batching(void)
{
  printf("new marks from %d threads share commits (information: time taken)\n", BATCH_THREADS);
  char path[300];
  path_of(path, sizeof path, "batch.cbt");
  const uint64_t nbits = BATCH_THREADS * BATCH_PER_THREAD * 40;
  struct cbt *c = open_map(path, nbits * G, G, CBT_OPEN_NEW);
  uint64_t t0 = now_ns();
  pthread_t th[BATCH_THREADS];
  struct sw_arg a[BATCH_THREADS];
  for (int i = 0; i < BATCH_THREADS; i++) {
    a[i] = (struct sw_arg){ c, i };
    pthread_create(&th[i], NULL, batch_writer, &a[i]);
  }
  for (int i = 0; i < BATCH_THREADS; i++)
    pthread_join(th[i], NULL);
  double secs = (double)(now_ns() - t0) / 1e9;
  printf("  %d durable new marks in %.2f s\n", BATCH_THREADS * BATCH_PER_THREAD, secs);
  CHECK(cbt_dirty_count(c) == BATCH_THREADS * BATCH_PER_THREAD);
  cbt_close(c);
}

int main(void)
{
  snprintf(dir, sizeof dir, "%s/ferry-test-cbt.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 1;
  }
  test_persist_exact();
  test_missing_map();
  test_persist_coarse();
  test_crash();
  test_corrupt_header();
  test_corrupt_page();
  test_mismatch();
  test_invalidate();
  test_swap_concurrent();
  test_swap_durable();
  test_swap_fast();
  test_swap_keep();
  test_fail_mode();
  test_fast_path_speed();
  test_commit_batching();

  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0)
    fprintf(stderr, "could not remove %s\n", dir);
  if (failures) {
    fprintf(stderr, "test_cbt: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_cbt: all checks passed\n");
  return 0;
}
