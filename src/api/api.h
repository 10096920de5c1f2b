/* api: ferryd's REST API (docs/api.md): one HTTP server (http.h) whose
 * route table is the union of each component's routes, and the input and
 * error helpers every handler shares.
 *
 *   disk_api.c       /v1/health, /v1/disks...
 *   site_api.c       /v1/site, /v1/peers...
 *   vm_api.c         /v1/vms...
 *   host_api.c       /v1/hypervisors..., /v1/networks...
 *   migration_api.c  /v1/migrations...
 *
 * Every handler gets the struct api as its ctx; everything it points to is
 * thread-safe and outlives the server.  Each handler checks all of its input
 * before it changes anything (unknown fields and query parameters are
 * refused) and maps -errno to the error codes of docs/api.md through
 * api_answer_errno. */
#ifndef FERRY_API_H
#define FERRY_API_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "api/http.h"

struct registry;
struct nbd_listener;
struct site;
struct vm_manager;
struct migrations;

struct api {
  struct registry *reg;
  struct nbd_listener *nbd;
  struct site *site;
  struct vm_manager *vms;
  struct migrations *migrations;
  /* Called after POST /v1/site/init, so ferryd can start its site link. */
  int (*on_site_init)(void *opaque, char *err, size_t errlen);
  void *on_site_init_opaque;
  struct http_server *http;
};

/* Serves the API on host_port (port 0 picks one).  a's members must be set
 * and outlive the server.  0 or -1 with err. */
int api_start(struct api *a, const char *host_port, char *err, size_t errlen);
const char *api_url(const struct api *a);
void api_stop(struct api *a);

extern const struct http_route disk_routes[], site_routes[], vm_routes[], migration_routes[],
  host_routes[];
extern const size_t disk_nroutes, site_nroutes, vm_nroutes, migration_nroutes, host_nroutes;

/* -errno -> HTTP error: -EINVAL 400 invalid_argument, -ENOENT 404 not_found
 * (400 when enoent_is_input: the route exists, an input names something
 * missing), -EEXIST 409 already_exists, -EBUSY 409 busy, -EHOSTUNREACH 503
 * unavailable, -EOPNOTSUPP 501 not_supported, -ENOMEM 500 internal, anything else
 * 500 io_error. */
void api_answer_errno(struct http_response *resp, int err, const char *msg, bool enoent_is_input);
/* Logs answers >= 500 once (4xx are the client's business; 501 is a driver
 * that cannot do what was asked, not a failure). */
void api_log_server_error(struct http_request *req, const struct http_response *resp);
/* Disk/VM/site names: name_is_valid(); false with 400 set. */
bool api_valid_name(const char *name, struct http_response *resp);
/* Routes without a body accept none, or an empty object. */
bool api_no_body(struct http_request *req, struct http_response *resp);
/* Refuses any member of obj not in allowed (NULL-terminated). */
bool api_only_fields(json_t *obj, const char *const *allowed, struct http_response *resp);
/* A size or rate field: an integer (bytes) or "10G" / "50M/s". */
bool api_size_field(json_t *v, const char *field, bool rate, uint64_t *out,
                    struct http_response *resp);
/* A duration field: an integer (milliseconds) or "500ms", "2s", "1m". */
bool api_duration_ms_field(json_t *v, const char *field, uint64_t *out,
                           struct http_response *resp);
/* An optional string field of at most maxlen characters; false with 400. */
bool api_string_field(json_t *obj, const char *field, bool required, size_t maxlen,
                      const char **out, struct http_response *resp);

#endif
