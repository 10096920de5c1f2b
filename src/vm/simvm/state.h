/* state: a sim VM's "RAM": what must move with it to another site, and the
 * file that holds it.
 *
 * The state is, per disk, a table of one u32 generation per 4 KiB block
 * (SIM_GEN_NONE = never written by this VM, SIM_GEN_UNCERTAIN = a write got
 * an NBD error so the content is unknown until the next successful write,
 * otherwise the generation of the last ACKNOWLEDGED write), plus the vm_id,
 * counters, the workload spec and its random-number state, and the highest
 * generation ever issued (gen_hwm).  About 1 MiB per GiB of disk.
 *
 * INVARIANT: a table entry changes only after the NBD server acknowledged
 * (or refused) the write it describes, so the table never claims more than
 * the disk was told to keep.  Verify is "every block equals its table entry".
 *
 * ON DISK (little endian; docs/simvm.md):
 *   0     magic "FSIMSTAT"            8     u32 version (1)
 *   12    u32 ndisks (1..16)          16    u64 vm_id
 *   24    u32 gen_hwm                 28    u32 flags (0)
 *   32    u64 rng[4]                  64    u64 counters[8] (enum sim_counter order)
 *   128   char name[80]               208   char workload[1536]  (NUL padded)
 *   1744  zero up to 2048
 *   2048  per disk, 112 bytes: char name[80] (NUL padded), u64 size,
 *         u64 nblocks (= size / 4096), u64 XXH64 of its table, u64 0
 *   then  u64 XXH64 of every header byte before it (seed 0)
 *   then  the tables, in disk order, u32 per block.
 * The file size must be exactly what the header says.  It is written to
 * PATH.tmp, fsynced, renamed over PATH and the directory fsynced, so PATH is
 * always a whole old state or a whole new one.  Loading checks every field
 * and checksum and refuses the file with a message naming what is wrong;
 * nothing runs on a table that failed a check. */
#ifndef FERRY_SIMVM_STATE_H
#define FERRY_SIMVM_STATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vm/simvm/block.h"
#include "vm/simvm/workload.h"

#define SIM_STATE_MAGIC    "FSIMSTAT"
#define SIM_STATE_VERSION  1
#define SIM_STATE_FIXED    2048      /* fixed header bytes before the disk entries */
#define SIM_STATE_DISK_ENT 112
#define SIM_MAX_DISK_SIZE  (UINT64_C(1) << 44)   /* 16 TiB: 2^32 blocks */

enum sim_counter {
  SIM_C_READS, SIM_C_WRITES, SIM_C_BYTES_READ, SIM_C_BYTES_WRITTEN,
  SIM_C_READ_ERRORS,      /* blocks a read found not matching the table */
  SIM_C_WRITE_ERRORS,     /* writes that got an NBD error reply */
  SIM_C_READ_IO_ERRORS,   /* reads that got an NBD error reply */
  SIM_C_RECONNECTS,       /* NBD connections re-established after a loss */
  SIM_COUNTERS
};
extern const char *const sim_counter_names[SIM_COUNTERS];

struct sim_disk_state {
  char name[SIM_NAME_MAX + 1];
  uint64_t size;          /* bytes, as the NBD server reported it */
  uint64_t nblocks;       /* size / 4096 (a tail under 4 KiB is never used) */
  uint32_t *table;        /* nblocks entries */
};

struct sim_state {
  uint64_t vm_id;
  char name[SIM_NAME_MAX + 1];            /* VM name, may be empty */
  uint32_t gen_hwm;                       /* highest generation issued */
  uint64_t rng[4];
  uint64_t counters[SIM_COUNTERS];
  char workload[SIM_WL_SPEC_MAX];         /* canonical spec */
  unsigned ndisks;
  struct sim_disk_state disks[SIM_MAX_DISKS];
};

/* A new state: random vm_id, empty tables for the given disks.  Returns 0,
 * or -1 with a message in err. */
int sim_state_create(struct sim_state *st, unsigned ndisks, const char *const *names,
                     const uint64_t *sizes, char *err, size_t errlen);
/* Allocates tables like those of src (same disks), copying nothing else. */
int sim_state_alloc_like(struct sim_state *dst, const struct sim_state *src);
void sim_state_free(struct sim_state *st);

int sim_state_load(const char *path, struct sim_state *st, char *err, size_t errlen);
int sim_state_save(const char *path, const struct sim_state *st, char *err, size_t errlen);

/* Index of the disk named name, or -1. */
int sim_state_find_disk(const struct sim_state *st, const char *name);

/* 64 random bits from getrandom(2). */
int sim_random_u64(uint64_t *out);

#endif
