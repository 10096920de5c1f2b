/* db: SQLite connections for ferryd's modules that keep state beside the
 * disk registry in DATA_DIR/ferry.db (sites and peers, VMs, migrations).
 *
 * Each module opens its own connection (WAL mode lets them work side by
 * side; synchronous=FULL makes a committed change durable when the call
 * returns) and keeps its own tables, versioned per module in the table
 * schema_versions(module TEXT PRIMARY KEY, version INTEGER), so no module
 * needs to know another's schema.  The disk registry predates this and keeps
 * PRAGMA user_version for its own table (registry.c).
 *
 * A struct db is a connection plus a mutex: SQLite's serialized mode makes
 * single statements safe from any thread, but a transaction must not
 * interleave with another thread's statements on the same connection, so
 * every multi-statement change runs under db_lock(). */
#ifndef FERRY_DB_H
#define FERRY_DB_H

#include <pthread.h>
#include <sqlite3.h>
#include <stddef.h>

struct db {
  sqlite3 *h;
  pthread_mutex_t lock;    /* held across transactions (db_lock/db_unlock) */
  char *path;
};

/* Opens DATA_DIR/ferry.db (creating it if absent) with WAL, synchronous=FULL
 * and a busy timeout.  Returns NULL with err. */
struct db *db_open(const char *data_dir, char *err, size_t errlen);
void db_close(struct db *db);

void db_lock(struct db *db);
void db_unlock(struct db *db);

/* Runs one or more statements without results; 0 or -1 with err. */
int db_exec(struct db *db, const char *sql, char *err, size_t errlen);

/* Brings module's tables to version nsteps: steps[i] is the SQL that takes
 * version i to i+1, each applied in its own transaction.  A version above
 * nsteps (a newer ferry wrote it) is refused.  0 or -1 with err. */
int db_migrate(struct db *db, const char *module, const char *const *steps, int nsteps,
               char *err, size_t errlen);

/* Prepares a statement or fills err ("ferry.db: ..."). */
sqlite3_stmt *db_prepare(struct db *db, const char *sql, char *err, size_t errlen);
/* Steps a statement that returns no rows: 0, or -EEXIST on a constraint,
 * -EIO otherwise (err filled with what). */
int db_step_done(struct db *db, sqlite3_stmt *st, const char *what, char *err, size_t errlen);

#endif
