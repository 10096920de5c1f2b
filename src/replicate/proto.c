/* proto: encoders and checked parsers of the session protocol (see proto.h). */
#include "replicate/proto.h"

#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common/util.h"

#define MAX_JSON (1024 * 1024)
#define MAX_DISK_SIZE (UINT64_C(1) << 50)   /* 1 PiB */

static void set_err(char *err, size_t errlen, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
  if (!err || !errlen)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

static void put32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }

const char *proto_type_name(unsigned type)
{
  static const char *const names[] = { "?", "HELLO", "HELLO_OK", "DATA", "CTRL", "REPLY", "ACK",
                                       "NACK", "PING", "PONG", "BLOB", "HASHES", "ERROR",
                                       "TUNNEL_OPEN", "TUNNEL_DATA", "TUNNEL_EOF", "QUERY",
                                       "QUERY_REPLY", "WARM_HELLO", "WARM_REQ", "WARM_REPLY",
                                       "WARM_FETCH", "WARM_FILL", "WARM_MAP", "WARM_WB" };
  return type < ARRAY_SIZE(names) ? names[type] : "?";
}

bool proto_is_sequenced(unsigned type)
{
  return type == MSG_DATA || type == MSG_CTRL || type == MSG_BLOB;
}

void proto_data_encode(const struct proto_data *d, uint8_t out[DATA_HEADER_SIZE])
{
  put32(out, d->disk);
  out[4] = d->kind;
  out[5] = d->flags;
  out[6] = out[7] = 0;
  put64(out + 8, d->offset);
  put64(out + 16, d->length);
}

int proto_data_parse(const void *payload, uint32_t len, struct proto_data *out, char *err,
                     size_t errlen)
{
  const uint8_t *p = payload;
  if (len < DATA_HEADER_SIZE) {
    set_err(err, errlen, "DATA frame of %u bytes is shorter than its header", len);
    return -EPROTO;
  }
  out->disk = get32(p);
  out->kind = p[4];
  out->flags = p[5];
  out->offset = get64(p + 8);
  out->length = get64(p + 16);
  out->bytes = p + DATA_HEADER_SIZE;
  if (p[6] || p[7] || (out->flags & ~DATA_F_BACKGROUND)) {
    set_err(err, errlen, "DATA frame has reserved bits set");
    return -EPROTO;
  }
  if (out->disk >= PROTO_MAX_DISKS) {
    set_err(err, errlen, "DATA frame names disk %u", out->disk);
    return -EPROTO;
  }
  if (out->length == 0 || out->offset > MAX_DISK_SIZE || out->length > MAX_DISK_SIZE - out->offset) {
    set_err(err, errlen, "DATA frame range %llu+%llu is invalid",
            (unsigned long long)out->offset, (unsigned long long)out->length);
    return -EPROTO;
  }
  if (out->kind == DATA_KIND_DATA) {
    if (out->length != len - DATA_HEADER_SIZE) {
      set_err(err, errlen, "DATA frame says %llu bytes but carries %u",
              (unsigned long long)out->length, len - DATA_HEADER_SIZE);
      return -EPROTO;
    }
  } else if (out->kind == DATA_KIND_ZERO) {
    if (len != DATA_HEADER_SIZE) {
      set_err(err, errlen, "zero DATA frame carries %u bytes", len - DATA_HEADER_SIZE);
      return -EPROTO;
    }
  } else {
    set_err(err, errlen, "DATA frame of unknown kind %u", out->kind);
    return -EPROTO;
  }
  return 0;
}

void proto_blob_encode(uint64_t offset, uint64_t total, uint8_t out[BLOB_HEADER_SIZE])
{
  put64(out, offset);
  put64(out + 8, total);
}

int proto_blob_parse(const void *payload, uint32_t len, struct proto_blob *out, char *err,
                     size_t errlen)
{
  const uint8_t *p = payload;
  if (len < BLOB_HEADER_SIZE) {
    set_err(err, errlen, "BLOB frame of %u bytes is shorter than its header", len);
    return -EPROTO;
  }
  out->offset = get64(p);
  out->total = get64(p + 8);
  out->bytes = p + BLOB_HEADER_SIZE;
  out->len = len - BLOB_HEADER_SIZE;
  if (out->total > PROTO_MAX_BLOB || out->offset > out->total ||
      out->len > out->total - out->offset) {
    set_err(err, errlen, "BLOB piece %llu+%u of %llu is out of range",
            (unsigned long long)out->offset, out->len, (unsigned long long)out->total);
    return -EPROTO;
  }
  return 0;
}

void proto_hashes_encode_header(const struct proto_hashes *h, uint8_t out[HASHES_HEADER_SIZE])
{
  put64(out, h->req);
  put32(out + 8, h->disk);
  put32(out + 12, h->count);
  put64(out + 16, h->first);
}

int proto_hashes_parse(const void *payload, uint32_t len, struct proto_hashes *out, char *err,
                       size_t errlen)
{
  const uint8_t *p = payload;
  if (len < HASHES_HEADER_SIZE) {
    set_err(err, errlen, "HASHES frame of %u bytes is shorter than its header", len);
    return -EPROTO;
  }
  out->req = get64(p);
  out->disk = get32(p + 8);
  out->count = get32(p + 12);
  out->first = get64(p + 16);
  out->hashes = p + HASHES_HEADER_SIZE;
  if (out->disk >= PROTO_MAX_DISKS || out->count > PROTO_MAX_HASHES ||
      (uint64_t)out->count * 8 != len - HASHES_HEADER_SIZE) {
    set_err(err, errlen, "HASHES frame is malformed (disk %u, %u hashes in %u bytes)",
            out->disk, out->count, len);
    return -EPROTO;
  }
  return 0;
}

uint64_t proto_hash_at(const struct proto_hashes *h, uint32_t i)
{
  return get64(h->hashes + 8 * (size_t)i);
}

void proto_u64_encode(uint64_t v, uint8_t out[8]) { put64(out, v); }

int proto_u64_parse(const void *payload, uint32_t len, uint64_t *out, char *err, size_t errlen)
{
  if (len != 8) {
    set_err(err, errlen, "expected an 8-byte payload, got %u bytes", len);
    return -EPROTO;
  }
  *out = get64(payload);
  return 0;
}

json_t *proto_json_parse(const void *payload, uint32_t len, char *err, size_t errlen)
{
  if (len == 0 || len > MAX_JSON) {
    set_err(err, errlen, "JSON payload of %u bytes", len);
    return NULL;
  }
  json_error_t je;
  json_t *j = json_loadb(payload, len, JSON_REJECT_DUPLICATES, &je);
  if (!j) {
    set_err(err, errlen, "bad JSON: %s", je.text);
    return NULL;
  }
  if (!json_is_object(j)) {
    json_decref(j);
    set_err(err, errlen, "JSON payload is not an object");
    return NULL;
  }
  return j;
}

bool proto_id_is_valid(const char *s)
{
  if (!s || strncmp(s, "m-", 2) != 0 || strlen(s) != 14)
    return false;
  for (const char *p = s + 2; *p; p++)
    if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f')))
      return false;
  return true;
}

/* An unsigned JSON integer member, 0 <= v <= max. */
static bool get_uint(json_t *j, const char *key, uint64_t max, uint64_t *out, char *err,
                     size_t errlen)
{
  json_t *v = json_object_get(j, key);
  if (!json_is_integer(v) || json_integer_value(v) < 0 ||
      (uint64_t)json_integer_value(v) > max) {
    set_err(err, errlen, "'%s' must be an integer from 0 to %llu", key, (unsigned long long)max);
    return false;
  }
  *out = (uint64_t)json_integer_value(v);
  return true;
}

static bool get_name(json_t *j, const char *key, char *out, size_t len, char *err,
                     size_t errlen)
{
  const char *s = json_string_value(json_object_get(j, key));
  if (!s || !name_is_valid(s) || strlen(s) >= len) {
    set_err(err, errlen, "'%s' must be a valid name", key);
    return false;
  }
  snprintf(out, len, "%s", s);
  return true;
}

int proto_parse_ctrl(json_t *j, struct proto_ctrl *out, char *err, size_t errlen)
{
  memset(out, 0, sizeof *out);
  out->body = j;
  const char *op = json_string_value(json_object_get(j, "op"));
  if (!op) {
    set_err(err, errlen, "CTRL without 'op'");
    return -EPROTO;
  }
  if (!get_uint(j, "req", INT64_MAX, &out->req, err, errlen))
    return -EPROTO;
  uint64_t v;
  if (strcmp(op, "flush") == 0) {
    out->op = OP_FLUSH;
  } else if (strcmp(op, "hash") == 0) {
    out->op = OP_HASH;
    if (!get_uint(j, "disk", PROTO_MAX_DISKS - 1, &v, err, errlen))
      return -EPROTO;
    out->disk = (uint32_t)v;
    json_t *list = json_object_get(j, "regions");
    if (list) {
      /* Scattered regions (what is left to verify at a cutover): one round
       * trip for all of them. */
      if (!json_is_array(list) || json_array_size(list) > PROTO_MAX_HASHES ||
          json_object_get(j, "first") || json_object_get(j, "count")) {
        set_err(err, errlen, "'regions' must be an array of at most %d regions, without "
                "'first' and 'count'", PROTO_MAX_HASHES);
        return -EPROTO;
      }
      size_t i;
      json_t *x;
      json_array_foreach(list, i, x) {
        if (!json_is_integer(x) || json_integer_value(x) < 0 ||
            (uint64_t)json_integer_value(x) > MAX_DISK_SIZE) {
          set_err(err, errlen, "'regions' holds something that is not a region number");
          return -EPROTO;
        }
      }
      out->regions = list;
      out->count = json_array_size(list);
    } else if (!get_uint(j, "first", MAX_DISK_SIZE, &out->first, err, errlen) ||
               !get_uint(j, "count", PROTO_MAX_HASHES, &out->count, err, errlen)) {
      return -EPROTO;
    }
    if (out->count == 0) {
      set_err(err, errlen, "hash of 0 regions");
      return -EPROTO;
    }
  } else if (strcmp(op, "vm_state") == 0) {
    out->op = OP_VM_STATE;
    if (!get_uint(j, "size", PROTO_MAX_BLOB, &out->size, err, errlen))
      return -EPROTO;
    json_t *h = json_object_get(j, "xxh64");
    const char *hs = json_string_value(h);
    char *end = NULL;
    if (!hs || strlen(hs) != 16 || (out->xxh64 = strtoull(hs, &end, 16), *end)) {
      set_err(err, errlen, "'xxh64' must be 16 hex digits");
      return -EPROTO;
    }
  } else if (strcmp(op, "activate") == 0) {
    out->op = OP_ACTIVATE;
    json_t *vm = json_object_get(j, "vm");
    char name[65], driver[16];
    if (!json_is_object(vm) || !get_name(vm, "name", name, sizeof name, err, errlen) ||
        !get_name(vm, "driver", driver, sizeof driver, err, errlen))
      return -EPROTO;
    json_t *disks = json_object_get(vm, "disks");
    if (!json_is_array(disks) || json_array_size(disks) == 0 ||
        json_array_size(disks) > PROTO_MAX_DISKS) {
      set_err(err, errlen, "'vm.disks' must be an array of 1 to %d names", PROTO_MAX_DISKS);
      return -EPROTO;
    }
    size_t i;
    json_t *x;
    json_array_foreach(disks, i, x) {
      if (!json_is_string(x) || !name_is_valid(json_string_value(x))) {
        set_err(err, errlen, "'vm.disks' holds a bad name");
        return -EPROTO;
      }
    }
    json_t *inc = json_object_get(j, "incoming");
    if (inc && !json_is_boolean(inc)) {
      set_err(err, errlen, "'incoming' must be true or false");
      return -EPROTO;
    }
    json_t *w = json_object_get(vm, "workload");
    if (w && (!json_is_string(w) || strlen(json_string_value(w)) > 255)) {
      set_err(err, errlen, "'vm.workload' must be a string of at most 255 characters");
      return -EPROTO;
    }
  } else if (strcmp(op, "prepare_incoming") == 0) {
    out->op = OP_PREPARE_INCOMING;
    if (!json_is_object(json_object_get(j, "vm"))) {
      set_err(err, errlen, "'vm' must be an object");
      return -EPROTO;
    }
  } else if (strcmp(op, "incoming_status") == 0) {
    out->op = OP_INCOMING_STATUS;
  } else if (strcmp(op, "discard_incoming") == 0) {
    out->op = OP_DISCARD_INCOMING;
  } else if (strcmp(op, "complete") == 0) {
    out->op = OP_COMPLETE;
  } else if (strcmp(op, "abort") == 0) {
    out->op = OP_ABORT;
  } else {
    set_err(err, errlen, "unknown CTRL op '%.40s'", op);
    return -EPROTO;
  }
  return 0;
}

int proto_parse_hello(json_t *j, struct proto_hello *out, char *err, size_t errlen)
{
  memset(out, 0, sizeof *out);
  uint64_t v;
  if (!get_uint(j, "protocol", 1000, &v, err, errlen))
    return -EPROTO;
  if (v != PROTO_VERSION) {
    set_err(err, errlen, "protocol version %llu is not %d", (unsigned long long)v,
            PROTO_VERSION);
    return -EPROTO;
  }
  const char *s = json_string_value(json_object_get(j, "session"));
  if (!proto_id_is_valid(s)) {
    set_err(err, errlen, "bad session id");
    return -EPROTO;
  }
  snprintf(out->session, sizeof out->session, "%s", s);
  /* "mode" came with cold migration; a HELLO without it is live. */
  json_t *mode = json_object_get(j, "mode");
  const char *ms = mode ? json_string_value(mode) : "live";
  if (!ms || (strcmp(ms, "live") != 0 && strcmp(ms, "cold") != 0 && strcmp(ms, "warm") != 0)) {
    set_err(err, errlen, "'mode' must be \"live\", \"cold\" or \"warm\"");
    return -EPROTO;
  }
  snprintf(out->mode, sizeof out->mode, "%s", ms);
  if (!get_name(j, "vm", out->vm, sizeof out->vm, err, errlen) ||
      !get_name(j, "source_site", out->source_site, sizeof out->source_site, err, errlen))
    return -EPROTO;
  json_t *disks = json_object_get(j, "disks");
  if (!json_is_array(disks) || json_array_size(disks) == 0 ||
      json_array_size(disks) > PROTO_MAX_DISKS) {
    set_err(err, errlen, "'disks' must be an array of 1 to %d disks", PROTO_MAX_DISKS);
    return -EPROTO;
  }
  size_t i;
  json_t *x;
  json_array_foreach(disks, i, x) {
    struct proto_hello_disk *d = &out->disks[i];
    if (!json_is_object(x) || !get_name(x, "name", d->name, sizeof d->name, err, errlen) ||
        !get_uint(x, "size", MAX_DISK_SIZE, &d->size, err, errlen) ||
        !get_uint(x, "granularity", 1u << 30, &d->granularity, err, errlen))
      return -EPROTO;
    if (d->size == 0 || d->size % 512 || d->granularity < 4096 ||
        (d->granularity & (d->granularity - 1))) {
      set_err(err, errlen, "disk '%s': bad size or granularity", d->name);
      return -EPROTO;
    }
    for (size_t k = 0; k < i; k++)
      if (strcmp(out->disks[k].name, d->name) == 0) {
        set_err(err, errlen, "disk '%s' is named twice", d->name);
        return -EPROTO;
      }
  }
  out->ndisks = (unsigned)json_array_size(disks);
  return 0;
}

/* ---- warm sessions ---- */

void proto_fetch_encode(const struct proto_fetch *f, uint8_t out[WARM_FETCH_SIZE])
{
  put32(out, f->disk);
  put32(out + 4, f->count);
  put64(out + 8, f->first);
}

int proto_fetch_parse(const void *payload, uint32_t len, struct proto_fetch *out, char *err,
                      size_t errlen)
{
  const uint8_t *p = payload;
  if (len != WARM_FETCH_SIZE) {
    set_err(err, errlen, "FETCH of %u bytes, not %d", len, WARM_FETCH_SIZE);
    return -EPROTO;
  }
  out->disk = get32(p);
  out->count = get32(p + 4);
  out->first = get64(p + 8);
  if (out->disk >= PROTO_MAX_DISKS || out->count == 0 || out->count > WARM_MAX_FETCH) {
    set_err(err, errlen, "FETCH of disk %u, %u regions: out of bounds", out->disk, out->count);
    return -EPROTO;
  }
  return 0;
}

void proto_fill_encode_header(const struct proto_fill *f, uint8_t out[WARM_FILL_HEADER])
{
  put32(out, f->disk);
  put32(out + 4, f->count);
  put64(out + 8, f->first);
  put32(out + 16, f->kind);
  put32(out + 20, f->error);
}

int proto_fill_parse(const void *payload, uint32_t len, struct proto_fill *out, char *err,
                     size_t errlen)
{
  const uint8_t *p = payload;
  if (len < WARM_FILL_HEADER) {
    set_err(err, errlen, "FILL of %u bytes: shorter than its header", len);
    return -EPROTO;
  }
  out->disk = get32(p);
  out->count = get32(p + 4);
  out->first = get64(p + 8);
  out->kind = get32(p + 16);
  out->error = get32(p + 20);
  out->len = len - WARM_FILL_HEADER;
  out->bytes = p + WARM_FILL_HEADER;
  if (out->disk >= PROTO_MAX_DISKS || out->count == 0 || out->count > WARM_MAX_FETCH) {
    set_err(err, errlen, "FILL of disk %u, %u regions: out of bounds", out->disk, out->count);
    return -EPROTO;
  }
  if (out->kind < WARM_FILL_DATA || out->kind > WARM_FILL_ERROR) {
    set_err(err, errlen, "FILL of unknown kind %u", out->kind);
    return -EPROTO;
  }
  if (out->kind != WARM_FILL_DATA && out->len) {
    set_err(err, errlen, "FILL of kind %u carries %u bytes", out->kind, out->len);
    return -EPROTO;
  }
  if (out->kind == WARM_FILL_DATA && out->len == 0) {
    set_err(err, errlen, "FILL of data without data");
    return -EPROTO;
  }
  if (out->kind == WARM_FILL_ERROR && (out->error == 0 || out->error > 4095)) {
    set_err(err, errlen, "FILL error %u is not an errno", out->error);
    return -EPROTO;
  }
  return 0;
}

void proto_map_encode_header(const struct proto_map *m, uint8_t out[WARM_MAP_HEADER])
{
  put32(out, m->disk);
  put32(out + 4, m->kind);
  put64(out + 8, m->index);
}

int proto_map_parse(const void *payload, uint32_t len, struct proto_map *out, char *err,
                    size_t errlen)
{
  const uint8_t *p = payload;
  if (len < WARM_MAP_HEADER || (len - WARM_MAP_HEADER) % 8 ||
      (len - WARM_MAP_HEADER) / 8 > WARM_MAP_MAX_VALUES) {
    set_err(err, errlen, "MAP of %u bytes: not a header and up to %d u64 values", len,
            WARM_MAP_MAX_VALUES);
    return -EPROTO;
  }
  out->disk = get32(p);
  out->kind = get32(p + 4);
  out->index = get64(p + 8);
  out->values = p + WARM_MAP_HEADER;
  out->count = (len - WARM_MAP_HEADER) / 8;
  if (out->disk >= PROTO_MAX_DISKS || (out->kind != WARM_MAP_HOLES && out->kind != WARM_MAP_HOT)) {
    set_err(err, errlen, "MAP of disk %u, kind %u: out of bounds", out->disk, out->kind);
    return -EPROTO;
  }
  if (out->index > (UINT64_C(1) << 40)) {
    set_err(err, errlen, "MAP index %llu is out of bounds", (unsigned long long)out->index);
    return -EPROTO;
  }
  return 0;
}

uint64_t proto_map_value(const struct proto_map *m, uint32_t i) { return get64(m->values + 8 * (size_t)i); }

void proto_wb_encode_header(uint64_t point, uint64_t offset, uint8_t out[WARM_WB_HEADER])
{
  put64(out, point);
  put64(out + 8, offset);
}

int proto_wb_parse(const void *payload, uint32_t len, struct proto_wb *out, char *err,
                   size_t errlen)
{
  const uint8_t *p = payload;
  if (len <= WARM_WB_HEADER) {
    set_err(err, errlen, "WB of %u bytes: no data after the header", len);
    return -EPROTO;
  }
  out->point = get64(p);
  out->offset = get64(p + 8);
  out->bytes = p + WARM_WB_HEADER;
  out->len = len - WARM_WB_HEADER;
  if (out->point == 0 || out->offset > (UINT64_C(1) << 44)) {
    set_err(err, errlen, "WB of point %llu at %llu: out of bounds",
            (unsigned long long)out->point, (unsigned long long)out->offset);
    return -EPROTO;
  }
  return 0;
}

int proto_parse_warm_params(json_t *j, unsigned ndisks, struct proto_warm_params *out,
                            char *err, size_t errlen)
{
  memset(out, 0, sizeof *out);
  if (!json_is_object(j)) {
    set_err(err, errlen, "'warm' must be an object");
    return -EPROTO;
  }
  if (!get_uint(j, "rpo_s", 86400, &out->rpo_s, err, errlen) ||
      !get_uint(j, "hydrate_bps", UINT64_C(1) << 40, &out->hydrate_bps, err, errlen) ||
      !get_uint(j, "degraded_after_s", 86400, &out->degraded_after_s, err, errlen))
    return -EPROTO;
  if (out->rpo_s < 1 || out->degraded_after_s < 1) {
    set_err(err, errlen, "'rpo_s' and 'degraded_after_s' must be at least 1");
    return -EPROTO;
  }
  const char *pf = json_string_value(json_object_get(j, "prefetch"));
  if (!pf || (strcmp(pf, "hot") != 0 && strcmp(pf, "none") != 0)) {
    set_err(err, errlen, "'prefetch' must be \"hot\" or \"none\"");
    return -EPROTO;
  }
  snprintf(out->prefetch, sizeof out->prefetch, "%s", pf);
  json_t *q = json_object_get(j, "quota");
  if (!json_is_array(q) || json_array_size(q) != ndisks) {
    set_err(err, errlen, "'quota' must have one size per disk");
    return -EPROTO;
  }
  for (unsigned i = 0; i < ndisks; i++) {
    json_t *v = json_array_get(q, i);
    if (!json_is_integer(v) || json_integer_value(v) < 0 ||
        (uint64_t)json_integer_value(v) > MAX_DISK_SIZE) {
      set_err(err, errlen, "'quota' %u is not a size", i);
      return -EPROTO;
    }
    out->quota[i] = (uint64_t)json_integer_value(v);
  }
  return 0;
}
