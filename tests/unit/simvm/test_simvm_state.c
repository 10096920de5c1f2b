/* test_simvm_state: the state file (src/vm/simvm/state.c): a save/load
 * round trip keeps every field; any damaged header byte, any damaged table
 * byte tried, every truncation tried, trailing bytes, a wrong version with a
 * re-computed checksum, and files that are not state files are all refused
 * with a message; a save replaces the file atomically (no temp file left). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "vm/simvm/state.h"

#include "check.h"

static char dir[] = "/tmp/test_simvm_state.XXXXXX";
static char path[256];

static unsigned char *slurp(const char *p, size_t *len)
{
  FILE *f = fopen(p, "rb");
  if (!f)
    return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char *b = malloc(n ? n : 1);
  if (fread(b, 1, n, f) != (size_t)n) {
    free(b);
    b = NULL;
  }
  fclose(f);
  *len = (size_t)n;
  return b;
}

static void spit(const char *p, const unsigned char *b, size_t len)
{
  FILE *f = fopen(p, "wb");
  CHECK(f != NULL);
  if (!f)
    return;
  CHECK(fwrite(b, 1, len, f) == len);
  fclose(f);
}

static void make_state(struct sim_state *st)
{
  const char *names[] = { "vda", "data-2" };
  const uint64_t sizes[] = { 1 << 20, 3 * 4096 + 100 };
  char err[256];
  CHECK(sim_state_create(st, 2, names, sizes, err, sizeof err) == 0);
  CHECK(st->disks[0].nblocks == 256 && st->disks[1].nblocks == 3);
  for (uint64_t b = 0; b < st->disks[0].nblocks; b++)
    st->disks[0].table[b] = b % 7 == 0 ? SIM_GEN_UNCERTAIN : (uint32_t)(b * 2654435761u);
  st->disks[1].table[1] = 42;
  snprintf(st->name, sizeof st->name, "vm-one");
  snprintf(st->workload, sizeof st->workload, "write=50,bs=8k,iops=0,zipf=1.2,qd=8,disks=vda");
  for (int i = 0; i < SIM_COUNTERS; i++)
    st->counters[i] = 1000 + i;
  for (int i = 0; i < 4; i++)
    st->rng[i] = 0x1111111111111111ull * (i + 1);
  st->gen_hwm = 99;
}

static bool same(const struct sim_state *a, const struct sim_state *b)
{
  if (a->vm_id != b->vm_id || a->gen_hwm != b->gen_hwm || a->ndisks != b->ndisks ||
      strcmp(a->name, b->name) || strcmp(a->workload, b->workload) ||
      memcmp(a->rng, b->rng, sizeof a->rng) || memcmp(a->counters, b->counters, sizeof a->counters))
    return false;
  for (unsigned i = 0; i < a->ndisks; i++) {
    const struct sim_disk_state *x = &a->disks[i], *y = &b->disks[i];
    if (strcmp(x->name, y->name) || x->size != y->size || x->nblocks != y->nblocks ||
        memcmp(x->table, y->table, x->nblocks * 4))
      return false;
  }
  return true;
}

static void expect_refused(const char *what, const char *want)
{
  struct sim_state st;
  char err[512] = "";
  int rc = sim_state_load(path, &st, err, sizeof err);
  if (rc == 0) {
    fprintf(stderr, "%s: loaded, expected refusal\n", what);
    failures++;
    sim_state_free(&st);
    return;
  }
  if (!err[0] || (want && !strstr(err, want))) {
    fprintf(stderr, "%s: message '%s' lacks '%s'\n", what, err, want ? want : "(any)");
    failures++;
  }
}

int main(void)
{
  CHECK(mkdtemp(dir) != NULL);
  snprintf(path, sizeof path, "%s/vm.state", dir);

  struct sim_state st, back;
  make_state(&st);
  char err[512];
  CHECK(sim_state_save(path, &st, err, sizeof err) == 0);
  CHECK(sim_state_load(path, &back, err, sizeof err) == 0);
  CHECK(same(&st, &back));
  CHECK(sim_state_find_disk(&back, "data-2") == 1 && sim_state_find_disk(&back, "x") == -1);
  sim_state_free(&back);

  /* Saved again over itself: atomic, no temp file left. */
  st.disks[1].table[2] = 7;
  CHECK(sim_state_save(path, &st, err, sizeof err) == 0);
  char tmp[300];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  CHECK(access(tmp, F_OK) != 0);
  struct stat sb;
  CHECK(stat(path, &sb) == 0 && (sb.st_mode & 0777) == 0600);
  CHECK(sim_state_load(path, &back, err, sizeof err) == 0);
  CHECK(back.disks[1].table[2] == 7 && same(&st, &back));
  sim_state_free(&back);

  size_t len = 0;
  unsigned char *good = slurp(path, &len);
  CHECK(good != NULL);
  size_t hlen = SIM_STATE_FIXED + 2 * SIM_STATE_DISK_ENT + 8;
  CHECK(len == hlen + 4 * (256 + 3));

  /* Every header byte, and table bytes at a stride: damage is refused. */
  for (size_t pos = 0; pos < len; pos += pos < hlen ? 1 : 37) {
    unsigned char *bad = malloc(len);
    memcpy(bad, good, len);
    bad[pos] ^= 0x01;
    spit(path, bad, len);
    free(bad);
    struct sim_state x;
    char e[512] = "";
    if (sim_state_load(path, &x, e, sizeof e) == 0) {
      fprintf(stderr, "byte %zu damaged: loaded\n", pos);
      failures++;
      sim_state_free(&x);
      break;
    }
    if (!strstr(e, "corrupt") && !strstr(e, "magic") && !strstr(e, "version") &&
        !strstr(e, "truncated") && !strstr(e, "trailing")) {
      fprintf(stderr, "byte %zu damaged: unclear message '%s'\n", pos, e);
      failures++;
      break;
    }
  }

  /* Truncated anywhere, or with bytes after the end. */
  const size_t cuts[] = { 0, 1, 7, 8, 100, SIM_STATE_FIXED, hlen - 1, hlen, hlen + 1, len - 4,
                          len - 1 };
  for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
    spit(path, good, cuts[i]);
    char what[64];
    snprintf(what, sizeof what, "truncated to %zu", cuts[i]);
    expect_refused(what, NULL);
  }
  unsigned char *longer = malloc(len + 1);
  memcpy(longer, good, len);
  longer[len] = 0;
  spit(path, longer, len + 1);
  expect_refused("a byte appended", "trailing");
  free(longer);

  /* A version this program does not know, with a valid checksum. */
  unsigned char *v2 = malloc(len);
  memcpy(v2, good, len);
  v2[8] = 2;
  uint64_t sum = XXH64(v2, hlen - 8, 0);
  for (int k = 0; k < 8; k++)
    v2[hlen - 8 + k] = (unsigned char)(sum >> (8 * k));
  spit(path, v2, len);
  expect_refused("version 2", "version");
  /* A header that checks out but a table of another disk size. */
  memcpy(v2, good, len);
  v2[SIM_STATE_FIXED + 81] = 0x10;   /* disk 0 size + 4 KiB: nblocks no longer matches */
  sum = XXH64(v2, hlen - 8, 0);
  for (int k = 0; k < 8; k++)
    v2[hlen - 8 + k] = (unsigned char)(sum >> (8 * k));
  spit(path, v2, len);
  expect_refused("size/nblocks mismatch", "inconsistent");
  free(v2);

  /* Not a state file at all; a directory; nothing. */
  spit(path, (const unsigned char *)"hello world, this is not a state file", 38);
  expect_refused("text file", NULL);
  unsigned char *junk = calloc(1, len);
  spit(path, junk, len);
  expect_refused("zeros", "magic");
  free(junk);
  unlink(path);
  expect_refused("missing file", "No such file");
  CHECK(mkdir(path, 0700) == 0);
  expect_refused("directory", "not a regular file");
  rmdir(path);

  /* Creation checks its inputs. */
  struct sim_state c;
  const char *bad_names[] = { "ok", "bad/name" };
  const uint64_t sizes[] = { 1 << 20, 1 << 20 };
  CHECK(sim_state_create(&c, 2, bad_names, sizes, err, sizeof err) < 0);
  const char *dup[] = { "a", "a" };
  CHECK(sim_state_create(&c, 2, dup, sizes, err, sizeof err) < 0);
  const char *one[] = { "a" };
  const uint64_t tiny[] = { 4095 };
  CHECK(sim_state_create(&c, 1, one, tiny, err, sizeof err) < 0);
  CHECK(sim_state_create(&c, 0, one, tiny, err, sizeof err) < 0);
  CHECK(sim_state_create(&c, 1, one, sizes, err, sizeof err) == 0 && c.vm_id != 0);
  struct sim_state c2;
  CHECK(sim_state_create(&c2, 1, one, sizes, err, sizeof err) == 0 && c2.vm_id != c.vm_id);
  sim_state_free(&c);
  sim_state_free(&c2);

  free(good);
  sim_state_free(&st);
  unlink(path);
  rmdir(dir);
  if (failures) {
    fprintf(stderr, "test_simvm_state: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_simvm_state: ok\n");
  return 0;
}
