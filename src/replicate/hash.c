/* hash: the region hash that source and destination compare to check, not
 * assume, that a disk arrived whole (invariant 2).  XXH3-64 over the region's
 * bytes; a region the backend reports as a hole is hashed as zeros without
 * reading it, so sparse disks verify at the speed of their data. */
#include <errno.h>
#include <string.h>
#include <xxhash.h>

#include "common/util.h"
#include "disk/disk.h"
#include "replicate/internal.h"

bool buffer_is_zero(const void *buf, size_t len)
{
  const unsigned char *p = buf;
  /* Compare the buffer with itself shifted by 16 bytes once the first 16
   * are zero: memcmp runs at memory speed. */
  if (len < 16) {
    for (size_t i = 0; i < len; i++)
      if (p[i])
        return false;
    return true;
  }
  for (size_t i = 0; i < 16; i++)
    if (p[i])
      return false;
  return memcmp(p, p + 16, len - 16) == 0;
}

uint64_t zero_region_hash(uint64_t gran)
{
  static _Thread_local uint64_t cached_gran, cached_hash;
  if (gran == cached_gran)
    return cached_hash;
  /* Streaming over a zero page: no buffer the size of a region. */
  static const unsigned char zeros[4096];
  XXH3_state_t *st = XXH3_createState();
  XXH3_64bits_reset(st);
  for (uint64_t done = 0; done < gran; done += sizeof zeros)
    XXH3_64bits_update(st, zeros, MIN(sizeof zeros, gran - done));
  uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  cached_gran = gran;
  cached_hash = h;
  return h;
}

struct hole_probe {
  bool all_hole;
};

static int probe_fn(void *opaque, uint64_t off, uint64_t len, uint32_t flags)
{
  (void)off;
  (void)len;
  struct hole_probe *p = opaque;
  if (!(flags & DISK_EXTENT_HOLE)) {
    p->all_hole = false;
    return 1;
  }
  return 0;
}

int region_hash(struct disk *d, uint64_t gran, uint64_t region, void *buf, uint64_t *out)
{
  uint64_t off = region * gran;
  uint64_t size = disk_size(d);
  if (off >= size)
    return -EINVAL;
  uint64_t len = MIN(gran, size - off);
  struct hole_probe p = { .all_hole = true };
  if (disk_extents_allocation(d, off, len, probe_fn, &p) == 0 && p.all_hole && len == gran) {
    *out = zero_region_hash(gran);
    return 1;
  }
  int r = disk_read(d, buf, (uint32_t)len, off, DISK_IO_REPLICA);
  if (r < 0)
    return r;
  if (len < gran)
    memset((char *)buf + len, 0, gran - len);   /* a short last region hashes padded */
  *out = XXH3_64bits(buf, gran);
  return 0;
}
