/* parse: ferry-wan's durations and rates (the contract is in wan.h).
 *
 * The number part is checked by hand before strtod sees it, so "0x10ms",
 * "inf", "1e3ms", " 5ms" and "-5ms" are refused rather than half-parsed.
 * Results are rounded to whole nanoseconds / bits. */
#include "tools/wan/wan.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/util.h"

/* Length of a leading "123", "1.5" or ".5" in s (0 if none); *value is
 * its value. */
static size_t parse_number(const char *s, double *value)
{
  size_t n = strspn(s, "0123456789.");
  if (n == 0 || n > 32)
    return 0;
  const char *dot = memchr(s, '.', n);
  if (dot && memchr(dot + 1, '.', n - (size_t)(dot - s) - 1))
    return 0;                             /* two dots */
  if (n == 1 && dot)
    return 0;                             /* "." alone */
  char buf[40];
  memcpy(buf, s, n);
  buf[n] = '\0';
  *value = strtod(buf, NULL);
  return n;
}

/* Value v times mult, rounded, into *out if it is at most max. */
static int scale(double v, double mult, uint64_t max, uint64_t *out)
{
  double x = v * mult;
  if (!isfinite(x) || x > (double)max)
    return -ERANGE;
  *out = (uint64_t)llround(x);
  return 0;
}

int wan_parse_duration(const char *s, uint64_t max_ns, uint64_t *ns)
{
  static const struct { const char *unit; double mult; } units[] = {
    { "ns", 1 }, { "us", 1e3 }, { "ms", 1e6 }, { "s", 1e9 }, { "min", 60e9 },
  };
  if (!s)
    return -EINVAL;
  double v;
  size_t n = parse_number(s, &v);
  if (n == 0)
    return -EINVAL;
  if (s[n] == '\0')                       /* a bare number: only 0 needs no unit */
    return v == 0 ? (*ns = 0, 0) : -EINVAL;
  for (size_t i = 0; i < ARRAY_SIZE(units); i++)
    if (strcmp(s + n, units[i].unit) == 0)
      return scale(v, units[i].mult, max_ns, ns);
  return -EINVAL;
}

/* Strips a trailing "/s" (case-insensitive) from buf. */
static void strip_per_second(char *buf)
{
  size_t n = strlen(buf);
  if (n >= 2 && strcasecmp(buf + n - 2, "/s") == 0)
    buf[n - 2] = '\0';
}

int wan_parse_rate(const char *s, uint64_t *bps)
{
  static const struct { const char *unit; double mult; } bit_units[] = {
    { "", 1 }, { "bit", 1 }, { "kbit", 1e3 }, { "mbit", 1e6 }, { "gbit", 1e9 },
    { "tbit", 1e12 },
  };
  static const struct { const char *unit; int shift; } byte_units[] = {
    { "b", 0 },
    { "k", 10 }, { "kb", 10 }, { "kib", 10 },
    { "m", 20 }, { "mb", 20 }, { "mib", 20 },
    { "g", 30 }, { "gb", 30 }, { "gib", 30 },
    { "t", 40 }, { "tb", 40 }, { "tib", 40 },
  };
  if (!s || strlen(s) > 48)
    return -EINVAL;
  double v;
  size_t n = parse_number(s, &v);
  if (n == 0)
    return -EINVAL;
  char unit[64];
  snprintf(unit, sizeof unit, "%s", s + n);
  if (unit[0] && strcmp(unit, "/s") != 0)   /* "100/s" is not a unit */
    strip_per_second(unit);
  double mult = -1;
  for (size_t i = 0; i < ARRAY_SIZE(bit_units) && mult < 0; i++)
    if (strcasecmp(unit, bit_units[i].unit) == 0)
      mult = bit_units[i].mult;
  for (size_t i = 0; i < ARRAY_SIZE(byte_units) && mult < 0; i++)
    if (strcasecmp(unit, byte_units[i].unit) == 0)
      mult = 8 * ldexp(1, byte_units[i].shift);
  if (mult < 0)
    return -EINVAL;
  uint64_t bits;
  int r = scale(v, mult, WAN_RATE_MAX_BPS, &bits);
  if (r < 0)
    return r;
  if (bits == 0 && v != 0)
    return -ERANGE;                       /* rounded down to "unlimited" */
  if (bits != 0 && bits < WAN_RATE_MIN_BPS)
    return -ERANGE;
  *bps = bits;
  return 0;
}

void wan_format_duration(uint64_t ns, char *buf, size_t len)
{
  static const struct { const char *unit; uint64_t div; } units[] = {
    { "s", NS_PER_S }, { "ms", NS_PER_MS }, { "us", 1000 },
  };
  if (ns == 0) {
    snprintf(buf, len, "0");
    return;
  }
  for (size_t i = 0; i < ARRAY_SIZE(units); i++) {
    if (ns % units[i].div == 0) {
      snprintf(buf, len, "%llu%s", (unsigned long long)(ns / units[i].div), units[i].unit);
      return;
    }
  }
  snprintf(buf, len, "%lluns", (unsigned long long)ns);
}

void wan_format_rate(uint64_t bps, char *buf, size_t len)
{
  static const struct { const char *unit; uint64_t div; } units[] = {
    { "tbit", 1000000000000ull }, { "gbit", 1000000000ull }, { "mbit", 1000000ull },
    { "kbit", 1000ull },
  };
  if (bps == 0) {
    snprintf(buf, len, "unlimited");
    return;
  }
  for (size_t i = 0; i < ARRAY_SIZE(units); i++) {
    if (bps % units[i].div == 0) {
      snprintf(buf, len, "%llu%s", (unsigned long long)(bps / units[i].div), units[i].unit);
      return;
    }
  }
  snprintf(buf, len, "%llubit", (unsigned long long)bps);
}
