/* vm_api: /v1/vms (docs/api.md): define, run and check VMs (sim and qemu). */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "api/api.h"
#include "common/log.h"
#include "common/util.h"
#include "vm/vm.h"

static const char *path_vm(struct http_request *req, struct http_response *resp)
{
  const char *name = http_param(req, 0);
  return api_valid_name(name, resp) ? name : NULL;
}

static void h_list(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  http_reply(resp, 200, vm_list_json(a->vms));
}

static void h_create(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp))
    return;
  json_t *body = http_body_object(req, false, resp);
  if (!body)
    return;
  /* The one parser of VM definitions (vm.h), the same a peer site's
   * spec goes through. */
  struct vm_spec spec;
  char err[512];
  int r = vm_spec_from_json(body, &spec, err, sizeof err);
  if (r == 0)
    r = vm_create(a->vms, &spec, err, sizeof err);
  if (r < 0) {
    api_answer_errno(resp, r, err, true);
    api_log_server_error(req, resp);
  } else {
    http_reply(resp, 201, vm_json(a->vms, spec.name, err, sizeof err));
  }
  json_decref(body);
}

static void h_get(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  const char *name = path_vm(req, resp);
  if (!name)
    return;
  char err[512];
  json_t *j = vm_json(a->vms, name, err, sizeof err);
  if (!j)
    http_error(resp, 404, "not_found", "%s", err);
  else
    http_reply(resp, 200, j);
}

static void h_delete(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  static const char *const q[] = { "force", NULL };
  bool force = false;
  if (!http_query_check(req, q, resp) || !http_query_bool(req, "force", &force, resp) ||
      !api_no_body(req, resp))
    return;
  const char *name = path_vm(req, resp);
  if (!name)
    return;
  char err[512];
  int r = vm_remove(a->vms, name, force, err, sizeof err);
  if (r < 0) {
    api_answer_errno(resp, r, err, false);
    api_log_server_error(req, resp);
    return;
  }
  http_reply(resp, 200, json_pack("{s:s}", "removed", name));
}

/* start / stop / pause / resume: one shape. */
static void action(struct api *a, struct http_request *req, struct http_response *resp,
                   int (*fn)(struct vm_manager *, const char *, char *, size_t))
{
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  const char *name = path_vm(req, resp);
  if (!name)
    return;
  char err[512];
  int r = fn(a->vms, name, err, sizeof err);
  if (r < 0) {
    api_answer_errno(resp, r, err, false);
    api_log_server_error(req, resp);
    return;
  }
  json_t *j = vm_json(a->vms, name, err, sizeof err);
  http_reply(resp, 200, j);
}

static void h_start(void *ctx, struct http_request *req, struct http_response *resp)
{
  action(ctx, req, resp, vm_start);
}
static void h_stop(void *ctx, struct http_request *req, struct http_response *resp)
{
  action(ctx, req, resp, vm_stop);
}
static void h_pause(void *ctx, struct http_request *req, struct http_response *resp)
{
  action(ctx, req, resp, vm_pause);
}
static void h_resume(void *ctx, struct http_request *req, struct http_response *resp)
{
  action(ctx, req, resp, vm_resume);
}

static void h_verify(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  const char *name = path_vm(req, resp);
  if (!name)
    return;
  char err[512];
  json_t *report = NULL;
  int r = vm_verify(a->vms, name, &report, err, sizeof err);
  if (r < 0) {
    api_answer_errno(resp, r, err, false);
    api_log_server_error(req, resp);
    return;
  }
  http_reply(resp, 200, report);
}

static void h_workload(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  static const char *const fields[] = { "workload", NULL };
  if (!http_query_check(req, NULL, resp))
    return;
  const char *name = path_vm(req, resp);
  if (!name)
    return;
  json_t *body = http_body_object(req, false, resp);
  if (!body)
    return;
  const char *w;
  if (api_only_fields(body, fields, resp) &&
      api_string_field(body, "workload", true, 255, &w, resp)) {
    char err[512];
    int r = vm_set_workload(a->vms, name, w, err, sizeof err);
    if (r < 0) {
      api_answer_errno(resp, r, err, false);
      api_log_server_error(req, resp);
    } else {
      http_reply(resp, 200, vm_json(a->vms, name, err, sizeof err));
    }
  }
  json_decref(body);
}

const struct http_route vm_routes[] = {
  { "GET", "/v1/vms", h_list },
  { "POST", "/v1/vms", h_create },
  { "GET", "/v1/vms/{}", h_get },
  { "DELETE", "/v1/vms/{}", h_delete },
  { "POST", "/v1/vms/{}/start", h_start },
  { "POST", "/v1/vms/{}/stop", h_stop },
  { "POST", "/v1/vms/{}/pause", h_pause },
  { "POST", "/v1/vms/{}/resume", h_resume },
  { "POST", "/v1/vms/{}/verify", h_verify },
  { "PUT", "/v1/vms/{}/workload", h_workload },
};
const size_t vm_nroutes = sizeof vm_routes / sizeof vm_routes[0];
