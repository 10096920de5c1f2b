/* db: SQLite connections for ferryd's state modules (see db.h). */
#include "common/db.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

struct db *db_open(const char *data_dir, char *err, size_t errlen)
{
  struct db *db = calloc(1, sizeof *db);
  if (!db || asprintf(&db->path, "%s/ferry.db", data_dir) < 0) {
    free(db);
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  pthread_mutex_init(&db->lock, NULL);
  int rc = sqlite3_open_v2(db->path, &db->h,
                           SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                           NULL);
  if (rc != SQLITE_OK) {
    set_err(err, errlen, "cannot open %s: %s", db->path,
            db->h ? sqlite3_errmsg(db->h) : sqlite3_errstr(rc));
    db_close(db);
    return NULL;
  }
  sqlite3_extended_result_codes(db->h, 1);
  sqlite3_busy_timeout(db->h, 10000);
  char msg[256];
  if (db_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;", msg, sizeof msg) < 0) {
    set_err(err, errlen, "%s: %s", db->path, msg);
    db_close(db);
    return NULL;
  }
  return db;
}

void db_close(struct db *db)
{
  if (!db)
    return;
  if (db->h)
    sqlite3_close(db->h);
  pthread_mutex_destroy(&db->lock);
  free(db->path);
  free(db);
}

void db_lock(struct db *db) { pthread_mutex_lock(&db->lock); }
void db_unlock(struct db *db) { pthread_mutex_unlock(&db->lock); }

int db_exec(struct db *db, const char *sql, char *err, size_t errlen)
{
  char *msg = NULL;
  if (sqlite3_exec(db->h, sql, NULL, NULL, &msg) != SQLITE_OK) {
    set_err(err, errlen, "%s", msg ? msg : sqlite3_errmsg(db->h));
    sqlite3_free(msg);
    return -1;
  }
  return 0;
}

sqlite3_stmt *db_prepare(struct db *db, const char *sql, char *err, size_t errlen)
{
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db->h, sql, -1, &st, NULL) != SQLITE_OK) {
    set_err(err, errlen, "%s: %s", db->path, sqlite3_errmsg(db->h));
    return NULL;
  }
  return st;
}

int db_step_done(struct db *db, sqlite3_stmt *st, const char *what, char *err, size_t errlen)
{
  int rc = sqlite3_step(st);
  if (rc != SQLITE_DONE) {
    set_err(err, errlen, "%s: cannot %s: %s", db->path, what, sqlite3_errmsg(db->h));
    return (rc & 0xff) == SQLITE_CONSTRAINT ? -EEXIST : -EIO;
  }
  return 0;
}

int db_migrate(struct db *db, const char *module, const char *const *steps, int nsteps,
               char *err, size_t errlen)
{
  char msg[512];
  db_lock(db);
  int ret = -1;
  if (db_exec(db, "CREATE TABLE IF NOT EXISTS schema_versions ("
                  " module TEXT PRIMARY KEY NOT NULL, version INTEGER NOT NULL)",
              msg, sizeof msg) < 0) {
    set_err(err, errlen, "%s: %s", db->path, msg);
    goto out;
  }
  sqlite3_stmt *st = db_prepare(db, "SELECT version FROM schema_versions WHERE module = ?1",
                                err, errlen);
  if (!st)
    goto out;
  sqlite3_bind_text(st, 1, module, -1, SQLITE_STATIC);
  int version = 0;
  if (sqlite3_step(st) == SQLITE_ROW)
    version = sqlite3_column_int(st, 0);
  sqlite3_finalize(st);
  if (version > nsteps) {
    set_err(err, errlen, "%s: the %s tables have schema version %d; this ferryd knows %d "
            "(written by a newer ferry?)", db->path, module, version, nsteps);
    goto out;
  }
  for (; version < nsteps; version++) {
    char *sql = NULL;
    if (asprintf(&sql, "BEGIN IMMEDIATE; %s;"
                 " INSERT INTO schema_versions (module, version) VALUES ('%s', %d)"
                 " ON CONFLICT(module) DO UPDATE SET version = excluded.version; COMMIT;",
                 steps[version], module, version + 1) < 0) {
      set_err(err, errlen, "out of memory");
      goto out;
    }
    int r = db_exec(db, sql, msg, sizeof msg);
    free(sql);
    if (r < 0) {
      db_exec(db, "ROLLBACK", NULL, 0);
      set_err(err, errlen, "%s: cannot bring the %s tables to version %d: %s", db->path, module,
              version + 1, msg);
      goto out;
    }
  }
  ret = 0;
out:
  db_unlock(db);
  return ret;
}
