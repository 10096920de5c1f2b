/* vm: one running sim VM: its state, its disks' NBD connections, the IO
 * thread that runs the workload (io.c), and the operations that control
 * (control.c) and signals (main.c) perform on it (vm.c).
 *
 * THREAD MODEL
 *   IO thread   owns the NBD handles, the IO slots, the rng and the tables:
 *               it is the only writer of every table entry.  It never blocks
 *               except in ppoll(): connects are asynchronous too.
 *   op threads  (a control client's thread, or main on SIGTERM) ask things of
 *               the IO thread by setting a field under vm->lock, waking it
 *               (wake_fd) and waiting on vm->cond:
 *                 want_run = false  -> it issues no new IO; when nothing is in
 *                                      flight it sets `drained`.  From then on,
 *                                      until want_run is set again, it does
 *                                      not touch the tables, so an op thread
 *                                      may read them (verify) or copy them.
 *                 snap_req          -> it copies tables, counters, rng at a
 *                                      point between completions, writes in
 *                                      flight marked uncertain, and clears it.
 *                 swap_req          -> a new workload with its buffers; taken
 *                                      once nothing is in flight (no IO is
 *                                      issued while one is pending).
 *   Ops (pause, resume, save, stop, set_workload, verify) are serialised by
 *   vm->busy (vm_op_begin/end); status takes only vm->lock and atomics.
 *   Counters, inflight, stalled and the per-disk up/written_blocks are
 *   atomics written by the IO thread only.
 *
 * Memory: the tables (4 bytes per 4 KiB block), qd slot buffers of bs bytes
 * and a few fixed arrays.  Nothing is allocated per IO by this program. */
#ifndef FERRY_SIMVM_VM_H
#define FERRY_SIMVM_VM_H

#include <libnbd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/histogram.h"
#include "vm/simvm/rng.h"
#include "vm/simvm/state.h"
#include "vm/simvm/workload.h"

enum vm_run_state { VM_RUNNING, VM_PAUSING, VM_PAUSED, VM_STOPPING };

enum slot_state {
  SLOT_FREE,
  SLOT_INFLIGHT,    /* sent; its completion callback has not run */
  SLOT_DONE,        /* callback ran; on vm->slots.done, to be processed */
  SLOT_REQUEUE,     /* its connection was lost: re-sent (same data) on reconnect */
};

struct io_slot {
  enum slot_state state;
  bool write;
  unsigned disk;
  uint64_t block;           /* first 4 KiB block */
  uint32_t nblocks;
  int error;                /* errno from the completion callback */
  uint64_t start_ns;        /* first send: latency includes any reconnect */
  uint32_t *gens;           /* write: generation of each block */
  unsigned char *buf;       /* bs bytes */
  unsigned index;
  struct io_slots *owner;
};

/* The buffers of one workload: qd slots of bs bytes each. */
struct io_slots {
  unsigned n;
  uint32_t bs;
  struct io_slot *slot;
  unsigned char *mem;       /* n * bs, 4 KiB aligned */
  uint32_t *gens;           /* n * bs / 4096 */
  unsigned *free_list, nfree;
  unsigned *done, ndone;    /* indices of SLOT_DONE slots */
};

enum disk_conn { CONN_DOWN, CONN_CONNECTING, CONN_UP };

struct vm_disk {
  struct sim_disk_state *st;   /* name, size, nblocks, table: in vm->st */
  const char *uri;
  unsigned index;
  /* IO thread only */
  struct nbd_handle *nbd;
  enum disk_conn conn;
  uint64_t retry_at, backoff, conn_started, down_since, last_warn;
  bool broken;                 /* a send failed for want of a connection */
  bool selected;               /* the workload sends IO here */
  uint64_t nslots;             /* bs-sized slots of the disk */
  uint64_t mult;               /* zipf rank -> slot multiplier */
  struct zipf zipf;
  bool use_zipf;
  /* published */
  _Atomic bool up;
  _Atomic uint64_t written_blocks;   /* table entries != SIM_GEN_NONE */
};

struct io_swap {
  struct workload wl;
  struct io_slots slots;       /* in: the new buffers; out: the old ones */
  bool done;
};

#define VM_STATS_RING 11         /* 100 ms samples: one second and a bit */

struct vm_sample {
  uint64_t t, reads, writes, bytes_written, bytes_read;
};

struct vm {
  struct sim_state st;
  struct vm_disk disk[SIM_MAX_DISKS];
  unsigned ndisks;
  const char *state_path;

  /* IO thread only */
  struct workload wl;
  struct io_slots slots;
  struct rng rng;
  double interval_ns;          /* 0: as fast as qd allows */
  uint64_t next_issue;
  uint64_t next_tick;
  unsigned ticks;
  uint64_t logged_read_errors, logged_write_errors, logged_read_io_errors;
  pthread_t io_thread;
  bool io_joinable;
  bool io_started;             /* under lock: the IO thread serves requests */
  int wake_fd;                 /* eventfd */

  pthread_mutex_t lock;
  pthread_cond_t cond;         /* CLOCK_MONOTONIC */
  /* under lock */
  enum vm_run_state run_state;
  bool want_run, drained, quit;
  bool busy, verifying;
  bool exiting;                /* shutting down: waits give up */
  bool force;                  /* a second SIGTERM: stop without draining */
  bool stop_signal;            /* SIGTERM/SIGINT/SIGHUP seen: main stops the VM */
  bool exit_now;               /* stop done: main exits with exit_code */
  int exit_code;
  struct sim_state *snap_req;
  unsigned snap_uncertain;
  struct io_swap *swap_req;
  char wl_text[SIM_WL_SPEC_MAX];

  /* published by the IO thread */
  _Atomic uint64_t counters[SIM_COUNTERS];
  _Atomic unsigned inflight;
  _Atomic bool stalled;
  _Atomic uint32_t gen_hwm;
  struct histogram wlat, rlat;
  pthread_mutex_t stats_lock;  /* ring and the *_old histograms */
  struct vm_sample ring[VM_STATS_RING];
  unsigned ring_pos, ring_n;
  struct histogram wlat_old, wlat_mid, rlat_old, rlat_mid;
  uint64_t started_ns;
};

/* ---- set-up (main.c) ---- */
/* Initialises vm around a loaded or created state (moved into vm->st), with
 * connected handles (taken over) and the workload to run.  Returns 0 or -1
 * with err. */
int vm_init(struct vm *vm, struct sim_state *st, const char *state_path,
            const char *const *uris, struct nbd_handle **handles, const struct workload *wl,
            char *err, size_t errlen);
void vm_destroy(struct vm *vm);

/* ---- io.c ---- */
int vm_io_start(struct vm *vm, bool run, char *err, size_t errlen);
void vm_io_stop(struct vm *vm);           /* sets quit, joins */
void vm_io_wake(struct vm *vm);
/* Set-up only, before vm_io_start: the first workload (no reseed). */
void io_apply_initial_workload(struct vm *vm, const struct workload *w);
/* Snapshot as the IO thread takes it (vm.c calls it once the thread is gone). */
unsigned io_take_snapshot(struct vm *vm, struct sim_state *out);
/* Allocates the buffers of a workload. */
int io_slots_alloc(struct io_slots *s, unsigned qd, uint32_t bs);
void io_slots_free(struct io_slots *s);
/* Per-disk workload parameters (slots, zipf); also checks that the workload
 * reaches at least one disk.  Returns 0 or -1 with err. */
int vm_workload_check(const struct vm *vm, const struct workload *w, char *err, size_t errlen);

/* ---- vm.c: operations ---- */
int vm_op_begin(struct vm *vm, char *err, size_t errlen);
void vm_op_end(struct vm *vm);
/* Stops issuing IO and waits until none is in flight; timeout_ms < 0:
 * forever.  Returns 0, or -1 with err (timed out: the VM stays in
 * "pausing", issuing nothing; or interrupted by a forced stop). */
int vm_drain(struct vm *vm, long timeout_ms, char *err, size_t errlen);
void vm_resume(struct vm *vm);
/* Writes the state file from a consistent snapshot; *uncertain (may be
 * NULL) gets how many blocks had writes in flight (saved as uncertain). */
int vm_save(struct vm *vm, unsigned *uncertain, char *err, size_t errlen);
int vm_pause(struct vm *vm, long timeout_ms, char *err, size_t errlen);   /* drain + save */
/* Drain (until done, or forced), save, state "stopping".  The caller then
 * asks main to exit (vm_request_exit).  -1 with errno EALREADY: another
 * stop is under way; EINTR: forced before the drain ended (saved with the
 * writes in flight as uncertain; the VM must exit, status 1); EIO: the save
 * failed after a clean drain (the VM stays paused and alive). */
int vm_stop(struct vm *vm, char *err, size_t errlen);
int vm_set_workload(struct vm *vm, const struct workload *w, char *err, size_t errlen);
/* Drain, read every block against the table (verify.h), resume if it was
 * running.  Returns 0 with the report, or -1 with err. */
struct verify_report;
int vm_verify(struct vm *vm, struct verify_report *r, char *err, size_t errlen);
void vm_request_exit(struct vm *vm, int code);
const char *vm_run_state_name(enum vm_run_state s);

#endif
