/* bitmap: a fixed-size bit array whose bits may be set and tested by many
 * threads at once without a lock (each word is an atomic uint64_t).
 * Clearing and whole-map operations need the caller's own exclusion. */
#ifndef FERRY_BITMAP_H
#define FERRY_BITMAP_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

struct bitmap {
  uint64_t nbits;            /* number of usable bits */
  uint64_t nwords;           /* DIV_ROUND_UP(nbits, 64) */
  _Atomic uint64_t *words;   /* bits beyond nbits are always 0 */
};

int bitmap_init(struct bitmap *b, uint64_t nbits);   /* all clear; -1 on ENOMEM */
void bitmap_free(struct bitmap *b);

static inline bool bitmap_test(const struct bitmap *b, uint64_t i)
{
  return (atomic_load_explicit(&b->words[i >> 6], memory_order_acquire) >> (i & 63)) & 1;
}

/* Sets bit i; returns its previous value. */
static inline bool bitmap_set(struct bitmap *b, uint64_t i)
{
  uint64_t mask = UINT64_C(1) << (i & 63);
  if (atomic_load_explicit(&b->words[i >> 6], memory_order_relaxed) & mask)
    return true;
  return atomic_fetch_or(&b->words[i >> 6], mask) & mask;
}

static inline void bitmap_clear(struct bitmap *b, uint64_t i)
{
  atomic_fetch_and(&b->words[i >> 6], ~(UINT64_C(1) << (i & 63)));
}

/* Sets bits [first, first + count). */
void bitmap_set_range(struct bitmap *b, uint64_t first, uint64_t count);
void bitmap_clear_all(struct bitmap *b);
void bitmap_set_all(struct bitmap *b);
uint64_t bitmap_count(const struct bitmap *b);
/* Index of the first bit at or after from with the given value, or nbits. */
uint64_t bitmap_next(const struct bitmap *b, uint64_t from, bool value);
/* Copies src into dst (same nbits). */
void bitmap_copy(struct bitmap *dst, const struct bitmap *src);

#endif
