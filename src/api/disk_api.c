/* disk_api: the /v1/disks handlers of docs/api.md, and /v1/health.
 *
 * Each handler validates all of its input before it changes anything
 * (unknown fields and query parameters are refused, names checked, sizes and
 * rates parsed), then makes one registry call, and maps its -errno to the
 * error codes of docs/api.md in one place (api_answer_errno).  Answers
 * with status >= 500 are logged once (api_log_server_error).
 *
 * DISK and DIRTY documents are built from one snapshot of the dirty map, so
 * dirty_bytes, dirty_regions and extents agree with each other.
 */
#include "api/api.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "api/http.h"
#include "common/log.h"
#include "common/util.h"
#include "disk/disk.h"
#include "disk/heat.h"
#include "disk/registry.h"
#include "ferryd/nbd_glue.h"
#include "site/site.h"

#define HEAT_TOP_DEFAULT 10
#define HEAT_HOTTEST_IN_DISK 5
#define TRACE_MAX_DEFAULT 256

/* ---- input helpers ---- */

/* The NAME path parameter, validated; NULL with 400 set. */
static const char *path_name(struct http_request *req, struct http_response *resp)
{
  const char *name = http_param(req, 0);
  return api_valid_name(name, resp) ? name : NULL;
}

/* The named disk (a reference), or NULL with 400/404 set. */
static struct disk *path_disk(struct api *a, struct http_request *req,
                              struct http_response *resp)
{
  const char *name = path_name(req, resp);
  if (!name)
    return NULL;
  struct disk *d = registry_get(a->reg, name);
  if (!d)
    http_error(resp, 404, "not_found", "disk '%s' does not exist", name);
  return d;
}

/* ---- documents ---- */

static json_t *region_json(const struct heat_region *r)
{
  return json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:f}",
                   "offset", (json_int_t)r->offset, "length", (json_int_t)r->length,
                   "reads", (json_int_t)r->reads, "writes", (json_int_t)r->writes,
                   "read_bytes", (json_int_t)r->read_bytes,
                   "write_bytes", (json_int_t)r->write_bytes,
                   "read_heat", r->read_heat, "write_heat", r->write_heat);
}

/* Latency in whole microseconds, rounded up so a non-zero time never shows 0. */
static json_int_t ns_to_us(uint64_t ns)
{
  return (json_int_t)((ns + 999) / 1000);
}

static json_t *latency_json(const struct histogram *h)
{
  return json_pack("{s:I, s:I, s:I, s:I, s:I, s:I}",
                   "count", (json_int_t)histogram_count(h),
                   "p50", ns_to_us(histogram_percentile(h, 0.50)),
                   "p90", ns_to_us(histogram_percentile(h, 0.90)),
                   "p99", ns_to_us(histogram_percentile(h, 0.99)),
                   "p999", ns_to_us(histogram_percentile(h, 0.999)),
                   "max", ns_to_us(atomic_load(&h->max)));
}

static json_t *stats_json(struct heat *h)
{
  struct heat_rates r;
  heat_rates(h, &r);
  json_t *ops = json_object(), *bytes = json_object();
  for (int k = 0; k < IO_KINDS; k++) {
    json_object_set_new(ops, io_kind_name(k), json_integer((json_int_t)r.total_ops[k]));
    /* flush and cache move no guest data */
    if (k != IO_FLUSH && k != IO_CACHE)
      json_object_set_new(bytes, io_kind_name(k), json_integer((json_int_t)r.total_bytes[k]));
  }
  return json_pack("{s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:o, s:o, s:{s:o, s:o}}",
                   "read_iops", r.read_iops_1s, "write_iops", r.write_iops_1s,
                   "read_bps", r.read_bps_1s, "write_bps", r.write_bps_1s,
                   "read_iops_60s", r.read_iops_60s, "write_iops_60s", r.write_iops_60s,
                   "read_bps_60s", r.read_bps_60s, "write_bps_60s", r.write_bps_60s,
                   "ops", ops, "bytes", bytes,
                   "latency_us",
                   "read", latency_json(heat_latency(h, IO_READ)),
                   "write", latency_json(heat_latency(h, IO_WRITE)));
}

struct dirty_summary {
  uint64_t regions, bytes;
};

/* Calls fn for each run of set bits, as byte extents cut at the disk size. */
static void dirty_runs(const struct disk_dirty_map *m, uint64_t disk_size,
                       void (*fn)(void *opaque, uint64_t off, uint64_t len), void *opaque)
{
  uint64_t nwords = DIV_ROUND_UP(m->nbits, 64);
  uint64_t run_start = 0;
  bool in_run = false;
  for (uint64_t w = 0; w < nwords; w++) {
    uint64_t word = m->words[w];
    if (!in_run && word == 0)
      continue;
    if (in_run && word == UINT64_MAX && (w + 1) * 64 <= m->nbits)
      continue;
    for (uint64_t b = 0; b < 64; b++) {
      uint64_t i = w * 64 + b;
      if (i >= m->nbits)
        break;
      bool set = (word >> b) & 1;
      if (set && !in_run) {
        in_run = true;
        run_start = i;
      } else if (!set && in_run) {
        in_run = false;
        uint64_t off = run_start * m->granularity;
        uint64_t end = MIN(i * m->granularity, disk_size);
        if (end > off)
          fn(opaque, off, end - off);
      }
    }
  }
  if (in_run) {
    uint64_t off = run_start * m->granularity;
    uint64_t end = MIN(m->nbits * m->granularity, disk_size);
    if (end > off)
      fn(opaque, off, end - off);
  }
}

static void add_extent(void *opaque, uint64_t off, uint64_t len)
{
  json_array_append_new(opaque, json_pack("{s:I, s:I}", "offset", (json_int_t)off,
                                          "length", (json_int_t)len));
}

/* dirty_bytes is regions * granularity capped at the disk size, the same
 * rule as disk_dirty_bytes(), so the API and the disk service agree. */
static struct dirty_summary summarize(const struct disk_dirty_map *m, uint64_t disk_size)
{
  struct dirty_summary s = { 0, 0 };
  uint64_t nwords = DIV_ROUND_UP(m->nbits, 64);
  for (uint64_t w = 0; w < nwords; w++)
    s.regions += __builtin_popcountll(m->words[w]);
  s.bytes = MIN(s.regions * m->granularity, disk_size);   /* regions <= size/gran + 1 */
  return s;
}

static json_t *dirty_json(const struct disk_dirty_map *m, uint64_t disk_size)
{
  struct dirty_summary s = summarize(m, disk_size);
  json_t *extents = json_array();
  dirty_runs(m, disk_size, add_extent, extents);
  return json_pack("{s:I, s:I, s:I, s:I, s:o}",
                   "granularity", (json_int_t)m->granularity,
                   "generation", (json_int_t)m->generation,
                   "dirty_bytes", (json_int_t)s.bytes,
                   "dirty_regions", (json_int_t)s.regions,
                   "extents", extents);
}

static json_t *disk_json(struct api *a, struct disk *d)
{
  const char *name = disk_name(d);
  char uri[512];
  nbd_listener_uri(a->nbd, name, uri, sizeof uri);

  struct disk_dirty_map m = { 0 };
  struct dirty_summary s = { 0, 0 };
  bool have_map = disk_dirty_snapshot(d, &m) == 0;
  if (have_map) {
    s = summarize(&m, disk_size(d));
  } else {
    /* No map (CBT off): nothing vouches for any region, so all count dirty,
     * as disk_dirty_bytes() says. */
    s.bytes = disk_dirty_bytes(d);
    uint64_t g = disk_cbt_granularity(d);
    s.regions = g ? DIV_ROUND_UP(s.bytes, g) : 0;
  }
  json_t *cbt = json_pack("{s:b, s:s, s:I, s:I, s:I}",
                          "enabled", disk_cbt_enabled(d),
                          "state", disk_cbt_state(d),
                          "granularity", (json_int_t)disk_cbt_granularity(d),
                          "generation", (json_int_t)(have_map ? m.generation : 0),
                          "dirty_regions", (json_int_t)s.regions);
  free(m.words);

  json_t *stats = json_null(), *heat = json_null();
  struct heat *h = disk_heat(d);
  if (h) {
    heat_tick(h);   /* fold a finished second now, so rates are current */
    stats = stats_json(h);
    struct heat_region top[HEAT_HOTTEST_IN_DISK];
    unsigned n = heat_top(h, HEAT_HOTTEST_IN_DISK, top);
    json_t *hottest = json_array();
    for (unsigned i = 0; i < n; i++)
      json_array_append_new(hottest, region_json(&top[i]));
    heat = json_pack("{s:I, s:I, s:o}", "region_size", (json_int_t)heat_region_size(h),
                     "regions", (json_int_t)heat_nregions(h), "hottest", hottest);
  }

  char fence[160];
  disk_fence_reason(d, fence, sizeof fence);
  return json_pack("{s:s, s:s, s:b, s:b, s:I, s:I, s:I, s:I, s:s, s:I, s:I, s:I, s:o, s:o, s:o,"
                   " s:o}",
                   "name", name,
                   "image", disk_image_path(d),
                   "owned", registry_owns_image(a->reg, name),
                   "block_device", disk_is_block_device(d),
                   "size", (json_int_t)disk_size(d),
                   "allocated_bytes", (json_int_t)disk_allocated_bytes(d),
                   "dirty_bytes", (json_int_t)s.bytes,
                   "clients", (json_int_t)disk_clients(d),
                   "nbd_uri", uri,
                   "write_limit_bps", (json_int_t)disk_write_limit(d),
                   "backpressure_limit_bps", (json_int_t)disk_backpressure_limit(d),
                   "throttled_ms", (json_int_t)(disk_write_throttled_ns(d) / 1000000),
                   "cbt", cbt, "stats", stats, "heat", heat,
                   "fence", fence[0] ? json_string(fence) : json_null());
}

/* ---- handlers ---- */

static void h_health(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  size_t n = 0;
  struct disk **v = registry_list(a->reg, &n);
  for (size_t i = 0; i < n; i++)
    disk_unref(v[i]);
  free(v);
  char site[65], link[256];
  site_name(a->site, site, sizeof site);
  site_link_address(a->site, link, sizeof link);
  json_t *j = json_pack("{s:s, s:s, s:I, s:s, s:I}", "status", "ok", "version", FERRY_VERSION,
                        "pid", (json_int_t)getpid(), "nbd", nbd_listener_address(a->nbd),
                        "disks", (json_int_t)n);
  json_object_set_new(j, "site", site[0] ? json_string(site) : json_null());
  json_object_set_new(j, "link", link[0] ? json_string(link) : json_null());
  http_reply(resp, 200, j);
}

static void h_list(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  size_t n = 0;
  struct disk **v = registry_list(a->reg, &n);
  if (!v) {
    http_error(resp, 500, "internal", "out of memory");
    return;
  }
  json_t *arr = json_array();
  for (size_t i = 0; i < n; i++) {
    json_array_append_new(arr, disk_json(a, v[i]));
    disk_unref(v[i]);
  }
  free(v);
  http_reply(resp, 200, json_pack("{s:o}", "disks", arr));
}

static void h_create(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  static const char *const fields[] = { "name", "size", "image", "cbt_granularity", NULL };
  if (!http_query_check(req, NULL, resp))
    return;
  json_t *body = http_body_object(req, false, resp);
  if (!body)
    return;
  if (!api_only_fields(body, fields, resp))
    goto out;

  json_t *jname = json_object_get(body, "name");
  json_t *jsize = json_object_get(body, "size");
  json_t *jimage = json_object_get(body, "image");
  json_t *jgran = json_object_get(body, "cbt_granularity");
  if (!jname) {
    http_error(resp, 400, "invalid_argument", "missing field 'name'");
    goto out;
  }
  if (!json_is_string(jname)) {
    http_error(resp, 400, "invalid_argument", "'name' must be a string");
    goto out;
  }
  const char *name = json_string_value(jname);
  if (!api_valid_name(name, resp))
    goto out;
  if (!jsize == !jimage) {
    http_error(resp, 400, "invalid_argument",
               jsize ? "give either 'size' (create an image) or 'image' (add one), not both"
                     : "missing field 'size' (to create an image) or 'image' (to add one)");
    goto out;
  }
  uint64_t gran = 0;
  if (jgran) {
    if (!api_size_field(jgran, "cbt_granularity", false, &gran, resp))
      goto out;
    if (gran == 0) {
      http_error(resp, 400, "invalid_argument",
                 "cbt_granularity must be a power of two from 4 KiB to 1 GiB");
      goto out;
    }
  }

  char err[512];
  int ret;
  if (jsize) {
    uint64_t size;
    if (!api_size_field(jsize, "size", false, &size, resp))
      goto out;
    ret = registry_create(a->reg, name, size, gran, err, sizeof err);
  } else {
    if (!json_is_string(jimage) || !json_string_value(jimage)[0]) {
      http_error(resp, 400, "invalid_argument", "'image' must be a non-empty path string");
      goto out;
    }
    ret = registry_add(a->reg, name, json_string_value(jimage), gran, err, sizeof err);
  }
  if (ret < 0) {
    api_answer_errno(resp, ret, err, true);
    api_log_server_error(req, resp);
    goto out;
  }
  struct disk *d = registry_get(a->reg, name);
  if (!d) {   /* removed by a concurrent DELETE in between */
    http_error(resp, 404, "not_found", "disk '%s' was removed while being created", name);
    goto out;
  }
  http_reply(resp, 201, disk_json(a, d));
  disk_unref(d);
out:
  json_decref(body);
}

static void h_get(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  struct disk *d = path_disk(a, req, resp);
  if (!d)
    return;
  http_reply(resp, 200, disk_json(a, d));
  disk_unref(d);
}

static void h_delete(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  static const char *const q[] = { "force", NULL };
  bool force = false;
  if (!http_query_check(req, q, resp) || !http_query_bool(req, "force", &force, resp) ||
      !api_no_body(req, resp))
    return;
  const char *name = path_name(req, resp);
  if (!name)
    return;
  bool owned = registry_owns_image(a->reg, name);
  struct disk *d = registry_get(a->reg, name);   /* NULL if not open (image missing) */
  /* Forced: clients go first, so they see a disconnect and not I/O errors
   * on a half-removed disk. */
  if (force && d && disk_clients(d) > 0)
    nbd_listener_disconnect_export(a->nbd, name);
  char err[512];
  int ret = registry_remove(a->reg, name, force, err, sizeof err);
  if (ret < 0) {
    api_answer_errno(resp, ret, err, false);
    api_log_server_error(req, resp);
  } else {
    /* A client that attached between the check and the removal (the disk
     * object still counts it) is ended too: no one keeps a removed disk. */
    if (d && disk_clients(d) > 0)
      nbd_listener_disconnect_export(a->nbd, name);
    http_reply(resp, 200, json_pack("{s:s, s:b}", "removed", name, "image_deleted", owned));
  }
  if (d)
    disk_unref(d);
}

/* A dirty-map call failed: with CBT off there is no map (like heat with
 * --no-heat, not_found); otherwise the map could not be read or written. */
static void answer_map_error(struct http_response *resp, struct disk *d, const char *what,
                             int err)
{
  if (err == -EOPNOTSUPP)
    http_error(resp, 404, "not_found",
               "disk '%s' has no dirty map: ferryd runs with --no-cbt", disk_name(d));
  else if (err == -ENOMEM)
    http_error(resp, 500, "internal", "disk '%s': out of memory", disk_name(d));
  else
    http_error(resp, 500, "io_error", "disk '%s': cannot %s the dirty map: %s", disk_name(d),
               what, strerror(-err));
}

static void h_dirty(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  struct disk *d = path_disk(a, req, resp);
  if (!d)
    return;
  struct disk_dirty_map m = { 0 };
  int ret = disk_dirty_snapshot(d, &m);
  if (ret < 0)
    answer_map_error(resp, d, "read", ret);
  else
    http_reply(resp, 200, dirty_json(&m, disk_size(d)));
  api_log_server_error(req, resp);
  free(m.words);
  disk_unref(d);
}

static void h_dirty_swap(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  struct disk *d = path_disk(a, req, resp);
  if (!d)
    return;
  struct disk_dirty_map m = { 0 };
  char owner[64];
  if (disk_cbt_owner(d, owner, sizeof owner)) {
    /* The bits a swap takes would be lost to the migration consuming them. */
    http_error(resp, 409, "busy", "the dirty map of disk '%s' is consumed by migration %s; "
               "it cannot be swapped meanwhile", disk_name(d), owner);
    disk_unref(d);
    return;
  }
  int ret = disk_dirty_swap(d, &m);
  if (ret < 0) {
    answer_map_error(resp, d, "swap", ret);
  } else {
    http_reply(resp, 200, dirty_json(&m, disk_size(d)));
    log_info(disk_name(d), "dirty map swapped (generation %llu taken)",
             (unsigned long long)m.generation);
  }
  api_log_server_error(req, resp);
  free(m.words);
  disk_unref(d);
}

static struct heat *disk_heat_or_error(struct disk *d, struct http_response *resp)
{
  struct heat *h = disk_heat(d);
  if (!h)
    http_error(resp, 404, "not_found",
               "disk '%s' has no heat data: ferryd runs with --no-heat", disk_name(d));
  return h;
}

static void h_heat(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  static const char *const q[] = { "top", "all", NULL };
  uint64_t top = HEAT_TOP_DEFAULT;
  bool all = false;
  if (!http_query_check(req, q, resp) ||
      !http_query_uint(req, "top", 0, HEAT_MAX_REGIONS, &top, resp) ||
      !http_query_bool(req, "all", &all, resp) || !api_no_body(req, resp))
    return;
  struct disk *d = path_disk(a, req, resp);
  if (!d)
    return;
  struct heat *h = disk_heat_or_error(d, resp);
  if (!h) {
    disk_unref(d);
    return;
  }
  heat_tick(h);
  uint64_t nregions = heat_nregions(h);
  struct heat_region *regs = calloc(MAX(top, all ? nregions : 0) + 1, sizeof *regs);
  if (!regs) {
    http_error(resp, 500, "internal", "out of memory");
    api_log_server_error(req, resp);
    disk_unref(d);
    return;
  }
  json_t *jtop = json_array();
  unsigned n = heat_top(h, (unsigned)top, regs);
  for (unsigned i = 0; i < n; i++)
    json_array_append_new(jtop, region_json(&regs[i]));
  json_t *doc = json_pack("{s:I, s:I, s:I, s:o}", "region_size", (json_int_t)heat_region_size(h),
                          "regions", (json_int_t)nregions, "half_life_s",
                          (json_int_t)heat_half_life(h), "top", jtop);
  if (all) {
    json_t *jall = json_array();
    uint64_t got = heat_regions(h, 0, nregions, regs);
    for (uint64_t i = 0; i < got; i++)
      json_array_append_new(jall, region_json(&regs[i]));
    json_object_set_new(doc, "all", jall);
  }
  free(regs);
  http_reply(resp, 200, doc);
  disk_unref(d);
}

static void iso_time(uint64_t ns, char *buf, size_t len)
{
  time_t sec = (time_t)(ns / 1000000000u);
  struct tm tm;
  gmtime_r(&sec, &tm);
  size_t n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
  snprintf(buf + n, len - n, ".%06uZ", (unsigned)(ns % 1000000000u / 1000));
}

static void h_trace(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  static const char *const q[] = { "max", NULL };
  uint64_t max = TRACE_MAX_DEFAULT;
  if (!http_query_check(req, q, resp) ||
      !http_query_uint(req, "max", 0, HEAT_TRACE_SIZE, &max, resp) || !api_no_body(req, resp))
    return;
  struct disk *d = path_disk(a, req, resp);
  if (!d)
    return;
  struct heat *h = disk_heat_or_error(d, resp);
  if (!h) {
    disk_unref(d);
    return;
  }
  struct heat_trace_entry *e = calloc(max + 1, sizeof *e);
  if (!e) {
    http_error(resp, 500, "internal", "out of memory");
    api_log_server_error(req, resp);
    disk_unref(d);
    return;
  }
  unsigned n = heat_trace(h, e, (unsigned)max);
  json_t *entries = json_array();
  for (unsigned i = 0; i < n; i++) {
    char t[48];
    iso_time(e[i].time_ns, t, sizeof t);
    json_array_append_new(entries,
        json_pack("{s:I, s:s, s:I, s:I, s:s, s:I}", "seq", (json_int_t)e[i].seq, "time", t,
                  "offset", (json_int_t)e[i].offset, "length", (json_int_t)e[i].length,
                  "kind", e[i].kind < IO_KINDS ? io_kind_name(e[i].kind) : "?",
                  "latency_us", (json_int_t)e[i].latency_us));
  }
  free(e);
  http_reply(resp, 200, json_pack("{s:I, s:o}", "sample_every", (json_int_t)heat_trace_every(h),
                                  "entries", entries));
  disk_unref(d);
}

static void h_write_limit(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  static const char *const fields[] = { "bytes_per_sec", NULL };
  if (!http_query_check(req, NULL, resp))
    return;
  const char *name = path_name(req, resp);
  if (!name)
    return;
  json_t *body = http_body_object(req, false, resp);
  if (!body)
    return;
  uint64_t bps;
  json_t *v = json_object_get(body, "bytes_per_sec");
  if (!api_only_fields(body, fields, resp))
    goto out;
  if (!v) {
    http_error(resp, 400, "invalid_argument", "missing field 'bytes_per_sec'");
    goto out;
  }
  if (!api_size_field(v, "bytes_per_sec", true, &bps, resp))
    goto out;
  char err[512];
  int ret = registry_set_write_limit(a->reg, name, bps, err, sizeof err);
  if (ret < 0) {
    api_answer_errno(resp, ret, err, false);
    api_log_server_error(req, resp);
    goto out;
  }
  struct disk *d = registry_get(a->reg, name);
  if (!d) {
    http_error(resp, 404, "not_found", "disk '%s' does not exist", name);
    goto out;
  }
  http_reply(resp, 200, disk_json(a, d));
  disk_unref(d);
out:
  json_decref(body);
}

const struct http_route disk_routes[] = {
  { "GET", "/v1/health", h_health },
  { "GET", "/v1/disks", h_list },
  { "POST", "/v1/disks", h_create },
  { "GET", "/v1/disks/{}", h_get },
  { "DELETE", "/v1/disks/{}", h_delete },
  { "GET", "/v1/disks/{}/dirty", h_dirty },
  { "POST", "/v1/disks/{}/dirty/swap", h_dirty_swap },
  { "GET", "/v1/disks/{}/heat", h_heat },
  { "GET", "/v1/disks/{}/trace", h_trace },
  { "PUT", "/v1/disks/{}/write-limit", h_write_limit },
};
const size_t disk_nroutes = sizeof disk_routes / sizeof disk_routes[0];
