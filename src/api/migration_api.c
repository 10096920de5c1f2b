/* migration_api: /v1/migrations (docs/api.md): start, watch, tune and
 * cancel migrations; a destination lists the ones coming in. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "api/api.h"
#include "common/log.h"
#include "common/util.h"
#include "replicate/migration.h"
#include "replicate/proto.h"

static const char *path_id(struct http_request *req, struct http_response *resp)
{
  const char *id = http_param(req, 0);
  if (!proto_id_is_valid(id)) {
    http_error(resp, 400, "invalid_argument", "'%.40s' is not a migration id (m-<12 hex>)",
               id ? id : "");
    return NULL;
  }
  return id;
}

static void h_list(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  http_reply(resp, 200, migrations_list_json(a->migrations));
}

static void h_start(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  static const char *const fields[] = { "vm", "to", "mode", "max_downtime", "rate_limit",
                                        "verify", "networks", "preflight_only", "rpo",
                                        "cache_size", "prefetch", "hydrate_rate",
                                        "degraded_after", NULL };
  if (!http_query_check(req, NULL, resp))
    return;
  json_t *body = http_body_object(req, false, resp);
  if (!body)
    return;
  struct migrate_request mr = { 0 };
  const char *vm, *to, *mode, *verify, *prefetch = NULL;
  json_t *jd = json_object_get(body, "max_downtime"), *jr = json_object_get(body, "rate_limit");
  json_t *jrpo = json_object_get(body, "rpo"), *jcs = json_object_get(body, "cache_size"),
         *jhr = json_object_get(body, "hydrate_rate"), *jda = json_object_get(body, "degraded_after");
  uint64_t rpo_ms = 0, da_ms = 0;
  if (!api_only_fields(body, fields, resp) ||
      !api_string_field(body, "vm", true, 64, &vm, resp) || !api_valid_name(vm, resp) ||
      !api_string_field(body, "to", true, 255, &to, resp) ||
      !api_string_field(body, "mode", false, 7, &mode, resp) ||
      !api_string_field(body, "verify", false, 15, &verify, resp) ||
      (jd && !api_duration_ms_field(jd, "max_downtime", &mr.max_downtime_ms, resp)) ||
      (jr && !api_size_field(jr, "rate_limit", true, &mr.rate_limit_bps, resp)) ||
      !api_string_field(body, "prefetch", false, 7, &prefetch, resp) ||
      (jrpo && !api_duration_ms_field(jrpo, "rpo", &rpo_ms, resp)) ||
      (jda && !api_duration_ms_field(jda, "degraded_after", &da_ms, resp)) ||
      (jcs && !api_size_field(jcs, "cache_size", false, &mr.cache_size, resp)) ||
      (jhr && !api_size_field(jhr, "hydrate_rate", true, &mr.hydrate_bps, resp)))
    goto out;
  if ((jrpo && (rpo_ms < 1000 || rpo_ms > 86400000)) ||
      (jda && (da_ms < 1000 || da_ms > 86400000))) {
    http_error(resp, 400, "invalid_argument", "'%s' must be at least 1 s and at most 24 h",
               jrpo && (rpo_ms < 1000 || rpo_ms > 86400000) ? "rpo" : "degraded_after");
    goto out;
  }
  if (jhr && mr.hydrate_bps > (UINT64_C(1) << 40)) {
    http_error(resp, 400, "invalid_argument", "'hydrate_rate' is more than 1 TiB/s");
    goto out;
  }
  if (prefetch && strcmp(prefetch, "hot") != 0 && strcmp(prefetch, "none") != 0) {
    http_error(resp, 400, "invalid_argument", "'prefetch' must be \"hot\" or \"none\"");
    goto out;
  }
  mr.rpo_s = rpo_ms / 1000;
  mr.degraded_after_s = da_ms / 1000;
  mr.hydrate_set = jhr != NULL;
  if (prefetch)
    snprintf(mr.prefetch, sizeof mr.prefetch, "%s", prefetch);
  if (verify && strcmp(verify, "full") != 0 && strcmp(verify, "incremental") != 0) {
    http_error(resp, 400, "invalid_argument", "'verify' must be \"full\" or \"incremental\"");
    goto out;
  }
  if (jd && mr.max_downtime_ms == 0) {
    http_error(resp, 400, "invalid_argument", "'max_downtime' must be more than 0");
    goto out;
  }
  json_t *jn = json_object_get(body, "networks"), *jp = json_object_get(body, "preflight_only");
  if (jp && !json_is_boolean(jp)) {
    http_error(resp, 400, "invalid_argument", "'preflight_only' must be true or false");
    goto out;
  }
  mr.preflight_only = json_is_true(jp);
  if (jn) {
    /* {"SRC": "DST", ...}: NICs on SRC here join DST there. */
    if (!json_is_object(jn) || json_object_size(jn) > NETWORK_MAP_MAX) {
      http_error(resp, 400, "invalid_argument", "'networks' must be an object of at most %d "
                 "\"SOURCE\": \"DESTINATION\" network names", NETWORK_MAP_MAX);
      goto out;
    }
    const char *k;
    json_t *v;
    json_object_foreach(jn, k, v) {
      const char *dst = json_string_value(v);
      if (!name_is_valid(k) || !dst || !name_is_valid(dst)) {
        http_error(resp, 400, "invalid_argument", "'networks': '%.64s' -> %s: network names "
                   "are 1-64 characters of [A-Za-z0-9._-]", k, dst ? dst : "(not a string)");
        goto out;
      }
      snprintf(mr.networks.from[mr.networks.n], sizeof mr.networks.from[0], "%s", k);
      snprintf(mr.networks.to[mr.networks.n], sizeof mr.networks.to[0], "%s", dst);
      mr.networks.n++;
    }
  }
  snprintf(mr.vm, sizeof mr.vm, "%s", vm);
  snprintf(mr.to, sizeof mr.to, "%s", to);
  snprintf(mr.mode, sizeof mr.mode, "%s", mode ? mode : "live");
  mr.verify_full = verify && strcmp(verify, "full") == 0;
  char id[32], err[1024];
  json_t *checks = NULL;
  int r = migrations_start(a->migrations, &mr, id, sizeof id, &checks, err, sizeof err);
  if (r == -EPERM && checks) {
    /* The whole list, so the operator sees every failed check at once. */
    http_reply(resp, 412, json_pack("{s:{s:s, s:s}, s:o}", "error", "code", "preflight_failed",
                                    "message", err, "preflight", checks));
    checks = NULL;
  } else if (r < 0) {
    api_answer_errno(resp, r, err, true);
    api_log_server_error(req, resp);
  } else if (mr.preflight_only) {
    http_reply(resp, 200, json_pack("{s:b, s:o}", "ok", true, "preflight", checks));
    checks = NULL;
  } else {
    http_reply(resp, 201, migration_json(a->migrations, id, err, sizeof err));
  }
  json_decref(checks);
out:
  json_decref(body);
}

static void h_get(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  const char *id = path_id(req, resp);
  if (!id)
    return;
  char err[512];
  json_t *j = migration_json(a->migrations, id, err, sizeof err);
  if (!j)
    http_error(resp, 404, "not_found", "%s", err);
  else
    http_reply(resp, 200, j);
}

static void h_cancel(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  const char *id = path_id(req, resp);
  if (!id)
    return;
  char err[512];
  int r = migrations_cancel(a->migrations, id, err, sizeof err);
  if (r < 0) {
    api_answer_errno(resp, r, err, false);
    api_log_server_error(req, resp);
    return;
  }
  http_reply(resp, 200, migration_json(a->migrations, id, err, sizeof err));
}

static void h_update(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  static const char *const fields[] = { "rate_limit", NULL };
  if (!http_query_check(req, NULL, resp))
    return;
  const char *id = path_id(req, resp);
  if (!id)
    return;
  json_t *body = http_body_object(req, false, resp);
  if (!body)
    return;
  uint64_t rate = 0;
  json_t *jr = json_object_get(body, "rate_limit");
  if (api_only_fields(body, fields, resp)) {
    if (!jr) {
      http_error(resp, 400, "invalid_argument", "missing field 'rate_limit'");
    } else if (api_size_field(jr, "rate_limit", true, &rate, resp)) {
      char err[512];
      int r = migrations_set_rate_limit(a->migrations, id, rate, err, sizeof err);
      if (r < 0) {
        api_answer_errno(resp, r, err, false);
        api_log_server_error(req, resp);
      } else {
        http_reply(resp, 200, migration_json(a->migrations, id, err, sizeof err));
      }
    }
  }
  json_decref(body);
}

/* POST /v1/migrations/{id or VM}/commit | migrate-back | rpo-now (warm). */
static void warm_command(struct api *a, struct http_request *req, struct http_response *resp,
                         const char *cmd)
{
  if (!http_query_check(req, NULL, resp))
    return;
  const char *id = http_param(req, 0);
  if (!id || (!proto_id_is_valid(id) && !name_is_valid(id))) {
    http_error(resp, 400, "invalid_argument", "'%.40s' is neither a migration id nor a VM name",
               id ? id : "");
    return;
  }
  json_t *body = http_body_object(req, true, resp);
  if (!body)
    return;
  static const char *const fields[] = { "last_rpo", "wait", NULL };
  json_t *jl = json_object_get(body, "last_rpo"), *jw = json_object_get(body, "wait");
  uint64_t wait_ms = 600000;
  if (!api_only_fields(body, fields, resp) ||
      (jw && !api_duration_ms_field(jw, "wait", &wait_ms, resp)))
    goto out;
  if (jl && !json_is_boolean(jl)) {
    http_error(resp, 400, "invalid_argument", "'last_rpo' must be true or false");
    goto out;
  }
  if (jl && strcmp(cmd, "back") != 0) {
    http_error(resp, 400, "invalid_argument", "'last_rpo' goes with migrate-back only");
    goto out;
  }
  if (json_is_true(jl))
    cmd = "back-rpo";
  char err[1024];
  int r = migrations_warm_command(a->migrations, id, cmd, (unsigned)MIN(wait_ms / 1000, 3600),
                                  err, sizeof err);
  if (r == -EINPROGRESS) {
    http_error(resp, 504, "in_progress", "%s", err);
  } else if (r < 0) {
    api_answer_errno(resp, r, err, false);
    api_log_server_error(req, resp);
  } else {
    json_t *list = migrations_list_json(a->migrations);
    /* The migration's document: by id, or the VM's newest. */
    json_t *found = NULL, *x;
    size_t i;
    json_array_foreach(json_object_get(list, "migrations"), i, x) {
      const char *mid = json_string_value(json_object_get(x, "id"));
      const char *mvm = json_string_value(json_object_get(x, "vm"));
      if ((mid && strcmp(mid, id) == 0) || (mvm && strcmp(mvm, id) == 0 &&
          strcmp(json_string_value(json_object_get(x, "mode")) ?: "", "warm") == 0))
        found = x;
    }
    http_reply(resp, 200, found ? json_incref(found) : json_pack("{s:b}", "ok", true));
    json_decref(list);
  }
out:
  json_decref(body);
}

static void h_commit(void *ctx, struct http_request *req, struct http_response *resp)
{
  warm_command(ctx, req, resp, "commit");
}
static void h_back(void *ctx, struct http_request *req, struct http_response *resp)
{
  warm_command(ctx, req, resp, "back");
}
static void h_rpo_now(void *ctx, struct http_request *req, struct http_response *resp)
{
  warm_command(ctx, req, resp, "rpo-now");
}

/* /v1/snapshots: restore points of warm migrations' sources. */
static void h_snap_list(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  http_reply(resp, 200, migrations_snapshots_json(a->migrations));
}

/* DELETE /v1/snapshots/VM, POST /v1/snapshots/VM/restore. */
static void snapshot_op(struct api *a, struct http_request *req, struct http_response *resp,
                        bool restore)
{
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  const char *vm = http_param(req, 0);
  if (!api_valid_name(vm, resp))
    return;
  char err[1024];
  int r = migrations_snapshot_op(a->migrations, vm, restore, err, sizeof err);
  if (r < 0) {
    api_answer_errno(resp, r, err, false);
    api_log_server_error(req, resp);
    return;
  }
  http_reply(resp, 200, json_pack("{s:b, s:s}", "ok", true, "vm", vm));
}

static void h_snap_rm(void *ctx, struct http_request *req, struct http_response *resp)
{
  snapshot_op(ctx, req, resp, false);
}

static void h_snap_restore(void *ctx, struct http_request *req, struct http_response *resp)
{
  snapshot_op(ctx, req, resp, true);
}

const struct http_route migration_routes[] = {
  { "GET", "/v1/migrations", h_list },
  { "POST", "/v1/migrations", h_start },
  { "GET", "/v1/migrations/{}", h_get },
  { "PUT", "/v1/migrations/{}", h_update },
  { "POST", "/v1/migrations/{}/cancel", h_cancel },
  { "POST", "/v1/migrations/{}/commit", h_commit },
  { "POST", "/v1/migrations/{}/migrate-back", h_back },
  { "POST", "/v1/migrations/{}/rpo-now", h_rpo_now },
  { "GET", "/v1/snapshots", h_snap_list },
  { "DELETE", "/v1/snapshots/{}", h_snap_rm },
  { "POST", "/v1/snapshots/{}/restore", h_snap_restore },
};
const size_t migration_nroutes = sizeof migration_routes / sizeof migration_routes[0];
