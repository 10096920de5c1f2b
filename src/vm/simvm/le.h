/* le: unaligned little-endian loads and stores for ferry-simvm's on-disk
 * formats (blocks, state file).  memcpy + <endian.h>: no alignment or
 * aliasing assumptions, and free on little-endian hosts. */
#ifndef FERRY_SIMVM_LE_H
#define FERRY_SIMVM_LE_H

#include <endian.h>
#include <stdint.h>
#include <string.h>

static inline void put_le32(void *p, uint32_t v)
{
  v = htole32(v);
  memcpy(p, &v, 4);
}

static inline void put_le64(void *p, uint64_t v)
{
  v = htole64(v);
  memcpy(p, &v, 8);
}

static inline uint32_t get_le32(const void *p)
{
  uint32_t v;
  memcpy(&v, p, 4);
  return le32toh(v);
}

static inline uint64_t get_le64(const void *p)
{
  uint64_t v;
  memcpy(&v, p, 8);
  return le64toh(v);
}

#endif
