/* block: see block.h for the format. */
#include "vm/simvm/block.h"

#include <stdio.h>
#include <string.h>
#include <xxhash.h>

#include "vm/simvm/le.h"

#define GOLDEN UINT64_C(0x9E3779B97F4A7C15)   /* splitmix64's stream increment */

void sim_block_fill(void *buf, uint64_t vm_id, uint32_t disk, uint64_t offset, uint64_t gen)
{
  unsigned char *b = buf;
  uint64_t s = sim_block_seed(vm_id, offset, gen);
  /* 507 stream words cover bytes 32..4087; the disk index then takes 32..35. */
  for (unsigned i = 32; i < SIM_BLOCK_SUM_OFF; i += 8) {
    s += GOLDEN;
    put_le64(b + i, sim_mix64(s));
  }
  memcpy(b, SIM_BLOCK_MAGIC, 8);
  put_le64(b + 8, vm_id);
  put_le64(b + 16, offset);
  put_le64(b + 24, gen);
  put_le32(b + 32, disk);
  put_le64(b + SIM_BLOCK_SUM_OFF, XXH64(b, SIM_BLOCK_SUM_OFF, 0));
}

static bool all_zero(const unsigned char *b)
{
  for (unsigned i = 0; i < SIM_BLOCK_SIZE; i += 8)
    if (get_le64(b + i) != 0)
      return false;
  return true;
}

void sim_block_parse(const void *buf, struct sim_block_info *info)
{
  const unsigned char *b = buf;
  info->magic_ok = memcmp(b, SIM_BLOCK_MAGIC, 8) == 0;
  info->sum_ok = get_le64(b + SIM_BLOCK_SUM_OFF) == XXH64(b, SIM_BLOCK_SUM_OFF, 0);
  info->zero = !info->magic_ok && all_zero(b);   /* only worth knowing when it is not ours */
  info->vm_id = get_le64(b + 8);
  info->offset = get_le64(b + 16);
  info->gen = get_le64(b + 24);
  info->disk = get_le32(b + 32);
}

bool sim_block_filler_ok(const void *buf)
{
  const unsigned char *b = buf;
  uint64_t s = sim_block_seed(get_le64(b + 8), get_le64(b + 16), get_le64(b + 24));
  s += GOLDEN;
  /* The first word shares its low half with the disk index. */
  if ((get_le64(b + 32) >> 32) != (sim_mix64(s) >> 32))
    return false;
  for (unsigned i = 40; i < SIM_BLOCK_SUM_OFF; i += 8) {
    s += GOLDEN;
    if (get_le64(b + i) != sim_mix64(s))
      return false;
  }
  return true;
}

enum sim_verdict sim_block_check(const void *buf, uint64_t vm_id, uint32_t disk, uint64_t offset,
                                 uint32_t expected, struct sim_block_info *info)
{
  struct sim_block_info local;
  if (!info)
    info = &local;
  sim_block_parse(buf, info);
  bool mine = info->magic_ok && info->sum_ok && info->vm_id == vm_id;
  bool here = info->offset == offset && info->disk == disk;
  if (expected == SIM_GEN_NONE) {
    /* Anything that is not ours may sit where we never wrote. */
    if (!mine)
      return SIM_OK;
    return here ? SIM_UNEXPECTED : SIM_MISPLACED;
  }
  if (!mine)
    return SIM_FOREIGN;
  if (!here)
    return SIM_MISPLACED;
  if (info->gen < expected)
    return SIM_LOST;
  if (info->gen > expected)
    return SIM_NEWER;
  return sim_block_filler_ok(buf) ? SIM_OK : SIM_FOREIGN;
}

const char *sim_verdict_name(enum sim_verdict v)
{
  static const char *const names[SIM_VERDICTS] = {
    "ok", "lost", "newer", "misplaced", "foreign", "unexpected",
  };
  return (unsigned)v < SIM_VERDICTS ? names[v] : "?";
}

void sim_verdict_detail(enum sim_verdict v, const struct sim_block_info *info, uint64_t vm_id,
                        uint32_t disk, uint64_t offset, uint32_t expected, char *buf,
                        unsigned len)
{
  unsigned long long gen = info->gen;
  switch (v) {
  case SIM_OK:
    snprintf(buf, len, "generation %llu as expected", gen);
    break;
  case SIM_LOST:
  case SIM_NEWER:
    snprintf(buf, len, "found generation %llu, table says %u", gen, expected);
    break;
  case SIM_MISPLACED:
    snprintf(buf, len, "block of disk %u offset %llu generation %llu found at disk %u offset %llu",
             info->disk, (unsigned long long)info->offset, gen, disk, (unsigned long long)offset);
    break;
  case SIM_UNEXPECTED:
    snprintf(buf, len, "generation %llu where the table says never written", gen);
    break;
  case SIM_FOREIGN:
    if (info->zero)
      snprintf(buf, len, "all zero, table says generation %u", expected);
    else if (!info->magic_ok)
      snprintf(buf, len, "not a sim block (bad magic), table says generation %u", expected);
    else if (!info->sum_ok)
      snprintf(buf, len, "bad block checksum (damaged), table says generation %u", expected);
    else if (info->vm_id != vm_id)
      snprintf(buf, len, "block of another VM (vm_id %016llx), table says generation %u",
               (unsigned long long)info->vm_id, expected);
    else
      snprintf(buf, len, "filler does not match its header (generation %llu)", gen);
    break;
  default:
    snprintf(buf, len, "?");
  }
}
