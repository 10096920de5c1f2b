/* site: identity and paired peers (see site.h). */
#include "site/site.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/db.h"
#include "common/log.h"
#include "common/util.h"

struct site {
  struct db *db;
  char *dir;                          /* DATA_DIR/site */
  pthread_mutex_t lock;               /* guards id, link_addr */
  struct link_identity *id;           /* NULL before site_init */
  char link_addr[256];
};

static const char *const schema[] = {
  "CREATE TABLE peers ("
  " name TEXT PRIMARY KEY NOT NULL,"
  " api_url TEXT NOT NULL,"
  " link TEXT NOT NULL,"
  " fingerprint TEXT NOT NULL UNIQUE,"
  " paired_at TEXT NOT NULL)",
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

static bool identity_files_exist(const char *dir)
{
  char key[4096], crt[4096];
  snprintf(key, sizeof key, "%s/site.key", dir);
  snprintf(crt, sizeof crt, "%s/site.crt", dir);
  return access(key, F_OK) == 0 || access(crt, F_OK) == 0;
}

struct site *site_open(const char *data_dir, struct db *db, char *err, size_t errlen)
{
  struct site *s = calloc(1, sizeof *s);
  if (!s || asprintf(&s->dir, "%s/site", data_dir) < 0) {
    free(s);
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  s->db = db;
  pthread_mutex_init(&s->lock, NULL);
  if (db_migrate(db, "site", schema, (int)ARRAY_SIZE(schema), err, errlen) < 0) {
    site_close(s);
    return NULL;
  }
  if (identity_files_exist(s->dir)) {
    char lerr[512];
    s->id = link_identity_load(s->dir, lerr, sizeof lerr);
    if (!s->id) {
      /* Never replaced silently: peers have pinned this certificate. */
      set_err(err, errlen, "site identity in %s cannot be loaded: %s", s->dir, lerr);
      site_close(s);
      return NULL;
    }
    log_info(NULL, "site '%s', certificate %s", link_identity_name(s->id),
             link_identity_fingerprint(s->id));
  } else {
    log_info(NULL, "no site identity yet: the site link is off until `ferry site init`");
  }
  return s;
}

void site_close(struct site *s)
{
  if (!s)
    return;
  link_identity_free(s->id);
  pthread_mutex_destroy(&s->lock);
  free(s->dir);
  free(s);
}

int site_init(struct site *s, const char *name, bool *created, char *err, size_t errlen)
{
  char host[65] = "";
  if (name && !name_is_valid(name)) {
    set_err(err, errlen, "invalid site name '%.80s': 1-64 characters of A-Z a-z 0-9 . _ -, "
            "not starting with '.' or '-'", name);
    return -EINVAL;
  }
  pthread_mutex_lock(&s->lock);
  int ret = 0;
  *created = false;
  if (s->id) {
    if (name && strcmp(name, link_identity_name(s->id)) != 0) {
      set_err(err, errlen, "this site is already initialised as '%s'; its name is in the "
              "certificate its peers have pinned and cannot change", link_identity_name(s->id));
      ret = -EEXIST;
    }
    goto out;
  }
  if (!name) {
    if (gethostname(host, sizeof host - 1) < 0 || !name_is_valid(host))
      snprintf(host, sizeof host, "site");
    name = host;
  }
  char lerr[512];
  bool made = false;
  if (link_identity_init(s->dir, name, &made, lerr, sizeof lerr) < 0) {
    set_err(err, errlen, "cannot create the site identity in %s: %s", s->dir, lerr);
    ret = -EIO;
    goto out;
  }
  s->id = link_identity_load(s->dir, lerr, sizeof lerr);
  if (!s->id) {
    set_err(err, errlen, "site identity in %s cannot be loaded: %s", s->dir, lerr);
    ret = -EIO;
    goto out;
  }
  *created = made;
  log_info(NULL, "site identity %s: '%s', certificate %s", made ? "created" : "loaded",
           link_identity_name(s->id), link_identity_fingerprint(s->id));
out:
  pthread_mutex_unlock(&s->lock);
  return ret;
}

bool site_has_identity(struct site *s)
{
  pthread_mutex_lock(&s->lock);
  bool r = s->id != NULL;
  pthread_mutex_unlock(&s->lock);
  return r;
}

struct link_identity *site_identity(struct site *s)
{
  pthread_mutex_lock(&s->lock);
  struct link_identity *id = s->id;   /* never freed before site_close */
  pthread_mutex_unlock(&s->lock);
  return id;
}

void site_name(struct site *s, char *buf, size_t len)
{
  pthread_mutex_lock(&s->lock);
  snprintf(buf, len, "%s", s->id ? link_identity_name(s->id) : "");
  pthread_mutex_unlock(&s->lock);
}

void site_set_link_address(struct site *s, const char *addr)
{
  pthread_mutex_lock(&s->lock);
  snprintf(s->link_addr, sizeof s->link_addr, "%s", addr ? addr : "");
  pthread_mutex_unlock(&s->lock);
}

void site_link_address(struct site *s, char *buf, size_t len)
{
  pthread_mutex_lock(&s->lock);
  snprintf(buf, len, "%s", s->link_addr);
  pthread_mutex_unlock(&s->lock);
}

/* ---- peers ---- */

static bool url_is_valid(const char *u)
{
  size_t n = strlen(u);
  return n > 7 && n < 256 && (strncmp(u, "http://", 7) == 0 || strncmp(u, "https://", 8) == 0) &&
         !strpbrk(u, " \t\r\n\"'\\");
}

/* Compares API URLs, ignoring one trailing '/'. */
static bool same_url(const char *a, const char *b)
{
  size_t la = strlen(a), lb = strlen(b);
  if (la && a[la - 1] == '/')
    la--;
  if (lb && b[lb - 1] == '/')
    lb--;
  return la == lb && strncmp(a, b, la) == 0;
}

int site_peer_add(struct site *s, const struct site_peer *p, char *err, size_t errlen)
{
  char host[256];
  uint16_t port;
  if (!name_is_valid(p->name)) {
    set_err(err, errlen, "invalid peer name '%.80s'", p->name);
    return -EINVAL;
  }
  if (!url_is_valid(p->api_url)) {
    set_err(err, errlen, "invalid peer API URL '%.200s': expected http://HOST:PORT", p->api_url);
    return -EINVAL;
  }
  if (parse_host_port(p->link, host, sizeof host, &port) < 0 || port == 0) {
    set_err(err, errlen, "invalid peer link address '%.200s': expected HOST:PORT", p->link);
    return -EINVAL;
  }
  if (!link_fingerprint_is_valid(p->fingerprint)) {
    set_err(err, errlen, "invalid fingerprint '%.100s': expected sha256:<64 hex digits>",
            p->fingerprint);
    return -EINVAL;
  }
  pthread_mutex_lock(&s->lock);
  bool self = s->id && strcmp(p->fingerprint, link_identity_fingerprint(s->id)) == 0;
  pthread_mutex_unlock(&s->lock);
  if (self) {
    set_err(err, errlen, "that fingerprint is this site's own: a site is not its own peer");
    return -EINVAL;
  }
  db_lock(s->db);
  int ret = -EIO;
  sqlite3_stmt *st = db_prepare(s->db, "SELECT name FROM peers WHERE fingerprint = ?1", err,
                                errlen);
  if (!st)
    goto out;
  sqlite3_bind_text(st, 1, p->fingerprint, -1, SQLITE_STATIC);
  if (sqlite3_step(st) == SQLITE_ROW) {
    const char *other = (const char *)sqlite3_column_text(st, 0);
    if (other && strcmp(other, p->name) != 0) {
      set_err(err, errlen, "certificate %s is already paired as peer '%s'", p->fingerprint,
              other);
      sqlite3_finalize(st);
      ret = -EEXIST;
      goto out;
    }
  }
  sqlite3_finalize(st);
  st = db_prepare(s->db,
                  "INSERT INTO peers (name, api_url, link, fingerprint, paired_at)"
                  " VALUES (?1, ?2, ?3, ?4, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))"
                  " ON CONFLICT(name) DO UPDATE SET api_url = excluded.api_url,"
                  " link = excluded.link, fingerprint = excluded.fingerprint,"
                  " paired_at = excluded.paired_at", err, errlen);
  if (!st)
    goto out;
  sqlite3_bind_text(st, 1, p->name, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, p->api_url, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 3, p->link, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 4, p->fingerprint, -1, SQLITE_STATIC);
  ret = db_step_done(s->db, st, "store the peer", err, errlen);
  sqlite3_finalize(st);
  if (ret == 0)
    log_info(NULL, "paired with site '%s' (%s, link %s, certificate %s)", p->name, p->api_url,
             p->link, p->fingerprint);
out:
  db_unlock(s->db);
  return ret;
}

int site_peer_remove(struct site *s, const char *name, char *err, size_t errlen)
{
  db_lock(s->db);
  int ret = -EIO;
  sqlite3_stmt *st = db_prepare(s->db, "DELETE FROM peers WHERE name = ?1", err, errlen);
  if (st) {
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    ret = db_step_done(s->db, st, "remove the peer", err, errlen);
    sqlite3_finalize(st);
    if (ret == 0 && sqlite3_changes(s->db->h) == 0) {
      set_err(err, errlen, "no peer named '%s'", name);
      ret = -ENOENT;
    } else if (ret == 0) {
      log_info(NULL, "unpaired site '%s'", name);
    }
  }
  db_unlock(s->db);
  return ret;
}

static void row_to_peer(sqlite3_stmt *st, struct site_peer *p)
{
  memset(p, 0, sizeof *p);
  const char *v;
  if ((v = (const char *)sqlite3_column_text(st, 0)))
    snprintf(p->name, sizeof p->name, "%s", v);
  if ((v = (const char *)sqlite3_column_text(st, 1)))
    snprintf(p->api_url, sizeof p->api_url, "%s", v);
  if ((v = (const char *)sqlite3_column_text(st, 2)))
    snprintf(p->link, sizeof p->link, "%s", v);
  if ((v = (const char *)sqlite3_column_text(st, 3)))
    snprintf(p->fingerprint, sizeof p->fingerprint, "%s", v);
  if ((v = (const char *)sqlite3_column_text(st, 4)))
    snprintf(p->paired_at, sizeof p->paired_at, "%s", v);
}

#define PEER_COLUMNS "name, api_url, link, fingerprint, paired_at"

int site_peer_find(struct site *s, const char *name_or_url, struct site_peer *out, char *err,
                   size_t errlen)
{
  db_lock(s->db);
  int ret = -ENOENT;
  sqlite3_stmt *st = db_prepare(s->db, "SELECT " PEER_COLUMNS " FROM peers", err, errlen);
  if (!st) {
    ret = -EIO;
    goto out;
  }
  while (sqlite3_step(st) == SQLITE_ROW) {
    struct site_peer p;
    row_to_peer(st, &p);
    if (strcmp(p.name, name_or_url) == 0 || same_url(p.api_url, name_or_url)) {
      *out = p;
      ret = 0;
      break;
    }
  }
  sqlite3_finalize(st);
  if (ret == -ENOENT)
    set_err(err, errlen, "'%.200s' is not a paired site (pair it first: ferry site pair URL)",
            name_or_url);
out:
  db_unlock(s->db);
  return ret;
}

json_t *site_peer_json(const struct site_peer *p)
{
  return json_pack("{s:s, s:s, s:s, s:s, s:s}", "name", p->name, "api_url", p->api_url,
                   "link", p->link, "fingerprint", p->fingerprint, "paired_at", p->paired_at);
}

json_t *site_peers_json(struct site *s)
{
  json_t *arr = json_array();
  db_lock(s->db);
  sqlite3_stmt *st = db_prepare(s->db, "SELECT " PEER_COLUMNS " FROM peers ORDER BY name",
                                NULL, 0);
  while (st && sqlite3_step(st) == SQLITE_ROW) {
    struct site_peer p;
    row_to_peer(st, &p);
    json_array_append_new(arr, site_peer_json(&p));
  }
  sqlite3_finalize(st);
  db_unlock(s->db);
  return json_pack("{s:o}", "peers", arr);
}

bool site_trust(void *opaque, const char *fingerprint, char *name, size_t namelen)
{
  struct site *s = opaque;
  bool ok = false;
  db_lock(s->db);
  sqlite3_stmt *st = db_prepare(s->db, "SELECT name FROM peers WHERE fingerprint = ?1", NULL, 0);
  if (st) {
    sqlite3_bind_text(st, 1, fingerprint, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) {
      const char *n = (const char *)sqlite3_column_text(st, 0);
      if (name && namelen)
        snprintf(name, namelen, "%s", n ? n : "");
      ok = true;
    }
    sqlite3_finalize(st);
  }
  db_unlock(s->db);
  return ok;
}
