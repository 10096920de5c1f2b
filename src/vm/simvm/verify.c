/* verify: see verify.h. */
#include "vm/simvm/verify.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "vm/simvm/nbdc.h"

#define VERIFY_CHUNK (1024 * 1024)   /* one NBD read */

static void add_problem(struct verify_report *r, unsigned disk, uint64_t offset,
                        enum sim_verdict kind, uint32_t expected, uint64_t found,
                        const char *detail)
{
  r->disk[disk].problems++;
  if (r->nproblems == VERIFY_MAX_PROBLEMS)
    return;
  struct verify_problem *p = &r->problems[r->nproblems++];
  *p = (struct verify_problem){ .disk = disk, .offset = offset, .kind = kind,
                                .expected = expected, .found_gen = found };
  snprintf(p->detail, sizeof p->detail, "%s", detail);
}

static void check_chunk(const struct sim_state *st, unsigned di, uint64_t first,
                        const unsigned char *buf, uint64_t n, struct verify_report *r)
{
  const uint32_t *t = st->disks[di].table;
  struct verify_disk *vd = &r->disk[di];
  for (uint64_t i = 0; i < n; i++) {
    uint64_t b = first + i;
    uint32_t g = t[b];
    if (g == SIM_GEN_UNCERTAIN) {
      r->uncertain++;
      r->written_blocks++;
      vd->written_blocks++;
      continue;
    }
    if (g != SIM_GEN_NONE) {
      r->written_blocks++;
      r->checked++;
      vd->written_blocks++;
      vd->checked++;
    }
    struct sim_block_info info;
    uint64_t off = b * SIM_BLOCK_SIZE;
    enum sim_verdict v = sim_block_check(buf + i * SIM_BLOCK_SIZE, st->vm_id, di, off, g, &info);
    if (v == SIM_OK) {
      r->good += g != SIM_GEN_NONE;
      continue;
    }
    r->count[v]++;
    char detail[200];
    sim_verdict_detail(v, &info, st->vm_id, di, off, g, detail, sizeof detail);
    add_problem(r, di, off, v, g, info.magic_ok ? info.gen : 0, detail);
  }
}

int sim_verify(const struct sim_state *st, const char *const *uris, struct verify_report *r,
               char *err, size_t errlen)
{
  memset(r, 0, sizeof *r);
  uint64_t t0 = now_ns();
  unsigned char *buf = malloc(VERIFY_CHUNK);
  if (!buf) {
    snprintf(err, errlen, "verify: out of memory");
    return -1;
  }
  for (unsigned di = 0; di < st->ndisks; di++) {
    const struct sim_disk_state *d = &st->disks[di];
    uint64_t size;
    struct nbd_handle *h = sim_nbd_open(d->name, uris[di], &size, err, errlen);
    if (!h) {
      free(buf);
      return -1;
    }
    if (size != d->size) {
      snprintf(err, errlen, "disk %s: %s is %llu bytes, the state says %llu", d->name, uris[di],
               (unsigned long long)size, (unsigned long long)d->size);
      nbd_close(h);
      free(buf);
      return -1;
    }
    r->blocks += d->nblocks;
    r->disk[di].blocks = d->nblocks;
    for (uint64_t b = 0; b < d->nblocks;) {
      uint64_t n = MIN(d->nblocks - b, (uint64_t)(VERIFY_CHUNK / SIM_BLOCK_SIZE));
      if (nbd_pread(h, buf, n * SIM_BLOCK_SIZE, b * SIM_BLOCK_SIZE, 0) < 0) {
        if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) {
          snprintf(err, errlen, "disk %s: connection lost while verifying at offset %llu: %s",
                   d->name, (unsigned long long)(b * SIM_BLOCK_SIZE), nbd_get_error());
          nbd_close(h);
          free(buf);
          return -1;
        }
        r->read_io_errors++;
        char detail[200];
        snprintf(detail, sizeof detail, "read of %llu bytes failed: %s",
                 (unsigned long long)(n * SIM_BLOCK_SIZE), nbd_get_error());
        add_problem(r, di, b * SIM_BLOCK_SIZE, SIM_OK, 0, 0, detail);
        b += n;
        continue;
      }
      check_chunk(st, di, b, buf, n, r);
      b += n;
    }
    nbd_shutdown(h, 0);
    nbd_close(h);
  }
  free(buf);
  r->ok = r->read_io_errors == 0;
  for (int v = SIM_OK + 1; v < SIM_VERDICTS; v++)
    r->ok &= r->count[v] == 0;
  r->elapsed_ns = now_ns() - t0;
  return 0;
}

json_t *verify_report_json(const struct sim_state *st, const struct verify_report *r)
{
  char id[24];
  snprintf(id, sizeof id, "%016llx", (unsigned long long)st->vm_id);
  json_t *o = json_pack("{s:b, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:f}", "ok", r->ok,
                        "vm_id", id, "blocks", (json_int_t)r->blocks,
                        "written_blocks", (json_int_t)r->written_blocks,
                        "checked", (json_int_t)r->checked, "good", (json_int_t)r->good,
                        "uncertain", (json_int_t)r->uncertain,
                        "read_io_errors", (json_int_t)r->read_io_errors,
                        "elapsed_s", r->elapsed_ns / 1e9);
  if (!o)
    return NULL;
  for (int v = SIM_OK + 1; v < SIM_VERDICTS; v++)
    json_object_set_new(o, sim_verdict_name(v), json_integer((json_int_t)r->count[v]));
  json_t *disks = json_array();
  for (unsigned i = 0; i < st->ndisks; i++)
    json_array_append_new(disks, json_pack("{s:s, s:I, s:I, s:I, s:I}", "name", st->disks[i].name,
                                           "blocks", (json_int_t)r->disk[i].blocks,
                                           "written_blocks", (json_int_t)r->disk[i].written_blocks,
                                           "checked", (json_int_t)r->disk[i].checked,
                                           "problems", (json_int_t)r->disk[i].problems));
  json_object_set_new(o, "disks", disks);
  json_t *probs = json_array();
  for (unsigned i = 0; i < r->nproblems; i++) {
    const struct verify_problem *p = &r->problems[i];
    json_array_append_new(probs, json_pack("{s:s, s:I, s:I, s:s, s:I, s:I, s:s}",
                                           "disk", st->disks[p->disk].name,
                                           "offset", (json_int_t)p->offset,
                                           "block", (json_int_t)(p->offset / SIM_BLOCK_SIZE),
                                           "kind", p->kind == SIM_OK ? "read_error"
                                                                     : sim_verdict_name(p->kind),
                                           "expected_generation", (json_int_t)p->expected,
                                           "found_generation", (json_int_t)p->found_gen,
                                           "detail", p->detail));
  }
  json_object_set_new(o, "problems", probs);
  return o;
}
