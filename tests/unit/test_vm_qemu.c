/* test_vm_qemu: the qemu driver and the live-migration hooks of the VM
 * manager (src/vm/vm.c, qemu.c) with two real "sites" in one process, each
 * its own data dir, disk registry, NBD listener and VM manager, and real
 * QEMU processes (TCG, SeaBIOS looping on "no bootable device" is the
 * guest; its RAM is what moves).
 *
 *   A -> B: import_incoming at B, out_start at A to B's socket (no tunnel:
 *   QEMU to QEMU), pre-switchover (A's guest stopped, STOP seen), continue,
 *   completed, B's guest runs (RESUME after STOP), mark_migrated at A quits
 *   A's QEMU (no powerdown).
 *   B -> A, cancelled in pre-switchover: B's guest runs again, A's incoming
 *   QEMU exits, discard_incoming removes it.
 *   B's manager closed and reopened: its VM is adopted over a new QMP
 *   connection.  Stop falls back from powerdown to quit after the timeout.
 * Exits 77 (skip) when QEMU is not installed. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/db.h"
#include "common/log.h"
#include "common/util.h"
#include "disk/registry.h"
#include "ferryd/nbd_glue.h"
#include "vm/vm.h"

#include "check.h"

struct site {
  char dir[96];
  struct registry *reg;
  struct db *db;
  struct nbd_listener *nbd;
  struct vm_manager *vms;
};

static char root[64];

static struct vm_manager *open_manager(struct site *s)
{
  char err[512];
  struct vm_manager_options o = { .simvm_path = "/nonexistent/ferry-simvm",
                                  .qemu_stop_timeout_ms = 1000 };
  struct vm_manager *m = vm_manager_open(s->dir, s->db, s->reg, s->nbd, &o, err, sizeof err);
  if (!m) {
    fprintf(stderr, "vm_manager_open: %s\n", err);
    exit(1);
  }
  return m;
}

static void site_open(struct site *s, const char *name)
{
  char err[512], spec[160];
  snprintf(s->dir, sizeof s->dir, "%.60s/%.8s", root, name);
  mkdir(s->dir, 0750);
  struct registry_options ro = { .cbt_enabled = true, .heat_enabled = true };
  snprintf(spec, sizeof spec, "unix:%s/nbd.sock", s->dir);
  if (!(s->reg = registry_open(s->dir, &ro, err, sizeof err)) ||
      !(s->db = db_open(s->dir, err, sizeof err)) ||
      !(s->nbd = nbd_listener_start(s->reg, spec, 2, err, sizeof err)) ||
      registry_create(s->reg, "vda", 16 << 20, 0, err, sizeof err) < 0 ||
      registry_create(s->reg, "vdb", 16 << 20, 0, err, sizeof err) < 0) {
    fprintf(stderr, "site %s: %s\n", name, err);
    exit(1);
  }
  s->vms = open_manager(s);
}

static void site_close(struct site *s)
{
  vm_manager_close(s->vms);
  nbd_listener_stop(s->nbd);
  registry_close(s->reg);
  db_close(s->db);
}

/* Polls f until it says done, up to timeout_ms. */
static json_t *poll_out(struct site *s, const char *vm, const char *want, unsigned timeout_ms)
{
  char err[512];
  uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000;
  for (;;) {
    json_t *info = NULL;
    if (vm_migrate_out_status(s->vms, vm, &info, err, sizeof err) < 0) {
      fprintf(stderr, "out_status: %s\n", err);
      return NULL;
    }
    const char *st = json_string_value(json_object_get(info, "status"));
    if (st && strcmp(st, want) == 0)
      return info;
    if (now_ns() > deadline || (st && (strcmp(st, "failed") == 0 ||
                                       strcmp(st, "cancelled") == 0))) {
      char *t = json_dumps(info, JSON_COMPACT);
      fprintf(stderr, "migration status %s, waited for %s\n", t, want);
      free(t);
      json_decref(info);
      return NULL;
    }
    json_decref(info);
    usleep(20 * 1000);
  }
}

static json_t *poll_in(struct site *s, const char *vm, const char *key, unsigned timeout_ms)
{
  char err[512];
  uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000;
  for (;;) {
    json_t *info = NULL;
    if (vm_incoming_status(s->vms, vm, &info, err, sizeof err) < 0) {
      fprintf(stderr, "incoming_status: %s\n", err);
      return NULL;
    }
    if (json_is_true(json_object_get(info, key)))
      return info;
    if (now_ns() > deadline) {
      char *t = json_dumps(info, JSON_COMPACT);
      fprintf(stderr, "incoming status %s, waited for %s\n", t, key);
      free(t);
      json_decref(info);
      return NULL;
    }
    json_decref(info);
    usleep(20 * 1000);
  }
}

static const char *runtime(struct site *s, const char *vm, const char *key, char *buf,
                           size_t len)
{
  char err[512];
  json_t *j = vm_json(s->vms, vm, err, sizeof err);
  const char *v = json_string_value(json_object_get(json_object_get(j, "runtime"), key));
  snprintf(buf, len, "%s", v ? v : "");
  json_decref(j);
  return buf;
}

static pid_t vm_pid(struct site *s, const char *vm)
{
  char err[512];
  json_t *j = vm_json(s->vms, vm, err, sizeof err);
  pid_t pid = (pid_t)json_integer_value(json_object_get(j, "pid"));
  json_decref(j);
  return pid;
}

int main(void)
{
  signal(SIGPIPE, SIG_IGN);
  log_init("test_vm_qemu");
  if (system("command -v qemu-system-x86_64 >/dev/null 2>&1") != 0) {
    fprintf(stderr, "qemu-system-x86_64 is not installed (scripts/setup.sh): skipped\n");
    return 77;
  }
  snprintf(root, sizeof root, "/tmp/fvq-XXXXXX");
  if (!mkdtemp(root)) {
    perror("mkdtemp");
    return 1;
  }
  struct site a, b;
  site_open(&a, "a");
  site_open(&b, "b");
  char err[512], buf[64], uri[128];

  /* The probe: QEMU is there and says what it is. */
  json_t *p = NULL;
  CHECK(vm_hypervisor_probe(a.vms, "qemu", false, &p, err, sizeof err) == 0);
  CHECK(json_is_true(json_object_get(p, "present")));
  CHECK(json_array_size(json_object_get(p, "machines")) > 0);
  CHECK(json_is_object(json_object_get(p, "kvm")));
  printf("probe: QEMU %s, accel %s, kvm: %s\n", json_string_value(json_object_get(p, "version")),
         json_string_value(json_object_get(p, "accel")),
         json_string_value(json_object_get(json_object_get(p, "kvm"), "why")));
  json_decref(p);
  CHECK(vm_hypervisor_probe(a.vms, "xen", false, &p, err, sizeof err) == -EINVAL);

  /* A qemu VM at A; a sim VM has no RAM migration. */
  struct vm_spec spec;
  json_t *sj = json_pack("{s:s, s:s, s:[s], s:s}", "name", "g", "driver", "qemu", "disks", "vda",
                         "memory", "128M");
  CHECK(vm_spec_from_json(sj, &spec, err, sizeof err) == 0);
  json_decref(sj);
  CHECK(vm_create(a.vms, &spec, err, sizeof err) == 0);
  struct vm_spec sim = { .name = "s", .driver = "sim", .ndisks = 1, .disks = { "vdb" } };
  CHECK(vm_create(a.vms, &sim, err, sizeof err) == 0);
  CHECK(vm_migrate_out_start(a.vms, "s", "unix:/x", err, sizeof err) == -EOPNOTSUPP);
  CHECK(vm_migrate_out_start(a.vms, "g", "unix:/x", err, sizeof err) == -EBUSY);  /* stopped */
  CHECK(vm_start(a.vms, "g", err, sizeof err) == 0);
  CHECK(strcmp(runtime(&a, "g", "state", buf, sizeof buf), "running") == 0);
  json_t *report = NULL;
  CHECK(vm_verify(a.vms, "g", &report, err, sizeof err) == -EOPNOTSUPP);
  CHECK(strstr(err, "guest's own check") != NULL);
  void *blob;
  size_t blen;
  CHECK(vm_export_state(a.vms, "g", &blob, &blen, err, sizeof err) == -EOPNOTSUPP);
  pid_t apid = vm_pid(&a, "g");

  /* ---- A -> B, completed ---- */
  const char *m1 = "m-000000000001";
  CHECK(vm_get_spec(a.vms, "g", &spec, err, sizeof err) == 0);
  snprintf(uri, sizeof uri, "unix:%s/mig.sock", b.dir);
  if (vm_import_incoming(b.vms, &spec, m1, uri, err, sizeof err) < 0) {
    fprintf(stderr, "import_incoming: %s\n", err);
    failures++;
  }
  CHECK(vm_state(b.vms, "g", buf, sizeof buf) == 0 && strcmp(buf, "incoming") == 0);
  pid_t bpid = vm_pid(&b, "g");
  CHECK(bpid > 0);
  CHECK(vm_import_incoming(b.vms, &spec, m1, uri, err, sizeof err) == 0);   /* idempotent */
  CHECK(vm_pid(&b, "g") == bpid);
  CHECK(vm_import_incoming(b.vms, &spec, "m-0000000000ff", uri, err, sizeof err) == -EBUSY);
  CHECK(vm_start(b.vms, "g", err, sizeof err) == -EBUSY);                   /* claimed */
  json_t *in = NULL;
  CHECK(vm_incoming_status(b.vms, "g", &in, err, sizeof err) == 0);
  CHECK(!json_is_true(json_object_get(in, "running")) &&
        !json_is_true(json_object_get(in, "exited")));
  json_decref(in);

  CHECK(vm_migrate_out_start(a.vms, "g", uri, err, sizeof err) == 0);
  CHECK(vm_migrate_out_start(a.vms, "g", uri, err, sizeof err) == -EBUSY);   /* one at a time */
  json_t *out = poll_out(&a, "g", "pre-switchover", 60000);
  CHECK(out != NULL);
  uint64_t stopped = (uint64_t)json_integer_value(json_object_get(out, "stopped_at_ns"));
  CHECK(stopped > 0);
  CHECK(json_integer_value(json_object_get(json_object_get(out, "ram"), "total")) > 0);
  json_decref(out);
  /* The source guest is stopped (QEMU: finish-migrate), nothing switched. */
  runtime(&a, "g", "qemu_status", buf, sizeof buf);
  CHECK(strcmp(buf, "running") != 0);
  printf("source in pre-switchover: QEMU %s\n", buf);
  CHECK(vm_migrate_out_continue(a.vms, "g", err, sizeof err) == 0);
  out = poll_out(&a, "g", "completed", 60000);
  CHECK(out != NULL);
  json_decref(out);
  in = poll_in(&b, "g", "running", 30000);
  CHECK(in != NULL);
  uint64_t resumed = (uint64_t)json_integer_value(json_object_get(in, "resumed_at_ns"));
  CHECK(resumed > stopped);
  printf("A -> B: downtime %.1f ms (STOP to RESUME)\n", (double)(resumed - stopped) / 1e6);
  json_decref(in);
  CHECK(vm_state(b.vms, "g", buf, sizeof buf) == 0 && strcmp(buf, "running") == 0);
  CHECK(vm_discard_incoming(b.vms, "g", m1, err, sizeof err) == -EBUSY);    /* it ran here */
  CHECK(vm_migrate_out_cancel(a.vms, "g", err, sizeof err) == -EBUSY);      /* too late */
  CHECK(vm_mark_migrated(a.vms, "g", "b", err, sizeof err) == 0);
  CHECK(vm_state(a.vms, "g", buf, sizeof buf) == 0 && strcmp(buf, "migrated") == 0);
  CHECK(kill(apid, 0) < 0);                                 /* quit, reaped */
  vm_release(b.vms, "g", m1);
  CHECK(vm_start(b.vms, "g", err, sizeof err) == -EBUSY);   /* running already, not claimed */
  CHECK(strstr(err, "already running") != NULL);

  /* ---- B's manager restarts: the VM is adopted ---- */
  vm_manager_close(b.vms);
  b.vms = open_manager(&b);
  CHECK(vm_state(b.vms, "g", buf, sizeof buf) == 0 && strcmp(buf, "running") == 0);
  CHECK(strcmp(runtime(&b, "g", "state", buf, sizeof buf), "running") == 0);
  CHECK(vm_pid(&b, "g") == bpid);

  /* ---- B -> A, cancelled in pre-switchover ---- */
  const char *m2 = "m-000000000002";
  CHECK(vm_get_spec(b.vms, "g", &spec, err, sizeof err) == 0);
  snprintf(uri, sizeof uri, "unix:%s/mig2.sock", a.dir);
  CHECK(vm_import_incoming(a.vms, &spec, m2, uri, err, sizeof err) == 0);   /* comes back */
  CHECK(vm_state(a.vms, "g", buf, sizeof buf) == 0 && strcmp(buf, "incoming") == 0);
  CHECK(vm_migrate_out_start(b.vms, "g", uri, err, sizeof err) == 0);
  out = poll_out(&b, "g", "pre-switchover", 60000);
  CHECK(out != NULL);
  json_decref(out);
  CHECK(vm_migrate_out_cancel(b.vms, "g", err, sizeof err) == 0);
  out = NULL;
  CHECK(vm_migrate_out_status(b.vms, "g", &out, err, sizeof err) == 0);
  CHECK(strcmp(json_string_value(json_object_get(out, "status")), "cancelled") == 0);
  json_decref(out);
  CHECK(strcmp(runtime(&b, "g", "qemu_status", buf, sizeof buf), "running") == 0);
  CHECK(vm_state(b.vms, "g", buf, sizeof buf) == 0 && strcmp(buf, "running") == 0);
  /* A's QEMU lost its stream and exits. */
  in = poll_in(&a, "g", "exited", 30000);
  CHECK(in != NULL);
  printf("A's incoming QEMU: %s\n", json_string_value(json_object_get(in, "exit_reason")));
  json_decref(in);
  CHECK(vm_discard_incoming(a.vms, "g", "m-000000000009", err, sizeof err) == -EBUSY);
  CHECK(vm_discard_incoming(a.vms, "g", m2, err, sizeof err) == 0);
  CHECK(vm_state(a.vms, "g", buf, sizeof buf) == -ENOENT);
  CHECK(vm_discard_incoming(a.vms, "g", m2, err, sizeof err) == -ENOENT);

  /* ---- pause, resume, stop (SeaBIOS ignores the power button: quit) ---- */
  CHECK(vm_pause(b.vms, "g", err, sizeof err) == 0);
  CHECK(strcmp(runtime(&b, "g", "qemu_status", buf, sizeof buf), "paused") == 0);
  CHECK(vm_resume(b.vms, "g", err, sizeof err) == 0);
  uint64_t t0 = now_ns();
  CHECK(vm_stop(b.vms, "g", err, sizeof err) == 0);
  CHECK(now_ns() - t0 >= 1000000000ull);                    /* waited the timeout */
  CHECK(kill(bpid, 0) < 0);
  CHECK(vm_remove(b.vms, "g", false, err, sizeof err) == 0);

  site_close(&a);
  site_close(&b);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", root);
  (void)!system(cmd);
  if (failures)
    fprintf(stderr, "%d check(s) failed\n", failures);
  return failures ? 1 : 0;
}
