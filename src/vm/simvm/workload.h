/* workload: the IO pattern of a sim VM, as a spec string
 *
 *   write=70,bs=4k,iops=500,zipf=0.9,qd=4,disks=all        (the defaults)
 *
 * comma-separated key=value, every key optional and given at most once:
 *   write  percent of IOs that are writes, integer 0..100
 *   bs     IO size: a multiple of 4 KiB, 4 KiB..1 MiB (parse_size units)
 *   iops   target IOs per second over all disks, 0 = as fast as possible
 *   rate   target bytes per second ("20M", "20M/s"), instead of iops; 0 = unlimited
 *   zipf   hot-set skew over the disk's bs-sized slots, 0 (uniform)..10
 *   qd     IOs in flight, 1..128, with qd * bs <= 64 MiB
 *   seed   decimal u64: reseeds the workload's random numbers
 *   disks  "all" or disk names joined by '+' ("vda+vdb")
 * The canonical form (workload_format) names every key in this order, so a
 * spec read back from the state file or shown by status is unambiguous.
 * Parsing never touches the VM: a refused spec changes nothing. */
#ifndef FERRY_SIMVM_WORKLOAD_H
#define FERRY_SIMVM_WORKLOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SIM_MAX_DISKS     16
#define SIM_NAME_MAX      64
#define SIM_WL_MAX_QD     128
#define SIM_WL_MAX_BS     (1024u * 1024u)
#define SIM_WL_MAX_BYTES  (64u * 1024u * 1024u)   /* qd * bs: slot buffers */
#define SIM_WL_MAX_IOPS   10000000u
#define SIM_WL_MAX_ZIPF   10.0
#define SIM_WL_SPEC_MAX   1536                    /* longest spec, with its NUL */

struct workload {
  unsigned write_pct;          /* 0..100 */
  uint32_t bs;                 /* bytes, multiple of 4096 */
  uint64_t iops;               /* 0 = unlimited (when rate == 0) */
  uint64_t rate;               /* bytes/s; non-zero replaces iops */
  bool rate_set;               /* "rate=" was given (even rate=0) */
  double zipf;                 /* 0 = uniform */
  unsigned qd;                 /* 1..SIM_WL_MAX_QD */
  bool has_seed;
  uint64_t seed;
  bool all_disks;
  unsigned ndisks;             /* !all_disks: the names below */
  char disks[SIM_MAX_DISKS][SIM_NAME_MAX + 1];
};

void workload_default(struct workload *w);
/* Parses spec over the defaults.  Returns 0, or -1 with a message in err. */
int workload_parse(const char *spec, struct workload *w, char *err, size_t errlen);
/* The canonical spec (fits in SIM_WL_SPEC_MAX). */
void workload_format(const struct workload *w, char *buf, size_t len);
/* IOs per second to aim at (rate / bs when rate is set); 0 = unlimited. */
double workload_target_iops(const struct workload *w);
/* True if the workload sends IO to disk name. */
bool workload_uses_disk(const struct workload *w, const char *name);

#endif
