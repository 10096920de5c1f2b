/* test_histogram: checks that src/common/histogram.c keeps its promise: any
 * percentile it reports is at or above the true value and within 12.5% of it
 * (it reports the upper bound of a bucket, capped at the max seen), for
 * small exact values, every power-of-two edge, random log-spread samples and
 * the extremes of uint64_t.  Also count, copy, diff and reset. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/histogram.h"

#include "check.h"

static int cmp_u64(const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* The true q-percentile by the histogram's own rank rule: the smallest value
 * with at least round(q * n) samples (at least 1) at or below it. */
static uint64_t true_percentile(const uint64_t *sorted, size_t n, double q)
{
  uint64_t rank = (uint64_t)(q * (double)n + 0.5);
  if (rank == 0)
    rank = 1;
  if (rank > n)
    rank = n;
  return sorted[rank - 1];
}

/* got must lie in [want, want * 1.125]. */
static void within_bound(uint64_t got, uint64_t want, const char *what, double q)
{
  long double hi = (long double)want * 1.125L;
  if (got < want || (long double)got > hi) {
    fprintf(stderr, "%s: p%g = %llu, true %llu (allowed %llu..%.0Lf)\n", what, q * 100,
            (unsigned long long)got, (unsigned long long)want, (unsigned long long)want, hi);
    failures++;
  }
}

static void check_samples(const char *what, uint64_t *v, size_t n)
{
  static struct histogram h;
  histogram_reset(&h);
  for (size_t i = 0; i < n; i++)
    histogram_record(&h, v[i]);
  CHECK(histogram_count(&h) == n);
  qsort(v, n, sizeof *v, cmp_u64);
  static const double qs[] = { 0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0 };
  for (size_t k = 0; k < sizeof qs / sizeof qs[0]; k++)
    within_bound(histogram_percentile(&h, qs[k]), true_percentile(v, n, qs[k]), what, qs[k]);
  /* p100 is the max exactly (the bucket bound is capped at the max). */
  CHECK(histogram_percentile(&h, 1.0) == v[n - 1]);
  CHECK(atomic_load(&h.max) == v[n - 1]);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void)
{
  /* xorshift64*: deterministic, so a failure reproduces */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545f4914f6cdd1dull;
}

int main(void)
{
  static struct histogram h;
  histogram_reset(&h);
  CHECK(histogram_count(&h) == 0);
  CHECK(histogram_percentile(&h, 0.5) == 0);  /* empty */
  CHECK(histogram_percentile(&h, 1.0) == 0);

  /* One sample: every percentile is that sample, exactly (capped at max). */
  static const uint64_t singles[] = { 0, 1, 7, 8, 9, 15, 16, 17, 1000, 123456789, UINT64_MAX };
  for (size_t i = 0; i < sizeof singles / sizeof singles[0]; i++) {
    histogram_reset(&h);
    histogram_record(&h, singles[i]);
    CHECK(histogram_count(&h) == 1);
    CHECK(histogram_percentile(&h, 0.5) == singles[i]);
    CHECK(histogram_percentile(&h, 0.999) == singles[i]);
  }

  /* Small values (below 8) are exact. */
  histogram_reset(&h);
  for (uint64_t v = 0; v < 8; v++)
    histogram_record(&h, v);
  CHECK(histogram_percentile(&h, 0.125) == 0);
  CHECK(histogram_percentile(&h, 0.5) == 3);
  CHECK(histogram_percentile(&h, 1.0) == 7);

  /* Two populations: the percentile is the bound of one, never in between. */
  histogram_reset(&h);
  for (int i = 0; i < 900; i++)
    histogram_record(&h, 1000);
  for (int i = 0; i < 100; i++)
    histogram_record(&h, 1000000);
  within_bound(histogram_percentile(&h, 0.5), 1000, "two populations", 0.5);
  within_bound(histogram_percentile(&h, 0.9), 1000, "two populations", 0.9);
  within_bound(histogram_percentile(&h, 0.95), 1000000, "two populations", 0.95);
  CHECK(histogram_percentile(&h, 0.999) == 1000000);

  /* Every value around every power of two: each alone, then all together. */
  {
    size_t n = 0;
    uint64_t *v = malloc(64 * 5 * sizeof *v);
    for (int e = 0; e < 64; e++) {
      uint64_t p = UINT64_C(1) << e;
      uint64_t cand[5] = { p - 1, p, p + 1, p + p / 16, p + p / 2 };
      for (int k = 0; k < 5; k++) {
        if (cand[k] == 0 && e > 0)
          continue;
        histogram_reset(&h);
        histogram_record(&h, cand[k]);
        histogram_record(&h, cand[k]);
        CHECK(histogram_percentile(&h, 0.5) == cand[k]);  /* capped at max */
        v[n++] = cand[k];
      }
    }
    check_samples("powers of two", v, n);
    free(v);
  }

  /* Random samples spread over many orders of magnitude (latencies in ns). */
  for (int round = 0; round < 20; round++) {
    size_t n = 1 + (size_t)(rng() % 20000);
    uint64_t *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++) {
      unsigned bits = 1 + (unsigned)(rng() % (round < 10 ? 40 : 64));
      v[i] = bits >= 64 ? rng() : rng() & ((UINT64_C(1) << bits) - 1);
    }
    check_samples("random", v, n);
    free(v);
  }

  /* Uniform latencies 1..100000 ns. */
  {
    size_t n = 100000;
    uint64_t *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++)
      v[i] = i + 1;
    check_samples("uniform", v, n);
    free(v);
  }

  /* copy, diff (a window = later snapshot minus earlier one), reset */
  {
    static struct histogram a, b, d;
    histogram_reset(&a);
    for (int i = 0; i < 100; i++)
      histogram_record(&a, 500);
    histogram_copy(&b, &a);
    CHECK(histogram_count(&b) == 100);
    CHECK(histogram_percentile(&b, 0.5) == histogram_percentile(&a, 0.5));
    for (int i = 0; i < 50; i++)
      histogram_record(&a, 80000);
    histogram_diff(&d, &a, &b);
    CHECK(histogram_count(&d) == 50);
    within_bound(histogram_percentile(&d, 0.5), 80000, "diff", 0.5);
    within_bound(histogram_percentile(&d, 0.01), 80000, "diff", 0.01);
    CHECK(atomic_load(&d.sum) == 50 * 80000ull);
    histogram_reset(&a);
    CHECK(histogram_count(&a) == 0 && histogram_percentile(&a, 0.99) == 0);
  }

  if (failures) {
    fprintf(stderr, "test_histogram: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_histogram: ok\n");
  return 0;
}
