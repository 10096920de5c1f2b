/* vm: the virtual machines of a site, each a hypervisor driver plus its disks
 * and settings.
 *
 * A VM is a row in ferry.db (module "vm") and, while it runs, a process that
 * the driver started: for `sim` the ferry-simvm program (src/vm/simvm/), which
 * does a VM's IO against its disks over ferryd's NBD socket and keeps its
 * "RAM" (the table of what it wrote where) in a state file; `qemu` follows
 * behind the same ops table.  VM processes run in their own session: they
 * outlive a ferryd that is killed or restarted (as guests outlive a host
 * agent), reconnect to the NBD socket when it comes back, and are adopted
 * again by the next ferryd (pid + control socket).
 *
 * States: stopped (defined, no process), running, paused, migrated (moved to
 * another site by a migration: kept as a record of where it went; its disks
 * here are fenced).  A VM that a migration holds (vm_claim) refuses start,
 * stop, pause, resume, verify and rm from anyone else: the migration drives it.
 *
 * Files: DATA_DIR/vms/NAME/ (state file, console.log), DATA_DIR/run/NAME.ctl
 * (the control socket; short, since unix socket paths are limited to 107
 * bytes).
 *
 * Table (module "vm"):
 *   vms(name TEXT PRIMARY KEY, driver TEXT, disks TEXT (JSON array of disk
 *       names), workload TEXT, state TEXT, pid INTEGER, moved_to TEXT,
 *       created_at TEXT, updated_at TEXT)
 *
 * Thread model: every vm_* function is thread-safe; a per-manager mutex
 * guards the table and the claims, and slow driver calls (pause drains the
 * VM's IO, verify reads every block) run outside it on a per-VM busy flag.
 */
#ifndef FERRY_VM_H
#define FERRY_VM_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct db;
struct registry;
struct nbd_listener;
struct vm_manager;

#define VM_MAX_DISKS 16

struct vm_spec {
  char name[65];
  char driver[16];                       /* "sim" */
  unsigned ndisks;
  char disks[VM_MAX_DISKS][65];
  char workload[256];                    /* driver-specific ("write=70,bs=4k,...") */
};

struct vm_manager_options {
  const char *simvm_path;                /* the ferry-simvm program */
};

/* Opens the VM table and adopts the VM processes still running.  reg and
 * nbd must outlive the manager. */
struct vm_manager *vm_manager_open(const char *data_dir, struct db *db, struct registry *reg,
                                   struct nbd_listener *nbd, const struct vm_manager_options *o,
                                   char *err, size_t errlen);
/* Stops watching; VM processes keep running (they are not ferryd's to end). */
void vm_manager_close(struct vm_manager *m);

/* Errors: -EINVAL bad input, -ENOENT no such VM (or disk), -EEXIST name
 * taken, -EBUSY claimed by a migration or in the wrong state, -EIO driver. */
int vm_create(struct vm_manager *m, const struct vm_spec *spec, char *err, size_t errlen);
int vm_remove(struct vm_manager *m, const char *name, bool force, char *err, size_t errlen);
int vm_start(struct vm_manager *m, const char *name, char *err, size_t errlen);
int vm_stop(struct vm_manager *m, const char *name, char *err, size_t errlen);
int vm_pause(struct vm_manager *m, const char *name, char *err, size_t errlen);
int vm_resume(struct vm_manager *m, const char *name, char *err, size_t errlen);
/* The driver's check of the VM's data: {"ok":bool, ...} (sim: every block
 * against its table).  Works running (the VM is paused meanwhile) or
 * stopped. */
int vm_verify(struct vm_manager *m, const char *name, json_t **report, char *err, size_t errlen);
int vm_set_workload(struct vm_manager *m, const char *name, const char *workload, char *err,
                    size_t errlen);

json_t *vm_json(struct vm_manager *m, const char *name, char *err, size_t errlen);
json_t *vm_list_json(struct vm_manager *m);
int vm_get_spec(struct vm_manager *m, const char *name, struct vm_spec *out, char *err,
                size_t errlen);
/* "stopped", "running", "paused", "migrated". */
int vm_state(struct vm_manager *m, const char *name, char *buf, size_t len);

/* ---- for migrations ---- */

/* Claims the VM for migration id (refused if claimed, migrated, or busy). */
int vm_claim(struct vm_manager *m, const char *name, const char *migration_id, char *err,
             size_t errlen);
void vm_release(struct vm_manager *m, const char *name, const char *migration_id);
/* Driver calls on behalf of the claiming migration (bypass the claim check). */
int vm_migration_pause(struct vm_manager *m, const char *name, char *err, size_t errlen);
int vm_migration_resume(struct vm_manager *m, const char *name, char *err, size_t errlen);
/* The VM's movable state (sim: its state file), read while it is paused.
 * *buf is malloc'ed. */
int vm_export_state(struct vm_manager *m, const char *name, void **buf, size_t *len, char *err,
                    size_t errlen);
/* Destination side: defines the VM from spec with the state blob given
 * (written durably), starts it paused against this site's disks of the
 * same names, then resumes it.  Idempotent for a VM already imported by the
 * same migration (it is just resumed if paused). */
int vm_import_and_start(struct vm_manager *m, const struct vm_spec *spec, const void *state,
                        size_t len, const char *migration_id, char *err, size_t errlen);
/* Source side after cutover: ends the (paused) VM process and records that
 * the VM now lives at site `to`. */
int vm_mark_migrated(struct vm_manager *m, const char *name, const char *to, char *err,
                     size_t errlen);

#endif
