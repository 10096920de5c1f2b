/* test_heat: region sizing, exact counts under concurrent recording, decay by
 * half over a half-life (the clock is driven with heat_tick_at), rates over
 * 1 s and 60 s, latency windows, the trace ring (order, sampling, lapping,
 * concurrent readers never see a torn entry). */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "disk/heat.h"

#include "check.h"

#define MiB (1024ull * 1024)
#define GiB (1024ull * MiB)
#define SEC 1000000000ull

static bool near(double a, double b, double tol) { return fabs(a - b) <= tol; }

static void test_sizing(void)
{
  printf("region size: >= 1 MiB, at most %d regions\n", HEAT_MAX_REGIONS);
  struct { uint64_t size, region, n; } cases[] = {
    { 1 * GiB, MiB, 1024 },
    { 16 * GiB, MiB, 16384 },
    { 16 * GiB + 1, 2 * MiB, 8193 },
    { 64 * 1024 * GiB, 4 * GiB, 16384 },
    { 4096, MiB, 1 },
    { 0, MiB, 1 },
  };
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    struct heat *h = heat_new(cases[i].size);
    CHECK(h);
    if (!h)
      continue;
    CHECK(heat_region_size(h) == cases[i].region);
    CHECK(heat_nregions(h) == cases[i].n);
    heat_free(h);
  }
  CHECK(strcmp(io_kind_name(IO_READ), "read") == 0);
  CHECK(strcmp(io_kind_name(IO_ZERO), "zero") == 0);
  CHECK(strcmp(io_kind_name(IO_CACHE), "cache") == 0);
}

struct rec_arg {
  struct heat *h;
  int id;
};

#define THREADS 4
#define PER_THREAD 20000

static void *recorder(void *arg)
{
  struct rec_arg *a = arg;
  for (int i = 0; i < PER_THREAD; i++) {
    /* thread t writes region t, reads region 10 + t */
    heat_record(a->h, IO_WRITE, (uint64_t)a->id * MiB + (uint64_t)(i % 64) * 4096, 4096, 1000);
    heat_record(a->h, IO_READ, (10 + (uint64_t)a->id) * MiB, 512, 2000);
  }
  return NULL;
}

static void test_counts_exact(void)
{
  printf("counts and bytes are exact with %d threads recording at once\n", THREADS);
  struct heat *h = heat_new(1 * GiB);
  pthread_t th[THREADS];
  struct rec_arg a[THREADS];
  for (int i = 0; i < THREADS; i++) {
    a[i] = (struct rec_arg){ h, i };
    pthread_create(&th[i], NULL, recorder, &a[i]);
  }
  /* a fold in the middle must lose nothing */
  heat_tick_at(h, now_ns() + 2 * SEC);
  for (int i = 0; i < THREADS; i++)
    pthread_join(th[i], NULL);

  struct heat_rates r;
  heat_rates(h, &r);
  CHECK(r.total_ops[IO_WRITE] == THREADS * PER_THREAD);
  CHECK(r.total_bytes[IO_WRITE] == THREADS * PER_THREAD * 4096ull);
  CHECK(r.total_ops[IO_READ] == THREADS * PER_THREAD);
  CHECK(r.total_bytes[IO_READ] == THREADS * PER_THREAD * 512ull);
  CHECK(r.total_ops[IO_TRIM] == 0);
  CHECK(histogram_count(heat_latency(h, IO_WRITE)) == THREADS * PER_THREAD);

  struct heat_region reg[20];
  CHECK(heat_regions(h, 0, 20, reg) == 20);
  for (int t = 0; t < THREADS; t++) {
    CHECK(reg[t].offset == (uint64_t)t * MiB && reg[t].length == MiB);
    CHECK(reg[t].writes == PER_THREAD && reg[t].write_bytes == PER_THREAD * 4096ull);
    CHECK(reg[t].reads == 0);
    CHECK(reg[10 + t].reads == PER_THREAD && reg[10 + t].read_bytes == PER_THREAD * 512ull);
    CHECK(reg[10 + t].writes == 0);
    CHECK(near(reg[t].write_heat, PER_THREAD, 1e-6));   /* no time passed since the fold */
  }
  CHECK(reg[5].reads == 0 && reg[5].writes == 0 && reg[5].write_heat == 0);

  /* An IO across a region boundary counts in both, bytes split exactly. */
  heat_record(h, IO_WRITE, 100 * MiB - 1000, 5000, 1);
  CHECK(heat_regions(h, 99, 2, reg) == 2);
  CHECK(reg[0].writes == 1 && reg[0].write_bytes == 1000);
  CHECK(reg[1].writes == 1 && reg[1].write_bytes == 4000);
  /* Regions past the end and partial last region. */
  CHECK(heat_regions(h, 1023, 5, reg) == 1);
  CHECK(heat_regions(h, 1024, 5, reg) == 0);
  /* Trim, zero, flush count per disk, not per region. */
  heat_record(h, IO_TRIM, 200 * MiB, 4096, 1);
  heat_record(h, IO_FLUSH, 0, 0, 1);
  CHECK(heat_regions(h, 200, 1, reg) == 1 && reg[0].writes == 0);
  heat_rates(h, &r);
  CHECK(r.total_ops[IO_TRIM] == 1 && r.total_bytes[IO_TRIM] == 4096 && r.total_ops[IO_FLUSH] == 1);
  heat_free(h);
}

static void test_decay(void)
{
  printf("heat halves over a half-life; totals do not decay; top orders by heat\n");
  struct heat *h = heat_new(1 * GiB);
  heat_set_half_life(h, 10);
  CHECK(heat_half_life(h) == 10);
  uint64_t t = now_ns();
  for (int i = 0; i < 100; i++)
    heat_record(h, IO_WRITE, 3 * MiB, 4096, 1);
  for (int i = 0; i < 40; i++)
    heat_record(h, IO_READ, 7 * MiB, 4096, 1);
  heat_tick_at(h, t + 1 * SEC);           /* fold: heat = 100 */
  struct heat_region reg;
  heat_regions(h, 3, 1, &reg);
  CHECK(near(reg.write_heat, 100.0, 1e-9));
  for (int s = 2; s <= 11; s++)           /* ten seconds, one fold each */
    heat_tick_at(h, t + (uint64_t)s * SEC);
  heat_regions(h, 3, 1, &reg);
  printf("  after one half-life: write_heat %.6f (from 100)\n", reg.write_heat);
  CHECK(near(reg.write_heat, 50.0, 1e-6));
  CHECK(reg.writes == 100);
  /* One fold over a 10 s gap decays the same as ten folds. */
  heat_tick_at(h, t + 21 * SEC);
  heat_regions(h, 3, 1, &reg);
  CHECK(near(reg.write_heat, 25.0, 1e-6));
  /* A time that is not a second later does nothing. */
  heat_tick_at(h, t + 21 * SEC + SEC / 2);
  heat_tick_at(h, t);
  heat_regions(h, 3, 1, &reg);
  CHECK(near(reg.write_heat, 25.0, 1e-6));

  heat_regions(h, 7, 1, &reg);
  CHECK(near(reg.read_heat, 10.0, 1e-6));
  struct heat_region top[5];
  unsigned n = heat_top(h, 5, top);
  CHECK(n == 2);                          /* only regions with heat */
  CHECK(top[0].offset == 3 * MiB && top[1].offset == 7 * MiB);
  CHECK(heat_top(h, 1, top) == 1 && top[0].offset == 3 * MiB);
  /* New IO counts at once, before a fold. */
  for (int i = 0; i < 30; i++)
    heat_record(h, IO_READ, 7 * MiB, 1, 1);
  CHECK(heat_top(h, 5, top) == 2 && top[0].offset == 7 * MiB);
  CHECK(near(top[0].read_heat, 40.0, 1e-6));
  /* Long idleness: heat goes to exactly 0 (no denormal crawl). */
  heat_tick_at(h, t + 22 * SEC);          /* folds the 30 reads */
  heat_tick_at(h, t + 100000 * SEC);
  CHECK(heat_top(h, 5, top) == 0);
  heat_regions(h, 7, 1, &reg);
  CHECK(reg.reads == 70 && reg.read_heat == 0.0);
  heat_free(h);
}

static void test_rates(void)
{
  printf("rates over the last second and minute\n");
  struct heat *h = heat_new(1 * GiB);
  uint64_t t = now_ns();
  struct heat_rates r;
  heat_rates(h, &r);
  CHECK(r.write_iops_1s == 0 && r.write_iops_60s == 0);
  for (int s = 1; s <= 70; s++) {          /* 70 s: 10 writes of 1000 B per second */
    for (int i = 0; i < 10; i++)
      heat_record(h, IO_WRITE, 0, 1000, 1);
    heat_tick_at(h, t + (uint64_t)s * SEC);
  }
  for (int i = 0; i < 50; i++)             /* the 71st second: 50 reads */
    heat_record(h, IO_READ, 0, 100, 1);
  heat_tick_at(h, t + 71 * SEC);
  heat_rates(h, &r);
  CHECK(r.read_iops_1s == 50 && r.read_bps_1s == 5000);
  CHECK(r.write_iops_1s == 0);
  CHECK(near(r.write_iops_60s, 590.0 / 60.0, 1e-9));     /* 59 of the last 60 s had writes */
  CHECK(near(r.write_bps_60s, 590000.0 / 60.0, 1e-6));
  CHECK(near(r.read_iops_60s, 50.0 / 60.0, 1e-9));
  CHECK(r.total_ops[IO_WRITE] == 700 && r.total_ops[IO_READ] == 50);

  /* Young disk: the minute average is over the seconds that exist. */
  struct heat *y = heat_new(1 * GiB);
  t = now_ns();
  for (int i = 0; i < 30; i++)
    heat_record(y, IO_WRITE, 0, 1, 1);
  heat_tick_at(y, t + 1 * SEC);
  heat_tick_at(y, t + 2 * SEC);
  heat_rates(y, &r);
  CHECK(near(r.write_iops_60s, 15.0, 1e-9));
  CHECK(r.write_iops_1s == 0);
  /* A 3 s gap in folds: the IO lands in the newest second only. */
  for (int i = 0; i < 9; i++)
    heat_record(y, IO_WRITE, 0, 1, 1);
  heat_tick_at(y, t + 5 * SEC);
  heat_rates(y, &r);
  CHECK(r.write_iops_1s == 9);
  CHECK(near(r.write_iops_60s, 39.0 / 5.0, 1e-9));
  heat_free(y);
  heat_free(h);
}

static void test_latency_window(void)
{
  printf("latency: cumulative histogram and the last completed 10 s window\n");
  struct heat *h = heat_new(1 * GiB);
  uint64_t t = now_ns();
  for (int i = 0; i < 100; i++)
    heat_record(h, IO_READ, 0, 1, 1000);
  struct histogram w;
  heat_latency_window(h, IO_READ, &w);
  CHECK(histogram_count(&w) == 0);        /* no window completed yet */
  for (int s = 1; s <= 10; s++)
    heat_tick_at(h, t + (uint64_t)s * SEC);
  heat_latency_window(h, IO_READ, &w);
  CHECK(histogram_count(&w) == 100);
  for (int i = 0; i < 7; i++)
    heat_record(h, IO_READ, 0, 1, 5000000);
  for (int s = 11; s <= 20; s++)
    heat_tick_at(h, t + (uint64_t)s * SEC);
  heat_latency_window(h, IO_READ, &w);
  CHECK(histogram_count(&w) == 7);
  CHECK(histogram_percentile(&w, 0.5) >= 4000000);
  CHECK(histogram_count(heat_latency(h, IO_READ)) == 107);
  heat_free(h);
}

static void test_trace(void)
{
  printf("trace: newest entries oldest first, sampling 1 in N, lapping the ring\n");
  struct heat *h = heat_new(1 * GiB);
  CHECK(heat_trace_every(h) == 1);
  struct heat_trace_entry *e = calloc(HEAT_TRACE_SIZE + 10, sizeof *e);
  CHECK(heat_trace(h, e, 100) == 0);
  uint64_t before = realtime_ns();
  for (uint64_t i = 0; i < 10; i++)
    heat_record(h, i % 2 ? IO_READ : IO_WRITE, i * 4096, 100 + (uint32_t)i, 3000 + i * 1000);
  unsigned n = heat_trace(h, e, 100);
  CHECK(n == 10);
  for (unsigned i = 0; i < n; i++) {
    CHECK(e[i].seq == i);
    CHECK(e[i].offset == i * 4096 && e[i].length == 100 + i);
    CHECK(e[i].kind == (i % 2 ? IO_READ : IO_WRITE));
    CHECK(e[i].latency_us == 3 + i);
    CHECK(e[i].time_ns >= before && e[i].time_ns <= realtime_ns());
  }
  n = heat_trace(h, e, 3);                /* the 3 newest, oldest first */
  CHECK(n == 3 && e[0].seq == 7 && e[2].seq == 9);

  heat_set_trace_every(h, 3);
  CHECK(heat_trace_every(h) == 3);
  for (uint64_t i = 10; i < 40; i++)
    heat_record(h, IO_WRITE, i * 4096, 1, 1);
  n = heat_trace(h, e, 100);
  CHECK(n == 20);                         /* 10 + seq 12, 15, ..., 39 */
  for (unsigned i = 10; i < n; i++)
    CHECK(e[i].seq % 3 == 0 && e[i].seq > e[i - 1].seq);
  heat_set_trace_every(h, 0);
  heat_record(h, IO_WRITE, 0, 1, 1);
  CHECK(heat_trace(h, e, 100) == 20);     /* off: nothing added */

  /* Lap the ring: only the newest HEAT_TRACE_SIZE remain, in order. */
  heat_set_trace_every(h, 1);
  for (uint64_t i = 0; i < 3 * HEAT_TRACE_SIZE + 5; i++)
    heat_record(h, IO_READ, i, 1, 1);
  n = heat_trace(h, e, HEAT_TRACE_SIZE + 10);
  CHECK(n == HEAT_TRACE_SIZE);
  bool ordered = true;
  for (unsigned i = 1; i < n; i++)
    ordered &= e[i].seq == e[i - 1].seq + 1;
  CHECK(ordered);
  CHECK(e[n - 1].offset == 3 * HEAT_TRACE_SIZE + 4);
  free(e);
  heat_free(h);
}

/* Writers record entries whose fields are tied together; concurrent readers
 * check every entry they get is whole. */
static _Atomic bool stop_trace;

static void *trace_writer(void *arg)
{
  struct heat *h = arg;
  for (uint64_t i = 0; !atomic_load(&stop_trace) || i < 200000; i++) {
    uint64_t off = (i * 7919) % (1 * GiB / 512) * 512;
    heat_record(h, IO_WRITE, off, (uint32_t)(off % 997) + 1, (off % 991) * 1000);
    if (i > 2000000)
      break;
  }
  return NULL;
}

static void test_trace_concurrent(void)
{
  printf("trace: concurrent writers and readers, no torn entry, always in seq order\n");
  struct heat *h = heat_new(1 * GiB);
  pthread_t w[2];
  atomic_store(&stop_trace, false);
  for (int i = 0; i < 2; i++)
    pthread_create(&w[i], NULL, trace_writer, h);
  struct heat_trace_entry *e = calloc(HEAT_TRACE_SIZE, sizeof *e);
  uint64_t torn = 0, unordered = 0, seen = 0;
  uint64_t t0 = now_ns();
  for (int round = 0; now_ns() - t0 < 500000000ull || seen < 100000; round++) {
    unsigned n = heat_trace(h, e, HEAT_TRACE_SIZE);
    for (unsigned i = 0; i < n; i++) {
      seen++;
      if (e[i].length != e[i].offset % 997 + 1 || e[i].latency_us != e[i].offset % 991)
        torn++;
      if (i && e[i].seq <= e[i - 1].seq)
        unordered++;
    }
    if (round % 50 == 0)
      heat_tick(h);
  }
  atomic_store(&stop_trace, true);
  for (int i = 0; i < 2; i++)
    pthread_join(w[i], NULL);
  printf("  %llu entries read, %llu torn, %llu out of order\n", (unsigned long long)seen,
         (unsigned long long)torn, (unsigned long long)unordered);
  CHECK(seen > 0 && torn == 0 && unordered == 0);
  free(e);
  heat_free(h);
}

int main(void)
{
  test_sizing();
  test_counts_exact();
  test_decay();
  test_rates();
  test_latency_window();
  test_trace();
  test_trace_concurrent();
  if (failures) {
    fprintf(stderr, "test_heat: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_heat: all checks passed\n");
  return 0;
}
