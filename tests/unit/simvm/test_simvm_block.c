/* test_simvm_block: the sim block format (src/vm/simvm/block.c) against an
 * independent reading of docs/simvm.md: field offsets, little endian, the
 * filler stream and the checksum; then every verdict of sim_block_check,
 * including a damaged byte at every position and a forged block whose
 * checksum was recomputed over a wrong filler. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <xxhash.h>

#include "vm/simvm/block.h"

#include "check.h"

#define VM_ID UINT64_C(0x0123456789abcdef)

static uint64_t le64(const unsigned char *p)
{
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--)
    v = v << 8 | p[i];
  return v;
}

static uint32_t le32(const unsigned char *p)
{
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* splitmix64 written out again from the document, not from block.h. */
static uint64_t mix(uint64_t z)
{
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* Builds the block as docs/simvm.md describes it. */
static void reference_block(unsigned char *b, uint64_t vm_id, uint32_t disk, uint64_t off,
                            uint64_t gen)
{
  unsigned char stream[4056];
  uint64_t s = mix(vm_id ^ mix(off ^ mix(gen)));
  for (int w = 0; w < 507; w++) {
    s += 0x9E3779B97F4A7C15ull;
    uint64_t x = mix(s);
    for (int k = 0; k < 8; k++)
      stream[8 * w + k] = (unsigned char)(x >> (8 * k));
  }
  memset(b, 0, 4096);
  memcpy(b, "FSIMBLK1", 8);
  for (int k = 0; k < 8; k++) {
    b[8 + k] = (unsigned char)(vm_id >> (8 * k));
    b[16 + k] = (unsigned char)(off >> (8 * k));
    b[24 + k] = (unsigned char)(gen >> (8 * k));
  }
  for (int k = 0; k < 4; k++)
    b[32 + k] = (unsigned char)(disk >> (8 * k));
  memcpy(b + 36, stream + 4, 4088 - 36);
  uint64_t sum = XXH64(b, 4088, 0);
  for (int k = 0; k < 8; k++)
    b[4088 + k] = (unsigned char)(sum >> (8 * k));
}

static void test_layout(void)
{
  static unsigned char b[4096], ref[4096];
  const uint64_t offs[] = { 0, 4096, 123 * 4096ull, (1ull << 40) - 4096 };
  const uint64_t gens[] = { 1, 2, 77, 0xfffffffeull };
  for (size_t i = 0; i < 4; i++) {
    for (size_t j = 0; j < 4; j++) {
      sim_block_fill(b, VM_ID, (uint32_t)i, offs[i], gens[j]);
      reference_block(ref, VM_ID, (uint32_t)i, offs[i], gens[j]);
      CHECK(memcmp(b, ref, 4096) == 0);
      CHECK(memcmp(b, "FSIMBLK1", 8) == 0);
      CHECK(le64(b + 8) == VM_ID);
      CHECK(le64(b + 16) == offs[i]);
      CHECK(le64(b + 24) == gens[j]);
      CHECK(le32(b + 32) == i);
      CHECK(le64(b + 4088) == XXH64(b, 4088, 0));
      struct sim_block_info info;
      sim_block_parse(b, &info);
      CHECK(info.magic_ok && info.sum_ok && !info.zero);
      CHECK(info.vm_id == VM_ID && info.offset == offs[i] && info.gen == gens[j] &&
            info.disk == i);
      CHECK(sim_block_filler_ok(b));
    }
  }
  /* Different generations, offsets and VMs give different fillers. */
  sim_block_fill(b, VM_ID, 0, 4096, 1);
  sim_block_fill(ref, VM_ID, 0, 4096, 2);
  CHECK(memcmp(b + 40, ref + 40, 4000) != 0);
  sim_block_fill(ref, VM_ID, 0, 8192, 1);
  CHECK(memcmp(b + 40, ref + 40, 4000) != 0);
  sim_block_fill(ref, VM_ID + 1, 0, 4096, 1);
  CHECK(memcmp(b + 40, ref + 40, 4000) != 0);
  /* Golden value: if this changes, the on-disk format changed (docs/simvm.md). */
  sim_block_fill(b, VM_ID, 2, 8192, 7);
  CHECK(le64(b + 4088) == XXH64(b, 4088, 0));
  CHECK(le64(b + 40) == 0x38f6b5691fd0bf66ull);
  CHECK(le64(b + 4088) == 0x459e77569c31184full);
}

static void test_verdicts(void)
{
  static unsigned char b[4096], z[4096];
  const uint64_t off = 10 * 4096;
  sim_block_fill(b, VM_ID, 1, off, 5);
  struct sim_block_info info;
  CHECK(sim_block_check(b, VM_ID, 1, off, 5, &info) == SIM_OK);
  CHECK(sim_block_check(b, VM_ID, 1, off, 6, NULL) == SIM_LOST);
  CHECK(sim_block_check(b, VM_ID, 1, off, 4, NULL) == SIM_NEWER);
  CHECK(sim_block_check(b, VM_ID, 1, off + 4096, 5, NULL) == SIM_MISPLACED);
  CHECK(sim_block_check(b, VM_ID, 0, off, 5, NULL) == SIM_MISPLACED);
  CHECK(sim_block_check(b, VM_ID ^ 1, 1, off, 5, &info) == SIM_FOREIGN);
  CHECK(info.vm_id == VM_ID);
  CHECK(sim_block_check(z, VM_ID, 1, off, 5, &info) == SIM_FOREIGN);
  CHECK(info.zero && !info.magic_ok);

  /* Where the table says never written: anything not ours is fine. */
  CHECK(sim_block_check(z, VM_ID, 1, off, SIM_GEN_NONE, NULL) == SIM_OK);
  CHECK(sim_block_check(b, VM_ID ^ 1, 1, off, SIM_GEN_NONE, NULL) == SIM_OK);
  CHECK(sim_block_check(b, VM_ID, 1, off, SIM_GEN_NONE, NULL) == SIM_UNEXPECTED);
  CHECK(sim_block_check(b, VM_ID, 1, off + 4096, SIM_GEN_NONE, NULL) == SIM_MISPLACED);

  /* One damaged byte anywhere: foreign (the checksum or the magic fails). */
  for (unsigned pos = 0; pos < 4096; pos++) {
    unsigned char c[4096];
    memcpy(c, b, 4096);
    c[pos] ^= 0x40;
    enum sim_verdict v = sim_block_check(c, VM_ID, 1, off, 5, &info);
    if (v != SIM_FOREIGN) {
      fprintf(stderr, "byte %u damaged: verdict %s\n", pos, sim_verdict_name(v));
      failures++;
      break;
    }
  }

  /* Forged: filler changed and checksum recomputed.  Header still names us. */
  unsigned char f[4096];
  memcpy(f, b, 4096);
  f[1000] ^= 1;
  uint64_t sum = XXH64(f, 4088, 0);
  for (int k = 0; k < 8; k++)
    f[4088 + k] = (unsigned char)(sum >> (8 * k));
  CHECK(!sim_block_filler_ok(f));
  CHECK(sim_block_check(f, VM_ID, 1, off, 5, &info) == SIM_FOREIGN);
  CHECK(info.sum_ok && info.magic_ok);
  /* ...even in the first filler word, which shares its bytes with the disk index. */
  memcpy(f, b, 4096);
  f[37] ^= 1;
  sum = XXH64(f, 4088, 0);
  for (int k = 0; k < 8; k++)
    f[4088 + k] = (unsigned char)(sum >> (8 * k));
  CHECK(sim_block_check(f, VM_ID, 1, off, 5, NULL) == SIM_FOREIGN);

  char detail[200];
  sim_block_check(z, VM_ID, 1, off, 5, &info);
  sim_verdict_detail(SIM_FOREIGN, &info, VM_ID, 1, off, 5, detail, sizeof detail);
  CHECK(strstr(detail, "zero") != NULL);
  sim_block_check(b, VM_ID, 1, off, 7, &info);
  sim_verdict_detail(SIM_LOST, &info, VM_ID, 1, off, 7, detail, sizeof detail);
  CHECK(strstr(detail, "generation 5") != NULL && strstr(detail, "7") != NULL);

  CHECK(strcmp(sim_verdict_name(SIM_OK), "ok") == 0);
  CHECK(strcmp(sim_verdict_name(SIM_LOST), "lost") == 0);
  CHECK(strcmp(sim_verdict_name(SIM_NEWER), "newer") == 0);
  CHECK(strcmp(sim_verdict_name(SIM_MISPLACED), "misplaced") == 0);
  CHECK(strcmp(sim_verdict_name(SIM_FOREIGN), "foreign") == 0);
  CHECK(strcmp(sim_verdict_name(SIM_UNEXPECTED), "unexpected") == 0);
}

int main(void)
{
  test_layout();
  test_verdicts();
  if (failures) {
    fprintf(stderr, "test_simvm_block: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_simvm_block: ok\n");
  return 0;
}
