/* test_throttle: the write rate limiter.  Wall-clock checks assert only what
 * physics guarantees (a lower bound on elapsed time for bytes at a rate) plus
 * generous upper bounds that catch a limiter that oversleeps by seconds; no
 * check depends on fine scheduling.  Also: NOWAIT reserves nothing, a rate
 * change wakes sleepers at once, sleepers burn no CPU. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "common/util.h"
#include "disk/throttle.h"

#include "check.h"

static double secs_since(uint64_t t0) { return (double)(now_ns() - t0) / 1e9; }

static double cpu_secs(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void test_unlimited(void)
{
  printf("rate 0 lets everything through at once\n");
  struct throttle t;
  throttle_init(&t, 0);
  uint64_t t0 = now_ns();
  for (int i = 0; i < 100000; i++)
    CHECK(throttle_wait(&t, 1 << 20, false) == 0);
  CHECK(secs_since(t0) < 1.0);
  CHECK(throttle_rate(&t) == 0);
  CHECK(atomic_load(&t.throttled_ops) == 0);
  throttle_destroy(&t);
}

struct writer_arg {
  struct throttle *t;
  uint64_t bytes, chunk;
};

static void *writer(void *arg)
{
  struct writer_arg *a = arg;
  for (uint64_t done = 0; done < a->bytes; done += a->chunk)
    throttle_wait(a->t, a->chunk, false);
  return NULL;
}

static void test_rate(void)
{
  printf("10 MB at 5 MB/s from 2 threads takes >= 1.8 s, and not much longer; sleepers use no CPU\n");
  struct throttle t;
  const uint64_t rate = 5000000, total = 10000000, chunk = 65536;
  throttle_init(&t, rate);
  struct writer_arg a = { &t, total / 2, chunk };
  pthread_t th[2];
  double cpu0 = cpu_secs();
  uint64_t t0 = now_ns();
  for (int i = 0; i < 2; i++)
    pthread_create(&th[i], NULL, writer, &a);
  for (int i = 0; i < 2; i++)
    pthread_join(th[i], NULL);
  double took = secs_since(t0), cpu = cpu_secs() - cpu0;
  /* The last chunk cannot start before (total - chunk) / rate less the 100 ms
   * burst allowance. */
  double lower = (double)(total - chunk) / (double)rate - 0.1 - 0.001;   /* 1 ms: float slack */
  printf("  took %.3f s (lower bound %.3f s), cpu %.3f s, slept %.3f s in %llu waits\n", took,
         lower, cpu, (double)atomic_load(&t.waited_ns) / 1e9,
         (unsigned long long)atomic_load(&t.throttled_ops));
  CHECK(took >= lower);
  CHECK(took >= 1.8);
  CHECK(took < lower + 3.0);           /* no multi-second oversleeping */
  CHECK(cpu < 0.5);                    /* timed waits, not spinning */
  CHECK(atomic_load(&t.throttled_ops) > 0);
  CHECK(atomic_load(&t.waited_ns) > 1000000000ull);
  throttle_destroy(&t);
}

static void test_burst(void)
{
  printf("an idle limiter passes 100 ms worth of bytes at once, then makes the next wait\n");
  struct throttle t;
  throttle_init(&t, 1000000);   /* 1 MB/s: 100 ms = 100 kB */
  uint64_t t0 = now_ns();
  CHECK(throttle_wait(&t, 50000, true) == 0);
  CHECK(throttle_wait(&t, 40000, true) == 0);
  /* 90 kB reserved from now - 100 ms: the schedule ends at now - 10 ms, so the
   * next write still starts at once (and books until now + 490 ms)... */
  CHECK(throttle_wait(&t, 500000, true) == 0);
  /* ...and this one would have to wait ~490 ms: NOWAIT says so and reserves nothing. */
  CHECK(throttle_wait(&t, 1, true) == -EAGAIN);
  uint64_t reserved = t.next_free_ns;
  CHECK(throttle_wait(&t, 1000000, true) == -EAGAIN);
  CHECK(t.next_free_ns == reserved);
  CHECK(secs_since(t0) < 0.4);
  /* Blocking: waits for its turn (~490 ms after t0) and then books the bytes. */
  CHECK(throttle_wait(&t, 1, false) == 0);
  CHECK(now_ns() >= reserved);
  CHECK(secs_since(t0) >= 0.35);
  throttle_destroy(&t);
}

struct sleeper_arg {
  struct throttle *t;
  uint64_t bytes;
  uint64_t returned_ns;
  int rc;
};

static void *sleeper(void *arg)
{
  struct sleeper_arg *a = arg;
  a->rc = throttle_wait(a->t, a->bytes, false);
  a->returned_ns = now_ns();
  return NULL;
}

static void test_rate_change_wakes(void)
{
  printf("lifting the limit wakes a writer booked 1000 s ahead at once; raising it too\n");
  for (int mode = 0; mode < 2; mode++) {
    struct throttle t;
    throttle_init(&t, 1000);                  /* 1 kB/s */
    CHECK(throttle_wait(&t, 1000000, false) == 0);   /* burst: goes, books 1000 s */
    struct sleeper_arg a[3];
    pthread_t th[3];
    for (int i = 0; i < 3; i++) {
      a[i] = (struct sleeper_arg){ &t, 1000, 0, -1 };
      pthread_create(&th[i], NULL, sleeper, &a[i]);
    }
    usleep(200000);
    for (int i = 0; i < 3; i++)
      CHECK(a[i].returned_ns == 0);           /* all asleep */
    uint64_t t0 = now_ns();
    throttle_set_rate(&t, mode == 0 ? 0 : 100000000);
    for (int i = 0; i < 3; i++) {
      pthread_join(th[i], NULL);
      CHECK(a[i].rc == 0);
      CHECK(a[i].returned_ns - t0 < 500000000ull);   /* not 1000 s */
    }
    CHECK(throttle_rate(&t) == (mode == 0 ? 0 : 100000000));
    CHECK(atomic_load(&t.throttled_ops) == 3);
    throttle_destroy(&t);
  }
}

static void test_slow_rate_accuracy(void)
{
  printf("a sleeping writer at 200 kB/s: 300 kB in 4 kB writes takes >= 1.38 s\n");
  struct throttle t;
  throttle_init(&t, 200000);
  uint64_t t0 = now_ns();
  for (int i = 0; i < 75; i++)
    throttle_wait(&t, 4000, false);
  double took = secs_since(t0);
  printf("  took %.3f s\n", took);
  CHECK(took >= (300000.0 - 4000.0) / 200000.0 - 0.1 - 0.001);
  CHECK(took < 4.5);
  throttle_destroy(&t);
}

int main(void)
{
  test_unlimited();
  test_burst();
  test_rate();
  test_rate_change_wakes();
  test_slow_rate_accuracy();
  if (failures) {
    fprintf(stderr, "test_throttle: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_throttle: all checks passed\n");
  return 0;
}
