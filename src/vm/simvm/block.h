/* block: the self-describing 4 KiB block that ferry-simvm writes, and the
 * one check every read and every verify runs on it.
 *
 * ON DISK (little endian; docs/simvm.md is the reference)
 *   0    magic "FSIMBLK1"
 *   8    u64 vm_id          (random, chosen when the VM was created)
 *   16   u64 byte offset of this block in its disk
 *   24   u64 generation     (1.. : the n-th write of this block by this VM)
 *   32   u32 disk index     (position of the disk in the state file)
 *   36   filler up to byte 4087: bytes 4..4055 of the stream of splitmix64
 *        outputs (each output stored little endian) seeded with
 *        sim_block_seed(vm_id, offset, generation)
 *   4088 u64 XXH64(bytes 0..4087, seed 0)
 *
 * A block is thus checkable on its own: the checksum says it is intact, the
 * header says whose it is, where it belongs and which write made it, and the
 * filler is a function of the header so nothing else can pass for it.
 * Functions here are pure (no state, no allocation): any thread may call them.
 */
#ifndef FERRY_SIMVM_BLOCK_H
#define FERRY_SIMVM_BLOCK_H

#include <stdbool.h>
#include <stdint.h>

#define SIM_BLOCK_SIZE    4096u
#define SIM_BLOCK_SHIFT   12
#define SIM_BLOCK_MAGIC   "FSIMBLK1"
#define SIM_BLOCK_SUM_OFF 4088u

/* Table values with a meaning of their own (see state.h). */
#define SIM_GEN_NONE      0u           /* never written by this VM */
#define SIM_GEN_UNCERTAIN UINT32_MAX   /* a write failed: content unknown */

/* What a block holds compared with what the table expects. */
enum sim_verdict {
  SIM_OK = 0,       /* the expected block (or, where none is expected, not ours) */
  SIM_LOST,         /* ours, right place, older generation: an acked write is gone */
  SIM_NEWER,        /* ours, right place, newer generation than the table */
  SIM_MISPLACED,    /* ours and intact, but its header names another offset or disk */
  SIM_FOREIGN,      /* a write is expected but this is not an intact block of ours */
  SIM_UNEXPECTED,   /* ours, intact, right place, where the table says never written */
};
#define SIM_VERDICTS 6

/* The decoded header of a block, and whether it is intact. */
struct sim_block_info {
  bool magic_ok;        /* bytes 0..7 are SIM_BLOCK_MAGIC */
  bool sum_ok;          /* the XXH64 at 4088 matches bytes 0..4087 */
  bool zero;            /* all 4096 bytes are zero (never written, or trimmed) */
  uint64_t vm_id, offset, gen;
  uint32_t disk;
};

/* splitmix64: the mixer and the stream step (state += golden; mix(state)). */
static inline uint64_t sim_mix64(uint64_t z)
{
  z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
  z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
  return z ^ (z >> 31);
}

/* The filler seed: mix(vm_id ^ mix(offset ^ mix(gen))). */
static inline uint64_t sim_block_seed(uint64_t vm_id, uint64_t offset, uint64_t gen)
{
  return sim_mix64(vm_id ^ sim_mix64(offset ^ sim_mix64(gen)));
}

/* Writes the block for (vm_id, disk, offset, gen) into buf (4096 bytes). */
void sim_block_fill(void *buf, uint64_t vm_id, uint32_t disk, uint64_t offset, uint64_t gen);

/* Decodes buf's header and checks magic and checksum (not the filler). */
void sim_block_parse(const void *buf, struct sim_block_info *info);

/* True if the filler of buf is the one its own header calls for. */
bool sim_block_filler_ok(const void *buf);

/* Classifies buf, found at (disk, offset) of VM vm_id whose table says
 * expected (SIM_GEN_NONE: never written; never SIM_GEN_UNCERTAIN, which the
 * caller skips).  info (may be NULL) receives the decoded header. */
enum sim_verdict sim_block_check(const void *buf, uint64_t vm_id, uint32_t disk, uint64_t offset,
                                 uint32_t expected, struct sim_block_info *info);

/* "ok", "lost", "newer", "misplaced", "foreign", "unexpected". */
const char *sim_verdict_name(enum sim_verdict v);

/* A short human explanation of a verdict ("bad checksum", "other vm_id
 * 0123..", "names offset 8192", "generation 3, table 5"...). */
void sim_verdict_detail(enum sim_verdict v, const struct sim_block_info *info, uint64_t vm_id,
                        uint32_t disk, uint64_t offset, uint32_t expected, char *buf,
                        unsigned len);

#endif
