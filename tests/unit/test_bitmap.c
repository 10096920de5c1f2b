/* test_bitmap: checks src/common/bitmap.c at the boundaries that dirty maps
 * hit: word edges (63/64/65), the tail word past nbits (must stay zero, or
 * counts and "next clean" lie), ranges clamped at the end, empty maps.
 * Every result is compared with a plain bool array as the model. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/bitmap.h"

#include "check.h"

/* The model: a byte per bit. */
static uint64_t model_count(const bool *m, uint64_t n)
{
  uint64_t c = 0;
  for (uint64_t i = 0; i < n; i++)
    c += m[i];
  return c;
}

static uint64_t model_next(const bool *m, uint64_t n, uint64_t from, bool value)
{
  for (uint64_t i = from; i < n; i++)
    if (m[i] == value)
      return i;
  return n;
}

/* Compares every observable of b with the model; returns false on the first
 * difference (after reporting it). */
static bool same(const struct bitmap *b, const bool *m, const char *what)
{
  uint64_t n = b->nbits;
  for (uint64_t i = 0; i < n; i++) {
    if (bitmap_test(b, i) != m[i]) {
      fprintf(stderr, "%s: nbits %llu: bit %llu is %d, want %d\n", what, (unsigned long long)n,
              (unsigned long long)i, bitmap_test(b, i), m[i]);
      failures++;
      return false;
    }
  }
  if (bitmap_count(b) != model_count(m, n)) {
    fprintf(stderr, "%s: nbits %llu: count %llu, want %llu\n", what, (unsigned long long)n,
            (unsigned long long)bitmap_count(b), (unsigned long long)model_count(m, n));
    failures++;
    return false;
  }
  for (uint64_t from = 0; from <= n + 2; from++) {
    for (int v = 0; v <= 1; v++) {
      uint64_t got = bitmap_next(b, from, v), want = model_next(m, n, from, v);
      if (got != want) {
        fprintf(stderr, "%s: nbits %llu: next(%llu, %d) = %llu, want %llu\n", what,
                (unsigned long long)n, (unsigned long long)from, v, (unsigned long long)got,
                (unsigned long long)want);
        failures++;
        return false;
      }
    }
  }
  /* Bits beyond nbits in the last word are always 0. */
  if (b->nwords && (n & 63)) {
    uint64_t tail = atomic_load(&b->words[b->nwords - 1]) >> (n & 63);
    if (tail) {
      fprintf(stderr, "%s: nbits %llu: bits set past the end\n", what, (unsigned long long)n);
      failures++;
      return false;
    }
  }
  return true;
}

static void test_size(uint64_t n)
{
  struct bitmap b;
  CHECK(bitmap_init(&b, n) == 0);
  CHECK(b.nbits == n);
  CHECK(b.nwords == (n + 63) / 64);
  bool *m = calloc(n + 1, sizeof *m);
  CHECK(m != NULL);
  same(&b, m, "init");
  CHECK(bitmap_next(&b, 0, true) == n);
  CHECK(bitmap_next(&b, n, false) == n);
  CHECK(bitmap_next(&b, UINT64_MAX, true) == n);

  /* set/test/clear at the edges of every word */
  static const uint64_t probes[] = { 0, 1, 62, 63, 64, 65, 126, 127, 128, 129, 191, 192 };
  for (size_t k = 0; k < sizeof probes / sizeof probes[0]; k++) {
    uint64_t i = probes[k];
    if (i >= n)
      continue;
    CHECK(bitmap_set(&b, i) == false);
    CHECK(bitmap_set(&b, i) == true);  /* returns the previous value */
    m[i] = true;
  }
  if (n)
    CHECK(bitmap_set(&b, n - 1) == m[n - 1]);
  if (n)
    m[n - 1] = true;
  same(&b, m, "set probes");
  for (size_t k = 0; k < sizeof probes / sizeof probes[0]; k += 2) {
    if (probes[k] < n) {
      bitmap_clear(&b, probes[k]);
      m[probes[k]] = false;
    }
  }
  same(&b, m, "clear probes");

  bitmap_set_all(&b);
  for (uint64_t i = 0; i < n; i++)
    m[i] = true;
  same(&b, m, "set_all");
  CHECK(bitmap_count(&b) == n);
  CHECK(bitmap_next(&b, 0, false) == n);

  bitmap_clear_all(&b);
  memset(m, 0, n);
  same(&b, m, "clear_all");

  /* set_range over word edges, empty ranges and ranges clamped at nbits */
  static const uint64_t starts[] = { 0, 1, 63, 64, 65, 127, 128 };
  static const uint64_t counts[] = { 0, 1, 2, 63, 64, 65, 129, 1000 };
  for (size_t s = 0; s < sizeof starts / sizeof starts[0]; s++) {
    for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
      bitmap_clear_all(&b);
      memset(m, 0, n);
      uint64_t first = starts[s], count = counts[c];
      bitmap_set_range(&b, first, count);
      for (uint64_t i = first; i < first + count && i < n; i++)
        m[i] = true;
      char what[64];
      snprintf(what, sizeof what, "set_range(%llu, %llu)", (unsigned long long)first,
               (unsigned long long)count);
      if (!same(&b, m, what))
        break;
    }
  }

  /* copy */
  struct bitmap c;
  CHECK(bitmap_init(&c, n) == 0);
  bitmap_clear_all(&b);
  memset(m, 0, n);
  for (uint64_t i = 0; i < n; i += 3) {
    bitmap_set(&b, i);
    m[i] = true;
  }
  bitmap_copy(&c, &b);
  same(&c, m, "copy");
  bitmap_free(&c);
  CHECK(c.words == NULL && c.nbits == 0);

  bitmap_free(&b);
  free(m);
}

int main(void)
{
  static const uint64_t sizes[] = { 0, 1, 2, 63, 64, 65, 127, 128, 129, 130, 191, 192, 193, 1000 };
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
    test_size(sizes[i]);

  /* A large map: sparse bits far apart, found by next() across many empty words. */
  struct bitmap b;
  uint64_t n = 10 * 1000 * 1000 + 7;
  CHECK(bitmap_init(&b, n) == 0);
  bitmap_set(&b, 5);
  bitmap_set(&b, 4 * 1000 * 1000 + 1);
  bitmap_set(&b, n - 1);
  CHECK(bitmap_next(&b, 0, true) == 5);
  CHECK(bitmap_next(&b, 6, true) == 4 * 1000 * 1000 + 1);
  CHECK(bitmap_next(&b, 4 * 1000 * 1000 + 2, true) == n - 1);
  CHECK(bitmap_next(&b, n - 1, false) == n);
  CHECK(bitmap_count(&b) == 3);
  bitmap_set_range(&b, n - 100, 1000);  /* clamped */
  CHECK(bitmap_count(&b) == 3 - 1 + 100);
  CHECK(bitmap_next(&b, n - 100, false) == n);
  bitmap_free(&b);

  if (failures) {
    fprintf(stderr, "test_bitmap: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_bitmap: ok\n");
  return 0;
}
