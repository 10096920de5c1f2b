/* journal: the write-back journal, one RPO point as a file (see journal.h for
 * the role and the design).
 *
 * ON DISK.  All integers little endian.  XXH64 is xxHash's 64-bit hash.
 *
 *   Header, 64 bytes at byte 0:
 *      0  magic[8]  "FERRYWBJ"
 *      8  u32       version (1)
 *     12  u32       header size (64)
 *     16  u32       entry header size (32)
 *     20  u32       ndisks, 1..JOURNAL_MAX_DISKS
 *     24  u64       point id (>= 1)
 *     32  u64       time of the point, ns since the epoch (CLOCK_REALTIME)
 *     40  u64       flags (0; any other value is refused)
 *     48  u64       reserved (0)
 *     56  u64       XXH64(bytes 0..55, seed 0)
 *
 *   Entries, one after the other from byte 64, each an entry header of 32
 *   bytes followed by its data:
 *      0  u32       kind: 1 DATA, 2 ZERO, 3 STATE
 *      4  u32       disk index, < ndisks (STATE: 0)
 *      8  u64       offset in the disk (STATE: 0)
 *     16  u64       length, 1..JOURNAL_MAX_ENTRY; offset + length within the disk
 *     24  u64       checksum: XXH64 over bytes 0..23 of this entry header
 *                   followed by the data, seed = the point id
 *     32  data      DATA, STATE: `length` bytes; ZERO: none
 *   No padding.  At most one STATE entry.  The first u32 of an entry is 1, 2
 *   or 3, never the first 4 bytes of the trailer magic ("FERR"), so a reader
 *   tells an entry from the trailer by its first bytes.
 *
 *   Trailer, 48 bytes, right after the last entry; the file ends with it:
 *      0  magic[8]  "FERRYWBT"
 *      8  u64       number of entries
 *     16  u64       data bytes: the sum of the DATA and STATE lengths (so the
 *                   file is 64 + 32 * entries + data bytes + 48 bytes long)
 *     24  u64       chained hash: c0 = the header checksum (header byte 56),
 *                   c(i+1) = XXH64(le64 c(i) || le64 checksum of entry i, 16
 *                   bytes, seed 0); the value after the last entry.  It binds
 *                   the trailer to this header and to every entry, in order:
 *                   an entry missing, added, moved or taken from another
 *                   journal does not match.
 *     32  u64       point id (= the header's)
 *     40  u64       XXH64(bytes 0..39, seed 0)
 *
 * Semantics.  Applied in file order, entry i writes its range of its disk:
 * DATA its bytes, ZERO zeros; a later entry overrides an earlier one where
 * they overlap.  STATE replaces the VM's state blob.  Each entry holds whole
 * contents, so applying a journal again (a crash while applying) gives the
 * same images.  Entry numbers in messages count from 0.
 *
 * Invariants.  The file at `path` is only ever a sealed journal: the writer
 * writes path.tmp and renames it after the trailer is synced.  A journal
 * passes journal_check_* iff every byte of it is as the writer made it (up
 * to hash collisions) and it is whole.  The checker reads nothing it has not
 * bounded: each length is checked against JOURNAL_MAX_ENTRY and the bytes
 * left before it is read; no allocation depends on more than one entry.
 *
 * Thread model.  Writer: `lock` guards the reservation (next_off, entries,
 * data_bytes, chain, has_state), `inflight` and `error`.  An append builds
 * and hashes its entry with no lock, takes the lock to reserve its place in
 * the file and fold its checksum into the chain (so the chain follows file
 * order), and writes with pwritev outside the lock at its reserved offset;
 * appends write disjoint ranges concurrently.  Seal waits for inflight == 0.
 * next_off is also read without the lock (journal_writer_bytes) through
 * __atomic builtins.  Readers: no shared state. */
#include "cache/journal.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#define XXH_STATIC_LINKING_ONLY   /* XXH64_state_t on the stack */
#include <xxhash.h>

#include "common/util.h"

#define HDR_CSUM_OFF 56
#define ENT_CSUM_OFF 24
#define TRL_CSUM_OFF 40

_Static_assert(sizeof(JOURNAL_MAGIC) - 1 == 8 && sizeof(JOURNAL_TRAILER_MAGIC) - 1 == 8,
               "magics are 8 bytes");

static void set_err(char *err, size_t errlen, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
  if (!err || !errlen)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

static void put32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }

typedef unsigned long long ull;

const char *journal_kind_name(unsigned kind)
{
  switch (kind) {
  case JOURNAL_KIND_DATA: return "DATA";
  case JOURNAL_KIND_ZERO: return "ZERO";
  case JOURNAL_KIND_STATE: return "STATE";
  default: return "?";
  }
}

/* ---- format pieces shared by the writer and the reader ---- */

static void header_build(uint8_t out[JOURNAL_HEADER_SIZE], uint64_t point_id, uint64_t time_ns,
                         unsigned ndisks)
{
  memset(out, 0, JOURNAL_HEADER_SIZE);
  memcpy(out, JOURNAL_MAGIC, 8);
  put32(out + 8, JOURNAL_VERSION);
  put32(out + 12, JOURNAL_HEADER_SIZE);
  put32(out + 16, JOURNAL_ENTRY_HEADER_SIZE);
  put32(out + 20, ndisks);
  put64(out + 24, point_id);
  put64(out + 32, time_ns);
  put64(out + HDR_CSUM_OFF, XXH64(out, HDR_CSUM_OFF, 0));
}

/* The checksum of an entry: its header's first 24 bytes, then dlen data bytes. */
static uint64_t entry_csum(const uint8_t hdr[JOURNAL_ENTRY_HEADER_SIZE], const void *data,
                           size_t dlen, uint64_t point_id)
{
  XXH64_state_t st;
  XXH64_reset(&st, point_id);
  XXH64_update(&st, hdr, ENT_CSUM_OFF);
  if (dlen)
    XXH64_update(&st, data, dlen);
  return XXH64_digest(&st);
}

static uint64_t chain_step(uint64_t chain, uint64_t csum)
{
  uint8_t b[16];
  put64(b, chain);
  put64(b + 8, csum);
  return XXH64(b, sizeof b, 0);
}

static void trailer_build(uint8_t out[JOURNAL_TRAILER_SIZE], uint64_t entries,
                          uint64_t data_bytes, uint64_t chain, uint64_t point_id)
{
  memcpy(out, JOURNAL_TRAILER_MAGIC, 8);
  put64(out + 8, entries);
  put64(out + 16, data_bytes);
  put64(out + 24, chain);
  put64(out + 32, point_id);
  put64(out + TRL_CSUM_OFF, XXH64(out, TRL_CSUM_OFF, 0));
}

static bool kind_is_valid(unsigned kind)
{
  return kind == JOURNAL_KIND_DATA || kind == JOURNAL_KIND_ZERO || kind == JOURNAL_KIND_STATE;
}

/* ---- writer ---- */

struct journal_writer {
  char *path, *tmp_path;
  int fd;                              /* path.tmp */
  uint64_t point_id;
  uint64_t hdr_csum;                   /* header checksum: the chain's start */
  unsigned ndisks;

  pthread_mutex_t lock;
  pthread_cond_t idle;                 /* inflight fell to 0 */
  uint64_t next_off;                   /* lock (written); where the next entry goes */
  uint64_t entries;                    /* lock */
  uint64_t data_bytes;                 /* lock */
  uint64_t chain;                      /* lock: chained hash of the reserved entries */
  unsigned inflight;                   /* lock: appends reserved but not yet written */
  bool has_state;                      /* lock: a STATE entry was reserved */
  int error;                           /* lock: first failed write, -errno; sticky */
};

static void writer_free(struct journal_writer *w)
{
  pthread_cond_destroy(&w->idle);
  pthread_mutex_destroy(&w->lock);
  free(w->path);
  free(w->tmp_path);
  free(w);
}

struct journal_writer *journal_create(const char *path, uint64_t point_id, uint64_t time_ns,
                                      unsigned ndisks, char *err, size_t errlen)
{
  if (!path || point_id == 0 || ndisks == 0 || ndisks > JOURNAL_MAX_DISKS) {
    set_err(err, errlen, "journal %s: point %llu for %u disks: invalid (point >= 1, 1..%u disks)",
            path ? path : "(null)", (ull)point_id, ndisks, JOURNAL_MAX_DISKS);
    errno = EINVAL;
    return NULL;
  }
  struct journal_writer *w = calloc(1, sizeof *w);
  if (!w || !(w->path = strdup(path)) || asprintf(&w->tmp_path, "%s.tmp", path) < 0) {
    if (w) {
      w->tmp_path = NULL;   /* asprintf leaves it undefined on failure */
      free(w->path);
      free(w);
    }
    set_err(err, errlen, "journal %s: out of memory", path);
    errno = ENOMEM;
    return NULL;
  }
  pthread_mutex_init(&w->lock, NULL);
  pthread_cond_init(&w->idle, NULL);
  w->point_id = point_id;
  w->ndisks = ndisks;
  w->fd = open(w->tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (w->fd < 0) {
    int e = errno;
    set_err(err, errlen, "journal: cannot create %s: %s", w->tmp_path, strerror(e));
    writer_free(w);
    errno = e;
    return NULL;
  }
  uint8_t hdr[JOURNAL_HEADER_SIZE];
  header_build(hdr, point_id, time_ns, ndisks);
  if (pwrite_full(w->fd, hdr, sizeof hdr, 0) < 0) {
    int e = errno;
    set_err(err, errlen, "journal: cannot write the header of %s: %s", w->tmp_path, strerror(e));
    close(w->fd);
    unlink(w->tmp_path);
    writer_free(w);
    errno = e;
    return NULL;
  }
  w->hdr_csum = get64(hdr + HDR_CSUM_OFF);
  w->chain = w->hdr_csum;
  w->next_off = JOURNAL_HEADER_SIZE;
  return w;
}

static bool all_zero(const uint8_t *p, size_t n)
{
  return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* Writes header + data at off, whole (pwritev, again after a short write).
 * Returns 0 or -errno. */
static int pwrite_entry(int fd, const uint8_t *hdr, const void *data, size_t dlen, uint64_t off)
{
  struct iovec iov[2] = {
    { .iov_base = (void *)hdr, .iov_len = JOURNAL_ENTRY_HEADER_SIZE },
    { .iov_base = (void *)data, .iov_len = dlen },
  };
  struct iovec *v = iov;
  int n = dlen ? 2 : 1;
  while (n > 0) {
    ssize_t r = pwritev(fd, v, n, (off_t)off);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    if (r == 0)
      return -EIO;
    off += (uint64_t)r;
    while (n > 0 && (size_t)r >= v->iov_len) {
      r -= (ssize_t)v->iov_len;
      v++;
      n--;
    }
    if (n > 0) {
      v->iov_base = (uint8_t *)v->iov_base + r;
      v->iov_len -= (size_t)r;
    }
  }
  return 0;
}

int journal_append(struct journal_writer *w, unsigned kind, unsigned disk, uint64_t off,
                   uint64_t len, const void *data)
{
  if (!w || !kind_is_valid(kind) || disk >= w->ndisks || len == 0 || len > JOURNAL_MAX_ENTRY ||
      off > UINT64_MAX - len || (kind != JOURNAL_KIND_ZERO && !data) ||
      (kind == JOURNAL_KIND_STATE && (disk != 0 || off != 0)))
    return -EINVAL;
  if (kind == JOURNAL_KIND_DATA && all_zero(data, (size_t)len))
    kind = JOURNAL_KIND_ZERO;
  size_t dlen = kind == JOURNAL_KIND_ZERO ? 0 : (size_t)len;

  uint8_t hdr[JOURNAL_ENTRY_HEADER_SIZE];
  put32(hdr, kind);
  put32(hdr + 4, disk);
  put64(hdr + 8, off);
  put64(hdr + 16, len);
  uint64_t csum = entry_csum(hdr, data, dlen, w->point_id);
  put64(hdr + ENT_CSUM_OFF, csum);

  pthread_mutex_lock(&w->lock);
  if (w->error) {
    int e = w->error;
    pthread_mutex_unlock(&w->lock);
    return e;
  }
  if (kind == JOURNAL_KIND_STATE) {
    if (w->has_state) {
      pthread_mutex_unlock(&w->lock);
      return -EEXIST;
    }
    w->has_state = true;
  }
  uint64_t at = w->next_off;
  __atomic_store_n(&w->next_off, at + JOURNAL_ENTRY_HEADER_SIZE + dlen, __ATOMIC_RELAXED);
  w->entries++;
  w->data_bytes += dlen;
  w->chain = chain_step(w->chain, csum);
  w->inflight++;
  pthread_mutex_unlock(&w->lock);

  int r = pwrite_entry(w->fd, hdr, data, dlen, at);

  pthread_mutex_lock(&w->lock);
  if (r < 0 && !w->error)
    w->error = r;
  if (--w->inflight == 0)
    pthread_cond_broadcast(&w->idle);
  pthread_mutex_unlock(&w->lock);
  return r;
}

uint64_t journal_writer_bytes(const struct journal_writer *w)
{
  return __atomic_load_n(&w->next_off, __ATOMIC_RELAXED);
}

void journal_abort(struct journal_writer *w)
{
  if (!w)
    return;
  pthread_mutex_lock(&w->lock);
  while (w->inflight)
    pthread_cond_wait(&w->idle, &w->lock);
  pthread_mutex_unlock(&w->lock);
  close(w->fd);
  unlink(w->tmp_path);
  writer_free(w);
}

int journal_seal(struct journal_writer *w, char *err, size_t errlen)
{
  if (!w) {
    set_err(err, errlen, "journal_seal: no writer");
    return -EINVAL;
  }
  pthread_mutex_lock(&w->lock);
  while (w->inflight)
    pthread_cond_wait(&w->idle, &w->lock);
  int r = w->error;
  uint64_t at = w->next_off;
  uint8_t trl[JOURNAL_TRAILER_SIZE];
  trailer_build(trl, w->entries, w->data_bytes, w->chain, w->point_id);
  pthread_mutex_unlock(&w->lock);

  const char *what;
  int fd;
  if (r) {
    what = "an append failed";
    goto fail;
  }
  what = "cannot write the trailer";
  if (pwrite_full(w->fd, trl, sizeof trl, (off_t)at) < 0)
    goto fail_errno;
  what = "cannot sync";
  if (fdatasync(w->fd) < 0)
    goto fail_errno;
  what = "cannot close";
  fd = w->fd;
  w->fd = -1;
  if (close(fd) < 0)
    goto fail_errno;
  what = "cannot rename it into place";
  if (rename(w->tmp_path, w->path) < 0)
    goto fail_errno;
  if (fsync_parent_dir(w->path) < 0) {
    r = errno ? -errno : -EIO;
    set_err(err, errlen, "journal %s: sealed, but cannot sync its directory: %s", w->path,
            strerror(-r));
    writer_free(w);
    return r;
  }
  writer_free(w);
  return 0;

fail_errno:
  r = errno ? -errno : -EIO;
fail:
  set_err(err, errlen, "journal %s: %s: %s", w->tmp_path, what, strerror(-r));
  if (w->fd >= 0)
    close(w->fd);
  unlink(w->tmp_path);
  writer_free(w);
  return r;
}

/* ---- reader ----
 * One walk over a journal, from memory or from a file, optionally calling fn
 * for each entry once it is checked.  Check = walk without fn; apply = walk
 * without fn, then walk with it. */

struct src {
  const uint8_t *mem;                  /* the journal in memory, or NULL: fd */
  int fd;
  uint64_t size;                       /* bytes of journal */
  uint8_t *buf;                        /* fd: the one data buffer */
  size_t cap;                          /* its size, <= JOURNAL_MAX_ENTRY */
};

/* Makes *out point at len bytes at off (off + len <= size was checked): into
 * the memory, or read into the buffer (small: into `small`, which has room
 * for len).  A file that ends early (it shrank) reads as -EIO, not as zeros. */
static int src_get(struct src *s, uint64_t off, size_t len, uint8_t *small, const uint8_t **out,
                   char *err, size_t errlen)
{
  if (s->mem) {
    *out = s->mem + off;
    return 0;
  }
  uint8_t *dst = small;
  if (!dst) {
    if (len > s->cap) {
      size_t cap = s->cap ? s->cap : 65536;
      while (cap < len)
        cap *= 2;
      if (cap > JOURNAL_MAX_ENTRY)
        cap = JOURNAL_MAX_ENTRY;
      uint8_t *nb = realloc(s->buf, cap);
      if (!nb) {
        set_err(err, errlen, "out of memory for a %zu-byte entry", len);
        return -ENOMEM;
      }
      s->buf = nb;
      s->cap = cap;
    }
    dst = s->buf;
  }
  size_t done = 0;
  while (done < len) {
    ssize_t r = pread(s->fd, dst + done, len - done, (off_t)(off + done));
    if (r < 0) {
      if (errno == EINTR)
        continue;
      int e = errno;
      set_err(err, errlen, "read at byte %llu: %s", (ull)(off + done), strerror(e));
      return -e;
    }
    if (r == 0) {
      set_err(err, errlen, "read at byte %llu: the file ended early (changed while read?)",
              (ull)(off + done));
      return -EIO;
    }
    done += (size_t)r;
  }
  *out = dst;
  return 0;
}

static int check_header(struct src *s, unsigned ndisks_expected, struct journal_info *ji,
                        uint64_t *hdr_csum, char *err, size_t errlen)
{
  if (s->size < JOURNAL_HEADER_SIZE) {
    set_err(err, errlen, "truncated: %llu bytes, shorter than the %u-byte header",
            (ull)s->size, JOURNAL_HEADER_SIZE);
    return -EPROTO;
  }
  uint8_t small[JOURNAL_HEADER_SIZE];
  const uint8_t *h;
  int r = src_get(s, 0, JOURNAL_HEADER_SIZE, small, &h, err, errlen);
  if (r < 0)
    return r;
  if (memcmp(h, JOURNAL_MAGIC, 8) != 0) {
    set_err(err, errlen, "header at byte 0: bad magic, not a write-back journal");
    return -EPROTO;
  }
  uint32_t version = get32(h + 8);
  if (version != JOURNAL_VERSION) {
    set_err(err, errlen, "header at byte 0: version %u not supported (only %u)", version,
            JOURNAL_VERSION);
    return -EPROTO;
  }
  if (get64(h + HDR_CSUM_OFF) != XXH64(h, HDR_CSUM_OFF, 0)) {
    set_err(err, errlen, "header at byte 0: checksum mismatch");
    return -EBADMSG;
  }
  uint32_t hsize = get32(h + 12), esize = get32(h + 16), ndisks = get32(h + 20);
  if (hsize != JOURNAL_HEADER_SIZE || esize != JOURNAL_ENTRY_HEADER_SIZE) {
    set_err(err, errlen, "header at byte 0: header/entry sizes %u/%u, expected %u/%u", hsize,
            esize, JOURNAL_HEADER_SIZE, JOURNAL_ENTRY_HEADER_SIZE);
    return -EPROTO;
  }
  if (ndisks == 0 || ndisks > JOURNAL_MAX_DISKS) {
    set_err(err, errlen, "header at byte 0: %u disks (1..%u)", ndisks, JOURNAL_MAX_DISKS);
    return -EPROTO;
  }
  if (ndisks_expected && ndisks != ndisks_expected) {
    set_err(err, errlen, "header at byte 0: the journal is for %u disks, expected %u", ndisks,
            ndisks_expected);
    return -EPROTO;
  }
  ji->point_id = get64(h + 24);
  ji->time_ns = get64(h + 32);
  ji->ndisks = ndisks;
  if (ji->point_id == 0) {
    set_err(err, errlen, "header at byte 0: point id 0");
    return -EPROTO;
  }
  if (get64(h + 40) || get64(h + 48)) {
    set_err(err, errlen, "header at byte 0: unknown flags or reserved bits set");
    return -EPROTO;
  }
  *hdr_csum = get64(h + HDR_CSUM_OFF);
  return 0;
}

static int check_trailer(struct src *s, uint64_t pos, const struct journal_info *ji,
                         uint64_t chain, char *err, size_t errlen)
{
  uint8_t small[JOURNAL_TRAILER_SIZE];
  const uint8_t *t;
  int r = src_get(s, pos, JOURNAL_TRAILER_SIZE, small, &t, err, errlen);
  if (r < 0)
    return r;
  if (get64(t + TRL_CSUM_OFF) != XXH64(t, TRL_CSUM_OFF, 0)) {
    set_err(err, errlen, "trailer at byte %llu: checksum mismatch", (ull)pos);
    return -EBADMSG;
  }
  uint64_t entries = get64(t + 8), data_bytes = get64(t + 16), point = get64(t + 32);
  if (point != ji->point_id) {
    set_err(err, errlen, "trailer at byte %llu: point %llu, the header says %llu", (ull)pos,
            (ull)point, (ull)ji->point_id);
    return -EPROTO;
  }
  if (entries != ji->entries) {
    set_err(err, errlen, "trailer at byte %llu: says %llu entries, the file has %llu",
            (ull)pos, (ull)entries, (ull)ji->entries);
    return -EPROTO;
  }
  if (data_bytes != ji->data_bytes) {
    set_err(err, errlen, "trailer at byte %llu: says %llu data bytes, the entries have %llu",
            (ull)pos, (ull)data_bytes, (ull)ji->data_bytes);
    return -EPROTO;
  }
  if (get64(t + 24) != chain) {
    set_err(err, errlen, "trailer at byte %llu: chained checksum mismatch (entries missing, "
            "added, reordered or from another journal)", (ull)pos);
    return -EBADMSG;
  }
  if (s->size - pos != JOURNAL_TRAILER_SIZE) {
    set_err(err, errlen, "trailing garbage: %llu bytes after the trailer at byte %llu",
            (ull)(s->size - pos - JOURNAL_TRAILER_SIZE), (ull)pos);
    return -EPROTO;
  }
  return 0;
}

/* How messages name entry number ji.entries, at byte pos. */
#define ENT_FMT "entry %llu at byte %llu"
#define ENT_ARGS (ull)ji.entries, (ull)pos

static int walk(struct src *s, const uint64_t *disk_sizes, unsigned ndisks_expected,
                journal_apply_fn fn, void *opaque, struct journal_info *info, char *err,
                size_t errlen)
{
  if (ndisks_expected > JOURNAL_MAX_DISKS || (disk_sizes && !ndisks_expected)) {
    set_err(err, errlen, "journal check: %u disks expected, disk sizes %s: invalid arguments",
            ndisks_expected, disk_sizes ? "given" : "absent");
    return -EINVAL;
  }
  struct journal_info ji = { .file_bytes = s->size };
  uint64_t chain;
  int r = check_header(s, ndisks_expected, &ji, &chain, err, errlen);
  if (r < 0)
    return r;
  uint64_t pos = JOURNAL_HEADER_SIZE;
  uint64_t state_at = 0;
  for (;;) {
    uint64_t left = s->size - pos;
    if (left == 0) {
      set_err(err, errlen, "truncated: no trailer (the file ends at byte %llu after %llu entries)",
              (ull)pos, (ull)ji.entries);
      return -EPROTO;
    }
    uint8_t small[JOURNAL_ENTRY_HEADER_SIZE];
    const uint8_t *e;
    size_t n = left < JOURNAL_ENTRY_HEADER_SIZE ? (size_t)left : JOURNAL_ENTRY_HEADER_SIZE;
    r = src_get(s, pos, n, small, &e, err, errlen);
    if (r < 0)
      return r;
    if (memcmp(e, JOURNAL_TRAILER_MAGIC, n < 8 ? n : 8) == 0) {
      if (left < JOURNAL_TRAILER_SIZE) {
        set_err(err, errlen, "truncated: no trailer (%llu of its %u bytes at byte %llu)",
                (ull)left, JOURNAL_TRAILER_SIZE, (ull)pos);
        return -EPROTO;
      }
      r = check_trailer(s, pos, &ji, chain, err, errlen);
      if (r < 0)
        return r;
      break;
    }
    if (left < JOURNAL_ENTRY_HEADER_SIZE) {
      set_err(err, errlen, ENT_FMT ": truncated: %llu of its %u header bytes", ENT_ARGS,
              (ull)left, JOURNAL_ENTRY_HEADER_SIZE);
      return -EPROTO;
    }
    uint32_t kind = get32(e), disk = get32(e + 4);
    uint64_t off = get64(e + 8), len = get64(e + 16), csum = get64(e + ENT_CSUM_OFF);
    if (!kind_is_valid(kind)) {
      set_err(err, errlen, ENT_FMT ": unknown kind %u", ENT_ARGS, kind);
      return -EPROTO;
    }
    if (disk >= ji.ndisks) {
      set_err(err, errlen, ENT_FMT ": disk %u out of range (the journal has %u disks)", ENT_ARGS,
              disk, ji.ndisks);
      return -EPROTO;
    }
    if (len == 0 || len > JOURNAL_MAX_ENTRY) {
      set_err(err, errlen, ENT_FMT ": length %llu not in 1..%u", ENT_ARGS, (ull)len,
              JOURNAL_MAX_ENTRY);
      return -EPROTO;
    }
    if (kind == JOURNAL_KIND_STATE) {
      if (disk != 0 || off != 0) {
        set_err(err, errlen, ENT_FMT ": STATE at disk %u offset %llu (must be 0, 0)", ENT_ARGS,
                disk, (ull)off);
        return -EPROTO;
      }
      if (state_at) {
        set_err(err, errlen, ENT_FMT ": a second STATE entry (the first at byte %llu)", ENT_ARGS,
                (ull)state_at);
        return -EPROTO;
      }
      state_at = pos;
    } else if (off > UINT64_MAX - len) {
      set_err(err, errlen, ENT_FMT ": %s range %llu+%llu overflows", ENT_ARGS,
              journal_kind_name(kind), (ull)off, (ull)len);
      return -EPROTO;
    } else if (disk_sizes && off + len > disk_sizes[disk]) {
      set_err(err, errlen, ENT_FMT ": %s range %llu+%llu beyond the end of disk %u (%llu bytes)",
              ENT_ARGS, journal_kind_name(kind), (ull)off, (ull)len, disk,
              (ull)disk_sizes[disk]);
      return -EPROTO;
    }
    size_t dlen = kind == JOURNAL_KIND_ZERO ? 0 : (size_t)len;
    if (left - JOURNAL_ENTRY_HEADER_SIZE < dlen) {
      set_err(err, errlen, ENT_FMT ": truncated: %llu of its %zu data bytes", ENT_ARGS,
              (ull)(left - JOURNAL_ENTRY_HEADER_SIZE), dlen);
      return -EPROTO;
    }
    /* The header is copied out before the data read reuses the buffer. */
    uint8_t hdr[JOURNAL_ENTRY_HEADER_SIZE];
    memcpy(hdr, e, sizeof hdr);
    const uint8_t *data = NULL;
    if (dlen) {
      r = src_get(s, pos + JOURNAL_ENTRY_HEADER_SIZE, dlen, NULL, &data, err, errlen);
      if (r < 0)
        return r;
    }
    if (entry_csum(hdr, data, dlen, ji.point_id) != csum) {
      set_err(err, errlen, ENT_FMT ": checksum mismatch", ENT_ARGS);
      return -EBADMSG;
    }
    if (fn) {
      r = fn(opaque, kind, disk, off, len, data);
      if (r) {
        set_err(err, errlen, ENT_FMT ": applying %s disk %u %llu+%llu failed: %s", ENT_ARGS,
                journal_kind_name(kind), disk, (ull)off, (ull)len,
                r < 0 ? strerror(-r) : "stopped by the caller");
        return r;
      }
    }
    chain = chain_step(chain, csum);
    ji.entries++;
    ji.data_bytes += dlen;
    if (kind == JOURNAL_KIND_STATE)
      ji.state_bytes = len;
    pos += JOURNAL_ENTRY_HEADER_SIZE + dlen;
  }
  if (info)
    *info = ji;
  return 0;
}

static int src_open_fd(struct src *s, int fd, char *err, size_t errlen)
{
  struct stat st;
  memset(s, 0, sizeof *s);
  s->fd = fd;
  if (fstat(fd, &st) < 0) {
    int e = errno;
    set_err(err, errlen, "cannot stat the journal: %s", strerror(e));
    return -e;
  }
  if (!S_ISREG(st.st_mode)) {
    set_err(err, errlen, "the journal is not a regular file");
    return -EINVAL;
  }
  s->size = (uint64_t)st.st_size;
  return 0;
}

int journal_check_fd(int fd, const uint64_t *disk_sizes, unsigned ndisks_expected,
                     struct journal_info *info, char *err, size_t errlen)
{
  return journal_apply_fd(fd, disk_sizes, ndisks_expected, NULL, NULL, info, err, errlen);
}

int journal_check_buffer(const void *buf, size_t len, const uint64_t *disk_sizes,
                         unsigned ndisks_expected, struct journal_info *info, char *err,
                         size_t errlen)
{
  return journal_apply_buffer(buf, len, disk_sizes, ndisks_expected, NULL, NULL, info, err,
                              errlen);
}

/* Check, then (with fn) apply: the same walk twice. */
static int check_then_apply(struct src *s, const uint64_t *disk_sizes, unsigned ndisks_expected,
                            journal_apply_fn fn, void *opaque, struct journal_info *info,
                            char *err, size_t errlen)
{
  struct journal_info ji;
  int r = walk(s, disk_sizes, ndisks_expected, NULL, NULL, &ji, err, errlen);
  if (r == 0 && fn)
    r = walk(s, disk_sizes, ndisks_expected, fn, opaque, NULL, err, errlen);
  if (r == 0 && info)
    *info = ji;
  return r;
}

int journal_apply_fd(int fd, const uint64_t *disk_sizes, unsigned ndisks_expected,
                     journal_apply_fn fn, void *opaque, struct journal_info *info, char *err,
                     size_t errlen)
{
  struct src s;
  int r = src_open_fd(&s, fd, err, errlen);
  if (r == 0)
    r = check_then_apply(&s, disk_sizes, ndisks_expected, fn, opaque, info, err, errlen);
  free(s.buf);
  return r;
}

int journal_apply_buffer(const void *buf, size_t len, const uint64_t *disk_sizes,
                         unsigned ndisks_expected, journal_apply_fn fn, void *opaque,
                         struct journal_info *info, char *err, size_t errlen)
{
  if (!buf && len) {
    set_err(err, errlen, "journal check: no buffer");
    return -EINVAL;
  }
  static const uint8_t empty[1];
  struct src s = { .mem = buf ? buf : empty, .fd = -1, .size = len };
  return check_then_apply(&s, disk_sizes, ndisks_expected, fn, opaque, info, err, errlen);
}

int journal_apply_file(const char *path, const uint64_t *disk_sizes, unsigned ndisks_expected,
                       journal_apply_fn fn, void *opaque, struct journal_info *info, char *err,
                       size_t errlen)
{
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    set_err(err, errlen, "cannot open %s: %s", path, strerror(e));
    return -e;
  }
  char msg[256] = "";
  int r = journal_apply_fd(fd, disk_sizes, ndisks_expected, fn, opaque, info, msg, sizeof msg);
  close(fd);
  if (r)
    set_err(err, errlen, "%s: %s", path, msg);
  return r;
}
