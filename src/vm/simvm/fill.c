/* fill: see fill.h. */
#include "vm/simvm/fill.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "vm/simvm/block.h"
#include "vm/simvm/nbdc.h"

#define FILL_IO    (1024 * 1024)
#define FILL_QD    4
#define FILL_BPI   (FILL_IO / SIM_BLOCK_SIZE)

struct fill_req {
  int64_t cookie;           /* 0: free */
  uint64_t block;
  uint32_t n;
  unsigned char *buf;
};

static void mark(struct sim_state *st, unsigned di, const struct fill_req *q, uint32_t gen)
{
  uint32_t *t = st->disks[di].table + q->block;
  for (uint32_t i = 0; i < q->n; i++)
    t[i] = gen;
}

static int fill_disk(struct sim_state *st, unsigned di, const char *uri, double percent,
                     unsigned char *mem, char *err, size_t errlen)
{
  struct sim_disk_state *d = &st->disks[di];
  uint64_t size;
  struct nbd_handle *h = sim_nbd_open(d->name, uri, &size, err, errlen);
  if (!h)
    return -1;
  if (size != d->size) {
    snprintf(err, errlen, "disk %s: %s is %" PRIu64 " bytes, the state says %" PRIu64, d->name,
             uri, size, d->size);
    nbd_close(h);
    return -1;
  }
  uint64_t end = (uint64_t)((double)d->nblocks * percent / 100.0);
  if (end > d->nblocks)
    end = d->nblocks;
  struct fill_req q[FILL_QD];
  for (int i = 0; i < FILL_QD; i++)
    q[i] = (struct fill_req){ .buf = mem + (size_t)i * FILL_IO };
  uint64_t next = 0;
  unsigned busy = 0;
  int rc = 0;
  uint64_t t0 = now_ns();
  while ((next < end && rc == 0) || busy > 0) {
    for (int i = 0; i < FILL_QD && next < end && rc == 0; i++) {
      if (q[i].cookie)
        continue;
      q[i].block = next;
      q[i].n = (uint32_t)MIN(end - next, (uint64_t)FILL_BPI);
      for (uint32_t k = 0; k < q[i].n; k++)
        sim_block_fill(q[i].buf + (size_t)k * SIM_BLOCK_SIZE, st->vm_id, di,
                       (next + k) * SIM_BLOCK_SIZE, 1);
      int64_t c = nbd_aio_pwrite(h, q[i].buf, (size_t)q[i].n * SIM_BLOCK_SIZE,
                                 next * SIM_BLOCK_SIZE, NBD_NULL_COMPLETION, 0);
      if (c < 0) {
        snprintf(err, errlen, "disk %s: write at %" PRIu64 ": %s", d->name, next * SIM_BLOCK_SIZE,
                 nbd_get_error());
        rc = -1;
        break;
      }
      q[i].cookie = c;
      busy++;
      next += q[i].n;
    }
    if (busy == 0)
      break;
    if (nbd_poll(h, -1) < 0) {
      snprintf(err, errlen, "disk %s: %s", d->name, nbd_get_error());
      rc = -1;
      for (int i = 0; i < FILL_QD; i++)
        if (q[i].cookie)
          mark(st, di, &q[i], SIM_GEN_UNCERTAIN);
      break;
    }
    for (int i = 0; i < FILL_QD; i++) {
      if (!q[i].cookie)
        continue;
      int r = nbd_aio_command_completed(h, q[i].cookie);
      if (r == 0)
        continue;
      if (r == 1) {
        mark(st, di, &q[i], 1);   /* acknowledged */
        st->counters[SIM_C_WRITES]++;
        st->counters[SIM_C_BYTES_WRITTEN] += (uint64_t)q[i].n * SIM_BLOCK_SIZE;
      } else {
        mark(st, di, &q[i], SIM_GEN_UNCERTAIN);
        st->counters[SIM_C_WRITE_ERRORS]++;
        if (rc == 0)
          snprintf(err, errlen, "disk %s: write at %" PRIu64 " failed: %s", d->name,
                   q[i].block * SIM_BLOCK_SIZE, nbd_get_error());
        rc = -1;
      }
      q[i].cookie = 0;
      busy--;
    }
  }
  if (st->gen_hwm < 1)
    st->gen_hwm = 1;
  double dt = (now_ns() - t0) / 1e9;
  if (rc == 0) {
    log_info(d->name, "filled %" PRIu64 " blocks (%.1f MiB) in %.2f s", end,
             end * SIM_BLOCK_SIZE / 1048576.0, dt);
    nbd_shutdown(h, 0);
  }
  nbd_close(h);
  return rc;
}

int sim_fill(struct sim_state *st, const char *const *uris, double percent, char *err,
             size_t errlen)
{
  void *mem = NULL;
  if (posix_memalign(&mem, SIM_BLOCK_SIZE, (size_t)FILL_QD * FILL_IO) != 0) {
    snprintf(err, errlen, "fill: out of memory");
    return -1;
  }
  int rc = 0;
  for (unsigned i = 0; i < st->ndisks && rc == 0; i++)
    rc = fill_disk(st, i, uris[i], percent, mem, err, errlen);
  free(mem);
  return rc;
}
