/* warm_dest: the destination of a warm migration: the cloud cache gateway
 * (docs/migration.md, "Warm migration"; the protocol in docs/protocol.md).
 *
 * DESIGN
 * The VM runs here at once against disks that are cloud caches
 * (src/cache/cache.h) over sparse local images: a miss asks the source for
 * its regions (WARM_FETCH on the session's connection, whichever it is now),
 * the source answers with WARM_FILL, the cache hydrates the rest in the
 * background at a bounded rate, hot regions first.  Guest writes stay here
 * (durable before they are acknowledged, the cache sees to it) and are
 * shipped back to the source every RPO interval as a *point*:
 *
 *   take     the VM is paused for an instant; each disk's dirty map (the
 *            CBT: written since the last point) is swapped out, and kept
 *            durably in MIG_DIR/point-N.DISK.bits before writers go on; the
 *            cache protects those regions (never evicted) and from then on a
 *            guest write to one of them first hands its point-time content
 *            to the point; the VM's state (sim) is taken; the VM resumes.
 *   capture  every region of the point not already handed over is read and
 *            appended to the journal MIG_DIR/point-N.wbj (src/cache/journal.h);
 *            then the journal is sealed (fsync, rename).
 *   ship     the journal's bytes go to the source in WARM_WB frames, then
 *            WARM_REQ wb_end; the source checks the whole file, applies it
 *            (its own journal makes that atomic) and answers.  Only then are
 *            the point's files removed and its regions evictable again.
 *
 * So the source image is always exactly some point.  Points are taken one at
 * a time; a point that cannot be shipped (link down) is shipped again, whole,
 * when the link is back.  After a crash here: a sealed journal is shipped
 * again (its regions protected again first); an unsealed one is dropped and
 * its regions are marked dirty again from the .bits files, so the next point
 * carries them.
 *
 * Degraded: the link down, or a guest read waiting for data, for longer than
 * degraded_after_s: reported (state stays warm) so that the operator can take
 * the VM back to the last point at the source (ferry migrate-back --last-rpo).
 *
 * Threads: the session runs on the link listener's thread of its connection
 * (frames from the source: FILL, MAP, BLOB, requests); a worker thread per
 * migration takes and ships points, pushes the figures to the source once a
 * second and watches for degradation; the cache's fetcher callback runs on
 * guest IO threads and the cache's hydration thread.  w->lock guards the
 * connection pointer (frames are sent under it, so the connection cannot be
 * closed under a sender) and the request flags.
 */
#include <endian.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "cache/cache.h"
#include "cache/journal.h"
#include "common/log.h"
#include "common/util.h"
#include "disk/disk.h"
#include "disk/registry.h"
#include "link/link.h"
#include "replicate/internal.h"
#include "vm/vm.h"

#define SEND_TIMEOUT_MS 10000
#define IDLE_TIMEOUT_NS (60ull * 1000000000)
#define WB_PIECE (1024u * 1024)
#define WB_REPLY_TIMEOUT_NS (300ull * 1000000000)
#define STATUS_EVERY_NS (1000ull * 1000000)
#define BITS_MAGIC "FERRYRPB"

struct fetch_ctx {
  struct warm_dst *w;
  unsigned di;
};

struct warm_dst {
  struct migration *m;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  struct link_conn *conn;          /* the source's current connection, NULL when down */
  uint64_t down_since_ns;          /* monotonic; 0 while up */
  bool stop;
  pthread_t worker;
  bool worker_started;
  struct fetch_ctx fctx[PROTO_MAX_DISKS];
  struct bitmap holes[PROTO_MAX_DISKS];       /* from MAP, until activation */
  uint64_t *hot[PROTO_MAX_DISKS];
  size_t nhot[PROTO_MAX_DISKS];
  bool rpo_now;                    /* the source asked for a point now */
  bool back;                       /* migrate-back asked: final point, VM stays paused */
  uint64_t back_req;
  uint64_t wb_req;                 /* the wb_end request awaiting its answer */
  bool wb_answered, wb_ok;
  char wb_error[256];
  uint64_t next_req;

  /* the point being taken or shipped (worker) */
  bool have_point;
  bool point_sealed;
  bool point_final;                /* migrate-back's point: the VM stays paused */
  uint64_t point_id, point_time_ns;
  struct bitmap point_bits[PROTO_MAX_DISKS];
  struct journal_writer *jw;
  _Atomic uint64_t point_bytes[PROTO_MAX_DISKS];   /* the point's bytes, for the figures */
  uint64_t last_point_mono;        /* when the last point was taken (interval) */
  uint64_t ship_not_before;        /* after a refusal: monotonic time of the next try */

  /* figures (lock) */
  uint64_t wan_in, wan_out;        /* fill bytes received; journal + request bytes sent */
  bool degraded;
  char degraded_why[200];
};

static void point_path(struct migration *m, uint64_t id, char *buf, size_t len)
{
  char dir[PATH_MAX];
  mig_dir(m, dir, sizeof dir);
  fmt_into(buf, len, "%s/point-%llu.wbj", dir, (unsigned long long)id);
}

static void bits_path(struct migration *m, uint64_t id, unsigned di, char *buf, size_t len)
{
  char dir[PATH_MAX];
  mig_dir(m, dir, sizeof dir);
  fmt_into(buf, len, "%s/point-%llu.%s.bits", dir, (unsigned long long)id, m->disks[di].name);
}

/* (takes m->lock: never call with it held) */
static uint64_t wp_u64(struct migration *m, const char *key)
{
  pthread_mutex_lock(&m->lock);
  uint64_t v = m->warm_prog ? (uint64_t)json_integer_value(json_object_get(m->warm_prog, key)) : 0;
  pthread_mutex_unlock(&m->lock);
  return v;
}

/* Stores a figure that must survive a restart (persisted with the row). */
static void wp_set(struct migration *m, const char *key, uint64_t v)
{
  pthread_mutex_lock(&m->lock);
  if (!m->warm_prog)
    m->warm_prog = json_object();
  json_object_set_new(m->warm_prog, key, json_integer((json_int_t)v));
  pthread_mutex_unlock(&m->lock);
}

/* ---- sending (under w->lock: the connection stays open meanwhile) ---- */

static int send_locked(struct warm_dst *w, uint8_t type, const void *p, uint32_t len)
{
  if (!w->conn)
    return -ENOTCONN;
  int r = link_send(w->conn, type, 0, p, len, 0, SEND_TIMEOUT_MS);
  if (r == 0)
    w->wan_out += len;
  return r < 0 ? -ENOTCONN : 0;
}

static int send_json(struct warm_dst *w, uint8_t type, json_t *j)
{
  char *text = json_dumps(j, JSON_COMPACT);
  json_decref(j);
  if (!text)
    return -ENOMEM;
  pthread_mutex_lock(&w->lock);
  int r = send_locked(w, type, text, (uint32_t)strlen(text));
  pthread_mutex_unlock(&w->lock);
  free(text);
  return r;
}

static int reply(struct warm_dst *w, uint64_t req, bool ok, const char *error, json_t *extra)
{
  json_t *j = extra ? extra : json_object();
  json_object_set_new(j, "req", json_integer((json_int_t)req));
  json_object_set_new(j, "ok", json_boolean(ok));
  if (error)
    json_object_set_new(j, "error", json_string(error));
  return send_json(w, MSG_WARM_REPLY, j);
}

/* The cache's fetcher: a miss or a hydration request goes to the source. */
static int fetch_request(void *opaque, uint64_t first, uint32_t n, bool urgent)
{
  struct fetch_ctx *fc = opaque;
  struct warm_dst *w = fc->w;
  (void)urgent;       /* the cache orders them; the source answers in order */
  uint8_t b[WARM_FETCH_SIZE];
  struct proto_fetch f = { .disk = fc->di, .count = n, .first = first };
  proto_fetch_encode(&f, b);
  pthread_mutex_lock(&w->lock);
  int r = send_locked(w, MSG_WARM_FETCH, b, sizeof b);
  pthread_mutex_unlock(&w->lock);
  return r;
}

/* ---- the points ---- */

struct keep_ctx {
  struct warm_dst *w;
  unsigned di;
};

static int capture_fn(void *opaque, uint64_t region, const void *data, uint32_t len)
{
  struct fetch_ctx *fc = opaque;
  struct warm_dst *w = fc->w;
  struct mig_disk *md = &w->m->disks[fc->di];
  if (!w->jw)
    return 0;       /* a point already sealed: its content is in the journal */
  return journal_append(w->jw, JOURNAL_KIND_DATA, fc->di, region * md->gran, len, data);
}

static int noop_capture(void *opaque, uint64_t region, const void *data, uint32_t len)
{
  (void)opaque, (void)region, (void)data, (void)len;
  return 0;
}

static int bits_write(const char *path, const struct bitmap *b, char *err, size_t errlen)
{
  size_t len = 16 + b->nwords * 8 + 8;
  uint8_t *buf = malloc(len);
  if (!buf)
    return -ENOMEM;
  memcpy(buf, BITS_MAGIC, 8);
  uint64_t nb = htole64(b->nbits);
  memcpy(buf + 8, &nb, 8);
  for (uint64_t i = 0; i < b->nwords; i++) {
    uint64_t v = htole64(atomic_load(&b->words[i]));
    memcpy(buf + 16 + 8 * i, &v, 8);
  }
  uint64_t h = htole64(XXH64(buf, len - 8, 0));
  memcpy(buf + len - 8, &h, 8);
  int r = write_file_atomic(path, buf, len, 0640, err, errlen);
  free(buf);
  return r < 0 ? -EIO : 0;
}

static int bits_read(const char *path, struct bitmap *b)
{
  FILE *f = fopen(path, "rb");
  if (!f)
    return -errno;
  size_t len = 16 + b->nwords * 8 + 8;
  uint8_t *buf = malloc(len + 1);
  size_t got = buf ? fread(buf, 1, len + 1, f) : 0;
  fclose(f);
  int r = -EBADMSG;
  uint64_t nb, h;
  if (buf && got == len && memcmp(buf, BITS_MAGIC, 8) == 0 &&
      (memcpy(&nb, buf + 8, 8), le64toh(nb) == b->nbits) &&
      (memcpy(&h, buf + len - 8, 8), le64toh(h) == XXH64(buf, len - 8, 0))) {
    for (uint64_t i = 0; i < b->nwords; i++) {
      uint64_t v;
      memcpy(&v, buf + 16 + 8 * i, 8);
      atomic_store(&b->words[i], le64toh(v));
    }
    r = 0;
  }
  free(buf);
  return r;
}

/* With the disk's writers stalled: the swapped-out bits become the point's,
 * durably, and the cache starts protecting them. */
static int keep_point_bits(void *opaque, const struct bitmap *bits)
{
  struct keep_ctx *k = opaque;
  struct warm_dst *w = k->w;
  struct migration *m = w->m;
  char path[PATH_MAX], err[256];
  bitmap_copy(&w->point_bits[k->di], bits);
  atomic_store(&w->point_bytes[k->di], bitmap_count(bits) * m->disks[k->di].gran);
  bits_path(m, w->point_id, k->di, path, sizeof path);
  int r = bits_write(path, bits, err, sizeof err);
  if (r < 0) {
    log_error(m->disks[k->di].name, "migration %s: %s", m->id, err);
    return r;
  }
  return cache_rpo_begin(disk_cache_layer(m->disks[k->di].d), bits, capture_fn,
                         &w->fctx[k->di]);
}

static void free_point(struct warm_dst *w)
{
  for (unsigned i = 0; i < PROTO_MAX_DISKS; i++) {
    atomic_store(&w->point_bytes[i], 0);
    bitmap_free(&w->point_bits[i]);
  }
  w->have_point = w->point_sealed = false;
}

/* The point is at the source (or given up): files go, regions evictable. */
static void end_point(struct warm_dst *w, bool applied)
{
  struct migration *m = w->m;
  char path[PATH_MAX];
  for (unsigned i = 0; i < m->ndisks; i++) {
    if (m->disks[i].d && disk_cache_layer(m->disks[i].d))
      cache_rpo_end(disk_cache_layer(m->disks[i].d));
    bits_path(m, w->point_id, i, path, sizeof path);
    unlink(path);
  }
  point_path(m, w->point_id, path, sizeof path);
  unlink(path);
  fsync_parent_dir(path);
  if (applied) {
    wp_set(m, "last_point", w->point_id);
    wp_set(m, "last_point_ns", w->point_time_ns);
    wp_set(m, "points", wp_u64(m, "points") + 1);
  }
  wp_set(m, "pending_point", 0);
  mig_persist(m);
  free_point(w);
}

/* Takes a point (see the file comment).  final: migrate-back, the VM stays
 * paused.  Returns 0 with the journal sealed, or -errno (nothing changed for
 * good: the swapped-out bits were kept and are folded back). */
static int take_point(struct warm_dst *w, bool final)
{
  struct migration *m = w->m;
  const struct migrations_shared *sh = mig_shared(m);
  char path[PATH_MAX], err[512];
  w->point_id = wp_u64(m, "next_point") + 1;
  wp_set(m, "next_point", w->point_id);
  wp_set(m, "pending_point", w->point_id);
  mig_persist(m);
  for (unsigned i = 0; i < m->ndisks; i++)
    if (bitmap_init(&w->point_bits[i], m->disks[i].nregions) < 0)
      return -ENOMEM;
  w->have_point = true;
  w->point_final = final;
  point_path(m, w->point_id, path, sizeof path);
  /* One instant for every disk and the VM's state: crash consistent. */
  bool paused = vm_migration_pause(sh->vms, m->vm, err, sizeof err) == 0;
  if (!paused)
    log_warn(m->vm, "migration %s: point %llu taken without pausing the VM: %s", m->id,
             (unsigned long long)w->point_id, err);
  w->point_time_ns = realtime_ns();
  w->jw = journal_create(path, w->point_id, w->point_time_ns, m->ndisks, err, sizeof err);
  if (!w->jw) {
    log_error(m->vm, "migration %s: cannot start point %llu: %s", m->id,
              (unsigned long long)w->point_id, err);
    if (paused && !final)
      vm_migration_resume(sh->vms, m->vm, err, sizeof err);
    free_point(w);
    return -EIO;
  }
  int r = 0;
  unsigned swapped = 0;
  for (unsigned i = 0; i < m->ndisks && r == 0; i++) {
    struct keep_ctx k = { w, i };
    r = disk_dirty_swap_keep(m->disks[i].d, keep_point_bits, &k, NULL);
    if (r == 0)
      swapped++;
  }
  void *state = NULL;
  size_t slen = 0;
  if (r == 0 && strcmp(m->vmspec.driver, "qemu") != 0 &&
      vm_export_state(sh->vms, m->vm, &state, &slen, err, sizeof err) == 0)
    r = journal_append(w->jw, JOURNAL_KIND_STATE, 0, 0, slen, state);
  free(state);
  if (paused && !final && vm_migration_resume(sh->vms, m->vm, err, sizeof err) < 0)
    log_error(m->vm, "migration %s: cannot resume the VM after point %llu: %s", m->id,
              (unsigned long long)w->point_id, err);
  w->last_point_mono = now_ns();

  uint64_t regions = 0;
  for (unsigned i = 0; i < swapped && r >= 0; i++) {
    struct cache *c = disk_cache_layer(m->disks[i].d);
    const struct bitmap *b = &w->point_bits[i];
    for (uint64_t reg = bitmap_next(b, 0, true); reg < b->nbits && r >= 0;
         reg = bitmap_next(b, reg + 1, true)) {
      r = cache_rpo_capture(c, reg);
      regions += r == 0;
    }
  }
  if (r >= 0)
    r = journal_seal(w->jw, err, sizeof err) < 0 ? -EIO : 0;
  else
    journal_abort(w->jw);
  w->jw = NULL;
  if (r < 0) {
    /* Nothing of it reached the source: its regions go into the next one. */
    log_error(m->vm, "migration %s: point %llu failed (%s); its writes go with the next one",
              m->id, (unsigned long long)w->point_id, strerror(-r));
    for (unsigned i = 0; i < swapped; i++) {
      const struct bitmap *b = &w->point_bits[i];
      for (uint64_t reg = bitmap_next(b, 0, true); reg < b->nbits;
           reg = bitmap_next(b, reg + 1, true))
        disk_mark_dirty(m->disks[i].d, reg * m->disks[i].gran, m->disks[i].gran);
    }
    end_point(w, false);
    return r;
  }
  w->point_sealed = true;
  wp_set(m, "pending_point_ns", w->point_time_ns);
  mig_persist(m);
  log_info(m->vm, "migration %s: RPO point %llu: %llu regions captured", m->id,
           (unsigned long long)w->point_id, (unsigned long long)regions);
  return 0;
}

/* Ships the sealed point's journal and waits for the source to apply it.
 * 0 applied; -ENOTCONN link lost (shipped again later); -EREMOTEIO refused. */
static int ship_point(struct warm_dst *w)
{
  struct migration *m = w->m;
  char path[PATH_MAX];
  point_path(m, w->point_id, path, sizeof path);
  FILE *f = fopen(path, "rb");
  if (!f) {
    log_error(m->vm, "migration %s: point %llu: cannot open %s: %s", m->id,
              (unsigned long long)w->point_id, path, strerror(errno));
    return -EIO;
  }
  uint8_t *buf = malloc(WARM_WB_HEADER + WB_PIECE);
  if (!buf) {
    fclose(f);
    return -ENOMEM;
  }
  uint64_t off = 0;
  int r = 0;
  for (;;) {
    size_t n = fread(buf + WARM_WB_HEADER, 1, WB_PIECE, f);
    if (n == 0)
      break;
    proto_wb_encode_header(w->point_id, off, buf);
    pthread_mutex_lock(&w->lock);
    r = w->stop ? -ECANCELED : send_locked(w, MSG_WARM_WB, buf, (uint32_t)(WARM_WB_HEADER + n));
    pthread_mutex_unlock(&w->lock);
    if (r < 0)
      break;
    off += n;
  }
  fclose(f);
  free(buf);
  if (r < 0)
    return r;
  pthread_mutex_lock(&w->lock);
  uint64_t req = w->wb_req = ++w->next_req;
  w->wb_answered = false;
  pthread_mutex_unlock(&w->lock);
  r = send_json(w, MSG_WARM_REQ,
                json_pack("{s:s, s:I, s:I, s:I, s:I}", "op", "wb_end", "req", (json_int_t)req,
                          "point", (json_int_t)w->point_id, "size", (json_int_t)off,
                          "time_ns", (json_int_t)w->point_time_ns));
  if (r < 0)
    return r;
  uint64_t deadline = now_ns() + WB_REPLY_TIMEOUT_NS;
  pthread_mutex_lock(&w->lock);
  while (!w->wb_answered && w->conn && !w->stop && now_ns() < deadline) {
    cond_timedwait_ms(&w->cond, &w->lock, 200);
  }
  bool answered = w->wb_answered, ok = w->wb_ok;
  char why[256];
  snprintf(why, sizeof why, "%s", w->wb_error);
  pthread_mutex_unlock(&w->lock);
  if (!answered)
    return -ENOTCONN;
  if (!ok) {
    log_error(m->vm, "migration %s: the source refused point %llu: %s", m->id,
              (unsigned long long)w->point_id, why);
    return -EREMOTEIO;
  }
  log_info(m->vm, "migration %s: RPO point %llu applied at the source (%llu journal bytes)",
           m->id, (unsigned long long)w->point_id, (unsigned long long)off);
  wp_set(m, "wb_bytes", wp_u64(m, "wb_bytes") + off);
  end_point(w, true);
  return 0;
}

/* ---- figures ---- */

static json_t *status_json(struct warm_dst *w)
{
  struct migration *m = w->m;
  uint64_t regions = 0, present = 0, hits = 0, misses = 0, local = 0, quota = 0, waiting = 0,
           oldest = 0, p50 = 0, p90 = 0, p99 = 0, pmax = 0, evictions = 0, fetched = 0,
           hydrated = 0, unflushed = 0, size = 0;
  json_t *disks = json_array();
  for (unsigned i = 0; i < m->ndisks; i++) {
    struct mig_disk *md = &m->disks[i];
    struct cache *c = md->d ? disk_cache_layer(md->d) : NULL;
    if (!c)
      continue;
    struct cache_stats st;
    cache_get_stats(c, &st);
    uint64_t dirty = disk_dirty_bytes(md->d) + atomic_load(&w->point_bytes[i]);
    regions += st.regions;
    present += st.present;
    hits += st.read_hits;
    misses += st.read_misses;
    local += st.local_bytes;
    quota += st.quota_bytes;
    waiting += st.waiting;
    oldest = MAX(oldest, st.oldest_wait_ns);
    p50 = MAX(p50, st.miss_p50_ns);
    p90 = MAX(p90, st.miss_p90_ns);
    p99 = MAX(p99, st.miss_p99_ns);
    pmax = MAX(pmax, st.miss_max_ns);
    evictions += st.evictions;
    fetched += st.fetched_bytes;
    hydrated += st.hydrated_bytes;
    unflushed += dirty;
    size += md->size;
    json_array_append_new(disks, json_pack(
        "{s:s, s:f, s:I, s:I, s:I, s:I, s:I, s:I}", "name", md->name, "hydrated_pct",
        st.regions ? 100.0 * (double)st.present / (double)st.regions : 100.0, "read_hits",
        (json_int_t)st.read_hits, "read_misses", (json_int_t)st.read_misses, "local_bytes",
        (json_int_t)st.local_bytes, "quota_bytes", (json_int_t)st.quota_bytes, "evictions",
        (json_int_t)st.evictions, "unflushed_bytes", (json_int_t)dirty));
  }
  pthread_mutex_lock(&w->lock);
  uint64_t wan_in = w->wan_in, wan_out = w->wan_out;
  bool degraded = w->degraded, up = w->conn != NULL;
  char why[200];
  snprintf(why, sizeof why, "%s", w->degraded_why);
  pthread_mutex_unlock(&w->lock);
  uint64_t last_ns = wp_u64(m, "last_point_ns");
  json_t *j = json_pack(
      "{s:f, s:I, s:I, s:I, s:I, s:f, s:f, s:f, s:f, s:f, s:I, s:I, s:I, s:I, s:I, s:I, s:I}",
      "hydrated_pct", regions ? 100.0 * (double)present / (double)regions : 100.0,
      "present_regions", (json_int_t)present, "regions", (json_int_t)regions, "read_hits",
      (json_int_t)hits, "read_misses", (json_int_t)misses, "hit_ratio",
      hits + misses ? (double)hits / (double)(hits + misses) : 1.0, "miss_p50_ms",
      (double)p50 / 1e6, "miss_p90_ms", (double)p90 / 1e6, "miss_p99_ms", (double)p99 / 1e6,
      "miss_max_ms", (double)pmax / 1e6, "waiting", (json_int_t)waiting, "wan_in_bytes",
      (json_int_t)wan_in, "wan_out_bytes", (json_int_t)wan_out, "unflushed_bytes",
      (json_int_t)unflushed, "local_bytes", (json_int_t)local, "quota_bytes", (json_int_t)quota,
      "evictions", (json_int_t)evictions);
  json_object_set_new(j, "fetched_bytes", json_integer((json_int_t)fetched));
  json_object_set_new(j, "hydrated_bytes", json_integer((json_int_t)hydrated));
  json_object_set_new(j, "disk_bytes", json_integer((json_int_t)size));
  json_object_set_new(j, "oldest_wait_ms", json_real((double)oldest / 1e6));
  json_object_set_new(j, "last_point", json_integer((json_int_t)wp_u64(m, "last_point")));
  json_object_set_new(j, "last_point_ns", json_integer((json_int_t)last_ns));
  json_object_set_new(j, "last_point_age_s",
                      last_ns ? json_real((double)(realtime_ns() - last_ns) / 1e9) : json_null());
  json_object_set_new(j, "points", json_integer((json_int_t)wp_u64(m, "points")));
  json_object_set_new(j, "wb_bytes", json_integer((json_int_t)wp_u64(m, "wb_bytes")));
  json_object_set_new(j, "pending_point", json_integer((json_int_t)wp_u64(m, "pending_point")));
  json_object_set_new(j, "rpo_s", json_integer((json_int_t)m->warm.rpo_s));
  json_object_set_new(j, "complete", json_boolean(regions && present == regions));
  json_object_set_new(j, "degraded", json_boolean(degraded));
  json_object_set_new(j, "degraded_reason", degraded ? json_string(why) : json_null());
  json_object_set_new(j, "link", json_string(up ? "up" : "down"));
  json_object_set_new(j, "disks", disks);
  return j;
}

static void check_degraded(struct warm_dst *w)
{
  struct migration *m = w->m;
  uint64_t limit = m->warm.degraded_after_s * 1000000000ull;
  uint64_t oldest = 0;
  for (unsigned i = 0; i < m->ndisks; i++) {
    struct cache *c = m->disks[i].d ? disk_cache_layer(m->disks[i].d) : NULL;
    if (c) {
      struct cache_stats st;
      cache_get_stats(c, &st);
      oldest = MAX(oldest, st.oldest_wait_ns);
    }
  }
  pthread_mutex_lock(&w->lock);
  uint64_t down = w->down_since_ns ? now_ns() - w->down_since_ns : 0;
  bool was = w->degraded;
  w->degraded = down >= limit || oldest >= limit;
  if (w->degraded)
    fmt_into(w->degraded_why, sizeof w->degraded_why, "%s for %llu s",
             down >= limit ? "the site link to the source is down"
                           : "a guest read has waited for its data",
             (unsigned long long)((down >= limit ? down : oldest) / 1000000000));
  bool now_degraded = w->degraded;
  char why[200];
  snprintf(why, sizeof why, "%s", w->degraded_why);
  pthread_mutex_unlock(&w->lock);
  if (now_degraded && !was)
    log_error(m->vm, "migration %s: DEGRADED: %s; the source can take the VM back to the last "
              "RPO point (ferry migrate-back %s --last-rpo)", m->id, why, m->vm);
  else if (!now_degraded && was)
    log_info(m->vm, "migration %s: no longer degraded", m->id);
}

/* ---- the worker ---- */

static bool state_is(struct migration *m, const char *s)
{
  pthread_mutex_lock(&m->lock);
  bool r = strcmp(m->state, s) == 0;
  pthread_mutex_unlock(&m->lock);
  return r;
}

static void *worker_main(void *arg)
{
  struct warm_dst *w = arg;
  struct migration *m = w->m;
  uint64_t last_status = 0;
  if (!w->last_point_mono)
    w->last_point_mono = now_ns();
  for (;;) {
    pthread_mutex_lock(&w->lock);
    if (!w->stop)
      cond_timedwait_ms(&w->cond, &w->lock, 200);
    bool stop = w->stop, up = w->conn != NULL, rpo_now = w->rpo_now, back = w->back;
    uint64_t back_req = w->back_req;
    pthread_mutex_unlock(&w->lock);
    if (stop)
      break;
    if (!state_is(m, "warm"))
      continue;
    check_degraded(w);
    uint64_t now = now_ns();
    if (up && now - last_status >= STATUS_EVERY_NS) {
      json_t *st = status_json(w);
      json_object_set_new(st, "op", json_string("status"));
      json_object_set_new(st, "req", json_integer(0));
      send_json(w, MSG_WARM_REQ, st);
      last_status = now;
    }
    bool due = rpo_now || back || now - w->last_point_mono >= m->warm.rpo_s * 1000000000ull;
    if (!w->have_point && due) {
      if (rpo_now) {
        pthread_mutex_lock(&w->lock);
        w->rpo_now = false;
        pthread_mutex_unlock(&w->lock);
      }
      if (take_point(w, back) < 0) {
        w->last_point_mono = now_ns();
        continue;
      }
    }
    if (w->have_point && w->point_sealed && up && now_ns() >= w->ship_not_before) {
      /* A regular point sealed before the migrate-back came is shipped
       * first; the final one follows at the next turn. */
      bool was_back_point = back && w->point_final;
      int r = ship_point(w);
      if (r == 0 && was_back_point) {
        /* Everything written here is at the source; the VM stays paused. */
        pthread_mutex_lock(&w->lock);
        w->back = false;
        pthread_mutex_unlock(&w->lock);
        mig_set_state(m, "returning", NULL);
        reply(w, back_req, true, NULL,
              json_pack("{s:I}", "point", (json_int_t)wp_u64(m, "last_point")));
      } else if (r == -EREMOTEIO) {
        w->ship_not_before = now_ns() + 10ull * 1000000000;   /* refused: again in 10 s */
      }
    }
  }
  return NULL;
}

/* ---- setup ---- */

static struct warm_dst *warm_get(struct migration *m)
{
  if (m->wdst)
    return m->wdst;
  struct warm_dst *w = calloc(1, sizeof *w);
  if (!w)
    return NULL;
  w->m = m;
  pthread_mutex_init(&w->lock, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&w->cond, &ca);
  pthread_condattr_destroy(&ca);
  for (unsigned i = 0; i < PROTO_MAX_DISKS; i++)
    w->fctx[i] = (struct fetch_ctx){ w, i };
  w->down_since_ns = now_ns();
  m->wdst = w;
  return w;
}

static int start_worker(struct warm_dst *w)
{
  if (w->worker_started)
    return 0;
  if (pthread_create(&w->worker, NULL, worker_main, w) != 0)
    return -EAGAIN;
  w->worker_started = true;
  return 0;
}

/* Opens (creating them as fenced caches if new) the session's disks and
 * connects their caches to the fetcher. */
static int open_disks(struct warm_dst *w, bool create, char *err, size_t errlen)
{
  struct migration *m = w->m;
  const struct migrations_shared *sh = mig_shared(m);
  char reason[160];
  fmt_into(reason, sizeof reason, "incoming warm migration %s from site %s", m->id, m->peer);
  for (unsigned i = 0; i < m->ndisks; i++) {
    struct mig_disk *md = &m->disks[i];
    if (!md->d) {
      struct disk *d = registry_get(sh->reg, md->name);
      if (d && !disk_cache_layer(d)) {
        snprintf(err, errlen, "a disk named '%s' already exists at this site", md->name);
        disk_unref(d);
        return -EEXIST;
      }
      if (!d && create) {
        int r = registry_create_cached(sh->reg, md->name, md->size, md->gran, reason,
                                       (int64_t)m->warm.quota[i], err, errlen);
        if (r < 0)
          return r;
        d = registry_get(sh->reg, md->name);
      }
      if (!d) {
        snprintf(err, errlen, "disk '%s' of the session is missing here", md->name);
        return -ENOENT;
      }
      if (disk_size(d) != md->size) {
        snprintf(err, errlen, "disk '%s' here has %llu bytes, the source's %llu", md->name,
                 (unsigned long long)disk_size(d), (unsigned long long)md->size);
        disk_unref(d);
        return -EINVAL;
      }
      md->d = d;
    }
    struct cache *c = disk_cache_layer(md->d);
    if (c) {
      struct cache_fetcher f = { .request = fetch_request, .opaque = &w->fctx[i] };
      cache_set_fetcher(c, &f);
    }
    if (!w->holes[i].words && bitmap_init(&w->holes[i], md->nregions) < 0) {
      snprintf(err, errlen, "out of memory");
      return -ENOMEM;
    }
  }
  return 0;
}

int warm_dest_recover(struct migration *m)
{
  char err[512];
  struct warm_dst *w = warm_get(m);
  if (!w)
    return -ENOMEM;
  if (open_disks(w, false, err, sizeof err) < 0) {
    log_error(m->vm, "migration %s: %s", m->id, err);
    return -1;
  }
  if (strcmp(m->state, "warm") != 0) {
    log_info(m->vm, "migration %s (warm destination, %s): waiting for the source", m->id,
             m->state);
    return 0;
  }
  vm_claim(mig_shared(m)->vms, m->vm, m->id, err, sizeof err);
  vm_release(mig_shared(m)->vms, m->vm, m->id);
  for (unsigned i = 0; i < m->ndisks; i++) {
    struct cache *c = disk_cache_layer(m->disks[i].d);
    if (c)
      cache_set_hydration(c, m->warm.hydrate_bps);
    disk_set_cbt_owner(m->disks[i].d, m->id);
  }
  /* A point that was under way when ferryd stopped. */
  uint64_t pending = wp_u64(m, "pending_point");
  if (pending) {
    char path[PATH_MAX];
    point_path(m, pending, path, sizeof path);
    w->point_id = pending;
    bool sealed = access(path, F_OK) == 0;
    int r = 0;
    for (unsigned i = 0; i < m->ndisks && r == 0; i++) {
      char bp[PATH_MAX];
      bits_path(m, pending, i, bp, sizeof bp);
      if (bitmap_init(&w->point_bits[i], m->disks[i].nregions) < 0)
        r = -ENOMEM;
      else if (bits_read(bp, &w->point_bits[i]) < 0)
        bitmap_set_all(&w->point_bits[i]);   /* cannot vouch: everything written goes */
    }
    w->have_point = true;
    if (sealed) {
      /* Its content is in the journal; its regions stay here until applied. */
      w->point_sealed = true;
      w->point_time_ns = wp_u64(m, "pending_point_ns");
      for (unsigned i = 0; i < m->ndisks; i++) {
        struct cache *c = disk_cache_layer(m->disks[i].d);
        cache_rpo_begin(c, &w->point_bits[i], noop_capture, NULL);
        const struct bitmap *b = &w->point_bits[i];
        for (uint64_t reg = bitmap_next(b, 0, true); reg < b->nbits;
             reg = bitmap_next(b, reg + 1, true))
          cache_rpo_capture(c, reg);
      }
      log_info(m->vm, "migration %s: point %llu was sealed before the restart: it is shipped "
               "again", m->id, (unsigned long long)pending);
    } else {
      char tmp[PATH_MAX + 8];
      snprintf(tmp, sizeof tmp, "%s.tmp", path);
      unlink(tmp);
      for (unsigned i = 0; i < m->ndisks; i++) {
        const struct bitmap *b = &w->point_bits[i];
        struct cache *c = disk_cache_layer(m->disks[i].d);
        for (uint64_t reg = bitmap_next(b, 0, true); reg < b->nbits;
             reg = bitmap_next(b, reg + 1, true)) {
          /* Only what is here can go back (a superset bit of a region
           * never present is nothing written here). */
          (void)c;
          disk_mark_dirty(m->disks[i].d, reg * m->disks[i].gran, m->disks[i].gran);
        }
      }
      log_info(m->vm, "migration %s: point %llu was not complete at the restart: its writes go "
               "with the next point", m->id, (unsigned long long)pending);
      end_point(w, false);
    }
  }
  log_info(m->vm, "migration %s (warm destination): the VM runs from the cache; waiting for "
           "the source", m->id);
  return start_worker(w) < 0 ? -EAGAIN : 0;
}

void warm_dest_close(struct migration *m)
{
  struct warm_dst *w = m->wdst;
  if (!w)
    return;
  pthread_mutex_lock(&w->lock);
  w->stop = true;
  pthread_cond_broadcast(&w->cond);
  pthread_mutex_unlock(&w->lock);
  if (w->worker_started)
    pthread_join(w->worker, NULL);
  for (unsigned i = 0; i < m->ndisks; i++) {
    struct cache *c = m->disks[i].d ? disk_cache_layer(m->disks[i].d) : NULL;
    if (c) {
      cache_shutdown(c);        /* guest reads waiting for the source give up */
      cache_set_fetcher(c, NULL);
    }
  }
  if (w->jw)
    journal_abort(w->jw);
  free_point(w);
  for (unsigned i = 0; i < PROTO_MAX_DISKS; i++) {
    bitmap_free(&w->holes[i]);
    free(w->hot[i]);
  }
  pthread_cond_destroy(&w->cond);
  pthread_mutex_destroy(&w->lock);
  free(w);
  m->wdst = NULL;
}

json_t *warm_status_json_locked(struct migration *m)
{
  /* The destination computes its figures; the source shows what the
   * destination last told it, with its own. */
  if (m->wdst) {
    pthread_mutex_unlock(&m->lock);
    json_t *j = status_json(m->wdst);
    pthread_mutex_lock(&m->lock);
    return j;
  }
  json_t *j = json_object();
  if (m->warm_prog) {
    json_t *d = json_object_get(m->warm_prog, "dest");
    if (json_is_object(d))
      json_object_update(j, d);
    const char *k;
    json_t *v;
    json_object_foreach(m->warm_prog, k, v)
      if (strcmp(k, "dest") != 0)
        json_object_set(j, k, v);
  }
  uint64_t last_ns = (uint64_t)json_integer_value(json_object_get(j, "last_point_ns"));
  json_object_set_new(j, "last_point_age_s",
                      last_ns ? json_real((double)(realtime_ns() - last_ns) / 1e9) : json_null());
  return j;
}

/* ---- requests from the source ---- */

static int do_activate(struct warm_dst *w, uint64_t req, json_t *body)
{
  struct migration *m = w->m;
  const struct migrations_shared *sh = mig_shared(m);
  char err[512];
  if (state_is(m, "warm"))
    return reply(w, req, true, NULL, json_pack("{s:b}", "already", true));
  uint64_t size = (uint64_t)json_integer_value(json_object_get(body, "state_size"));
  const char *hex = json_string_value(json_object_get(body, "state_xxh64"));
  char want[17];
  snprintf(want, sizeof want, "%016llx",
           (unsigned long long)(m->blob ? XXH64(m->blob, m->blob_total, 0) : XXH64("", 0, 0)));
  if (m->blob_have != m->blob_total || m->blob_total != size || !hex || strcmp(hex, want) != 0)
    return reply(w, req, false, "the VM state did not arrive whole", NULL);
  struct vm_spec spec;
  json_t *vj = json_object_get(body, "vm");
  if (!vj || vm_spec_from_json(vj, &spec, err, sizeof err) < 0)
    return reply(w, req, false, vj ? err : "no VM description", NULL);
  if (strcmp(spec.name, m->vm) != 0 || spec.ndisks != m->ndisks)
    return reply(w, req, false, "the VM description does not match the session", NULL);
  m->vmspec = spec;
  for (unsigned i = 0; i < m->ndisks; i++) {
    struct mig_disk *md = &m->disks[i];
    struct cache *c = disk_cache_layer(md->d);
    int r = cache_set_present_zero(c, &w->holes[i]);
    if (r < 0) {
      fmt_into(err, sizeof err, "disk '%s': cannot record its holes: %s", md->name,
               strerror(-r));
      return reply(w, req, false, err, NULL);
    }
    if (strcmp(m->warm.prefetch, "hot") == 0 && w->nhot[i])
      cache_set_hot(c, w->hot[i], w->nhot[i]);
    cache_set_hydration(c, m->warm.hydrate_bps);
  }
  for (unsigned i = 0; i < m->ndisks; i++) {
    if (registry_set_fence(sh->reg, m->disks[i].name, NULL, err, sizeof err) < 0)
      goto undo;
    struct disk_dirty_map dm;
    if (disk_dirty_swap(m->disks[i].d, &dm) == 0)
      free(dm.words);
    disk_set_cbt_owner(m->disks[i].d, m->id);
  }
  if (vm_import_and_start(sh->vms, &spec, m->blob, m->blob_total, m->id, err, sizeof err) < 0)
    goto undo;
  vm_release(sh->vms, spec.name, m->id);
  w->last_point_mono = now_ns();
  pthread_mutex_lock(&m->lock);
  snprintf(m->prog.phase, sizeof m->prog.phase, "warm");
  pthread_mutex_unlock(&m->lock);
  mig_set_state(m, "warm", NULL);
  log_info(m->vm, "migration %s: the VM runs here from the cloud cache; its data follows",
           m->id);
  start_worker(w);
  return reply(w, req, true, NULL, json_pack("{s:I}", "running_ns", (json_int_t)realtime_ns()));

undo: {
    char reason[160], e2[256];
    log_error(m->vm, "migration %s: activation failed: %s", m->id, err);
    fmt_into(reason, sizeof reason, "incoming warm migration %s from site %s", m->id, m->peer);
    for (unsigned i = 0; i < m->ndisks; i++)
      registry_set_fence(sh->reg, m->disks[i].name, reason, e2, sizeof e2);
    vm_release(sh->vms, spec.name, m->id);
    return reply(w, req, false, err, NULL);
  }
}

/* Removes what the session built here (before activation, or after the VM
 * went back). */
static void remove_all(struct warm_dst *w)
{
  struct migration *m = w->m;
  const struct migrations_shared *sh = mig_shared(m);
  for (unsigned i = 0; i < m->ndisks; i++) {
    struct mig_disk *md = &m->disks[i];
    if (md->d) {
      struct cache *c = disk_cache_layer(md->d);
      if (c)
        cache_set_fetcher(c, NULL);
      disk_set_cbt_owner(md->d, NULL);
      disk_unref(md->d);
      md->d = NULL;
    }
    char e2[256];
    registry_remove(sh->reg, md->name, true, e2, sizeof e2);
  }
}

static int do_commit(struct warm_dst *w, uint64_t req)
{
  struct migration *m = w->m;
  const struct migrations_shared *sh = mig_shared(m);
  char err[512];
  if (state_is(m, "committed"))
    return reply(w, req, true, NULL, json_pack("{s:b}", "already", true));
  uint64_t regions = 0, present = 0;
  for (unsigned i = 0; i < m->ndisks; i++) {
    struct cache_stats st;
    cache_get_stats(disk_cache_layer(m->disks[i].d), &st);
    regions += st.regions;
    present += st.present;
  }
  if (present < regions) {
    fmt_into(err, sizeof err, "hydration is at %.1f%% (%llu of %llu regions here): commit once "
             "every region is here (a cache smaller than the disk must be grown first)",
             regions ? 100.0 * (double)present / (double)regions : 0.0,
             (unsigned long long)present, (unsigned long long)regions);
    return reply(w, req, false, err, NULL);
  }
  /* Write-back stops: this copy is the only one from now on. */
  pthread_mutex_lock(&w->lock);
  w->stop = true;
  pthread_cond_broadcast(&w->cond);
  pthread_mutex_unlock(&w->lock);
  if (w->worker_started) {
    pthread_join(w->worker, NULL);
    w->worker_started = false;
  }
  if (w->have_point) {
    for (unsigned i = 0; i < m->ndisks; i++)
      cache_rpo_end(disk_cache_layer(m->disks[i].d));
    free_point(w);
  }
  for (unsigned i = 0; i < m->ndisks; i++) {
    struct mig_disk *md = &m->disks[i];
    cache_set_fetcher(disk_cache_layer(md->d), NULL);
    cache_sync(disk_cache_layer(md->d));
    disk_set_cbt_owner(md->d, NULL);
    if (registry_drop_cache(sh->reg, md->name, err, sizeof err) < 0)
      return reply(w, req, false, err, NULL);
  }
  mig_set_state(m, "committed", NULL);
  log_info(m->vm, "migration %s: committed: this site holds the only copy of the VM's disks",
           m->id);
  return reply(w, req, true, NULL, NULL);
}

static int do_release(struct warm_dst *w, uint64_t req)
{
  struct migration *m = w->m;
  const struct migrations_shared *sh = mig_shared(m);
  char err[512];
  if (state_is(m, "returned"))
    return reply(w, req, true, NULL, json_pack("{s:b}", "already", true));
  if (!state_is(m, "returning"))
    return reply(w, req, false, "release comes after migrate-back's final point", NULL);
  pthread_mutex_lock(&w->lock);
  w->stop = true;
  pthread_cond_broadcast(&w->cond);
  pthread_mutex_unlock(&w->lock);
  if (w->worker_started) {
    pthread_join(w->worker, NULL);
    w->worker_started = false;
  }
  /* The VM runs at the source now: this one (paused) goes, and the cache. */
  if (vm_remove(sh->vms, m->vm, true, err, sizeof err) < 0 && strstr(err, "does not exist") == NULL)
    log_warn(m->vm, "migration %s: removing the VM here: %s", m->id, err);
  remove_all(w);
  mig_set_state(m, "returned", NULL);
  log_info(m->vm, "migration %s: the VM went back to site '%s'; its cloud cache is released",
           m->id, m->peer);
  return reply(w, req, true, NULL, NULL);
}

static int do_abort(struct warm_dst *w, uint64_t req, json_t *body)
{
  struct migration *m = w->m;
  if (state_is(m, "warm") || state_is(m, "returning") || state_is(m, "committed"))
    return reply(w, req, false, "the VM was activated here: too late to abort", NULL);
  remove_all(w);
  const char *why = json_string_value(json_object_get(body, "reason"));
  mig_set_state(m, "cancelled", why ? why : "cancelled by the source");
  return reply(w, req, true, NULL, NULL);
}

/* The source took the VM back to its last RPO point (migrate-back
 * --last-rpo) while this site was unreachable: the VM here stops and the
 * disks are fenced (what they hold after that point is kept, not served). */
static int do_fence(struct warm_dst *w, uint64_t req, json_t *body)
{
  struct migration *m = w->m;
  const struct migrations_shared *sh = mig_shared(m);
  char err[512], reason[200];
  uint64_t point = (uint64_t)json_integer_value(json_object_get(body, "point"));
  pthread_mutex_lock(&w->lock);
  w->stop = true;
  pthread_cond_broadcast(&w->cond);
  pthread_mutex_unlock(&w->lock);
  if (w->worker_started) {
    pthread_join(w->worker, NULL);
    w->worker_started = false;
  }
  fmt_into(reason, sizeof reason, "warm migration %s: the VM runs at site %s again from RPO "
           "point %llu; what was written here after it is kept, fenced", m->id, m->peer,
           (unsigned long long)point);
  for (unsigned i = 0; i < m->ndisks; i++)
    if (registry_set_fence(sh->reg, m->disks[i].name, reason, err, sizeof err) < 0)
      return reply(w, req, false, err, NULL);
  if (vm_migration_stop(sh->vms, m->vm, err, sizeof err) < 0)
    log_warn(m->vm, "migration %s: stopping the VM here: %s", m->id, err);
  for (unsigned i = 0; i < m->ndisks; i++) {
    struct cache *c = disk_cache_layer(m->disks[i].d);
    if (c) {
      cache_shutdown(c);
      cache_set_fetcher(c, NULL);
    }
    disk_set_cbt_owner(m->disks[i].d, NULL);
  }
  mig_set_state(m, "recovered", reason);
  log_warn(m->vm, "migration %s: %s", m->id, reason);
  return reply(w, req, true, NULL, NULL);
}

static int handle_req(struct warm_dst *w, json_t *j, bool *end)
{
  const char *op = json_string_value(json_object_get(j, "op"));
  json_t *rq = json_object_get(j, "req");
  if (!op || !json_is_integer(rq) || json_integer_value(rq) < 0)
    return -EPROTO;
  uint64_t req = (uint64_t)json_integer_value(rq);
  if (strcmp(op, "activate") == 0)
    return do_activate(w, req, j);
  if (strcmp(op, "rpo_now") == 0 || strcmp(op, "back") == 0) {
    if (!state_is(w->m, "warm") && !(strcmp(op, "back") == 0 && state_is(w->m, "returning")))
      return reply(w, req, false, "the VM does not run here from the cache", NULL);
    if (strcmp(op, "back") == 0 && state_is(w->m, "returning"))
      return reply(w, req, true, NULL, json_pack("{s:I}", "point",
                                                 (json_int_t)wp_u64(w->m, "last_point")));
    pthread_mutex_lock(&w->lock);
    if (strcmp(op, "rpo_now") == 0) {
      w->rpo_now = true;
    } else {
      w->back = true;
      w->back_req = req;
    }
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->lock);
    /* back is answered by the worker once the final point is applied. */
    return strcmp(op, "rpo_now") == 0 ? reply(w, req, true, NULL, NULL) : 0;
  }
  if (strcmp(op, "commit") == 0) {
    int r = do_commit(w, req);
    *end = state_is(w->m, "committed");
    return r;
  }
  if (strcmp(op, "release") == 0) {
    int r = do_release(w, req);
    *end = state_is(w->m, "returned");
    return r;
  }
  if (strcmp(op, "fence") == 0) {
    int r = do_fence(w, req, j);
    *end = state_is(w->m, "recovered");
    return r;
  }
  if (strcmp(op, "abort") == 0) {
    int r = do_abort(w, req, j);
    *end = state_is(w->m, "cancelled");
    return r;
  }
  return reply(w, req, false, "unknown request", NULL);
}

static int handle_fill(struct warm_dst *w, const struct link_msg *lm, char *err, size_t errlen)
{
  struct migration *m = w->m;
  struct proto_fill f;
  int r = proto_fill_parse(lm->data, lm->len, &f, err, errlen);
  if (r < 0)
    return r;
  if (f.disk >= m->ndisks || !m->disks[f.disk].d) {
    snprintf(err, errlen, "FILL for disk %u of %u", f.disk, m->ndisks);
    return -EPROTO;
  }
  struct mig_disk *md = &m->disks[f.disk];
  if (f.first >= md->nregions || f.count > md->nregions - f.first) {
    snprintf(err, errlen, "FILL of regions %llu+%u beyond disk '%s'",
             (unsigned long long)f.first, f.count, md->name);
    return -EPROTO;
  }
  uint64_t off = f.first * md->gran, len = MIN((uint64_t)f.count * md->gran, md->size - off);
  struct cache *c = disk_cache_layer(md->d);
  if (f.kind == WARM_FILL_DATA && f.len != len) {
    snprintf(err, errlen, "FILL of %u bytes for a range of %llu", f.len, (unsigned long long)len);
    return -EPROTO;
  }
  if (f.kind == WARM_FILL_ERROR) {
    cache_fetch_failed(c, f.first, f.count, -(int)f.error);
    return 0;
  }
  pthread_mutex_lock(&w->lock);
  w->wan_in += f.len;
  pthread_mutex_unlock(&w->lock);
  r = cache_fill(c, f.first, f.count, f.kind == WARM_FILL_DATA ? f.bytes : NULL);
  if (r < 0)
    log_error(md->name, "migration %s: cannot store fetched regions %llu+%u: %s", m->id,
              (unsigned long long)f.first, f.count, strerror(-r));
  return 0;
}

static int handle_map(struct warm_dst *w, const struct link_msg *lm, char *err, size_t errlen)
{
  struct migration *m = w->m;
  struct proto_map mp;
  int r = proto_map_parse(lm->data, lm->len, &mp, err, errlen);
  if (r < 0)
    return r;
  if (mp.disk >= m->ndisks) {
    snprintf(err, errlen, "MAP for disk %u of %u", mp.disk, m->ndisks);
    return -EPROTO;
  }
  struct mig_disk *md = &m->disks[mp.disk];
  if (mp.kind == WARM_MAP_HOLES) {
    struct bitmap *b = &w->holes[mp.disk];
    if (mp.index > b->nwords || mp.count > b->nwords - mp.index) {
      snprintf(err, errlen, "MAP of holes beyond disk '%s'", md->name);
      return -EPROTO;
    }
    for (uint32_t i = 0; i < mp.count; i++) {
      uint64_t v = proto_map_value(&mp, i);
      if (mp.index + i == b->nwords - 1 && b->nbits % 64)
        v &= (UINT64_C(1) << (b->nbits % 64)) - 1;   /* bits past the end stay 0 */
      atomic_store(&b->words[mp.index + i], v);
    }
    return 0;
  }
  if (mp.index != w->nhot[mp.disk] || mp.index + mp.count > md->nregions) {
    snprintf(err, errlen, "MAP of hot regions out of order or beyond disk '%s'", md->name);
    return -EPROTO;
  }
  uint64_t *nv = realloc(w->hot[mp.disk], (w->nhot[mp.disk] + mp.count) * sizeof *nv);
  if (!nv)
    return -ENOMEM;
  w->hot[mp.disk] = nv;
  for (uint32_t i = 0; i < mp.count; i++) {
    uint64_t reg = proto_map_value(&mp, i);
    if (reg >= md->nregions) {
      snprintf(err, errlen, "hot region %llu beyond disk '%s'", (unsigned long long)reg,
               md->name);
      return -EPROTO;
    }
    nv[w->nhot[mp.disk]++] = reg;
  }
  return 0;
}

void warm_dest_serve(struct migrations *ms, struct link_conn *conn, const struct link_msg *hello)
{
  char err[512], peer[65];
  struct proto_hello h;
  json_t *hj = dest_accept_hello(ms, conn, hello, true, &h, peer, sizeof peer);
  if (!hj)
    return;
  struct proto_warm_params wp;
  if (proto_parse_warm_params(json_object_get(hj, "warm"), h.ndisks, &wp, err, sizeof err) < 0) {
    json_decref(hj);
    dest_send_error(conn, err, true);
    link_conn_close(conn);
    return;
  }
  json_decref(hj);
  struct migration *m = dest_take_session(ms, conn, &h, peer, err, sizeof err);
  if (!m) {
    log_warn(h.vm, "migration %s: refused: %s", h.session, err);
    dest_send_error(conn, err, true);
    link_conn_close(conn);
    return;
  }
  struct warm_dst *w = NULL;
  bool end = false;
  if (strcmp(m->mode, "warm") != 0 || mig_terminal(m->state)) {
    fmt_into(err, sizeof err, "migration %s is %s here", m->id,
             strcmp(m->mode, "warm") != 0 ? "not warm" : m->state);
    dest_send_error(conn, err, true);
    goto out;
  }
  if (strcmp(m->state, "receiving") == 0 && !m->warm.rpo_s) {
    m->warm = wp;
    mig_persist(m);
  }
  if (!(w = warm_get(m))) {
    dest_send_error(conn, "out of memory", false);
    goto out;
  }
  if (open_disks(w, strcmp(m->state, "receiving") == 0, err, sizeof err) < 0) {
    log_error(m->vm, "migration %s: %s", m->id, err);
    dest_send_error(conn, err, true);
    if (strcmp(m->state, "receiving") == 0)
      mig_set_state(m, "failed", err);
    goto out;
  }
  pthread_mutex_lock(&w->lock);
  w->conn = conn;
  w->down_since_ns = 0;
  pthread_mutex_unlock(&w->lock);
  pthread_mutex_lock(&m->lock);
  snprintf(m->prog.link_state, sizeof m->prog.link_state, "up");
  pthread_mutex_unlock(&m->lock);
  if (reply(w, 0, true, NULL,
            json_pack("{s:s, s:I}", "state", m->state, "last_point",
                      (json_int_t)wp_u64(m, "last_point"))) < 0)
    goto out;
  for (unsigned i = 0; i < m->ndisks; i++)
    cache_link_up(disk_cache_layer(m->disks[i].d));
  log_info(m->vm, "migration %s: warm session with site '%s' up (%s)", m->id, peer, m->state);

  uint64_t last_frame = now_ns();
  struct link_msg lm;
  while (!end) {
    int r = link_recv(conn, &lm, 1000, err, sizeof err);
    uint64_t now = now_ns();
    if (r == -ETIMEDOUT) {
      if (now - last_frame > IDLE_TIMEOUT_NS) {
        log_warn(m->vm, "migration %s: nothing from the source for 60 s; dropping the link",
                 m->id);
        break;
      }
      continue;
    }
    if (r == -EBADMSG) {
      log_warn(m->vm, "migration %s: a damaged frame from the source (%s); dropping the link",
               m->id, err);
      break;
    }
    if (r < 0) {
      if (r != -ESHUTDOWN)
        log_warn(m->vm, "migration %s: site link lost: %s", m->id, err);
      break;
    }
    last_frame = now;
    r = 0;
    switch (lm.type) {
    case MSG_PING: {
      uint64_t v;
      if (proto_u64_parse(lm.data, lm.len, &v, err, sizeof err) == 0) {
        uint8_t b[8];
        proto_u64_encode(v, b);
        pthread_mutex_lock(&w->lock);
        send_locked(w, MSG_PONG, b, 8);
        pthread_mutex_unlock(&w->lock);
      }
      break;
    }
    case MSG_WARM_FILL:
      r = handle_fill(w, &lm, err, sizeof err);
      break;
    case MSG_WARM_MAP:
      r = handle_map(w, &lm, err, sizeof err);
      break;
    case MSG_BLOB:
      r = dest_apply_blob(m, &lm, err, sizeof err);
      break;
    case MSG_WARM_REQ: {
      json_t *j = proto_json_parse(lm.data, lm.len, err, sizeof err);
      r = j ? handle_req(w, j, &end) : -EPROTO;
      if (r == -EPROTO && j)
        snprintf(err, sizeof err, "a request without op or req");
      json_decref(j);
      break;
    }
    case MSG_WARM_REPLY: {
      json_t *j = proto_json_parse(lm.data, lm.len, err, sizeof err);
      if (!j) {
        r = -EPROTO;
        break;
      }
      uint64_t req = (uint64_t)json_integer_value(json_object_get(j, "req"));
      const char *e = json_string_value(json_object_get(j, "error"));
      pthread_mutex_lock(&w->lock);
      if (req && req == w->wb_req) {
        w->wb_answered = true;
        w->wb_ok = json_is_true(json_object_get(j, "ok"));
        snprintf(w->wb_error, sizeof w->wb_error, "%s", e ? e : "");
        pthread_cond_broadcast(&w->cond);
      }
      pthread_mutex_unlock(&w->lock);
      json_decref(j);
      break;
    }
    default:
      snprintf(err, sizeof err, "unexpected %s frame in a warm session",
               proto_type_name(lm.type));
      r = -EPROTO;
    }
    if (r == -EPROTO) {
      log_warn(m->vm, "migration %s: %s", m->id, err);
      dest_send_error(conn, err, true);
      break;
    }
  }
out:
  if (w) {
    pthread_mutex_lock(&w->lock);
    if (w->conn == conn) {
      w->conn = NULL;
      w->down_since_ns = now_ns();
    }
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->lock);
    for (unsigned i = 0; i < m->ndisks; i++)
      if (m->disks[i].d && disk_cache_layer(m->disks[i].d))
        cache_link_down(disk_cache_layer(m->disks[i].d));
  }
  pthread_mutex_lock(&m->lock);
  snprintf(m->prog.link_state, sizeof m->prog.link_state, "down");
  pthread_mutex_unlock(&m->lock);
  dest_release_session(m);
  link_conn_close(conn);
}
