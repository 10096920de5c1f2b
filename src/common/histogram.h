/* histogram: a lock-free latency histogram with log-linear buckets (8 linear
 * sub-buckets per power of two, so any percentile is within 12.5% of the true
 * value), fixed size, recorded with one atomic add.  Values are nanoseconds. */
#ifndef FERRY_HISTOGRAM_H
#define FERRY_HISTOGRAM_H

#include <stdatomic.h>
#include <stdint.h>

#define HISTOGRAM_SUB_BITS 3
#define HISTOGRAM_BUCKETS (64 << HISTOGRAM_SUB_BITS)

struct histogram {
  _Atomic uint64_t counts[HISTOGRAM_BUCKETS];
  _Atomic uint64_t total;
  _Atomic uint64_t sum;       /* sum of values, for the mean */
  _Atomic uint64_t max;
};

void histogram_reset(struct histogram *h);
void histogram_record(struct histogram *h, uint64_t value);
/* Value at or below which fraction q (0..1) of samples lie; 0 if empty.
 * Returns the upper bound of the bucket that holds it. */
uint64_t histogram_percentile(const struct histogram *h, double q);
uint64_t histogram_count(const struct histogram *h);
/* dst = a - b, bucket by bucket (a later snapshot minus an earlier one). */
void histogram_diff(struct histogram *dst, const struct histogram *a, const struct histogram *b);
void histogram_copy(struct histogram *dst, const struct histogram *src);

#endif
