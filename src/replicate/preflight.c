/* preflight: "prepare to migrate" — every check that can fail a migration,
 * run before anything changes at either site, reported as one list
 * (docs/migration.md, "Pre-flight").
 *
 * The source checks what it knows (the VM's state, its disks are ferry's and
 * authoritative here, every network mapped) and asks the destination the
 * rest over a QUERY connection of the site link: its hypervisor (QEMU present
 * and its version, machine type and CPU model usable, as QEMU's own QMP
 * queries say, not guesses), memory available, room for the disks, names
 * free, networks present, boot files present.  The destination answers and
 * changes nothing.  A check is {"check","ok","detail"}; any check with ok
 * false stops the migration before it is recorded.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "disk/disk.h"
#include "disk/registry.h"
#include "link/link.h"
#include "replicate/internal.h"
#include "replicate/preflight.h"
#include "replicate/proto.h"
#include "site/site.h"
#include "vm/vm.h"

#define QUERY_TIMEOUT_MS 30000

static void add_check(json_t *checks, const char *name, bool ok, const char *fmt, ...)
  __attribute__((format(printf, 4, 5)));
static void add_check(json_t *checks, const char *name, bool ok, const char *fmt, ...)
{
  char detail[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(detail, sizeof detail, fmt, ap);
  va_end(ap);
  json_array_append_new(checks, json_pack("{s:s, s:b, s:s}", "check", name, "ok", ok,
                                          "detail", detail));
}

static bool in_list(json_t *list, const char *name)
{
  size_t i;
  json_t *x;
  json_array_foreach(list, i, x) {
    if (json_is_string(x) && strcmp(json_string_value(x), name) == 0)
      return true;
  }
  return false;
}

/* ---- destination ---- */

static void dest_checks(const struct migrations_shared *sh, const char *peer, json_t *q,
                        json_t *checks)
{
  char err[512], b1[32], b2[32];
  struct vm_spec spec;
  if (vm_spec_from_json(json_object_get(q, "vm"), &spec, err, sizeof err) < 0) {
    add_check(checks, "request", false, "the VM description is not valid: %s", err);
    return;
  }
  bool qemu = strcmp(spec.driver, "qemu") == 0;

  /* The hypervisor, as it answers for itself. */
  json_t *probe = NULL;
  if (vm_hypervisor_probe(sh->vms, spec.driver, false, &probe, err, sizeof err) < 0 ||
      !json_is_true(json_object_get(probe, "present"))) {
    add_check(checks, "hypervisor", false, "driver '%s' is not usable here: %s", spec.driver,
              probe ? json_string_value(json_object_get(probe, "why")) ?: "not found" : err);
    json_decref(probe);
    probe = NULL;
  } else if (qemu) {
    const char *accel = json_string_value(json_object_get(probe, "accel"));
    json_t *kvm = json_object_get(probe, "kvm");
    add_check(checks, "hypervisor", true, "QEMU %s (%s), accelerator %s%s%s",
              json_string_value(json_object_get(probe, "version")) ?: "?",
              json_string_value(json_object_get(probe, "program")) ?: "?", accel ? accel : "?",
              json_is_true(json_object_get(kvm, "usable")) ? "" : ": KVM unusable, ",
              json_is_true(json_object_get(kvm, "usable"))
                ? "" : json_string_value(json_object_get(kvm, "why")) ?: "");
  } else {
    add_check(checks, "hypervisor", true, "driver '%s' present", spec.driver);
  }

  if (qemu && probe) {
    const char *machine = spec.machine[0] ? spec.machine : "q35";
    add_check(checks, "machine type", in_list(json_object_get(probe, "machines"), machine),
              in_list(json_object_get(probe, "machines"), machine)
                ? "'%s' is supported" : "'%s' is not a machine type of QEMU here", machine);
    bool kvm_ok = json_is_true(json_object_get(json_object_get(probe, "kvm"), "usable"));
    if (spec.cpu_model[0]) {
      bool known = strcmp(spec.cpu_model, "host") == 0 ||
                   in_list(json_object_get(probe, "cpu_models"), spec.cpu_model);
      bool ok = known && (strcmp(spec.cpu_model, "host") != 0 || kvm_ok);
      add_check(checks, "cpu model", ok,
                !known ? "'%s' is not a CPU model of QEMU here"
                : ok ? "'%s' is usable" : "'%s' needs KVM, which is not usable here",
                spec.cpu_model);
    } else {
      add_check(checks, "cpu model", true, "default (%s)", kvm_ok ? "host" : "qemu64");
    }
    uint64_t avail = (uint64_t)json_integer_value(json_object_get(probe, "mem_available"));
    format_size(spec.memory_bytes, b1, sizeof b1);
    format_size(avail, b2, sizeof b2);
    add_check(checks, "memory", avail >= spec.memory_bytes, "%s needed, %s available", b1, b2);
    const char *files[] = { spec.kernel, spec.initrd };
    const char *what[] = { "kernel", "initrd" };
    for (int i = 0; i < 2; i++) {
      if (!files[i][0])
        continue;
      bool ok = access(files[i], R_OK) == 0;
      add_check(checks, what[i], ok, ok ? "%s is here" : "%s is not readable here", files[i]);
    }
  }
  json_decref(probe);

  /* Names: the VM's and its disks' are free (or this site's old copy of a
   * VM that left for the very site that now brings it back). */
  char vst[16] = "";
  if (vm_state(sh->vms, spec.name, vst, sizeof vst) < 0 || strcmp(vst, "migrated") == 0)
    add_check(checks, "vm name", true, "'%s' is free", spec.name);
  else
    add_check(checks, "vm name", false, "a VM '%s' already exists here (%s)", spec.name, vst);

  uint64_t need = 0;
  json_t *disks = json_object_get(q, "disks");
  size_t i;
  json_t *dj;
  json_array_foreach(disks, i, dj) {
    const char *name = json_string_value(json_object_get(dj, "name"));
    if (!name || !name_is_valid(name))
      continue;
    need += (uint64_t)json_integer_value(json_object_get(dj, "allocated"));
    struct disk *d = registry_get(sh->reg, name);
    if (!d) {
      add_check(checks, "disk", true, "'%s' will be created", name);
      continue;
    }
    char why[256], expect[160];
    disk_fence_reason(d, why, sizeof why);
    snprintf(expect, sizeof expect, "migrated to site %s by migration ", peer);
    bool back = strncmp(why, expect, strlen(expect)) == 0;
    add_check(checks, "disk", back,
              back ? "'%s' is this site's fenced copy from an earlier migration to site '%s': "
                     "it will be brought up to date"
                   : "a disk '%s' already exists here (site '%s' cannot replace it)",
              name, peer);
    disk_unref(d);
  }
  struct statvfs sv;
  if (statvfs(sh->data_dir, &sv) == 0) {
    uint64_t free_bytes = (uint64_t)sv.f_bavail * sv.f_frsize;
    format_size(need, b1, sizeof b1);
    format_size(free_bytes, b2, sizeof b2);
    add_check(checks, "disk space", free_bytes >= need, "%s allocated at the source, %s free "
              "in %s", b1, b2, sh->data_dir);
  }

  for (unsigned k = 0; k < spec.nnics; k++) {
    bool ok = vm_network_exists(sh->vms, spec.nics[k].network);
    add_check(checks, "network", ok, ok ? "'%s' exists here" : "no network '%s' here",
              spec.nics[k].network);
  }
}

void preflight_serve_dest(struct migrations *ms, struct link_conn *conn, const void *q,
                          uint32_t qlen)
{
  const struct migrations_shared *sh = migrations_shared(ms);
  char err[256], peer[65] = "";
  json_t *checks = json_array();
  json_t *j = proto_json_parse(q, qlen, err, sizeof err);
  const char *op = json_string_value(json_object_get(j, "op"));
  if (!site_trust(sh->site, link_conn_peer_fingerprint(conn), peer, sizeof peer))
    add_check(checks, "peer", false, "this site does not trust the caller");
  else if (!j || !op || strcmp(op, "preflight") != 0)
    add_check(checks, "request", false, "not a pre-flight query: %s", j ? "unknown op" : err);
  else
    dest_checks(sh, peer, j, checks);
  json_t *reply = json_pack("{s:o}", "checks", checks);
  char *text = json_dumps(reply, JSON_COMPACT);
  json_decref(reply);
  json_decref(j);
  if (text)
    link_send(conn, MSG_QUERY_REPLY, 0, text, (uint32_t)strlen(text), 0, QUERY_TIMEOUT_MS);
  free(text);
  link_conn_close(conn);
}

/* ---- source ---- */

int preflight_apply_network_map(struct vm_spec *spec, const struct network_map *map, char *err,
                                size_t errlen)
{
  for (unsigned k = 0; k < spec->nnics; k++) {
    for (unsigned i = 0; map && i < map->n; i++) {
      if (strcmp(spec->nics[k].network, map->from[i]) == 0) {
        snprintf(spec->nics[k].network, sizeof spec->nics[k].network, "%s", map->to[i]);
        break;
      }
    }
  }
  for (unsigned i = 0; map && i < map->n; i++) {
    bool used = false;
    for (unsigned k = 0; k < spec->nnics; k++)
      used |= strcmp(spec->nics[k].network, map->to[i]) == 0;
    if (!used) {
      snprintf(err, errlen, "--map-network %s=%s: VM '%s' has no NIC on network '%s'",
               map->from[i], map->to[i], spec->name, map->from[i]);
      return -EINVAL;
    }
  }
  return 0;
}

int preflight_run(const struct migrations_shared *sh, const struct site_peer *peer,
                  const char *mode, const struct vm_spec *spec, const struct network_map *map,
                  json_t **out, char *err, size_t errlen)
{
  json_t *checks = json_array();
  char vst[16] = "";
  vm_state(sh->vms, spec->name, vst, sizeof vst);
  bool live = strcmp(mode, "live") == 0;
  bool vm_ok = live ? strcmp(vst, "running") == 0 || strcmp(vst, "paused") == 0
                    : strcmp(vst, "running") == 0 || strcmp(vst, "paused") == 0 ||
                      strcmp(vst, "stopped") == 0;
  add_check(checks, "vm state", vm_ok, vm_ok ? "'%s' is %s" : "'%s' is %s: %s migration moves "
            "a %s VM", spec->name, vst, mode, live ? "running" : "defined");

  /* Every disk is ferry's, here, and authoritative. */
  json_t *qdisks = json_array();
  for (unsigned i = 0; i < spec->ndisks; i++) {
    struct disk *d = registry_get(sh->reg, spec->disks[i]);
    if (!d) {
      add_check(checks, "disk", false, "'%s' is not a disk of this site", spec->disks[i]);
      continue;
    }
    bool ok = disk_cbt_enabled(d) && !disk_fenced(d);
    char b[32];
    format_size(disk_size(d), b, sizeof b);
    add_check(checks, "disk", ok, ok ? "'%s' (%s) is served by ferry here"
              : disk_fenced(d) ? "'%s' is fenced: this site is not authoritative for it"
                               : "'%s' has no changed-block tracking (ferryd --no-cbt)",
              spec->disks[i], b);
    json_array_append_new(qdisks, json_pack("{s:s, s:I, s:I}", "name", spec->disks[i], "size",
                                            (json_int_t)disk_size(d), "allocated",
                                            (json_int_t)disk_allocated_bytes(d)));
    disk_unref(d);
  }

  /* Networks: the mapped spec goes to the destination, which says whether
   * they exist there. */
  struct vm_spec mapped = *spec;
  char e2[256];
  if (preflight_apply_network_map(&mapped, map, e2, sizeof e2) < 0)
    add_check(checks, "network map", false, "%s", e2);
  for (unsigned k = 0; k < spec->nnics; k++) {
    bool same = strcmp(spec->nics[k].network, mapped.nics[k].network) == 0;
    add_check(checks, "network map", true, same ? "NIC %u: '%s' keeps its name" :
              "NIC %u: '%s' -> '%s'", k, spec->nics[k].network, mapped.nics[k].network);
  }

  /* The destination's half. */
  char e[512];
  struct link_identity *id = site_identity(sh->site);
  struct link_conn *c = id ? link_connect(id, peer->link, peer->fingerprint, 10000, e,
                                          sizeof e) : NULL;
  if (!c) {
    add_check(checks, "destination", false, "cannot reach site '%s' at %s: %s", peer->name,
              peer->link, id ? e : "this site has no identity");
  } else {
    json_t *q = json_pack("{s:s, s:s, s:o, s:o}", "op", "preflight", "mode", mode, "vm",
                          vm_spec_to_json(&mapped), "disks", qdisks);
    qdisks = NULL;
    char *text = json_dumps(q, JSON_COMPACT);
    json_decref(q);
    struct link_msg lm;
    int r = text ? link_send(c, MSG_QUERY, 0, text, (uint32_t)strlen(text), 0,
                             QUERY_TIMEOUT_MS) : -ENOMEM;
    free(text);
    if (r == 0)
      r = link_recv(c, &lm, QUERY_TIMEOUT_MS, e, sizeof e);
    json_t *reply = r == 0 && lm.type == MSG_QUERY_REPLY
                    ? proto_json_parse(lm.data, lm.len, e, sizeof e) : NULL;
    json_t *dchecks = json_object_get(reply, "checks");
    if (!json_is_array(dchecks)) {
      add_check(checks, "destination", false, "site '%s' did not answer the pre-flight query%s%s",
                peer->name, r < 0 ? ": " : "", r < 0 ? e : "");
    } else {
      size_t i;
      json_t *x;
      json_array_foreach(dchecks, i, x) {
        const char *n = json_string_value(json_object_get(x, "check"));
        const char *d = json_string_value(json_object_get(x, "detail"));
        char name[80];
        snprintf(name, sizeof name, "destination %s", n ? n : "?");
        add_check(checks, name, json_is_true(json_object_get(x, "ok")), "%s", d ? d : "");
      }
    }
    json_decref(reply);
    link_conn_close(c);
  }
  json_decref(qdisks);

  /* One line naming every failure. */
  size_t i;
  json_t *x;
  size_t nfail = 0, pos = 0;
  err[0] = '\0';
  json_array_foreach(checks, i, x) {
    if (json_is_true(json_object_get(x, "ok")))
      continue;
    nfail++;
    if (pos < errlen)
      pos += (size_t)snprintf(err + pos, errlen - pos, "%s%s: %s", nfail > 1 ? "; " : "",
                              json_string_value(json_object_get(x, "check")),
                              json_string_value(json_object_get(x, "detail")));
  }
  *out = checks;
  if (nfail) {
    char tmp[1024];
    snprintf(tmp, sizeof tmp, "pre-flight failed (%zu check%s): %s", nfail,
             nfail == 1 ? "" : "s", err);
    snprintf(err, errlen, "%s", tmp);
    return -EPERM;
  }
  return 0;
}
