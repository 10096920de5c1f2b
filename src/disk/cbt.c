/* cbt: crash-safe changed-block tracking (see cbt.h for the design, the file
 * format and fail mode).
 *
 * Durability bookkeeping.  Commits are numbered.  `open_seq` is the number of
 * the commit that will carry changes made now; `durable_seq` is the last
 * commit whose pages are on disk and synced (commits complete in order, so
 * every commit <= durable_seq is durable).
 *
 * Two levels (cbt.h: persist coarse, track exact).  `map` is the exact map.
 * `nbhd` has one bit per persist neighbourhood (CBT_PERSIST_SPAN regions):
 * set, under `lock`, when a first write reaches the neighbourhood; from then
 * on every page the committer writes carries all the neighbourhood's bits.
 * It is cleared only by sync and swap, which exclude writers and write a map
 * without them.  nbhd_seq[w] is the commit carrying the latest neighbourhood
 * set in nbhd word w (64 neighbourhoods).  A region is durable in the file
 * when either
 *   (a) its neighbourhood's nbhd bit is set and nbhd_seq[its word] <=
 *       durable_seq, or
 *   (b) its exact bit is set and its nbhd bit is clear: an exact bit outside
 *       a persisted neighbourhood was loaded from the file at open or written
 *       by the last full write (sync), because a mark that sets a new bit
 *       persists the neighbourhood first (or is refused in fail mode).
 * Bit pages changed since the last batch are in `pending`.
 *
 * Memory ordering of the lock-free fast path: the slow path stores
 * nbhd_seq[w] (release) BEFORE it sets the nbhd bit (seq_cst fetch_or), and
 * sets the nbhd bit before the exact bits.  The fast path loads the exact
 * bits (acquire), then the nbhd bit (acquire), then nbhd_seq.  So whoever
 * sees an exact bit set by a slow path also sees its nbhd bit (no false (b)),
 * and whoever sees an nbhd bit also sees the commit that will persist it,
 * never an older one: a writer whose neighbourhood was persisted by someone
 * else still waits for that commit.  Durability is tracked per nbhd word,
 * not per bit page (32704 regions, 2 GiB at 64 KiB), so a write to a durable
 * neighbourhood does not wait for an unrelated commit on the same page.
 *
 * Thread model.
 *   swap_lock  writer-preferring rwlock: shared by writers from before their
 *              mark to after their data write; exclusive in cbt_swap.
 *   lock       guards open_seq, the pending page set, `committing`, `stop`,
 *              `hdr_coarse`, fail mode and the generation; nbhd bits are set
 *              only under it (the slow path), so the committer's build of a
 *              page after taking a batch contains every neighbourhood
 *              numbered with that batch.  Exact bits are set under it too
 *              (slow path) or lock-free inside persisted neighbourhoods,
 *              which the page carries whole anyway.
 *   committing whoever writes the map file (the committer thread, a full
 *              rewrite in cbt_sync, cbt_swap) sets it under `lock` first, so
 *              file writes never overlap and c->fd is stable while set.
 * Naming: cbt_* are public (cbt.h); everything else is static. */
#include "disk/cbt.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/log.h"
#include "common/util.h"

#define PAGE_WORDS ((CBT_PAGE_SIZE - 8) / 8)   /* 511 u64 words of bits per page */
#define HDR_CSUM_OFF 56
#define IO_PAGES 64                            /* pages per write/read call */
#define SPAN CBT_PERSIST_SPAN
#define NB_PER_WORD (64 / SPAN)                /* neighbourhoods per word of the map */

_Static_assert((SPAN & (SPAN - 1)) == 0 && SPAN >= 1 && SPAN <= 64 && CBT_PAGE_BITS % SPAN == 0,
               "CBT_PERSIST_SPAN: a power of two <= 64 dividing CBT_PAGE_BITS");

static const char fail_state[] =
  "failed: the map file cannot be written (see the log); writes to clean regions fail";

struct cbt {
  char *path, *tmp_path, *disk_name;
  uint64_t disk_size, granularity, nbits, npages;
  unsigned shift;                      /* log2(granularity) */

  struct bitmap map;                   /* live map: exact */
  struct bitmap retained;              /* bits taken by cbt_swap_fast since the file was
                                          last rewritten: the file keeps holding them */
  struct bitmap nbhd;                  /* [nnb] persisted neighbourhoods */
  _Atomic uint64_t *nbhd_seq;          /* [nbhd.nwords] commit carrying the latest nbhd set */
  _Atomic uint64_t durable_seq;        /* last durable commit */
  _Atomic uint64_t ncommits;           /* committer batches written (cbt_commit_count) */
  _Atomic uint64_t nset;               /* bits set in map */
  _Atomic bool failed;                 /* fail mode */
  _Atomic int inject_err;              /* test hook: map writes fail with it */
  _Atomic(const char *) state_ptr;     /* state or fail_state */
  _Atomic uint64_t generation;

  pthread_rwlock_t swap_lock;

  pthread_mutex_t lock;
  pthread_cond_t work;                 /* to the committer: pages pending / file free */
  pthread_cond_t done;                 /* to waiters: durable_seq moved, fail mode, file free */
  uint64_t open_seq;
  struct bitmap pending;               /* [npages] pages changed since the last batch */
  uint64_t npending;
  bool committing;
  unsigned want_file;                  /* sync/close waiting for the file: committer yields */
  bool stop;
  uint64_t full_seq;                   /* commit of the last full write (0: none) */
  bool hdr_coarse;                     /* the header on disk has CBT_FLAG_COARSE */

  int fd;                              /* the map file; used only while committing */
  uint64_t *batch;                     /* [npages] the committer's page list */
  unsigned char *iobuf;                /* IO_PAGES pages, for whoever is committing */
  pthread_t committer;
  bool committer_started;
  char state[320];                     /* set at open, then constant */
};

/* ---- encoding ---- */

static void put32(unsigned char *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static void put64(unsigned char *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }
static uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
static uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }

static void header_build(const struct cbt *c, uint64_t generation, uint64_t flags,
                         unsigned char *buf)
{
  memset(buf, 0, CBT_PAGE_SIZE);
  memcpy(buf, CBT_MAGIC, 8);
  put32(buf + 8, CBT_VERSION);
  put32(buf + 12, CBT_PAGE_SIZE);
  put64(buf + 16, c->granularity);
  put64(buf + 24, c->disk_size);
  put64(buf + 32, c->nbits);
  put64(buf + 40, generation);
  put64(buf + 48, flags);
  put64(buf + HDR_CSUM_OFF, XXH64(buf, HDR_CSUM_OFF, 0));
}

/* The bits of word wi of the region map that persisted neighbourhoods cover
 * (bits past nbits included: the caller masks them). */
static uint64_t nbhd_word(const struct bitmap *nb, uint64_t wi)
{
  uint64_t n0 = wi * NB_PER_WORD;   /* NB_PER_WORD whole neighbourhoods, one nbhd word */
  uint64_t bits = atomic_load_explicit(&nb->words[n0 >> 6], memory_order_relaxed) >> (n0 & 63);
  if (NB_PER_WORD < 64)
    bits &= (UINT64_C(1) << (NB_PER_WORD % 64)) - 1;
  const uint64_t span_mask = SPAN == 64 ? UINT64_MAX : (UINT64_C(1) << (SPAN % 64)) - 1;
  uint64_t out = 0;
  for (unsigned k = 0; bits; k++, bits >>= 1)
    if (bits & 1)
      out |= span_mask << (k * SPAN % 64);
  return out;
}

/* Bit page p (file page p + 1): the bits of bm (NULL: none) OR those of
 * extra (NULL: none) OR, when nb is given, every region of the
 * neighbourhoods set in nb. */
static void page_build(const struct cbt *c, const struct bitmap *bm, const struct bitmap *extra,
                       const struct bitmap *nb, uint64_t p, unsigned char *buf)
{
  uint64_t w0 = p * PAGE_WORDS, nwords = DIV_ROUND_UP(c->nbits, 64);
  for (uint64_t i = 0; i < PAGE_WORDS; i++) {
    uint64_t w = 0, wi = w0 + i;
    if (wi < nwords) {
      if (bm)
        w = atomic_load_explicit(&bm->words[wi], memory_order_relaxed);
      if (extra)
        w |= atomic_load_explicit(&extra->words[wi], memory_order_relaxed);
      if (nb)
        w |= nbhd_word(nb, wi);
      if (wi == nwords - 1 && (c->nbits & 63))
        w &= (UINT64_C(1) << (c->nbits & 63)) - 1;   /* bits past nbits stay zero */
    }
    put64(buf + i * 8, w);
  }
  put64(buf + PAGE_WORDS * 8, XXH64(buf, PAGE_WORDS * 8, p + 1));
}

static bool page_valid(const unsigned char *buf, uint64_t p)
{
  return get64(buf + PAGE_WORDS * 8) == XXH64(buf, PAGE_WORDS * 8, p + 1);
}

/* ---- file IO (caller is the one committing, or the opener) ---- */

static int map_pwrite(struct cbt *c, int fd, const void *buf, size_t len, uint64_t off)
{
  int e = atomic_load_explicit(&c->inject_err, memory_order_relaxed);
  if (e)
    return -e;
  return pwrite_full(fd, buf, len, (off_t)off) < 0 ? -errno : 0;
}

static int map_sync(struct cbt *c, int fd)
{
  int e = atomic_load_explicit(&c->inject_err, memory_order_relaxed);
  if (e)
    return -e;
  while (fdatasync(fd) < 0) {
    if (errno != EINTR)
      return -errno;
  }
  return 0;
}

/* Writes the header (generation, flags) and syncs it. */
static int write_header(struct cbt *c, int fd, uint64_t generation, uint64_t flags)
{
  header_build(c, generation, flags, c->iobuf);
  int r = map_pwrite(c, fd, c->iobuf, CBT_PAGE_SIZE, 0);
  return r ? r : map_sync(c, fd);
}

/* Writes every bit page of bm (NULL: clean), exact bits only, then the
 * header with flags 0 (exact), to fd.  in_place: fd is the live map file,
 * whose header may say CBT_FLAG_COARSE; the pages are synced before the
 * header is written, so no crash can leave a header that calls the old
 * coarse pages exact. */
static int write_whole(struct cbt *c, int fd, uint64_t generation, const struct bitmap *bm,
                       bool in_place)
{
  int r = 0;
  for (uint64_t p = 0; r == 0 && p < c->npages; p += IO_PAGES) {
    uint64_t n = MIN((uint64_t)IO_PAGES, c->npages - p);
    for (uint64_t i = 0; i < n; i++)
      page_build(c, bm, NULL, NULL, p + i, c->iobuf + i * CBT_PAGE_SIZE);
    r = map_pwrite(c, fd, c->iobuf, n * CBT_PAGE_SIZE, (p + 1) * CBT_PAGE_SIZE);
  }
  if (r == 0 && in_place)
    r = map_sync(c, fd);
  return r ? r : write_header(c, fd, generation, 0);
}

/* Writes a complete map to path.tmp, syncs it, renames it over path and syncs
 * the directory; then it is c->fd.  A crash at any point leaves either the
 * old file or the new one. */
static int write_new_file(struct cbt *c, uint64_t generation, const struct bitmap *bm)
{
  int fd = open(c->tmp_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    return -errno;
  int r = write_whole(c, fd, generation, bm, false);
  if (r == 0)
    r = fsync(fd) < 0 ? -errno : 0;       /* size and metadata too, before the rename */
  if (r == 0)
    r = rename(c->tmp_path, c->path) < 0 ? -errno : 0;
  if (r == 0)
    r = fsync_parent_dir(c->path) < 0 ? -errno : 0;
  if (r < 0) {
    close(fd);
    unlink(c->tmp_path);
    return r;
  }
  if (c->fd >= 0)
    close(c->fd);
  c->fd = fd;
  return 0;
}

/* Writes the listed bit pages (sorted): the exact map OR the retained bits
 * OR the persisted neighbourhoods, then one fdatasync. */
static int write_pages(struct cbt *c, const uint64_t *pages, uint64_t n)
{
  uint64_t i = 0;
  while (i < n) {
    uint64_t run = 1;   /* consecutive pages go in one pwrite */
    while (i + run < n && run < IO_PAGES && pages[i + run] == pages[i] + run)
      run++;
    for (uint64_t k = 0; k < run; k++)
      page_build(c, &c->map, &c->retained, &c->nbhd, pages[i + k],
                 c->iobuf + k * CBT_PAGE_SIZE);
    int r = map_pwrite(c, c->fd, c->iobuf, run * CBT_PAGE_SIZE, (pages[i] + 1) * CBT_PAGE_SIZE);
    if (r < 0)
      return r;
    i += run;
  }
  return map_sync(c, c->fd);
}

/* ---- fail mode ---- */

/* __fn: caller holds c->lock.  A map we could not write may be stale on disk:
 * it goes, so that a restart finds no map and marks everything dirty. */
static void fail_enter_locked(struct cbt *c, const char *what, int err)
{
  if (atomic_load(&c->failed))
    return;
  atomic_store(&c->failed, true);
  atomic_store(&c->state_ptr, fail_state);
  bool gone = unlink(c->path) == 0 || errno == ENOENT;
  if (gone)
    fsync_parent_dir(c->path);
  log_error(c->disk_name,
            "cbt: cannot %s map %s: %s; writes to clean regions fail until the map "
            "can be rewritten (%s)",
            what, c->path, strerror(-err),
            gone ? "map file removed: a restart will mark the whole disk dirty"
                 : "and the map file could not be removed");
}

/* __fn: caller holds c->lock; a complete map file was just written. */
static void fail_leave_locked(struct cbt *c)
{
  if (!atomic_load(&c->failed))
    return;
  atomic_store(&c->failed, false);
  atomic_store(&c->state_ptr, c->state);
  log_warn(c->disk_name, "cbt: map %s rewritten in full; leaving fail mode", c->path);
}

/* ---- committer ---- */

/* __fn: caller holds c->lock; waits until no one is writing the file, then
 * makes the caller the one. */
static void file_acquire_locked(struct cbt *c)
{
  c->want_file++;        /* the committer takes no new batch meanwhile: no starvation */
  while (c->committing)
    pthread_cond_wait(&c->done, &c->lock);
  c->want_file--;
  c->committing = true;
}

/* __fn: caller holds c->lock. */
static void file_release_locked(struct cbt *c)
{
  c->committing = false;
  pthread_cond_broadcast(&c->done);
  pthread_cond_signal(&c->work);
}

static void *committer_main(void *arg)
{
  struct cbt *c = arg;
  pthread_mutex_lock(&c->lock);
  for (;;) {
    if (c->committing || c->want_file || (c->npending == 0 && !c->stop)) {
      pthread_cond_wait(&c->work, &c->lock);
      continue;
    }
    if (c->npending == 0)
      break;                                   /* stop, and nothing left */
    uint64_t seq = c->open_seq++;              /* later marks go to the next batch */
    uint64_t n = 0;
    for (uint64_t p = bitmap_next(&c->pending, 0, true); p < c->npages;
         p = bitmap_next(&c->pending, p + 1, true)) {
      c->batch[n++] = p;
      bitmap_clear(&c->pending, p);
    }
    c->npending = 0;
    bool failed = atomic_load(&c->failed);
    bool need_hdr = !c->hdr_coarse;
    uint64_t gen = atomic_load(&c->generation);
    c->committing = true;
    pthread_mutex_unlock(&c->lock);

    /* In fail mode nothing is written: the waiters learn -EIO, and the next
     * full rewrite (sync, swap) carries these pages.  The first pages with
     * coarse bits after an exact map need the header to say so first, and
     * durably: a crash must never find coarse pages under an exact header. */
    int r = 0;
    if (!failed && need_hdr)
      r = write_header(c, c->fd, gen, CBT_FLAG_COARSE);
    if (!failed && r == 0)
      r = write_pages(c, c->batch, n);

    pthread_mutex_lock(&c->lock);
    c->committing = false;
    if (r < 0) {
      fail_enter_locked(c, "write", r);
    } else if (!failed) {
      c->hdr_coarse = true;
      atomic_fetch_add_explicit(&c->ncommits, 1, memory_order_relaxed);
      atomic_store_explicit(&c->durable_seq, seq, memory_order_release);
    }
    pthread_cond_broadcast(&c->done);
  }
  pthread_mutex_unlock(&c->lock);
  return NULL;
}

/* ---- marks ---- */

/* Are bits [first, last] all set?  Acquire loads: see the file comment. */
static bool range_all_set(const struct bitmap *b, uint64_t first, uint64_t last)
{
  for (uint64_t w = first >> 6; w <= last >> 6; w++) {
    uint64_t lo = w == first >> 6 ? (first & 63) : 0;
    uint64_t hi = w == last >> 6 ? (last & 63) : 63;
    uint64_t mask = (UINT64_MAX >> (63 - hi)) & (UINT64_MAX << lo);
    if ((atomic_load_explicit(&b->words[w], memory_order_acquire) & mask) != mask)
      return false;
  }
  return true;
}

/* Sets bits [first, last]; returns how many were clear. */
static uint64_t range_set(struct bitmap *b, uint64_t first, uint64_t last)
{
  uint64_t newly = 0;
  for (uint64_t w = first >> 6; w <= last >> 6; w++) {
    uint64_t lo = w == first >> 6 ? (first & 63) : 0;
    uint64_t hi = w == last >> 6 ? (last & 63) : 63;
    uint64_t mask = (UINT64_MAX >> (63 - hi)) & (UINT64_MAX << lo);
    uint64_t old = atomic_fetch_or(&b->words[w], mask);
    newly += (uint64_t)__builtin_popcountll(mask & ~old);
  }
  return newly;
}

/* Can [first, last] be marked without persisting a neighbourhood?  True if
 * each neighbourhood it touches is persisted, or holds only exact bits that
 * are already set (durable: see the file comment); then *ticket is the
 * commit to wait for (0: none) and *all_exact says whether every exact bit
 * is set already.  Load order (exact, nbhd, nbhd_seq): see the file comment. */
static bool range_covered(struct cbt *c, uint64_t first, uint64_t last, uint64_t durable,
                          uint64_t *ticket, bool *all_exact)
{
  uint64_t t = 0;
  bool all = true;
  for (uint64_t n = first / SPAN; n <= last / SPAN; n++) {
    uint64_t lo = MAX(first, n * SPAN), hi = MIN(last, n * SPAN + SPAN - 1);
    bool exact = range_all_set(&c->map, lo, hi);
    if (bitmap_test(&c->nbhd, n)) {
      uint64_t s = atomic_load_explicit(&c->nbhd_seq[n >> 6], memory_order_acquire);
      if (s > durable && s > t)
        t = s;
    } else if (!exact) {
      return false;
    }
    all &= exact;
  }
  *ticket = t;
  *all_exact = all;
  return true;
}

/* Sets the exact bits of [first, last] (covered: no file change needed). */
static void set_exact(struct cbt *c, uint64_t first, uint64_t last)
{
  uint64_t newly = range_set(&c->map, first, last);
  if (newly)
    atomic_fetch_add_explicit(&c->nset, newly, memory_order_relaxed);
}

uint64_t cbt_mark(struct cbt *c, uint64_t off, uint64_t len)
{
  if (len == 0 || off >= c->disk_size)
    return 0;
  uint64_t first = off >> c->shift;
  uint64_t last = MIN((off + len - 1) >> c->shift, c->nbits - 1);

  /* Fast path: atomic loads, and an OR for exact bits not yet set. */
  uint64_t ticket = 0;
  bool all = false;
  uint64_t durable = atomic_load_explicit(&c->durable_seq, memory_order_acquire);
  if (range_covered(c, first, last, durable, &ticket, &all)) {
    if (!all)
      set_exact(c, first, last);
    return ticket;
  }

  pthread_mutex_lock(&c->lock);
  durable = atomic_load_explicit(&c->durable_seq, memory_order_acquire);
  if (range_covered(c, first, last, durable, &ticket, &all)) {   /* persisted meanwhile */
    if (!all)
      set_exact(c, first, last);
    pthread_mutex_unlock(&c->lock);
    return ticket;
  }
  if (atomic_load(&c->failed)) {
    pthread_mutex_unlock(&c->lock);
    return CBT_TICKET_FAILED;
  }
  /* Persist every neighbourhood that needs it: nbhd_seq, then the nbhd bit,
   * then (below) the exact bits. */
  uint64_t seq = c->open_seq;
  ticket = 0;
  for (uint64_t n = first / SPAN; n <= last / SPAN; n++) {
    if (bitmap_test(&c->nbhd, n)) {
      uint64_t s = atomic_load_explicit(&c->nbhd_seq[n >> 6], memory_order_acquire);
      if (s > durable && s > ticket)
        ticket = s;
      continue;
    }
    uint64_t lo = MAX(first, n * SPAN), hi = MIN(last, n * SPAN + SPAN - 1);
    if (range_all_set(&c->map, lo, hi))
      continue;                                  /* durable exact bits */
    atomic_store_explicit(&c->nbhd_seq[n >> 6], seq, memory_order_release);
    bitmap_set(&c->nbhd, n);
    uint64_t p = n * SPAN / CBT_PAGE_BITS;       /* a neighbourhood is in one page */
    if (!bitmap_set(&c->pending, p))
      c->npending++;
    ticket = seq;
  }
  set_exact(c, first, last);
  if (ticket == seq)
    pthread_cond_signal(&c->work);
  pthread_mutex_unlock(&c->lock);
  return ticket;
}

bool cbt_ticket_done(struct cbt *c, uint64_t ticket)
{
  if (ticket == 0)
    return true;
  if (ticket == CBT_TICKET_FAILED)
    return false;
  return atomic_load_explicit(&c->durable_seq, memory_order_acquire) >= ticket;
}

int cbt_wait(struct cbt *c, uint64_t ticket)
{
  if (cbt_ticket_done(c, ticket))
    return 0;
  if (ticket == CBT_TICKET_FAILED)
    return -EIO;
  pthread_mutex_lock(&c->lock);
  while (atomic_load(&c->durable_seq) < ticket && !atomic_load(&c->failed))
    pthread_cond_wait(&c->done, &c->lock);
  int r = atomic_load(&c->durable_seq) >= ticket ? 0 : -EIO;
  pthread_mutex_unlock(&c->lock);
  return r;
}

void cbt_write_begin(struct cbt *c) { pthread_rwlock_rdlock(&c->swap_lock); }
bool cbt_write_trybegin(struct cbt *c) { return pthread_rwlock_tryrdlock(&c->swap_lock) == 0; }
void cbt_write_end(struct cbt *c) { pthread_rwlock_unlock(&c->swap_lock); }

/* ---- sync, snapshot, swap ---- */

int cbt_sync(struct cbt *c)
{
  /* Writers excluded: the persisted neighbourhoods are dropped below, and a
   * writer must not rely on one while the exact pages replace it. */
  pthread_rwlock_wrlock(&c->swap_lock);
  pthread_mutex_lock(&c->lock);
  file_acquire_locked(c);
  /* A full write carries every mark made so far: it is commit `seq`. */
  uint64_t seq = c->open_seq++;
  bitmap_clear_all(&c->pending);
  c->npending = 0;
  bool failed = atomic_load(&c->failed);
  uint64_t gen = atomic_load(&c->generation);
  pthread_mutex_unlock(&c->lock);

  /* In fail mode the old file may be gone or stale: a new one replaces it.
   * Otherwise in place: exact pages, sync, then the header without
   * CBT_FLAG_COARSE, sync. */
  int r = failed ? write_new_file(c, gen, &c->map) : write_whole(c, c->fd, gen, &c->map, true);

  pthread_mutex_lock(&c->lock);
  if (r == 0) {
    /* The file is exact now: no neighbourhood is persisted beyond it, and
     * the retained bits are gone from it (cbt.h: cbt_swap_fast). */
    bitmap_clear_all(&c->nbhd);
    bitmap_clear_all(&c->retained);
    c->hdr_coarse = false;
    atomic_store_explicit(&c->durable_seq, seq, memory_order_release);
    c->full_seq = seq;
    fail_leave_locked(c);
  } else {
    fail_enter_locked(c, "sync", r);
  }
  file_release_locked(c);
  pthread_mutex_unlock(&c->lock);
  pthread_rwlock_unlock(&c->swap_lock);
  return r;
}

int cbt_snapshot(struct cbt *c, struct bitmap *out)
{
  if (out->nbits != c->nbits)
    return -EINVAL;
  pthread_rwlock_rdlock(&c->swap_lock);   /* no swap clears the map under us */
  bitmap_copy(out, &c->map);
  pthread_rwlock_unlock(&c->swap_lock);
  return 0;
}

int cbt_swap(struct cbt *c, struct bitmap *out, uint64_t *new_generation)
{
  return cbt_swap_keep(c, out, new_generation, NULL, NULL);
}

int cbt_swap_keep(struct cbt *c, struct bitmap *out, uint64_t *new_generation,
                  cbt_keep_fn keep, void *opaque)
{
  if (out->nbits != c->nbits)
    return -EINVAL;
  pthread_rwlock_wrlock(&c->swap_lock);   /* writers drain; none starts */

  /* Let the committer finish what is pending, so the old file is a complete
   * superset up to the moment the new one replaces it. */
  pthread_mutex_lock(&c->lock);
  while (c->committing || c->npending) {
    pthread_cond_signal(&c->work);
    pthread_cond_wait(&c->done, &c->lock);
  }
  c->committing = true;
  uint64_t seq = c->open_seq++;
  uint64_t gen = atomic_load(&c->generation) + 1;
  pthread_mutex_unlock(&c->lock);

  /* Writers are excluded: every write done so far is in `out`; every later
   * one finds both levels clear and persists its neighbourhood anew.  The
   * keeper makes the bits durable elsewhere before the old file, which holds
   * them until now, is replaced by a clean one. */
  bitmap_copy(out, &c->map);
  int r = keep ? keep(opaque, out) : 0;
  if (r < 0)
    log_error(c->disk_name, "cbt: the swapped-out map could not be kept (%s); "
              "the map is unchanged", strerror(-r));
  if (r == 0) {
    r = write_new_file(c, gen, NULL);
    if (r < 0)
      log_error(c->disk_name, "cbt: cannot write a clean map %s: %s; the map is unchanged",
                c->tmp_path, strerror(-r));
  }
  if (r == 0) {
    bitmap_clear_all(&c->map);
    bitmap_clear_all(&c->nbhd);
    bitmap_clear_all(&c->retained);
    atomic_store(&c->nset, 0);
    atomic_store(&c->generation, gen);
    if (new_generation)
      *new_generation = gen;
  }

  pthread_mutex_lock(&c->lock);
  if (r == 0) {
    /* Every mark made before the swap is in `out`; the file is clean and
     * durable: all tickets issued so far are settled. */
    c->hdr_coarse = false;
    atomic_store_explicit(&c->durable_seq, seq, memory_order_release);
    fail_leave_locked(c);
  }
  file_release_locked(c);
  pthread_mutex_unlock(&c->lock);
  pthread_rwlock_unlock(&c->swap_lock);
  return r;
}

int cbt_swap_fast(struct cbt *c, struct bitmap *out, uint64_t *new_generation)
{
  if (out->nbits != c->nbits)
    return -EINVAL;
  pthread_rwlock_wrlock(&c->swap_lock);   /* writers drain; none starts */
  /* No file IO: the file keeps every bit it holds (the retained ones are
   * ORed into every page the committer writes from now on), so it stays a
   * superset of what was swapped out until the next full rewrite. */
  pthread_mutex_lock(&c->lock);
  bitmap_copy(out, &c->map);
  for (uint64_t i = 0; i < c->map.nwords; i++) {
    uint64_t w = atomic_exchange_explicit(&c->map.words[i], 0, memory_order_relaxed);
    if (w)
      atomic_fetch_or_explicit(&c->retained.words[i], w, memory_order_relaxed);
  }
  atomic_store(&c->nset, 0);
  uint64_t gen = atomic_fetch_add(&c->generation, 1) + 1;
  c->full_seq = 0;             /* the file is no longer exact: cbt_close rewrites it */
  pthread_mutex_unlock(&c->lock);
  pthread_rwlock_unlock(&c->swap_lock);
  if (new_generation)
    *new_generation = gen;
  return 0;
}

/* ---- open ---- */

static void cbt_free(struct cbt *c)
{
  if (!c)
    return;
  if (c->fd >= 0)
    close(c->fd);
  bitmap_free(&c->map);
  bitmap_free(&c->pending);
  bitmap_free(&c->nbhd);
  bitmap_free(&c->retained);
  free(c->nbhd_seq);
  free(c->batch);
  free(c->iobuf);
  free(c->path);
  free(c->tmp_path);
  free(c->disk_name);
  pthread_rwlock_destroy(&c->swap_lock);
  pthread_mutex_destroy(&c->lock);
  pthread_cond_destroy(&c->work);
  pthread_cond_destroy(&c->done);
  free(c);
}

static struct cbt *cbt_alloc(const char *path, const char *disk_name, uint64_t disk_size,
                             uint64_t granularity)
{
  struct cbt *c = calloc(1, sizeof *c);
  if (!c)
    return NULL;
  c->fd = -1;
  pthread_rwlockattr_t ra;
  pthread_rwlockattr_init(&ra);
  /* A swap must not starve behind a stream of writers. */
  pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init(&c->swap_lock, &ra);
  pthread_rwlockattr_destroy(&ra);
  pthread_mutex_init(&c->lock, NULL);
  pthread_cond_init(&c->work, NULL);
  pthread_cond_init(&c->done, NULL);
  c->disk_size = disk_size;
  c->granularity = granularity;
  c->shift = (unsigned)__builtin_ctzll(granularity);
  c->nbits = DIV_ROUND_UP(disk_size, granularity);
  c->npages = DIV_ROUND_UP(c->nbits, CBT_PAGE_BITS);
  c->open_seq = 1;
  atomic_init(&c->state_ptr, c->state);
  c->path = strdup(path);
  c->disk_name = strdup(disk_name ? disk_name : "");
  if (!c->path || !c->disk_name || asprintf(&c->tmp_path, "%s.tmp", path) < 0) {
    c->tmp_path = NULL;
    cbt_free(c);
    return NULL;
  }
  c->batch = calloc(MAX(c->npages, 1), sizeof *c->batch);
  c->iobuf = malloc((size_t)IO_PAGES * CBT_PAGE_SIZE);
  if (!c->batch || !c->iobuf || bitmap_init(&c->map, c->nbits) < 0 ||
      bitmap_init(&c->pending, c->npages) < 0 ||
      bitmap_init(&c->nbhd, DIV_ROUND_UP(c->nbits, SPAN)) < 0 ||
      bitmap_init(&c->retained, c->nbits) < 0 ||
      !(c->nbhd_seq = calloc(MAX(c->nbhd.nwords, 1), sizeof *c->nbhd_seq))) {
    cbt_free(c);
    return NULL;
  }
  return c;
}

static void set_all_dirty(struct cbt *c)
{
  bitmap_set_all(&c->map);
  atomic_store(&c->nset, c->nbits);
}

/* What loading found. */
enum load_result {
  LOAD_OK,          /* trusted as is */
  LOAD_REWRITE,     /* header good, some pages refused: rewrite in place */
  LOAD_REPLACE,     /* file refused as a whole: write a new one */
};

/* Formats a power-of-two byte count ("2 MiB"). */
static void fmt_size(char *buf, size_t len, uint64_t bytes)
{
  static const char *const units[] = { "bytes", "KiB", "MiB", "GiB", "TiB" };
  unsigned u = 0;
  while (u + 1 < ARRAY_SIZE(units) && bytes >= 1024 && bytes % 1024 == 0) {
    bytes /= 1024;
    u++;
  }
  snprintf(buf, len, "%llu %s", (unsigned long long)bytes, units[u]);
}

/* Loads the map file into c->map.  *coarse: the header has CBT_FLAG_COARSE
 * (not closed cleanly; only meaningful with LOAD_OK or LOAD_REWRITE). */
static enum load_result load_file(struct cbt *c, int fd, bool *coarse, char *why, size_t whylen)
{
  *coarse = false;
  struct stat st;
  if (fstat(fd, &st) < 0) {
    snprintf(why, whylen, "cannot stat the map file: %s", strerror(errno));
    set_all_dirty(c);
    return LOAD_REPLACE;
  }
  uint64_t fsize = (uint64_t)st.st_size;
  unsigned char *h = c->iobuf;
  if (fsize < CBT_PAGE_SIZE) {
    snprintf(why, whylen, "the map file is truncated (%llu bytes, no complete header)",
             (unsigned long long)fsize);
    set_all_dirty(c);
    return LOAD_REPLACE;
  }
  if (pread_full(fd, h, CBT_PAGE_SIZE, 0) < 0) {
    snprintf(why, whylen, "cannot read the map header: %s", strerror(errno));
    set_all_dirty(c);
    return LOAD_REPLACE;
  }
  if (memcmp(h, CBT_MAGIC, 8) != 0) {
    snprintf(why, whylen, "the map file has no %s magic", CBT_MAGIC);
    set_all_dirty(c);
    return LOAD_REPLACE;
  }
  if (get64(h + HDR_CSUM_OFF) != XXH64(h, HDR_CSUM_OFF, 0)) {
    snprintf(why, whylen, "the map header fails its checksum");
    set_all_dirty(c);
    return LOAD_REPLACE;
  }
  uint32_t version = get32(h + 8), page_size = get32(h + 12);
  uint64_t gran = get64(h + 16), size = get64(h + 24), nbits = get64(h + 32);
  uint64_t gen = get64(h + 40), flags = get64(h + 48);
  if (version != CBT_VERSION || page_size != CBT_PAGE_SIZE) {
    snprintf(why, whylen, "unsupported map version %u (page size %u)", version, page_size);
    set_all_dirty(c);
    return LOAD_REPLACE;
  }
  atomic_store(&c->generation, gen);   /* a valid header keeps its generation */
  if (gran != c->granularity) {
    snprintf(why, whylen, "the map granularity %llu differs from the disk's %llu",
             (unsigned long long)gran, (unsigned long long)c->granularity);
  } else if (size != c->disk_size || nbits != c->nbits) {
    snprintf(why, whylen, "the map is for a disk of %llu bytes, the disk has %llu",
             (unsigned long long)size, (unsigned long long)c->disk_size);
  } else if (flags & CBT_FLAG_UNTRACKED) {
    snprintf(why, whylen, "the disk was served with change tracking off");
  } else if (flags & ~(uint64_t)CBT_FLAG_COARSE) {
    snprintf(why, whylen, "unknown map flags %#llx", (unsigned long long)flags);
  } else {
    *coarse = (flags & CBT_FLAG_COARSE) != 0;
    goto pages;
  }
  set_all_dirty(c);
  return LOAD_REPLACE;

pages:;
  uint64_t bad = 0, missing = 0, first_missing = 0, nset = 0;
  char list[96] = "";
  size_t listlen = 0;
  for (uint64_t p = 0; p < c->npages; p += IO_PAGES) {
    uint64_t n = MIN((uint64_t)IO_PAGES, c->npages - p);
    uint64_t avail = fsize > (p + 1) * CBT_PAGE_SIZE
                       ? MIN(n, (fsize - (p + 1) * CBT_PAGE_SIZE) / CBT_PAGE_SIZE) : 0;
    if (avail && pread_full(fd, c->iobuf, avail * CBT_PAGE_SIZE, (off_t)((p + 1) * CBT_PAGE_SIZE)) < 0)
      avail = 0;   /* unreadable: as if missing */
    for (uint64_t i = 0; i < n; i++) {
      uint64_t pg = p + i;
      uint64_t b0 = pg * CBT_PAGE_BITS;
      uint64_t nb = MIN((uint64_t)CBT_PAGE_BITS, c->nbits - b0);
      const unsigned char *buf = c->iobuf + i * CBT_PAGE_SIZE;
      if (i >= avail || !page_valid(buf, pg)) {
        if (i >= avail) {
          if (!missing++)
            first_missing = pg + 1;
        } else {
          if (bad++ < 4)
            listlen += (size_t)snprintf(list + listlen, sizeof list - MIN(listlen, sizeof list),
                                        "%s%llu", bad > 1 ? ", " : "", (unsigned long long)(pg + 1));
          listlen = MIN(listlen, sizeof list);
        }
        bitmap_set_range(&c->map, b0, nb);   /* refused: dirty, never clean */
        nset += nb;
        continue;
      }
      uint64_t w0 = pg * PAGE_WORDS;
      for (uint64_t k = 0; k < PAGE_WORDS && w0 + k < c->map.nwords; k++) {
        uint64_t w = get64(buf + k * 8);
        if (w0 + k == c->map.nwords - 1 && (c->nbits & 63))
          w &= (UINT64_C(1) << (c->nbits & 63)) - 1;   /* keep the tail clear */
        atomic_store_explicit(&c->map.words[w0 + k], w, memory_order_relaxed);
        nset += (uint64_t)__builtin_popcountll(w);
      }
    }
  }
  atomic_store(&c->nset, nset);
  if (!bad && !missing)
    return LOAD_OK;
  size_t n = 0;
  if (bad)
    n += (size_t)snprintf(why, whylen, "%llu of %llu bit pages fail their checksum (page%s %s%s)",
                          (unsigned long long)bad, (unsigned long long)c->npages,
                          bad > 1 ? "s" : "", list, bad > 4 ? ", ..." : "");
  if (missing && n < whylen)
    snprintf(why + n, whylen - n, "%sthe map file is truncated (pages %llu to %llu missing)",
             n ? "; " : "", (unsigned long long)first_missing,
             (unsigned long long)(first_missing + missing - 1));
  return LOAD_REWRITE;
}

struct cbt *cbt_open_ex(const char *path, const char *disk_name, uint64_t disk_size,
                        uint64_t granularity, unsigned flags, char *err, size_t errlen)
{
  if (granularity == 0)
    granularity = CBT_DEFAULT_GRANULARITY;
  if (granularity < 4096 || (granularity & (granularity - 1))) {
    snprintf(err, errlen, "cbt granularity %llu is not a power of two >= 4096",
             (unsigned long long)granularity);
    return NULL;
  }
  struct cbt *c = cbt_alloc(path, disk_name, disk_size, granularity);
  if (!c) {
    snprintf(err, errlen, "out of memory for the dirty map");
    return NULL;
  }

  char why[256] = "";
  bool coarse = false;
  enum load_result lr = LOAD_REPLACE;
  if (flags & CBT_OPEN_NEW) {
    snprintf(c->state, sizeof c->state, "created");
  } else {
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
      if (errno == ENOENT)
        snprintf(why, sizeof why, "there is no map file (deleted, or never written)");
      else
        snprintf(why, sizeof why, "the map file cannot be opened: %s", strerror(errno));
      set_all_dirty(c);
    } else {
      c->fd = fd;
      lr = load_file(c, fd, &coarse, why, sizeof why);
    }
  }
  /* Not closed cleanly: the bits are a superset, exact to the neighbourhood;
   * they are the exact map from now on (over-reporting is safe). */
  char precision[32] = "";
  if (coarse) {
    fmt_size(precision, sizeof precision, (uint64_t)SPAN * granularity);
    char rest[256];
    snprintf(rest, sizeof rest, "%s", why);
    snprintf(why, sizeof why, "unclean shutdown; regions marked at %s precision%s%.170s",
             precision, rest[0] ? "; " : "", rest);
  }
  c->hdr_coarse = coarse && lr == LOAD_OK;   /* a rewrite below is exact */

  int r = 0;
  if (lr == LOAD_REWRITE) {
    r = write_whole(c, c->fd, atomic_load(&c->generation), &c->map, true);
    if (r < 0)
      lr = LOAD_REPLACE;   /* in place failed: try a new file */
  }
  if (lr == LOAD_REPLACE)
    r = write_new_file(c, atomic_load(&c->generation), &c->map);
  if (r < 0) {
    snprintf(err, errlen, "cannot write the dirty map %s: %s", path, strerror(-r));
    cbt_free(c);
    return NULL;
  }

  /* The file holds every neighbourhood whose bits are all set: those count
   * as persisted (a partly set one does not: its other regions are not in
   * the file). */
  for (uint64_t n = 0; n < c->nbhd.nbits; n++) {
    if (range_all_set(&c->map, n * SPAN, MIN(n * SPAN + SPAN, c->nbits) - 1))
      bitmap_set(&c->nbhd, n);
  }

  if (why[0]) {
    snprintf(c->state, sizeof c->state, "recovered: %s", why);
    if (coarse && lr == LOAD_OK)
      log_warn(disk_name, "cbt: map %s was not closed cleanly (ferryd killed or crashed): its "
               "regions are marked at %s precision around each write (%llu of %llu dirty)",
               path, precision, (unsigned long long)atomic_load(&c->nset),
               (unsigned long long)c->nbits);
    else
      log_warn(disk_name, "cbt: map %s refused in part or whole: %s; those regions are marked "
               "dirty (%llu of %llu)", path, why, (unsigned long long)atomic_load(&c->nset),
               (unsigned long long)c->nbits);
  } else if (!(flags & CBT_OPEN_NEW)) {
    snprintf(c->state, sizeof c->state, "ok");
  }

  if (pthread_create(&c->committer, NULL, committer_main, c) != 0) {
    snprintf(err, errlen, "cannot start the dirty map committer thread");
    cbt_free(c);
    return NULL;
  }
  c->committer_started = true;
  return c;
}

struct cbt *cbt_open(const char *path, const char *disk_name, uint64_t disk_size,
                     uint64_t granularity, char *err, size_t errlen)
{
  return cbt_open_ex(path, disk_name, disk_size, granularity, 0, err, errlen);
}

void cbt_close(struct cbt *c)
{
  if (!c)
    return;
  if (c->committer_started) {
    pthread_mutex_lock(&c->lock);
    c->stop = true;
    pthread_cond_signal(&c->work);
    pthread_mutex_unlock(&c->lock);
    pthread_join(c->committer, NULL);
  }
  /* A full write unless the last one (disk_sync_all) already holds it all. */
  if (atomic_load(&c->failed) || c->full_seq == 0 || c->open_seq != c->full_seq + 1)
    cbt_sync(c);   /* logs its own failure */
  cbt_free(c);
}

int cbt_invalidate(const char *path, const char *disk_name)
{
  int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0)
    return errno == ENOENT ? 0 : -errno;
  unsigned char h[CBT_PAGE_SIZE];
  int r = 0;
  if (pread_full(fd, h, sizeof h, 0) < 0 || memcmp(h, CBT_MAGIC, 8) != 0 ||
      get64(h + HDR_CSUM_OFF) != XXH64(h, HDR_CSUM_OFF, 0)) {
    close(fd);
    return 0;            /* refused at the next open anyway */
  }
  uint64_t flags = get64(h + 48);
  if (!(flags & CBT_FLAG_UNTRACKED)) {
    put64(h + 48, flags | CBT_FLAG_UNTRACKED);
    put64(h + HDR_CSUM_OFF, XXH64(h, HDR_CSUM_OFF, 0));
    if (pwrite_full(fd, h, sizeof h, 0) < 0 || fdatasync(fd) < 0)
      r = -errno;
  }
  close(fd);
  if (r < 0) {
    /* Cannot flag it: a missing map is refused as well. */
    if (unlink(path) == 0 || errno == ENOENT) {
      fsync_parent_dir(path);
      r = 0;
    }
  }
  if (r == 0 && !(flags & CBT_FLAG_UNTRACKED))
    log_info(disk_name, "cbt: map %s flagged: writes now go untracked, so the map will be "
             "all dirty when tracking is back", path);
  return r;
}

/* ---- accessors ---- */

uint64_t cbt_granularity(const struct cbt *c) { return c->granularity; }
uint64_t cbt_nbits(const struct cbt *c) { return c->nbits; }
uint64_t cbt_generation(const struct cbt *c) { return atomic_load(&c->generation); }
const char *cbt_state(const struct cbt *c) { return atomic_load(&c->state_ptr); }
const struct bitmap *cbt_bitmap(const struct cbt *c) { return &c->map; }
uint64_t cbt_dirty_count(const struct cbt *c) { return atomic_load_explicit(&c->nset, memory_order_relaxed); }
uint64_t cbt_commit_count(const struct cbt *c) { return atomic_load(&c->ncommits); }
bool cbt_failed(const struct cbt *c) { return atomic_load(&c->failed); }
void cbt_inject_write_error(struct cbt *c, int err) { atomic_store(&c->inject_err, err); }
