/* histogram: see histogram.h.
 *
 * Bucket layout: values below 2^SUB_BITS map to themselves; above, the bucket is
 * (exponent << SUB_BITS) | the next SUB_BITS bits below the leading one. */
#include "common/histogram.h"

#include <string.h>

static unsigned bucket_of(uint64_t v)
{
  if (v < (1u << HISTOGRAM_SUB_BITS))
    return (unsigned)v;
  unsigned msb = 63 - __builtin_clzll(v);
  unsigned sub = (unsigned)(v >> (msb - HISTOGRAM_SUB_BITS)) & ((1u << HISTOGRAM_SUB_BITS) - 1);
  return ((msb - HISTOGRAM_SUB_BITS + 1) << HISTOGRAM_SUB_BITS) | sub;
}

static uint64_t bucket_upper(unsigned b)
{
  if (b < (1u << HISTOGRAM_SUB_BITS))
    return b;
  unsigned e = (b >> HISTOGRAM_SUB_BITS) + HISTOGRAM_SUB_BITS - 1;
  uint64_t sub = b & ((1u << HISTOGRAM_SUB_BITS) - 1);
  uint64_t base = (UINT64_C(1) << e) | (sub << (e - HISTOGRAM_SUB_BITS));
  uint64_t width = UINT64_C(1) << (e - HISTOGRAM_SUB_BITS);
  return base + width - 1;
}

void histogram_reset(struct histogram *h)
{
  memset((void *)h, 0, sizeof *h);
}

void histogram_record(struct histogram *h, uint64_t value)
{
  atomic_fetch_add_explicit(&h->counts[bucket_of(value)], 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&h->total, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&h->sum, value, memory_order_relaxed);
  uint64_t m = atomic_load_explicit(&h->max, memory_order_relaxed);
  while (value > m && !atomic_compare_exchange_weak(&h->max, &m, value))
    ;
}

uint64_t histogram_count(const struct histogram *h)
{
  return atomic_load_explicit(&h->total, memory_order_relaxed);
}

uint64_t histogram_percentile(const struct histogram *h, double q)
{
  uint64_t total = 0;
  for (unsigned b = 0; b < HISTOGRAM_BUCKETS; b++)
    total += atomic_load_explicit(&h->counts[b], memory_order_relaxed);
  if (total == 0)
    return 0;
  if (q < 0)
    q = 0;
  if (q > 1)
    q = 1;
  uint64_t rank = (uint64_t)(q * (double)total + 0.5);
  if (rank == 0)
    rank = 1;
  uint64_t seen = 0;
  for (unsigned b = 0; b < HISTOGRAM_BUCKETS; b++) {
    seen += atomic_load_explicit(&h->counts[b], memory_order_relaxed);
    if (seen >= rank) {
      uint64_t up = bucket_upper(b);
      uint64_t m = atomic_load_explicit(&h->max, memory_order_relaxed);
      return (m && up > m) ? m : up;
    }
  }
  return atomic_load_explicit(&h->max, memory_order_relaxed);
}

void histogram_diff(struct histogram *dst, const struct histogram *a, const struct histogram *b)
{
  for (unsigned i = 0; i < HISTOGRAM_BUCKETS; i++)
    atomic_store_explicit(&dst->counts[i],
                          atomic_load(&a->counts[i]) - atomic_load(&b->counts[i]),
                          memory_order_relaxed);
  atomic_store(&dst->total, atomic_load(&a->total) - atomic_load(&b->total));
  atomic_store(&dst->sum, atomic_load(&a->sum) - atomic_load(&b->sum));
  atomic_store(&dst->max, atomic_load(&a->max)); /* max is not windowed; upper bound */
}

void histogram_copy(struct histogram *dst, const struct histogram *src)
{
  for (unsigned i = 0; i < HISTOGRAM_BUCKETS; i++)
    atomic_store_explicit(&dst->counts[i], atomic_load(&src->counts[i]), memory_order_relaxed);
  atomic_store(&dst->total, atomic_load(&src->total));
  atomic_store(&dst->sum, atomic_load(&src->sum));
  atomic_store(&dst->max, atomic_load(&src->max));
}
