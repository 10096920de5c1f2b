/* http: the JSON router on libmicrohttpd (see http.h).
 *
 * Request life: MHD calls on_request once when the headers are in (we make
 * the per-request state, and answer 413 at once when Content-Length is over
 * the cap), then once per body chunk (appended, or counted and dropped once
 * past the cap, for chunked bodies), then once with no data: we route, run
 * the handler and queue its answer.  on_completed frees the state; the count
 * of live requests lets http_stop() wait for the ones in flight.
 *
 * The listening socket is made here, not by MHD, so a bind failure says
 * which address and why, and port 0 works the same for IPv4 and IPv6.
 */
#include "api/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/net.h"
#include "common/util.h"

#define HTTP_THREADS 8     /* verify and migrate calls may take seconds */
#define HTTP_DRAIN_SECONDS 10   /* how long http_stop waits for requests in flight */
#define HTTP_MAX_DRAIN (64u * 1024 * 1024)  /* largest oversized body read to answer 413 */

struct http_server {
  struct MHD_Daemon *mhd;
  const struct http_route *routes;
  size_t nroutes;
  void *ctx;
  uint16_t port;
  char url[300];

  pthread_mutex_t lock;         /* guards active */
  pthread_cond_t idle;          /* signalled when active drops to 0 */
  unsigned active;              /* requests between first call and completion */
};

struct http_request {
  struct MHD_Connection *conn;
  const char *method;           /* MHD's, valid for the request */
  const char *path;
  char *body;                   /* NUL-terminated, len bytes */
  size_t len, cap;
  bool too_large;               /* body passed HTTP_MAX_BODY: answer 413 */
  bool answered;                /* a response was queued early */
  char *path_copy;              /* split into params */
  const char *params[HTTP_MAX_PARAMS];
  unsigned nparams;
};

/* ---- answers ---- */

void http_reply(struct http_response *resp, unsigned status, json_t *body)
{
  json_decref(resp->body);
  if (!body) {
    /* A document that could not be built (json_pack failed: out of memory)
     * must not go out as a successful empty answer. */
    status = 500;
    body = json_pack("{s:{s:s, s:s}}", "error", "code", "internal", "message",
                     "cannot build the answer (out of memory)");
  }
  resp->status = status;
  resp->body = body;
}

void http_error(struct http_response *resp, unsigned status, const char *code, const char *fmt,
                ...)
{
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  http_reply(resp, status,
             json_pack("{s:{s:s, s:s}}", "error", "code", code, "message", msg));
}

/* Queues resp on conn; consumes resp->body. */
static enum MHD_Result send_response(struct MHD_Connection *conn, const char *method,
                                     const char *path, struct http_response *resp)
{
  char *text = NULL;
  if (resp->body)
    text = json_dumps(resp->body, JSON_COMPACT | JSON_ENSURE_ASCII);
  if (!text) {
    if (resp->body) {   /* could not serialize: only on ENOMEM */
      resp->status = 500;
      text = strdup("{\"error\":{\"code\":\"internal\",\"message\":\"out of memory\"}}");
    } else {
      text = strdup("{}");
    }
  }
  json_decref(resp->body);
  resp->body = NULL;
  if (!text)
    return MHD_NO;
  /* A trailing newline makes curl output readable; JSON ignores it. */
  size_t len = strlen(text);
  char *full = realloc(text, len + 2);
  if (!full) {
    free(text);
    return MHD_NO;
  }
  full[len] = '\n';
  full[len + 1] = '\0';
  struct MHD_Response *r = MHD_create_response_from_buffer(len + 1, full, MHD_RESPMEM_MUST_FREE);
  if (!r) {
    free(full);
    return MHD_NO;
  }
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
  MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
  if (resp->allow[0])
    MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, resp->allow);
  unsigned status = resp->status ? resp->status : 200;
  enum MHD_Result ret = MHD_queue_response(conn, status, r);
  MHD_destroy_response(r);
  log_debug(NULL, "api: %s %s -> %u", method, path, status);
  return ret;
}

/* ---- routing ---- */

/* Matches path against pattern; on success fills req's params. */
static bool match(const char *pattern, struct http_request *req)
{
  const char *p = pattern, *s = req->path;
  unsigned n = 0;
  const char *params[HTTP_MAX_PARAMS];
  size_t lens[HTTP_MAX_PARAMS];
  while (*p && *s) {
    if (p[0] == '{' && p[1] == '}') {
      size_t seg = strcspn(s, "/");
      if (seg == 0 || n == HTTP_MAX_PARAMS)
        return false;
      params[n] = s;
      lens[n++] = seg;
      p += 2;
      s += seg;
      continue;
    }
    if (*p != *s)
      return false;
    p++;
    s++;
  }
  if (*p || *s)
    return false;

  /* Copy the parameters out of the path, NUL-terminated. */
  free(req->path_copy);
  req->path_copy = strdup(req->path);
  if (!req->path_copy)
    return false;
  for (unsigned i = 0; i < n; i++) {
    char *c = req->path_copy + (params[i] - req->path);
    c[lens[i]] = '\0';
    req->params[i] = c;
  }
  req->nparams = n;
  return true;
}

static void route(struct http_server *srv, struct http_request *req, struct http_response *resp)
{
  char allow[64] = "";
  for (size_t i = 0; i < srv->nroutes; i++) {
    const struct http_route *rt = &srv->routes[i];
    if (!match(rt->pattern, req))
      continue;
    if (strcmp(rt->method, req->method) == 0) {
      rt->fn(srv->ctx, req, resp);
      if (!resp->status)
        resp->status = 200;
      return;
    }
    if (!strstr(allow, rt->method)) {
      size_t n = strlen(allow);
      snprintf(allow + n, sizeof allow - n, "%s%s", n ? ", " : "", rt->method);
    }
  }
  if (allow[0]) {
    snprintf(resp->allow, sizeof resp->allow, "%s", allow);
    http_error(resp, 405, "method_not_allowed", "%s is not allowed on %s (allowed: %s)",
               req->method, req->path, allow);
    return;
  }
  http_error(resp, 404, "not_found", "no route %s %s", req->method, req->path);
}

/* ---- MHD callbacks ---- */

static void request_free(struct http_request *req)
{
  if (!req)
    return;
  free(req->body);
  free(req->path_copy);
  free(req);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
{
  struct http_server *srv = cls;
  struct http_request *req = *con_cls;

  if (!req) {
    req = calloc(1, sizeof *req);
    if (!req)
      return MHD_NO;
    req->conn = conn;
    req->method = method;
    req->path = url;
    *con_cls = req;
    pthread_mutex_lock(&srv->lock);
    srv->active++;
    pthread_mutex_unlock(&srv->lock);

    /* A body announced too large is refused before it is read when the
     * client waits for "100 Continue" or the body is absurd; otherwise it is
     * read and dropped (too_large) so that a client that sends its whole
     * body before reading the answer still gets the 413, not a reset. */
    const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                 MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl) {
      char *end;
      errno = 0;
      unsigned long long n = strtoull(cl, &end, 10);
      if (errno || *end || n > HTTP_MAX_BODY) {
        const char *expect = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                         MHD_HTTP_HEADER_EXPECT);
        if (errno || *end || n > HTTP_MAX_DRAIN || expect) {
          struct http_response resp = { 0 };
          http_error(&resp, 413, "payload_too_large", "request body over %d bytes",
                     HTTP_MAX_BODY);
          req->answered = true;
          return send_response(conn, method, url, &resp);
        }
        req->too_large = true;
      }
    }
    return MHD_YES;
  }

  if (*upload_data_size) {
    size_t n = *upload_data_size;
    *upload_data_size = 0;
    if (req->answered || req->too_large)
      return MHD_YES;   /* drop the rest */
    if (req->len + n > HTTP_MAX_BODY) {
      req->too_large = true;
      free(req->body);
      req->body = NULL;
      req->len = req->cap = 0;
      return MHD_YES;
    }
    if (req->len + n + 1 > req->cap) {
      size_t cap = MAX(req->cap * 2, req->len + n + 1);
      cap = MIN(cap, (size_t)HTTP_MAX_BODY + 1);
      char *b = realloc(req->body, cap);
      if (!b)
        return MHD_NO;
      req->body = b;
      req->cap = cap;
    }
    memcpy(req->body + req->len, upload_data, n);
    req->len += n;
    req->body[req->len] = '\0';
    return MHD_YES;
  }

  if (req->answered)
    return MHD_YES;
  req->answered = true;
  struct http_response resp = { 0 };
  if (req->too_large)
    http_error(&resp, 413, "payload_too_large", "request body over %d bytes", HTTP_MAX_BODY);
  else
    route(srv, req, &resp);
  return send_response(conn, method, url, &resp);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
  struct http_server *srv = cls;
  struct http_request *req = *con_cls;
  if (!req)
    return;
  request_free(req);
  *con_cls = NULL;
  pthread_mutex_lock(&srv->lock);
  if (--srv->active == 0)
    pthread_cond_broadcast(&srv->idle);
  pthread_mutex_unlock(&srv->lock);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
  char msg[512];
  vsnprintf(msg, sizeof msg, fmt, ap);
  msg[strcspn(msg, "\n")] = '\0';
  log_warn(NULL, "api: %s", msg);
}

/* ---- request accessors ---- */

const char *http_method(const struct http_request *req) { return req->method; }
const char *http_path(const struct http_request *req) { return req->path; }

const char *http_param(const struct http_request *req, unsigned i)
{
  return i < req->nparams ? req->params[i] : NULL;
}

const char *http_query(const struct http_request *req, const char *key)
{
  return MHD_lookup_connection_value(req->conn, MHD_GET_ARGUMENT_KIND, key);
}

struct query_check {
  const char *const *allowed;
  const char *bad;
};

static enum MHD_Result check_one(void *cls, enum MHD_ValueKind kind, const char *key,
                                 const char *value)
{
  struct query_check *qc = cls;
  for (const char *const *a = qc->allowed; *a; a++)
    if (strcmp(*a, key) == 0)
      return MHD_YES;
  qc->bad = key;
  return MHD_NO;
}

bool http_query_check(struct http_request *req, const char *const *allowed,
                      struct http_response *resp)
{
  static const char *const none[] = { NULL };
  struct query_check qc = { allowed ? allowed : none, NULL };
  MHD_get_connection_values(req->conn, MHD_GET_ARGUMENT_KIND, check_one, &qc);
  if (qc.bad) {
    http_error(resp, 400, "invalid_argument", "unknown query parameter '%.64s'", qc.bad);
    return false;
  }
  return true;
}

bool http_query_bool(struct http_request *req, const char *key, bool *out,
                     struct http_response *resp)
{
  const char *v = http_query(req, key);
  if (!v)
    return true;
  if (strcmp(v, "true") == 0 || strcmp(v, "1") == 0 || v[0] == '\0') {
    *out = true;   /* "?force" alone means true */
    return true;
  }
  if (strcmp(v, "false") == 0 || strcmp(v, "0") == 0) {
    *out = false;
    return true;
  }
  http_error(resp, 400, "invalid_argument", "query parameter '%s' must be true or false, not '%.64s'",
             key, v);
  return false;
}

bool http_query_uint(struct http_request *req, const char *key, uint64_t min, uint64_t max,
                     uint64_t *out, struct http_response *resp)
{
  const char *v = http_query(req, key);
  if (!v)
    return true;
  char *end;
  errno = 0;
  unsigned long long n = strtoull(v, &end, 10);
  if (v[0] < '0' || v[0] > '9' || errno || *end || n < min || n > max) {
    http_error(resp, 400, "invalid_argument",
               "query parameter '%s' must be an integer from %llu to %llu, not '%.64s'", key,
               (unsigned long long)min, (unsigned long long)max, v);
    return false;
  }
  *out = n;
  return true;
}

json_t *http_body_object(struct http_request *req, bool optional, struct http_response *resp)
{
  if (req->len == 0) {
    if (optional)
      return json_object();
    http_error(resp, 400, "invalid_argument", "request body must be a JSON object");
    return NULL;
  }
  json_error_t jerr;
  json_t *v = json_loadb(req->body, req->len, JSON_REJECT_DUPLICATES, &jerr);
  if (!v) {
    http_error(resp, 400, "invalid_argument", "malformed JSON at line %d column %d: %s",
               jerr.line, jerr.column, jerr.text);
    return NULL;
  }
  if (!json_is_object(v)) {
    json_decref(v);
    http_error(resp, 400, "invalid_argument", "request body must be a JSON object");
    return NULL;
  }
  return v;
}

/* ---- start / stop ---- */

struct http_server *http_start(const char *host_port, const struct http_route *routes,
                               size_t nroutes, void *ctx, char *err, size_t errlen)
{
  struct http_server *srv = calloc(1, sizeof *srv);
  if (!srv) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  srv->routes = routes;
  srv->nroutes = nroutes;
  srv->ctx = ctx;
  pthread_mutex_init(&srv->lock, NULL);
  pthread_cond_init(&srv->idle, NULL);

  int family = AF_INET;
  uint16_t bound_port = 0;
  int fd = net_listen_tcp(host_port, SOCK_NONBLOCK, "API", 64, &family, &bound_port, err,
                          errlen);
  if (fd < 0)
    goto fail;
  unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ITC;
  if (family == AF_INET6)
    flags |= MHD_USE_IPv6;
  srv->mhd = MHD_start_daemon(flags, 0, NULL, NULL, on_request, srv,
                              MHD_OPTION_LISTEN_SOCKET, fd,
                              MHD_OPTION_THREAD_POOL_SIZE, (unsigned)HTTP_THREADS,
                              MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)60,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned)256,
                              MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, NULL,
                              MHD_OPTION_END);
  if (!srv->mhd) {
    snprintf(err, errlen, "cannot start the HTTP server on %s", host_port);
    close(fd);
    goto fail;
  }
  srv->port = bound_port;
  char host[256];
  uint16_t unused;
  parse_host_port(host_port, host, sizeof host, &unused);
  if (strchr(host, ':'))
    snprintf(srv->url, sizeof srv->url, "http://[%s]:%u", host, srv->port);
  else
    snprintf(srv->url, sizeof srv->url, "http://%s:%u", host, srv->port);
  log_info(NULL, "API listening on %s", srv->url);
  return srv;

fail:
  pthread_mutex_destroy(&srv->lock);
  pthread_cond_destroy(&srv->idle);
  free(srv);
  return NULL;
}

uint16_t http_port(const struct http_server *s) { return s->port; }
const char *http_url(const struct http_server *s) { return s->url; }

void http_stop(struct http_server *s)
{
  if (!s)
    return;
  /* Stop accepting; connections already open finish their requests. */
  MHD_socket lfd = MHD_quiesce_daemon(s->mhd);
  if (lfd != MHD_INVALID_SOCKET)
    close(lfd);
  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += HTTP_DRAIN_SECONDS;
  pthread_mutex_lock(&s->lock);
  while (s->active > 0) {
    if (pthread_cond_timedwait(&s->idle, &s->lock, &deadline) == ETIMEDOUT) {
      log_warn(NULL, "api: %u request(s) still running after %d s; stopping anyway", s->active,
               HTTP_DRAIN_SECONDS);
      break;
    }
  }
  pthread_mutex_unlock(&s->lock);
  MHD_stop_daemon(s->mhd);
  pthread_mutex_destroy(&s->lock);
  pthread_cond_destroy(&s->idle);
  free(s);
}
