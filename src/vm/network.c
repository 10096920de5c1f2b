/* network: the networks table (see network.h). */
#include "vm/network.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common/db.h"
#include "common/util.h"

static const char *const schema[] = {
  "CREATE TABLE networks ("
  " name TEXT PRIMARY KEY NOT NULL,"
  " type TEXT NOT NULL,"
  " bridge TEXT,"
  " created_at TEXT NOT NULL)",
};

static int bad(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int bad(char *err, size_t errlen, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
  return -EINVAL;
}

int net_table_open(struct db *db, char *err, size_t errlen)
{
  return db_migrate(db, "network", schema, (int)ARRAY_SIZE(schema), err, errlen);
}

int net_check(const char *name, const char *type, const char *bridge, char *err, size_t errlen)
{
  if (!name_is_valid(name))
    return bad(err, errlen, "invalid network name '%.80s': 1-64 characters of A-Z a-z 0-9 . _ -, "
               "not starting with '.' or '-'", name ? name : "");
  if (!type || (strcmp(type, "user") != 0 && strcmp(type, "bridge") != 0))
    return bad(err, errlen, "unknown network type '%.40s' (user, bridge)", type ? type : "");
  bool br = strcmp(type, "bridge") == 0;
  if (!br) {
    if (bridge && bridge[0])
      return bad(err, errlen, "a 'user' network has no bridge");
    return 0;
  }
  if (!bridge || !bridge[0])
    return bad(err, errlen, "a 'bridge' network needs its bridge (an existing Linux bridge "
               "such as br0)");
  /* A Linux interface name: at most 15 bytes; no commas, as it goes into
   * QEMU's -netdev option. */
  size_t n = strlen(bridge);
  bool ok = n <= 15 && bridge[0] != '-' && bridge[0] != '.';
  for (size_t i = 0; ok && i < n; i++)
    ok = isalnum((unsigned char)bridge[i]) || strchr("._-", bridge[i]);
  if (!ok)
    return bad(err, errlen, "bad bridge name '%.40s': 1-15 characters of A-Z a-z 0-9 . _ -",
               bridge);
  return 0;
}

int net_insert(struct db *db, const char *name, const char *type, const char *bridge, char *err,
               size_t errlen)
{
  sqlite3_stmt *st = db_prepare(db,
      "INSERT INTO networks (name, type, bridge, created_at)"
      " VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))", err, errlen);
  if (!st)
    return -EIO;
  sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, type, -1, SQLITE_STATIC);
  if (bridge && bridge[0])
    sqlite3_bind_text(st, 3, bridge, -1, SQLITE_STATIC);
  else
    sqlite3_bind_null(st, 3);
  int r = db_step_done(db, st, "insert the network", err, errlen);
  sqlite3_finalize(st);
  if (r == -EEXIST)
    snprintf(err, errlen, "network '%s' already exists", name);
  return r;
}

int net_delete(struct db *db, const char *name, char *err, size_t errlen)
{
  sqlite3_stmt *st = db_prepare(db, "DELETE FROM networks WHERE name = ?1", err, errlen);
  if (!st)
    return -EIO;
  sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  int r = db_step_done(db, st, "delete the network", err, errlen);
  sqlite3_finalize(st);
  if (r == 0 && sqlite3_changes(db->h) == 0) {
    snprintf(err, errlen, "network '%.80s' does not exist", name);
    r = -ENOENT;
  }
  return r;
}

static void row_netdev(sqlite3_stmt *st, struct vm_netdev *out)
{
  const char *v;
  memset(out, 0, sizeof *out);
  if ((v = (const char *)sqlite3_column_text(st, 0)))
    snprintf(out->name, sizeof out->name, "%s", v);
  if ((v = (const char *)sqlite3_column_text(st, 1)))
    snprintf(out->type, sizeof out->type, "%s", v);
  if ((v = (const char *)sqlite3_column_text(st, 2)))
    snprintf(out->bridge, sizeof out->bridge, "%s", v);
}

int net_get(struct db *db, const char *name, struct vm_netdev *out)
{
  sqlite3_stmt *st = db_prepare(db, "SELECT name, type, bridge FROM networks WHERE name = ?1",
                                NULL, 0);
  if (!st)
    return -EIO;
  sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  int r = -ENOENT;
  if (sqlite3_step(st) == SQLITE_ROW) {
    row_netdev(st, out);
    r = 0;
  }
  sqlite3_finalize(st);
  return r;
}

json_t *net_list(struct db *db)
{
  json_t *arr = json_array();
  sqlite3_stmt *st = db_prepare(db, "SELECT name, type, bridge, created_at FROM networks"
                                " ORDER BY name", NULL, 0);
  while (st && sqlite3_step(st) == SQLITE_ROW) {
    struct vm_netdev n;
    row_netdev(st, &n);
    const char *created = (const char *)sqlite3_column_text(st, 3);
    json_t *j = json_pack("{s:s, s:s, s:s}", "name", n.name, "type", n.type, "created_at",
                          created ? created : "");
    json_object_set_new(j, "bridge", n.bridge[0] ? json_string(n.bridge) : json_null());
    json_array_append_new(arr, j);
  }
  sqlite3_finalize(st);
  return arr;
}
