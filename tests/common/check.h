/* check: the one assertion macro of ferry's C unit tests.  A failed CHECK
 * prints where and what, counts, and lets the test go on so one run shows
 * every failure; main() ends with check_exit(). */
#ifndef FERRY_TEST_CHECK_H
#define FERRY_TEST_CHECK_H

#include <stdio.h>

static int failures;

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      failures++;                                                            \
    }                                                                        \
  } while (0)

#endif
