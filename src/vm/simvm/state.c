/* state: see state.h for the format and the invariant. */
#include "vm/simvm/state.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/util.h"
#include "vm/simvm/le.h"

const char *const sim_counter_names[SIM_COUNTERS] = {
  "reads", "writes", "bytes_read", "bytes_written", "read_errors", "write_errors",
  "read_io_errors", "reconnects",
};

/* Field offsets of the fixed header. */
#define OFF_MAGIC    0
#define OFF_VERSION  8
#define OFF_NDISKS   12
#define OFF_VM_ID    16
#define OFF_HWM      24
#define OFF_FLAGS    28
#define OFF_RNG      32
#define OFF_COUNTERS 64
#define OFF_NAME     128
#define NAME_FIELD   80                                  /* 64 characters, NUL padded */
#define OFF_WORKLOAD (OFF_NAME + NAME_FIELD)             /* 208 */
#define OFF_RESERVED (OFF_WORKLOAD + SIM_WL_SPEC_MAX)   /* 1744 */
/* Disk entry fields. */
#define ENT_SIZE     80
#define ENT_NBLOCKS  88
#define ENT_SUM      96
#define ENT_RESERVED 104

#define CHUNK (64 * 1024)   /* table conversion buffer */

static int errf(char *err, size_t errlen, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static int errf(char *err, size_t errlen, const char *fmt, ...)
{
  int saved = errno;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
  errno = saved ? saved : EINVAL;
  return -1;
}

int sim_random_u64(uint64_t *out)
{
  size_t done = 0;
  unsigned char *p = (unsigned char *)out;
  while (done < sizeof *out) {
    ssize_t r = getrandom(p + done, sizeof *out - done, 0);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    done += r;
  }
  return 0;
}

static size_t header_len(unsigned ndisks)
{
  return SIM_STATE_FIXED + (size_t)SIM_STATE_DISK_ENT * ndisks + 8;
}

static int alloc_table(struct sim_disk_state *d)
{
  d->table = calloc(d->nblocks ? d->nblocks : 1, sizeof *d->table);
  return d->table ? 0 : -1;
}

void sim_state_free(struct sim_state *st)
{
  for (unsigned i = 0; i < st->ndisks; i++) {
    free(st->disks[i].table);
    st->disks[i].table = NULL;
  }
  st->ndisks = 0;
}

int sim_state_create(struct sim_state *st, unsigned ndisks, const char *const *names,
                     const uint64_t *sizes, char *err, size_t errlen)
{
  memset(st, 0, sizeof *st);
  if (ndisks == 0 || ndisks > SIM_MAX_DISKS)
    return errf(err, errlen, "a VM has 1 to %d disks, not %u", SIM_MAX_DISKS, ndisks);
  if (sim_random_u64(&st->vm_id) < 0)
    return errf(err, errlen, "getrandom: %s", strerror(errno));
  st->vm_id |= st->vm_id == 0;   /* 0 would look like an unwritten header */
  for (unsigned i = 0; i < ndisks; i++) {
    struct sim_disk_state *d = &st->disks[i];
    if (!name_is_valid(names[i])) {
      sim_state_free(st);
      return errf(err, errlen, "'%s' is not a valid disk name", names[i]);
    }
    for (unsigned j = 0; j < i; j++) {
      if (strcmp(names[i], names[j]) == 0) {
        sim_state_free(st);
        return errf(err, errlen, "disk '%s' given twice", names[i]);
      }
    }
    if (sizes[i] < SIM_BLOCK_SIZE || sizes[i] > SIM_MAX_DISK_SIZE) {
      sim_state_free(st);
      return errf(err, errlen, "disk '%s': size %llu is outside 4 KiB..16 TiB", names[i],
                  (unsigned long long)sizes[i]);
    }
    snprintf(d->name, sizeof d->name, "%s", names[i]);
    d->size = sizes[i];
    d->nblocks = sizes[i] / SIM_BLOCK_SIZE;
    st->ndisks = i + 1;
    if (alloc_table(d) < 0) {
      sim_state_free(st);
      return errf(err, errlen, "disk '%s': no memory for a table of %llu blocks", names[i],
                  (unsigned long long)d->nblocks);
    }
  }
  struct workload w;
  workload_default(&w);
  workload_format(&w, st->workload, sizeof st->workload);
  return 0;
}

int sim_state_alloc_like(struct sim_state *dst, const struct sim_state *src)
{
  memset(dst, 0, sizeof *dst);
  for (unsigned i = 0; i < src->ndisks; i++) {
    dst->disks[i] = src->disks[i];
    dst->disks[i].table = NULL;
    dst->ndisks = i + 1;
    if (alloc_table(&dst->disks[i]) < 0) {
      sim_state_free(dst);
      errno = ENOMEM;
      return -1;
    }
  }
  return 0;
}

int sim_state_find_disk(const struct sim_state *st, const char *name)
{
  for (unsigned i = 0; i < st->ndisks; i++)
    if (strcmp(st->disks[i].name, name) == 0)
      return (int)i;
  return -1;
}

/* A NUL-padded string field: NUL within len, only NULs after it. */
static bool padded_ok(const unsigned char *p, size_t len)
{
  const unsigned char *nul = memchr(p, 0, len);
  if (!nul)
    return false;
  for (const unsigned char *q = nul; q < p + len; q++)
    if (*q)
      return false;
  return true;
}

static bool zeros(const unsigned char *p, size_t len)
{
  for (size_t i = 0; i < len; i++)
    if (p[i])
      return false;
  return true;
}

int sim_state_load(const char *path, struct sim_state *st, char *err, size_t errlen)
{
  memset(st, 0, sizeof *st);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return errf(err, errlen, "state file %s: %s", path, strerror(errno));
  unsigned char *hdr = NULL;
  struct stat sb;
  if (fstat(fd, &sb) < 0) {
    errf(err, errlen, "state file %s: %s", path, strerror(errno));
    goto fail;
  }
  if (!S_ISREG(sb.st_mode)) {
    errno = EINVAL;
    errf(err, errlen, "state file %s: not a regular file", path);
    goto fail;
  }
  uint64_t fsize = (uint64_t)sb.st_size;
  unsigned char fixed[SIM_STATE_FIXED];
  if (fsize < header_len(1) || pread_full(fd, fixed, sizeof fixed, 0) < 0) {
    errno = EINVAL;
    errf(err, errlen, "state file %s: truncated (%llu bytes, the header alone is %zu)", path,
         (unsigned long long)fsize, header_len(1));
    goto fail;
  }
  errno = EINVAL;
  if (memcmp(fixed + OFF_MAGIC, SIM_STATE_MAGIC, 8) != 0) {
    errf(err, errlen, "state file %s: not a ferry-simvm state file (bad magic)", path);
    goto fail;
  }
  uint32_t version = get_le32(fixed + OFF_VERSION);
  if (version != SIM_STATE_VERSION) {
    errf(err, errlen, "state file %s: version %u, this ferry-simvm reads version %d", path,
         version, SIM_STATE_VERSION);
    goto fail;
  }
  uint32_t ndisks = get_le32(fixed + OFF_NDISKS);
  if (ndisks == 0 || ndisks > SIM_MAX_DISKS) {
    errf(err, errlen, "state file %s: corrupt header (%u disks)", path, ndisks);
    goto fail;
  }
  size_t hlen = header_len(ndisks);
  if (fsize < hlen) {
    errf(err, errlen, "state file %s: truncated (%llu bytes, header of %u disks is %zu)", path,
         (unsigned long long)fsize, ndisks, hlen);
    goto fail;
  }
  hdr = malloc(hlen);
  if (!hdr) {
    errf(err, errlen, "state file %s: out of memory", path);
    goto fail;
  }
  if (pread_full(fd, hdr, hlen, 0) < 0) {
    errf(err, errlen, "state file %s: read: %s", path, errno ? strerror(errno) : "truncated");
    goto fail;
  }
  errno = EINVAL;
  if (get_le64(hdr + hlen - 8) != XXH64(hdr, hlen - 8, 0)) {
    errf(err, errlen, "state file %s: header checksum mismatch: the file is corrupt", path);
    goto fail;
  }
  /* The checksum matched; the checks below catch a file written wrongly. */
  if (get_le32(hdr + OFF_FLAGS) != 0 || !zeros(hdr + OFF_RESERVED, SIM_STATE_FIXED - OFF_RESERVED)) {
    errf(err, errlen, "state file %s: unknown flags or reserved bytes set", path);
    goto fail;
  }
  st->vm_id = get_le64(hdr + OFF_VM_ID);
  st->gen_hwm = get_le32(hdr + OFF_HWM);
  for (int i = 0; i < 4; i++)
    st->rng[i] = get_le64(hdr + OFF_RNG + 8 * i);
  for (int i = 0; i < SIM_COUNTERS; i++)
    st->counters[i] = get_le64(hdr + OFF_COUNTERS + 8 * i);
  if (!(st->rng[0] | st->rng[1] | st->rng[2] | st->rng[3]) || st->vm_id == 0 ||
      st->gen_hwm == SIM_GEN_UNCERTAIN) {
    errf(err, errlen, "state file %s: corrupt header (vm_id, rng or generation)", path);
    goto fail;
  }
  if (!padded_ok(hdr + OFF_NAME, NAME_FIELD) || strlen((char *)hdr + OFF_NAME) > SIM_NAME_MAX ||
      !padded_ok(hdr + OFF_WORKLOAD, SIM_WL_SPEC_MAX)) {
    errf(err, errlen, "state file %s: corrupt header (name or workload field)", path);
    goto fail;
  }
  memcpy(st->name, hdr + OFF_NAME, strlen((char *)hdr + OFF_NAME) + 1);
  if (st->name[0] && !name_is_valid(st->name)) {
    errf(err, errlen, "state file %s: invalid VM name", path);
    goto fail;
  }
  memcpy(st->workload, hdr + OFF_WORKLOAD, SIM_WL_SPEC_MAX);
  struct workload w;
  char werr[256];
  if (workload_parse(st->workload, &w, werr, sizeof werr) < 0) {
    errno = EINVAL;
    errf(err, errlen, "state file %s: bad workload: %s", path, werr);
    goto fail;
  }
  uint64_t expect = hlen;
  uint64_t sums[SIM_MAX_DISKS];
  for (unsigned i = 0; i < ndisks; i++) {
    const unsigned char *e = hdr + SIM_STATE_FIXED + (size_t)SIM_STATE_DISK_ENT * i;
    struct sim_disk_state *d = &st->disks[i];
    if (!padded_ok(e, NAME_FIELD) || strlen((const char *)e) > SIM_NAME_MAX) {
      errf(err, errlen, "state file %s: disk %u: corrupt name", path, i);
      goto fail;
    }
    memcpy(d->name, e, strlen((const char *)e) + 1);
    d->size = get_le64(e + ENT_SIZE);
    d->nblocks = get_le64(e + ENT_NBLOCKS);
    sums[i] = get_le64(e + ENT_SUM);
    if (!name_is_valid(d->name) || sim_state_find_disk(st, d->name) != -1) {
      errf(err, errlen, "state file %s: disk %u: invalid or repeated name", path, i);
      goto fail;
    }
    if (d->size < SIM_BLOCK_SIZE || d->size > SIM_MAX_DISK_SIZE ||
        d->nblocks != d->size / SIM_BLOCK_SIZE || get_le64(e + ENT_RESERVED) != 0) {
      errf(err, errlen, "state file %s: disk '%s': inconsistent size %llu / %llu blocks", path,
           d->name, (unsigned long long)d->size, (unsigned long long)d->nblocks);
      goto fail;
    }
    st->ndisks = i + 1;   /* from here sim_state_free frees its table */
    expect += d->nblocks * 4;
  }
  if (fsize != expect) {
    errf(err, errlen, "state file %s: %s: %llu bytes, the header says %llu", path,
         fsize < expect ? "truncated" : "trailing bytes", (unsigned long long)fsize,
         (unsigned long long)expect);
    goto fail;
  }
  uint64_t off = hlen;
  for (unsigned i = 0; i < ndisks; i++) {
    struct sim_disk_state *d = &st->disks[i];
    if (alloc_table(d) < 0) {
      errno = ENOMEM;
      errf(err, errlen, "state file %s: disk '%s': no memory for %llu blocks", path, d->name,
           (unsigned long long)d->nblocks);
      goto fail;
    }
    size_t bytes = d->nblocks * 4;
    if (pread_full(fd, d->table, bytes, (off_t)off) < 0) {
      errf(err, errlen, "state file %s: read: %s", path, errno ? strerror(errno) : "truncated");
      goto fail;
    }
    off += bytes;
    if (XXH64(d->table, bytes, 0) != sums[i]) {
      errno = EINVAL;
      errf(err, errlen, "state file %s: disk '%s': table checksum mismatch: the file is corrupt",
           path, d->name);
      goto fail;
    }
    for (uint64_t b = 0; b < d->nblocks; b++)
      d->table[b] = le32toh(d->table[b]);
  }
  free(hdr);
  close(fd);
  return 0;

fail:;
  int saved = errno;
  free(hdr);
  sim_state_free(st);
  close(fd);
  errno = saved;
  return -1;
}

/* Writes a table little endian at off and returns its XXH64 in *sum. */
static int write_table(int fd, const uint32_t *t, uint64_t n, off_t off, uint64_t *sum,
                       uint32_t *chunk)
{
  XXH64_state_t *hs = XXH64_createState();
  if (!hs) {
    errno = ENOMEM;
    return -1;
  }
  XXH64_reset(hs, 0);
  for (uint64_t i = 0; i < n;) {
    size_t k = MIN(n - i, (uint64_t)(CHUNK / 4));
    for (size_t j = 0; j < k; j++)
      chunk[j] = htole32(t[i + j]);
    XXH64_update(hs, chunk, k * 4);
    if (pwrite_full(fd, chunk, k * 4, off) < 0) {
      int e = errno;
      XXH64_freeState(hs);
      errno = e;
      return -1;
    }
    off += (off_t)(k * 4);
    i += k;
  }
  *sum = XXH64_digest(hs);
  XXH64_freeState(hs);
  return 0;
}

int sim_state_save(const char *path, const struct sim_state *st, char *err, size_t errlen)
{
  size_t plen = strlen(path);
  char *tmp = malloc(plen + 5);
  size_t hlen = header_len(st->ndisks);
  unsigned char *hdr = calloc(1, hlen);
  uint32_t *chunk = malloc(CHUNK);
  int fd = -1;
  if (!tmp || !hdr || !chunk) {
    errno = ENOMEM;
    errf(err, errlen, "saving state: out of memory");
    goto fail;
  }
  memcpy(tmp, path, plen);
  memcpy(tmp + plen, ".tmp", 5);
  fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) {
    errf(err, errlen, "saving state: %s: %s", tmp, strerror(errno));
    goto fail;
  }
  memcpy(hdr + OFF_MAGIC, SIM_STATE_MAGIC, 8);
  put_le32(hdr + OFF_VERSION, SIM_STATE_VERSION);
  put_le32(hdr + OFF_NDISKS, st->ndisks);
  put_le64(hdr + OFF_VM_ID, st->vm_id);
  put_le32(hdr + OFF_HWM, st->gen_hwm);
  for (int i = 0; i < 4; i++)
    put_le64(hdr + OFF_RNG + 8 * i, st->rng[i]);
  for (int i = 0; i < SIM_COUNTERS; i++)
    put_le64(hdr + OFF_COUNTERS + 8 * i, st->counters[i]);
  memcpy(hdr + OFF_NAME, st->name, strnlen(st->name, SIM_NAME_MAX));
  memcpy(hdr + OFF_WORKLOAD, st->workload, strnlen(st->workload, SIM_WL_SPEC_MAX - 1));
  off_t off = (off_t)hlen;
  for (unsigned i = 0; i < st->ndisks; i++) {
    const struct sim_disk_state *d = &st->disks[i];
    unsigned char *e = hdr + SIM_STATE_FIXED + (size_t)SIM_STATE_DISK_ENT * i;
    uint64_t sum;
    if (write_table(fd, d->table, d->nblocks, off, &sum, chunk) < 0) {
      errf(err, errlen, "saving state: %s: %s", tmp, strerror(errno));
      goto fail;
    }
    off += (off_t)(d->nblocks * 4);
    memcpy(e, d->name, strnlen(d->name, SIM_NAME_MAX));
    put_le64(e + ENT_SIZE, d->size);
    put_le64(e + ENT_NBLOCKS, d->nblocks);
    put_le64(e + ENT_SUM, sum);
  }
  put_le64(hdr + hlen - 8, XXH64(hdr, hlen - 8, 0));
  if (pwrite_full(fd, hdr, hlen, 0) < 0 || fsync(fd) < 0) {
    errf(err, errlen, "saving state: %s: %s", tmp, strerror(errno));
    goto fail;
  }
  if (close(fd) < 0) {
    fd = -1;
    errf(err, errlen, "saving state: %s: %s", tmp, strerror(errno));
    goto fail;
  }
  fd = -1;
  if (rename(tmp, path) < 0) {
    errf(err, errlen, "saving state: rename %s -> %s: %s", tmp, path, strerror(errno));
    goto fail;
  }
  if (fsync_parent_dir(path) < 0) {
    errf(err, errlen, "saving state: fsync of the directory of %s: %s", path, strerror(errno));
    free(tmp);
    free(hdr);
    free(chunk);
    return -1;   /* the new file is in place but may not be durable */
  }
  free(tmp);
  free(hdr);
  free(chunk);
  return 0;

fail:;
  int saved = errno;
  if (fd >= 0) {
    close(fd);
  }
  if (tmp)
    unlink(tmp);
  free(tmp);
  free(hdr);
  free(chunk);
  errno = saved;
  return -1;
}
