/* workload: see workload.h for the spec. */
#include "vm/simvm/workload.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

#define KNOWN_KEYS "write, bs, iops, rate, zipf, qd, seed, disks"

void workload_default(struct workload *w)
{
  *w = (struct workload){ .write_pct = 70, .bs = 4096, .iops = 500, .zipf = 0.9, .qd = 4,
                          .all_disks = true };
}

static int fail(char *err, size_t errlen, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  int n = snprintf(err, errlen, "workload: ");
  if (n >= 0 && (size_t)n < errlen)
    vsnprintf(err + n, errlen - n, fmt, ap);
  va_end(ap);
  errno = EINVAL;
  return -1;
}

/* A decimal integer of digits only (no sign, no spaces, no 0x). */
static int parse_uint(const char *s, uint64_t max, uint64_t *out)
{
  if (!*s || strspn(s, "0123456789") != strlen(s))
    return -1;
  errno = 0;
  unsigned long long v = strtoull(s, NULL, 10);
  if (errno || v > max)
    return -1;
  *out = v;
  return 0;
}

static int parse_disks(const char *v, struct workload *w, char *err, size_t errlen)
{
  if (strcmp(v, "all") == 0) {
    w->all_disks = true;
    w->ndisks = 0;
    return 0;
  }
  w->all_disks = false;
  w->ndisks = 0;
  const char *p = v;
  for (;;) {
    size_t n = strcspn(p, "+");
    char name[SIM_NAME_MAX + 2];
    if (n == 0 || n > SIM_NAME_MAX)
      return fail(err, errlen, "disks='%.80s': want 'all' or disk names joined by '+'", v);
    memcpy(name, p, n);
    name[n] = '\0';
    if (!name_is_valid(name))
      return fail(err, errlen, "disks: '%s' is not a valid disk name", name);
    for (unsigned i = 0; i < w->ndisks; i++)
      if (strcmp(w->disks[i], name) == 0)
        return fail(err, errlen, "disks: '%s' given twice", name);
    if (w->ndisks == SIM_MAX_DISKS)
      return fail(err, errlen, "disks: more than %d names", SIM_MAX_DISKS);
    memcpy(w->disks[w->ndisks++], name, n + 1);
    if (!p[n])
      return 0;
    p += n + 1;
  }
}

static int parse_item(const char *key, const char *v, struct workload *w, char *err,
                      size_t errlen)
{
  uint64_t n;
  if (strcmp(key, "write") == 0) {
    if (parse_uint(v, 100, &n) < 0)
      return fail(err, errlen, "write='%.32s': want an integer percent 0-100", v);
    w->write_pct = (unsigned)n;
  } else if (strcmp(key, "bs") == 0) {
    if (parse_size(v, &n) < 0 || n == 0 || n % 4096 || n > SIM_WL_MAX_BS)
      return fail(err, errlen, "bs='%.32s': want a multiple of 4K from 4K to 1M", v);
    w->bs = (uint32_t)n;
  } else if (strcmp(key, "iops") == 0) {
    if (parse_uint(v, SIM_WL_MAX_IOPS, &n) < 0)
      return fail(err, errlen, "iops='%.32s': want an integer 0-%u (0 = as fast as possible)",
                  v, SIM_WL_MAX_IOPS);
    w->iops = n;
  } else if (strcmp(key, "rate") == 0) {
    if (parse_rate(v, &n) < 0 || n > (UINT64_C(1) << 40))
      return fail(err, errlen, "rate='%.32s': want bytes per second such as 20M or 20M/s "
                  "(0 = unlimited)", v);
    w->rate = n;
    w->rate_set = true;
  } else if (strcmp(key, "zipf") == 0) {
    char *end;
    errno = 0;
    double z = strtod(v, &end);
    /* digits and a point only: strtod would also take "inf", "nan", "0x1p3". */
    if (!*v || *end || errno || strspn(v, "0123456789.") != strlen(v) || !isfinite(z) || z < 0 ||
        z > SIM_WL_MAX_ZIPF)
      return fail(err, errlen, "zipf='%.32s': want a number from 0 (uniform) to %g", v,
                  SIM_WL_MAX_ZIPF);
    w->zipf = z;
  } else if (strcmp(key, "qd") == 0) {
    if (parse_uint(v, SIM_WL_MAX_QD, &n) < 0 || n == 0)
      return fail(err, errlen, "qd='%.32s': want an integer 1-%d", v, SIM_WL_MAX_QD);
    w->qd = (unsigned)n;
  } else if (strcmp(key, "seed") == 0) {
    if (parse_uint(v, UINT64_MAX, &n) < 0)
      return fail(err, errlen, "seed='%.32s': want a decimal integer", v);
    w->seed = n;
    w->has_seed = true;
  } else if (strcmp(key, "disks") == 0) {
    return parse_disks(v, w, err, errlen);
  } else {
    return fail(err, errlen, "unknown key '%.32s' (known: " KNOWN_KEYS ")", key);
  }
  return 0;
}

int workload_parse(const char *spec, struct workload *out, char *err, size_t errlen)
{
  struct workload w;
  workload_default(&w);
  if (!spec)
    return fail(err, errlen, "no spec");
  size_t len = strlen(spec);
  if (len >= SIM_WL_SPEC_MAX)
    return fail(err, errlen, "spec longer than %d bytes", SIM_WL_SPEC_MAX - 1);
  char buf[SIM_WL_SPEC_MAX];
  memcpy(buf, spec, len + 1);
  bool seen_iops = false;
  unsigned seen = 0;   /* bit per key, for duplicates */
  static const char *const keys[] = { "write", "bs", "iops", "rate", "zipf", "qd", "seed",
                                      "disks" };
  char *p = buf;
  while (len > 0) {
    char *item = p;
    size_t n = strcspn(p, ",");
    bool last = p[n] == '\0';
    p[n] = '\0';
    if (n == 0)
      return fail(err, errlen, "empty item in '%.200s' (items are key=value, comma-separated)",
                  spec);
    for (char *c = item; *c; c++)
      if (!isgraph((unsigned char)*c))
        return fail(err, errlen, "'%.200s': spaces and control characters are not allowed",
                    spec);
    char *eq = strchr(item, '=');
    if (!eq || eq == item || !eq[1])
      return fail(err, errlen, "'%.64s' is not key=value", item);
    *eq = '\0';
    for (unsigned k = 0; k < ARRAY_SIZE(keys); k++) {
      if (strcmp(item, keys[k]) == 0) {
        if (seen & (1u << k))
          return fail(err, errlen, "'%s' given twice", item);
        seen |= 1u << k;
      }
    }
    if (parse_item(item, eq + 1, &w, err, errlen) < 0)
      return -1;
    if (strcmp(item, "iops") == 0)
      seen_iops = true;
    if (last)
      break;
    p += n + 1;
    if (!*p)
      return fail(err, errlen, "trailing comma in '%.200s'", spec);
  }
  if (seen_iops && w.rate_set)
    return fail(err, errlen, "iops and rate are alternatives: give one of them");
  if (w.rate_set)
    w.iops = 0;
  if ((uint64_t)w.qd * w.bs > SIM_WL_MAX_BYTES)
    return fail(err, errlen, "qd=%u with bs=%u is %llu MiB in flight, more than %u MiB", w.qd,
                w.bs, (unsigned long long)w.qd * w.bs >> 20, SIM_WL_MAX_BYTES >> 20);
  *out = w;
  return 0;
}

static void format_bytes(uint64_t v, char *buf, size_t len)
{
  if (v && v % (1u << 30) == 0)
    snprintf(buf, len, "%lluG", (unsigned long long)(v >> 30));
  else if (v && v % (1u << 20) == 0)
    snprintf(buf, len, "%lluM", (unsigned long long)(v >> 20));
  else if (v && v % 1024 == 0)
    snprintf(buf, len, "%lluk", (unsigned long long)(v >> 10));
  else
    snprintf(buf, len, "%llu", (unsigned long long)v);
}

void workload_format(const struct workload *w, char *buf, size_t len)
{
  char bs[32], rate[32];
  format_bytes(w->bs, bs, sizeof bs);
  int n;
  if (w->rate_set) {
    format_bytes(w->rate, rate, sizeof rate);
    n = snprintf(buf, len, "write=%u,bs=%s,rate=%s", w->write_pct, bs, rate);
  } else {
    n = snprintf(buf, len, "write=%u,bs=%s,iops=%llu", w->write_pct, bs,
                 (unsigned long long)w->iops);
  }
  /* The shortest plain decimal that reads back as the same double (the
   * parser takes digits and a point only: no exponent). */
  char z[40];
  for (int prec = 0; prec <= 17; prec++) {
    snprintf(z, sizeof z, "%.*f", prec, w->zipf);
    if (strtod(z, NULL) == w->zipf)
      break;
  }
  if (n >= 0 && (size_t)n < len)
    n += snprintf(buf + n, len - n, ",zipf=%s,qd=%u", z, w->qd);
  if (w->has_seed && n >= 0 && (size_t)n < len)
    n += snprintf(buf + n, len - n, ",seed=%llu", (unsigned long long)w->seed);
  if (n >= 0 && (size_t)n < len)
    n += snprintf(buf + n, len - n, ",disks=%s", w->all_disks ? "all" : "");
  for (unsigned i = 0; !w->all_disks && i < w->ndisks && n >= 0 && (size_t)n < len; i++)
    n += snprintf(buf + n, len - n, "%s%s", i ? "+" : "", w->disks[i]);
}

double workload_target_iops(const struct workload *w)
{
  if (w->rate_set)
    return w->rate ? (double)w->rate / w->bs : 0;
  return (double)w->iops;
}

bool workload_uses_disk(const struct workload *w, const char *name)
{
  if (w->all_disks)
    return true;
  for (unsigned i = 0; i < w->ndisks; i++)
    if (strcmp(w->disks[i], name) == 0)
      return true;
  return false;
}
