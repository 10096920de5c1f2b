/* driver: the ops table every hypervisor driver fills (sim, qemu), and the
 * per-VM runtime facts the VM manager hands it.  Internal to src/vm.
 *
 * The manager owns the VM table, claims and process watching; a driver only
 * knows how to start its kind of VM process and talk to it.  Every op returns
 * 0 or -errno with a message in err, and may block (pause drains IO; verify
 * reads a whole disk; a qemu stop waits for the guest to power down): the
 * manager calls them without its lock held, one at a time per VM (busy
 * flag), except status, which may run beside another op.  Ops marked
 * optional may be NULL: the manager answers -EOPNOTSUPP for them. */
#ifndef FERRY_VM_DRIVER_H
#define FERRY_VM_DRIVER_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "vm/network.h"
#include "vm/vm.h"

struct vm_runtime {
  const struct vm_spec *spec;
  const char *dir;                     /* DATA_DIR/vms/NAME */
  const char *state_path;              /* the VM's movable state (sim: state file) */
  const char *control_path;            /* control socket (sim: .ctl, qemu: QMP .qmp) */
  const char *log_path;                /* console log (qemu: the serial console) */
  const char *const *disk_uris;        /* NBD URI of each disk, in spec order */
  const struct vm_netdev *netdevs;     /* the network of each NIC, in spec order */
  const char *program;                 /* the driver's program (ferry-simvm, qemu) */
  unsigned stop_timeout_ms;            /* qemu: how long a guest may take to power down */
  bool was_running;                    /* the recorded state is running (not paused) */
  pid_t pid;                           /* 0 when not running */
};

struct vm_driver_ops {
  const char *name;
  const char *control_ext;             /* control socket: DATA_DIR/run/NAME.<ext> */
  bool has_state_file;                 /* vm_export_state can read state_path */
  /* Checks a workload/settings string before anything is stored. */
  int (*validate)(const char *workload, char *err, size_t errlen);
  /* Optional: driver checks of a whole spec (beyond vm_spec_from_json's). */
  int (*check_spec)(const struct vm_spec *spec, char *err, size_t errlen);
  /* Starts the VM process (paused if asked) and returns once it answers;
   * sets rt->pid.  The process is in its own session. */
  int (*start)(struct vm_runtime *rt, bool paused, char *err, size_t errlen);
  /* Ends the process: orderly first (state saved), forced after a timeout. */
  int (*stop)(struct vm_runtime *rt, char *err, size_t errlen);
  /* Returns once the VM issues no IO and none is in flight. */
  int (*pause)(struct vm_runtime *rt, char *err, size_t errlen);
  int (*resume)(struct vm_runtime *rt, char *err, size_t errlen);
  /* The driver's live view of the VM (*out: new reference); its "state" is
   * "running" or "paused" when the VM is either. */
  int (*status)(struct vm_runtime *rt, json_t **out, char *err, size_t errlen);
  /* Checks the VM's data; works with or without a running process. */
  int (*verify)(struct vm_runtime *rt, json_t **report, char *err, size_t errlen);
  int (*set_workload)(struct vm_runtime *rt, const char *workload, char *err, size_t errlen);
  /* Makes the movable state current on disk (the VM is paused). */
  int (*save_state)(struct vm_runtime *rt, char *err, size_t errlen);
  /* True if pid is this driver's live process for rt (not a reused pid). */
  bool (*alive)(struct vm_runtime *rt, pid_t pid);

  /* Optional: ends the process at once, without a guest shutdown (its
   * guest runs on at another site).  NULL: stop is used. */
  int (*quit)(struct vm_runtime *rt, char *err, size_t errlen);
  /* Optional: live migration of RAM (vm.h "live migration"). */
  int (*migrate_out_start)(struct vm_runtime *rt, const char *uri, char *err, size_t errlen);
  int (*migrate_out_status)(struct vm_runtime *rt, json_t **info, char *err, size_t errlen);
  int (*migrate_out_continue)(struct vm_runtime *rt, char *err, size_t errlen);
  int (*migrate_out_cancel)(struct vm_runtime *rt, char *err, size_t errlen);
  /* Starts the process waiting for its RAM on uri; sets rt->pid. */
  int (*start_incoming)(struct vm_runtime *rt, const char *uri, char *err, size_t errlen);
  int (*incoming_status)(struct vm_runtime *rt, json_t **info, char *err, size_t errlen);
  /* Optional, never blocks: the manager stops tracking rt's process (it
   * exited, the VM was removed, or ferryd stops); drop any connection. */
  void (*release)(struct vm_runtime *rt);
};

extern const struct vm_driver_ops vm_driver_sim;

/* ---- shared by the drivers (vm.c) ---- */

/* Gone, or a zombie that its parent (init, for a process an earlier ferryd
 * started) has not reaped yet. */
bool vm_pid_gone(pid_t pid);
/* Starts program in a session of its own (it outlives ferryd, as a guest
 * does), stdin /dev/null, stdout and stderr to logfd (the caller closes its
 * copy).  The pid, or -errno with err. */
pid_t vm_spawn(const char *program, char *const argv[], int logfd, char *err, size_t errlen);
extern const struct vm_driver_ops vm_driver_qemu;

/* ---- probe.c: what the host offers ---- */

struct vm_kvm_status {
  bool present;                        /* /dev/kvm exists */
  bool usable;                         /* it runs guest code at hardware speed */
  char why[256];                       /* what failed, or "ok" */
};

/* The KVM check (docs/qemu.md "KVM"): open /dev/kvm, API version, create a
 * VM and a vCPU, run a few million guest instructions in 64-bit mode within
 * a time budget, in a child process.  Cached for the process; refresh
 * checks again.  Thread-safe. */
void vm_kvm_check(bool refresh, struct vm_kvm_status *out);
/* Starts program with -machine none and asks it over QMP (version,
 * machines, CPU models); adds KVM and MemAvailable.  run_dir holds its
 * QMP socket for the moment.  Always returns an object (present false and
 * "why" when QEMU cannot run). */
json_t *vm_probe_qemu(const char *program, const char *run_dir);
/* program resolved like execvp would: a path with '/' as is, else the
 * first match on $PATH.  0, or -ENOENT with out set to name. */
int vm_find_program(const char *name, char *out, size_t len);
/* The last bytes of a log file as one line (for error messages). */
void vm_log_tail(const char *path, char *out, size_t len);

#endif
