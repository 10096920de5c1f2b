/* rng: the workload's random numbers: xoshiro256** (its 32-byte state is part
 * of the VM state, so a moved VM goes on with the same sequence), unbiased
 * bounded integers, and a Zipf sampler for hot sets.
 *
 * DESIGN (zipf)
 * A disk is cut into N slots of the IO size.  Ranks 1..N are drawn with
 * P(k) ~ k^-s by rejection-inversion (Hoermann & Derflinger 1996, as Apache
 * Commons RNG does): O(1) time and memory for any N and any s > 0, no table.
 * Rank k maps to slot ((k - 1) * mult) mod N, where mult is coprime with N:
 * a bijection, so the hot slots are spread over the disk instead of packed at
 * its start, without an N-entry permutation.
 *
 * Not thread-safe: each rng belongs to one thread (the IO thread). */
#ifndef FERRY_SIMVM_RNG_H
#define FERRY_SIMVM_RNG_H

#include <stdint.h>

struct rng {
  uint64_t s[4];   /* xoshiro256** state; never all zero */
};

/* Seeds from a 64-bit value through splitmix64 (as the xoshiro authors advise). */
void rng_seed(struct rng *r, uint64_t seed);
uint64_t rng_next(struct rng *r);
/* Uniform in [0, n); n > 0.  Lemire's multiply-and-reject: no modulo bias. */
uint64_t rng_below(struct rng *r, uint64_t n);
/* Uniform in [0, 1) with 53 random bits. */
double rng_double(struct rng *r);

struct zipf {
  uint64_t n;            /* ranks 1..n */
  double s;              /* exponent, > 0 */
  double h_x1;           /* H(1.5) - 1 */
  double h_n;            /* H(n + 0.5) */
  double squeeze;        /* the acceptance shortcut of the method */
};

/* n >= 1, s > 0 (finite).  Returns 0 or -1 (EINVAL). */
int zipf_init(struct zipf *z, uint64_t n, double s);
/* A rank in 1..n. */
uint64_t zipf_sample(const struct zipf *z, struct rng *r);

/* A multiplier coprime with n (near n times the golden ratio's fraction, so
 * consecutive ranks land far apart); 1 for n <= 2. */
uint64_t slot_multiplier(uint64_t n);
/* Slot of 0-based rank r: (r * mult) mod n, without overflow. */
static inline uint64_t slot_of_rank(uint64_t r, uint64_t mult, uint64_t n)
{
  return (uint64_t)(((unsigned __int128)r * mult) % n);
}

#endif
