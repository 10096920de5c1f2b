/* vm: the virtual machines of a site, each a hypervisor driver plus its disks
 * and settings, and the networks their NICs attach to.
 *
 * A VM is a row in ferry.db (module "vm") and, while it runs, a process that
 * the driver started: for `sim` the ferry-simvm program (src/vm/simvm/), which
 * does a VM's IO against its disks over ferryd's NBD socket and keeps its
 * "RAM" (the table of what it wrote where) in a state file; for `qemu` a
 * QEMU process driven over QMP (src/vm/qemu.c, docs/qemu.md), its disks
 * served by ferryd over NBD, its RAM moved by QEMU's own migration.  VM
 * processes run in their own session: they outlive a ferryd that is killed
 * or restarted (as guests outlive a host agent), reconnect to the NBD socket
 * when it comes back, and are adopted again by the next ferryd (pid +
 * control socket).
 *
 * States: stopped (defined, no process), running, paused, incoming (qemu: a
 * QEMU waiting for its RAM from a live migration, vm_import_incoming),
 * migrated (moved to another site by a migration: kept as a record of where
 * it went; its disks here are fenced).  A VM that a migration holds
 * (vm_claim) refuses start, stop, pause, resume, verify and rm from anyone
 * else: the migration drives it.
 *
 * Files: DATA_DIR/vms/NAME/ (sim: state file; console.log: sim's output or
 * qemu's serial console; qemu.log, qemu.pid), DATA_DIR/run/NAME.ctl (sim's
 * control socket) or DATA_DIR/run/NAME.qmp (QEMU's QMP socket); short, since
 * unix socket paths are limited to 107 bytes.
 *
 * Tables (module "vm"):
 *   vms(name TEXT PRIMARY KEY, driver TEXT, disks TEXT (JSON array of disk
 *       names), workload TEXT, state TEXT, pid INTEGER, moved_to TEXT,
 *       created_at TEXT, updated_at TEXT,
 *       config TEXT (v2: JSON object of the qemu settings, '{}' for sim),
 *       incoming TEXT (v2: id of the migration importing it, else NULL))
 * (module "network", src/vm/network.c):
 *   networks(name TEXT PRIMARY KEY, type TEXT 'user'|'bridge', bridge TEXT,
 *            created_at TEXT)
 *
 * Thread model: every vm_* function is thread-safe; a per-manager mutex
 * guards the tables and the claims, and slow driver calls (pause drains the
 * VM's IO, verify reads every block, a qemu stop waits for the guest to
 * power down) run outside it on a per-VM busy flag.
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
#define VM_MAX_NICS 8
#define VM_PATH_LEN 1024
#define VM_APPEND_LEN 2048

struct vm_nic {
  char network[65];                      /* a network of this site (vm_network_add) */
  char model[32];                        /* QEMU NIC device [virtio-net-pci] */
  char mac[18];                          /* "52:54:00:xx:xx:xx"; vm_create fills it if "" */
};

struct vm_spec {
  char name[65];
  char driver[16];                       /* "sim" or "qemu" */
  unsigned ndisks;
  char disks[VM_MAX_DISKS][65];
  char workload[256];                    /* sim only ("write=70,bs=4k,..."); qemu: "" */
  /* qemu only; all zero for sim.  0 / "" take the default (vm_spec_from_json,
   * vm_create and vm_import_incoming fill them in, except cpu_model). */
  uint64_t memory_bytes;                 /* guest RAM, MiB multiple [1 GiB] */
  unsigned cpus;                         /* vCPUs, 1..255 [1] */
  char machine[32];                      /* QEMU machine type [q35] */
  char cpu_model[64];                    /* as asked; "" = host with KVM, qemu64 with TCG */
  unsigned nnics;
  struct vm_nic nics[VM_MAX_NICS];
  char kernel[VM_PATH_LEN];              /* direct kernel boot (absolute paths); "" = */
  char initrd[VM_PATH_LEN];              /* boot from the first disk */
  char append[VM_APPEND_LEN];            /* kernel command line */
};

struct vm_manager_options {
  const char *simvm_path;                /* the ferry-simvm program */
  const char *qemu_path;                 /* QEMU [qemu-system-x86_64 from $PATH] */
  unsigned qemu_stop_timeout_ms;         /* powerdown wait before quit [30000] */
};

/* ---- specs (src/vm/spec.c; no manager needed) ---- */

/* The spec as the API takes it and the sites exchange it:
 * {"name","driver","disks":[...],"workload"} and, for qemu, "memory" (bytes),
 * "cpus", "machine", "cpu_model", "nics":[{"network","model","mac"}],
 * "kernel", "initrd", "append" (docs/api.md "VM").  New reference. */
json_t *vm_spec_to_json(const struct vm_spec *s);
/* Parses and checks such an object (from the API or a peer site): unknown
 * members, bad names, sizes, counts, MACs, paths and settings of the other
 * driver are refused.  Fills the qemu defaults (vm_spec_fill_defaults).
 * It does not look at this site (disks, networks, files): vm_create does.
 * 0, or -EINVAL with err. */
int vm_spec_from_json(const json_t *j, struct vm_spec *out, char *err, size_t errlen);
/* Fills the qemu defaults where a setting is 0 or "" (not cpu_model) and
 * gives every NIC without a MAC its stable one (vm_nic_mac).  Sim: nothing. */
void vm_spec_fill_defaults(struct vm_spec *s);
/* The MAC of NIC index of VM name: 52:54:00 (QEMU's locally administered
 * prefix) and 3 bytes of a hash of both, so it is the same every time. */
void vm_nic_mac(const char *vm_name, unsigned index, char out[18]);

/* Opens the VM table and adopts the VM processes still running.  reg and
 * nbd must outlive the manager. */
struct vm_manager *vm_manager_open(const char *data_dir, struct db *db, struct registry *reg,
                                   struct nbd_listener *nbd, const struct vm_manager_options *o,
                                   char *err, size_t errlen);
/* Stops watching; VM processes keep running (they are not ferryd's to end). */
void vm_manager_close(struct vm_manager *m);

/* Errors: -EINVAL bad input, -ENOENT no such VM (or disk, network), -EEXIST
 * name taken, -EBUSY claimed by a migration or in the wrong state, -EIO
 * driver, -EOPNOTSUPP the driver cannot do that (qemu: verify). */
int vm_create(struct vm_manager *m, const struct vm_spec *spec, char *err, size_t errlen);
int vm_remove(struct vm_manager *m, const char *name, bool force, char *err, size_t errlen);
int vm_start(struct vm_manager *m, const char *name, char *err, size_t errlen);
int vm_stop(struct vm_manager *m, const char *name, char *err, size_t errlen);
int vm_pause(struct vm_manager *m, const char *name, char *err, size_t errlen);
int vm_resume(struct vm_manager *m, const char *name, char *err, size_t errlen);
/* The driver's check of the VM's data: {"ok":bool, ...} (sim: every block
 * against its table).  Works running (the VM is paused meanwhile) or
 * stopped.  qemu: -EOPNOTSUPP (only the guest can check its data). */
int vm_verify(struct vm_manager *m, const char *name, json_t **report, char *err, size_t errlen);
int vm_set_workload(struct vm_manager *m, const char *name, const char *workload, char *err,
                    size_t errlen);

json_t *vm_json(struct vm_manager *m, const char *name, char *err, size_t errlen);
json_t *vm_list_json(struct vm_manager *m);
int vm_get_spec(struct vm_manager *m, const char *name, struct vm_spec *out, char *err,
                size_t errlen);
/* "stopped", "running", "paused", "incoming", "migrated". */
int vm_state(struct vm_manager *m, const char *name, char *buf, size_t len);

/* ---- hypervisors ---- */

/* What this host offers a driver.  qemu: {"driver":"qemu","present":bool,
 * "program":PATH,"version":"7.2.22","machines":[names and aliases],
 * "cpu_models":[names],"kvm":{"present":bool,"usable":bool,"why":"..."},
 * "accel":"kvm"|"tcg","mem_available":bytes} ("why" instead of the QEMU
 * members when it cannot run).  sim: {"driver":"sim","present":bool,
 * "program":PATH}.  Probed once per ferryd (QEMU is started with -machine
 * none) and cached; refresh probes again.  -EINVAL unknown driver. */
int vm_hypervisor_probe(struct vm_manager *m, const char *driver, bool refresh, json_t **out,
                        char *err, size_t errlen);

/* ---- networks (what NICs attach to) ---- */

/* type "user" (QEMU user-mode networking; bridge must be NULL or "") or
 * "bridge" (bridge: an existing Linux bridge, through qemu-bridge-helper).
 * -EINVAL bad input, -EEXIST name taken. */
int vm_network_add(struct vm_manager *m, const char *name, const char *type, const char *bridge,
                   char *err, size_t errlen);
/* -ENOENT none, -EBUSY a VM's NIC uses it. */
int vm_network_remove(struct vm_manager *m, const char *name, char *err, size_t errlen);
/* {"name","type","bridge":BR or null,"created_at","used_by":[VM names]}. */
json_t *vm_network_json(struct vm_manager *m, const char *name, char *err, size_t errlen);
json_t *vm_network_list_json(struct vm_manager *m);       /* {"networks":[...]} by name */
bool vm_network_exists(struct vm_manager *m, const char *name);

/* ---- for migrations ---- */

/* Claims the VM for migration id (refused if claimed, migrated, or busy). */
int vm_claim(struct vm_manager *m, const char *name, const char *migration_id, char *err,
             size_t errlen);
void vm_release(struct vm_manager *m, const char *name, const char *migration_id);
/* Driver calls on behalf of the claiming migration (bypass the claim check). */
int vm_migration_pause(struct vm_manager *m, const char *name, char *err, size_t errlen);
int vm_migration_resume(struct vm_manager *m, const char *name, char *err, size_t errlen);
/* Cold migration: the orderly stop (qemu: guest powerdown, then quit). */
int vm_migration_stop(struct vm_manager *m, const char *name, char *err, size_t errlen);
/* The VM's movable state (sim: its state file), read while it is paused.
 * *buf is malloc'ed. */
int vm_export_state(struct vm_manager *m, const char *name, void **buf, size_t *len, char *err,
                    size_t errlen);
/* Destination side: defines the VM from spec with the state blob given
 * (written durably; ignored by a driver without a state file, whose VM
 * boots from its disks: cold migration), starts it paused against this
 * site's disks of the same names, then resumes it.  Idempotent for a VM
 * already imported by the same migration (it is just resumed if paused). */
int vm_import_and_start(struct vm_manager *m, const struct vm_spec *spec, const void *state,
                        size_t len, const char *migration_id, char *err, size_t errlen);
/* Source side after cutover: ends the (paused) VM process and records that
 * the VM now lives at site `to`.  qemu: QMP `quit`, never a guest powerdown
 * (the guest runs on elsewhere); sim: its orderly stop. */
int vm_mark_migrated(struct vm_manager *m, const char *name, const char *to, char *err,
                     size_t errlen);

/* A restore point rolls the VM back: the VM (stopped, or migrated away from
 * here, and not claimed) gets this state ("RAM", sim) and is stopped here,
 * startable.  Drivers without a state file just become stopped. */
int vm_restore_state(struct vm_manager *m, const char *name, const void *state, size_t len,
                     char *err, size_t errlen);

/* ---- live migration of a qemu VM's RAM (sim: -EOPNOTSUPP) ----
 * Called by the migration engine, which holds the VM (no claim check).
 *
 * Source.  out_start: QEMU capabilities pause-before-switchover and events
 * on, then `migrate` to uri ("unix:PATH" where ferry listens and tunnels the
 * stream to the peer).  -EBUSY unless running or paused. */
int vm_migrate_out_start(struct vm_manager *m, const char *name, const char *uri, char *err,
                         size_t errlen);
/* Does not wait.  *info: {"status": QEMU's migration status ("none",
 * "setup", "active", "pre-switchover", "device", "completed", "failed",
 * "cancelling", "cancelled", ...), "ram": {"transferred","remaining","total"}
 * (when QEMU reports it), "error": QEMU's error-desc (when failed),
 * "stopped_at_ns": realtime ns of the guest's STOP event since out_start,
 * 0 if none}. */
int vm_migrate_out_status(struct vm_manager *m, const char *name, json_t **info, char *err,
                          size_t errlen);
/* In pre-switchover: `migrate-continue` (the point of no return). */
int vm_migrate_out_continue(struct vm_manager *m, const char *name, char *err, size_t errlen);
/* `migrate_cancel`; returns once QEMU says cancelled (or failed), with the
 * guest running again if the VM was running before (QEMU 7.2 restarts it
 * itself after a cancel in pre-switchover; `cont` if it did not).  -EBUSY if
 * the migration already completed: the guest runs at the destination. */
int vm_migrate_out_cancel(struct vm_manager *m, const char *name, char *err, size_t errlen);

/* Destination.  Defines the VM from spec (state "incoming", claimed by
 * migration_id, the claim kept across ferryd restarts), starts QEMU with
 * -incoming defer on this site's disks of the same names and networks of
 * the same names, then `migrate-incoming` incoming_uri ("unix:PATH" that
 * ferry connects to).  Idempotent for the same migration id while that QEMU
 * lives.  -EEXIST another VM has the name, -EBUSY held by another migration. */
int vm_import_incoming(struct vm_manager *m, const struct vm_spec *spec, const char *migration_id,
                       const char *incoming_uri, char *err, size_t errlen);
/* Does not wait.  *info: {"status": QEMU's migration status here, "running":
 * bool (the guest runs: the VM's state is then "running"), "resumed_at_ns":
 * realtime ns of the RESUME event (0 until then), "exited": bool and, when
 * true, "exit_reason"}.  -ENOENT no such VM. */
int vm_incoming_status(struct vm_manager *m, const char *name, json_t **info, char *err,
                       size_t errlen);
/* Abort/retry: kills that QEMU (by its pid) and removes the VM record (its
 * disks stay).  -ENOENT no such VM; -EBUSY held by another migration, or its
 * guest already ran here (this site is then the VM's only copy). */
int vm_discard_incoming(struct vm_manager *m, const char *name, const char *migration_id,
                        char *err, size_t errlen);

#endif
