/* test_simvm_zipf: the workload's random numbers (src/vm/simvm/rng.c):
 * xoshiro256** is deterministic per seed, rng_below stays in range without
 * visible bias, the Zipf sampler's rank frequencies match k^-s / H(n, s)
 * for several n and s (within 5 standard deviations), and rank -> slot is
 * a bijection for every n up to 300 and free of overflow for huge n. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vm/simvm/rng.h"

#include "check.h"

static void test_rng(void)
{
  struct rng a, b;
  rng_seed(&a, 42);
  rng_seed(&b, 42);
  for (int i = 0; i < 1000; i++)
    CHECK(rng_next(&a) == rng_next(&b));
  rng_seed(&b, 43);
  CHECK(rng_next(&a) != rng_next(&b));

  /* rng_below: range and a chi-square-ish look at 10 buckets. */
  unsigned hist[10] = { 0 };
  const int n = 200000;
  for (int i = 0; i < n; i++) {
    uint64_t v = rng_below(&a, 10);
    CHECK(v < 10);
    if (v < 10)
      hist[v]++;
  }
  for (int i = 0; i < 10; i++)
    CHECK(fabs(hist[i] - n / 10.0) < 5 * sqrt(n * 0.1 * 0.9));
  for (int i = 0; i < 1000; i++) {
    CHECK(rng_below(&a, 1) == 0);
    CHECK(rng_below(&a, UINT64_MAX) < UINT64_MAX);
    double d = rng_double(&a);
    CHECK(d >= 0 && d < 1);
  }
}

static void test_zipf_distribution(uint64_t n, double s)
{
  struct zipf z;
  CHECK(zipf_init(&z, n, s) == 0);
  struct rng r;
  rng_seed(&r, (uint64_t)(n * 1000 + s * 10));
  const int samples = 300000;
  const int top = 10;
  unsigned *count = calloc(top + 1, sizeof *count);
  for (int i = 0; i < samples; i++) {
    uint64_t k = zipf_sample(&z, &r);
    if (k < 1 || k > n) {
      fprintf(stderr, "zipf(%llu, %g): rank %llu out of range\n", (unsigned long long)n, s,
              (unsigned long long)k);
      failures++;
      break;
    }
    if (k <= (uint64_t)top)
      count[k]++;
  }
  double h = 0;
  for (uint64_t k = 1; k <= n; k++)
    h += pow((double)k, -s);
  for (int k = 1; k <= top && (uint64_t)k <= n; k++) {
    double p = pow(k, -s) / h;
    double expect = p * samples, sd = sqrt(samples * p * (1 - p));
    if (fabs(count[k] - expect) > 5 * sd + 1) {
      fprintf(stderr, "zipf(%llu, %g): rank %d seen %u times, expected %.0f +- %.0f\n",
              (unsigned long long)n, s, k, count[k], expect, sd);
      failures++;
    }
  }
  free(count);
}

static uint64_t gcd(uint64_t a, uint64_t b)
{
  while (b) {
    uint64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

static void test_bijection(void)
{
  for (uint64_t n = 1; n <= 300; n++) {
    uint64_t m = slot_multiplier(n);
    CHECK(m >= 1 && (n == 1 || gcd(m, n) == 1));
    unsigned char *seen = calloc(n, 1);
    for (uint64_t r = 0; r < n; r++) {
      uint64_t s = slot_of_rank(r, m, n);
      CHECK(s < n);
      if (s < n)
        seen[s]++;
    }
    for (uint64_t s = 0; s < n; s++)
      if (seen[s] != 1) {
        fprintf(stderr, "n=%llu: slot %llu hit %u times\n", (unsigned long long)n,
                (unsigned long long)s, seen[s]);
        failures++;
        break;
      }
    free(seen);
  }
  /* Huge n: no overflow, hot ranks spread far apart. */
  uint64_t n = UINT64_C(1) << 40;
  uint64_t m = slot_multiplier(n);
  CHECK(gcd(m, n) == 1);
  CHECK(slot_of_rank(n - 1, m, n) < n);
  uint64_t a = slot_of_rank(0, m, n), b = slot_of_rank(1, m, n);
  CHECK(a == 0 && b > n / 4);
}

int main(void)
{
  test_rng();
  test_zipf_distribution(1, 0.9);
  test_zipf_distribution(2, 0.9);
  test_zipf_distribution(1000, 0.9);
  test_zipf_distribution(1000, 1.0);
  test_zipf_distribution(1000, 0.5);
  test_zipf_distribution(100, 2.0);
  test_zipf_distribution(262144, 1.2);
  struct zipf z;
  CHECK(zipf_init(&z, 0, 1) < 0);
  CHECK(zipf_init(&z, 10, 0) < 0);
  CHECK(zipf_init(&z, 10, -1) < 0);
  CHECK(zipf_init(&z, 10, INFINITY) < 0);
  CHECK(zipf_init(&z, 10, NAN) < 0);
  /* A huge range samples in range (no table is ever built). */
  CHECK(zipf_init(&z, UINT64_C(1) << 32, 0.9) == 0);
  struct rng r;
  rng_seed(&r, 7);
  for (int i = 0; i < 100000; i++) {
    uint64_t k = zipf_sample(&z, &r);
    if (k < 1 || k > (UINT64_C(1) << 32)) {
      failures++;
      break;
    }
  }
  test_bijection();
  if (failures) {
    fprintf(stderr, "test_simvm_zipf: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_simvm_zipf: ok\n");
  return 0;
}
