/* http: a small JSON-over-HTTP router on libmicrohttpd for ferryd's REST API.
 *
 * Routes are a static table of (method, pattern, handler); a pattern's "{}"
 * segment matches one non-empty path segment and is handed to the handler as
 * a parameter.  The router answers by itself: 404 not_found for a path no
 * pattern matches, 405 method_not_allowed (with Allow) for a path that
 * matches with another method, 413 payload_too_large for a body over
 * HTTP_MAX_BODY.  Every answer is a JSON document; every error has the shape
 * {"error":{"code":CODE,"message":TEXT}} (http_error).
 *
 * Thread model: handlers run on the server's threads (a pool of two), many
 * at once; the ctx they get is shared and must be thread-safe.  http_stop()
 * stops accepting, lets requests in flight finish (bounded wait), then stops.
 */
#ifndef FERRY_HTTP_H
#define FERRY_HTTP_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef FERRY_VERSION
#define FERRY_VERSION "0.1.0"
#endif

#define HTTP_MAX_BODY (1024 * 1024)
#define HTTP_MAX_PARAMS 4

struct http_server;
struct http_request;

struct http_response {
  unsigned status;     /* HTTP status; 200 unless set */
  json_t *body;        /* owned by the response; NULL answers {} */
  char allow[64];      /* Allow header for 405, "" when none */
};

typedef void (*http_handler_fn)(void *ctx, struct http_request *req, struct http_response *resp);

struct http_route {
  const char *method;   /* "GET", "POST", "PUT", "DELETE" */
  const char *pattern;  /* e.g. "/v1/disks/{}/dirty" */
  http_handler_fn fn;
};

/* Listens on host_port ("HOST:PORT" or "[V6]:PORT"; port 0 picks a free
 * one) and serves the routes (which must outlive the server).  Returns NULL
 * with a message in err. */
struct http_server *http_start(const char *host_port, const struct http_route *routes,
                               size_t nroutes, void *ctx, char *err, size_t errlen);
/* The port actually bound. */
uint16_t http_port(const struct http_server *s);
/* "http://HOST:PORT" (IPv6 hosts in brackets). */
const char *http_url(const struct http_server *s);
void http_stop(struct http_server *s);

/* --- request accessors, valid during the handler --- */
const char *http_method(const struct http_request *req);
const char *http_path(const struct http_request *req);
/* The i-th "{}" segment of the matched pattern, or NULL. */
const char *http_param(const struct http_request *req, unsigned i);
/* A query argument ("?force=true"), or NULL when absent. */
const char *http_query(const struct http_request *req, const char *key);
/* Refuses (400, returns false) a query argument not in allowed (NULL-ended). */
bool http_query_check(struct http_request *req, const char *const *allowed,
                      struct http_response *resp);
/* Parses an optional boolean query argument "true"/"false"/"1"/"0";
 * false + 400 on anything else. */
bool http_query_bool(struct http_request *req, const char *key, bool *out,
                     struct http_response *resp);
/* Parses an optional unsigned query argument in [min, max]; false + 400 on
 * anything else.  *out is left alone when the argument is absent. */
bool http_query_uint(struct http_request *req, const char *key, uint64_t min, uint64_t max,
                     uint64_t *out, struct http_response *resp);

/* The body as a JSON object (a new reference), or NULL with a 400 set on
 * resp.  With optional, an empty body reads as {}. */
json_t *http_body_object(struct http_request *req, bool optional, struct http_response *resp);

/* --- answers --- */
/* Sets an error answer (replaces any body). */
void http_error(struct http_response *resp, unsigned status, const char *code, const char *fmt,
                ...) __attribute__((format(printf, 4, 5)));
/* Sets a JSON answer; steals body.  A NULL body (a document that could not
 * be built) answers 500 internal instead. */
void http_reply(struct http_response *resp, unsigned status, json_t *body);

#endif
