/* throttle: a byte-rate limiter for a disk's writes, the lever that write
 * backpressure pulls.
 *
 * Virtual-time scheduling: each write of n bytes reserves the interval
 * [t, t + n/rate) where t = max(now, end of the last reservation), and sleeps
 * on a condition variable until t (no busy waiting).  A burst allowance of
 * 100 ms worth of bytes lets short bursts through at once.  Changing the rate
 * resets the schedule and wakes every sleeper, so lifting the limit frees
 * blocked writers at once.  rate 0 = unlimited (no lock taken). */
#ifndef FERRY_THROTTLE_H
#define FERRY_THROTTLE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

struct throttle {
  pthread_mutex_t lock;
  pthread_cond_t changed;          /* broadcast when the rate changes */
  _Atomic uint64_t rate;           /* bytes per second, 0 = off */
  uint64_t next_free_ns;           /* CLOCK_MONOTONIC end of the last reservation */
  uint64_t generation;             /* bumped on every rate change */
  _Atomic uint64_t waited_ns;      /* total time writers slept */
  _Atomic uint64_t throttled_ops;  /* writes that had to sleep */
};

void throttle_init(struct throttle *t, uint64_t rate);
void throttle_destroy(struct throttle *t);
void throttle_set_rate(struct throttle *t, uint64_t rate);
uint64_t throttle_rate(const struct throttle *t);
/* Waits until bytes may pass.  With nowait, returns -EAGAIN instead of
 * sleeping (nothing is reserved).  Returns 0 when the bytes may go. */
int throttle_wait(struct throttle *t, uint64_t bytes, bool nowait);

#endif
