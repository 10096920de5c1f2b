/* snapshot: the migrate-time restore point of one disk (see snapshot.h for
 * the design, the file format, the invariants and fail mode).
 *
 * Region states (in memory):
 *   unsaved   neither bit below; the disk still holds its migrate-time content.
 *   busy      claimed by one preserve, which is copying it: others wait.
 *   staged    copied; its bit is in `want` (the bits the map file should
 *             hold) and its bit page is pending: it waits for a commit.
 *   saved     its bit is durable in the map file: set in `saved` (release),
 *             which is what the lock-free fast path and restore read.
 *
 * Commits (group commit, no thread).  Commits are numbered.  A preserve stages
 * its run (sets `want`, marks its bit pages pending and, if it wrote data,
 * page_data) and notes the number of the next commit to start (open_seq):
 * every commit from that one on that takes one of its pages (at most two: a
 * run is at most SNAPSHOT_MAX_RUN bytes) builds the image after the staging.
 * It is done when each of its pages has been written by a durable commit at
 * least that new (page_durable: the last durable commit that wrote the page;
 * it only grows, so a busy page does not keep a waiter waiting for ever newer
 * commits).  Whoever finds no commit running leads the next one: under
 * `lock` it takes up to CUT_PAGES pending pages (from a rotating cursor, so no
 * page starves) and builds their images from `want`, so an image holds only
 * bits staged before the cut, whose data writes were complete before it;
 * then, without the lock: fdatasync of the data file (if a taken page
 * carries bits with data), the page writes, fdatasync of the map file.  So a
 * bit reaches the map only after its data is durable.  One commit runs at a
 * time, so fdatasync errors are never lost between two concurrent syncs of
 * the same file (the first failure puts the point in fail mode before the
 * next sync starts).
 *
 * Thread model.
 *   lock       protects busy, pending, page_durable, page_data, npending,
 *              cut_from, open_seq, committing; `want` and `saved` are set
 *              under it (atomic bitmaps, so the fast path may read `saved`).
 *   done       broadcast when a commit ends, a run is saved or released, or
 *              fail mode starts.
 *   committing the leader of the running commit owns map_fd writes and cbuf.
 * Naming: snapshot_* are public (snapshot.h); everything else is static. */
#include "disk/snapshot.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/bitmap.h"
#include "common/log.h"
#include "common/util.h"

#define PAGE_SIZE_   SNAPSHOT_PAGE_SIZE
#define PAGE_BITS    ((uint64_t)SNAPSHOT_PAGE_BITS)
#define PAGE_WORDS   ((PAGE_SIZE_ - 8) / 8)     /* 511 u64 words of bits per page */
#define HDR_CSUM_OFF 56
#define IO_PAGES     64                          /* pages per read/write call */
#define CUT_PAGES    64                          /* most pages one commit takes */
#define CHUNK        (1024 * 1024)               /* copy / restore buffer */
#define MAX_ZERO_RUN (256u * 1024 * 1024)        /* one be->ops->zero call at most */

/* A run never spans more than two bit pages (see commit_run). */
_Static_assert(SNAPSHOT_MAX_RUN / 4096 <= SNAPSHOT_PAGE_BITS, "a run fits in two bit pages");
_Static_assert(CUT_PAGES <= IO_PAGES, "a commit's images fit in cbuf");

struct snapshot {
  char *path, *data_path, *tmp_path, *disk_name;
  uint64_t disk_size, granularity, nbits, npages;
  uint64_t created_ns;                 /* from the header: seeds the page checksums */
  unsigned shift;                      /* log2(granularity) */
  int map_fd, data_fd;

  struct bitmap saved;                 /* durable bits (fast path, restore) */
  struct bitmap want;                  /* bits whose data is written: what the map should hold */
  _Atomic uint64_t nsaved;             /* bits set in saved */
  _Atomic uint64_t ncommits;           /* commits since open */
  _Atomic bool failed;                 /* fail mode */
  _Atomic int inject_err;              /* test hook: file writes fail with it */

  pthread_mutex_t lock;
  pthread_cond_t done;
  struct bitmap busy;                  /* [nbits] regions being copied */
  struct bitmap pending;               /* [npages] pages staged since they were last taken */
  uint64_t *page_durable;              /* [npages] last durable commit that wrote the page */
  bool *page_data;                     /* [npages] staged bits with data written */
  uint64_t npending;
  uint64_t cut_from;                   /* where the next commit starts taking pages */
  uint64_t open_seq;                   /* number of the next commit */
  bool committing;
  unsigned char *cbuf;                 /* CUT_PAGES page images, the leader's */
  uint64_t *batch;                     /* [CUT_PAGES] the leader's page numbers */
};

/* ---- encoding ---- */

static void put32(unsigned char *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static void put64(unsigned char *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }
static uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
static uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }

static void header_build(const struct snapshot *s, unsigned char *buf)
{
  memset(buf, 0, PAGE_SIZE_);
  memcpy(buf, SNAPSHOT_MAGIC, 8);
  put32(buf + 8, SNAPSHOT_VERSION);
  put32(buf + 12, PAGE_SIZE_);
  put64(buf + 16, s->granularity);
  put64(buf + 24, s->disk_size);
  put64(buf + 32, s->nbits);
  put64(buf + 40, s->created_ns);
  put64(buf + 48, 0);
  put64(buf + HDR_CSUM_OFF, XXH64(buf, HDR_CSUM_OFF, 0));
}

/* The checksum seed of bit page p (file page p + 1): it ties the page to its
 * place and to the header of the point it belongs to. */
static uint64_t page_seed(const struct snapshot *s, uint64_t p) { return s->created_ns + p + 1; }

/* Image of bit page p from bm (NULL: all clear). */
static void page_build(const struct snapshot *s, const struct bitmap *bm, uint64_t p,
                       unsigned char *buf)
{
  uint64_t w0 = p * PAGE_WORDS, nwords = DIV_ROUND_UP(s->nbits, 64);
  for (uint64_t i = 0; i < PAGE_WORDS; i++) {
    uint64_t w = 0;
    if (bm && w0 + i < nwords)
      w = atomic_load_explicit(&bm->words[w0 + i], memory_order_relaxed);
    put64(buf + i * 8, w);   /* bitmap words past nbits are always 0 */
  }
  put64(buf + PAGE_WORDS * 8, XXH64(buf, PAGE_WORDS * 8, page_seed(s, p)));
}

/* ---- file IO ---- */

static int file_write(struct snapshot *s, int fd, const void *buf, size_t len, uint64_t off)
{
  int e = atomic_load_explicit(&s->inject_err, memory_order_relaxed);
  if (e)
    return -e;
  return pwrite_full(fd, buf, len, (off_t)off) < 0 ? -errno : 0;
}

static int file_sync(struct snapshot *s, int fd)
{
  int e = atomic_load_explicit(&s->inject_err, memory_order_relaxed);
  if (e)
    return -e;
  while (fdatasync(fd) < 0) {
    if (errno != EINTR)
      return -errno;
  }
  return 0;
}

static bool all_zero(const unsigned char *p, size_t n)
{
  return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* ---- fail mode ---- */

/* __fn: caller holds s->lock.  The map file stays: every bit in it has its
 * data durable (bits are written only after the data sync succeeded), so the
 * point is still good for restore; only new copies cannot be vouched for. */
static void fail_enter_locked(struct snapshot *s, const char *what, int err)
{
  if (!atomic_exchange(&s->failed, true))
    log_error(s->disk_name,
              "snapshot: cannot %s for restore point %s: %s; writes to regions not saved yet "
              "now fail (the point itself stays usable for restore; reopen it to retry)",
              what, s->path, strerror(-err));
  pthread_cond_broadcast(&s->done);
}

/* ---- commits ---- */

/* __fn: caller holds s->lock and no commit is running.  Leads one commit
 * (drops the lock for the IO). */
static void commit_lead_locked(struct snapshot *s)
{
  s->committing = true;
  uint64_t seq = s->open_seq++;
  uint64_t n = 0;
  bool data = false;
  uint64_t p = bitmap_next(&s->pending, s->cut_from, true);
  if (p >= s->npages)
    p = bitmap_next(&s->pending, 0, true);
  while (p < s->npages && n < CUT_PAGES) {
    bitmap_clear(&s->pending, p);
    s->npending--;
    data |= s->page_data[p];
    s->page_data[p] = false;
    s->batch[n] = p;
    page_build(s, &s->want, p, s->cbuf + n * PAGE_SIZE_);
    n++;
    s->cut_from = p + 1;
    p = bitmap_next(&s->pending, p + 1, true);
    if (p >= s->npages && s->npending)
      p = bitmap_next(&s->pending, 0, true);
  }
  pthread_mutex_unlock(&s->lock);

  /* Data first: no bit may reach the map before the data it vouches for. */
  const char *what = "sync the data file";
  int r = data ? file_sync(s, s->data_fd) : 0;
  for (uint64_t i = 0; r == 0 && i < n;) {
    uint64_t run = 1;   /* consecutive pages in one pwrite (the batch is mostly sorted) */
    while (i + run < n && s->batch[i + run] == s->batch[i] + run)
      run++;
    what = "write the map file";
    r = file_write(s, s->map_fd, s->cbuf + i * PAGE_SIZE_, run * PAGE_SIZE_,
                   (s->batch[i] + 1) * PAGE_SIZE_);
    i += run;
  }
  if (r == 0) {
    what = "sync the map file";
    r = file_sync(s, s->map_fd);
  }

  pthread_mutex_lock(&s->lock);
  s->committing = false;
  if (r < 0) {
    fail_enter_locked(s, what, r);
  } else {
    for (uint64_t i = 0; i < n; i++)
      s->page_durable[s->batch[i]] = seq;
    atomic_fetch_add_explicit(&s->ncommits, 1, memory_order_relaxed);
  }
  pthread_cond_broadcast(&s->done);
}

/* Stages regions [first, first + count) (copied; wrote_data: some of their
 * chunks went to the data file) and waits until a durable commit carries
 * them; then they are saved.  Returns 0 or -EIO (fail mode).  Either way the
 * regions are no longer busy. */
static int commit_run(struct snapshot *s, uint64_t first, uint64_t count, bool wrote_data)
{
  uint64_t pages[2];
  unsigned np = 0;
  int r = 0;
  pthread_mutex_lock(&s->lock);
  if (atomic_load(&s->failed)) {
    r = -EIO;
    goto out;
  }
  bitmap_set_range(&s->want, first, count);
  for (uint64_t p = first / PAGE_BITS; p <= (first + count - 1) / PAGE_BITS; p++) {
    if (!bitmap_set(&s->pending, p))
      s->npending++;
    s->page_data[p] |= wrote_data;
    pages[np++] = p;
  }
  const uint64_t need = s->open_seq;   /* the first commit that may carry the run */
  for (;;) {
    bool durable = true;
    for (unsigned i = 0; i < np; i++)
      durable &= s->page_durable[pages[i]] >= need;
    if (durable)
      break;
    if (atomic_load(&s->failed)) {
      r = -EIO;
      goto out;
    }
    if (s->committing)
      pthread_cond_wait(&s->done, &s->lock);
    else
      commit_lead_locked(s);
  }
  bitmap_set_range(&s->saved, first, count);   /* seq_cst stores: the fast path acquires */
  atomic_fetch_add(&s->nsaved, count);
out:
  for (uint64_t i = first; i < first + count; i++)
    bitmap_clear(&s->busy, i);
  pthread_cond_broadcast(&s->done);
  pthread_mutex_unlock(&s->lock);
  return r;
}

/* ---- preserve ---- */

/* Are regions [first, last] all saved?  Acquire loads. */
static bool range_saved(const struct snapshot *s, uint64_t first, uint64_t last)
{
  for (uint64_t w = first >> 6; w <= last >> 6; w++) {
    uint64_t lo = w == first >> 6 ? (first & 63) : 0;
    uint64_t hi = w == last >> 6 ? (last & 63) : 63;
    uint64_t mask = (UINT64_MAX >> (63 - hi)) & (UINT64_MAX << lo);
    if ((atomic_load_explicit(&s->saved.words[w], memory_order_acquire) & mask) != mask)
      return false;
  }
  return true;
}

/* Copies regions [first, first + count) (claimed by the caller) from be into
 * the data file, all-zero chunks left as holes.  *wrote: some data written.
 * Returns 0, the backend's read error, or a data file error (fail mode). */
static int copy_run(struct snapshot *s, struct backend *be, uint64_t first, uint64_t count,
                    unsigned char *buf, size_t buflen, bool *wrote)
{
  uint64_t off = first << s->shift;
  uint64_t end = MIN((first + count) << s->shift, s->disk_size);
  *wrote = false;
  while (off < end) {
    uint32_t n = (uint32_t)MIN(end - off, (uint64_t)buflen);
    int r = be->ops->pread(be, buf, n, off, false);
    if (r < 0)
      return r;
    if (!all_zero(buf, n)) {
      /* The data file was created sparse and each region is written at most
       * once per content, so a chunk not written is a hole: it reads zero. */
      r = file_write(s, s->data_fd, buf, n, off);
      if (r < 0) {
        pthread_mutex_lock(&s->lock);
        fail_enter_locked(s, "write the data file", r);
        pthread_mutex_unlock(&s->lock);
        return r;
      }
      *wrote = true;
    }
    off += n;
  }
  return 0;
}

int snapshot_preserve(struct snapshot *s, struct backend *be, uint64_t off, uint64_t len,
                      bool nowait)
{
  if (len == 0)
    return 0;
  if (off >= s->disk_size || len > s->disk_size - off)
    return -EINVAL;
  uint64_t r0 = off >> s->shift, r1 = (off + len - 1) >> s->shift;
  if (range_saved(s, r0, r1))
    return 0;                     /* fast path: nothing to copy */
  if (nowait)
    return -EAGAIN;
  if (be->size != s->disk_size)
    return -EINVAL;               /* not the disk this point is of */

  const uint64_t max_run = MAX((uint64_t)SNAPSHOT_MAX_RUN >> s->shift, 1);
  unsigned char *buf = NULL;
  size_t buflen = 0;
  int r = 0;
  /* First pass: claim and copy runs of free unsaved regions, skipping the
   * ones others are copying; second pass: wait for those (and copy any a
   * failed claimer released). */
  bool second = false, skipped = false;
  uint64_t pos = r0;
  pthread_mutex_lock(&s->lock);
  for (;;) {
    uint64_t i = bitmap_next(&s->saved, pos, false);
    if (i > r1) {
      if (second || !skipped)
        break;                    /* every region touched is saved */
      second = true;
      pos = r0;
      continue;
    }
    if (atomic_load(&s->failed)) {
      r = -EIO;
      break;
    }
    if (bitmap_test(&s->busy, i)) {
      if (second) {
        pthread_cond_wait(&s->done, &s->lock);
        pos = i;
      } else {
        skipped = true;
        pos = i + 1;
      }
      continue;
    }
    uint64_t j = i;               /* claim [i, j) */
    while (j <= r1 && j - i < max_run && !bitmap_test(&s->saved, j) && !bitmap_test(&s->busy, j))
      bitmap_set(&s->busy, j++);
    pthread_mutex_unlock(&s->lock);
    size_t need = (size_t)MIN((j - i) << s->shift, (uint64_t)CHUNK);
    bool released = false;
    if (need > buflen) {
      free(buf);
      buflen = (buf = malloc(need)) ? need : 0;
    }
    if (!buf) {
      r = -ENOMEM;
    } else {
      bool wrote = false;
      r = copy_run(s, be, i, j - i, buf, buflen, &wrote);
      if (r == 0) {
        r = commit_run(s, i, j - i, wrote);
        released = true;                      /* commit_run clears busy either way */
      }
    }
    pthread_mutex_lock(&s->lock);
    if (!released) {                          /* no copy: give the regions back */
      for (uint64_t k = i; k < j; k++)
        bitmap_clear(&s->busy, k);
      pthread_cond_broadcast(&s->done);
    }
    if (r < 0)
      break;
    pos = j;
  }
  pthread_mutex_unlock(&s->lock);
  free(buf);
  return r;
}

/* ---- restore ---- */

/* Writes the saved range [off, end) of the disk back from the data file. */
static int restore_range(struct snapshot *s, struct backend *be, uint64_t off, uint64_t end,
                         unsigned char *buf)
{
  uint64_t data_end = 0;          /* [off, data_end) is known to be data in the file */
  while (off < end) {
    if (off >= data_end) {
      /* Holes (zero chunks saved as holes) need no read. */
      off_t d = lseek(s->data_fd, (off_t)off, SEEK_DATA);
      uint64_t data = d >= 0 ? (uint64_t)d : errno == ENXIO ? end : off;
      if (data > off) {
        data = MIN(data, end);
        while (off < data) {
          uint32_t n = (uint32_t)MIN(data - off, (uint64_t)MAX_ZERO_RUN);
          int r = be->ops->zero(be, n, off, true);
          if (r < 0)
            return r;
          off += n;
        }
        continue;
      }
      off_t h = d >= 0 ? lseek(s->data_fd, (off_t)off, SEEK_HOLE) : -1;
      data_end = h > (off_t)off ? (uint64_t)h : end;   /* no hole reporting: all data */
    }
    uint32_t n = (uint32_t)MIN(MIN(end, data_end) - off, (uint64_t)CHUNK);
    if (pread_full(s->data_fd, buf, n, (off_t)off) < 0)
      return errno ? -errno : -EIO;
    int r = all_zero(buf, n) ? be->ops->zero(be, n, off, true)
                             : be->ops->pwrite(be, buf, n, off, false);
    if (r < 0)
      return r;
    off += n;
  }
  return 0;
}

int snapshot_restore(struct snapshot *s, struct backend *be)
{
  if (be->size != s->disk_size) {
    log_error(s->disk_name, "snapshot: restore point %s is for a disk of %llu bytes, the "
              "image has %llu: not restored", s->path, (unsigned long long)s->disk_size,
              (unsigned long long)be->size);
    return -EINVAL;
  }
  unsigned char *buf = malloc(CHUNK);
  if (!buf)
    return -ENOMEM;
  int r = 0;
  uint64_t nreg = 0;
  for (uint64_t i = bitmap_next(&s->saved, 0, true); r == 0 && i < s->nbits;) {
    uint64_t j = bitmap_next(&s->saved, i, false);   /* run [i, j) */
    r = restore_range(s, be, i << s->shift, MIN(j << s->shift, s->disk_size), buf);
    nreg += j - i;
    i = bitmap_next(&s->saved, j, true);
  }
  free(buf);
  if (r == 0)
    r = be->ops->flush(be);
  if (r < 0) {
    log_error(s->disk_name, "snapshot: restore from %s failed: %s (run it again: a restore "
              "can be repeated)", s->path, strerror(-r));
    return r;
  }
  log_info(s->disk_name, "snapshot: disk rolled back to restore point %s (%llu saved "
           "regions written back)", s->path, (unsigned long long)nreg);
  return 0;
}

/* ---- open / create / delete ---- */

static void snapshot_free(struct snapshot *s)
{
  if (!s)
    return;
  if (s->map_fd >= 0)
    close(s->map_fd);
  if (s->data_fd >= 0)
    close(s->data_fd);
  bitmap_free(&s->saved);
  bitmap_free(&s->want);
  bitmap_free(&s->busy);
  bitmap_free(&s->pending);
  free(s->page_durable);
  free(s->page_data);
  free(s->cbuf);
  free(s->batch);
  free(s->path);
  free(s->data_path);
  free(s->tmp_path);
  free(s->disk_name);
  pthread_mutex_destroy(&s->lock);
  pthread_cond_destroy(&s->done);
  free(s);
}

static struct snapshot *snapshot_alloc(const char *path, const char *disk_name)
{
  struct snapshot *s = calloc(1, sizeof *s);
  if (!s)
    return NULL;
  s->map_fd = s->data_fd = -1;
  s->open_seq = 1;
  pthread_mutex_init(&s->lock, NULL);
  pthread_cond_init(&s->done, NULL);
  s->path = strdup(path);
  s->disk_name = strdup(disk_name ? disk_name : "");
  if (asprintf(&s->data_path, "%s.data", path) < 0)
    s->data_path = NULL;
  if (asprintf(&s->tmp_path, "%s.tmp", path) < 0)
    s->tmp_path = NULL;
  s->cbuf = malloc((size_t)CUT_PAGES * PAGE_SIZE_);
  s->batch = calloc(CUT_PAGES, sizeof *s->batch);
  if (!s->path || !s->disk_name || !s->data_path || !s->tmp_path || !s->cbuf || !s->batch) {
    snapshot_free(s);
    return NULL;
  }
  return s;
}

/* Sizes the point and allocates its maps; 0 or -1 (ENOMEM). */
static int snapshot_size(struct snapshot *s, uint64_t disk_size, uint64_t granularity)
{
  s->disk_size = disk_size;
  s->granularity = granularity;
  s->shift = (unsigned)__builtin_ctzll(granularity);
  s->nbits = DIV_ROUND_UP(disk_size, granularity);
  s->npages = DIV_ROUND_UP(s->nbits, PAGE_BITS);
  if (bitmap_init(&s->saved, s->nbits) < 0 || bitmap_init(&s->want, s->nbits) < 0 ||
      bitmap_init(&s->busy, s->nbits) < 0 || bitmap_init(&s->pending, s->npages) < 0 ||
      !(s->page_durable = calloc(MAX(s->npages, 1), sizeof *s->page_durable)) ||
      !(s->page_data = calloc(MAX(s->npages, 1), sizeof *s->page_data)))
    return -1;
  return 0;
}

static bool granularity_ok(uint64_t g)
{
  return g >= 4096 && g <= SNAPSHOT_MAX_GRANULARITY && (g & (g - 1)) == 0;
}

/* Creates a new point: the old map goes first (durably), then a fresh sparse
 * data file, then the new map is installed by rename. */
static int create_files(struct snapshot *s, char *why, size_t whylen)
{
  if ((unlink(s->path) < 0 && errno != ENOENT) || (unlink(s->tmp_path) < 0 && errno != ENOENT)) {
    snprintf(why, whylen, "cannot remove the old restore point: %s", strerror(errno));
    return -1;
  }
  if (fsync_parent_dir(s->path) < 0) {
    snprintf(why, whylen, "cannot sync its directory: %s", strerror(errno));
    return -1;
  }
  s->data_fd = open(s->data_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (s->data_fd < 0 || ftruncate(s->data_fd, (off_t)s->disk_size) < 0 || fsync(s->data_fd) < 0) {
    snprintf(why, whylen, "cannot create the data file %s: %s", s->data_path, strerror(errno));
    return -1;
  }
  int fd = open(s->tmp_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) {
    snprintf(why, whylen, "cannot create %s: %s", s->tmp_path, strerror(errno));
    return -1;
  }
  unsigned char *buf = s->cbuf;   /* IO_PAGES pages (CUT_PAGES <= IO_PAGES) */
  header_build(s, buf);
  int r = pwrite_full(fd, buf, PAGE_SIZE_, 0);
  for (uint64_t p = 0; r == 0 && p < s->npages; p += CUT_PAGES) {
    uint64_t n = MIN((uint64_t)CUT_PAGES, s->npages - p);
    for (uint64_t i = 0; i < n; i++)
      page_build(s, NULL, p + i, buf + i * PAGE_SIZE_);
    r = pwrite_full(fd, buf, n * PAGE_SIZE_, (off_t)((p + 1) * PAGE_SIZE_));
  }
  if (r == 0)
    r = fsync(fd);
  if (r == 0)
    r = rename(s->tmp_path, s->path);
  if (r == 0)
    r = fsync_parent_dir(s->path);
  if (r < 0) {
    snprintf(why, whylen, "cannot write the map file: %s", strerror(errno));
    close(fd);
    unlink(s->tmp_path);
    return -1;
  }
  s->map_fd = fd;
  return 0;
}

/* Reads and checks the map and the data file of an existing point. */
static int load_files(struct snapshot *s, uint64_t disk_size, uint64_t granularity, char *why,
                      size_t whylen)
{
  s->map_fd = open(s->path, O_RDWR | O_CLOEXEC);
  if (s->map_fd < 0) {
    if (errno == ENOENT)
      snprintf(why, whylen, "there is no restore point here (no map file)");
    else
      snprintf(why, whylen, "the map file cannot be opened: %s", strerror(errno));
    return -1;
  }
  struct stat st;
  if (fstat(s->map_fd, &st) < 0) {
    snprintf(why, whylen, "cannot stat the map file: %s", strerror(errno));
    return -1;
  }
  unsigned char *h = s->cbuf;
  if ((uint64_t)st.st_size < PAGE_SIZE_) {
    snprintf(why, whylen, "the map file is truncated (%llu bytes, no complete header)",
             (unsigned long long)st.st_size);
    return -1;
  }
  if (pread_full(s->map_fd, h, PAGE_SIZE_, 0) < 0) {
    snprintf(why, whylen, "cannot read the header: %s", strerror(errno ? errno : EIO));
    return -1;
  }
  if (memcmp(h, SNAPSHOT_MAGIC, 8) != 0) {
    snprintf(why, whylen, "the map file has no %s magic (not a restore point)", SNAPSHOT_MAGIC);
    return -1;
  }
  if (get64(h + HDR_CSUM_OFF) != XXH64(h, HDR_CSUM_OFF, 0)) {
    snprintf(why, whylen, "the header fails its checksum (corrupt)");
    return -1;
  }
  uint32_t version = get32(h + 8), page_size = get32(h + 12);
  uint64_t gran = get64(h + 16), size = get64(h + 24), nbits = get64(h + 32);
  uint64_t flags = get64(h + 48);
  if (version != SNAPSHOT_VERSION || page_size != PAGE_SIZE_) {
    snprintf(why, whylen, "unsupported version %u (page size %u)", version, page_size);
    return -1;
  }
  if (flags) {
    snprintf(why, whylen, "unknown flags %#llx", (unsigned long long)flags);
    return -1;
  }
  if (!granularity_ok(gran) || size == 0 || nbits != DIV_ROUND_UP(size, gran)) {
    snprintf(why, whylen, "the header is inconsistent (granularity %llu, disk size %llu, "
             "%llu regions)", (unsigned long long)gran, (unsigned long long)size,
             (unsigned long long)nbits);
    return -1;
  }
  if (granularity && gran != granularity) {
    snprintf(why, whylen, "its granularity %llu differs from the requested %llu",
             (unsigned long long)gran, (unsigned long long)granularity);
    return -1;
  }
  if (size != disk_size) {
    snprintf(why, whylen, "it is for a disk of %llu bytes, the disk has %llu",
             (unsigned long long)size, (unsigned long long)disk_size);
    return -1;
  }
  s->created_ns = get64(h + 40);
  if (snapshot_size(s, size, gran) < 0) {
    snprintf(why, whylen, "out of memory for its map");
    return -1;
  }
  uint64_t want_size = (1 + s->npages) * PAGE_SIZE_;
  if ((uint64_t)st.st_size != want_size) {
    snprintf(why, whylen, "the map file is %llu bytes, expected %llu (truncated or damaged)",
             (unsigned long long)st.st_size, (unsigned long long)want_size);
    return -1;
  }

  uint64_t nset = 0;
  unsigned char *buf = s->cbuf;
  for (uint64_t p = 0; p < s->npages; p += CUT_PAGES) {
    uint64_t n = MIN((uint64_t)CUT_PAGES, s->npages - p);
    if (pread_full(s->map_fd, buf, n * PAGE_SIZE_, (off_t)((p + 1) * PAGE_SIZE_)) < 0) {
      snprintf(why, whylen, "cannot read the map file: %s", strerror(errno ? errno : EIO));
      return -1;
    }
    for (uint64_t i = 0; i < n; i++) {
      const unsigned char *pg = buf + i * PAGE_SIZE_;
      uint64_t pn = p + i;
      if (get64(pg + PAGE_WORDS * 8) != XXH64(pg, PAGE_WORDS * 8, page_seed(s, pn))) {
        snprintf(why, whylen, "bit page %llu (regions %llu to %llu) fails its checksum "
                 "(corrupt): which regions were saved is unknown",
                 (unsigned long long)(pn + 1), (unsigned long long)(pn * PAGE_BITS),
                 (unsigned long long)(MIN((pn + 1) * PAGE_BITS, s->nbits) - 1));
        return -1;
      }
      for (uint64_t k = 0; k < PAGE_WORDS; k++) {
        uint64_t w = get64(pg + k * 8), wi = pn * PAGE_WORDS + k;
        uint64_t valid = wi >= s->saved.nwords ? 0
                         : wi == s->saved.nwords - 1 && (s->nbits & 63)
                             ? (UINT64_C(1) << (s->nbits & 63)) - 1 : UINT64_MAX;
        if (w & ~valid) {
          snprintf(why, whylen, "bit page %llu has bits past the end of the disk (corrupt)",
                   (unsigned long long)(pn + 1));
          return -1;
        }
        if (w) {
          atomic_store_explicit(&s->saved.words[wi], w, memory_order_relaxed);
          atomic_store_explicit(&s->want.words[wi], w, memory_order_relaxed);
          nset += (uint64_t)__builtin_popcountll(w);
        }
      }
    }
  }
  atomic_store(&s->nsaved, nset);

  s->data_fd = open(s->data_path, O_RDWR | O_CLOEXEC);
  if (s->data_fd < 0) {
    snprintf(why, whylen, "its data file %s cannot be opened: %s", s->data_path,
             strerror(errno));
    return -1;
  }
  if (fstat(s->data_fd, &st) < 0) {
    snprintf(why, whylen, "cannot stat its data file %s: %s", s->data_path, strerror(errno));
    return -1;
  }
  if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != s->disk_size) {
    snprintf(why, whylen, "its data file %s is %llu bytes, expected %llu (damaged)",
             s->data_path, (unsigned long long)st.st_size, (unsigned long long)s->disk_size);
    return -1;
  }
  return 0;
}

struct snapshot *snapshot_open(const char *path, const char *disk_name, uint64_t disk_size,
                               uint64_t granularity, bool create, char *err, size_t errlen)
{
  if (create && granularity == 0)
    granularity = SNAPSHOT_DEFAULT_GRANULARITY;
  if (granularity && !granularity_ok(granularity)) {
    snprintf(err, errlen, "restore point %s: granularity %llu is not a power of two from "
             "4096 to %llu", path, (unsigned long long)granularity,
             (unsigned long long)SNAPSHOT_MAX_GRANULARITY);
    return NULL;
  }
  if (disk_size == 0) {
    snprintf(err, errlen, "restore point %s: the disk is empty", path);
    return NULL;
  }
  struct snapshot *s = snapshot_alloc(path, disk_name);
  if (!s) {
    snprintf(err, errlen, "restore point %s: out of memory", path);
    return NULL;
  }
  char why[320] = "";
  int r;
  if (create) {
    s->created_ns = realtime_ns();
    r = snapshot_size(s, disk_size, granularity);
    if (r < 0)
      snprintf(why, sizeof why, "out of memory for its map");
    else
      r = create_files(s, why, sizeof why);
  } else {
    r = load_files(s, disk_size, granularity, why, sizeof why);
  }
  if (r < 0) {
    snprintf(err, errlen, "restore point %s %s: %s", path, create ? "not created" : "refused",
             why);
    snapshot_free(s);
    return NULL;
  }
  char g[32];
  format_size(s->granularity, g, sizeof g);
  if (create)
    log_info(s->disk_name, "snapshot: restore point %s created (%llu regions of %s)", path,
             (unsigned long long)s->nbits, g);
  else
    log_info(s->disk_name, "snapshot: restore point %s opened (%llu of %llu regions of %s "
             "saved)", path, (unsigned long long)atomic_load(&s->nsaved),
             (unsigned long long)s->nbits, g);
  return s;
}

void snapshot_close(struct snapshot *s)
{
  /* Nothing to write: a preserve returns only once its bits are durable. */
  snapshot_free(s);
}

int snapshot_delete(const char *path)
{
  char *data = NULL, *tmp = NULL;
  if (asprintf(&data, "%s.data", path) < 0)
    return -ENOMEM;
  if (asprintf(&tmp, "%s.tmp", path) < 0) {
    free(data);
    return -ENOMEM;
  }
  /* The map first, and durably: a crash never leaves a map whose data is
   * gone. */
  int r = 0;
  const char *const files[][2] = { { path, tmp }, { data, NULL } };
  for (size_t i = 0; r == 0 && i < ARRAY_SIZE(files); i++) {
    bool any = false;
    for (size_t k = 0; r == 0 && k < 2 && files[i][k]; k++) {
      if (unlink(files[i][k]) == 0)
        any = true;
      else if (errno != ENOENT)
        r = -errno;
    }
    if (r == 0 && any && fsync_parent_dir(path) < 0)
      r = -errno;
  }
  free(data);
  free(tmp);
  return r;
}

/* ---- accessors ---- */

uint64_t snapshot_saved_regions(const struct snapshot *s) { return atomic_load(&s->nsaved); }
uint64_t snapshot_created_ns(const struct snapshot *s) { return s->created_ns; }
uint64_t snapshot_granularity(const struct snapshot *s) { return s->granularity; }
uint64_t snapshot_nregions(const struct snapshot *s) { return s->nbits; }
uint64_t snapshot_commit_count(const struct snapshot *s) { return atomic_load(&s->ncommits); }
bool snapshot_failed(const struct snapshot *s) { return atomic_load(&s->failed); }
void snapshot_inject_write_error(struct snapshot *s, int err) { atomic_store(&s->inject_err, err); }

bool snapshot_region_saved(const struct snapshot *s, uint64_t i)
{
  return i < s->nbits && bitmap_test(&s->saved, i);
}

uint64_t snapshot_saved_bytes(const struct snapshot *s)
{
  struct stat st;
  if (fstat(s->data_fd, &st) < 0)
    return 0;
  return (uint64_t)st.st_blocks * 512;
}
