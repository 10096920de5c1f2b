/* site_api: /v1/site and /v1/peers (docs/api.md): this site's identity for
 * the site link, and the peers it is paired with. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "api/api.h"
#include "common/log.h"
#include "common/util.h"
#include "link/link.h"
#include "site/site.h"

static json_t *site_json(struct api *a)
{
  struct link_identity *id = site_identity(a->site);
  char link[256];
  site_link_address(a->site, link, sizeof link);
  json_t *j = json_pack("{s:b}", "initialised", id != NULL);
  json_object_set_new(j, "name", id ? json_string(link_identity_name(id)) : json_null());
  json_object_set_new(j, "fingerprint",
                      id ? json_string(link_identity_fingerprint(id)) : json_null());
  json_object_set_new(j, "certificate",
                      id ? json_string(link_identity_cert_pem(id)) : json_null());
  json_object_set_new(j, "link", link[0] ? json_string(link) : json_null());
  return j;
}

static void h_site(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  http_reply(resp, 200, site_json(a));
}

static void h_site_init(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  static const char *const fields[] = { "name", NULL };
  if (!http_query_check(req, NULL, resp))
    return;
  json_t *body = http_body_object(req, true, resp);
  if (!body)
    return;
  const char *name = NULL;
  if (!api_only_fields(body, fields, resp) ||
      !api_string_field(body, "name", false, 64, &name, resp) ||
      (name && !api_valid_name(name, resp)))
    goto out;
  char err[512];
  bool created = false;
  int r = site_init(a->site, name, &created, err, sizeof err);
  if (r < 0) {
    api_answer_errno(resp, r, err, false);
    api_log_server_error(req, resp);
    goto out;
  }
  if (a->on_site_init && a->on_site_init(a->on_site_init_opaque, err, sizeof err) < 0) {
    http_error(resp, 500, "io_error", "site initialised, but the site link cannot start: %s",
               err);
    api_log_server_error(req, resp);
    goto out;
  }
  json_t *j = site_json(a);
  json_object_set_new(j, "created", json_boolean(created));
  http_reply(resp, created ? 201 : 200, j);
out:
  json_decref(body);
}

static void h_peers(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  http_reply(resp, 200, site_peers_json(a->site));
}

static void h_peer_add(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  static const char *const fields[] = { "name", "api_url", "link", "fingerprint", NULL };
  if (!http_query_check(req, NULL, resp))
    return;
  json_t *body = http_body_object(req, false, resp);
  if (!body)
    return;
  const char *name, *url, *link, *fp;
  if (!api_only_fields(body, fields, resp) ||
      !api_string_field(body, "name", true, 64, &name, resp) ||
      !api_valid_name(name, resp) ||
      !api_string_field(body, "api_url", true, 255, &url, resp) ||
      !api_string_field(body, "link", true, 255, &link, resp) ||
      !api_string_field(body, "fingerprint", true, LINK_FINGERPRINT_LEN - 1, &fp, resp))
    goto out;
  struct site_peer p = { 0 };
  snprintf(p.name, sizeof p.name, "%s", name);
  snprintf(p.api_url, sizeof p.api_url, "%s", url);
  snprintf(p.link, sizeof p.link, "%s", link);
  snprintf(p.fingerprint, sizeof p.fingerprint, "%s", fp);
  char err[512];
  int r = site_peer_add(a->site, &p, err, sizeof err);
  if (r < 0) {
    api_answer_errno(resp, r, err, false);
    api_log_server_error(req, resp);
    goto out;
  }
  struct site_peer got;
  if (site_peer_find(a->site, name, &got, err, sizeof err) == 0)
    http_reply(resp, 201, site_peer_json(&got));
  else
    http_reply(resp, 201, site_peer_json(&p));
out:
  json_decref(body);
}

static void h_peer_get(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  const char *name = http_param(req, 0);
  if (!api_valid_name(name, resp))
    return;
  struct site_peer p;
  char err[512];
  if (site_peer_find(a->site, name, &p, err, sizeof err) < 0 || strcmp(p.name, name) != 0) {
    http_error(resp, 404, "not_found", "no peer named '%s'", name);
    return;
  }
  http_reply(resp, 200, site_peer_json(&p));
}

static void h_peer_delete(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  const char *name = http_param(req, 0);
  if (!api_valid_name(name, resp))
    return;
  char err[512];
  int r = site_peer_remove(a->site, name, err, sizeof err);
  if (r < 0) {
    api_answer_errno(resp, r, err, false);
    api_log_server_error(req, resp);
    return;
  }
  http_reply(resp, 200, json_pack("{s:s}", "removed", name));
}

const struct http_route site_routes[] = {
  { "GET", "/v1/site", h_site },
  { "POST", "/v1/site/init", h_site_init },
  { "GET", "/v1/peers", h_peers },
  { "POST", "/v1/peers", h_peer_add },
  { "GET", "/v1/peers/{}", h_peer_get },
  { "DELETE", "/v1/peers/{}", h_peer_delete },
};
const size_t site_nroutes = sizeof site_routes / sizeof site_routes[0];
