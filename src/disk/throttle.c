/* throttle: the write rate limiter (see throttle.h for the contract).
 *
 * DESIGN
 * Virtual time.  next_free_ns is the end of the last reservation on the
 * CLOCK_MONOTONIC axis.  A write of n bytes reserves [t, t + n/rate) with
 * t = max(next_free_ns, now - burst), where burst is 100 ms: the schedule may
 * lag behind now by at most the burst, so an idle limiter lets 100 ms worth
 * of bytes through at once and never more.  If t <= now the write goes at once;
 * otherwise it sleeps on `changed` (a CLOCK_MONOTONIC condvar, timed wait
 * until t: no polling) and goes at t.
 *
 * Rate changes bump `generation`, reset the schedule and broadcast: a sleeper
 * that wakes to a new generation forgets its reservation and books again at
 * the new rate (or goes at once if the limit was lifted).
 *
 * Thread model: `lock` guards next_free_ns and generation.  `rate` is atomic
 * so the unlimited case (rate 0) costs one relaxed load and takes no lock. */
#include "disk/throttle.h"

#include <errno.h>
#include <time.h>

#include "common/util.h"

#define THROTTLE_BURST_NS 100000000ull   /* 100 ms */
#define NS_PER_S 1000000000ull

void throttle_init(struct throttle *t, uint64_t rate)
{
  pthread_mutex_init(&t->lock, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);  /* immune to wall-clock jumps */
  pthread_cond_init(&t->changed, &ca);
  pthread_condattr_destroy(&ca);
  atomic_init(&t->rate, rate);
  t->next_free_ns = 0;
  t->generation = 0;
  atomic_init(&t->waited_ns, 0);
  atomic_init(&t->throttled_ops, 0);
}

void throttle_destroy(struct throttle *t)
{
  pthread_cond_destroy(&t->changed);
  pthread_mutex_destroy(&t->lock);
}

void throttle_set_rate(struct throttle *t, uint64_t rate)
{
  pthread_mutex_lock(&t->lock);
  atomic_store(&t->rate, rate);
  t->next_free_ns = 0;      /* a new rate starts a new schedule */
  t->generation++;
  pthread_cond_broadcast(&t->changed);
  pthread_mutex_unlock(&t->lock);
}

uint64_t throttle_rate(const struct throttle *t)
{
  return atomic_load_explicit(&t->rate, memory_order_relaxed);
}

/* Nanoseconds that bytes take at rate (rate > 0), saturating. */
static uint64_t cost_ns(uint64_t bytes, uint64_t rate)
{
  unsigned __int128 ns = (unsigned __int128)bytes * NS_PER_S / rate;
  return ns > UINT64_MAX / 2 ? UINT64_MAX / 2 : (uint64_t)ns;
}

int throttle_wait(struct throttle *t, uint64_t bytes, bool nowait)
{
  if (atomic_load_explicit(&t->rate, memory_order_relaxed) == 0)
    return 0;

  pthread_mutex_lock(&t->lock);
  uint64_t slept_from = 0;
  for (;;) {
    uint64_t rate = atomic_load_explicit(&t->rate, memory_order_relaxed);
    if (rate == 0)
      break;
    uint64_t now = now_ns();
    uint64_t floor_ns = now > THROTTLE_BURST_NS ? now - THROTTLE_BURST_NS : 0;
    uint64_t start = MAX(t->next_free_ns, floor_ns);
    if (start <= now) {
      t->next_free_ns = start + cost_ns(bytes, rate);
      break;
    }
    if (nowait) {
      pthread_mutex_unlock(&t->lock);
      return -EAGAIN;     /* nothing reserved */
    }
    t->next_free_ns = start + cost_ns(bytes, rate);
    if (!slept_from) {
      slept_from = now;
      atomic_fetch_add_explicit(&t->throttled_ops, 1, memory_order_relaxed);
    }
    uint64_t gen = t->generation;
    struct timespec ts = { .tv_sec = (time_t)(start / NS_PER_S),
                           .tv_nsec = (long)(start % NS_PER_S) };
    while (t->generation == gen && now_ns() < start)
      pthread_cond_timedwait(&t->changed, &t->lock, &ts);
    if (t->generation == gen)
      break;              /* our turn came */
    /* The rate changed while we slept: book again under the new schedule. */
  }
  pthread_mutex_unlock(&t->lock);
  if (slept_from)
    atomic_fetch_add_explicit(&t->waited_ns, now_ns() - slept_from, memory_order_relaxed);
  return 0;
}
