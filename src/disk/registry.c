/* registry: the disks a ferryd serves (see registry.h).
 *
 * DESIGN
 * The SQLite file DATA_DIR/ferry.db is the truth; the in-memory list of open
 * disks is a cache of it that the registry mutex keeps in step.  Every change
 * commits to SQLite first (WAL, synchronous=FULL: durable when the call
 * returns) and only then touches memory and files, so a crash leaves either
 * the old or the new state, plus at worst an orphan file:
 *   create: image file made and fsynced -> row inserted -> disk opened.
 *           A crash before the insert leaves an unregistered disks/NAME.img,
 *           which a later create of NAME refuses to overwrite.
 *   remove: row deleted -> disk closed -> map file and (owned) image unlinked.
 *           A crash after the delete leaves orphan files, never a row whose
 *           files are gone.
 * A stale cbt/NAME.cbt (from a removal that crashed) is never trusted for a
 * new disk of that name: create and add open with cbt_new, which replaces it
 * with a clean map.  Registered disks open without it, so a map file lost
 * since the last run makes the whole disk dirty rather than clean.
 *
 * ferry.lock (flock, holds the pid) keeps a second ferryd off the same data
 * directory: two daemons serving one image would each keep half the dirty map.
 *
 * Schema (PRAGMA user_version = 2):
 *   disks(name TEXT PRIMARY KEY, image TEXT, owned INTEGER, size INTEGER,
 *         cbt_granularity INTEGER, write_limit_bps INTEGER, created_at TEXT,
 *         fence TEXT)
 * uint64 values are stored as their int64 bit pattern.  fence is NULL for a
 * disk this site is authoritative for, else why it is not (disk.h: fence).
 * Version 1 (no fence column) is upgraded in place at open.
 * Other modules keep their own tables in the same file (their own
 * connections; see common/db.h), never touching this one.
 *
 * Thread model: one mutex (r->lock) guards the list and the SQLite handle;
 * functions that may be slow (disk sync, close) run outside it on references.
 *
 * Errors: every failing call fills err and returns -errno; it does not log
 * (the caller, API or startup, records it once).  What happens with no
 * caller to tell (a disk that cannot be opened at start, a file that cannot
 * be deleted) is logged here.
 */
#include "disk/registry.h"
#include "disk/snapshot.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "disk/cbt.h"

#define REGISTRY_SCHEMA_VERSION 3
#define GRANULARITY_MIN (4096ull)
#define GRANULARITY_MAX (1024ull * 1024 * 1024)

struct registry_entry {
  char name[65];
  bool owned;                 /* ferry created the image: rm deletes it */
  struct disk *disk;          /* the registry's reference */
};

struct registry {
  pthread_mutex_t lock;       /* guards everything below */
  sqlite3 *db;
  char *data_dir;
  int lock_fd;                /* flock'ed ferry.lock */
  struct registry_options opt;
  struct registry_entry *entries;  /* sorted by name */
  size_t n, cap;
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

static char *path_join(const char *dir, const char *a, const char *b)
{
  char *p;
  if (asprintf(&p, "%s/%s%s", dir, a, b ? b : "") < 0)
    return NULL;
  return p;
}

static char *image_path_for(const struct registry *r, const char *name)
{
  char *p;
  return asprintf(&p, "%s/disks/%s.img", r->data_dir, name) < 0 ? NULL : p;
}

static char *cbt_path_for(const struct registry *r, const char *name)
{
  char *p;
  return asprintf(&p, "%s/cbt/%s.cbt", r->data_dir, name) < 0 ? NULL : p;
}

/* A cloud cache's present map (schema 3: column cache_quota not NULL). */
static char *cache_path_for(const struct registry *r, const char *name)
{
  char *p;
  return asprintf(&p, "%s/cache/%s.present", r->data_dir, name) < 0 ? NULL : p;
}

/* ---- in-memory list (__r->lock held) ---- */

static struct registry_entry *find_entry(struct registry *r, const char *name, size_t *pos)
{
  size_t lo = 0, hi = r->n;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    int c = strcmp(r->entries[mid].name, name);
    if (c == 0) {
      if (pos)
        *pos = mid;
      return &r->entries[mid];
    }
    if (c < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (pos)
    *pos = lo;
  return NULL;
}

static int insert_entry(struct registry *r, const char *name, bool owned, struct disk *d)
{
  size_t pos;
  if (find_entry(r, name, &pos))
    return -EEXIST;
  if (r->n == r->cap) {
    size_t cap = r->cap ? r->cap * 2 : 16;
    struct registry_entry *e = realloc(r->entries, cap * sizeof *e);
    if (!e)
      return -ENOMEM;
    r->entries = e;
    r->cap = cap;
  }
  memmove(&r->entries[pos + 1], &r->entries[pos], (r->n - pos) * sizeof *r->entries);
  struct registry_entry *e = &r->entries[pos];
  snprintf(e->name, sizeof e->name, "%s", name);
  e->owned = owned;
  e->disk = d;
  r->n++;
  return 0;
}

static struct disk *take_entry(struct registry *r, size_t pos)
{
  struct disk *d = r->entries[pos].disk;
  memmove(&r->entries[pos], &r->entries[pos + 1], (r->n - pos - 1) * sizeof *r->entries);
  r->n--;
  return d;
}

/* ---- SQLite helpers (__r->lock held) ---- */

static int db_exec(sqlite3 *db, const char *sql, char *err, size_t errlen)
{
  char *msg = NULL;
  if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
    set_err(err, errlen, "%s", msg ? msg : sqlite3_errmsg(db));
    sqlite3_free(msg);
    return -1;
  }
  return 0;
}

/* Prepares sql or records why not. */
static sqlite3_stmt *db_prepare(struct registry *r, const char *sql, char *err, size_t errlen)
{
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(r->db, sql, -1, &st, NULL) != SQLITE_OK) {
    set_err(err, errlen, "registry %s/ferry.db: %s", r->data_dir, sqlite3_errmsg(r->db));
    return NULL;
  }
  return st;
}

/* Runs a statement that returns no rows; returns 0 or -EIO (err filled). */
static int db_step_done(struct registry *r, sqlite3_stmt *st, const char *what, char *err,
                        size_t errlen)
{
  int rc = sqlite3_step(st);
  if (rc != SQLITE_DONE) {
    set_err(err, errlen, "registry %s/ferry.db: cannot %s: %s", r->data_dir, what,
            sqlite3_errmsg(r->db));
    return rc == SQLITE_CONSTRAINT ? -EEXIST : -EIO;
  }
  return 0;
}

/* 1 if a row named name exists, 0 if not, -EIO on error.  owned/image are
 * filled when non-NULL and the row exists (image malloc'ed). */
static int db_lookup(struct registry *r, const char *name, bool *owned, char **image, char *err,
                     size_t errlen)
{
  sqlite3_stmt *st = db_prepare(r, "SELECT owned, image FROM disks WHERE name = ?1", err, errlen);
  if (!st)
    return -EIO;
  sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  int rc = sqlite3_step(st), ret;
  if (rc == SQLITE_ROW) {
    if (owned)
      *owned = sqlite3_column_int64(st, 0) != 0;
    if (image) {
      const unsigned char *t = sqlite3_column_text(st, 1);
      *image = strdup(t ? (const char *)t : "");
    }
    ret = 1;
  } else if (rc == SQLITE_DONE) {
    ret = 0;
  } else {
    set_err(err, errlen, "registry %s/ferry.db: %s", r->data_dir, sqlite3_errmsg(r->db));
    ret = -EIO;
  }
  sqlite3_finalize(st);
  return ret;
}

static int db_delete(struct registry *r, const char *name, char *err, size_t errlen)
{
  sqlite3_stmt *st = db_prepare(r, "DELETE FROM disks WHERE name = ?1", err, errlen);
  if (!st)
    return -EIO;
  sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  int ret = db_step_done(r, st, "delete a disk", err, errlen);
  sqlite3_finalize(st);
  return ret;
}

static int db_insert(struct registry *r, const char *name, const char *image, bool owned,
                     uint64_t size, uint64_t granularity, const char *fence, int64_t cache_quota,
                     char *err, size_t errlen)
{
  sqlite3_stmt *st = db_prepare(r,
      "INSERT INTO disks (name, image, owned, size, cbt_granularity, write_limit_bps, created_at,"
      " fence, cache_quota) VALUES (?1, ?2, ?3, ?4, ?5, 0,"
      " strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), ?6, ?7)",
      err, errlen);
  if (!st)
    return -EIO;
  sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, image, -1, SQLITE_STATIC);
  sqlite3_bind_int(st, 3, owned);
  sqlite3_bind_int64(st, 4, (sqlite3_int64)size);
  sqlite3_bind_int64(st, 5, (sqlite3_int64)granularity);
  if (fence)
    sqlite3_bind_text(st, 6, fence, -1, SQLITE_STATIC);
  else
    sqlite3_bind_null(st, 6);
  if (cache_quota >= 0)
    sqlite3_bind_int64(st, 7, cache_quota);
  else
    sqlite3_bind_null(st, 7);
  int ret = db_step_done(r, st, "insert a disk", err, errlen);
  sqlite3_finalize(st);
  if (ret == -EEXIST)
    set_err(err, errlen, "disk '%s' already exists", name);
  return ret;
}

/* ---- files ---- */

static void unlink_logged(const char *path, const char *disk_name)
{
  if (unlink(path) < 0 && errno != ENOENT)
    log_warn(disk_name, "cannot delete %s: %s", path, strerror(errno));
  else
    fsync_parent_dir(path);
}

/* Makes a sparse image of size bytes, durable (file and directory entry). */
static int create_image(const char *path, uint64_t size, char *err, size_t errlen)
{
  int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    int e = errno;
    if (e == EEXIST)
      set_err(err, errlen,
              "image file %s exists but no disk is registered for it (left by a crash?); "
              "add it with an image path, or delete it", path);
    else
      set_err(err, errlen, "cannot create image %s: %s", path, strerror(e));
    return -e;
  }
  if (ftruncate(fd, (off_t)size) < 0 || fsync(fd) < 0) {
    int e = errno;
    if (e == EFBIG || e == EINVAL)
      set_err(err, errlen, "size %llu is too large for the file system of %s",
              (unsigned long long)size, path);
    else
      set_err(err, errlen, "cannot size image %s: %s", path, strerror(e));
    close(fd);
    unlink(path);
    return e == EFBIG ? -EINVAL : -e;
  }
  close(fd);
  if (fsync_parent_dir(path) < 0) {
    int e = errno;
    set_err(err, errlen, "cannot sync the directory of %s: %s", path, strerror(e));
    unlink(path);
    return -e;
  }
  return 0;
}

static int check_granularity(uint64_t *g, char *err, size_t errlen)
{
  if (*g == 0)
    *g = CBT_DEFAULT_GRANULARITY;
  if (*g < GRANULARITY_MIN || *g > GRANULARITY_MAX || (*g & (*g - 1))) {
    set_err(err, errlen, "cbt_granularity %llu must be a power of two from 4 KiB to 1 GiB",
            (unsigned long long)*g);
    return -EINVAL;
  }
  return 0;
}

static int check_name(const char *name, char *err, size_t errlen)
{
  if (!name_is_valid(name)) {
    set_err(err, errlen,
            "invalid disk name '%.80s': 1-64 characters of A-Z a-z 0-9 . _ -, "
            "not starting with '.' or '-'", name ? name : "");
    return -EINVAL;
  }
  return 0;
}

/* Opens a disk with the registry's settings.  fresh: the disk is new to
 * ferry (create/add), so any map file at its path is stale and replaced by a
 * clean one; otherwise a missing map makes the disk all dirty. */
static struct disk *open_disk(struct registry *r, const char *name, const char *image,
                              uint64_t granularity, uint64_t write_limit, bool fresh,
                              int64_t cache_quota, const char *snapshot, char *err,
                              size_t errlen)
{
  char *cbt = cbt_path_for(r, name);
  char *cache = cache_quota >= 0 ? cache_path_for(r, name) : NULL;
  if (!cbt || (cache_quota >= 0 && !cache)) {
    free(cbt);
    free(cache);
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  struct disk_config cfg = {
    .name = name,
    .image_path = image,
    .cbt_path = cbt,
    .cbt_granularity = granularity,
    .cbt_enabled = r->opt.cbt_enabled,
    .heat_enabled = r->opt.heat_enabled,
    .write_limit_bps = write_limit,
    .cbt_new = fresh,
    .cache_path = cache,
    .cache_quota = cache_quota > 0 ? (uint64_t)cache_quota : 0,
    .cache_new = fresh,
    .snapshot_path = snapshot,
  };
  struct disk *d = disk_open(&cfg, err, errlen);
  free(cbt);
  free(cache);
  return d;
}

/* ---- open / close ---- */

static int take_dir_lock(struct registry *r, char *err, size_t errlen)
{
  char *path = path_join(r->data_dir, "ferry.lock", NULL);
  if (!path) {
    set_err(err, errlen, "out of memory");
    return -1;
  }
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    set_err(err, errlen, "cannot open %s: %s", path, strerror(errno));
    free(path);
    return -1;
  }
  if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
    int e = errno;
    char pid[32] = "";
    ssize_t n = pread(fd, pid, sizeof pid - 1, 0);
    pid[n > 0 ? n : 0] = '\0';
    pid[strcspn(pid, "\n")] = '\0';
    if (e == EWOULDBLOCK)
      set_err(err, errlen, "data directory %s is in use by another ferryd%s%s%s", r->data_dir,
              pid[0] ? " (pid " : "", pid, pid[0] ? ")" : "");
    else
      set_err(err, errlen, "cannot lock %s: %s", path, strerror(e));
    close(fd);
    free(path);
    return -1;
  }
  char buf[32];
  int len = snprintf(buf, sizeof buf, "%d\n", (int)getpid());
  if (ftruncate(fd, 0) < 0 || pwrite(fd, buf, len, 0) != len)
    log_warn(NULL, "cannot write the pid to %s: %s", path, strerror(errno));
  free(path);
  r->lock_fd = fd;
  return 0;
}

static int make_subdir(const char *dir, const char *sub, char *err, size_t errlen)
{
  char *p = path_join(dir, sub, NULL);
  if (!p) {
    set_err(err, errlen, "out of memory");
    return -1;
  }
  if (mkdir(p, 0750) < 0 && errno != EEXIST) {
    set_err(err, errlen, "cannot create %s: %s", p, strerror(errno));
    free(p);
    return -1;
  }
  struct stat st;
  if (stat(p, &st) < 0 || !S_ISDIR(st.st_mode)) {
    set_err(err, errlen, "%s exists and is not a directory", p);
    free(p);
    return -1;
  }
  free(p);
  return 0;
}

/* Opens ferry.db, checks it, sets the pragmas and creates or checks the schema. */
static int open_db(struct registry *r, char *err, size_t errlen)
{
  char *path = path_join(r->data_dir, "ferry.db", NULL);
  if (!path) {
    set_err(err, errlen, "out of memory");
    return -1;
  }
  char msg[512];
  int rc = sqlite3_open_v2(path, &r->db,
                           SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                           NULL);
  if (rc != SQLITE_OK) {
    set_err(err, errlen, "cannot open registry %s: %s", path,
            r->db ? sqlite3_errmsg(r->db) : sqlite3_errstr(rc));
    goto fail;
  }
  sqlite3_extended_result_codes(r->db, 1);
  sqlite3_busy_timeout(r->db, 5000);

  /* The first statements read the file: a corrupt or foreign one fails here.
   * It is never recreated: it holds which images ferry owns. */
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(r->db, "PRAGMA quick_check", -1, &st, NULL) != SQLITE_OK) {
    set_err(err, errlen,
            "registry %s is unreadable: %s (move it aside to start with an empty registry, "
            "or restore it from a backup)", path, sqlite3_errmsg(r->db));
    goto fail;
  }
  rc = sqlite3_step(st);
  const unsigned char *res = rc == SQLITE_ROW ? sqlite3_column_text(st, 0) : NULL;
  if (!res || strcmp((const char *)res, "ok") != 0) {
    set_err(err, errlen,
            "registry %s is corrupt: %s (move it aside to start with an empty registry, "
            "or restore it from a backup)", path,
            res ? (const char *)res : sqlite3_errmsg(r->db));
    sqlite3_finalize(st);
    goto fail;
  }
  sqlite3_finalize(st);

  st = NULL;
  if (sqlite3_prepare_v2(r->db, "PRAGMA journal_mode=WAL", -1, &st, NULL) != SQLITE_OK ||
      sqlite3_step(st) != SQLITE_ROW ||
      strcmp((const char *)sqlite3_column_text(st, 0), "wal") != 0) {
    set_err(err, errlen, "registry %s: cannot switch to WAL mode: %s", path,
            sqlite3_errmsg(r->db));
    sqlite3_finalize(st);
    goto fail;
  }
  sqlite3_finalize(st);
  if (db_exec(r->db, "PRAGMA synchronous=FULL", msg, sizeof msg) < 0) {
    set_err(err, errlen, "registry %s: %s", path, msg);
    goto fail;
  }

  st = NULL;
  int version = -1;
  if (sqlite3_prepare_v2(r->db, "PRAGMA user_version", -1, &st, NULL) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW)
    version = sqlite3_column_int(st, 0);
  sqlite3_finalize(st);
  if (version < 0) {
    set_err(err, errlen, "registry %s: cannot read the schema version: %s", path,
            sqlite3_errmsg(r->db));
    goto fail;
  }
  if (version == 0) {
    if (db_exec(r->db,
                "BEGIN IMMEDIATE;"
                "CREATE TABLE IF NOT EXISTS disks ("
                " name TEXT PRIMARY KEY NOT NULL,"
                " image TEXT NOT NULL,"
                " owned INTEGER NOT NULL,"
                " size INTEGER NOT NULL,"
                " cbt_granularity INTEGER NOT NULL,"
                " write_limit_bps INTEGER NOT NULL DEFAULT 0,"
                " created_at TEXT NOT NULL,"
                " fence TEXT,"
                " cache_quota INTEGER,"
                " snapshot TEXT);"
                "PRAGMA user_version = 3;"
                "COMMIT;", msg, sizeof msg) < 0) {
      db_exec(r->db, "ROLLBACK", msg, sizeof msg);
      set_err(err, errlen, "registry %s: cannot create the schema: %s", path, msg);
      goto fail;
    }
    log_info(NULL, "registry %s created", path);
  } else if (version == 1 || version == 2) {
    /* 2: fences; 3: cloud caches and restore points. */
    if (db_exec(r->db, version == 1 ?
                "BEGIN IMMEDIATE;"
                "ALTER TABLE disks ADD COLUMN fence TEXT;"
                "ALTER TABLE disks ADD COLUMN cache_quota INTEGER;"
                "ALTER TABLE disks ADD COLUMN snapshot TEXT;"
                "PRAGMA user_version = 3;"
                "COMMIT;" :
                "BEGIN IMMEDIATE;"
                "ALTER TABLE disks ADD COLUMN cache_quota INTEGER;"
                "ALTER TABLE disks ADD COLUMN snapshot TEXT;"
                "PRAGMA user_version = 3;"
                "COMMIT;", msg, sizeof msg) < 0) {
      db_exec(r->db, "ROLLBACK", msg, sizeof msg);
      set_err(err, errlen, "registry %s: cannot upgrade the schema to version 3: %s", path, msg);
      goto fail;
    }
    log_info(NULL, "registry %s upgraded to schema version 3", path);
  } else if (version != REGISTRY_SCHEMA_VERSION) {
    set_err(err, errlen,
            "registry %s has schema version %d; this ferryd knows version %d "
            "(written by a newer ferry?)", path, version, REGISTRY_SCHEMA_VERSION);
    goto fail;
  }
  free(path);
  return 0;

fail:
  if (r->db) {
    sqlite3_close(r->db);
    r->db = NULL;
  }
  free(path);
  return -1;
}

/* Opens every registered disk.  A disk that cannot be opened is logged and
 * left out (its row stays, so `rm` can still remove it). */
static int load_disks(struct registry *r, char *err, size_t errlen)
{
  sqlite3_stmt *st = db_prepare(r,
      "SELECT name, image, owned, size, cbt_granularity, write_limit_bps, fence, cache_quota,"
      " snapshot FROM disks ORDER BY name", err, errlen);
  if (!st)
    return -1;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    const char *name = (const char *)sqlite3_column_text(st, 0);
    const char *image = (const char *)sqlite3_column_text(st, 1);
    bool owned = sqlite3_column_int64(st, 2) != 0;
    uint64_t size = (uint64_t)sqlite3_column_int64(st, 3);
    uint64_t gran = (uint64_t)sqlite3_column_int64(st, 4);
    uint64_t limit = (uint64_t)sqlite3_column_int64(st, 5);
    const char *fence = (const char *)sqlite3_column_text(st, 6);
    int64_t cache_quota = sqlite3_column_type(st, 7) == SQLITE_NULL
                              ? -1 : sqlite3_column_int64(st, 7);
    const char *snapshot = (const char *)sqlite3_column_text(st, 8);
    if (!name || !image || !name_is_valid(name)) {
      log_error(NULL, "registry: skipping a row with a bad name or image");
      continue;
    }
    char derr[256];
    struct disk *d = open_disk(r, name, image, gran, limit, false, cache_quota, snapshot, derr,
                               sizeof derr);
    if (!d) {
      log_error(name, "not served: %s (remove it with `ferry disk rm %s` or fix the image)",
                derr, name);
      continue;
    }
    if (fence)
      disk_set_fence(d, fence);
    if (disk_size(d) != size)
      log_warn(name, "image size changed from %llu to %llu bytes", (unsigned long long)size,
               (unsigned long long)disk_size(d));
    if (insert_entry(r, name, owned, d) < 0) {
      disk_unref(d);
      set_err(err, errlen, "out of memory");
      sqlite3_finalize(st);
      return -1;
    }
    log_info(name, "opened %s (%llu bytes)%s%s", image, (unsigned long long)disk_size(d),
             fence ? "; fenced: " : "", fence ? fence : "");
  }
  if (rc != SQLITE_DONE) {
    set_err(err, errlen, "registry %s/ferry.db: cannot read disks: %s", r->data_dir,
            sqlite3_errmsg(r->db));
    sqlite3_finalize(st);
    return -1;
  }
  sqlite3_finalize(st);
  return 0;
}

struct registry *registry_open(const char *data_dir, const struct registry_options *opt,
                               char *err, size_t errlen)
{
  struct registry *r = calloc(1, sizeof *r);
  if (!r || !(r->data_dir = strdup(data_dir))) {
    free(r);
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  r->lock_fd = -1;
  r->opt = *opt;
  pthread_mutex_init(&r->lock, NULL);

  if (take_dir_lock(r, err, errlen) < 0 || make_subdir(data_dir, "disks", err, errlen) < 0 ||
      make_subdir(data_dir, "cbt", err, errlen) < 0 || make_subdir(data_dir, "cache", err, errlen) < 0 ||
      make_subdir(data_dir, "snapshots", err, errlen) < 0 || open_db(r, err, errlen) < 0 ||
      load_disks(r, err, errlen) < 0) {
    registry_close(r);
    return NULL;
  }
  log_info(NULL, "registry %s/ferry.db: %zu disk(s)", data_dir, r->n);
  return r;
}

void registry_close(struct registry *r)
{
  if (!r)
    return;
  for (size_t i = 0; i < r->n; i++) {
    disk_sync_all(r->entries[i].disk);
    disk_unref(r->entries[i].disk);
  }
  free(r->entries);
  if (r->db && sqlite3_close(r->db) != SQLITE_OK)
    log_error(NULL, "registry: close: %s", sqlite3_errmsg(r->db));
  if (r->lock_fd >= 0)
    close(r->lock_fd);   /* drops the flock */
  pthread_mutex_destroy(&r->lock);
  free(r->data_dir);
  free(r);
}

/* ---- changes ---- */

int registry_create(struct registry *r, const char *name, uint64_t size,
                    uint64_t cbt_granularity, char *err, size_t errlen)
{
  return registry_create_ex(r, name, size, cbt_granularity, NULL, err, errlen);
}

int registry_create_ex(struct registry *r, const char *name, uint64_t size,
                       uint64_t cbt_granularity, const char *fence, char *err, size_t errlen)
{
  return registry_create_cached(r, name, size, cbt_granularity, fence, -1, err, errlen);
}

int registry_create_cached(struct registry *r, const char *name, uint64_t size,
                           uint64_t cbt_granularity, const char *fence, int64_t cache_quota,
                           char *err, size_t errlen)
{
  int ret = check_name(name, err, errlen);
  if (ret < 0)
    return ret;
  if (size == 0 || size % 512 != 0 || size > (uint64_t)INT64_MAX) {
    set_err(err, errlen, "size %llu must be a non-zero multiple of 512 bytes",
            (unsigned long long)size);
    return -EINVAL;
  }
  if ((ret = check_granularity(&cbt_granularity, err, errlen)) < 0)
    return ret;
  char *image = image_path_for(r, name);
  if (!image) {
    set_err(err, errlen, "out of memory");
    return -ENOMEM;
  }

  pthread_mutex_lock(&r->lock);
  if (find_entry(r, name, NULL)) {
    set_err(err, errlen, "disk '%s' already exists", name);
    ret = -EEXIST;
    goto out;
  }
  if ((ret = db_lookup(r, name, NULL, NULL, err, errlen)) != 0) {
    if (ret > 0) {
      set_err(err, errlen, "disk '%s' is registered but cannot be opened; remove it first",
              name);
      ret = -EEXIST;
    }
    goto out;
  }
  if ((ret = create_image(image, size, err, errlen)) < 0)
    goto out;
  if ((ret = db_insert(r, name, image, true, size, cbt_granularity, fence, cache_quota, err,
                       errlen)) < 0) {
    unlink_logged(image, name);
    goto out;
  }
  struct disk *d = open_disk(r, name, image, cbt_granularity, 0, true, cache_quota, NULL, err,
                             errlen);
  if (d && fence)
    disk_set_fence(d, fence);
  if (!d || insert_entry(r, name, true, d) < 0) {
    /* Undo in reverse order; nothing of the new disk stays. */
    char e2[256];
    if (d)
      set_err(err, errlen, "out of memory");
    if (d)
      disk_unref(d);
    db_delete(r, name, e2, sizeof e2);
    char *cbt = cbt_path_for(r, name);
    if (cbt)
      unlink_logged(cbt, name);
    free(cbt);
    unlink_logged(image, name);
    ret = -EIO;
    goto out;
  }
  log_info(name, "created %s (%llu bytes, cbt granularity %llu)%s%s", image,
           (unsigned long long)size, (unsigned long long)cbt_granularity,
           fence ? "; fenced: " : "", fence ? fence : "");
  ret = 0;
out:
  pthread_mutex_unlock(&r->lock);
  free(image);
  return ret;
}

int registry_add(struct registry *r, const char *name, const char *image_path,
                 uint64_t cbt_granularity, char *err, size_t errlen)
{
  int ret = check_name(name, err, errlen);
  if (ret < 0)
    return ret;
  if ((ret = check_granularity(&cbt_granularity, err, errlen)) < 0)
    return ret;
  if (!image_path || image_path[0] != '/') {
    set_err(err, errlen, "image path '%s' must be absolute", image_path ? image_path : "");
    return -EINVAL;
  }
  struct stat st;
  if (stat(image_path, &st) < 0) {
    int e = errno;
    set_err(err, errlen, "image %s: %s", image_path, strerror(e));
    return e == ENOENT || e == ENOTDIR ? -ENOENT : -e;
  }
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    set_err(err, errlen, "image %s is not a regular file or block device", image_path);
    return -EINVAL;
  }
  if (S_ISREG(st.st_mode) && st.st_size == 0) {
    set_err(err, errlen, "image %s is empty", image_path);
    return -EINVAL;
  }

  pthread_mutex_lock(&r->lock);
  if (find_entry(r, name, NULL)) {
    set_err(err, errlen, "disk '%s' already exists", name);
    ret = -EEXIST;
    goto out;
  }
  if ((ret = db_lookup(r, name, NULL, NULL, err, errlen)) != 0) {
    if (ret > 0) {
      set_err(err, errlen, "disk '%s' is registered but cannot be opened; remove it first",
              name);
      ret = -EEXIST;
    }
    goto out;
  }
  /* One image, one disk: two disks on one file would split its dirty map. */
  for (size_t i = 0; i < r->n; i++) {
    struct stat other;
    if (stat(disk_image_path(r->entries[i].disk), &other) == 0 && other.st_dev == st.st_dev &&
        other.st_ino == st.st_ino && ((other.st_mode ^ st.st_mode) & S_IFMT) == 0 &&
        (!S_ISBLK(st.st_mode) || other.st_rdev == st.st_rdev)) {
      set_err(err, errlen, "image %s is already served as disk '%s'", image_path,
              r->entries[i].name);
      ret = -EEXIST;
      goto out;
    }
  }
  struct disk *d = open_disk(r, name, image_path, cbt_granularity, 0, true, -1, NULL, err, errlen);
  if (!d) {
    ret = -EIO;
    goto out;
  }
  if ((ret = db_insert(r, name, image_path, false, disk_size(d), cbt_granularity, NULL, -1, err,
                       errlen)) < 0 ||
      (ret = insert_entry(r, name, false, d)) < 0) {
    if (ret == -ENOMEM) {
      set_err(err, errlen, "out of memory");
      char e2[256];
      db_delete(r, name, e2, sizeof e2);
    }
    disk_unref(d);
    char *cbt = cbt_path_for(r, name);
    if (cbt)
      unlink_logged(cbt, name);
    free(cbt);
    goto out;
  }
  log_info(name, "added %s (%llu bytes, %s, cbt granularity %llu)", image_path,
           (unsigned long long)disk_size(d), disk_is_block_device(d) ? "block device" : "file",
           (unsigned long long)cbt_granularity);
  ret = 0;
out:
  pthread_mutex_unlock(&r->lock);
  return ret;
}

int registry_remove(struct registry *r, const char *name, bool force, char *err, size_t errlen)
{
  int ret = check_name(name, err, errlen);
  if (ret < 0)
    return ret;
  bool owned = false;
  char *image = NULL;
  struct disk *d = NULL;

  pthread_mutex_lock(&r->lock);
  size_t pos;
  struct registry_entry *e = find_entry(r, name, &pos);
  if (e) {
    unsigned clients = disk_clients(e->disk);
    if (clients > 0 && !force) {
      set_err(err, errlen, "disk '%s' has %u NBD client%s connected; disconnect %s or force",
              name, clients, clients == 1 ? "" : "s", clients == 1 ? "it" : "them");
      pthread_mutex_unlock(&r->lock);
      return -EBUSY;
    }
    owned = e->owned;
    image = strdup(disk_image_path(e->disk));
  } else {
    /* Not open (its image was missing at start): the row can still go. */
    ret = db_lookup(r, name, &owned, &image, err, errlen);
    if (ret <= 0) {
      if (ret == 0)
        set_err(err, errlen, "disk '%s' does not exist", name);
      pthread_mutex_unlock(&r->lock);
      return ret == 0 ? -ENOENT : ret;
    }
  }
  if (!image) {
    set_err(err, errlen, "out of memory");
    pthread_mutex_unlock(&r->lock);
    return -ENOMEM;
  }
  /* The row is the commit point: once it is gone the disk is gone. */
  if ((ret = db_delete(r, name, err, errlen)) < 0) {
    pthread_mutex_unlock(&r->lock);
    free(image);
    return ret;
  }
  if (e)
    d = take_entry(r, pos);
  char *cbt = cbt_path_for(r, name);
  char *cache = cache_path_for(r, name);
  /* Files go under the lock so a create of the same name cannot race them. */
  if (cbt)
    unlink_logged(cbt, name);
  if (cache && access(cache, F_OK) == 0)
    unlink_logged(cache, name);
  free(cache);
  if (owned)
    unlink_logged(image, name);
  pthread_mutex_unlock(&r->lock);

  if (d)
    disk_unref(d);   /* closes the disk once no client holds it */
  log_info(name, "removed%s%s", owned ? "; deleted image " : "", owned ? image : "");
  free(cbt);
  free(image);
  return 0;
}

struct disk *registry_get(struct registry *r, const char *name)
{
  if (!name)
    return NULL;
  pthread_mutex_lock(&r->lock);
  struct registry_entry *e = find_entry(r, name, NULL);
  struct disk *d = e ? e->disk : NULL;
  if (d)
    disk_ref(d);
  pthread_mutex_unlock(&r->lock);
  return d;
}

struct disk **registry_list(struct registry *r, size_t *count)
{
  pthread_mutex_lock(&r->lock);
  struct disk **v = calloc(r->n ? r->n : 1, sizeof *v);
  if (!v) {
    pthread_mutex_unlock(&r->lock);
    *count = 0;
    return NULL;
  }
  for (size_t i = 0; i < r->n; i++) {
    v[i] = r->entries[i].disk;
    disk_ref(v[i]);
  }
  *count = r->n;
  pthread_mutex_unlock(&r->lock);
  return v;
}

bool registry_owns_image(struct registry *r, const char *name)
{
  pthread_mutex_lock(&r->lock);
  struct registry_entry *e = find_entry(r, name, NULL);
  bool owned = false;
  if (e) {
    owned = e->owned;
  } else {
    char err[256];
    if (db_lookup(r, name, &owned, NULL, err, sizeof err) <= 0)
      owned = false;
  }
  pthread_mutex_unlock(&r->lock);
  return owned;
}

int registry_set_write_limit(struct registry *r, const char *name, uint64_t bps, char *err,
                             size_t errlen)
{
  pthread_mutex_lock(&r->lock);
  struct registry_entry *e = find_entry(r, name, NULL);
  int ret;
  if (!e) {
    set_err(err, errlen, "disk '%s' does not exist", name ? name : "");
    ret = -ENOENT;
    goto out;
  }
  /* Persist first: a limit the operator set must not vanish at restart. */
  sqlite3_stmt *st = db_prepare(r, "UPDATE disks SET write_limit_bps = ?1 WHERE name = ?2", err,
                                errlen);
  if (!st) {
    ret = -EIO;
    goto out;
  }
  sqlite3_bind_int64(st, 1, (sqlite3_int64)bps);
  sqlite3_bind_text(st, 2, name, -1, SQLITE_STATIC);
  ret = db_step_done(r, st, "store the write limit", err, errlen);
  sqlite3_finalize(st);
  if (ret == 0) {
    disk_set_write_limit(e->disk, bps);
    log_info(name, "write limit %llu bytes/s%s", (unsigned long long)bps, bps ? "" : " (off)");
  }
out:
  pthread_mutex_unlock(&r->lock);
  return ret;
}

int registry_set_fence(struct registry *r, const char *name, const char *reason, char *err,
                       size_t errlen)
{
  pthread_mutex_lock(&r->lock);
  struct registry_entry *e = find_entry(r, name, NULL);
  int ret;
  if (!e) {
    set_err(err, errlen, "disk '%s' does not exist", name ? name : "");
    ret = -ENOENT;
    goto out;
  }
  /* Fencing persists before it takes effect, unfencing takes effect after
   * it persists: a crash in between leaves the disk fenced, never two sites
   * writable. */
  if (reason)
    disk_set_fence(e->disk, reason);
  sqlite3_stmt *st = db_prepare(r, "UPDATE disks SET fence = ?1 WHERE name = ?2", err, errlen);
  if (!st) {
    ret = -EIO;
    goto out;
  }
  if (reason)
    sqlite3_bind_text(st, 1, reason, -1, SQLITE_STATIC);
  else
    sqlite3_bind_null(st, 1);
  sqlite3_bind_text(st, 2, name, -1, SQLITE_STATIC);
  ret = db_step_done(r, st, "store the fence", err, errlen);
  sqlite3_finalize(st);
  if (ret == 0) {
    if (!reason)
      disk_set_fence(e->disk, NULL);
    log_info(name, "%s%s", reason ? "fenced: " : "unfenced: this site is authoritative",
             reason ? reason : "");
  }
out:
  pthread_mutex_unlock(&r->lock);
  return ret;
}

const char *registry_data_dir(const struct registry *r) { return r->data_dir; }

void registry_sync_all(struct registry *r)
{
  size_t n;
  struct disk **v = registry_list(r, &n);
  if (!v)
    return;
  for (size_t i = 0; i < n; i++) {
    disk_sync_all(v[i]);
    disk_unref(v[i]);
  }
  free(v);
}

/* ---- cloud caches and restore points ---- */

static int db_set_column(struct registry *r, const char *sql, const char *name, const char *text,
                         int64_t num, bool null, const char *what, char *err, size_t errlen)
{
  sqlite3_stmt *st = db_prepare(r, sql, err, errlen);
  if (!st)
    return -EIO;
  if (null)
    sqlite3_bind_null(st, 1);
  else if (text)
    sqlite3_bind_text(st, 1, text, -1, SQLITE_STATIC);
  else
    sqlite3_bind_int64(st, 1, num);
  sqlite3_bind_text(st, 2, name, -1, SQLITE_STATIC);
  int ret = db_step_done(r, st, what, err, errlen);
  sqlite3_finalize(st);
  return ret;
}

int registry_drop_cache(struct registry *r, const char *name, char *err, size_t errlen)
{
  pthread_mutex_lock(&r->lock);
  struct registry_entry *e = find_entry(r, name, NULL);
  int ret = -ENOENT;
  if (!e) {
    set_err(err, errlen, "disk '%s' does not exist", name);
    goto out;
  }
  /* The open disk keeps serving through its (complete) cache until it is
   * next opened, as a plain image. */
  ret = db_set_column(r, "UPDATE disks SET cache_quota = ?1 WHERE name = ?2", name, NULL, 0,
                      true, "store the end of the cache", err, errlen);
  if (ret == 0) {
    char *cache = cache_path_for(r, name);
    if (cache)
      unlink_logged(cache, name);
    free(cache);
    log_info(name, "the cloud cache holds every region: the disk is a plain image from now on");
  }
out:
  pthread_mutex_unlock(&r->lock);
  return ret;
}

int registry_set_snapshot(struct registry *r, const char *name, const char *path, char *err,
                          size_t errlen)
{
  pthread_mutex_lock(&r->lock);
  struct registry_entry *e = find_entry(r, name, NULL);
  int ret = -ENOENT;
  if (!e) {
    set_err(err, errlen, "disk '%s' does not exist", name);
    goto out;
  }
  if (path) {
    /* Made and attached before it is recorded: a row never names a
     * restore point that does not exist. */
    if ((ret = disk_attach_snapshot(e->disk, path, true, err, errlen)) < 0)
      goto out;
    ret = db_set_column(r, "UPDATE disks SET snapshot = ?1 WHERE name = ?2", name, path, 0,
                        false, "store the restore point", err, errlen);
    if (ret < 0) {
      disk_detach_snapshot(e->disk);
      snapshot_delete(path);
    } else {
      log_info(name, "restore point taken (%s)", path);
    }
  } else {
    ret = db_set_column(r, "UPDATE disks SET snapshot = ?1 WHERE name = ?2", name, NULL, 0, true,
                        "drop the restore point", err, errlen);
    if (ret == 0)
      disk_detach_snapshot(e->disk);
  }
out:
  pthread_mutex_unlock(&r->lock);
  return ret;
}
