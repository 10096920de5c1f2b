/* heat: what the IO of one disk looks like, for operators, the I/O analyzer
 * and warm migration's hot-set prefetch.
 *
 *  - per region (region size chosen so a disk has at most HEAT_MAX_REGIONS
 *    regions, at least 1 MiB): total read/write counts and bytes, and a heat
 *    score per kind that decays exponentially (half-life configurable, default
 *    5 minutes).  The hot path does relaxed atomic adds into the current
 *    epoch; a ticker folds each epoch into the decayed scores.
 *  - per disk: IOPS and throughput over the last second and minute (a ring of
 *    per-second counters), latency histograms per kind (cumulative and over the
 *    last completed 10 s window).
 *  - a sampled trace: a ring of the last HEAT_TRACE_SIZE sampled IOs (offset,
 *    length, kind, wall-clock time, latency).  1 in `trace_every` IOs is kept
 *    (default 1: every IO).
 * Regions count reads and writes only (trim, zero, flush and cache count in
 * the per-disk totals, rates, histograms and trace); an IO that spans regions
 * counts once in each, its bytes split exactly between them.
 * Memory is bounded by the constants, never by the data written. */
#ifndef FERRY_HEAT_H
#define FERRY_HEAT_H

#include <stdint.h>

#include "common/histogram.h"

#define HEAT_MAX_REGIONS   16384
#define HEAT_MIN_REGION    (1024 * 1024)
#define HEAT_TRACE_SIZE    4096
#define HEAT_EPOCH_NS      (1000000000ull)       /* fold epochs once a second */
#define HEAT_DEFAULT_HALF_LIFE_S 300

enum io_kind { IO_READ = 0, IO_WRITE, IO_TRIM, IO_ZERO, IO_FLUSH, IO_CACHE, IO_KINDS };
const char *io_kind_name(enum io_kind k);

struct heat;

struct heat *heat_new(uint64_t disk_size);
void heat_free(struct heat *h);

/* Records one completed IO; latency_ns from submission to completion. */
void heat_record(struct heat *h, enum io_kind kind, uint64_t off, uint64_t len,
                 uint64_t latency_ns);
/* Folds epochs into scores and rolls the per-second ring; safe to call often
 * (it does the work only when a second has passed).  Called by a ticker. */
void heat_tick(struct heat *h);
/* heat_tick with the time given (CLOCK_MONOTONIC ns): lets tests drive the
 * clock.  Time runs from heat_new(); a time earlier than the last fold is a
 * no-op. */
void heat_tick_at(struct heat *h, uint64_t mono_ns);

void heat_set_half_life(struct heat *h, unsigned seconds);
void heat_set_trace_every(struct heat *h, unsigned every);  /* 0 = trace off */
unsigned heat_half_life(const struct heat *h);
unsigned heat_trace_every(const struct heat *h);

uint64_t heat_region_size(const struct heat *h);
uint64_t heat_nregions(const struct heat *h);

struct heat_region {
  uint64_t offset, length;
  uint64_t reads, writes;            /* totals since open */
  uint64_t read_bytes, write_bytes;
  double read_heat, write_heat;      /* decayed IO counts */
};
/* Fills out[i] for regions [first, first+n); returns how many were filled. */
uint64_t heat_regions(struct heat *h, uint64_t first, uint64_t n, struct heat_region *out);
/* The k hottest regions by read_heat + write_heat, hottest first; returns count. */
unsigned heat_top(struct heat *h, unsigned k, struct heat_region *out);

struct heat_rates {
  double read_iops_1s, write_iops_1s, read_bps_1s, write_bps_1s;
  double read_iops_60s, write_iops_60s, read_bps_60s, write_bps_60s;
  uint64_t total_ops[IO_KINDS], total_bytes[IO_KINDS];
};
void heat_rates(struct heat *h, struct heat_rates *out);

/* Latency histograms: cumulative since open, and the last completed window. */
const struct histogram *heat_latency(struct heat *h, enum io_kind kind);
void heat_latency_window(struct heat *h, enum io_kind kind, struct histogram *out);

struct heat_trace_entry {
  uint64_t seq;            /* IO sequence number (all IOs, not only sampled) */
  uint64_t time_ns;        /* CLOCK_REALTIME at completion */
  uint64_t offset;
  uint32_t length;
  uint32_t latency_us;
  uint8_t kind;            /* enum io_kind */
};
/* Copies up to max most recent trace entries, oldest first; returns count. */
unsigned heat_trace(struct heat *h, struct heat_trace_entry *out, unsigned max);

#endif
