/* io: the IO thread of a sim VM (the thread model is in vm.h).
 *
 * DESIGN
 * One thread drives every disk's libnbd handle asynchronously: one ppoll()
 * over the handles' sockets and an eventfd that op threads use to wake it.
 * Each loop: take requests (run/pause, snapshot, new workload), (re)connect
 * disks whose retry time has come, issue new IOs while a slot is free and
 * the pacing clock allows, poll, let libnbd read and write, then process
 * completed slots.
 *
 * Slots.  The workload's qd slots each own a bs-byte buffer and a
 * generation array.  No two slots in use cover the same block of the same
 * disk (a new IO whose blocks overlap one in use is redrawn, or waits), so
 * a block has at most one IO at a time and its table entry is stable while
 * the IO runs: the table entry of each block is set only when its write is
 * acknowledged (the generation was fixed when the write was built), or set
 * to SIM_GEN_UNCERTAIN when the server replied with an error.  Reads check
 * each block whose table entry is a generation (not none, not uncertain).
 *
 * Connection loss.  When a handle dies (EOF, reset, ESHUTDOWN reply from a
 * server going down), every slot in flight on it becomes SLOT_REQUEUE: it
 * keeps its buffer and generations and is re-sent unchanged once the disk
 * is reconnected (writing the same block with the same generation twice is
 * harmless), as QEMU's NBD client does with reconnect-delay.  Reconnects are
 * asynchronous (nbd_aio_connect_uri) and retried after 100 ms, doubling up to
 * 1 s, forever; the disk's size must still match.  IO to other disks goes on.
 *
 * Pacing.  With a target rate, IO n is issued at next_issue = t0 + n *
 * interval; the schedule may lag behind the clock by at most 100 ms (a stall
 * does not turn into a long burst).  qd bounds IOs in flight either way. */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "vm/simvm/block.h"
#include "vm/simvm/vm.h"

#define NS_PER_MS          1000000ull
#define BACKOFF_MIN_NS     (100 * NS_PER_MS)
#define BACKOFF_MAX_NS     (1000 * NS_PER_MS)
#define CONNECT_TIMEOUT_NS (10000 * NS_PER_MS)
#define WARN_EVERY_NS      (10000 * NS_PER_MS)
#define TICK_NS            (100 * NS_PER_MS)
#define BURST_NS           (100 * NS_PER_MS)
#define PICK_TRIES         4
#define LOG_FIRST          20      /* then one line per LOG_EVERY */
#define LOG_EVERY          1000

/* Errors that mean "the connection is going or gone", not "this IO failed". */
static bool conn_lost_errno(int e)
{
  return e == ENOTCONN || e == ESHUTDOWN || e == ECONNRESET || e == EPIPE;
}

static bool should_log(uint64_t *count)
{
  uint64_t n = ++*count;
  return n <= LOG_FIRST || n % LOG_EVERY == 0;
}

static void count(struct vm *vm, enum sim_counter c, uint64_t n)
{
  atomic_fetch_add_explicit(&vm->counters[c], n, memory_order_relaxed);
}

/* ---- slots ---- */

int io_slots_alloc(struct io_slots *s, unsigned qd, uint32_t bs)
{
  memset(s, 0, sizeof *s);
  unsigned bpi = bs / SIM_BLOCK_SIZE;
  s->n = qd;
  s->bs = bs;
  s->slot = calloc(qd, sizeof *s->slot);
  s->gens = calloc((size_t)qd * bpi, sizeof *s->gens);
  s->free_list = calloc(qd, sizeof *s->free_list);
  void *mem = NULL;
  if (posix_memalign(&mem, SIM_BLOCK_SIZE, (size_t)qd * bs) != 0)
    mem = NULL;
  s->mem = mem;
  if (!s->slot || !s->gens || !s->free_list || !s->mem) {
    io_slots_free(s);
    errno = ENOMEM;
    return -1;
  }
  for (unsigned i = 0; i < qd; i++) {
    s->slot[i] = (struct io_slot){ .state = SLOT_FREE, .buf = s->mem + (size_t)i * bs,
                                   .gens = s->gens + (size_t)i * bpi, .index = i };
    s->free_list[i] = qd - 1 - i;
  }
  s->nfree = qd;
  return 0;
}

void io_slots_free(struct io_slots *s)
{
  free(s->slot);
  free(s->gens);
  free(s->free_list);
  free(s->mem);
  memset(s, 0, sizeof *s);
}

static void slot_release(struct vm *vm, struct io_slot *s)
{
  s->state = SLOT_FREE;
  vm->slots.free_list[vm->slots.nfree++] = s->index;
  atomic_store_explicit(&vm->inflight, vm->slots.n - vm->slots.nfree, memory_order_relaxed);
}

static unsigned inflight(const struct vm *vm)
{
  return vm->slots.n - vm->slots.nfree;
}

/* ---- workload ---- */

static uint64_t disk_nslots(const struct sim_disk_state *d, uint32_t bs)
{
  return d->nblocks / (bs / SIM_BLOCK_SIZE);
}

int vm_workload_check(const struct vm *vm, const struct workload *w, char *err, size_t errlen)
{
  for (unsigned i = 0; !w->all_disks && i < w->ndisks; i++) {
    if (sim_state_find_disk(&vm->st, w->disks[i]) < 0) {
      snprintf(err, errlen, "workload: disks: this VM has no disk '%s'", w->disks[i]);
      return -1;
    }
  }
  for (unsigned i = 0; i < vm->ndisks; i++)
    if (workload_uses_disk(w, vm->st.disks[i].name) && disk_nslots(&vm->st.disks[i], w->bs) > 0)
      return 0;
  snprintf(err, errlen, "workload: bs=%u is larger than every disk it would use", w->bs);
  return -1;
}

/* Takes w as the workload: per-disk slots and samplers, the pacing clock,
 * and (reseed) the rng if w names a seed.  vm_workload_check passed. */
static void apply_workload(struct vm *vm, const struct workload *w, bool reseed)
{
  vm->wl = *w;
  for (unsigned i = 0; i < vm->ndisks; i++) {
    struct vm_disk *d = &vm->disk[i];
    d->selected = workload_uses_disk(w, d->st->name);
    d->nslots = disk_nslots(d->st, w->bs);
    d->use_zipf = w->zipf > 0 && d->nslots > 1;
    if (d->use_zipf && zipf_init(&d->zipf, d->nslots, w->zipf) < 0)
      d->use_zipf = false;   /* cannot happen: the spec parser bounds zipf */
    d->mult = slot_multiplier(d->nslots);
  }
  double iops = workload_target_iops(w);
  vm->interval_ns = iops > 0 ? 1e9 / iops : 0;
  vm->next_issue = now_ns();
  if (reseed && w->has_seed) {
    rng_seed(&vm->rng, w->seed);
  }
}

void io_apply_initial_workload(struct vm *vm, const struct workload *w)
{
  apply_workload(vm, w, false);
}

/* ---- issuing ---- */

static bool overlaps(const struct vm *vm, unsigned disk, uint64_t block, uint32_t n)
{
  for (unsigned i = 0; i < vm->slots.n; i++) {
    const struct io_slot *s = &vm->slots.slot[i];
    if (s->state != SLOT_FREE && s->disk == disk && s->block < block + n &&
        block < s->block + s->nblocks)
      return true;
  }
  return false;
}

/* Draws the next IO into s (disk weighted by size, slot by zipf or uniform).
 * False if no disk can take IO now or every draw collided with IO in use. */
static bool pick_io(struct vm *vm, struct io_slot *s)
{
  uint64_t total = 0;
  for (unsigned i = 0; i < vm->ndisks; i++) {
    const struct vm_disk *d = &vm->disk[i];
    if (d->selected && d->conn == CONN_UP)
      total += d->nslots;
  }
  if (total == 0)
    return false;
  uint32_t bpi = vm->wl.bs / SIM_BLOCK_SIZE;
  for (int tries = 0; tries < PICK_TRIES; tries++) {
    uint64_t r = rng_below(&vm->rng, total);
    struct vm_disk *d = NULL;
    for (unsigned i = 0; i < vm->ndisks; i++) {
      struct vm_disk *c = &vm->disk[i];
      if (!c->selected || c->conn != CONN_UP)
        continue;
      if (r < c->nslots) {
        d = c;
        break;
      }
      r -= c->nslots;
    }
    uint64_t slot = d->use_zipf
                      ? slot_of_rank(zipf_sample(&d->zipf, &vm->rng) - 1, d->mult, d->nslots)
                      : rng_below(&vm->rng, d->nslots);
    bool write = rng_below(&vm->rng, 100) < vm->wl.write_pct;
    if (overlaps(vm, d->index, slot * bpi, bpi))
      continue;
    s->disk = d->index;
    s->block = slot * bpi;
    s->nblocks = bpi;
    s->write = write;
    return true;
  }
  return false;
}

/* The generation of a block's next write: one more than the table's, or
 * after an uncertain write one above every generation issued so far, so it
 * cannot be taken for what the failed write may have left.  Never 0 or
 * SIM_GEN_UNCERTAIN (wraps to 1 after 4 billion writes of one block). */
static uint32_t next_gen(uint32_t g, uint32_t *hwm)
{
  uint32_t n = g == SIM_GEN_UNCERTAIN ? *hwm + 1 : g + 1;
  if (n == SIM_GEN_UNCERTAIN || n == 0)
    n = 1;
  if (n > *hwm)
    *hwm = n;
  return n;
}

static void prepare_write(struct vm *vm, struct io_slot *s)
{
  struct vm_disk *d = &vm->disk[s->disk];
  const uint32_t *t = d->st->table + s->block;
  for (uint32_t i = 0; i < s->nblocks; i++) {
    s->gens[i] = next_gen(t[i], &vm->st.gen_hwm);
    sim_block_fill(s->buf + (size_t)i * SIM_BLOCK_SIZE, vm->st.vm_id, s->disk,
                   (s->block + i) * SIM_BLOCK_SIZE, s->gens[i]);
  }
}

static int io_complete(void *user_data, int *error)
{
  struct io_slot *s = user_data;
  /* A slot re-queued before libnbd retired its command ignores the retirement. */
  if (s->state == SLOT_INFLIGHT) {
    s->error = *error;
    s->state = SLOT_DONE;
  }
  return 1;
}

static bool handle_dead(struct nbd_handle *h)
{
  return nbd_aio_is_dead(h) || nbd_aio_is_closed(h);
}

static void slot_send(struct vm *vm, struct io_slot *s)
{
  struct vm_disk *d = &vm->disk[s->disk];
  nbd_completion_callback cb = { .callback = io_complete, .user_data = s };
  uint64_t off = s->block * SIM_BLOCK_SIZE;
  size_t len = (size_t)s->nblocks * SIM_BLOCK_SIZE;
  s->state = SLOT_INFLIGHT;
  s->error = 0;
  int64_t c = s->write ? nbd_aio_pwrite(d->nbd, s->buf, len, off, cb, 0)
                       : nbd_aio_pread(d->nbd, s->buf, len, off, cb, 0);
  if (c >= 0)
    return;
  int e = nbd_get_errno();
  if (handle_dead(d->nbd) || conn_lost_errno(e)) {
    s->state = SLOT_REQUEUE;
    d->broken = true;   /* the loop drops the connection and reconnects */
    return;
  }
  log_error(d->st->name, "cannot send %s at offset %" PRIu64 ": %s", s->write ? "write" : "read",
            off, nbd_get_error());
  s->error = e ? e : EIO;
  s->state = SLOT_DONE;
}

/* Issues IO while slots are free and the clock allows.  Returns true if it
 * stopped for the clock (the caller sleeps until next_issue). */
static bool issue(struct vm *vm)
{
  uint64_t now = now_ns();
  if (vm->interval_ns > 0 && vm->next_issue + BURST_NS < now)
    vm->next_issue = now - BURST_NS;
  while (vm->slots.nfree > 0) {
    if (vm->interval_ns > 0 && now < vm->next_issue)
      return true;
    struct io_slot *s = &vm->slots.slot[vm->slots.free_list[vm->slots.nfree - 1]];
    if (!pick_io(vm, s))
      return false;
    vm->slots.nfree--;
    atomic_store_explicit(&vm->inflight, inflight(vm), memory_order_relaxed);
    s->start_ns = now;
    if (s->write)
      prepare_write(vm, s);
    slot_send(vm, s);
    if (vm->interval_ns > 0)
      vm->next_issue += (uint64_t)vm->interval_ns;
    now = now_ns();
  }
  return false;
}

/* ---- completions ---- */

static void finish_write(struct vm *vm, struct io_slot *s, uint64_t now)
{
  struct vm_disk *d = &vm->disk[s->disk];
  uint32_t *t = d->st->table + s->block;
  uint64_t newly = 0;
  if (s->error == 0) {
    for (uint32_t i = 0; i < s->nblocks; i++) {
      newly += t[i] == SIM_GEN_NONE;
      t[i] = s->gens[i];   /* acknowledged: now the table may say so */
    }
    count(vm, SIM_C_WRITES, 1);
    count(vm, SIM_C_BYTES_WRITTEN, (uint64_t)s->nblocks * SIM_BLOCK_SIZE);
    histogram_record(&vm->wlat, now - s->start_ns);
  } else {
    for (uint32_t i = 0; i < s->nblocks; i++) {
      newly += t[i] == SIM_GEN_NONE;
      t[i] = SIM_GEN_UNCERTAIN;   /* it may or may not have landed */
    }
    count(vm, SIM_C_WRITE_ERRORS, 1);
    if (should_log(&vm->logged_write_errors))
      log_warn(d->st->name, "write at offset %" PRIu64 " length %u failed: %s; %u blocks "
               "marked uncertain (%" PRIu64 " write errors so far)",
               s->block * SIM_BLOCK_SIZE, s->nblocks * SIM_BLOCK_SIZE, strerror(s->error),
               s->nblocks, vm->logged_write_errors);
  }
  if (newly)
    atomic_fetch_add_explicit(&d->written_blocks, newly, memory_order_relaxed);
}

static void finish_read(struct vm *vm, struct io_slot *s, uint64_t now)
{
  struct vm_disk *d = &vm->disk[s->disk];
  const uint32_t *t = d->st->table + s->block;
  if (s->error) {
    count(vm, SIM_C_READ_IO_ERRORS, 1);
    if (should_log(&vm->logged_read_io_errors))
      log_warn(d->st->name, "read at offset %" PRIu64 " length %u failed: %s (%" PRIu64
               " so far)", s->block * SIM_BLOCK_SIZE, s->nblocks * SIM_BLOCK_SIZE,
               strerror(s->error), vm->logged_read_io_errors);
    return;
  }
  for (uint32_t i = 0; i < s->nblocks; i++) {
    uint32_t g = t[i];
    if (g == SIM_GEN_NONE || g == SIM_GEN_UNCERTAIN)
      continue;
    uint64_t off = (s->block + i) * SIM_BLOCK_SIZE;
    struct sim_block_info info;
    const unsigned char *b = s->buf + (size_t)i * SIM_BLOCK_SIZE;
    enum sim_verdict v = sim_block_check(b, vm->st.vm_id, s->disk, off, g, &info);
    if (v == SIM_OK)
      continue;
    count(vm, SIM_C_READ_ERRORS, 1);
    if (should_log(&vm->logged_read_errors)) {
      char detail[200];
      sim_verdict_detail(v, &info, vm->st.vm_id, s->disk, off, g, detail, sizeof detail);
      log_error(d->st->name, "read check failed at offset %" PRIu64 ": %s: expected generation "
                "%u, %s (%" PRIu64 " bad blocks read so far)", off, sim_verdict_name(v), g,
                detail, vm->logged_read_errors);
    }
  }
  count(vm, SIM_C_READS, 1);
  count(vm, SIM_C_BYTES_READ, (uint64_t)s->nblocks * SIM_BLOCK_SIZE);
  histogram_record(&vm->rlat, now - s->start_ns);
}

/* Processes SLOT_DONE slots.  Connection-type errors re-queue the IO; an
 * ESHUTDOWN reply also marks its disk for reconnection (*kick). */
static void process_done(struct vm *vm, bool *kick)
{
  uint64_t now = now_ns();
  for (unsigned i = 0; i < vm->slots.n; i++) {
    struct io_slot *s = &vm->slots.slot[i];
    if (s->state != SLOT_DONE)
      continue;
    struct vm_disk *d = &vm->disk[s->disk];
    if (s->error && (conn_lost_errno(s->error) || d->conn != CONN_UP || handle_dead(d->nbd))) {
      s->state = SLOT_REQUEUE;
      kick[s->disk] = true;
      continue;
    }
    if (s->write)
      finish_write(vm, s, now);
    else
      finish_read(vm, s, now);
    slot_release(vm, s);
  }
}

/* ---- connections ---- */

static void update_stalled(struct vm *vm)
{
  bool stalled = false;
  for (unsigned i = 0; i < vm->ndisks; i++)
    stalled |= vm->disk[i].conn != CONN_UP;
  atomic_store(&vm->stalled, stalled);
}

static void schedule_retry(struct vm *vm, struct vm_disk *d, uint64_t now)
{
  if (d->nbd)
    nbd_close(d->nbd);
  d->nbd = NULL;
  d->conn = CONN_DOWN;
  d->backoff = d->backoff ? MIN(d->backoff * 2, BACKOFF_MAX_NS) : BACKOFF_MIN_NS;
  d->retry_at = now + d->backoff;
  if (now - d->last_warn >= WARN_EVERY_NS) {
    log_warn(d->st->name, "still disconnected after %.1f s; retrying every %.1f s at most",
             (now - d->down_since) / 1e9, BACKOFF_MAX_NS / 1e9);
    d->last_warn = now;
  }
  update_stalled(vm);
}

static unsigned disk_requeue(struct vm *vm, struct vm_disk *d)
{
  unsigned n = 0;
  for (unsigned i = 0; i < vm->slots.n; i++) {
    struct io_slot *s = &vm->slots.slot[i];
    if (s->disk != d->index)
      continue;
    if (s->state == SLOT_INFLIGHT || s->state == SLOT_DONE)
      s->state = SLOT_REQUEUE;   /* DONE here only with a connection error */
    n += s->state == SLOT_REQUEUE;
  }
  return n;
}

static void disk_lost(struct vm *vm, struct vm_disk *d, uint64_t now, const char *why)
{
  unsigned n = disk_requeue(vm, d);
  log_warn(d->st->name, "NBD connection lost (%s): %u IOs without a reply will be re-sent; "
           "reconnecting", why, n);
  atomic_store(&d->up, false);
  d->broken = false;
  d->down_since = now;
  d->last_warn = now;
  d->backoff = 0;   /* first retry after BACKOFF_MIN_NS */
  schedule_retry(vm, d, now);
}

static void check_connecting(struct vm *vm, struct vm_disk *d, uint64_t now)
{
  struct nbd_handle *h = d->nbd;
  if (nbd_aio_is_ready(h)) {
    int64_t size = nbd_get_size(h);
    if (size < 0 || (uint64_t)size != d->st->size) {
      log_error(d->st->name, "reconnected, but the disk is %" PRId64 " bytes, not %" PRIu64
                ": not using it", size, d->st->size);
      schedule_retry(vm, d, now);
      return;
    }
    d->conn = CONN_UP;
    d->backoff = 0;
    atomic_store(&d->up, true);
    count(vm, SIM_C_RECONNECTS, 1);
    update_stalled(vm);
    unsigned n = 0;
    for (unsigned i = 0; i < vm->slots.n; i++) {
      struct io_slot *s = &vm->slots.slot[i];
      if (s->state == SLOT_REQUEUE && s->disk == d->index) {
        slot_send(vm, s);
        n++;
      }
    }
    log_info(d->st->name, "reconnected after %.2f s; re-sent %u IOs", (now - d->down_since) / 1e9,
             n);
    return;
  }
  if (handle_dead(h)) {
    log_debug(d->st->name, "reconnect failed: %s", nbd_get_error());
    schedule_retry(vm, d, now);
  } else if (now - d->conn_started > CONNECT_TIMEOUT_NS) {
    log_debug(d->st->name, "reconnect: handshake timed out");
    schedule_retry(vm, d, now);
  }
}

static void disk_connect(struct vm *vm, struct vm_disk *d, uint64_t now)
{
  struct nbd_handle *h = nbd_create();
  if (!h) {
    schedule_retry(vm, d, now);
    return;
  }
  if (nbd_aio_connect_uri(h, d->uri) < 0) {
    log_debug(d->st->name, "reconnect failed: %s", nbd_get_error());
    nbd_close(h);
    schedule_retry(vm, d, now);
    return;
  }
  d->nbd = h;
  d->conn = CONN_CONNECTING;
  d->conn_started = now;
  check_connecting(vm, d, now);
}

/* ---- snapshot, workload swap, statistics ---- */

/* Copies tables, counters, rng and gen_hwm into out (allocated like
 * vm->st); blocks with a write in flight are saved as uncertain.  Returns
 * how many such blocks there were. */
unsigned io_take_snapshot(struct vm *vm, struct sim_state *out)
{
  out->vm_id = vm->st.vm_id;
  memcpy(out->name, vm->st.name, sizeof out->name);
  out->gen_hwm = vm->st.gen_hwm;
  memcpy(out->rng, vm->rng.s, sizeof out->rng);
  for (int i = 0; i < SIM_COUNTERS; i++)
    out->counters[i] = atomic_load(&vm->counters[i]);
  for (unsigned i = 0; i < vm->ndisks; i++)
    memcpy(out->disks[i].table, vm->st.disks[i].table, vm->st.disks[i].nblocks * 4);
  unsigned uncertain = 0;
  for (unsigned i = 0; i < vm->slots.n; i++) {
    const struct io_slot *s = &vm->slots.slot[i];
    if (s->state == SLOT_FREE || !s->write)
      continue;
    for (uint32_t k = 0; k < s->nblocks; k++)
      out->disks[s->disk].table[s->block + k] = SIM_GEN_UNCERTAIN;
    uncertain += s->nblocks;
  }
  return uncertain;
}

static void tick(struct vm *vm, uint64_t now)
{
  vm->next_tick = now + TICK_NS;
  pthread_mutex_lock(&vm->stats_lock);
  vm->ring[vm->ring_pos] = (struct vm_sample){
    .t = now,
    .reads = atomic_load(&vm->counters[SIM_C_READS]),
    .writes = atomic_load(&vm->counters[SIM_C_WRITES]),
    .bytes_read = atomic_load(&vm->counters[SIM_C_BYTES_READ]),
    .bytes_written = atomic_load(&vm->counters[SIM_C_BYTES_WRITTEN]),
  };
  vm->ring_pos = (vm->ring_pos + 1) % VM_STATS_RING;
  if (vm->ring_n < VM_STATS_RING)
    vm->ring_n++;
  if (++vm->ticks % 10 == 0) {
    /* Latency percentiles cover the last 1-2 s: now minus "old". */
    histogram_copy(&vm->wlat_old, &vm->wlat_mid);
    histogram_copy(&vm->wlat_mid, &vm->wlat);
    histogram_copy(&vm->rlat_old, &vm->rlat_mid);
    histogram_copy(&vm->rlat_mid, &vm->rlat);
  }
  pthread_mutex_unlock(&vm->stats_lock);
}

static void io_slots_swap(struct io_slots *a, struct io_slots *b)
{
  struct io_slots t = *a;
  *a = *b;
  *b = t;
}

/* ---- the loop ---- */

static void *io_main(void *arg)
{
  struct vm *vm = arg;
  struct pollfd pfd[1 + SIM_MAX_DISKS];
  int pdisk[1 + SIM_MAX_DISKS];
  tick(vm, now_ns());   /* a first sample: rates are defined from the start */
  for (;;) {
    pthread_mutex_lock(&vm->lock);
    bool run = vm->want_run, quit = vm->quit;
    if (vm->snap_req) {
      vm->snap_uncertain = io_take_snapshot(vm, vm->snap_req);
      vm->snap_req = NULL;
      pthread_cond_broadcast(&vm->cond);
    }
    bool swapping = vm->swap_req != NULL;
    if (swapping && inflight(vm) == 0) {
      struct io_swap *sw = vm->swap_req;
      io_slots_swap(&vm->slots, &sw->slots);
      apply_workload(vm, &sw->wl, true);
      sw->done = true;
      vm->swap_req = NULL;
      swapping = false;
      atomic_store(&vm->inflight, 0);
      pthread_cond_broadcast(&vm->cond);
    }
    pthread_mutex_unlock(&vm->lock);
    if (quit)
      break;

    uint64_t now = now_ns();
    for (unsigned i = 0; i < vm->ndisks; i++) {
      struct vm_disk *d = &vm->disk[i];
      if (d->conn == CONN_DOWN && now >= d->retry_at)
        disk_connect(vm, d, now);
      else if (d->conn == CONN_CONNECTING)
        check_connecting(vm, d, now);
    }

    bool clock_wait = false;
    if (run && !swapping)
      clock_wait = issue(vm);

    if (!run && inflight(vm) == 0) {
      pthread_mutex_lock(&vm->lock);
      if (!vm->want_run && !vm->drained) {
        vm->drained = true;
        pthread_cond_broadcast(&vm->cond);
      }
      pthread_mutex_unlock(&vm->lock);
    }

    now = now_ns();
    if (now >= vm->next_tick)
      tick(vm, now);

    /* poll */
    unsigned n = 0;
    pfd[n] = (struct pollfd){ .fd = vm->wake_fd, .events = POLLIN };
    pdisk[n++] = -1;
    uint64_t deadline = vm->next_tick;
    if (clock_wait)
      deadline = MIN(deadline, vm->next_issue);
    for (unsigned i = 0; i < vm->ndisks; i++) {
      struct vm_disk *d = &vm->disk[i];
      if (d->conn == CONN_DOWN) {
        deadline = MIN(deadline, d->retry_at);
        continue;
      }
      if (d->conn == CONN_CONNECTING)
        deadline = MIN(deadline, d->conn_started + CONNECT_TIMEOUT_NS);
      int fd = nbd_aio_get_fd(d->nbd);
      if (fd < 0)
        continue;
      unsigned dir = nbd_aio_get_direction(d->nbd);
      short ev = 0;
      if (dir & LIBNBD_AIO_DIRECTION_READ)
        ev |= POLLIN;
      if (dir & LIBNBD_AIO_DIRECTION_WRITE)
        ev |= POLLOUT;
      pfd[n] = (struct pollfd){ .fd = fd, .events = ev };
      pdisk[n++] = (int)i;
    }
    uint64_t wait = deadline > now ? deadline - now : 0;
    struct timespec ts = { .tv_sec = wait / 1000000000u, .tv_nsec = wait % 1000000000u };
    int r = ppoll(pfd, n, &ts, NULL);
    if (r < 0 && errno != EINTR) {
      log_error(NULL, "ppoll: %s", strerror(errno));
      usleep(10000);
      continue;
    }
    if (r > 0 && pfd[0].revents) {
      uint64_t v;
      ssize_t rr = read(vm->wake_fd, &v, sizeof v);
      (void)rr;
    }
    now = now_ns();
    bool kick[SIM_MAX_DISKS] = { false };
    char why[SIM_MAX_DISKS][160];
    for (unsigned i = 0; i < vm->ndisks; i++)
      why[i][0] = '\0';
    for (unsigned k = 1; r > 0 && k < n; k++) {
      struct vm_disk *d = &vm->disk[pdisk[k]];
      short re = pfd[k].revents;
      if (!re)
        continue;
      int rc = 0;
      if (re & (POLLIN | POLLHUP | POLLERR))
        rc = nbd_aio_notify_read(d->nbd);
      if (rc == 0 && (re & POLLOUT) && !handle_dead(d->nbd))
        rc = nbd_aio_notify_write(d->nbd);
      if (rc < 0)
        snprintf(why[d->index], sizeof why[d->index], "%s", nbd_get_error());
      if (d->conn == CONN_CONNECTING)
        check_connecting(vm, d, now);
    }
    process_done(vm, kick);
    for (unsigned i = 0; i < vm->ndisks; i++) {
      struct vm_disk *d = &vm->disk[i];
      if (d->conn != CONN_UP)
        continue;
      if (handle_dead(d->nbd))
        disk_lost(vm, d, now, why[i][0] ? why[i] : "connection closed");
      else if (kick[i])
        disk_lost(vm, d, now, "server is shutting down");
      else if (d->broken)
        disk_lost(vm, d, now, "cannot send requests");
    }
  }

  for (unsigned i = 0; i < vm->ndisks; i++) {
    struct vm_disk *d = &vm->disk[i];
    if (!d->nbd)
      continue;
    disk_requeue(vm, d);
    if (d->conn == CONN_UP && inflight(vm) == 0)
      nbd_shutdown(d->nbd, 0);   /* an orderly NBD_CMD_DISC */
    nbd_close(d->nbd);
    d->nbd = NULL;
    d->conn = CONN_DOWN;
  }
  pthread_mutex_lock(&vm->lock);
  vm->io_started = false;
  pthread_cond_broadcast(&vm->cond);
  pthread_mutex_unlock(&vm->lock);
  return NULL;
}

void vm_io_wake(struct vm *vm)
{
  uint64_t one = 1;
  ssize_t r = write(vm->wake_fd, &one, sizeof one);
  (void)r;   /* EAGAIN: the counter is already non-zero, a wake-up is pending */
}

int vm_io_start(struct vm *vm, bool run, char *err, size_t errlen)
{
  vm->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (vm->wake_fd < 0) {
    snprintf(err, errlen, "eventfd: %s", strerror(errno));
    return -1;
  }
  vm->want_run = run;
  vm->drained = false;
  vm->run_state = run ? VM_RUNNING : VM_PAUSED;
  vm->io_started = true;
  int e = pthread_create(&vm->io_thread, NULL, io_main, vm);
  if (e == 0)
    vm->io_joinable = true;
  if (e) {
    vm->io_started = false;
    snprintf(err, errlen, "pthread_create: %s", strerror(e));
    return -1;
  }
  return 0;
}

void vm_io_stop(struct vm *vm)
{
  pthread_mutex_lock(&vm->lock);
  bool started = vm->io_started;
  vm->quit = true;
  pthread_mutex_unlock(&vm->lock);
  vm_io_wake(vm);
  (void)started;
  if (vm->io_joinable)
    pthread_join(vm->io_thread, NULL);
  vm->io_joinable = false;
}
