/* api: the HTTP server of ferryd and the helpers its handlers share (see api.h). */
#include "api/api.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"

/* Maps a registry error to its API error; `what` says which resource a
 * -ENOENT speaks of ("disk" answers 404, "image" 400: the route exists). */
void api_answer_errno(struct http_response *resp, int err, const char *msg, bool enoent_is_input)
{
  switch (err) {
  case -EINVAL:
    http_error(resp, 400, "invalid_argument", "%s", msg);
    break;
  case -ENOENT:
    if (enoent_is_input)
      http_error(resp, 400, "invalid_argument", "%s", msg);
    else
      http_error(resp, 404, "not_found", "%s", msg);
    break;
  case -EEXIST:
    http_error(resp, 409, "already_exists", "%s", msg);
    break;
  case -EBUSY:
    http_error(resp, 409, "busy", "%s", msg);
    break;
  case -EHOSTUNREACH:
    http_error(resp, 503, "unavailable", "%s", msg);
    break;
  case -EOPNOTSUPP:
    http_error(resp, 501, "not_supported", "%s", msg);
    break;
  case -ENOMEM:
    http_error(resp, 500, "internal", "%s", msg);
    break;
  default:
    http_error(resp, 500, "io_error", "%s", msg);
    break;
  }
}

void api_log_server_error(struct http_request *req, const struct http_response *resp)
{
  /* 501: the driver cannot do that; nothing failed in ferryd. */
  if (resp->status < 500 || resp->status == 501 || !resp->body)
    return;
  const char *msg = json_string_value(json_object_get(json_object_get(resp->body, "error"),
                                                      "message"));
  log_error(NULL, "api: %s %s: %s", http_method(req), http_path(req), msg ? msg : "?");
}

/* Checks a disk name; false with 400 set. */
bool api_valid_name(const char *name, struct http_response *resp)
{
  if (name_is_valid(name))
    return true;
  http_error(resp, 400, "invalid_argument",
             "invalid name '%.80s': 1-64 characters of A-Z a-z 0-9 . _ -, "
             "not starting with '.' or '-'", name ? name : "");
  return false;
}

/* Routes without a body accept none, or an empty object. */
bool api_no_body(struct http_request *req, struct http_response *resp)
{
  json_t *b = http_body_object(req, true, resp);
  if (!b)
    return false;
  bool ok = json_object_size(b) == 0;
  json_decref(b);
  if (!ok)
    http_error(resp, 400, "invalid_argument", "%s %s takes no request body", http_method(req),
               http_path(req));
  return ok;
}

/* Refuses any member of obj not in allowed (NULL-terminated). */
bool api_only_fields(json_t *obj, const char *const *allowed, struct http_response *resp)
{
  const char *key;
  json_t *v;
  json_object_foreach(obj, key, v) {
    bool ok = false;
    for (const char *const *f = allowed; *f; f++)
      ok = ok || strcmp(*f, key) == 0;
    if (!ok) {
      http_error(resp, 400, "invalid_argument", "unknown field '%.64s'", key);
      return false;
    }
  }
  return true;
}

/* A size or rate field: a non-negative integer (bytes) or a string such as
 * "10G" / "50M/s".  Values above INT64_MAX are refused (JSON integers here
 * are signed 64-bit, and no disk or rate is that large). */
bool api_size_field(json_t *v, const char *field, bool rate, uint64_t *out,
                       struct http_response *resp)
{
  if (json_is_integer(v)) {
    json_int_t n = json_integer_value(v);
    if (n < 0) {
      http_error(resp, 400, "invalid_argument", "'%s' must not be negative", field);
      return false;
    }
    *out = (uint64_t)n;
    return true;
  }
  if (json_is_string(v)) {
    const char *s = json_string_value(v);
    uint64_t n;
    if ((rate ? parse_rate(s, &n) : parse_size(s, &n)) < 0) {
      if (errno == ERANGE)
        http_error(resp, 400, "invalid_argument", "'%s' value '%.64s' is too large", field, s);
      else
        http_error(resp, 400, "invalid_argument",
                   "'%s' value '%.64s' is not a %s (bytes, or a number with K, M, G, T, P%s)",
                   field, s, rate ? "rate" : "size", rate ? ", optionally /s" : "");
      return false;
    }
    if (n > (uint64_t)INT64_MAX) {
      http_error(resp, 400, "invalid_argument", "'%s' value '%.64s' is too large", field, s);
      return false;
    }
    *out = n;
    return true;
  }
  http_error(resp, 400, "invalid_argument",
             "'%s' must be an integer number of bytes or a string such as \"%s\"", field,
             rate ? "50M" : "10G");
  return false;
}


bool api_duration_ms_field(json_t *v, const char *field, uint64_t *out,
                           struct http_response *resp)
{
  if (json_is_integer(v) && json_integer_value(v) >= 0) {
    *out = (uint64_t)json_integer_value(v);
    return true;
  }
  const char *s = json_string_value(v);
  if (s) {
    char *end = NULL;
    errno = 0;
    double x = strtod(s, &end);
    double mul = 0;
    if (end != s && errno == 0 && x >= 0) {
      if (strcmp(end, "ms") == 0)
        mul = 1;
      else if (strcmp(end, "s") == 0 || *end == '\0')
        mul = *end ? 1000 : 1;
      else if (strcmp(end, "m") == 0 || strcmp(end, "min") == 0)
        mul = 60000;
      else if (strcmp(end, "h") == 0)
        mul = 3600000;
    }
    if (mul > 0 && x * mul < 1e15) {
      *out = (uint64_t)(x * mul + 0.5);
      return true;
    }
  }
  http_error(resp, 400, "invalid_argument",
             "'%s' must be a duration in milliseconds or a string such as \"500ms\", \"2s\"",
             field);
  return false;
}

bool api_string_field(json_t *obj, const char *field, bool required, size_t maxlen,
                      const char **out, struct http_response *resp)
{
  json_t *v = json_object_get(obj, field);
  *out = NULL;
  if (!v) {
    if (required)
      http_error(resp, 400, "invalid_argument", "missing field '%s'", field);
    return !required;
  }
  if (!json_is_string(v) || strlen(json_string_value(v)) > maxlen) {
    http_error(resp, 400, "invalid_argument", "'%s' must be a string of at most %zu characters",
               field, maxlen);
    return false;
  }
  *out = json_string_value(v);
  return true;
}

int api_start(struct api *a, const char *host_port, char *err, size_t errlen)
{
  static struct http_route all[128];
  static size_t n;
  if (!n) {
    const struct { const struct http_route *r; size_t n; } parts[] = {
      { disk_routes, disk_nroutes }, { site_routes, site_nroutes },
      { vm_routes, vm_nroutes }, { migration_routes, migration_nroutes },
      { host_routes, host_nroutes },
    };
    for (size_t p = 0; p < ARRAY_SIZE(parts); p++)
      for (size_t i = 0; i < parts[p].n && n < ARRAY_SIZE(all); i++)
        all[n++] = parts[p].r[i];
  }
  a->http = http_start(host_port, all, n, a, err, errlen);
  return a->http ? 0 : -1;
}

const char *api_url(const struct api *a) { return http_url(a->http); }

void api_stop(struct api *a)
{
  if (a && a->http) {
    http_stop(a->http);
    a->http = NULL;
  }
}
