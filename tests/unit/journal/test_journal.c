/* test_journal: the write-back journal (src/cache/journal.c).
 *   - many threads append DATA (some all zero: stored as ZERO), ZERO and
 *     overlapping rewrites, plus a STATE entry; seal; check (fd and buffer)
 *     gives the counts; apply into an in-memory image equals the expected
 *     image; applying twice changes nothing
 *   - the format: a journal built here by an independent encoder of the
 *     documented layout is byte for byte what the writer makes
 *   - damage, each refused with a message and no entry applied: truncation at
 *     every byte (buffer and file), every single bit flipped, bad kind, disk
 *     out of range, offset beyond the disk or overflowing, length 0 or over
 *     the limit, trailing garbage, wrong entry / byte counts, entries
 *     reordered or dropped, a second STATE, header fields (version, ndisks,
 *     flags, point), a trailer of another point, an unsealed .tmp
 *   - the writer: argument checks, abort unlinks the .tmp, seal leaves no
 *     .tmp; apply stops at the callback's error
 * Works in its own temporary directory. */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "cache/journal.h"
#include "common/util.h"

#include "check.h"

static char dir[256];

static void path_of(char *buf, size_t len, const char *name)
{
  snprintf(buf, len, "%s/%s", dir, name);
}

static uint8_t *read_whole(const char *path, size_t *len)
{
  int fd = open(path, O_RDONLY);
  CHECK(fd >= 0);
  if (fd < 0)
    return NULL;
  struct stat st;
  fstat(fd, &st);
  uint8_t *b = malloc(st.st_size ? st.st_size : 1);
  CHECK(read_full(fd, b, st.st_size) == 0 || st.st_size == 0);
  close(fd);
  *len = st.st_size;
  return b;
}

static void write_whole(const char *path, const void *buf, size_t len)
{
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  CHECK(fd >= 0);
  CHECK(write_full(fd, buf, len) == 0);
  close(fd);
}

static bool file_exists(const char *path)
{
  return access(path, F_OK) == 0;
}

static bool info_eq(const struct journal_info *a, const struct journal_info *b)
{
  return a->point_id == b->point_id && a->time_ns == b->time_ns && a->entries == b->entries &&
         a->data_bytes == b->data_bytes && a->file_bytes == b->file_bytes &&
         a->state_bytes == b->state_bytes && a->ndisks == b->ndisks;
}

/* ---- an in-memory image to apply into ---- */

#define NDISKS 3
#define DISK_SIZE (1u << 20)

struct image {
  uint64_t sizes[NDISKS];
  uint8_t *disk[NDISKS];
  uint8_t state[4096];
  uint64_t state_len;
  unsigned calls, zero_calls, data_calls, state_calls;
  unsigned fail_at;                   /* return -EIO at this call (1-based; 0: never) */
  int bad;                            /* the callback saw something impossible */
};

static void image_init(struct image *im, uint8_t fill)
{
  memset(im, 0, sizeof *im);
  for (unsigned d = 0; d < NDISKS; d++) {
    im->sizes[d] = DISK_SIZE;
    im->disk[d] = malloc(DISK_SIZE);
    memset(im->disk[d], fill, DISK_SIZE);
  }
}

static void image_free(struct image *im)
{
  for (unsigned d = 0; d < NDISKS; d++)
    free(im->disk[d]);
}

static int apply_cb(void *opaque, unsigned kind, unsigned disk, uint64_t off, uint64_t len,
                    const void *data)
{
  struct image *im = opaque;
  im->calls++;
  if (im->fail_at && im->calls == im->fail_at)
    return -EIO;
  switch (kind) {
  case JOURNAL_KIND_DATA:
  case JOURNAL_KIND_ZERO:
    if (disk >= NDISKS || off > DISK_SIZE || len > DISK_SIZE - off ||
        (kind == JOURNAL_KIND_DATA) != (data != NULL)) {
      im->bad++;
      return -EINVAL;
    }
    if (data)
      memcpy(im->disk[disk] + off, data, len);
    else
      memset(im->disk[disk] + off, 0, len);
    if (data)
      im->data_calls++;
    else
      im->zero_calls++;
    return 0;
  case JOURNAL_KIND_STATE:
    if (disk || off || !data || len > sizeof im->state) {
      im->bad++;
      return -EINVAL;
    }
    memcpy(im->state, data, len);
    im->state_len = len;
    im->state_calls++;
    return 0;
  default:
    im->bad++;
    return -EINVAL;
  }
}

/* ---- many writers ---- */

#define NTHREADS 6
#define PER_THREAD 300
#define STRIPE 4096                   /* thread t owns [t * STRIPE, (t + 1) * STRIPE) of every 64 KiB */

struct writer_arg {
  struct journal_writer *w;
  struct image *expect;               /* each thread writes only the bytes it owns */
  unsigned t;
  unsigned zero_data, zeros, datas;   /* what it appended */
  uint64_t data_bytes;
  int errors;
};

static void *writer_thread(void *p)
{
  struct writer_arg *a = p;
  unsigned seed = 1234 + a->t;
  uint8_t buf[STRIPE];
  for (unsigned i = 0; i < PER_THREAD; i++) {
    unsigned disk = rand_r(&seed) % NDISKS;
    uint64_t chunk = rand_r(&seed) % (DISK_SIZE / 65536);
    uint64_t in = rand_r(&seed) % STRIPE;
    uint64_t len = 1 + rand_r(&seed) % (STRIPE - in);
    uint64_t off = chunk * 65536 + a->t * STRIPE + in;
    unsigned what = rand_r(&seed) % 10;
    unsigned kind = JOURNAL_KIND_DATA;
    if (what < 2) {                   /* data that happens to be all zero */
      memset(buf, 0, len);
      a->zero_data++;
    } else if (what < 4) {            /* an explicit ZERO, no buffer */
      kind = JOURNAL_KIND_ZERO;
      a->zeros++;
    } else {
      for (uint64_t k = 0; k < len; k++)
        buf[k] = (uint8_t)(rand_r(&seed) | 1);
      a->datas++;
      a->data_bytes += len;
    }
    int r = journal_append(a->w, kind, disk, off, len, kind == JOURNAL_KIND_ZERO ? NULL : buf);
    if (r)
      a->errors++;
    if (kind == JOURNAL_KIND_ZERO)
      memset(a->expect->disk[disk] + off, 0, len);
    else
      memcpy(a->expect->disk[disk] + off, buf, len);
  }
  return NULL;
}

static void test_threads(void)
{
  char path[300], tmp[310];
  path_of(path, sizeof path, "threads.wbj");
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  char err[256] = "";
  uint64_t t0 = realtime_ns();
  struct journal_writer *w = journal_create(path, 42, t0, NDISKS, err, sizeof err);
  CHECK(w != NULL);
  if (!w) {
    fprintf(stderr, "journal_create: %s\n", err);
    return;
  }
  CHECK(file_exists(tmp) && !file_exists(path));
  CHECK(journal_writer_bytes(w) == JOURNAL_HEADER_SIZE);

  struct image expect;
  image_init(&expect, 0xAA);
  struct writer_arg args[NTHREADS];
  pthread_t th[NTHREADS];
  for (unsigned t = 0; t < NTHREADS; t++) {
    args[t] = (struct writer_arg){ .w = w, .expect = &expect, .t = t };
    pthread_create(&th[t], NULL, writer_thread, &args[t]);
  }
  uint8_t state[1000];
  for (unsigned i = 0; i < sizeof state; i++)
    state[i] = (uint8_t)(i * 7 + 3);
  CHECK(journal_append(w, JOURNAL_KIND_STATE, 0, 0, sizeof state, state) == 0);
  CHECK(journal_append(w, JOURNAL_KIND_STATE, 0, 0, sizeof state, state) == -EEXIST);
  memcpy(expect.state, state, sizeof state);
  expect.state_len = sizeof state;

  unsigned zero_data = 0, zeros = 0, datas = 0;
  uint64_t data_bytes = sizeof state;
  for (unsigned t = 0; t < NTHREADS; t++) {
    pthread_join(th[t], NULL);
    CHECK(args[t].errors == 0);
    zero_data += args[t].zero_data;
    zeros += args[t].zeros;
    datas += args[t].datas;
    data_bytes += args[t].data_bytes;
  }
  uint64_t entries = NTHREADS * PER_THREAD + 1;
  uint64_t bytes = journal_writer_bytes(w);
  CHECK(bytes == JOURNAL_HEADER_SIZE + entries * JOURNAL_ENTRY_HEADER_SIZE + data_bytes);
  int r = journal_seal(w, err, sizeof err);
  CHECK(r == 0);
  if (r)
    fprintf(stderr, "journal_seal: %s\n", err);
  CHECK(file_exists(path) && !file_exists(tmp));

  struct stat st;
  CHECK(stat(path, &st) == 0 && (uint64_t)st.st_size == bytes + JOURNAL_TRAILER_SIZE);

  /* Check from the file and from memory: the same info. */
  struct journal_info info, info2;
  int fd = open(path, O_RDONLY);
  r = journal_check_fd(fd, expect.sizes, NDISKS, &info, err, sizeof err);
  CHECK(r == 0);
  if (r)
    fprintf(stderr, "journal_check_fd: %s\n", err);
  close(fd);
  CHECK(info.point_id == 42 && info.time_ns == t0 && info.ndisks == NDISKS);
  CHECK(info.entries == entries);
  CHECK(info.data_bytes == data_bytes);
  CHECK(info.file_bytes == (uint64_t)st.st_size);
  CHECK(info.state_bytes == sizeof state);
  size_t len;
  uint8_t *buf = read_whole(path, &len);
  r = journal_check_buffer(buf, len, expect.sizes, NDISKS, &info2, err, sizeof err);
  CHECK(r == 0);
  CHECK(info_eq(&info, &info2));
  CHECK(journal_check_buffer(buf, len, NULL, 0, NULL, err, sizeof err) == 0);
  CHECK(journal_check_buffer(buf, len, NULL, NDISKS + 1, NULL, err, sizeof err) == -EPROTO);

  /* Apply over a different pattern: every byte written equals the expected
   * image (ZERO entries must zero), the rest is untouched (0xAA in both). */
  struct image im;
  image_init(&im, 0xAA);
  r = journal_apply_file(path, im.sizes, NDISKS, apply_cb, &im, &info2, err, sizeof err);
  CHECK(r == 0);
  if (r)
    fprintf(stderr, "journal_apply_file: %s\n", err);
  CHECK(im.bad == 0);
  CHECK(im.calls == entries);
  CHECK(im.state_calls == 1 && im.state_len == sizeof state);
  CHECK(memcmp(im.state, state, sizeof state) == 0);
  CHECK(im.zero_calls == zero_data + zeros);  /* all-zero DATA was stored as ZERO */
  CHECK(im.data_calls == datas);
  for (unsigned d = 0; d < NDISKS; d++)
    CHECK(memcmp(im.disk[d], expect.disk[d], DISK_SIZE) == 0);
  CHECK(info_eq(&info, &info2));

  /* A replay (crash while applying) gives the same images. */
  im.calls = 0;
  CHECK(journal_apply_buffer(buf, len, im.sizes, NDISKS, apply_cb, &im, NULL, err, sizeof err) == 0);
  CHECK(im.calls == entries);
  for (unsigned d = 0; d < NDISKS; d++)
    CHECK(memcmp(im.disk[d], expect.disk[d], DISK_SIZE) == 0);

  /* The callback's error stops the apply and is returned, naming the entry. */
  struct image im2;
  image_init(&im2, 0);
  im2.fail_at = 5;
  r = journal_apply_file(path, im2.sizes, NDISKS, apply_cb, &im2, NULL, err, sizeof err);
  CHECK(r == -EIO);
  CHECK(im2.calls == 5);
  CHECK(strstr(err, "entry 4 at byte") != NULL);
  image_free(&im2);

  /* A disk smaller than the entries: refused before any entry is applied. */
  image_init(&im2, 0);
  uint64_t small_sizes[NDISKS] = { DISK_SIZE, DISK_SIZE / 2, DISK_SIZE };
  r = journal_apply_file(path, small_sizes, NDISKS, apply_cb, &im2, NULL, err, sizeof err);
  CHECK(r == -EPROTO);
  CHECK(im2.calls == 0);
  CHECK(strstr(err, "beyond the end of disk 1") != NULL);
  image_free(&im2);

  free(buf);
  image_free(&im);
  image_free(&expect);
}

/* ---- an independent encoder of the documented format ---- */

struct rent {
  uint32_t kind, disk;
  uint64_t off, len;
  const void *data;                   /* dlen bytes written after the header */
  size_t dlen;
};

struct raw_opts {
  uint32_t version, ndisks, hsize, esize;
  uint64_t flags, point, trailer_point;
  int64_t entries_delta, bytes_delta;
  bool bad_chain;                     /* the chain as if entries 0 and 1 were swapped */
  size_t garbage;                     /* bytes after the trailer */
  bool no_trailer;
};

static void p32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static void p64(uint8_t *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }

static uint64_t chain_next(uint64_t c, uint64_t csum)
{
  uint8_t b[16];
  p64(b, c);
  p64(b + 8, csum);
  return XXH64(b, 16, 0);
}

/* Builds a journal into a malloc'd buffer; *len its size. */
static uint8_t *raw_build(const struct raw_opts *o, const struct rent *e, unsigned n, size_t *len)
{
  size_t size = JOURNAL_HEADER_SIZE + JOURNAL_TRAILER_SIZE + o->garbage;
  for (unsigned i = 0; i < n; i++)
    size += JOURNAL_ENTRY_HEADER_SIZE + e[i].dlen;
  uint8_t *b = calloc(1, size);
  memcpy(b, "FERRYWBJ", 8);
  p32(b + 8, o->version ? o->version : 1);
  p32(b + 12, o->hsize ? o->hsize : 64);
  p32(b + 16, o->esize ? o->esize : 32);
  p32(b + 20, o->ndisks);
  p64(b + 24, o->point);
  p64(b + 32, 1700000000000000000ull);
  p64(b + 40, o->flags);
  p64(b + 56, XXH64(b, 56, 0));
  uint64_t chain = XXH64(b, 56, 0), data_bytes = 0;
  uint64_t csums[64];
  size_t pos = 64;
  for (unsigned i = 0; i < n; i++) {
    uint8_t *h = b + pos;
    p32(h, e[i].kind);
    p32(h + 4, e[i].disk);
    p64(h + 8, e[i].off);
    p64(h + 16, e[i].len);
    if (e[i].dlen)
      memcpy(h + 32, e[i].data, e[i].dlen);
    XXH64_state_t *st = XXH64_createState();
    XXH64_reset(st, o->point);
    XXH64_update(st, h, 24);
    XXH64_update(st, h + 32, e[i].dlen);
    csums[i] = XXH64_digest(st);
    XXH64_freeState(st);
    p64(h + 24, csums[i]);
    pos += 32 + e[i].dlen;
    data_bytes += e[i].dlen;
  }
  if (o->bad_chain && n >= 2) {
    uint64_t t = csums[0];
    csums[0] = csums[1];
    csums[1] = t;
  }
  for (unsigned i = 0; i < n; i++)
    chain = chain_next(chain, csums[i]);
  if (!o->no_trailer) {
    uint8_t *t = b + pos;
    memcpy(t, "FERRYWBT", 8);
    p64(t + 8, n + o->entries_delta);
    p64(t + 16, data_bytes + o->bytes_delta);
    p64(t + 24, chain);
    p64(t + 32, o->trailer_point ? o->trailer_point : o->point);
    p64(t + 40, XXH64(t, 40, 0));
    pos += JOURNAL_TRAILER_SIZE;
    memset(b + pos, 0x5A, o->garbage);
    pos += o->garbage;
  }
  *len = pos;
  return b;
}

static const uint8_t payload_a[] = "hello, journal";
static const uint8_t payload_b[] = { 1, 2, 3, 4, 5, 6, 7, 8, 9 };
static const uint8_t state_blob[] = "vm state blob";

/* The small journal used for the damage loops: 5 entries of every kind. */
static const struct rent small_entries[] = {
  { JOURNAL_KIND_DATA, 0, 4096, sizeof payload_a, payload_a, sizeof payload_a },
  { JOURNAL_KIND_ZERO, 1, 65536, 131072, NULL, 0 },
  { JOURNAL_KIND_DATA, 2, 100, sizeof payload_b, payload_b, sizeof payload_b },
  { JOURNAL_KIND_STATE, 0, 0, sizeof state_blob, state_blob, sizeof state_blob },
  { JOURNAL_KIND_DATA, 0, 4100, sizeof payload_b, payload_b, sizeof payload_b },
};
static const struct raw_opts small_opts = { .ndisks = NDISKS, .point = 7 };
static const uint64_t sizes3[NDISKS] = { DISK_SIZE, DISK_SIZE, DISK_SIZE };

/* The writer makes exactly the documented bytes. */
static void test_format(void)
{
  char path[300], err[256] = "";
  path_of(path, sizeof path, "format.wbj");
  struct journal_writer *w = journal_create(path, 7, 1700000000000000000ull, NDISKS, err,
                                            sizeof err);
  CHECK(w != NULL);
  if (!w)
    return;
  for (unsigned i = 0; i < ARRAY_SIZE(small_entries); i++) {
    const struct rent *e = &small_entries[i];
    CHECK(journal_append(w, e->kind, e->disk, e->off, e->len, e->data) == 0);
  }
  CHECK(journal_seal(w, err, sizeof err) == 0);
  size_t len, rlen;
  uint8_t *got = read_whole(path, &len);
  uint8_t *want = raw_build(&small_opts, small_entries, ARRAY_SIZE(small_entries), &rlen);
  CHECK(len == rlen && memcmp(got, want, len) == 0);

  /* And applying it does what the entries say, in order (the last DATA
   * overrides the first's tail). */
  struct image im;
  image_init(&im, 0xAA);
  CHECK(journal_apply_buffer(want, rlen, sizes3, NDISKS, apply_cb, &im, NULL, err, sizeof err) == 0);
  CHECK(memcmp(im.disk[0] + 4096, "hell", 4) == 0);
  CHECK(memcmp(im.disk[0] + 4100, payload_b, sizeof payload_b) == 0);
  CHECK(memcmp(im.disk[0] + 4100 + sizeof payload_b, payload_a + 4 + sizeof payload_b,
               sizeof payload_a - 4 - sizeof payload_b) == 0);
  CHECK(im.disk[1][65535] == 0xAA && im.disk[1][65536] == 0 && im.disk[1][65536 + 131071] == 0 &&
        im.disk[1][65536 + 131072] == 0xAA);
  CHECK(memcmp(im.disk[2] + 100, payload_b, sizeof payload_b) == 0);
  CHECK(im.state_len == sizeof state_blob && memcmp(im.state, state_blob, sizeof state_blob) == 0);
  image_free(&im);
  free(got);
  free(want);
}

/* Checks buf both from memory and from a file; both must refuse it with r
 * (0: any error) and a message, and an apply must call nothing. */
static void expect_refused(const uint8_t *buf, size_t len, const uint64_t *sizes, int want_r,
                           const char *want_msg, const char *what)
{
  char err[256] = "", err2[256] = "";
  int r = journal_check_buffer(buf, len, sizes, NDISKS, NULL, err, sizeof err);
  char path[300];
  path_of(path, sizeof path, "damaged.wbj");
  write_whole(path, buf, len);
  int fd = open(path, O_RDONLY);
  int r2 = journal_check_fd(fd, sizes, NDISKS, NULL, err2, sizeof err2);
  close(fd);
  struct image im;
  image_init(&im, 0);
  int r3 = journal_apply_file(path, sizes, NDISKS, apply_cb, &im, NULL, NULL, 0);
  bool ok = r < 0 && r2 == r && r3 == r && (!want_r || r == want_r) && err[0] &&
            strcmp(err, err2) == 0 && im.calls == 0 && (!want_msg || strstr(err, want_msg));
  CHECK(ok);
  if (!ok)
    fprintf(stderr, "  %s: r=%d/%d/%d calls=%u err=\"%s\" / \"%s\" (wanted %d \"%s\")\n", what, r,
            r2, r3, im.calls, err, err2, want_r, want_msg ? want_msg : "");
  image_free(&im);
}

static void test_truncated_and_flipped(void)
{
  size_t len;
  uint8_t *good = raw_build(&small_opts, small_entries, ARRAY_SIZE(small_entries), &len);
  char err[256] = "";
  CHECK(journal_check_buffer(good, len, sizes3, NDISKS, NULL, err, sizeof err) == 0);

  /* Every truncation (a fresh copy of exactly cut bytes, so ASan sees any
   * read past it). */
  int before = failures;
  for (size_t cut = 0; cut < len; cut++) {
    uint8_t *b = malloc(cut ? cut : 1);
    memcpy(b, good, cut);
    char what[64];
    snprintf(what, sizeof what, "truncated to %zu bytes", cut);
    expect_refused(b, cut, sizes3, -EPROTO, "truncated", what);
    free(b);
    if (failures > before + 5)
      break;
  }
  /* At an entry boundary it says there is no trailer. */
  size_t at_trailer = len - JOURNAL_TRAILER_SIZE;
  CHECK(journal_check_buffer(good, at_trailer, sizes3, NDISKS, NULL, err, sizeof err) == -EPROTO);
  CHECK(strstr(err, "truncated: no trailer") != NULL);

  /* Every bit of every byte. */
  before = failures;
  uint8_t *b = malloc(len);
  for (size_t i = 0; i < len && failures <= before + 5; i++) {
    for (unsigned bit = 0; bit < 8; bit++) {
      memcpy(b, good, len);
      b[i] ^= (uint8_t)(1u << bit);
      char what[64];
      snprintf(what, sizeof what, "bit %u of byte %zu flipped", bit, i);
      expect_refused(b, len, sizes3, 0, NULL, what);
    }
  }
  /* A flip in an entry's data is a checksum mismatch naming the entry. */
  memcpy(b, good, len);
  b[64 + 32 + 3] ^= 0x10;
  CHECK(journal_check_buffer(b, len, sizes3, NDISKS, NULL, err, sizeof err) == -EBADMSG);
  CHECK(strcmp(err, "entry 0 at byte 64: checksum mismatch") == 0);
  memcpy(b, good, len);
  b[60] ^= 1;
  CHECK(journal_check_buffer(b, len, sizes3, NDISKS, NULL, err, sizeof err) == -EBADMSG);
  CHECK(strstr(err, "header") != NULL);
  memcpy(b, good, len);
  b[len - 20] ^= 1;
  CHECK(journal_check_buffer(b, len, sizes3, NDISKS, NULL, err, sizeof err) == -EBADMSG);
  CHECK(strstr(err, "trailer at byte") != NULL);
  free(b);
  free(good);
}

/* One damaged variant of the small journal: entry `idx` replaced by *e (if
 * e), options changed by o. */
static void refuse_variant(const struct raw_opts *o, int idx, const struct rent *e,
                           const uint64_t *sizes, int want_r, const char *want_msg)
{
  struct rent ents[ARRAY_SIZE(small_entries)];
  memcpy(ents, small_entries, sizeof ents);
  if (e)
    ents[idx] = *e;
  size_t len;
  uint8_t *b = raw_build(o, ents, ARRAY_SIZE(ents), &len);
  expect_refused(b, len, sizes, want_r, want_msg, want_msg);
  free(b);
}

static void test_semantic_damage(void)
{
  struct raw_opts o = small_opts;
  static uint8_t big[JOURNAL_MAX_ENTRY + 1];

  /* Entries well hashed but wrong. */
  refuse_variant(&o, 2, &(struct rent){ 7, 0, 0, 8, payload_b, 8 }, sizes3, -EPROTO,
                 "entry 2 at byte 143: unknown kind 7");
  refuse_variant(&o, 2, &(struct rent){ 0, 0, 0, 8, payload_b, 8 }, sizes3, -EPROTO,
                 "unknown kind 0");
  refuse_variant(&o, 1, &(struct rent){ JOURNAL_KIND_ZERO, 3, 0, 512, NULL, 0 }, sizes3, -EPROTO,
                 "entry 1 at byte 111: disk 3 out of range");
  refuse_variant(&o, 1, &(struct rent){ JOURNAL_KIND_ZERO, 1, DISK_SIZE - 511, 512, NULL, 0 },
                 sizes3, -EPROTO, "beyond the end of disk 1");
  refuse_variant(&o, 2, &(struct rent){ JOURNAL_KIND_DATA, 2, DISK_SIZE, 1, payload_b, 1 },
                 sizes3, -EPROTO, "beyond the end of disk 2");
  refuse_variant(&o, 1, &(struct rent){ JOURNAL_KIND_ZERO, 1, UINT64_MAX - 10, 512, NULL, 0 },
                 NULL, -EPROTO, "overflows");
  refuse_variant(&o, 1, &(struct rent){ JOURNAL_KIND_ZERO, 1, 0, JOURNAL_MAX_ENTRY + 1ull, NULL, 0 },
                 NULL, -EPROTO, "length 16777217 not in 1..16777216");
  refuse_variant(&o, 1, &(struct rent){ JOURNAL_KIND_ZERO, 1, 0, 0, NULL, 0 }, sizes3, -EPROTO,
                 "length 0");
  refuse_variant(&o, 0, &(struct rent){ JOURNAL_KIND_DATA, 0, 0, UINT64_MAX, payload_a, 0 },
                 NULL, -EPROTO, "length 18446744073709551615");
  refuse_variant(&o, 0, &(struct rent){ JOURNAL_KIND_DATA, 0, 0, sizeof big, big, sizeof big },
                 NULL, -EPROTO, "length 16777217");
  /* A DATA entry whose length runs past the file. */
  refuse_variant(&o, 4, &(struct rent){ JOURNAL_KIND_DATA, 0, 0, 4096, payload_b, 9 }, sizes3,
                 -EPROTO, "truncated");
  refuse_variant(&o, 0, &(struct rent){ JOURNAL_KIND_STATE, 0, 0, 5, state_blob, 5 }, sizes3,
                 -EPROTO, "entry 3 at byte 174: a second STATE entry (the first at byte 64)");
  refuse_variant(&o, 3, &(struct rent){ JOURNAL_KIND_STATE, 1, 0, 5, state_blob, 5 }, sizes3,
                 -EPROTO, "STATE at disk 1");
  refuse_variant(&o, 3, &(struct rent){ JOURNAL_KIND_STATE, 0, 8, 5, state_blob, 5 }, sizes3,
                 -EPROTO, "STATE at disk 0 offset 8");
  /* NULL sizes: no size check, but the rest still. */
  {
    struct rent ents[] = { { JOURNAL_KIND_ZERO, 1, 1ull << 50, 512, NULL, 0 } };
    size_t len;
    uint8_t *b = raw_build(&o, ents, 1, &len);
    char err[256];
    CHECK(journal_check_buffer(b, len, NULL, NDISKS, NULL, err, sizeof err) == 0);
    CHECK(journal_check_buffer(b, len, sizes3, NDISKS, NULL, err, sizeof err) == -EPROTO);
    free(b);
  }

  /* Trailer. */
  o = small_opts;
  o.garbage = 1;
  refuse_variant(&o, 0, NULL, sizes3, -EPROTO, "trailing garbage: 1 bytes after the trailer");
  o.garbage = 4096;
  refuse_variant(&o, 0, NULL, sizes3, -EPROTO, "trailing garbage");
  o = small_opts;
  o.entries_delta = 1;
  refuse_variant(&o, 0, NULL, sizes3, -EPROTO, "says 6 entries, the file has 5");
  o.entries_delta = -1;
  refuse_variant(&o, 0, NULL, sizes3, -EPROTO, "says 4 entries");
  o = small_opts;
  o.bytes_delta = 1;
  refuse_variant(&o, 0, NULL, sizes3, -EPROTO, "data bytes");
  o = small_opts;
  o.bad_chain = true;
  refuse_variant(&o, 0, NULL, sizes3, -EBADMSG, "chained checksum mismatch");
  o = small_opts;
  o.trailer_point = 8;
  refuse_variant(&o, 0, NULL, sizes3, -EPROTO, "point 8, the header says 7");
  o = small_opts;
  o.no_trailer = true;
  refuse_variant(&o, 0, NULL, sizes3, -EPROTO, "truncated: no trailer");
  {
    /* Two entries swapped, each whole: the chain notices. */
    struct rent ents[ARRAY_SIZE(small_entries)];
    memcpy(ents, small_entries, sizeof ents);
    size_t len, len2;
    uint8_t *good = raw_build(&small_opts, ents, ARRAY_SIZE(ents), &len);
    ents[0] = small_entries[1];
    ents[1] = small_entries[0];
    uint8_t *sw = raw_build(&small_opts, ents, ARRAY_SIZE(ents), &len2);
    /* the swapped entries with the good journal's trailer */
    memcpy(sw + len2 - JOURNAL_TRAILER_SIZE, good + len - JOURNAL_TRAILER_SIZE,
           JOURNAL_TRAILER_SIZE);
    expect_refused(sw, len2, sizes3, -EBADMSG, "chained checksum mismatch", "swapped entries");
    /* entry 1 (ZERO, 32 bytes at 111) dropped, counts fixed up by hand */
    uint8_t *dr = malloc(len);
    memcpy(dr, good, 111);
    memcpy(dr + 111, good + 143, len - 143);
    size_t dlen = len - 32;
    uint8_t *t = dr + dlen - JOURNAL_TRAILER_SIZE;
    p64(t + 8, 4);
    p64(t + 40, XXH64(t, 40, 0));
    expect_refused(dr, dlen, sizes3, -EBADMSG, "chained checksum mismatch", "dropped entry");
    free(dr);
    /* entries from another point's journal under this header */
    struct raw_opts other = small_opts;
    other.point = 9;
    size_t olen;
    uint8_t *ob = raw_build(&other, small_entries, ARRAY_SIZE(small_entries), &olen);
    memcpy(ob, good, JOURNAL_HEADER_SIZE);
    expect_refused(ob, olen, sizes3, -EBADMSG, "entry 0 at byte 64: checksum mismatch",
                   "another point's entries");
    free(ob);
    free(sw);
    free(good);
  }

  /* Header fields (with a valid header checksum). */
  o = small_opts;
  o.version = 2;
  refuse_variant(&o, 0, NULL, sizes3, -EPROTO, "version 2 not supported");
  o = small_opts;
  o.ndisks = 0;
  refuse_variant(&o, 0, NULL, NULL, -EPROTO, "0 disks");
  o.ndisks = 17;
  refuse_variant(&o, 0, NULL, NULL, -EPROTO, "17 disks");
  o.ndisks = 2;
  refuse_variant(&o, 0, NULL, sizes3, -EPROTO, "the journal is for 2 disks, expected 3");
  o = small_opts;
  o.flags = 1;
  refuse_variant(&o, 0, NULL, sizes3, -EPROTO, "flags");
  o = small_opts;
  o.hsize = 128;
  refuse_variant(&o, 0, NULL, sizes3, -EPROTO, "sizes");
  o = small_opts;
  o.point = 0;
  refuse_variant(&o, 0, NULL, sizes3, -EPROTO, "point id 0");
  {
    size_t len;
    uint8_t *b = raw_build(&small_opts, small_entries, ARRAY_SIZE(small_entries), &len);
    b[0] = 'X';
    expect_refused(b, len, sizes3, -EPROTO, "bad magic", "bad magic");
    free(b);
  }

  /* Bad arguments. */
  char err[256];
  size_t len;
  uint8_t *b = raw_build(&small_opts, small_entries, ARRAY_SIZE(small_entries), &len);
  CHECK(journal_check_buffer(b, len, sizes3, 0, NULL, err, sizeof err) == -EINVAL);
  CHECK(journal_check_buffer(b, len, NULL, JOURNAL_MAX_DISKS + 1, NULL, err, sizeof err) == -EINVAL);
  CHECK(journal_check_buffer(NULL, 0, NULL, 0, NULL, err, sizeof err) == -EPROTO);
  free(b);
}

/* A maximal entry read from a file (the reader's buffer grows to it). */
static void test_big_entry(void)
{
  char path[300], err[256] = "";
  path_of(path, sizeof path, "big.wbj");
  struct journal_writer *w = journal_create(path, 3, 0, 1, err, sizeof err);
  CHECK(w != NULL);
  if (!w)
    return;
  uint8_t *big = malloc(JOURNAL_MAX_ENTRY);
  for (size_t i = 0; i < JOURNAL_MAX_ENTRY; i++)
    big[i] = (uint8_t)(i * 2654435761u >> 24);
  CHECK(journal_append(w, JOURNAL_KIND_DATA, 0, 0, 4096, big) == 0);
  CHECK(journal_append(w, JOURNAL_KIND_DATA, 0, 1, JOURNAL_MAX_ENTRY, big) == 0);
  CHECK(journal_append(w, JOURNAL_KIND_DATA, 0, 0, 100, big + 100) == 0);
  CHECK(journal_seal(w, err, sizeof err) == 0);
  uint64_t size = JOURNAL_MAX_ENTRY + 1;
  struct journal_info info;
  CHECK(journal_apply_file(path, &size, 1, NULL, NULL, &info, err, sizeof err) == 0);
  CHECK(info.entries == 3 && info.data_bytes == JOURNAL_MAX_ENTRY + 4196ull);
  size = JOURNAL_MAX_ENTRY;
  CHECK(journal_apply_file(path, &size, 1, NULL, NULL, &info, err, sizeof err) == -EPROTO);
  CHECK(strstr(err, "entry 1 at byte 4192:") != NULL);
  free(big);
}

static void test_writer_api(void)
{
  char path[300], tmp[310], err[256] = "";
  path_of(path, sizeof path, "api.wbj");
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  CHECK(journal_create(path, 0, 0, 1, err, sizeof err) == NULL && err[0]);
  CHECK(journal_create(path, 1, 0, 0, err, sizeof err) == NULL);
  CHECK(journal_create(path, 1, 0, JOURNAL_MAX_DISKS + 1, err, sizeof err) == NULL);
  char nodir[300];
  path_of(nodir, sizeof nodir, "no/such/dir.wbj");
  err[0] = 0;
  CHECK(journal_create(nodir, 1, 0, 1, err, sizeof err) == NULL && strstr(err, "cannot create"));

  struct journal_writer *w = journal_create(path, 5, 0, 2, err, sizeof err);
  CHECK(w != NULL);
  if (!w)
    return;
  uint8_t d[16] = { 1 };
  CHECK(journal_append(w, 0, 0, 0, 16, d) == -EINVAL);
  CHECK(journal_append(w, 4, 0, 0, 16, d) == -EINVAL);
  CHECK(journal_append(w, JOURNAL_KIND_DATA, 2, 0, 16, d) == -EINVAL);
  CHECK(journal_append(w, JOURNAL_KIND_DATA, 0, 0, 0, d) == -EINVAL);
  CHECK(journal_append(w, JOURNAL_KIND_ZERO, 0, 0, JOURNAL_MAX_ENTRY + 1ull, NULL) == -EINVAL);
  CHECK(journal_append(w, JOURNAL_KIND_DATA, 0, UINT64_MAX - 8, 16, d) == -EINVAL);
  CHECK(journal_append(w, JOURNAL_KIND_DATA, 0, 0, 16, NULL) == -EINVAL);
  CHECK(journal_append(w, JOURNAL_KIND_STATE, 1, 0, 16, d) == -EINVAL);
  CHECK(journal_append(w, JOURNAL_KIND_STATE, 0, 4, 16, d) == -EINVAL);
  CHECK(journal_writer_bytes(w) == JOURNAL_HEADER_SIZE);
  CHECK(journal_append(w, JOURNAL_KIND_DATA, 1, 0, 16, d) == 0);
  CHECK(journal_append(w, JOURNAL_KIND_ZERO, 1, 16, JOURNAL_MAX_ENTRY, NULL) == 0);
  CHECK(journal_writer_bytes(w) == JOURNAL_HEADER_SIZE + 2 * JOURNAL_ENTRY_HEADER_SIZE + 16);

  /* Unsealed: nothing at path; the .tmp is refused. */
  CHECK(!file_exists(path) && file_exists(tmp));
  int fd = open(tmp, O_RDONLY);
  CHECK(journal_check_fd(fd, NULL, 2, NULL, err, sizeof err) == -EPROTO);
  CHECK(strstr(err, "truncated: no trailer") != NULL);
  close(fd);
  CHECK(journal_apply_file(path, NULL, 2, NULL, NULL, NULL, err, sizeof err) == -ENOENT);
  CHECK(strstr(err, "cannot open") != NULL);

  journal_abort(w);
  CHECK(!file_exists(tmp) && !file_exists(path));
  journal_abort(NULL);

  /* A sealed empty journal is valid (no entries). */
  w = journal_create(path, 6, 0, 1, err, sizeof err);
  CHECK(w && journal_seal(w, err, sizeof err) == 0);
  struct journal_info info;
  CHECK(journal_apply_file(path, NULL, 1, NULL, NULL, &info, err, sizeof err) == 0);
  CHECK(info.entries == 0 && info.file_bytes == JOURNAL_HEADER_SIZE + JOURNAL_TRAILER_SIZE);

  /* Not a regular file. */
  int p[2];
  CHECK(pipe(p) == 0);
  CHECK(journal_check_fd(p[0], NULL, 0, NULL, err, sizeof err) == -EINVAL);
  close(p[0]);
  close(p[1]);
}

int main(void)
{
  snprintf(dir, sizeof dir, "/tmp/test_journal.XXXXXX");
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 1;
  }
  test_format();
  test_threads();
  test_truncated_and_flipped();
  test_semantic_damage();
  test_big_entry();
  test_writer_api();

  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0)
    fprintf(stderr, "could not remove %s\n", dir);
  if (failures) {
    fprintf(stderr, "test_journal: %d check(s) failed\n", failures);
    return 1;
  }
  printf("test_journal: all checks passed\n");
  return 0;
}
