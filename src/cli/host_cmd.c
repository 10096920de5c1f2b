/* host_cmd: `ferry network ...` and `ferry hypervisor ...` (docs/cli.md):
 * what this host offers its VMs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/util.h"

/* ---- networks ---- */

static void print_network(const json_t *n)
{
  const char *br = json_string_value(json_object_get(n, "bridge"));
  printf("network %s: %s%s%s\n", j_str(n, "name"), j_str(n, "type"), br ? ", bridge " : "",
         br ? br : "");
  const json_t *users = json_object_get(n, "used_by");
  printf("  used by:  ");
  size_t i;
  const json_t *u;
  json_array_foreach(users, i, u) printf("%s%s", i ? ", " : "", json_string_value(u));
  printf("%s\n", json_array_size(users) ? "" : "(no VM)");
  printf("  created:  %s\n", j_str(n, "created_at"));
}

static void print_network_list(const json_t *answer)
{
  const json_t *nets = json_object_get(answer, "networks");
  static const char *const h[] = { "NAME", "TYPE", "BRIDGE", "USED-BY" };
  struct table *t = table_new(4, h);
  size_t i;
  const json_t *n;
  json_array_foreach(nets, i, n) {
    char users[512] = "";
    size_t k;
    const json_t *u;
    json_array_foreach(json_object_get(n, "used_by"), k, u) {
      size_t l = strlen(users);
      snprintf(users + l, sizeof users - l, "%s%s", k ? "," : "", json_string_value(u));
    }
    const char *br = json_string_value(json_object_get(n, "bridge"));
    const char *cells[] = { j_str(n, "name"), j_str(n, "type"), br ? br : "-",
                            users[0] ? users : "-" };
    table_add(t, cells);
  }
  if (json_array_size(nets) == 0)
    printf("no networks\n");
  else
    table_print(t, stdout, "");
  table_free(t);
}

static const char usage_net_add[] =
  "Usage: ferry network add NAME --type user|bridge [--bridge BR]\n"
  "Defines a network of this site for the NICs of qemu VMs (ferry vm create --nic\n"
  "network=NAME).  ferry creates nothing on the host:\n"
  "  --type user      QEMU user-mode networking (-netdev user): outgoing\n"
  "                   connections through QEMU, no setup, nothing reaches the guest\n"
  "  --type bridge    the NIC is a tap on an existing Linux bridge (-netdev\n"
  "                   bridge, through qemu-bridge-helper, which must allow it in\n"
  "                   /etc/qemu/bridge.conf)\n"
  "  --bridge BR      the bridge of a 'bridge' network (1-15 characters)\n";

static int net_add(struct cli *c, int argc, char **argv)
{
  const char *type = NULL, *bridge = NULL, *pos[1];
  const struct opt_spec spec[] = {
    { "type", true, &type, NULL, NULL, NULL, 0 },
    { "bridge", true, &bridge, NULL, NULL, NULL, 0 },
  };
  int npos, r = parse_args("network add", usage_net_add, argc, argv, spec, ARRAY_SIZE(spec), pos,
                           1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("network add", pos[0])))
    return r;
  if (!type)
    return cli_usage_error("network add", "missing --type user|bridge");
  if (strcmp(type, "user") != 0 && strcmp(type, "bridge") != 0)
    return cli_usage_error("network add", "unknown --type '%s' (user, bridge)", type);
  if (strcmp(type, "bridge") == 0 && !bridge)
    return cli_usage_error("network add", "a bridge network needs --bridge BR");
  if (strcmp(type, "user") == 0 && bridge)
    return cli_usage_error("network add", "--bridge applies to --type bridge only");
  json_t *body = json_pack("{s:s, s:s}", "name", pos[0], "type", type);
  if (bridge)
    json_object_set_new(body, "bridge", json_string(bridge));
  r = call_and_show(c, "POST", "/v1/networks", body, print_network);
  json_decref(body);
  return r;
}

static int net_list(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  int npos, r = parse_args("network list", "Usage: ferry network list\nThe networks of this "
                           "site and the VMs on each.\n", argc, argv, NULL, 0, pos, 0, 0, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  return call_and_show(c, "GET", "/v1/networks", NULL, print_network_list);
}

static int net_show(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  int npos, r = parse_args("network show", "Usage: ferry network show NAME\nOne network: type, "
                           "bridge, the VMs on it.\n", argc, argv, NULL, 0, pos, 1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("network show", pos[0])))
    return r;
  char path[160];
  snprintf(path, sizeof path, "/v1/networks/%s", pos[0]);
  return call_and_show(c, "GET", path, NULL, print_network);
}

static int net_rm(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  int npos, r = parse_args("network rm", "Usage: ferry network rm NAME\nRemoves a network; "
                           "refused while a VM has a NIC on it.\n", argc, argv, NULL, 0, pos, 1,
                           1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("network rm", pos[0])))
    return r;
  char path[160];
  snprintf(path, sizeof path, "/v1/networks/%s", pos[0]);
  json_t *answer = NULL;
  r = cli_call(c, "DELETE", path, NULL, &answer);
  if (r == EXIT_OK && !c->json)
    printf("network %s removed\n", pos[0]);
  json_decref(answer);
  return r;
}

static const char usage_network[] =
  "Usage: ferry network SUBCOMMAND ...\n"
  "  add NAME --type user|bridge [--bridge BR]\n"
  "  list (ls) | show NAME\n"
  "  rm NAME                   refused while a VM uses it\n"
  "'ferry network SUBCOMMAND --help' tells more.\n";

/* ---- hypervisors ---- */

/* A list of names, wrapped under a label. */
static void print_names(const char *label, const json_t *arr)
{
  printf("  %-12s", label);
  size_t col = 14, i;
  const json_t *x;
  json_array_foreach(arr, i, x) {
    const char *s = json_string_value(x);
    size_t n = strlen(s ? s : "") + 2;
    if (i && col + n > 92) {
      printf(",\n%14s", "");
      col = 14;
    } else if (i) {
      printf(", ");
    }
    printf("%s", s ? s : "?");
    col += n;
  }
  printf("%s\n", json_array_size(arr) ? "" : "-");
}

static void print_hypervisor(const json_t *h)
{
  bool present = j_bool(h, "present");
  const char *driver = j_str(h, "driver");
  if (strcmp(driver, "sim") == 0) {
    printf("hypervisor sim: %s (%s)\n", present ? "present" : "NOT PRESENT", j_str(h, "program"));
    if (!present)
      printf("  why:        %s\n", j_str(h, "why"));
    return;
  }
  if (!present) {
    printf("hypervisor qemu: NOT PRESENT (%s)\n  why:        %s\n", j_str(h, "program"),
           j_str(h, "why"));
  } else {
    printf("hypervisor qemu: QEMU %s (%s)\n", j_str(h, "version"), j_str(h, "program"));
  }
  const json_t *kvm = json_object_get(h, "kvm");
  char b[32];
  printf("  accel:      %s\n", j_str(h, "accel"));
  printf("  kvm:        %s: %s\n", !j_bool(kvm, "present") ? "absent"
         : j_bool(kvm, "usable") ? "usable" : "present but unusable", j_str(kvm, "why"));
  printf("  memory:     %s available\n", fmt_bytes(j_u64(h, "mem_available"), b, sizeof b));
  if (present) {
    print_names("machines:", json_object_get(h, "machines"));
    print_names("cpu models:", json_object_get(h, "cpu_models"));
  }
}

static void print_hypervisor_list(const json_t *answer)
{
  size_t i;
  const json_t *h;
  json_array_foreach(json_object_get(answer, "hypervisors"), i, h) {
    const json_t *kvm = json_object_get(h, "kvm");
    if (strcmp(j_str(h, "driver"), "qemu") == 0)
      printf("qemu  %s  %s, accel %s%s\n", j_bool(h, "present") ? "present" : "NOT PRESENT",
             j_bool(h, "present") ? j_str(h, "version") : j_str(h, "why"), j_str(h, "accel"),
             j_bool(kvm, "usable") ? "" : " (KVM unusable)");
    else
      printf("%-4s  %s  %s\n", j_str(h, "driver"), j_bool(h, "present") ? "present" : "NOT PRESENT",
             j_str(h, "program"));
  }
}

static const char usage_hv_show[] =
  "Usage: ferry hypervisor show qemu|sim [--refresh]\n"
  "What this host offers a hypervisor driver.  qemu: the QEMU program and version,\n"
  "its machine types and CPU models (as QEMU itself lists them), whether KVM is\n"
  "present and really usable (a test guest must run at hardware speed; else qemu\n"
  "VMs run on TCG, slowly, and say so), and the memory available.  ferryd probes\n"
  "once and keeps the answer; --refresh probes again.\n";

static int hv_show(struct cli *c, int argc, char **argv)
{
  bool refresh = false;
  const char *pos[1];
  const struct opt_spec spec[] = { { "refresh", false, NULL, &refresh, NULL, NULL, 0 } };
  int npos, r = parse_args("hypervisor show", usage_hv_show, argc, argv, spec, ARRAY_SIZE(spec),
                           pos, 1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if (strcmp(pos[0], "qemu") != 0 && strcmp(pos[0], "sim") != 0)
    return cli_usage_error("hypervisor show", "unknown driver '%s' (qemu, sim)", pos[0]);
  char path[96];
  snprintf(path, sizeof path, "/v1/hypervisors/%s%s", pos[0], refresh ? "?refresh=true" : "");
  return call_and_show(c, "GET", path, NULL, print_hypervisor);
}

static int hv_list(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  int npos, r = parse_args("hypervisor list", "Usage: ferry hypervisor list\nEach driver in "
                           "one line: present or not, QEMU's version, the accelerator.\n", argc,
                           argv, NULL, 0, pos, 0, 0, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  return call_and_show(c, "GET", "/v1/hypervisors", NULL, print_hypervisor_list);
}

static const char usage_hypervisor[] =
  "Usage: ferry hypervisor SUBCOMMAND ...\n"
  "  show qemu|sim [--refresh] what this host offers the driver (QEMU, KVM, ...)\n"
  "  list                      every driver in a line\n"
  "'ferry hypervisor SUBCOMMAND --help' tells more.\n";

/* ---- dispatch ---- */

struct sub {
  const char *name;
  int (*fn)(struct cli *, int, char **);
};

static int dispatch(struct cli *c, int argc, char **argv, const char *group, const char *usage,
                    const struct sub *subs, size_t nsubs)
{
  if (argc < 2) {
    fprintf(stderr, "%s", usage);
    return EXIT_USAGE;
  }
  if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
      strcmp(argv[1], "help") == 0) {
    printf("%s", usage);
    return EXIT_OK;
  }
  for (size_t i = 0; i < nsubs; i++)
    if (strcmp(argv[1], subs[i].name) == 0)
      return subs[i].fn(c, argc - 1, argv + 1);
  return cli_usage_error(group, "unknown subcommand '%s'", argv[1]);
}

int cmd_network(struct cli *c, int argc, char **argv)
{
  static const struct sub subs[] = { { "add", net_add }, { "list", net_list }, { "ls", net_list },
                                     { "show", net_show }, { "rm", net_rm } };
  return dispatch(c, argc, argv, "network", usage_network, subs, ARRAY_SIZE(subs));
}

int cmd_hypervisor(struct cli *c, int argc, char **argv)
{
  static const struct sub subs[] = { { "show", hv_show }, { "list", hv_list } };
  return dispatch(c, argc, argv, "hypervisor", usage_hypervisor, subs, ARRAY_SIZE(subs));
}
