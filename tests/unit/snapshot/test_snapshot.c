/* test_snapshot: the migrate-time restore point (src/disk/snapshot.c).
 *   - an image with known random content (holes, all-zero regions, a short
 *     last region) on a file backend: several threads overwrite random ranges
 *     (pwrite, zero, trim), each "preserve then change"; exactly the regions
 *     touched are saved; restore gives the original byte for byte, and again
 *     after more writes (the point stays the same point)
 *   - reopen after close keeps the point (bits, created time); a mismatched
 *     size or granularity is refused
 *   - regions that were holes or zeros are saved as holes (no data) and
 *     restore as zeros
 *   - many threads preserving the same regions at once: each region is read
 *     and saved once, and none returns before it is saved
 *   - nowait: -EAGAIN while anything touched is unsaved, 0 once saved
 *   - fail mode: a file write error fails the preserve (-EIO) and every later
 *     copy; saved regions still pass; the point reopens and restores
 *   - kill -9: a forked child preserving and writing from several threads is
 *     SIGKILLed at a random moment; the parent reopens and restores: the image
 *     equals the original.  Also kill -9 in the middle of a restore, then
 *     restore again.
 *   - corrupt files: a flipped byte in the header or a bit page, a truncated
 *     map, a bad magic, a missing or resized data file: refused with a
 *     message, never trusted
 *   - a map of three bit pages (runs across a page boundary, a flipped byte
 *     in page 3); regions larger than the copy chunk, the whole disk
 *     preserved at once
 *   - delete removes both files; absent is fine
 * Seed: SNAPSHOT_SEED=<n> repeats a run. */
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
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "disk/backend.h"
#include "disk/snapshot.h"

#include "check.h"

#define G      16384ull                       /* granularity of most tests */
#define NREG   97ull                          /* regions; the last one short */
#define TAIL   5000ull                        /* bytes of the short last region */
#define SIZE   ((NREG - 1) * G + TAIL)
#define NTHREADS 4

static char dir[256];
static unsigned char *orig;                  /* the image's migrate-time content */
static uint64_t seed0;

static uint64_t rnd(uint64_t *st)
{
  uint64_t x = *st;                          /* xorshift64* */
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *st = x;
  return x * UINT64_C(2685821657736338717);
}

static void fill_random(unsigned char *p, size_t n, uint64_t *st)
{
  for (size_t i = 0; i < n; i++)
    p[i] = (unsigned char)(rnd(st) >> 56);
}

static void path_of(char *buf, size_t len, const char *name)
{
  snprintf(buf, len, "%s/%s", dir, name);
}

/* The kind of region i in the original image. */
enum kind { K_DATA, K_HOLE, K_ZERO, K_HALF };
static enum kind kind_of(uint64_t i)
{
  if (i == NREG - 1)
    return K_DATA;                           /* the short last region */
  if (i % 7 == 3)
    return K_HOLE;
  if (i % 11 == 5)
    return K_ZERO;
  if (i % 13 == 8)
    return K_HALF;                           /* first half zero, second half data */
  return K_DATA;
}

/* Writes the original image (sparse: holes are never written) and fills orig. */
static void make_image(const char *path)
{
  uint64_t st = seed0 ^ 0x1234;
  memset(orig, 0, SIZE);
  for (uint64_t i = 0; i < NREG; i++) {
    uint64_t off = i * G, len = MIN(G, SIZE - off);
    if (kind_of(i) == K_DATA)
      fill_random(orig + off, len, &st);
    else if (kind_of(i) == K_HALF)
      fill_random(orig + off + len / 2, len - len / 2, &st);
  }
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  CHECK(fd >= 0);
  CHECK(ftruncate(fd, (off_t)SIZE) == 0);
  for (uint64_t i = 0; i < NREG; i++) {
    uint64_t off = i * G, len = MIN(G, SIZE - off);
    if (kind_of(i) != K_HOLE)
      CHECK(pwrite_full(fd, orig + off, len, (off_t)off) == 0);
  }
  CHECK(fsync(fd) == 0);
  close(fd);
}

/* Does the image equal orig?  Prints the first difference unless quiet. */
static bool image_equals_q(const char *path, bool quiet)
{
  unsigned char *buf = malloc(SIZE);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  struct stat st;
  bool ok = buf && fd >= 0 && fstat(fd, &st) == 0 && (uint64_t)st.st_size == SIZE &&
            pread_full(fd, buf, SIZE, 0) == 0;
  if (ok && memcmp(buf, orig, SIZE) != 0) {
    for (uint64_t i = 0; !quiet && i < SIZE; i++) {
      if (buf[i] != orig[i]) {
        fprintf(stderr, "  image differs at byte %llu (region %llu): %02x, expected %02x\n",
                (unsigned long long)i, (unsigned long long)(i / G), buf[i], orig[i]);
        break;
      }
    }
    ok = false;
  }
  if (fd >= 0)
    close(fd);
  free(buf);
  return ok;
}

static bool image_equals(const char *path) { return image_equals_q(path, false); }
static bool image_changed(const char *path) { return !image_equals_q(path, true); }

static struct backend *open_be(const char *path)
{
  char err[256] = "";
  struct backend *be = backend_file_open(path, "test", err, sizeof err);
  if (!be)
    fprintf(stderr, "backend_file_open: %s\n", err);
  CHECK(be != NULL);
  return be;
}

static struct snapshot *open_snap(const char *path, uint64_t size, uint64_t gran, bool create)
{
  char err[512] = "";
  struct snapshot *s = snapshot_open(path, "test", size, gran, create, err, sizeof err);
  if (!s)
    fprintf(stderr, "snapshot_open(%s): %s\n", path, err);
  CHECK(s != NULL);
  return s;
}

/* Opening must be refused with a message containing want. */
static void expect_refused(const char *path, uint64_t size, uint64_t gran, const char *want)
{
  char err[512] = "";
  struct snapshot *s = snapshot_open(path, "test", size, gran, false, err, sizeof err);
  CHECK(s == NULL);
  if (s)
    snapshot_close(s);
  if (!strstr(err, want))
    fprintf(stderr, "  refusal message \"%s\" lacks \"%s\"\n", err, want);
  CHECK(strstr(err, want) != NULL);
}

/* ---- writers: preserve, then change ---- */

struct writer {
  struct snapshot *s;
  struct backend *be;
  uint64_t seed;
  int iterations;                            /* < 0: forever (crash child) */
  _Atomic bool *touched;                     /* [NREG] regions changed, or NULL */
  _Atomic int *ops;                          /* changes done, or NULL */
};

static void *writer_main(void *arg)
{
  struct writer *w = arg;
  uint64_t st = w->seed | 1;
  unsigned char *buf = malloc(3 * G);
  for (int it = 0; w->iterations < 0 || it < w->iterations; it++) {
    uint64_t off = rnd(&st) % SIZE;
    uint64_t len = 1 + rnd(&st) % (3 * G);
    len = MIN(len, SIZE - off);
    unsigned op = (unsigned)(rnd(&st) % 10);
    int r = snapshot_preserve(w->s, w->be, off, len, rnd(&st) & 1);
    if (r == -EAGAIN)
      r = snapshot_preserve(w->s, w->be, off, len, false);
    CHECK(r == 0);
    if (r != 0)
      break;
    if (op < 8) {
      fill_random(buf, len, &st);
      r = w->be->ops->pwrite(w->be, buf, (uint32_t)len, off, false);
    } else if (op == 8) {
      r = w->be->ops->zero(w->be, (uint32_t)len, off, true);
    } else {
      r = w->be->ops->trim(w->be, (uint32_t)len, off);
    }
    CHECK(r == 0);
    if (w->touched)
      for (uint64_t i = off / G; i <= (off + len - 1) / G; i++)
        atomic_store(&w->touched[i], true);
    if (w->ops)
      atomic_fetch_add(w->ops, 1);
  }
  free(buf);
  return NULL;
}

static void run_writers(struct snapshot *s, struct backend *be, int iterations,
                        _Atomic bool *touched, uint64_t seed)
{
  pthread_t t[NTHREADS];
  struct writer w[NTHREADS];
  for (int i = 0; i < NTHREADS; i++) {
    w[i] = (struct writer){ s, be, seed * 31 + (uint64_t)i * 7919 + 1, iterations, touched, NULL };
    CHECK(pthread_create(&t[i], NULL, writer_main, &w[i]) == 0);
  }
  for (int i = 0; i < NTHREADS; i++)
    pthread_join(t[i], NULL);
}

/* ---- tests ---- */

static void test_restore_and_reopen(void)
{
  printf("restore after concurrent writes; reopen\n");
  char img[300], snap[300];
  path_of(img, sizeof img, "img1");
  path_of(snap, sizeof snap, "snap1");
  make_image(img);
  struct backend *be = open_be(img);
  uint64_t t0 = realtime_ns();
  struct snapshot *s = open_snap(snap, SIZE, G, true);
  uint64_t t1 = realtime_ns();
  CHECK(snapshot_created_ns(s) >= t0 && snapshot_created_ns(s) <= t1);
  CHECK(snapshot_nregions(s) == NREG);
  CHECK(snapshot_granularity(s) == G);
  CHECK(snapshot_saved_regions(s) == 0);
  CHECK(snapshot_saved_bytes(s) == 0);

  _Atomic bool touched[NREG];
  for (uint64_t i = 0; i < NREG; i++)
    atomic_init(&touched[i], false);
  run_writers(s, be, 40, touched, seed0);
  /* The last region (short) is always touched, to cover the tail. */
  CHECK(snapshot_preserve(s, be, SIZE - 10, 10, false) == 0);
  CHECK(be->ops->pwrite(be, "0123456789", 10, SIZE - 10, false) == 0);
  atomic_store(&touched[NREG - 1], true);
  CHECK(snapshot_preserve(s, be, SIZE, 1, false) == -EINVAL);   /* past the end */
  CHECK(snapshot_preserve(s, be, SIZE - 1, 2, false) == -EINVAL);
  CHECK(snapshot_preserve(s, be, 0, 0, false) == 0);

  uint64_t ntouched = 0;
  bool exact = true;
  for (uint64_t i = 0; i < NREG; i++) {
    ntouched += atomic_load(&touched[i]);
    exact &= snapshot_region_saved(s, i) == atomic_load(&touched[i]);
  }
  CHECK(exact);                              /* saved: exactly the regions changed */
  CHECK(snapshot_saved_regions(s) == ntouched);
  CHECK(snapshot_saved_bytes(s) <= ntouched * G);
  CHECK(snapshot_saved_bytes(s) > 0);
  printf("  %llu of %llu regions saved, %llu bytes in the data file, %llu commits\n",
         (unsigned long long)ntouched, (unsigned long long)NREG,
         (unsigned long long)snapshot_saved_bytes(s),
         (unsigned long long)snapshot_commit_count(s));
  CHECK(snapshot_commit_count(s) <= ntouched);  /* no more than one commit per region */
  CHECK(image_changed(img));                 /* the writes did change it */

  CHECK(snapshot_restore(s, be) == 0);
  CHECK(image_equals(img));
  /* The point stays the same point: more writes, restore again. */
  run_writers(s, be, 20, touched, seed0 + 1);
  CHECK(snapshot_restore(s, be) == 0);
  CHECK(image_equals(img));
  CHECK(snapshot_restore(s, be) == 0);       /* idempotent */
  CHECK(image_equals(img));

  /* Reopen keeps the point. */
  uint64_t created = snapshot_created_ns(s), nsaved = snapshot_saved_regions(s);
  bool saved[NREG];
  for (uint64_t i = 0; i < NREG; i++)
    saved[i] = snapshot_region_saved(s, i);
  run_writers(s, be, 20, NULL, seed0 + 2);
  snapshot_close(s);
  s = open_snap(snap, SIZE, 0, false);       /* 0: the file's granularity */
  if (s) {
    CHECK(snapshot_granularity(s) == G);
    CHECK(snapshot_created_ns(s) == created);
    CHECK(snapshot_saved_regions(s) >= nsaved);
    bool kept = true;
    for (uint64_t i = 0; i < NREG; i++)
      kept &= !saved[i] || snapshot_region_saved(s, i);
    CHECK(kept);
    CHECK(snapshot_restore(s, be) == 0);
    CHECK(image_equals(img));
    snapshot_close(s);
  }
  expect_refused(snap, SIZE + 4096, G, "disk of");
  expect_refused(snap, SIZE, 2 * G, "granularity");
  be->ops->close(be);
}

static void test_holes(void)
{
  printf("holes and zero regions saved as holes, restored as zeros\n");
  char img[300], snap[300];
  path_of(img, sizeof img, "img2");
  path_of(snap, sizeof snap, "snap2");
  make_image(img);
  struct backend *be = open_be(img);
  struct snapshot *s = open_snap(snap, SIZE, G, true);
  unsigned char *buf = malloc(G);
  uint64_t st = seed0 ^ 77, n = 0;
  for (uint64_t i = 0; i < NREG; i++) {
    if (kind_of(i) != K_HOLE && kind_of(i) != K_ZERO)
      continue;
    CHECK(snapshot_preserve(s, be, i * G + 100, G - 200, false) == 0);
    fill_random(buf, G, &st);
    CHECK(be->ops->pwrite(be, buf, (uint32_t)G, i * G, false) == 0);
    n++;
  }
  CHECK(n > 5);
  CHECK(snapshot_saved_regions(s) == n);
  CHECK(snapshot_saved_bytes(s) == 0);       /* nothing but holes */
  /* A half-zero region: only its data half takes space. */
  uint64_t half = 8;                         /* kind_of(8) == K_HALF */
  CHECK(kind_of(half) == K_HALF);
  CHECK(snapshot_preserve(s, be, half * G, 1, false) == 0);
  CHECK(be->ops->pwrite(be, buf, (uint32_t)G, half * G, false) == 0);
  CHECK(snapshot_saved_bytes(s) > 0 && snapshot_saved_bytes(s) <= G);
  CHECK(snapshot_restore(s, be) == 0);
  CHECK(image_equals(img));
  free(buf);
  snapshot_close(s);
  be->ops->close(be);
}

/* A backend that counts the bytes read and reads slowly, to widen races. */
struct slow_be {
  struct backend b;
  struct backend *inner;
  _Atomic uint64_t bytes_read;
};

static int slow_pread(struct backend *b, void *buf, uint32_t len, uint64_t off, bool nowait)
{
  struct slow_be *sb = (struct slow_be *)b;
  atomic_fetch_add(&sb->bytes_read, len);
  usleep(20000);
  return sb->inner->ops->pread(sb->inner, buf, len, off, nowait);
}

static const struct backend_ops slow_ops = { .name = "slow", .pread = slow_pread };

struct same_arg {
  struct snapshot *s;
  struct backend *be;
  pthread_barrier_t *bar;
  int idx;
  int result;
  bool saved_after;
};

static void *same_main(void *arg)
{
  struct same_arg *a = arg;
  pthread_barrier_wait(a->bar);
  /* Half preserve region 2, half regions 2 and 3. */
  uint64_t off = 2 * G + (uint64_t)a->idx * 10, len = a->idx & 1 ? G : 100;
  a->result = snapshot_preserve(a->s, a->be, off, len, false);
  a->saved_after = snapshot_region_saved(a->s, 2) &&
                   (len == 100 || snapshot_region_saved(a->s, 3));
  return NULL;
}

static void test_same_region(void)
{
  printf("concurrent preserves of the same regions copy once\n");
  char img[300], snap[300];
  path_of(img, sizeof img, "img3");
  path_of(snap, sizeof snap, "snap3");
  make_image(img);
  struct backend *inner = open_be(img);
  struct slow_be sb = { .b = { .ops = &slow_ops, .fd = -1, .size = SIZE }, .inner = inner };
  atomic_init(&sb.bytes_read, 0);
  struct snapshot *s = open_snap(snap, SIZE, G, true);
  enum { N = 16 };
  pthread_t t[N];
  struct same_arg a[N];
  pthread_barrier_t bar;
  pthread_barrier_init(&bar, NULL, N);
  for (int i = 0; i < N; i++) {
    a[i] = (struct same_arg){ s, &sb.b, &bar, i, -1, false };
    CHECK(pthread_create(&t[i], NULL, same_main, &a[i]) == 0);
  }
  bool ok = true;
  for (int i = 0; i < N; i++) {
    pthread_join(t[i], NULL);
    ok &= a[i].result == 0 && a[i].saved_after;
  }
  CHECK(ok);
  pthread_barrier_destroy(&bar);
  CHECK(snapshot_saved_regions(s) == 2);
  CHECK(atomic_load(&sb.bytes_read) == 2 * G);   /* each region read once */
  printf("  %llu bytes read for 2 regions, %llu commits\n",
         (unsigned long long)atomic_load(&sb.bytes_read),
         (unsigned long long)snapshot_commit_count(s));
  CHECK(snapshot_commit_count(s) <= 2);
  snapshot_close(s);
  inner->ops->close(inner);
}

static void test_nowait(void)
{
  printf("nowait\n");
  char img[300], snap[300];
  path_of(img, sizeof img, "img4");
  path_of(snap, sizeof snap, "snap4");
  make_image(img);
  struct backend *be = open_be(img);
  struct snapshot *s = open_snap(snap, SIZE, G, true);
  CHECK(snapshot_preserve(s, be, 5 * G, 10, true) == -EAGAIN);
  CHECK(snapshot_saved_regions(s) == 0);
  CHECK(snapshot_commit_count(s) == 0);
  CHECK(snapshot_preserve(s, be, 5 * G, 10, false) == 0);
  CHECK(snapshot_saved_regions(s) == 1);
  CHECK(snapshot_preserve(s, be, 5 * G, G, true) == 0);
  CHECK(snapshot_preserve(s, be, 5 * G + G - 1, 2, true) == -EAGAIN);   /* region 6 not saved */
  CHECK(!snapshot_region_saved(s, 6));
  snapshot_close(s);
  be->ops->close(be);
}

static void test_fail_mode(void)
{
  printf("fail mode\n");
  char img[300], snap[300];
  path_of(img, sizeof img, "img5");
  path_of(snap, sizeof snap, "snap5");
  make_image(img);
  struct backend *be = open_be(img);
  struct snapshot *s = open_snap(snap, SIZE, G, true);
  CHECK(snapshot_preserve(s, be, 0, G, false) == 0);              /* region 0: data */
  snapshot_inject_write_error(s, EIO);
  CHECK(kind_of(3) == K_HOLE && kind_of(1) == K_DATA);
  CHECK(snapshot_preserve(s, be, 3 * G, G, false) == -EIO);       /* hole: map write fails */
  CHECK(snapshot_failed(s));
  snapshot_inject_write_error(s, 0);
  CHECK(snapshot_preserve(s, be, 1 * G, G, false) == -EIO);       /* fail mode stays */
  CHECK(snapshot_preserve(s, be, 10, 100, false) == 0);           /* saved: still fine */
  CHECK(snapshot_saved_regions(s) == 1);
  CHECK(be->ops->pwrite(be, "xyz", 3, 10, false) == 0);
  snapshot_close(s);
  s = open_snap(snap, SIZE, G, false);
  if (s) {
    CHECK(!snapshot_failed(s));
    CHECK(snapshot_saved_regions(s) == 1 && snapshot_region_saved(s, 0));
    CHECK(snapshot_preserve(s, be, 3 * G, G, false) == 0);
    CHECK(snapshot_restore(s, be) == 0);
    CHECK(image_equals(img));
    snapshot_close(s);
  }
  be->ops->close(be);
}

static void flip_byte(const char *path, off_t off);

/* ---- a map of several bit pages ---- */

#define MP_G    4096ull
#define MP_NREG (2 * (uint64_t)SNAPSHOT_PAGE_BITS + 600)   /* three bit pages */
#define MP_SIZE ((MP_NREG - 1) * MP_G + 777)
#define MP_CHUNK (1024 * 1024)

/* The data of the sparse multi-page image: windows around the page
 * boundaries and at the end; the rest is holes. */
struct window { uint64_t off, len; unsigned char *data; };
static struct window mp_win[3];

static void mp_make_image(const char *path)
{
  const uint64_t first[3] = { SNAPSHOT_PAGE_BITS - 4, 2 * SNAPSHOT_PAGE_BITS - 4, MP_NREG - 3 };
  const uint64_t nreg[3] = { 10, 8, 3 };
  uint64_t st = seed0 ^ 0xabc;
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  CHECK(fd >= 0);
  CHECK(ftruncate(fd, (off_t)MP_SIZE) == 0);
  for (int i = 0; i < 3; i++) {
    mp_win[i].off = first[i] * MP_G;
    mp_win[i].len = MIN(nreg[i] * MP_G, MP_SIZE - mp_win[i].off);
    mp_win[i].data = malloc(mp_win[i].len);
    fill_random(mp_win[i].data, mp_win[i].len, &st);
    CHECK(pwrite_full(fd, mp_win[i].data, mp_win[i].len, (off_t)mp_win[i].off) == 0);
  }
  close(fd);
}

/* Does the image hold the windows and zeros elsewhere? */
static bool mp_image_ok_q(const char *path, bool quiet)
{
  unsigned char *buf = malloc(MP_CHUNK), *want = malloc(MP_CHUNK);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  bool ok = buf && want && fd >= 0;
  for (uint64_t off = 0; ok && off < MP_SIZE; off += MP_CHUNK) {
    uint64_t n = MIN((uint64_t)MP_CHUNK, MP_SIZE - off);
    memset(want, 0, n);
    for (int i = 0; i < 3; i++) {
      uint64_t lo = MAX(off, mp_win[i].off), hi = MIN(off + n, mp_win[i].off + mp_win[i].len);
      if (lo < hi)
        memcpy(want + (lo - off), mp_win[i].data + (lo - mp_win[i].off), hi - lo);
    }
    if (pread_full(fd, buf, n, (off_t)off) < 0 || memcmp(buf, want, n) != 0) {
      if (!quiet)
        fprintf(stderr, "  multi-page image differs in [%llu, +%llu)\n", (unsigned long long)off,
              (unsigned long long)n);
      ok = false;
    }
  }
  if (fd >= 0)
    close(fd);
  free(buf);
  free(want);
  return ok;
}

static bool mp_image_ok(const char *path) { return mp_image_ok_q(path, false); }

struct mp_writer { struct snapshot *s; struct backend *be; uint64_t seed; };

static void *mp_writer_main(void *arg)
{
  struct mp_writer *w = arg;
  uint64_t st = w->seed | 1;
  unsigned char *buf = malloc(3 * MP_G);
  for (int it = 0; it < 60; it++) {
    uint64_t off;
    if (it % 4 == 3) {
      off = rnd(&st) % MP_SIZE;                        /* anywhere: mostly holes */
    } else {
      const struct window *win = &mp_win[rnd(&st) % 3];
      off = win->off + rnd(&st) % win->len;
    }
    uint64_t len = 1 + rnd(&st) % (3 * MP_G);   /* (MIN evaluates twice) */
    len = MIN(len, MP_SIZE - off);
    int r = snapshot_preserve(w->s, w->be, off, len, false);
    if (r)
      fprintf(stderr, "  preserve(%llu, %llu): %s\n", (unsigned long long)off,
              (unsigned long long)len, strerror(-r));
    CHECK(r == 0);
    if (r)
      break;
    fill_random(buf, len, &st);
    CHECK(w->be->ops->pwrite(w->be, buf, (uint32_t)len, off, false) == 0);
  }
  free(buf);
  return NULL;
}

static void test_multipage(void)
{
  printf("a map of three bit pages; granularity above the copy chunk\n");
  char img[300], snap[300], snap2[300];
  path_of(img, sizeof img, "img9");
  path_of(snap, sizeof snap, "snap9");
  path_of(snap2, sizeof snap2, "snap9b");
  mp_make_image(img);
  struct backend *be = open_be(img);
  struct snapshot *s = open_snap(snap, MP_SIZE, MP_G, true);
  /* A run across the first page boundary (two pages in one commit). */
  uint64_t b = (uint64_t)SNAPSHOT_PAGE_BITS * MP_G;
  CHECK(snapshot_preserve(s, be, b - 3 * 1024 * 1024, 6 * 1024 * 1024, false) == 0);
  CHECK(snapshot_region_saved(s, SNAPSHOT_PAGE_BITS - 1) && snapshot_region_saved(s, SNAPSHOT_PAGE_BITS));
  pthread_t t[NTHREADS];
  struct mp_writer w[NTHREADS];
  for (int i = 0; i < NTHREADS; i++) {
    w[i] = (struct mp_writer){ s, be, seed0 * 17 + (uint64_t)i };
    CHECK(pthread_create(&t[i], NULL, mp_writer_main, &w[i]) == 0);
  }
  for (int i = 0; i < NTHREADS; i++)
    pthread_join(t[i], NULL);
  CHECK(snapshot_preserve(s, be, MP_SIZE - 3, 3, false) == 0);
  CHECK(be->ops->pwrite(be, "end", 3, MP_SIZE - 3, false) == 0);
  CHECK(snapshot_region_saved(s, MP_NREG - 1));
  CHECK(!mp_image_ok_q(img, true));          /* the writes did change it */
  uint64_t nsaved = snapshot_saved_regions(s);
  snapshot_close(s);

  flip_byte(snap, 3 * 4096 + 100);           /* bit page 3 */
  expect_refused(snap, MP_SIZE, MP_G, "bit page 3");
  flip_byte(snap, 3 * 4096 + 100);
  s = open_snap(snap, MP_SIZE, MP_G, false);
  if (!s)
    return;
  CHECK(snapshot_saved_regions(s) == nsaved);
  CHECK(snapshot_restore(s, be) == 0);
  CHECK(mp_image_ok(img));
  snapshot_close(s);

  /* 4 MiB regions: copied in chunks (data and holes within one region); the
   * whole disk preserved at once, then zeroed. */
  const uint64_t g2 = 4 * 1024 * 1024;
  s = open_snap(snap2, MP_SIZE, g2, true);
  CHECK(snapshot_preserve(s, be, 0, MP_SIZE, false) == 0);
  CHECK(snapshot_saved_regions(s) == DIV_ROUND_UP(MP_SIZE, g2));
  CHECK(snapshot_saved_bytes(s) <= 8 * 1024 * 1024);   /* the windows' chunks only */
  for (uint64_t off = 0; off < MP_SIZE; off += 64 * 1024 * 1024)
    CHECK(be->ops->zero(be, (uint32_t)MIN(64ull * 1024 * 1024, MP_SIZE - off), off, true) == 0);
  CHECK(be->ops->pwrite(be, "zz", 2, 12345678, false) == 0);
  CHECK(snapshot_restore(s, be) == 0);
  CHECK(mp_image_ok(img));
  snapshot_close(s);
  for (int i = 0; i < 3; i++)
    free(mp_win[i].data);
  be->ops->close(be);
}

/* ---- kill -9 ---- */

/* In the child: preserve + change from several threads until killed; one
 * byte on ready_fd once some changes are done. */
static void crash_child_writes(const char *img, const char *snap, int ready_fd, uint64_t seed)
{
  struct backend *be = open_be(img);
  struct snapshot *s = open_snap(snap, SIZE, G, false);
  if (!be || !s)
    _exit(2);
  _Atomic int ops = 0;
  pthread_t t[NTHREADS];
  struct writer w[NTHREADS];
  for (int i = 0; i < NTHREADS; i++) {
    w[i] = (struct writer){ s, be, seed * 131 + (uint64_t)i, -1, NULL, &ops };
    if (pthread_create(&t[i], NULL, writer_main, &w[i]) != 0)
      _exit(2);
  }
  while (atomic_load(&ops) < 8)
    usleep(200);
  if (write(ready_fd, "r", 1) != 1)
    _exit(2);
  for (;;)
    pause();                                 /* SIGKILL comes */
}

static void crash_child_restore(const char *img, const char *snap, int ready_fd)
{
  struct backend *be = open_be(img);
  struct snapshot *s = open_snap(snap, SIZE, G, false);
  if (!be || !s || write(ready_fd, "r", 1) != 1)
    _exit(2);
  snapshot_restore(s, be);
  for (;;)
    pause();
}

/* Runs one child (restore: the restore child), SIGKILLs it a random while
 * after it is ready.  Returns true if it died of the SIGKILL. */
static bool crash_round(const char *img, const char *snap, bool restore, uint64_t *st)
{
  int p[2];
  CHECK(pipe(p) == 0);
  fflush(NULL);
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    close(p[0]);
    if (restore)
      crash_child_restore(img, snap, p[1]);
    else
      crash_child_writes(img, snap, p[1], rnd(st));
    _exit(3);
  }
  close(p[1]);
  char c;
  ssize_t n = read(p[0], &c, 1);
  close(p[0]);
  CHECK(n == 1);
  usleep((useconds_t)(rnd(st) % (restore ? 3000 : 15000)));
  kill(pid, SIGKILL);
  int status = 0;
  CHECK(waitpid(pid, &status, 0) == pid);
  bool killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
  CHECK(killed);
  return killed;
}

static void test_crash(void)
{
  printf("kill -9 during preserve + write, and during restore\n");
  char img[300], snap[300];
  path_of(img, sizeof img, "img6");
  path_of(snap, sizeof snap, "snap6");
  make_image(img);
  uint64_t st = seed0 ^ 0xc0ffee;
  for (int round = 0; round < 10; round++) {
    /* A fresh point each round, of the original content: many first copies. */
    struct snapshot *s = open_snap(snap, SIZE, G, true);
    snapshot_close(s);
    crash_round(img, snap, false, &st);
    CHECK(image_changed(img));               /* the child changed it */
    s = open_snap(snap, SIZE, G, false);     /* never refused after kill -9 */
    struct backend *be = open_be(img);
    if (!s || !be)
      return;
    uint64_t nsaved = snapshot_saved_regions(s);
    if (round % 2) {
      /* Kill a restore half way too; the next restore repairs it. */
      snapshot_close(s);
      crash_round(img, snap, true, &st);
      s = open_snap(snap, SIZE, G, false);
      if (!s)
        return;
    }
    CHECK(snapshot_restore(s, be) == 0);
    bool eq = image_equals(img);
    CHECK(eq);
    printf("  round %d: %llu regions saved when killed%s; restored %s\n", round,
           (unsigned long long)nsaved, round % 2 ? ", restore killed too" : "",
           eq ? "exactly" : "WRONG");
    snapshot_close(s);
    be->ops->close(be);
  }
}

/* ---- corrupt files ---- */

static void flip_byte(const char *path, off_t off)
{
  int fd = open(path, O_RDWR | O_CLOEXEC);
  CHECK(fd >= 0);
  unsigned char c = 0;
  CHECK(pread(fd, &c, 1, off) == 1);
  c ^= 0x20;
  CHECK(pwrite(fd, &c, 1, off) == 1);
  close(fd);
}

static void test_corrupt(void)
{
  printf("corrupt or missing files are refused\n");
  char img[300], snap[300], data[320], moved[320];
  path_of(img, sizeof img, "img7");
  path_of(snap, sizeof snap, "snap7");
  snprintf(data, sizeof data, "%s.data", snap);
  snprintf(moved, sizeof moved, "%s.moved", snap);
  make_image(img);
  struct backend *be = open_be(img);
  struct snapshot *s = open_snap(snap, SIZE, G, true);
  CHECK(snapshot_preserve(s, be, 0, 5 * G, false) == 0);
  snapshot_close(s);

  flip_byte(snap, 20);                       /* granularity */
  expect_refused(snap, SIZE, G, "header fails its checksum");
  flip_byte(snap, 20);
  flip_byte(snap, 1);                        /* magic */
  expect_refused(snap, SIZE, G, "magic");
  flip_byte(snap, 1);
  flip_byte(snap, 4096 + 3);                 /* bit page 1, a word of bits */
  expect_refused(snap, SIZE, G, "bit page 1");
  flip_byte(snap, 4096 + 3);
  flip_byte(snap, 2 * 4096 - 2);             /* bit page 1, its checksum */
  expect_refused(snap, SIZE, G, "bit page 1");
  flip_byte(snap, 2 * 4096 - 2);

  CHECK(truncate(snap, 4096 + 100) == 0);
  expect_refused(snap, SIZE, G, "truncated");
  s = open_snap(snap, SIZE, G, true);        /* rebuild it */
  CHECK(snapshot_preserve(s, be, 0, 5 * G, false) == 0);
  snapshot_close(s);

  CHECK(rename(data, moved) == 0);
  expect_refused(snap, SIZE, G, "data file");
  CHECK(rename(moved, data) == 0);
  CHECK(truncate(data, (off_t)SIZE - 1) == 0);
  expect_refused(snap, SIZE, G, "data file");
  CHECK(truncate(data, (off_t)SIZE) == 0);

  s = open_snap(snap, SIZE, G, false);       /* all repaired: trusted again */
  if (s) {
    CHECK(snapshot_saved_regions(s) == 5);
    snapshot_close(s);
  }

  char none[300];
  path_of(none, sizeof none, "no-such-snap");
  expect_refused(none, SIZE, G, "no restore point");
  char err[256] = "";
  CHECK(snapshot_open(snap, "test", SIZE, 3000, true, err, sizeof err) == NULL);
  CHECK(strstr(err, "power of two") != NULL);
  be->ops->close(be);
}

static void test_delete(void)
{
  printf("delete\n");
  char snap[300], data[320];
  path_of(snap, sizeof snap, "snap8");
  snprintf(data, sizeof data, "%s.data", snap);
  struct snapshot *s = open_snap(snap, SIZE, G, true);
  snapshot_close(s);
  CHECK(access(snap, F_OK) == 0 && access(data, F_OK) == 0);
  CHECK(snapshot_delete(snap) == 0);
  CHECK(access(snap, F_OK) != 0 && access(data, F_OK) != 0);
  expect_refused(snap, SIZE, G, "no restore point");
  CHECK(snapshot_delete(snap) == 0);         /* absent is fine */
}

int main(void)
{
  const char *env = getenv("SNAPSHOT_SEED");
  seed0 = env ? strtoull(env, NULL, 0) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 20);
  seed0 |= 1;
  printf("test_snapshot: seed %llu (SNAPSHOT_SEED to repeat)\n", (unsigned long long)seed0);
  log_set_level(LOG_WARN);
  snprintf(dir, sizeof dir, "%s/ferry-test-snapshot.XXXXXX",
           getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 1;
  }
  orig = malloc(SIZE);
  if (!orig)
    return 1;
  test_restore_and_reopen();
  test_holes();
  test_same_region();
  test_nowait();
  test_fail_mode();
  test_crash();
  test_corrupt();
  test_multipage();
  test_delete();
  free(orig);

  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0)
    fprintf(stderr, "could not remove %s\n", dir);
  if (failures) {
    fprintf(stderr, "test_snapshot: %d check(s) failed (seed %llu)\n", failures,
            (unsigned long long)seed0);
    return 1;
  }
  printf("test_snapshot: all checks passed\n");
  return 0;
}
