/* host_api: what this host offers its VMs (docs/api.md): /v1/hypervisors
 * (each driver's probe: QEMU's version, machines, CPU models, KVM) and
 * /v1/networks (the networks a VM's NICs attach to). */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "api/api.h"
#include "common/util.h"
#include "vm/vm.h"

static void h_hv_list(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  json_t *arr = json_array();
  static const char *const drivers[] = { "sim", "qemu" };
  for (size_t i = 0; i < ARRAY_SIZE(drivers); i++) {
    json_t *p = NULL;
    char err[512];
    if (vm_hypervisor_probe(a->vms, drivers[i], false, &p, err, sizeof err) == 0)
      json_array_append_new(arr, p);
  }
  http_reply(resp, 200, json_pack("{s:o}", "hypervisors", arr));
}

static void h_hv_get(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  static const char *const q[] = { "refresh", NULL };
  bool refresh = false;
  if (!http_query_check(req, q, resp) || !http_query_bool(req, "refresh", &refresh, resp) ||
      !api_no_body(req, resp))
    return;
  const char *driver = http_param(req, 0);
  if (!driver || (strcmp(driver, "sim") != 0 && strcmp(driver, "qemu") != 0)) {
    http_error(resp, 404, "not_found", "no hypervisor driver '%.40s' (sim, qemu)",
               driver ? driver : "");
    return;
  }
  json_t *p = NULL;
  char err[512];
  int r = vm_hypervisor_probe(a->vms, driver, refresh, &p, err, sizeof err);
  if (r < 0) {
    api_answer_errno(resp, r, err, false);
    api_log_server_error(req, resp);
    return;
  }
  http_reply(resp, 200, p);
}

static void h_net_list(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  http_reply(resp, 200, vm_network_list_json(a->vms));
}

static void h_net_add(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  static const char *const fields[] = { "name", "type", "bridge", NULL };
  if (!http_query_check(req, NULL, resp))
    return;
  json_t *body = http_body_object(req, false, resp);
  if (!body)
    return;
  const char *name, *type, *bridge;
  if (api_only_fields(body, fields, resp) &&
      api_string_field(body, "name", true, 64, &name, resp) && api_valid_name(name, resp) &&
      api_string_field(body, "type", true, 16, &type, resp) &&
      api_string_field(body, "bridge", false, 64, &bridge, resp)) {
    char err[512];
    int r = vm_network_add(a->vms, name, type, bridge, err, sizeof err);
    if (r < 0) {
      api_answer_errno(resp, r, err, true);
      api_log_server_error(req, resp);
    } else {
      http_reply(resp, 201, vm_network_json(a->vms, name, err, sizeof err));
    }
  }
  json_decref(body);
}

static void h_net_get(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  const char *name = http_param(req, 0);
  if (!api_valid_name(name, resp))
    return;
  char err[512];
  json_t *j = vm_network_json(a->vms, name, err, sizeof err);
  if (!j)
    http_error(resp, 404, "not_found", "%s", err);
  else
    http_reply(resp, 200, j);
}

static void h_net_delete(void *ctx, struct http_request *req, struct http_response *resp)
{
  struct api *a = ctx;
  if (!http_query_check(req, NULL, resp) || !api_no_body(req, resp))
    return;
  const char *name = http_param(req, 0);
  if (!api_valid_name(name, resp))
    return;
  char err[512];
  int r = vm_network_remove(a->vms, name, err, sizeof err);
  if (r < 0) {
    api_answer_errno(resp, r, err, false);
    api_log_server_error(req, resp);
    return;
  }
  http_reply(resp, 200, json_pack("{s:s}", "removed", name));
}

const struct http_route host_routes[] = {
  { "GET", "/v1/hypervisors", h_hv_list },
  { "GET", "/v1/hypervisors/{}", h_hv_get },
  { "GET", "/v1/networks", h_net_list },
  { "POST", "/v1/networks", h_net_add },
  { "GET", "/v1/networks/{}", h_net_get },
  { "DELETE", "/v1/networks/{}", h_net_delete },
};
const size_t host_nroutes = sizeof host_routes / sizeof host_routes[0];
