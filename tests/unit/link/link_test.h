/* link_test: small helpers shared by the unit tests of src/link: a
 * deterministic byte generator, temp directories. */
#ifndef FERRY_LINK_TEST_H
#define FERRY_LINK_TEST_H

#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <string.h>
#include <unistd.h>

/* Incompressible bytes from seed. */
static inline void fill_random(uint8_t *buf, size_t len, uint64_t seed)
{
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
  for (size_t i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    buf[i] = (uint8_t)(x >> 24);
  }
}

/* Compressible bytes (runs and a slow ramp) from seed. */
static inline void fill_pattern(uint8_t *buf, size_t len, uint64_t seed)
{
  for (size_t i = 0; i < len; i++)
    buf[i] = (uint8_t)(seed + i / 97 + ((i & 255) < 16 ? i : 0));
}

static inline int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
  (void)st;
  (void)flag;
  (void)ftw;
  return remove(path);
}

/* A new empty directory under $TMPDIR (or /tmp); exits on failure. */
static inline char *make_tmpdir(const char *what)
{
  const char *base = getenv("TMPDIR");
  char *p;
  if (asprintf(&p, "%s/ferry-%s-XXXXXX", base && *base ? base : "/tmp", what) < 0 || !mkdtemp(p)) {
    perror("mkdtemp");
    exit(1);
  }
  return p;
}

static inline void remove_tree(char *path)
{
  nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
  free(path);
}

#endif
