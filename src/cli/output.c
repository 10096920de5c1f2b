/* output: how `ferry` shows answers to people (see cli.h): aligned tables,
 * sizes through format_size(), and the multi-line `disk show` report.
 * Only table mode comes here; -o json prints the API's answer untouched.
 * Every accessor tolerates a missing member, so an older or newer ferryd
 * shows "-" or 0 instead of crashing the client. */
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/util.h"

/* ---- JSON accessors ---- */

uint64_t j_u64(const json_t *obj, const char *key)
{
  const json_t *v = json_object_get(obj, key);
  if (json_is_integer(v) && json_integer_value(v) >= 0)
    return (uint64_t)json_integer_value(v);
  if (json_is_real(v) && json_real_value(v) >= 0)
    return (uint64_t)json_real_value(v);
  return 0;
}

double j_dbl(const json_t *obj, const char *key)
{
  const json_t *v = json_object_get(obj, key);
  return json_is_number(v) ? json_number_value(v) : 0.0;
}

bool j_bool(const json_t *obj, const char *key)
{
  return json_is_true(json_object_get(obj, key));
}

const char *j_str(const json_t *obj, const char *key)
{
  const char *s = json_string_value(json_object_get(obj, key));
  return s ? s : "-";
}

const char *fmt_bytes(uint64_t bytes, char *buf, size_t len)
{
  format_size(bytes, buf, len);
  return buf;
}

const char *fmt_rate(double bps, char *buf, size_t len)
{
  char size[24];
  format_size(bps > 0 ? (uint64_t)llround(bps) : 0, size, sizeof size);
  snprintf(buf, len, "%s/s", size);
  return buf;
}

/* ---- tables ---- */

struct table {
  unsigned ncols;
  char **cells;           /* row-major; row 0 is the header */
  size_t nrows, cap;      /* rows including the header */
  bool right[16];         /* column is right-aligned */
};

struct table *table_new(unsigned ncols, const char *const *headers)
{
  struct table *t = calloc(1, sizeof *t);
  if (!t)
    abort();
  t->ncols = MIN(ncols, 16u);
  table_add(t, headers);
  return t;
}

void table_align_right(struct table *t, unsigned col)
{
  if (col < t->ncols)
    t->right[col] = true;
}

void table_add(struct table *t, const char *const *cells)
{
  if (t->nrows == t->cap) {
    t->cap = t->cap ? t->cap * 2 : 16;
    t->cells = realloc(t->cells, t->cap * t->ncols * sizeof *t->cells);
    if (!t->cells)
      abort();
  }
  for (unsigned i = 0; i < t->ncols; i++) {
    char *s = strdup(cells[i] ? cells[i] : "");
    if (!s)
      abort();
    t->cells[t->nrows * t->ncols + i] = s;
  }
  t->nrows++;
}

void table_print(const struct table *t, FILE *f, const char *indent)
{
  size_t width[16] = { 0 };
  for (size_t r = 0; r < t->nrows; r++)
    for (unsigned i = 0; i < t->ncols; i++)
      width[i] = MAX(width[i], strlen(t->cells[r * t->ncols + i]));
  for (size_t r = 0; r < t->nrows; r++) {
    fputs(indent ? indent : "", f);
    for (unsigned i = 0; i < t->ncols; i++) {
      const char *s = t->cells[r * t->ncols + i];
      bool last = i + 1 == t->ncols;
      if (t->right[i])
        fprintf(f, "%*s", (int)width[i], s);
      else if (last)
        fputs(s, f);   /* no trailing blanks */
      else
        fprintf(f, "%-*s", (int)width[i], s);
      if (!last)
        fputs("  ", f);
    }
    fputc('\n', f);
  }
}

void table_free(struct table *t)
{
  if (!t)
    return;
  for (size_t i = 0; i < t->nrows * t->ncols; i++)
    free(t->cells[i]);
  free(t->cells);
  free(t);
}

/* ---- disk list ---- */

void print_disk_list(const json_t *answer)
{
  const json_t *disks = json_object_get(answer, "disks");
  if (json_array_size(disks) == 0) {
    printf("no disks\n");
    return;
  }
  static const char *const head[] = { "NAME", "SIZE", "ALLOCATED", "DIRTY", "CLIENTS",
                                      "IOPS(r/w)", "NBD-URI" };
  struct table *t = table_new(7, head);
  for (unsigned i = 1; i <= 4; i++)
    table_align_right(t, i);
  size_t i;
  const json_t *d;
  json_array_foreach(disks, i, d) {
    char size[32], alloc[32], dirty[32], clients[16], iops[48];
    const json_t *stats = json_object_get(d, "stats");
    snprintf(clients, sizeof clients, "%" PRIu64, j_u64(d, "clients"));
    if (json_is_object(stats))
      snprintf(iops, sizeof iops, "%.0f/%.0f", j_dbl(stats, "read_iops"),
               j_dbl(stats, "write_iops"));
    else
      snprintf(iops, sizeof iops, "-");
    const char *row[] = { j_str(d, "name"), fmt_bytes(j_u64(d, "size"), size, sizeof size),
                          fmt_bytes(j_u64(d, "allocated_bytes"), alloc, sizeof alloc),
                          fmt_bytes(j_u64(d, "dirty_bytes"), dirty, sizeof dirty), clients, iops,
                          j_str(d, "nbd_uri") };
    table_add(t, row);
  }
  table_print(t, stdout, NULL);
  table_free(t);
}

/* ---- regions (heat) ---- */

void print_regions(const json_t *regions, const char *indent)
{
  static const char *const head[] = { "OFFSET", "LENGTH", "READS", "WRITES", "READ",
                                      "WRITTEN", "READ-HEAT", "WRITE-HEAT" };
  struct table *t = table_new(8, head);
  for (unsigned i = 0; i < 8; i++)
    if (i != 1)
      table_align_right(t, i);
  size_t i;
  const json_t *r;
  json_array_foreach(regions, i, r) {
    char off[24], len[32], reads[24], writes[24], rb[32], wb[32], rh[32], wh[32];
    snprintf(off, sizeof off, "%" PRIu64, j_u64(r, "offset"));
    snprintf(reads, sizeof reads, "%" PRIu64, j_u64(r, "reads"));
    snprintf(writes, sizeof writes, "%" PRIu64, j_u64(r, "writes"));
    snprintf(rh, sizeof rh, "%.1f", j_dbl(r, "read_heat"));
    snprintf(wh, sizeof wh, "%.1f", j_dbl(r, "write_heat"));
    const char *row[] = { off, fmt_bytes(j_u64(r, "length"), len, sizeof len), reads, writes,
                          fmt_bytes(j_u64(r, "read_bytes"), rb, sizeof rb),
                          fmt_bytes(j_u64(r, "write_bytes"), wb, sizeof wb), rh, wh };
    table_add(t, row);
  }
  table_print(t, stdout, indent);
  table_free(t);
}

void print_heat(const json_t *heat)
{
  char rs[32];
  const json_t *top = json_object_get(heat, "top");
  printf("%" PRIu64 " regions of %s, heat half-life %" PRIu64 " s\n", j_u64(heat, "regions"),
         fmt_bytes(j_u64(heat, "region_size"), rs, sizeof rs), j_u64(heat, "half_life_s"));
  if (json_array_size(top) == 0) {
    printf("no IO recorded\n");
    return;
  }
  print_regions(top, NULL);
}

/* ---- dirty map ---- */

void print_dirty(const json_t *dirty, bool swapped)
{
  char gran[32], bytes[32];
  uint64_t gen = j_u64(dirty, "generation");
  if (swapped)
    printf("took dirty map generation %" PRIu64 "; the disk now tracks generation %" PRIu64
           "\n", gen, gen + 1);
  else
    printf("dirty map generation %" PRIu64 "\n", gen);
  printf("%s dirty in %" PRIu64 " region%s of %s\n",
         fmt_bytes(j_u64(dirty, "dirty_bytes"), bytes, sizeof bytes),
         j_u64(dirty, "dirty_regions"), j_u64(dirty, "dirty_regions") == 1 ? "" : "s",
         fmt_bytes(j_u64(dirty, "granularity"), gran, sizeof gran));
  const json_t *extents = json_object_get(dirty, "extents");
  if (json_array_size(extents) == 0)
    return;
  static const char *const head[] = { "OFFSET", "LENGTH", "BYTES" };
  struct table *t = table_new(3, head);
  table_align_right(t, 0);
  table_align_right(t, 2);
  size_t i;
  const json_t *e;
  json_array_foreach(extents, i, e) {
    char off[24], len[32], raw[24];
    snprintf(off, sizeof off, "%" PRIu64, j_u64(e, "offset"));
    snprintf(raw, sizeof raw, "%" PRIu64, j_u64(e, "length"));
    const char *row[] = { off, fmt_bytes(j_u64(e, "length"), len, sizeof len), raw };
    table_add(t, row);
  }
  table_print(t, stdout, NULL);
  table_free(t);
}

/* ---- trace ---- */

void print_trace(const json_t *trace)
{
  const json_t *entries = json_object_get(trace, "entries");
  uint64_t every = j_u64(trace, "sample_every");
  if (every == 0)
    printf("tracing is off\n");
  else if (every == 1)
    printf("every IO is traced\n");
  else
    printf("1 IO in %" PRIu64 " is traced\n", every);
  if (json_array_size(entries) == 0) {
    printf("no IO traced yet\n");
    return;
  }
  static const char *const head[] = { "SEQ", "TIME", "KIND", "OFFSET", "LENGTH", "LATENCY" };
  struct table *t = table_new(6, head);
  table_align_right(t, 0);
  table_align_right(t, 3);
  table_align_right(t, 4);
  table_align_right(t, 5);
  size_t i;
  const json_t *e;
  json_array_foreach(entries, i, e) {
    char seq[24], off[24], len[24], lat[32];
    snprintf(seq, sizeof seq, "%" PRIu64, j_u64(e, "seq"));
    snprintf(off, sizeof off, "%" PRIu64, j_u64(e, "offset"));
    snprintf(len, sizeof len, "%" PRIu64, j_u64(e, "length"));
    snprintf(lat, sizeof lat, "%" PRIu64 " us", j_u64(e, "latency_us"));
    const char *row[] = { seq, j_str(e, "time"), j_str(e, "kind"), off, len, lat };
    table_add(t, row);
  }
  table_print(t, stdout, NULL);
  table_free(t);
}

/* ---- disk show ---- */

static void field(const char *label, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void field(const char *label, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  printf("  %-15s", label);
  vprintf(fmt, ap);
  putchar('\n');
  va_end(ap);
}

static void latency_line(const char *label, const json_t *l)
{
  if (!json_is_object(l))
    return;
  field(label, "%6" PRIu64 " IOs  p50 %" PRIu64 "  p90 %" PRIu64 "  p99 %" PRIu64
        "  p99.9 %" PRIu64 "  max %" PRIu64 " us", j_u64(l, "count"), j_u64(l, "p50"),
        j_u64(l, "p90"), j_u64(l, "p99"), j_u64(l, "p999"), j_u64(l, "max"));
}

void print_disk_show(const json_t *d)
{
  char a[32], b[32], c[32], e[32];
  printf("disk %s\n", j_str(d, "name"));
  field("image:", "%s (%s%s)", j_str(d, "image"),
        j_bool(d, "block_device") ? "block device" : "file",
        j_bool(d, "owned") ? ", created by ferry: rm deletes it" : ", added: rm leaves it");
  field("size:", "%s (%" PRIu64 " bytes)", fmt_bytes(j_u64(d, "size"), a, sizeof a),
        j_u64(d, "size"));
  field("allocated:", "%s", fmt_bytes(j_u64(d, "allocated_bytes"), a, sizeof a));

  const json_t *cbt = json_object_get(d, "cbt");
  field("dirty:", "%s in %" PRIu64 " region%s of %s", fmt_bytes(j_u64(d, "dirty_bytes"), a,
        sizeof a), j_u64(cbt, "dirty_regions"), j_u64(cbt, "dirty_regions") == 1 ? "" : "s",
        fmt_bytes(j_u64(cbt, "granularity"), b, sizeof b));
  if (j_bool(cbt, "enabled"))
    field("cbt:", "%s, generation %" PRIu64, j_str(cbt, "state"), j_u64(cbt, "generation"));
  else
    field("cbt:", "off (ferryd --no-cbt): every region counts as dirty");
  field("clients:", "%" PRIu64, j_u64(d, "clients"));
  field("nbd:", "%s", j_str(d, "nbd_uri"));
  uint64_t limit = j_u64(d, "write_limit_bps");
  if (limit)
    field("write limit:", "%s (writes have waited %" PRIu64 " ms in total)",
          fmt_rate((double)limit, a, sizeof a), j_u64(d, "throttled_ms"));
  else
    field("write limit:", "none");
  uint64_t bp = j_u64(d, "backpressure_limit_bps");
  if (bp)
    field("backpressure:", "%s (set by a migration's write backpressure)",
          fmt_rate((double)bp, a, sizeof a));
  const char *fence = json_string_value(json_object_get(d, "fence"));
  field("authority:", "%s%s", fence ? "fenced, writes refused: " : "this site",
        fence ? fence : "");

  const json_t *st = json_object_get(d, "stats");
  if (!json_is_object(st)) {
    field("stats:", "off (ferryd --no-heat)");
    return;
  }
  field("iops:", "read %.1f  write %.1f  (last minute: read %.1f  write %.1f)",
        j_dbl(st, "read_iops"), j_dbl(st, "write_iops"), j_dbl(st, "read_iops_60s"),
        j_dbl(st, "write_iops_60s"));
  field("throughput:", "read %s  write %s  (last minute: read %s  write %s)",
        fmt_rate(j_dbl(st, "read_bps"), a, sizeof a), fmt_rate(j_dbl(st, "write_bps"), b, sizeof b),
        fmt_rate(j_dbl(st, "read_bps_60s"), c, sizeof c),
        fmt_rate(j_dbl(st, "write_bps_60s"), e, sizeof e));
  const json_t *ops = json_object_get(st, "ops");
  const json_t *bytes = json_object_get(st, "bytes");
  field("ops:", "read %" PRIu64 "  write %" PRIu64 "  trim %" PRIu64 "  zero %" PRIu64
        "  flush %" PRIu64 "  cache %" PRIu64, j_u64(ops, "read"), j_u64(ops, "write"),
        j_u64(ops, "trim"), j_u64(ops, "zero"), j_u64(ops, "flush"), j_u64(ops, "cache"));
  field("bytes:", "read %s  written %s  trimmed %s  zeroed %s",
        fmt_bytes(j_u64(bytes, "read"), a, sizeof a), fmt_bytes(j_u64(bytes, "write"), b, sizeof b),
        fmt_bytes(j_u64(bytes, "trim"), c, sizeof c), fmt_bytes(j_u64(bytes, "zero"), e, sizeof e));
  const json_t *lat = json_object_get(st, "latency_us");
  latency_line("read latency:", json_object_get(lat, "read"));
  latency_line("write latency:", json_object_get(lat, "write"));

  const json_t *heat = json_object_get(d, "heat");
  const json_t *hottest = json_object_get(heat, "hottest");
  if (json_array_size(hottest) == 0) {
    field("hottest:", "no IO yet");
    return;
  }
  printf("  hottest regions (of %" PRIu64 ", %s each):\n", j_u64(heat, "regions"),
         fmt_bytes(j_u64(heat, "region_size"), a, sizeof a));
  print_regions(hottest, "    ");
}
