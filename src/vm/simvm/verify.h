/* verify: reads every block of every disk and compares it with the table:
 * the proof that no acknowledged write was lost (after a migration, a
 * ferryd crash, a cutover...).  It opens its own NBD connections, so it runs
 * the same offline (`ferry-simvm verify`) and inside a running VM (the
 * `verify` control command, with the VM drained so the table is exact).
 *
 * Per block, by table entry:
 *   SIM_GEN_UNCERTAIN   skipped (counted as uncertain)
 *   SIM_GEN_NONE        read; an intact block of this VM is `unexpected`
 *                       (right place) or `misplaced` (names another place)
 *   a generation g      `checked`; must be exactly the block for g, else
 *                       lost / newer / misplaced / foreign (block.h)
 * ok only when every count of a problem is 0 and no read failed. */
#ifndef FERRY_SIMVM_VERIFY_H
#define FERRY_SIMVM_VERIFY_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vm/simvm/block.h"
#include "vm/simvm/state.h"

#define VERIFY_MAX_PROBLEMS 10

struct verify_problem {
  unsigned disk;
  uint64_t offset;
  enum sim_verdict kind;          /* SIM_OK here means "read error" */
  uint32_t expected;
  uint64_t found_gen;
  char detail[200];
};

struct verify_disk {
  uint64_t blocks, written_blocks, checked, problems;
};

struct verify_report {
  uint64_t blocks;                /* all 4 KiB blocks of all disks */
  uint64_t written_blocks;        /* table entry != none (uncertain included) */
  uint64_t checked;               /* table entry is a generation */
  uint64_t uncertain;
  uint64_t good;                  /* checked and equal */
  uint64_t count[SIM_VERDICTS];   /* by verdict (count[SIM_OK] unused) */
  uint64_t read_io_errors;        /* 1 MiB reads the server failed */
  unsigned nproblems;             /* the first VERIFY_MAX_PROBLEMS */
  struct verify_problem problems[VERIFY_MAX_PROBLEMS];
  struct verify_disk disk[SIM_MAX_DISKS];
  uint64_t elapsed_ns;
  bool ok;
};

/* uris[i] is the NBD URI of st->disks[i].  Returns 0 with the report filled
 * (whatever it found), or -1 with err if it could not read the disks (no
 * connection, size mismatch, connection lost). */
int sim_verify(const struct sim_state *st, const char *const *uris, struct verify_report *r,
               char *err, size_t errlen);

json_t *verify_report_json(const struct sim_state *st, const struct verify_report *r);

#endif
