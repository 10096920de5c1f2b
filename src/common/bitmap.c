/* bitmap: see bitmap.h. */
#include "common/bitmap.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int bitmap_init(struct bitmap *b, uint64_t nbits)
{
  b->nbits = nbits;
  b->nwords = (nbits + 63) / 64;
  b->words = calloc(b->nwords ? b->nwords : 1, sizeof *b->words);
  if (!b->words) {
    errno = ENOMEM;
    return -1;
  }
  return 0;
}

void bitmap_free(struct bitmap *b)
{
  free(b->words);
  b->words = NULL;
  b->nbits = b->nwords = 0;
}

void bitmap_set_range(struct bitmap *b, uint64_t first, uint64_t count)
{
  uint64_t end = first + count;
  if (end > b->nbits)
    end = b->nbits;
  for (uint64_t i = first; i < end;) {
    if ((i & 63) == 0 && end - i >= 64) {
      atomic_store(&b->words[i >> 6], UINT64_MAX);
      i += 64;
    } else {
      bitmap_set(b, i);
      i++;
    }
  }
}

void bitmap_clear_all(struct bitmap *b)
{
  for (uint64_t w = 0; w < b->nwords; w++)
    atomic_store_explicit(&b->words[w], 0, memory_order_relaxed);
  atomic_thread_fence(memory_order_seq_cst);
}

void bitmap_set_all(struct bitmap *b)
{
  if (b->nbits == 0)
    return;
  for (uint64_t w = 0; w < b->nwords; w++)
    atomic_store_explicit(&b->words[w], UINT64_MAX, memory_order_relaxed);
  unsigned tail = b->nbits & 63;
  if (tail)
    atomic_store(&b->words[b->nwords - 1], (UINT64_C(1) << tail) - 1);
  atomic_thread_fence(memory_order_seq_cst);
}

uint64_t bitmap_count(const struct bitmap *b)
{
  uint64_t n = 0;
  for (uint64_t w = 0; w < b->nwords; w++)
    n += __builtin_popcountll(atomic_load_explicit(&b->words[w], memory_order_relaxed));
  return n;
}

uint64_t bitmap_next(const struct bitmap *b, uint64_t from, bool value)
{
  if (from >= b->nbits)
    return b->nbits;
  uint64_t w = from >> 6;
  uint64_t word = atomic_load_explicit(&b->words[w], memory_order_relaxed);
  if (!value)
    word = ~word;
  word &= UINT64_MAX << (from & 63);
  for (;;) {
    if (word) {
      uint64_t i = (w << 6) + __builtin_ctzll(word);
      return i < b->nbits ? i : b->nbits;
    }
    if (++w >= b->nwords)
      return b->nbits;
    word = atomic_load_explicit(&b->words[w], memory_order_relaxed);
    if (!value)
      word = ~word;
  }
}

void bitmap_copy(struct bitmap *dst, const struct bitmap *src)
{
  for (uint64_t w = 0; w < src->nwords && w < dst->nwords; w++)
    atomic_store_explicit(&dst->words[w],
                          atomic_load_explicit(&src->words[w], memory_order_relaxed),
                          memory_order_relaxed);
  atomic_thread_fence(memory_order_seq_cst);
}
