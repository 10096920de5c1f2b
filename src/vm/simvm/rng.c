/* rng: see rng.h. */
#include "vm/simvm/rng.h"

#include <errno.h>
#include <math.h>

#include "vm/simvm/block.h"   /* sim_mix64 */

static inline uint64_t rotl(uint64_t x, int k)
{
  return (x << k) | (x >> (64 - k));
}

void rng_seed(struct rng *r, uint64_t seed)
{
  for (int i = 0; i < 4; i++) {
    seed += UINT64_C(0x9E3779B97F4A7C15);
    r->s[i] = sim_mix64(seed);
  }
  if (!(r->s[0] | r->s[1] | r->s[2] | r->s[3]))
    r->s[0] = 1;   /* the one state xoshiro cannot leave */
}

uint64_t rng_next(struct rng *r)
{
  uint64_t *s = r->s;
  uint64_t result = rotl(s[1] * 5, 7) * 9;
  uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

uint64_t rng_below(struct rng *r, uint64_t n)
{
  unsigned __int128 m = (unsigned __int128)rng_next(r) * n;
  uint64_t low = (uint64_t)m;
  if (low < n) {
    uint64_t threshold = -n % n;
    while (low < threshold) {
      m = (unsigned __int128)rng_next(r) * n;
      low = (uint64_t)m;
    }
  }
  return (uint64_t)(m >> 64);
}

double rng_double(struct rng *r)
{
  return (double)(rng_next(r) >> 11) * 0x1.0p-53;
}

/* ---- Zipf by rejection-inversion ----
 * h(x) = x^-s; H is an antiderivative of h; the method draws u uniformly in
 * (H(1.5) - 1, H(n + 0.5)], inverts H and accepts the nearest integer k when
 * u lies under the step of height h(k) (or inside the squeeze). */

/* log1p(x) / x, with its series near 0. */
static double helper1(double x)
{
  if (fabs(x) > 1e-8)
    return log1p(x) / x;
  return 1 - x * (0.5 - x * (1.0 / 3 - x * 0.25));
}

/* expm1(x) / x, with its series near 0. */
static double helper2(double x)
{
  if (fabs(x) > 1e-8)
    return expm1(x) / x;
  return 1 + x * 0.5 * (1 + x * (1.0 / 3) * (1 + x * 0.25));
}

static double zipf_h(double s, double x)
{
  return exp(-s * log(x));
}

static double zipf_hint(double s, double x)
{
  double lx = log(x);
  return helper2((1 - s) * lx) * lx;
}

static double zipf_hint_inv(double s, double x)
{
  double t = x * (1 - s);
  if (t < -1)
    t = -1;   /* rounding near the pole: keep log1p defined */
  return exp(helper1(t) * x);
}

int zipf_init(struct zipf *z, uint64_t n, double s)
{
  if (n == 0 || !(s > 0) || !isfinite(s)) {
    errno = EINVAL;
    return -1;
  }
  z->n = n;
  z->s = s;
  z->h_x1 = zipf_hint(s, 1.5) - 1;
  z->h_n = zipf_hint(s, (double)n + 0.5);
  z->squeeze = 2 - zipf_hint_inv(s, zipf_hint(s, 2.5) - zipf_h(s, 2));
  return 0;
}

uint64_t zipf_sample(const struct zipf *z, struct rng *r)
{
  for (;;) {
    double u = z->h_n + rng_double(r) * (z->h_x1 - z->h_n);
    double x = zipf_hint_inv(z->s, u);
    double kd = floor(x + 0.5);
    uint64_t k;
    if (!(kd >= 1))
      k = 1;
    else if (kd >= (double)z->n)
      k = z->n;
    else
      k = (uint64_t)kd;
    if ((double)k - x <= z->squeeze || u >= zipf_hint(z->s, (double)k + 0.5) - zipf_h(z->s, (double)k))
      return k;
  }
}

static uint64_t gcd(uint64_t a, uint64_t b)
{
  while (b) {
    uint64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

uint64_t slot_multiplier(uint64_t n)
{
  if (n <= 2)
    return 1;
  uint64_t m = (uint64_t)((double)n * 0.6180339887498949);
  if (m < 1)
    m = 1;
  while (gcd(m, n) != 1)
    m++;   /* ends: n - 1 is always coprime with n */
  return m;
}
