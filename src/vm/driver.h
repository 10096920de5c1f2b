/* driver: the ops table every hypervisor driver fills (sim now, qemu next),
 * and the per-VM runtime facts the VM manager hands it.  Internal to src/vm.
 *
 * The manager owns the VM table, claims and process watching; a driver only
 * knows how to start its kind of VM process and talk to it.  Every op returns
 * 0 or -errno with a message in err, and may block (pause drains IO; verify
 * reads a whole disk): the manager calls them without its lock held. */
#ifndef FERRY_VM_DRIVER_H
#define FERRY_VM_DRIVER_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "vm/vm.h"

struct vm_runtime {
  const struct vm_spec *spec;
  const char *dir;                     /* DATA_DIR/vms/NAME */
  const char *state_path;              /* the VM's movable state (sim: state file) */
  const char *control_path;            /* control socket */
  const char *log_path;                /* console log */
  const char *const *disk_uris;        /* NBD URI of each disk, in spec order */
  const char *program;                 /* the driver's program (ferry-simvm, qemu) */
  pid_t pid;                           /* 0 when not running */
};

struct vm_driver_ops {
  const char *name;
  /* Checks a workload/settings string before anything is stored. */
  int (*validate)(const char *workload, char *err, size_t errlen);
  /* Starts the VM process (paused if asked) and returns once it answers;
   * sets rt->pid.  The process is in its own session. */
  int (*start)(struct vm_runtime *rt, bool paused, char *err, size_t errlen);
  /* Ends the process: orderly first (state saved), forced after a timeout. */
  int (*stop)(struct vm_runtime *rt, char *err, size_t errlen);
  /* Returns once the VM issues no IO and none is in flight. */
  int (*pause)(struct vm_runtime *rt, char *err, size_t errlen);
  int (*resume)(struct vm_runtime *rt, char *err, size_t errlen);
  /* The driver's live view of the VM (*out: new reference). */
  int (*status)(struct vm_runtime *rt, json_t **out, char *err, size_t errlen);
  /* Checks the VM's data; works with or without a running process. */
  int (*verify)(struct vm_runtime *rt, json_t **report, char *err, size_t errlen);
  int (*set_workload)(struct vm_runtime *rt, const char *workload, char *err, size_t errlen);
  /* Makes the movable state current on disk (the VM is paused). */
  int (*save_state)(struct vm_runtime *rt, char *err, size_t errlen);
  /* True if pid is this driver's live process for rt (not a reused pid). */
  bool (*alive)(struct vm_runtime *rt, pid_t pid);
};

extern const struct vm_driver_ops vm_driver_sim;

#endif
