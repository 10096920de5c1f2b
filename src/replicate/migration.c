/* migration: the migrations table, their documents, start/cancel and the
 * resumption of unfinished migrations at start-up (see migration.h).
 *
 * The list of struct migration lives as long as the manager; entries are
 * never freed while it runs (a finished migration stays listed), so other
 * modules may keep a pointer to one.  The manager's lock guards the list;
 * each migration's own lock guards its state and progress. */
#include "replicate/migration.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <dirent.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/db.h"
#include "common/log.h"
#include "common/util.h"
#include "disk/disk.h"
#include "disk/registry.h"
#include "link/link.h"
#include "replicate/internal.h"
#include "replicate/preflight.h"
#include "replicate/snapshots.h"
#include "replicate/tunnel.h"
#include "site/site.h"
#include "vm/vm.h"

#define DEFAULT_MAX_DOWNTIME_MS 500
#define FIRST_FRAME_TIMEOUT_MS 10000

struct migrations {
  struct migrations_shared sh;
  pthread_mutex_t lock;            /* guards list, n, cap */
  struct migration **list;
  size_t n, cap;
  bool closing;
};

static const char *const schema[] = {
  "CREATE TABLE migrations ("
  " id TEXT PRIMARY KEY NOT NULL,"
  " role TEXT NOT NULL,"
  " vm TEXT NOT NULL,"
  " peer TEXT NOT NULL,"
  " mode TEXT NOT NULL,"
  " state TEXT NOT NULL,"
  " params TEXT NOT NULL,"
  " progress TEXT NOT NULL DEFAULT '{}',"
  " error TEXT,"
  " created_at TEXT NOT NULL,"
  " updated_at TEXT NOT NULL,"
  " finished_at TEXT)",
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

static void utc_now(char *buf, size_t len)
{
  time_t t = time(NULL);
  struct tm tm;
  gmtime_r(&t, &tm);
  strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

const struct migrations_shared *mig_shared(struct migration *m) { return &m->ms->sh; }
const struct migrations_shared *migrations_shared(struct migrations *ms) { return &ms->sh; }

void mig_dir(struct migration *m, char *buf, size_t len)
{
  snprintf(buf, len, "%s/migrations/%s", m->ms->sh.data_dir, m->id);
}

static bool terminal(const char *state)
{
  return strcmp(state, "completed") == 0 || strcmp(state, "cancelled") == 0 ||
         strcmp(state, "failed") == 0 || strcmp(state, "committed") == 0 ||
         strcmp(state, "returned") == 0 || strcmp(state, "recovered") == 0;
}

bool mig_terminal(const char *state) { return terminal(state); }

static bool is_warm(const struct migration *m) { return strcmp(m->mode, "warm") == 0; }

static json_t *warm_params_json(const struct migration *m)
{
  json_t *q = json_array();
  for (unsigned i = 0; i < m->ndisks; i++)
    json_array_append_new(q, json_integer((json_int_t)m->warm.quota[i]));
  return json_pack("{s:I, s:o, s:s, s:I, s:I}", "rpo_s", (json_int_t)m->warm.rpo_s, "quota", q,
                   "prefetch", m->warm.prefetch, "hydrate_bps", (json_int_t)m->warm.hydrate_bps,
                   "degraded_after_s", (json_int_t)m->warm.degraded_after_s);
}

/* ---- documents ---- */

static json_t *params_json(struct migration *m)
{
  json_t *vm = vm_spec_to_json(&m->vmspec);
  json_t *disks = json_array();
  for (unsigned i = 0; i < m->ndisks; i++)
    json_array_append_new(disks, json_pack("{s:s, s:I, s:I}", "name", m->disks[i].name,
                                           "size", (json_int_t)m->disks[i].size,
                                           "granularity", (json_int_t)m->disks[i].gran));
  json_t *j = json_pack("{s:I, s:I, s:b, s:o, s:o}", "max_downtime_ms",
                        (json_int_t)m->max_downtime_ms, "rate_limit_bps",
                        (json_int_t)throttle_rate(&m->rate), "verify_full", m->verify_full,
                        "vm", vm, "disks", disks);
  if (m->preflight)
    json_object_set(j, "preflight", m->preflight);
  if (is_warm(m))
    json_object_set_new(j, "warm", warm_params_json(m));
  return j;
}

json_t *mig_progress_json(struct migration *m)
{
  const struct mig_progress *p = &m->prog;
  json_t *disks = json_array();
  for (unsigned i = 0; i < m->ndisks; i++) {
    const struct mig_disk *d = &m->disks[i];
    json_array_append_new(disks, json_pack("{s:s, s:I, s:I, s:I, s:I}", "name", d->name,
                                           "size", (json_int_t)d->size,
                                           "cursor", (json_int_t)d->cursor,
                                           "acked_bg", (json_int_t)d->acked_bg,
                                           "bg_hwm", (json_int_t)d->bg_hwm_durable));
  }
  json_t *j = json_pack(
      "{s:s, s:s, s:s, s:s, s:I, s:I, s:I, s:f, s:f, s:f, s:f, s:f, s:f, s:I, s:I}",
      "phase", p->phase, "verdict", p->verdict, "link", p->link_state, "link_error",
      p->link_error, "bytes_total", (json_int_t)p->bytes_total, "bytes_left",
      (json_int_t)p->bytes_left, "backlog_bytes", (json_int_t)p->backlog_bytes,
      "backlog_trend_bps", p->backlog_trend_bps, "link_bps", p->link_bps, "repl_bps",
      p->repl_bps, "vm_write_bps", p->vm_write_bps, "dirty_bps", p->dirty_bps, "eta_s",
      p->eta_s, "backpressure_bps", (json_int_t)p->backpressure_bps, "rate_limit_bps",
      (json_int_t)throttle_rate(&m->rate));
  json_t *bytes = json_pack(
      "{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "wire_sent", (json_int_t)p->wire_bytes_sent,
      "payload_sent", (json_int_t)p->payload_bytes_sent, "data_sent",
      (json_int_t)p->data_bytes_sent, "zero_ranges", (json_int_t)p->zero_bytes_sent,
      "background_data", (json_int_t)p->bg_data_bytes, "foreground_data",
      (json_int_t)p->fg_data_bytes, "resent", (json_int_t)p->resent_bytes, "received",
      (json_int_t)p->received_bytes);
  json_t *counts = json_pack(
      "{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "resent_frames",
      (json_int_t)p->resent_frames, "nacks", (json_int_t)p->nacks, "reconnects",
      (json_int_t)p->reconnects, "restarts", (json_int_t)p->restarts, "verify_repairs",
      (json_int_t)p->verify_repairs, "verified_regions", (json_int_t)p->verified_regions,
      "cutover_attempts", (json_int_t)p->cutover_attempts, "duplicate_frames",
      (json_int_t)p->duplicate_frames, "bad_frames", (json_int_t)p->bad_frames, "applied_seq",
      (json_int_t)p->applied_seq);
  json_t *cut = json_pack("{s:I, s:I, s:I, s:I}", "downtime_ms", (json_int_t)p->downtime_ms,
                          "final_drain_bytes", (json_int_t)p->final_drain_bytes,
                          "verified_regions", (json_int_t)p->verify_regions_at_cutover,
                          "started_ns", (json_int_t)p->cutover_started_ns);
  json_object_set_new(j, "zstd_level", json_integer(p->zstd_level));
  json_object_set_new(j, "capacity_bps", json_real(p->capacity_bps));
  json_object_set_new(j, "bytes", bytes);
  json_object_set_new(j, "counters", counts);
  json_object_set_new(j, "cutover", cut);
  json_object_set_new(j, "ram", json_pack("{s:I, s:I}", "sent", (json_int_t)p->ram_bytes_sent,
                                          "left", (json_int_t)p->ram_bytes_left));
  json_object_set_new(j, "disks", disks);
  if (m->warm_prog)
    json_object_set(j, "warm", m->warm_prog);
  return j;
}

static uint64_t ju(json_t *o, const char *k) { return (uint64_t)json_integer_value(json_object_get(o, k)); }

void mig_progress_from_json(struct migration *m, json_t *j)
{
  struct mig_progress *p = &m->prog;
  json_t *b = json_object_get(j, "bytes"), *c = json_object_get(j, "counters"),
         *cut = json_object_get(j, "cutover");
  p->bytes_total = ju(j, "bytes_total");
  p->bytes_left = ju(j, "bytes_left");
  p->wire_bytes_sent = ju(b, "wire_sent");
  p->payload_bytes_sent = ju(b, "payload_sent");
  p->data_bytes_sent = ju(b, "data_sent");
  p->zero_bytes_sent = ju(b, "zero_ranges");
  p->bg_data_bytes = ju(b, "background_data");
  p->fg_data_bytes = ju(b, "foreground_data");
  p->resent_bytes = ju(b, "resent");
  p->received_bytes = ju(b, "received");
  p->resent_frames = ju(c, "resent_frames");
  p->nacks = ju(c, "nacks");
  p->reconnects = ju(c, "reconnects");
  p->restarts = ju(c, "restarts");
  p->verify_repairs = ju(c, "verify_repairs");
  p->verified_regions = ju(c, "verified_regions");
  p->cutover_attempts = ju(c, "cutover_attempts");
  p->duplicate_frames = ju(c, "duplicate_frames");
  p->bad_frames = ju(c, "bad_frames");
  p->applied_seq = p->durable_seq = ju(c, "applied_seq");
  p->downtime_ms = ju(cut, "downtime_ms");
  p->final_drain_bytes = ju(cut, "final_drain_bytes");
  p->verify_regions_at_cutover = ju(cut, "verified_regions");
  p->cutover_started_ns = ju(cut, "started_ns");
  p->ram_bytes_sent = ju(json_object_get(j, "ram"), "sent");
  p->ram_bytes_left = ju(json_object_get(j, "ram"), "left");
  const char *s = json_string_value(json_object_get(j, "phase"));
  snprintf(p->phase, sizeof p->phase, "%s", s ? s : "");
  if (json_is_object(json_object_get(j, "warm"))) {
    json_decref(m->warm_prog);
    m->warm_prog = json_deep_copy(json_object_get(j, "warm"));
  }
  json_t *disks = json_object_get(j, "disks");
  for (unsigned i = 0; i < m->ndisks && i < json_array_size(disks); i++) {
    json_t *d = json_array_get(disks, i);
    m->disks[i].cursor = ju(d, "cursor");
    m->disks[i].acked_bg = ju(d, "acked_bg");
    m->disks[i].bg_hwm = m->disks[i].bg_hwm_durable = ju(d, "bg_hwm");
  }
}

static json_t *doc_locked(struct migration *m)
{
  json_t *j = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s}", "id", m->id, "role", m->role,
                        "vm", m->vm, "peer", m->peer, "mode", m->mode, "state", m->state,
                        "created_at", m->created_at);
  json_object_set_new(j, "finished_at",
                      m->finished_at[0] ? json_string(m->finished_at) : json_null());
  json_object_set_new(j, "error", m->error[0] ? json_string(m->error) : json_null());
  json_object_set_new(j, "params", params_json(m));
  json_object_set_new(j, "progress", mig_progress_json(m));
  if (is_warm(m))
    json_object_set_new(j, "warm", warm_status_json_locked(m));
  return j;
}

/* ---- persistence ---- */

int mig_persist(struct migration *m)
{
  struct db *db = m->ms->sh.db;
  pthread_mutex_lock(&m->lock);
  json_t *params = params_json(m), *prog = mig_progress_json(m);
  char *ps = json_dumps(params, JSON_COMPACT), *pg = json_dumps(prog, JSON_COMPACT);
  json_decref(params);
  json_decref(prog);
  char state[24], error[512], fin[32];
  snprintf(state, sizeof state, "%s", m->state);
  snprintf(error, sizeof error, "%s", m->error);
  snprintf(fin, sizeof fin, "%s", m->finished_at);
  pthread_mutex_unlock(&m->lock);

  char err[512];
  int r = -EIO;
  db_lock(db);
  sqlite3_stmt *st = db_prepare(db,
      "INSERT INTO migrations (id, role, vm, peer, mode, state, params, progress, error,"
      " created_at, updated_at, finished_at)"
      " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10,"
      " strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), ?11)"
      " ON CONFLICT(id) DO UPDATE SET state = excluded.state, params = excluded.params,"
      " progress = excluded.progress, error = excluded.error,"
      " updated_at = excluded.updated_at, finished_at = excluded.finished_at",
      err, sizeof err);
  if (st && ps && pg) {
    sqlite3_bind_text(st, 1, m->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, m->role, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, m->vm, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, m->peer, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, m->mode, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 6, state, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 7, ps, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 8, pg, -1, SQLITE_STATIC);
    if (error[0])
      sqlite3_bind_text(st, 9, error, -1, SQLITE_STATIC);
    else
      sqlite3_bind_null(st, 9);
    sqlite3_bind_text(st, 10, m->created_at, -1, SQLITE_STATIC);
    if (fin[0])
      sqlite3_bind_text(st, 11, fin, -1, SQLITE_STATIC);
    else
      sqlite3_bind_null(st, 11);
    r = db_step_done(db, st, "store the migration", err, sizeof err);
  }
  sqlite3_finalize(st);
  db_unlock(db);
  free(ps);
  free(pg);
  if (r < 0)
    log_error(NULL, "migration %s: %s", m->id, err);
  return r;
}

/* A finished migration needs none of its files (pending maps, VM state). */
static void remove_files(struct migration *m)
{
  char dir[PATH_MAX];
  mig_dir(m, dir, sizeof dir);
  DIR *d = opendir(dir);
  if (!d)
    return;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.')
      continue;
    char path[PATH_MAX + 256];
    snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
    if (unlink(path) < 0)
      log_warn(m->vm, "migration %s: cannot remove %s: %s", m->id, path, strerror(errno));
  }
  closedir(d);
  if (rmdir(dir) == 0)
    fsync_parent_dir(dir);
}

void mig_set_state(struct migration *m, const char *state, const char *error)
{
  pthread_mutex_lock(&m->lock);
  bool changed = strcmp(m->state, state) != 0;
  snprintf(m->state, sizeof m->state, "%s", state);
  if (error)
    snprintf(m->error, sizeof m->error, "%s", error);
  bool done = terminal(state);
  if (done) {
    if (!m->finished_at[0])
      utc_now(m->finished_at, sizeof m->finished_at);
    snprintf(m->prog.phase, sizeof m->prog.phase, "%s", state);
  }
  pthread_cond_broadcast(&m->cond);
  pthread_mutex_unlock(&m->lock);
  if (changed)
    log_info(m->vm, "migration %s (%s): %s%s%s", m->id, m->role, state, error ? ": " : "",
             error ? error : "");
  /* The row first: a crash in between leaves files of a finished migration
   * (harmless), never a running migration without its files. */
  if (mig_persist(m) == 0 && done)
    remove_files(m);
}

void mig_get_peer_link(struct migration *m, char *link, size_t len, char *fp, size_t fplen)
{
  struct site_peer p;
  char err[256];
  if (site_peer_find(m->ms->sh.site, m->peer, &p, err, sizeof err) == 0) {
    snprintf(link, len, "%s", p.link);
    snprintf(fp, fplen, "%s", p.fingerprint);
  } else {
    link[0] = fp[0] = '\0';
  }
}

/* ---- list ---- */

static struct migration *mig_alloc(struct migrations *ms)
{
  struct migration *m = calloc(1, sizeof *m);
  if (!m)
    return NULL;
  m->ms = ms;
  pthread_mutex_init(&m->lock, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&m->cond, &ca);
  pthread_condattr_destroy(&ca);
  throttle_init(&m->rate, 0);
  m->window = WINDOW_MIN;
  m->prog.eta_s = -1;
  snprintf(m->prog.link_state, sizeof m->prog.link_state, "down");
  return m;
}

static void mig_free(struct migration *m)
{
  for (unsigned i = 0; i < m->ndisks; i++) {
    disk_unref(m->disks[i].d);
    bitmap_free(&m->disks[i].pending);
    bitmap_free(&m->disks[i].verified);
    free(m->disks[i].seg_alloc);
  }
  for (size_t i = 0; i < m->ring_n; i++)
    free(m->ring[i].payload);
  free(m->ring);
  json_decref(m->reply);
  json_decref(m->preflight);
  json_decref(m->warm_prog);
  free(m->hashes);
  free(m->blob);
  throttle_destroy(&m->rate);
  pthread_cond_destroy(&m->cond);
  pthread_mutex_destroy(&m->lock);
  free(m);
}

static int list_add(struct migrations *ms, struct migration *m)
{
  pthread_mutex_lock(&ms->lock);
  if (ms->n == ms->cap) {
    size_t cap = ms->cap ? ms->cap * 2 : 16;
    struct migration **v = realloc(ms->list, cap * sizeof *v);
    if (!v) {
      pthread_mutex_unlock(&ms->lock);
      return -ENOMEM;
    }
    ms->list = v;
    ms->cap = cap;
  }
  ms->list[ms->n++] = m;
  pthread_mutex_unlock(&ms->lock);
  return 0;
}

struct migration *mig_find(struct migrations *ms, const char *id)
{
  struct migration *found = NULL;
  pthread_mutex_lock(&ms->lock);
  for (size_t i = 0; i < ms->n; i++)
    if (strcmp(ms->list[i]->id, id) == 0)
      found = ms->list[i];
  pthread_mutex_unlock(&ms->lock);
  return found;
}

static void new_id(char *out, size_t len)
{
  unsigned char r[6];
  if (getrandom(r, sizeof r, 0) != sizeof r) {
    uint64_t t = now_ns();
    memcpy(r, &t, sizeof r);
  }
  snprintf(out, len, "m-%02x%02x%02x%02x%02x%02x", r[0], r[1], r[2], r[3], r[4], r[5]);
}

/* ---- open / load ---- */

static void load_row(struct migrations *ms, sqlite3_stmt *st)
{
  struct migration *m = mig_alloc(ms);
  if (!m)
    return;
  const char *v;
#define COPY(field, col) \
  if ((v = (const char *)sqlite3_column_text(st, col))) snprintf(m->field, sizeof m->field, "%s", v)
  COPY(id, 0);
  COPY(role, 1);
  COPY(vm, 2);
  COPY(peer, 3);
  COPY(mode, 4);
  COPY(state, 5);
  COPY(error, 8);
  COPY(created_at, 9);
  COPY(finished_at, 11);
#undef COPY
  json_t *params = json_loads((const char *)sqlite3_column_text(st, 6), 0, NULL);
  json_t *prog = json_loads((const char *)sqlite3_column_text(st, 7), 0, NULL);
  m->max_downtime_ms = ju(params, "max_downtime_ms");
  throttle_set_rate(&m->rate, ju(params, "rate_limit_bps"));
  m->verify_full = json_is_true(json_object_get(params, "verify_full"));
  json_t *vm = json_object_get(params, "vm");
  char e2[256];
  if (!json_object_get(vm, "disks") || vm_spec_from_json(vm, &m->vmspec, e2, sizeof e2) < 0) {
    /* A row of a destination (its VM arrives with the activation), or an
     * older row: name, driver and workload are what matters. */
    memset(&m->vmspec, 0, sizeof m->vmspec);
    snprintf(m->vmspec.name, sizeof m->vmspec.name, "%s", m->vm);
    if ((v = json_string_value(json_object_get(vm, "driver"))))
      snprintf(m->vmspec.driver, sizeof m->vmspec.driver, "%s", v);
    if ((v = json_string_value(json_object_get(vm, "workload"))))
      snprintf(m->vmspec.workload, sizeof m->vmspec.workload, "%s", v);
  }
  if (json_is_array(json_object_get(params, "preflight")))
    m->preflight = json_incref(json_object_get(params, "preflight"));
  json_t *disks = json_object_get(params, "disks");
  size_t i;
  json_t *x;
  json_array_foreach(disks, i, x) {
    if (i >= PROTO_MAX_DISKS)
      break;
    struct mig_disk *d = &m->disks[i];
    if ((v = json_string_value(json_object_get(x, "name"))))
      snprintf(d->name, sizeof d->name, "%s", v);
    d->size = ju(x, "size");
    d->gran = ju(x, "granularity");
    d->nregions = d->gran ? DIV_ROUND_UP(d->size, d->gran) : 0;
    snprintf(m->vmspec.disks[i], sizeof m->vmspec.disks[i], "%s", d->name);
    m->ndisks = m->vmspec.ndisks = (unsigned)i + 1;
  }
  mig_progress_from_json(m, prog);
  m->wire_base = m->prog.wire_bytes_sent;
  char werr[256];
  if (is_warm(m) && proto_parse_warm_params(json_object_get(params, "warm"), m->ndisks, &m->warm,
                                            werr, sizeof werr) < 0)
    log_error(m->vm, "migration %s: its warm parameters are damaged: %s", m->id, werr);
  json_decref(params);
  json_decref(prog);
  if (!proto_id_is_valid(m->id) || list_add(ms, m) < 0) {
    log_error(NULL, "migrations: skipping a bad row '%s'", m->id);
    mig_free(m);
  }
}

struct migrations *migrations_open(const struct migration_deps *deps, char *err, size_t errlen)
{
  struct migrations *ms = calloc(1, sizeof *ms);
  if (!ms) {
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  ms->sh = (struct migrations_shared){ .data_dir = deps->data_dir, .db = deps->db,
                                       .reg = deps->reg, .site = deps->site,
                                       .vms = deps->vms };
  pthread_mutex_init(&ms->lock, NULL);
  char path[PATH_MAX];
  snprintf(path, sizeof path, "%s/migrations", deps->data_dir);
  mkdir(path, 0750);
  if (db_migrate(deps->db, "migration", schema, (int)ARRAY_SIZE(schema), err, errlen) < 0) {
    migrations_close(ms);
    return NULL;
  }
  db_lock(deps->db);
  sqlite3_stmt *st = db_prepare(deps->db,
      "SELECT id, role, vm, peer, mode, state, params, progress, error, created_at,"
      " updated_at, finished_at FROM migrations ORDER BY created_at, id", err, errlen);
  while (st && sqlite3_step(st) == SQLITE_ROW)
    load_row(ms, st);
  sqlite3_finalize(st);
  db_unlock(deps->db);
  if (!st) {
    migrations_close(ms);
    return NULL;
  }
  /* Destination sessions hold their disks from now on; sources resume in
   * migrations_resume_all once the link can dial. */
  for (size_t i = 0; i < ms->n; i++) {
    struct migration *m = ms->list[i];
    if (strcmp(m->role, "destination") == 0 && !terminal(m->state))
      is_warm(m) ? warm_dest_recover(m) : dest_recover(m);
  }
  return ms;
}

static int start_thread(struct migration *m)
{
  if (pthread_create(&m->thread, NULL, is_warm(m) ? warm_source_main : source_main, m) != 0)
    return -EAGAIN;
  m->thread_started = true;
  return 0;
}

void migrations_resume_all(struct migrations *ms)
{
  pthread_mutex_lock(&ms->lock);
  size_t n = ms->n;
  struct migration **v = malloc((n ? n : 1) * sizeof *v);
  if (v && n)
    memcpy(v, ms->list, n * sizeof *v);
  pthread_mutex_unlock(&ms->lock);
  for (size_t i = 0; v && i < n; i++) {
    struct migration *m = v[i];
    if (strcmp(m->role, "source") != 0 || terminal(m->state) || m->thread_started)
      continue;
    pthread_mutex_lock(&m->lock);
    m->prog.restarts++;
    pthread_mutex_unlock(&m->lock);
    log_info(m->vm, "migration %s: resuming after a restart (state %s)", m->id, m->state);
    if (start_thread(m) < 0)
      mig_set_state(m, "failed", "cannot start the migration thread");
  }
  free(v);
}

void migrations_close(struct migrations *ms)
{
  if (!ms)
    return;
  pthread_mutex_lock(&ms->lock);
  ms->closing = true;
  pthread_mutex_unlock(&ms->lock);
  for (size_t i = 0; i < ms->n; i++) {
    struct migration *m = ms->list[i];
    pthread_mutex_lock(&m->lock);
    m->stop = true;
    if (m->conn)
      link_conn_shutdown(m->conn);
    pthread_cond_broadcast(&m->cond);
    pthread_mutex_unlock(&m->lock);
  }
  /* Wakes limiter sleepers so threads see `stop` at once. */
  for (size_t i = 0; i < ms->n; i++)
    throttle_set_rate(&ms->list[i]->rate, throttle_rate(&ms->list[i]->rate));
  for (size_t i = 0; i < ms->n; i++) {
    struct migration *m = ms->list[i];
    if (m->thread_started)
      pthread_join(m->thread, NULL);
    warm_dest_close(m);
  }
  for (size_t i = 0; i < ms->n; i++)
    mig_free(ms->list[i]);
  free(ms->list);
  pthread_mutex_destroy(&ms->lock);
  free(ms);
}

/* ---- requests ---- */

int migrations_start(struct migrations *ms, const struct migrate_request *req, char *id_out,
                     size_t idlen, json_t **preflight, char *err, size_t errlen)
{
  if (preflight)
    *preflight = NULL;
  id_out[0] = '\0';
  if (strcmp(req->mode, "live") != 0 && strcmp(req->mode, "cold") != 0 &&
      strcmp(req->mode, "warm") != 0) {
    set_err(err, errlen, "mode '%.20s' is not supported (live, warm, cold)", req->mode);
    return -EINVAL;
  }
  bool warm = strcmp(req->mode, "warm") == 0;
  if (warm && req->rpo_s && (req->rpo_s < 1 || req->rpo_s > 86400)) {
    set_err(err, errlen, "RPO of %llu s is not between 1 s and 24 h",
            (unsigned long long)req->rpo_s);
    return -EINVAL;
  }
  if (warm && req->prefetch[0] && strcmp(req->prefetch, "hot") != 0 &&
      strcmp(req->prefetch, "none") != 0) {
    set_err(err, errlen, "prefetch '%.20s' is not hot or none", req->prefetch);
    return -EINVAL;
  }
  if (req->max_downtime_ms > 3600 * 1000) {
    set_err(err, errlen, "max downtime of %llu ms is more than an hour",
            (unsigned long long)req->max_downtime_ms);
    return -EINVAL;
  }
  if (!site_has_identity(ms->sh.site)) {
    set_err(err, errlen, "this site has no identity yet: run `ferry site init` and pair it");
    return -EHOSTUNREACH;
  }
  struct site_peer peer;
  int r = site_peer_find(ms->sh.site, req->to, &peer, err, errlen);
  if (r < 0)
    return r;
  struct vm_spec spec;
  if ((r = vm_get_spec(ms->sh.vms, req->vm, &spec, err, errlen)) < 0)
    return r;
  char vstate[16];
  vm_state(ms->sh.vms, req->vm, vstate, sizeof vstate);
  bool live = strcmp(req->mode, "live") == 0 || warm;
  if (live ? strcmp(vstate, "running") != 0 && strcmp(vstate, "paused") != 0
           : strcmp(vstate, "migrated") == 0) {
    set_err(err, errlen, "VM '%s' is %s: %s", req->vm, vstate,
            live ? "live and warm migration move a running VM" : "it lives at another site now");
    return -EBUSY;
  }
  if (warm && strcmp(spec.driver, "sim") != 0) {
    set_err(err, errlen, "warm migration of a %s VM is not supported yet (sim VMs only); use "
            "--mode live", spec.driver);
    return -EOPNOTSUPP;
  }

  /* Prepare to migrate: everything is checked before anything changes. */
  json_t *checks = NULL;
  r = preflight_run(&ms->sh, &peer, warm ? "live" : req->mode, &spec, &req->networks, &checks,
                    err, errlen);
  if (preflight)
    *preflight = json_incref(checks);
  if (r < 0 || req->preflight_only) {
    json_decref(checks);
    if (r < 0)
      log_warn(req->vm, "migration to site '%s' refused: %s", peer.name, err);
    return r;
  }
  if ((r = preflight_apply_network_map(&spec, &req->networks, err, errlen)) < 0) {
    json_decref(checks);
    return r;
  }

  struct migration *m = mig_alloc(ms);
  if (!m) {
    set_err(err, errlen, "out of memory");
    return -ENOMEM;
  }
  new_id(m->id, sizeof m->id);
  snprintf(m->role, sizeof m->role, "source");
  snprintf(m->vm, sizeof m->vm, "%s", req->vm);
  snprintf(m->peer, sizeof m->peer, "%s", peer.name);
  snprintf(m->mode, sizeof m->mode, "%s", req->mode);
  snprintf(m->state, sizeof m->state, "starting");
  utc_now(m->created_at, sizeof m->created_at);
  m->max_downtime_ms = req->max_downtime_ms ? req->max_downtime_ms : DEFAULT_MAX_DOWNTIME_MS;
  m->verify_full = req->verify_full;
  throttle_set_rate(&m->rate, req->rate_limit_bps);
  m->vmspec = spec;
  m->preflight = checks;
  m->ndisks = spec.ndisks;
  for (unsigned i = 0; i < spec.ndisks; i++) {
    struct disk *d = registry_get(ms->sh.reg, spec.disks[i]);
    if (!d) {
      set_err(err, errlen, "disk '%s' of VM '%s' does not exist", spec.disks[i], req->vm);
      mig_free(m);
      return -ENOENT;
    }
    if (warm && disk_cbt_granularity(d) > (UINT64_C(1) << 20)) {
      set_err(err, errlen, "disk '%s': a dirty-map granularity above 1 MiB is not supported "
              "for warm migration", spec.disks[i]);
      disk_unref(d);
      mig_free(m);
      return -EINVAL;
    }
    if (!disk_cbt_enabled(d) || disk_fenced(d)) {
      set_err(err, errlen, "disk '%s' %s", spec.disks[i],
              disk_fenced(d) ? "is fenced: this site is not authoritative for it"
                             : "has no changed-block tracking (ferryd --no-cbt)");
      disk_unref(d);
      mig_free(m);
      return -EBUSY;
    }
    struct mig_disk *md = &m->disks[i];
    snprintf(md->name, sizeof md->name, "%s", spec.disks[i]);
    md->size = disk_size(d);
    md->gran = disk_cbt_granularity(d);
    md->nregions = DIV_ROUND_UP(md->size, md->gran);
    if (warm) {
      /* The seeds' rule until the I/O analyzer can say better: 15% of the
       * disk, at least 3 GiB, never more than the disk. */
      uint64_t q = req->cache_size;
      if (!q)
        q = MIN(md->size, MAX(md->size / 100 * 15, UINT64_C(3) << 30));
      m->warm.quota[i] = MIN(q, md->size);
    }
    disk_unref(d);
  }
  if (warm) {
    m->warm.rpo_s = req->rpo_s ? req->rpo_s : DEFAULT_RPO_S;
    snprintf(m->warm.prefetch, sizeof m->warm.prefetch, "%s",
             req->prefetch[0] ? req->prefetch : "hot");
    m->warm.hydrate_bps = req->hydrate_set ? req->hydrate_bps : DEFAULT_HYDRATE_BPS;
    m->warm.degraded_after_s = req->degraded_after_s ? req->degraded_after_s
                                                     : DEFAULT_DEGRADED_AFTER_S;
  }
  if ((r = vm_claim(ms->sh.vms, req->vm, m->id, err, errlen)) < 0) {
    mig_free(m);
    return r;
  }
  char dir[PATH_MAX];
  mig_dir(m, dir, sizeof dir);
  if (mkdir(dir, 0750) < 0 || mig_persist(m) < 0 || list_add(ms, m) < 0) {
    set_err(err, errlen, "cannot record the migration (%s)", dir);
    vm_release(ms->sh.vms, req->vm, m->id);
    rmdir(dir);
    mig_free(m);
    return -EIO;
  }
  snprintf(id_out, idlen, "%s", m->id);
  log_info(m->vm, "migration %s: %s to site '%s' (max downtime %llu ms%s); pre-flight passed",
           m->id, m->mode, m->peer, (unsigned long long)m->max_downtime_ms,
           m->verify_full ? ", full verify" : "");
  if (start_thread(m) < 0) {
    mig_set_state(m, "failed", "cannot start the migration thread");
    vm_release(ms->sh.vms, req->vm, m->id);
    set_err(err, errlen, "cannot start the migration thread");
    return -EAGAIN;
  }
  return 0;
}

int migrations_cancel(struct migrations *ms, const char *id, char *err, size_t errlen)
{
  struct migration *m = mig_find(ms, id);
  if (!m) {
    set_err(err, errlen, "migration '%.40s' does not exist", id);
    return -ENOENT;
  }
  pthread_mutex_lock(&m->lock);
  int r = 0;
  if (terminal(m->state)) {
    set_err(err, errlen, "migration %s is already %s", id, m->state);
    r = -EBUSY;
  } else if (strcmp(m->mode, "warm") == 0 && strcmp(m->state, "starting") != 0 &&
             strcmp(m->state, "receiving") != 0) {
    set_err(err, errlen, "migration %s is %s: the VM runs, or is being started, at the "
            "destination; end it with ferry commit or ferry migrate-back", id, m->state);
    r = -EBUSY;
  } else if (strcmp(m->state, "committing") == 0 || strcmp(m->state, "active") == 0 ||
             strcmp(m->state, "activating") == 0) {
    set_err(err, errlen, "migration %s is past its point of no return (%s): the VM runs, or "
            "is being started, at the destination", id, m->state);
    r = -EBUSY;
  } else if (strcmp(m->role, "source") == 0) {
    m->cancel = true;
    if (m->conn)
      link_conn_shutdown(m->conn);     /* wakes a sender blocked on the link */
    pthread_cond_broadcast(&m->cond);
  }
  pthread_mutex_unlock(&m->lock);
  if (r == 0 && strcmp(m->role, "source") == 0) {
    throttle_set_rate(&m->rate, throttle_rate(&m->rate));   /* wakes a limited reader */
    /* The driver finishes the cancel (VM resumed here, destination cleaned);
     * wait a bounded time so the answer can say how it went. */
    pthread_mutex_lock(&m->lock);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += 30;
    while (!terminal(m->state))
      if (pthread_cond_timedwait(&m->cond, &m->lock, &ts) != 0)
        break;
    pthread_mutex_unlock(&m->lock);
  } else if (r == 0) {
    /* Destination: remove what the session built, unless the source is
     * connected (it must cancel from its side). */
    pthread_mutex_lock(&m->lock);
    bool connected = m->owner != NULL;
    pthread_mutex_unlock(&m->lock);
    if (connected) {
      set_err(err, errlen, "the source is connected to migration %s: cancel it at the source",
              id);
      return -EBUSY;
    }
    for (unsigned i = 0; i < m->ndisks; i++) {
      char e2[256];
      registry_remove(ms->sh.reg, m->disks[i].name, true, e2, sizeof e2);
    }
    mig_set_state(m, "cancelled", "cancelled at the destination");
  }
  return r;
}

int migrations_set_rate_limit(struct migrations *ms, const char *id, uint64_t bps, char *err,
                              size_t errlen)
{
  struct migration *m = mig_find(ms, id);
  if (!m || strcmp(m->role, "source") != 0) {
    set_err(err, errlen, "no source migration '%.40s' here", id);
    return -ENOENT;
  }
  pthread_mutex_lock(&m->lock);
  bool done = terminal(m->state);
  pthread_mutex_unlock(&m->lock);
  if (done) {
    set_err(err, errlen, "migration %s is %s: nothing to limit", id, m->state);
    return -EBUSY;
  }
  throttle_set_rate(&m->rate, bps);
  log_info(m->vm, "migration %s: replication rate limit %llu bytes/s%s", id,
           (unsigned long long)bps, bps ? "" : " (off)");
  mig_persist(m);
  return 0;
}

int migrations_warm_command(struct migrations *ms, const char *id, const char *cmd,
                            unsigned wait_s, char *err, size_t errlen)
{
  static const char *const cmds[] = { "commit", "back", "back-rpo", "rpo-now" };
  bool known = false;
  for (size_t i = 0; i < ARRAY_SIZE(cmds); i++)
    known |= strcmp(cmd, cmds[i]) == 0;
  if (!known) {
    set_err(err, errlen, "unknown warm migration command '%.20s'", cmd);
    return -EINVAL;
  }
  /* By id, or the VM's newest warm migration that is not over. */
  struct migration *m = mig_find(ms, id);
  if (!m) {
    pthread_mutex_lock(&ms->lock);
    for (size_t i = ms->n; i-- > 0;) {
      struct migration *x = ms->list[i];
      if (strcmp(x->vm, id) == 0 && is_warm(x) && !terminal(x->state) &&
          strcmp(x->role, "source") == 0) {
        m = x;
        break;
      }
    }
    pthread_mutex_unlock(&ms->lock);
  }
  if (!m) {
    set_err(err, errlen, "no warm migration of VM or id '%.65s' is going on at this site", id);
    return -ENOENT;
  }
  if (strcmp(m->role, "source") != 0 || !is_warm(m)) {
    set_err(err, errlen, "migration %s is not a warm migration started at this site (%s, %s)%s",
            m->id, m->mode, m->role,
            strcmp(m->role, "destination") == 0 ? ": run the command at the source site" : "");
    return -EINVAL;
  }
  pthread_mutex_lock(&m->lock);
  int r = 0;
  if (terminal(m->state)) {
    set_err(err, errlen, "migration %s is already %s", m->id, m->state);
    r = -EBUSY;
  } else if (strcmp(m->state, "recovering") == 0) {
    set_err(err, errlen, "migration %s: the VM runs here again already; the destination is "
            "fenced when it can be reached", m->id);
    r = -EBUSY;
  } else if (strcmp(cmd, "back-rpo") != 0 && strcmp(m->state, "warm") != 0) {
    set_err(err, errlen, "migration %s is %s: %s needs the VM running at the destination "
            "(state warm)", m->id, m->state, cmd);
    r = -EBUSY;
  } else if (m->warm_cmd[0]) {
    set_err(err, errlen, "migration %s is busy with '%s'", m->id, m->warm_cmd);
    r = -EBUSY;
  }
  if (r < 0) {
    pthread_mutex_unlock(&m->lock);
    return r;
  }
  snprintf(m->warm_cmd, sizeof m->warm_cmd, "%s", cmd);
  uint64_t seq = ++m->warm_cmd_seq;
  pthread_cond_broadcast(&m->cond);
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  ts.tv_sec += wait_s;
  while (m->warm_cmd_done_seq < seq)
    if (pthread_cond_timedwait(&m->cond, &m->lock, &ts) != 0)
      break;
  if (m->warm_cmd_done_seq < seq) {
    set_err(err, errlen, "migration %s: '%s' is still going on after %u s (see ferry migration "
            "show %s)", m->id, cmd, wait_s, m->id);
    r = -EINPROGRESS;
  } else if ((r = m->warm_cmd_result) < 0) {
    set_err(err, errlen, "%s", m->warm_cmd_error);
  }
  pthread_mutex_unlock(&m->lock);
  return r;
}

json_t *migrations_snapshots_json(struct migrations *ms)
{
  return snapshots_list_json(&ms->sh);
}

int migrations_snapshot_op(struct migrations *ms, const char *vm, bool restore, char *err,
                           size_t errlen)
{
  bool active = false;
  pthread_mutex_lock(&ms->lock);
  for (size_t i = 0; i < ms->n; i++) {
    struct migration *x = ms->list[i];
    pthread_mutex_lock(&x->lock);
    active |= strcmp(x->vm, vm) == 0 && !terminal(x->state);
    pthread_mutex_unlock(&x->lock);
  }
  pthread_mutex_unlock(&ms->lock);
  return restore ? snapshots_restore(&ms->sh, vm, active, err, errlen)
                 : snapshots_remove(&ms->sh, vm, active, err, errlen);
}

json_t *migrations_list_json(struct migrations *ms)
{
  json_t *arr = json_array();
  pthread_mutex_lock(&ms->lock);
  for (size_t i = 0; i < ms->n; i++) {
    struct migration *m = ms->list[i];
    pthread_mutex_lock(&m->lock);
    json_array_append_new(arr, doc_locked(m));
    pthread_mutex_unlock(&m->lock);
  }
  pthread_mutex_unlock(&ms->lock);
  return json_pack("{s:o}", "migrations", arr);
}

json_t *migration_json(struct migrations *ms, const char *id, char *err, size_t errlen)
{
  struct migration *m = mig_find(ms, id);
  if (!m) {
    set_err(err, errlen, "migration '%.40s' does not exist", id);
    return NULL;
  }
  pthread_mutex_lock(&m->lock);
  json_t *j = doc_locked(m);
  pthread_mutex_unlock(&m->lock);
  return j;
}

struct migration *mig_create_destination(struct migrations *ms, const struct proto_hello *h,
                                         const char *peer, char *err, size_t errlen)
{
  pthread_mutex_lock(&ms->lock);
  bool closing = ms->closing;
  pthread_mutex_unlock(&ms->lock);
  if (closing) {
    set_err(err, errlen, "ferryd is stopping");
    return NULL;
  }
  struct migration *m = mig_alloc(ms);
  if (!m) {
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  fmt_into(m->id, sizeof m->id, "%s", h->session);   /* checked: proto_id_is_valid */
  snprintf(m->role, sizeof m->role, "destination");
  snprintf(m->vm, sizeof m->vm, "%s", h->vm);
  snprintf(m->peer, sizeof m->peer, "%s", peer);
  snprintf(m->mode, sizeof m->mode, "%s", h->mode);
  snprintf(m->state, sizeof m->state, "receiving");
  utc_now(m->created_at, sizeof m->created_at);
  snprintf(m->prog.phase, sizeof m->prog.phase, "receiving");
  snprintf(m->vmspec.name, sizeof m->vmspec.name, "%s", h->vm);
  m->ndisks = m->vmspec.ndisks = h->ndisks;
  for (unsigned i = 0; i < h->ndisks; i++) {
    struct mig_disk *d = &m->disks[i];
    snprintf(d->name, sizeof d->name, "%s", h->disks[i].name);
    snprintf(m->vmspec.disks[i], sizeof m->vmspec.disks[i], "%s", h->disks[i].name);
    d->size = h->disks[i].size;
    d->gran = h->disks[i].granularity;
    d->nregions = DIV_ROUND_UP(d->size, d->gran);
  }
  char dir[PATH_MAX];
  mig_dir(m, dir, sizeof dir);
  if ((mkdir(dir, 0750) < 0 && errno != EEXIST) || mig_persist(m) < 0 || list_add(ms, m) < 0) {
    set_err(err, errlen, "cannot record the incoming migration (%s)", dir);
    mig_free(m);
    return NULL;
  }
  return m;
}

/* The first frame says what the connection is for. */
void migrations_serve_conn(void *opaque, struct link_conn *conn)
{
  char err[256];
  struct link_msg lm;
  int r = link_recv(conn, &lm, FIRST_FRAME_TIMEOUT_MS, err, sizeof err);
  if (r < 0) {
    log_warn(NULL, "site link %s: nothing arrived after the handshake (%s)",
             link_conn_peer_address(conn), err);
    link_conn_close(conn);
    return;
  }
  switch (lm.type) {
  case MSG_HELLO:
    dest_serve(opaque, conn, &lm);
    return;
  case MSG_TUNNEL_OPEN:
    tunnel_serve_dest(opaque, conn, lm.data, lm.len);
    return;
  case MSG_QUERY:
    preflight_serve_dest(opaque, conn, lm.data, lm.len);
    return;
  case MSG_WARM_HELLO:
    warm_dest_serve(opaque, conn, &lm);
    return;
  default:
    log_warn(NULL, "site link %s: a connection may not start with %s",
             link_conn_peer_address(conn), proto_type_name(lm.type));
    link_conn_close(conn);
  }
}
