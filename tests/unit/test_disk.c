/* test_disk: the disk service end to end on a sparse temporary image:
 * read/write/zero/trim and their data, allocation extents (holes) and dirty
 * extents, FUA, NOWAIT semantics (no data touched on -EAGAIN), the write
 * limit, heat counts, snapshot/swap, reopen (exact map, "ok"), a new disk vs a
 * missing map, CBT off and back on, heat off, a failing map file, concurrent
 * writers, and bad configurations. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/bitmap.h"
#include "common/util.h"
#include "disk/cbt.h"
#include "disk/disk.h"

#include "check.h"

#define KiB 1024ull
#define MiB (1024 * KiB)
#define SIZE (64 * MiB)
#define GRAN (64 * KiB)
#define NBITS (SIZE / GRAN)

static char dir[256], image[300], map[300];

static struct disk *open_disk(bool cbt, bool heat, bool is_new)
{
  struct disk_config cfg = {
    .name = "t1",
    .image_path = image,
    .cbt_path = map,
    .cbt_granularity = GRAN,
    .cbt_enabled = cbt,
    .heat_enabled = heat,
    .cbt_new = is_new,
  };
  char err[256] = "";
  struct disk *d = disk_open(&cfg, err, sizeof err);
  if (!d)
    fprintf(stderr, "disk_open: %s\n", err);
  CHECK(d != NULL);
  return d;
}

static bool is_filled(const unsigned char *p, size_t n, unsigned char v)
{
  for (size_t i = 0; i < n; i++)
    if (p[i] != v)
      return false;
  return true;
}

static bool read_is(struct disk *d, uint64_t off, uint32_t len, unsigned char v)
{
  unsigned char *buf = malloc(len);
  bool ok = disk_read(d, buf, len, off, 0) == 0 && is_filled(buf, len, v);
  free(buf);
  return ok;
}

static int write_fill(struct disk *d, uint64_t off, uint32_t len, unsigned char v, unsigned flags)
{
  unsigned char *buf = malloc(len);
  memset(buf, v, len);
  int r = disk_write(d, buf, len, off, flags);
  free(buf);
  return r;
}

struct ext {
  uint64_t off, len;
  uint32_t flags;
};

struct ext_list {
  struct ext e[256];
  unsigned n;
  unsigned stop_after;        /* 0 = never */
};

static int collect(void *opaque, uint64_t off, uint64_t len, uint32_t flags)
{
  struct ext_list *l = opaque;
  if (l->n < ARRAY_SIZE(l->e))
    l->e[l->n++] = (struct ext){ off, len, flags };
  return l->stop_after && l->n >= l->stop_after ? 1 : 0;
}

/* Extents must tile [off, off + len) exactly. */
static bool tiles(const struct ext_list *l, uint64_t off, uint64_t len)
{
  uint64_t pos = off;
  for (unsigned i = 0; i < l->n; i++) {
    if (l->e[i].off != pos || l->e[i].len == 0)
      return false;
    pos += l->e[i].len;
  }
  return pos == off + len;
}

/* Flags of the extent holding byte off. */
static int flags_at(const struct ext_list *l, uint64_t off)
{
  for (unsigned i = 0; i < l->n; i++)
    if (off >= l->e[i].off && off < l->e[i].off + l->e[i].len)
      return (int)l->e[i].flags;
  return -1;
}

static void make_image(void)
{
  unlink(image);
  int fd = open(image, O_RDWR | O_CREAT | O_TRUNC, 0644);
  CHECK(fd >= 0 && ftruncate(fd, SIZE) == 0);
  close(fd);
  unlink(map);
}

static void test_io_and_extents(void)
{
  printf("read/write/zero/trim on a sparse image; allocation and dirty extents\n");
  make_image();
  struct disk *d = open_disk(true, true, true);
  CHECK(strcmp(disk_cbt_state(d), "created") == 0);
  CHECK(disk_size(d) == SIZE && !disk_is_block_device(d));
  CHECK(disk_cbt_enabled(d) && disk_cbt_granularity(d) == GRAN);
  CHECK(strcmp(disk_name(d), "t1") == 0 && strcmp(disk_image_path(d), image) == 0);
  CHECK(disk_allocated_bytes(d) == 0);
  CHECK(disk_dirty_bytes(d) == 0);
  CHECK(read_is(d, 0, 128 * KiB, 0));

  CHECK(write_fill(d, 1 * MiB, 4096, 0xab, 0) == 0);
  CHECK(write_fill(d, 5 * MiB + 100, 200000, 0xcd, DISK_IO_FUA) == 0);
  CHECK(read_is(d, 1 * MiB, 4096, 0xab));
  CHECK(read_is(d, 5 * MiB + 100, 200000, 0xcd));
  CHECK(read_is(d, 5 * MiB, 100, 0));
  CHECK(disk_allocated_bytes(d) >= 200000);
  CHECK(disk_flush(d) == 0);
  CHECK(disk_cache(d, 1 * MiB, 0) == 0);

  struct ext_list l = { .n = 0 };
  CHECK(disk_extents_allocation(d, 0, SIZE, collect, &l) == 0);
  CHECK(tiles(&l, 0, SIZE));
  CHECK(flags_at(&l, 0) == (DISK_EXTENT_HOLE | DISK_EXTENT_ZERO));
  CHECK(flags_at(&l, 1 * MiB) == 0);
  CHECK(flags_at(&l, 5 * MiB + 100000) == 0);
  CHECK(flags_at(&l, 30 * MiB) == (DISK_EXTENT_HOLE | DISK_EXTENT_ZERO));
  /* A window that starts inside data and ends inside a hole is cut at both ends. */
  l.n = 0;
  CHECK(disk_extents_allocation(d, 1 * MiB + 10, 8192, collect, &l) == 0);
  CHECK(tiles(&l, 1 * MiB + 10, 8192) && l.e[0].flags == 0 && l.n == 2);
  /* fn returning 1 stops the walk. */
  l = (struct ext_list){ .stop_after = 1 };
  CHECK(disk_extents_allocation(d, 0, SIZE, collect, &l) == 0 && l.n == 1);

  /* Zero with holes allowed punches; without, the range reads as zeroes too. */
  CHECK(disk_zero(d, 4096, 1 * MiB, DISK_IO_MAY_TRIM) == 0);
  CHECK(read_is(d, 1 * MiB, 4096, 0));
  l.n = 0;
  l.stop_after = 0;
  CHECK(disk_extents_allocation(d, 1 * MiB, 4096, collect, &l) == 0);
  CHECK(l.n == 1 && l.e[0].flags == (DISK_EXTENT_HOLE | DISK_EXTENT_ZERO));
  CHECK(disk_zero(d, 65536, 5 * MiB + 1000, 0) == 0);
  CHECK(read_is(d, 5 * MiB + 1000, 65536, 0));
  CHECK(read_is(d, 5 * MiB + 100, 900, 0xcd));
  CHECK(read_is(d, 5 * MiB + 66536, 1000, 0xcd));
  CHECK(disk_trim(d, 128 * KiB, 5 * MiB + 128 * KiB, 0) == 0);
  CHECK(read_is(d, 5 * MiB + 128 * KiB, 128 * KiB, 0));
  CHECK(disk_zero(d, 4096, 9 * MiB, DISK_IO_FUA) == 0);
  CHECK(disk_trim(d, 4096, 10 * MiB, DISK_IO_FUA) == 0);

  /* Dirty: 1 MiB (region 16), 5 MiB+100..+200100 (regions 80..83), zero at
   * 9 MiB (144), trim at 10 MiB (160).  Reads marked nothing. */
  bool want[NBITS] = { false };
  want[16] = want[80] = want[81] = want[82] = want[83] = want[144] = want[160] = true;
  struct disk_dirty_map m;
  CHECK(disk_dirty_snapshot(d, &m) == 0);
  CHECK(m.granularity == GRAN && m.nbits == NBITS && m.generation == 0);
  bool same = true;
  for (uint64_t i = 0; i < NBITS; i++)
    same &= (bool)((m.words[i / 64] >> (i % 64)) & 1) == want[i];
  CHECK(same);
  free(m.words);
  CHECK(disk_dirty_bytes(d) == 7 * GRAN);

  l = (struct ext_list){ .n = 0 };
  CHECK(disk_extents_dirty(d, 0, SIZE, collect, &l) == 0);
  CHECK(tiles(&l, 0, SIZE));
  CHECK(l.n == 9);   /* clean, 16, clean, 80-83, clean, 144, clean, 160, clean */
  CHECK(flags_at(&l, 16 * GRAN) == DISK_EXTENT_DIRTY && flags_at(&l, 0) == 0);
  CHECK(flags_at(&l, 84 * GRAN - 1) == DISK_EXTENT_DIRTY && flags_at(&l, 84 * GRAN) == 0);
  l.n = 0;
  CHECK(disk_extents_dirty(d, 16 * GRAN + 5, 100, collect, &l) == 0);
  CHECK(l.n == 1 && l.e[0].off == 16 * GRAN + 5 && l.e[0].len == 100 &&
        l.e[0].flags == DISK_EXTENT_DIRTY);

  /* Heat saw every IO that succeeded. */
  struct heat *h = disk_heat(d);
  CHECK(h != NULL);
  struct heat_rates r;
  heat_rates(h, &r);
  CHECK(r.total_ops[IO_WRITE] == 2 && r.total_bytes[IO_WRITE] == 4096 + 200000);
  CHECK(r.total_ops[IO_ZERO] == 3 && r.total_ops[IO_TRIM] == 2);
  CHECK(r.total_ops[IO_FLUSH] == 1 && r.total_ops[IO_CACHE] == 1);
  CHECK(histogram_count(heat_latency(h, IO_WRITE)) == 2);
  struct heat_region reg;
  CHECK(heat_regions(h, 5, 1, &reg) == 1 && reg.writes == 1 && reg.write_bytes == 200000);

  /* Swap: the old map out, a clean one in; the next write lands in the new. */
  CHECK(disk_dirty_swap(d, &m) == 0);
  CHECK(m.generation == 0 && m.nbits == NBITS);
  same = true;
  for (uint64_t i = 0; i < NBITS; i++)
    same &= (bool)((m.words[i / 64] >> (i % 64)) & 1) == want[i];
  CHECK(same);
  free(m.words);
  CHECK(disk_dirty_bytes(d) == 0);
  CHECK(write_fill(d, 20 * MiB, 1, 0x11, 0) == 0);
  CHECK(disk_dirty_snapshot(d, &m) == 0);
  CHECK(m.generation == 1 && m.words[(20 * MiB / GRAN) / 64] == 1ull << ((20 * MiB / GRAN) % 64));
  free(m.words);
  CHECK(disk_sync_all(d) == 0);
  disk_unref(d);

  printf("reopen: the map is exact and trusted, the data is there\n");
  d = open_disk(true, true, false);
  CHECK(strcmp(disk_cbt_state(d), "ok") == 0);
  CHECK(disk_dirty_bytes(d) == GRAN);
  CHECK(read_is(d, 20 * MiB, 1, 0x11));
  CHECK(read_is(d, 5 * MiB + 100, 900, 0xcd));
  CHECK(disk_dirty_snapshot(d, &m) == 0 && m.generation == 1);
  free(m.words);
  disk_unref(d);
}

static void test_nowait(void)
{
  printf("NOWAIT: -EAGAIN leaves the data untouched; durable regions go inline\n");
  make_image();
  struct disk *d = open_disk(true, true, true);
  /* A clean region needs a commit: -EAGAIN, nothing written. */
  CHECK(write_fill(d, 2 * MiB, 4096, 0x77, DISK_IO_NOWAIT) == -EAGAIN);
  CHECK(read_is(d, 2 * MiB, 4096, 0));
  struct heat_rates r;
  heat_rates(disk_heat(d), &r);
  CHECK(r.total_ops[IO_WRITE] == 0);
  /* The worker's retry (blocking) does it. */
  CHECK(write_fill(d, 2 * MiB, 4096, 0x77, 0) == 0);
  /* Now the region's bit is durable: inline. */
  CHECK(write_fill(d, 2 * MiB + 8192, 4096, 0x78, DISK_IO_NOWAIT) == 0);
  CHECK(read_is(d, 2 * MiB + 8192, 4096, 0x78));
  CHECK(disk_zero(d, 4096, 2 * MiB + 8192, DISK_IO_NOWAIT | DISK_IO_MAY_TRIM) == 0);
  CHECK(disk_trim(d, 4096, 2 * MiB, DISK_IO_NOWAIT) == 0);
  /* 4-6 MiB: a persist neighbourhood (2 MiB, cbt.h) not written yet. */
  CHECK(disk_trim(d, 4096, 5 * MiB, DISK_IO_NOWAIT) == -EAGAIN);   /* clean neighbourhood */
  /* FUA blocks by definition. */
  CHECK(write_fill(d, 2 * MiB, 4096, 0x79, DISK_IO_NOWAIT | DISK_IO_FUA) == -EAGAIN);
  CHECK(read_is(d, 2 * MiB + 4096, 4096, 0));

  /* Reads: cached data comes back inline (or blocking where RWF_NOWAIT is
   * unsupported); an uncached page may be -EAGAIN. */
  unsigned char buf[4096];
  CHECK(write_fill(d, 2 * MiB + 16384, 4096, 0x7a, 0) == 0);
  CHECK(disk_read(d, buf, 4096, 2 * MiB + 16384, 0) == 0);
  CHECK(disk_read(d, buf, 4096, 2 * MiB + 16384, DISK_IO_NOWAIT) == 0 && is_filled(buf, 4096, 0x7a));
  int fd = open(image, O_RDONLY);
  fdatasync(fd);
  posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  close(fd);
  int rr = disk_read(d, buf, 4096, 2 * MiB + 16384, DISK_IO_NOWAIT);
  printf("  NOWAIT read of an evicted page: %s\n", rr == 0 ? "served" : strerror(-rr));
  CHECK(rr == 0 || rr == -EAGAIN);
  CHECK(disk_read(d, buf, 4096, 2 * MiB + 16384, 0) == 0 && is_filled(buf, 4096, 0x7a));

  printf("write limit: NOWAIT is -EAGAIN when the limiter says wait; blocking writes wait\n");
  disk_set_write_limit(d, 1 * MiB);
  CHECK(disk_write_limit(d) == 1 * MiB);
  CHECK(write_fill(d, 6 * MiB, (uint32_t)MiB, 0x55, DISK_IO_NOWAIT) == -EAGAIN);  /* clean regions */
  uint64_t t0 = now_ns();
  CHECK(write_fill(d, 6 * MiB, (uint32_t)MiB, 0x55, 0) == 0);   /* burst: goes, books 0.9 s ahead */
  CHECK(write_fill(d, 6 * MiB, 4096, 0x56, DISK_IO_NOWAIT) == -EAGAIN);
  CHECK(read_is(d, 6 * MiB, 4096, 0x55));
  CHECK(write_fill(d, 6 * MiB, 4096, 0x56, 0) == 0);
  /* The 4 KiB write cannot start before the 1 MiB one's interval (1 s, less
   * the 100 ms burst allowance) is over. */
  printf("  1 MiB + 4 KiB at 1 MiB/s took %.0f ms\n", (double)(now_ns() - t0) / 1e6);
  CHECK(now_ns() - t0 >= 890000000ull);
  CHECK(disk_write_throttled_ns(d) > 0);
  disk_set_write_limit(d, 0);
  CHECK(write_fill(d, 2 * MiB, 4096, 0x57, DISK_IO_NOWAIT) == 0);
  CHECK(read_is(d, 2 * MiB, 4096, 0x57));
  disk_unref(d);
}

static void test_missing_map_and_cbt_off(void)
{
  printf("a known disk whose map vanished: all dirty, \"recovered\"\n");
  make_image();
  struct disk *d = open_disk(true, false, true);
  CHECK(disk_heat(d) == NULL);
  CHECK(write_fill(d, 0, 1, 1, 0) == 0);
  disk_unref(d);
  unlink(map);
  d = open_disk(true, false, false);
  CHECK(strncmp(disk_cbt_state(d), "recovered: ", 11) == 0);
  CHECK(disk_dirty_bytes(d) == SIZE);
  struct disk_dirty_map m;
  CHECK(disk_dirty_swap(d, &m) == 0);
  free(m.words);
  disk_unref(d);

  printf("CBT off: state \"off\", all dirty to callers; CBT back: all dirty, \"recovered\"\n");
  d = open_disk(false, false, false);
  CHECK(strcmp(disk_cbt_state(d), "off") == 0 && !disk_cbt_enabled(d));
  CHECK(disk_cbt(d) == NULL);
  CHECK(write_fill(d, 3 * MiB, 4096, 9, DISK_IO_NOWAIT) == 0);   /* no map: inline */
  CHECK(read_is(d, 3 * MiB, 4096, 9));
  CHECK(disk_dirty_bytes(d) == SIZE);
  CHECK(disk_dirty_snapshot(d, &m) == -EOPNOTSUPP);
  CHECK(disk_dirty_swap(d, &m) == -EOPNOTSUPP);
  struct ext_list l = { .n = 0 };
  CHECK(disk_extents_dirty(d, 100, 1000, collect, &l) == 0);
  CHECK(l.n == 1 && l.e[0].off == 100 && l.e[0].len == 1000 && l.e[0].flags == DISK_EXTENT_DIRTY);
  disk_unref(d);
  d = open_disk(true, false, false);
  printf("  state: %s\n", disk_cbt_state(d));
  CHECK(strncmp(disk_cbt_state(d), "recovered: ", 11) == 0);
  CHECK(disk_dirty_bytes(d) == SIZE);
  disk_unref(d);
}

static void test_map_failure(void)
{
  printf("a failing map file: writes fail (-EIO), never acknowledged; a sync recovers\n");
  make_image();
  struct disk *d = open_disk(true, true, true);
  CHECK(write_fill(d, 0, 4096, 1, 0) == 0);
  cbt_inject_write_error(disk_cbt(d), EIO);
  /* 0, 4 MiB and 6 MiB are in three persist neighbourhoods (2 MiB, cbt.h). */
  CHECK(write_fill(d, 4 * MiB, 4096, 2, 0) == -EIO);   /* commit failed under it */
  CHECK(write_fill(d, 6 * MiB, 4096, 3, 0) == -EIO);   /* fail mode: refused first */
  CHECK(read_is(d, 6 * MiB, 4096, 0));                  /* ...so the data is untouched */
  CHECK(write_fill(d, 6 * MiB, 4096, 3, DISK_IO_NOWAIT) == -EIO);
  /* Durability is tracked per group of 64 neighbourhoods (128 MiB): region 0
   * was durable, but its group carries the failed change, so it fails too. */
  CHECK(write_fill(d, 100, 10, 4, 0) == -EIO);
  CHECK(strncmp(disk_cbt_state(d), "failed", 6) == 0);
  cbt_inject_write_error(disk_cbt(d), 0);
  CHECK(disk_sync_all(d) == 0);
  CHECK(write_fill(d, 6 * MiB, 4096, 3, 0) == 0);
  CHECK(strcmp(disk_cbt_state(d), "created") == 0);
  disk_unref(d);
  d = open_disk(true, true, false);
  CHECK(strcmp(disk_cbt_state(d), "ok") == 0);
  CHECK(disk_dirty_bytes(d) == 3 * GRAN);               /* 0, 4 MiB (failed write), 6 MiB */
  disk_unref(d);
}

#define CW_THREADS 4
#define CW_WRITES 1500

struct cw_arg {
  struct disk *d;
  int id;
  bool *written;   /* [NBITS], regions this thread wrote */
  int errors;
};

static void *cw_writer(void *arg)
{
  struct cw_arg *a = arg;
  unsigned s = 99u + (unsigned)a->id;
  unsigned char buf[4096];
  for (int i = 0; i < CW_WRITES; i++) {
    s = s * 1103515245u + 12345u;
    /* thread t owns the regions r with r % CW_THREADS == t */
    uint64_t region = ((s >> 4) % (NBITS / CW_THREADS)) * CW_THREADS + (uint64_t)a->id;
    uint64_t off = region * GRAN + ((s >> 20) % 15) * 4096;
    memset(buf, (int)(region & 0xff) ^ a->id, sizeof buf);
    int r = disk_write(a->d, buf, sizeof buf, off, (s & 1) ? DISK_IO_NOWAIT : 0);
    if (r == -EAGAIN)
      r = disk_write(a->d, buf, sizeof buf, off, 0);
    if (r)
      a->errors++;
    a->written[region] = true;
    if (disk_read(a->d, buf, sizeof buf, off, 0) || !is_filled(buf, sizeof buf, (region & 0xff) ^ a->id))
      a->errors++;
  }
  return NULL;
}

static void test_concurrent(void)
{
  printf("%d threads writing (NOWAIT, then blocking on -EAGAIN): the map is exact\n", CW_THREADS);
  make_image();
  struct disk *d = open_disk(true, true, true);
  pthread_t th[CW_THREADS];
  struct cw_arg a[CW_THREADS];
  for (int i = 0; i < CW_THREADS; i++) {
    a[i] = (struct cw_arg){ d, i, calloc(NBITS, 1), 0 };
    pthread_create(&th[i], NULL, cw_writer, &a[i]);
  }
  for (int i = 0; i < CW_THREADS; i++)
    pthread_join(th[i], NULL);
  struct disk_dirty_map m;
  CHECK(disk_dirty_snapshot(d, &m) == 0);
  uint64_t diff = 0, n = 0;
  for (uint64_t r = 0; r < NBITS; r++) {
    bool w = false;
    for (int i = 0; i < CW_THREADS; i++)
      w |= a[i].written[r];
    n += w;
    diff += w != (bool)((m.words[r / 64] >> (r % 64)) & 1);
  }
  free(m.words);
  for (int i = 0; i < CW_THREADS; i++) {
    CHECK(a[i].errors == 0);
    free(a[i].written);
  }
  CHECK(diff == 0);
  CHECK(disk_dirty_bytes(d) == n * GRAN);
  struct heat_rates hr;
  heat_rates(disk_heat(d), &hr);
  CHECK(hr.total_ops[IO_WRITE] == CW_THREADS * CW_WRITES);
  CHECK(hr.total_ops[IO_READ] == CW_THREADS * CW_WRITES);
  uint64_t t0 = now_ns();
  disk_ref(d);
  disk_unref(d);                  /* not the last reference: nothing happens */
  disk_unref(d);
  printf("  last unref (sync, map write, ticker stop) took %.0f ms\n",
         (double)(now_ns() - t0) / 1e6);
  CHECK(now_ns() - t0 < 1000000000ull);
}

static void test_ticker_and_clients(void)
{
  printf("the ticker folds heat every second; client counting\n");
  make_image();
  struct disk *d = open_disk(true, true, true);
  disk_client_attach(d);
  disk_client_attach(d);
  disk_client_detach(d);
  CHECK(disk_clients(d) == 1);
  disk_client_detach(d);
  CHECK(write_fill(d, 0, 4096, 1, 0) == 0);
  usleep(2200000);                /* at least one fold by the ticker */
  struct heat_rates r;
  heat_rates(disk_heat(d), &r);
  CHECK(r.write_iops_60s > 0);
  disk_unref(d);
}

static void test_bad_config(void)
{
  printf("bad configurations are refused with a message\n");
  make_image();
  struct disk_config cfg = { .name = "bad/name", .image_path = image, .cbt_path = map,
                             .cbt_enabled = true, .cbt_new = true };
  char err[256] = "";
  CHECK(disk_open(&cfg, err, sizeof err) == NULL && err[0]);
  cfg.name = "ok";
  cfg.cbt_granularity = 1000;
  err[0] = 0;
  CHECK(disk_open(&cfg, err, sizeof err) == NULL && err[0]);
  cfg.cbt_granularity = 0;        /* default */
  char nope[300];
  snprintf(nope, sizeof nope, "%s/nope.img", dir);
  cfg.image_path = nope;
  err[0] = 0;
  CHECK(disk_open(&cfg, err, sizeof err) == NULL && strstr(err, "nope.img"));
  printf("  e.g. %s\n", err);
  cfg.image_path = dir;           /* a directory */
  err[0] = 0;
  CHECK(disk_open(&cfg, err, sizeof err) == NULL && err[0]);
  cfg.image_path = image;
  struct disk *d = disk_open(&cfg, err, sizeof err);
  CHECK(d && disk_cbt_granularity(d) == CBT_DEFAULT_GRANULARITY);
  if (d)
    disk_unref(d);
}

int main(void)
{
  snprintf(dir, sizeof dir, "%s/ferry-test-disk.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 1;
  }
  snprintf(image, sizeof image, "%s/disk.img", dir);
  snprintf(map, sizeof map, "%s/disk.cbt", dir);
  test_io_and_extents();
  test_nowait();
  test_missing_map_and_cbt_off();
  test_map_failure();
  test_concurrent();
  test_ticker_and_clients();
  test_bad_config();
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0)
    fprintf(stderr, "could not remove %s\n", dir);
  if (failures) {
    fprintf(stderr, "test_disk: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_disk: all checks passed\n");
  return 0;
}
