/* vm: set-up of a running VM and the operations control and signals
 * perform on it (the thread model and the request fields are in vm.h).
 *
 * Run states: running -> pausing (no new IO; waiting for IO in flight) ->
 * paused (nothing in flight; the IO thread leaves the tables alone) ->
 * running again on resume.  stopping is final: drain, save, exit.  A pause
 * that times out stays in pausing (still issuing nothing) until a later
 * pause completes or resume. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "vm/simvm/verify.h"
#include "vm/simvm/vm.h"

const char *vm_run_state_name(enum vm_run_state s)
{
  switch (s) {
  case VM_RUNNING: return "running";
  case VM_PAUSING: return "pausing";
  case VM_PAUSED:  return "paused";
  case VM_STOPPING: return "stopping";
  }
  return "?";
}

int vm_init(struct vm *vm, struct sim_state *st, const char *state_path,
            const char *const *uris, struct nbd_handle **handles, const struct workload *wl,
            char *err, size_t errlen)
{
  memset(vm, 0, sizeof *vm);
  vm->st = *st;
  memset(st, 0, sizeof *st);   /* the tables are vm's now */
  vm->state_path = state_path;
  vm->ndisks = vm->st.ndisks;
  vm->wake_fd = -1;
  for (unsigned i = 0; i < vm->ndisks; i++) {
    struct vm_disk *d = &vm->disk[i];
    d->st = &vm->st.disks[i];
    d->uri = uris[i];
    d->index = i;
    d->nbd = handles[i];
    handles[i] = NULL;
    d->conn = CONN_UP;
    atomic_init(&d->up, true);
    uint64_t written = 0;
    for (uint64_t b = 0; b < d->st->nblocks; b++)
      written += d->st->table[b] != SIM_GEN_NONE;
    atomic_init(&d->written_blocks, written);
  }
  for (int i = 0; i < SIM_COUNTERS; i++)
    atomic_init(&vm->counters[i], vm->st.counters[i]);
  memcpy(vm->rng.s, vm->st.rng, sizeof vm->rng.s);
  if (!(vm->rng.s[0] | vm->rng.s[1] | vm->rng.s[2] | vm->rng.s[3]))
    rng_seed(&vm->rng, vm->st.vm_id);
  pthread_mutex_init(&vm->lock, NULL);
  pthread_mutex_init(&vm->stats_lock, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&vm->cond, &ca);
  pthread_condattr_destroy(&ca);
  histogram_reset(&vm->wlat);
  histogram_reset(&vm->rlat);
  histogram_reset(&vm->wlat_old);
  histogram_reset(&vm->wlat_mid);
  histogram_reset(&vm->rlat_old);
  histogram_reset(&vm->rlat_mid);
  vm->started_ns = now_ns();
  vm->run_state = VM_PAUSED;
  if (vm_workload_check(vm, wl, err, errlen) < 0)
    return -1;
  if (io_slots_alloc(&vm->slots, wl->qd, wl->bs) < 0) {
    snprintf(err, errlen, "no memory for %u IO buffers of %u bytes", wl->qd, wl->bs);
    return -1;
  }
  io_apply_initial_workload(vm, wl);
  workload_format(wl, vm->wl_text, sizeof vm->wl_text);
  memcpy(vm->st.workload, vm->wl_text, sizeof vm->st.workload);
  return 0;
}

void vm_destroy(struct vm *vm)
{
  for (unsigned i = 0; i < vm->ndisks; i++) {
    if (vm->disk[i].nbd)
      nbd_close(vm->disk[i].nbd);
    vm->disk[i].nbd = NULL;
  }
  io_slots_free(&vm->slots);
  sim_state_free(&vm->st);
  if (vm->wake_fd >= 0)
    close(vm->wake_fd);
  pthread_cond_destroy(&vm->cond);
  pthread_mutex_destroy(&vm->lock);
  pthread_mutex_destroy(&vm->stats_lock);
}

/* ---- operations ---- */

int vm_op_begin(struct vm *vm, char *err, size_t errlen)
{
  pthread_mutex_lock(&vm->lock);
  while (vm->busy && !vm->exiting && vm->run_state != VM_STOPPING)
    pthread_cond_wait(&vm->cond, &vm->lock);
  if (vm->exiting || vm->run_state == VM_STOPPING) {
    pthread_mutex_unlock(&vm->lock);
    snprintf(err, errlen, "the VM is stopping");
    return -1;
  }
  vm->busy = true;
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

void vm_op_end(struct vm *vm)
{
  pthread_mutex_lock(&vm->lock);
  vm->busy = false;
  pthread_cond_broadcast(&vm->cond);
  pthread_mutex_unlock(&vm->lock);
}

static void deadline_after(struct timespec *ts, long ms)
{
  clock_gettime(CLOCK_MONOTONIC, ts);
  ts->tv_sec += ms / 1000;
  ts->tv_nsec += (ms % 1000) * 1000000L;
  if (ts->tv_nsec >= 1000000000L) {
    ts->tv_sec++;
    ts->tv_nsec -= 1000000000L;
  }
}

int vm_drain(struct vm *vm, long timeout_ms, char *err, size_t errlen)
{
  pthread_mutex_lock(&vm->lock);
  vm->want_run = false;
  vm->drained = false;
  if (vm->run_state == VM_RUNNING || vm->run_state == VM_PAUSED)
    vm->run_state = VM_PAUSING;
  pthread_mutex_unlock(&vm->lock);
  vm_io_wake(vm);

  struct timespec until;
  if (timeout_ms >= 0)
    deadline_after(&until, timeout_ms);
  pthread_mutex_lock(&vm->lock);
  bool timed_out = false;
  while (!vm->drained && !vm->force && !vm->exiting && vm->io_started && !timed_out) {
    if (timeout_ms >= 0)
      timed_out = pthread_cond_timedwait(&vm->cond, &vm->lock, &until) == ETIMEDOUT;
    else
      pthread_cond_wait(&vm->cond, &vm->lock);
  }
  bool ok = vm->drained;
  if (ok && vm->run_state == VM_PAUSING)
    vm->run_state = VM_PAUSED;
  bool forced = vm->force;
  pthread_mutex_unlock(&vm->lock);
  if (ok)
    return 0;
  unsigned n = atomic_load(&vm->inflight);
  bool stalled = atomic_load(&vm->stalled);
  if (forced)
    snprintf(err, errlen, "interrupted by a forced stop with %u IOs in flight", n);
  else if (timed_out)
    snprintf(err, errlen, "pause timed out after %ld ms: %u IOs still in flight%s; the VM "
             "issues no new IO (state pausing) until resume", timeout_ms, n,
             stalled ? " (NBD disconnected, reconnecting)" : "");
  else
    snprintf(err, errlen, "the IO thread has stopped");
  return -1;
}

void vm_resume(struct vm *vm)
{
  pthread_mutex_lock(&vm->lock);
  if (vm->run_state == VM_STOPPING) {   /* an op overtaken by a forced stop */
    pthread_mutex_unlock(&vm->lock);
    return;
  }
  vm->want_run = true;
  vm->drained = false;
  vm->run_state = VM_RUNNING;
  pthread_mutex_unlock(&vm->lock);
  vm_io_wake(vm);
}

int vm_save(struct vm *vm, unsigned *uncertain, char *err, size_t errlen)
{
  struct sim_state snap;
  if (sim_state_alloc_like(&snap, &vm->st) < 0) {
    snprintf(err, errlen, "saving state: out of memory");
    return -1;
  }
  pthread_mutex_lock(&vm->lock);
  unsigned n;
  if (vm->io_started) {
    vm->snap_req = &snap;
    pthread_mutex_unlock(&vm->lock);
    vm_io_wake(vm);
    pthread_mutex_lock(&vm->lock);
    while (vm->snap_req == &snap && vm->io_started)
      pthread_cond_wait(&vm->cond, &vm->lock);
    if (vm->snap_req == &snap) {
      vm->snap_req = NULL;   /* the thread ended first: nothing moves any more */
      n = io_take_snapshot(vm, &snap);
    } else {
      n = vm->snap_uncertain;
    }
  } else {
    n = io_take_snapshot(vm, &snap);
  }
  memcpy(snap.workload, vm->wl_text, sizeof snap.workload);
  pthread_mutex_unlock(&vm->lock);
  int rc = sim_state_save(vm->state_path, &snap, err, errlen);
  sim_state_free(&snap);
  if (rc == 0) {
    log_debug(NULL, "state saved to %s%s", vm->state_path, n ? " (writes in flight saved as uncertain)" : "");
    if (uncertain)
      *uncertain = n;
  }
  return rc;
}

int vm_pause(struct vm *vm, long timeout_ms, char *err, size_t errlen)
{
  if (vm_drain(vm, timeout_ms, err, errlen) < 0)
    return -1;
  return vm_save(vm, NULL, err, errlen);
}

int vm_stop(struct vm *vm, char *err, size_t errlen)
{
  pthread_mutex_lock(&vm->lock);
  /* Wait for the op in progress (verify, a pause waiting for a reconnect):
   * a forced stop does not. */
  while (vm->busy && !vm->force && !vm->exiting && vm->run_state != VM_STOPPING)
    pthread_cond_wait(&vm->cond, &vm->lock);
  if (vm->run_state == VM_STOPPING || vm->exiting) {
    pthread_mutex_unlock(&vm->lock);
    snprintf(err, errlen, "the VM is already stopping");
    errno = EALREADY;
    return -1;
  }
  vm->busy = true;
  vm->run_state = VM_STOPPING;
  pthread_cond_broadcast(&vm->cond);
  pthread_mutex_unlock(&vm->lock);
  log_info(NULL, "stopping: waiting for IO in flight");
  char derr[256];
  int drained = vm_drain(vm, -1, derr, sizeof derr);
  if (drained < 0)
    log_warn(NULL, "stopping: %s; saving what was acknowledged (writes in flight as uncertain)", derr);
  if (vm_save(vm, NULL, err, errlen) < 0) {
    if (drained == 0) {
      /* Nothing is lost yet: stay alive, paused, so that stop or save can
       * be retried once the file system is fixed. */
      pthread_mutex_lock(&vm->lock);
      vm->run_state = VM_PAUSED;
      vm->busy = false;
      pthread_cond_broadcast(&vm->cond);
      pthread_mutex_unlock(&vm->lock);
    }
    errno = EIO;
    return -1;
  }
  if (drained < 0) {
    snprintf(err, errlen, "%s", derr);
    errno = EINTR;
    return -1;
  }
  log_info(NULL, "stopped: state saved to %s", vm->state_path);
  return 0;
}

int vm_set_workload(struct vm *vm, const struct workload *w, char *err, size_t errlen)
{
  if (vm_workload_check(vm, w, err, errlen) < 0)
    return -1;
  struct io_swap sw = { .wl = *w };
  if (io_slots_alloc(&sw.slots, w->qd, w->bs) < 0) {
    snprintf(err, errlen, "no memory for %u IO buffers of %u bytes", w->qd, w->bs);
    return -1;
  }
  pthread_mutex_lock(&vm->lock);
  vm->swap_req = &sw;
  pthread_mutex_unlock(&vm->lock);
  vm_io_wake(vm);
  pthread_mutex_lock(&vm->lock);
  while (!sw.done && !vm->force && !vm->exiting && vm->io_started)
    pthread_cond_wait(&vm->cond, &vm->lock);
  if (!sw.done)
    vm->swap_req = NULL;   /* withdrawn: the IO thread re-reads it under the lock */
  else
    workload_format(w, vm->wl_text, sizeof vm->wl_text);
  pthread_mutex_unlock(&vm->lock);
  io_slots_free(&sw.slots);   /* done: the old buffers; withdrawn: the unused new ones */
  if (!sw.done) {
    snprintf(err, errlen, "interrupted: the VM is stopping");
    return -1;
  }
  log_info(NULL, "workload now %s", vm->wl_text);
  return 0;
}

void vm_request_exit(struct vm *vm, int code)
{
  pthread_mutex_lock(&vm->lock);
  vm->exit_now = true;
  vm->exit_code = code;
  pthread_cond_broadcast(&vm->cond);
  pthread_mutex_unlock(&vm->lock);
}

int vm_verify(struct vm *vm, struct verify_report *r, char *err, size_t errlen)
{
  pthread_mutex_lock(&vm->lock);
  bool was_running = vm->want_run;
  pthread_mutex_unlock(&vm->lock);
  if (vm_drain(vm, -1, err, errlen) < 0)
    return -1;
  pthread_mutex_lock(&vm->lock);
  vm->verifying = true;
  pthread_mutex_unlock(&vm->lock);
  const char *uris[SIM_MAX_DISKS];
  for (unsigned i = 0; i < vm->ndisks; i++)
    uris[i] = vm->disk[i].uri;
  /* Drained: the IO thread leaves the tables alone until resume. */
  int rc = sim_verify(&vm->st, uris, r, err, errlen);
  pthread_mutex_lock(&vm->lock);
  vm->verifying = false;
  pthread_mutex_unlock(&vm->lock);
  if (was_running)
    vm_resume(vm);
  if (rc == 0)
    log_info(NULL, "verify: %s: %llu blocks checked, %llu lost, %llu newer, %llu misplaced, "
             "%llu foreign, %llu unexpected", r->ok ? "ok" : "FAILED",
             (unsigned long long)r->checked, (unsigned long long)r->count[SIM_LOST],
             (unsigned long long)r->count[SIM_NEWER], (unsigned long long)r->count[SIM_MISPLACED],
             (unsigned long long)r->count[SIM_FOREIGN],
             (unsigned long long)r->count[SIM_UNEXPECTED]);
  return rc;
}
