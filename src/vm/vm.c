/* vm: the VM manager (see vm.h): the VM table, claims by migrations, and a
 * watcher that notices VM processes that end.
 *
 * DESIGN
 * The table in ferry.db is the truth for what VMs exist and what state they
 * should be in; the in-memory list mirrors it.  A state change is written to
 * the table after the driver did it (a crash in between leaves the old state
 * recorded, and the watcher or the next adoption corrects it from what the
 * process says).  Driver calls run outside the manager's lock, with the VM
 * marked busy so two slow calls on one VM never overlap.
 *
 * Adoption at start: a VM recorded running or paused whose pid is still its
 * driver's live process is taken as it is; otherwise it is recorded stopped
 * (and a WARN says so: a VM that died while ferryd was away).
 */
#include "vm/vm.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/db.h"
#include "common/log.h"
#include "common/util.h"
#include "disk/disk.h"
#include "disk/registry.h"
#include "ferryd/nbd_glue.h"
#include "vm/driver.h"

#define WATCH_INTERVAL_MS 500

struct vm_entry {
  struct vm_spec spec;
  char state[16];                  /* stopped | running | paused | migrated */
  char moved_to[65];               /* site, when migrated */
  pid_t pid;                       /* 0: no process */
  bool child;                      /* started by this ferryd: reap with waitpid */
  char claim[48];                  /* migration id holding the VM, "" when none */
  bool busy;                       /* a driver call is running on it */
};

struct vm_manager {
  pthread_mutex_t lock;            /* guards vms, nvms and every entry */
  pthread_cond_t idle;             /* an entry stopped being busy */
  struct db *db;
  struct registry *reg;
  struct nbd_listener *nbd;
  char *data_dir;
  char *simvm;
  struct vm_entry *vms;
  size_t nvms, cap;

  pthread_t watcher;
  bool watcher_started, stopping;
  pthread_cond_t wake;
};

static const char *const schema[] = {
  "CREATE TABLE vms ("
  " name TEXT PRIMARY KEY NOT NULL,"
  " driver TEXT NOT NULL,"
  " disks TEXT NOT NULL,"
  " workload TEXT NOT NULL DEFAULT '',"
  " state TEXT NOT NULL,"
  " pid INTEGER NOT NULL DEFAULT 0,"
  " moved_to TEXT,"
  " created_at TEXT NOT NULL,"
  " updated_at TEXT NOT NULL)",
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

static const struct vm_driver_ops *driver_for(const char *name)
{
  if (strcmp(name, "sim") == 0)
    return &vm_driver_sim;
  return NULL;
}

/* ---- runtime facts for the driver ---- */

struct runtime_buf {
  struct vm_runtime rt;
  struct vm_spec spec;
  char dir[PATH_MAX], state[PATH_MAX], control[PATH_MAX], log[PATH_MAX];
  char uris[VM_MAX_DISKS][512];
  const char *uri_ptrs[VM_MAX_DISKS];
};

static void runtime_fill(struct vm_manager *m, const struct vm_entry *e, struct runtime_buf *b)
{
  b->spec = e->spec;
  snprintf(b->dir, sizeof b->dir, "%s/vms/%s", m->data_dir, e->spec.name);
  fmt_into(b->state, sizeof b->state, "%s/state.%s", b->dir, e->spec.driver);
  fmt_into(b->control, sizeof b->control, "%s/run/%s.ctl", m->data_dir, e->spec.name);
  fmt_into(b->log, sizeof b->log, "%s/console.log", b->dir);
  for (unsigned i = 0; i < e->spec.ndisks; i++) {
    nbd_listener_uri(m->nbd, e->spec.disks[i], b->uris[i], sizeof b->uris[i]);
    b->uri_ptrs[i] = b->uris[i];
  }
  b->rt = (struct vm_runtime){
    .spec = &b->spec, .dir = b->dir, .state_path = b->state, .control_path = b->control,
    .log_path = b->log, .disk_uris = b->uri_ptrs, .program = m->simvm, .pid = e->pid,
  };
}

/* ---- table ---- */

static struct vm_entry *find(struct vm_manager *m, const char *name)
{
  for (size_t i = 0; i < m->nvms; i++)
    if (strcmp(m->vms[i].spec.name, name) == 0)
      return &m->vms[i];
  return NULL;
}

static json_t *disks_array(const struct vm_spec *s)
{
  json_t *a = json_array();
  for (unsigned i = 0; i < s->ndisks; i++)
    json_array_append_new(a, json_string(s->disks[i]));
  return a;
}

/* __fn: m->lock held.  Writes the entry's state, pid and moved_to. */
static int db_store_state(struct vm_manager *m, const struct vm_entry *e, char *err,
                          size_t errlen)
{
  sqlite3_stmt *st = db_prepare(m->db,
      "UPDATE vms SET state = ?1, pid = ?2, moved_to = ?3, workload = ?4,"
      " updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE name = ?5", err, errlen);
  if (!st)
    return -EIO;
  sqlite3_bind_text(st, 1, e->state, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 2, e->pid);
  if (e->moved_to[0])
    sqlite3_bind_text(st, 3, e->moved_to, -1, SQLITE_STATIC);
  else
    sqlite3_bind_null(st, 3);
  sqlite3_bind_text(st, 4, e->spec.workload, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 5, e->spec.name, -1, SQLITE_STATIC);
  int r = db_step_done(m->db, st, "store the VM state", err, errlen);
  sqlite3_finalize(st);
  return r;
}

static void set_state(struct vm_manager *m, struct vm_entry *e, const char *state, pid_t pid)
{
  snprintf(e->state, sizeof e->state, "%s", state);
  e->pid = pid;
  if (!pid)
    e->child = false;
  char err[256];
  if (db_store_state(m, e, err, sizeof err) < 0)
    log_error(NULL, "VM '%s': %s", e->spec.name, err);
}

static int db_insert(struct vm_manager *m, const struct vm_spec *s, const char *state,
                     char *err, size_t errlen)
{
  json_t *d = disks_array(s);
  char *disks = json_dumps(d, JSON_COMPACT);
  json_decref(d);
  sqlite3_stmt *st = db_prepare(m->db,
      "INSERT INTO vms (name, driver, disks, workload, state, pid, created_at, updated_at)"
      " VALUES (?1, ?2, ?3, ?4, ?5, 0, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'),"
      " strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))", err, errlen);
  int r = -EIO;
  if (st && disks) {
    sqlite3_bind_text(st, 1, s->name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, s->driver, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, disks, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, s->workload, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, state, -1, SQLITE_STATIC);
    r = db_step_done(m->db, st, "insert the VM", err, errlen);
    if (r == -EEXIST)
      set_err(err, errlen, "VM '%s' already exists", s->name);
  }
  sqlite3_finalize(st);
  free(disks);
  return r;
}

static int cmp_entry(const void *a, const void *b)
{
  return strcmp(((const struct vm_entry *)a)->spec.name, ((const struct vm_entry *)b)->spec.name);
}

static int add_entry(struct vm_manager *m, const struct vm_entry *e)
{
  if (m->nvms == m->cap) {
    size_t cap = m->cap ? m->cap * 2 : 8;
    struct vm_entry *v = realloc(m->vms, cap * sizeof *v);
    if (!v)
      return -ENOMEM;
    m->vms = v;
    m->cap = cap;
  }
  m->vms[m->nvms++] = *e;
  qsort(m->vms, m->nvms, sizeof *m->vms, cmp_entry);   /* listed by name */
  return 0;
}

static int load(struct vm_manager *m, char *err, size_t errlen)
{
  sqlite3_stmt *st = db_prepare(m->db,
      "SELECT name, driver, disks, workload, state, pid, moved_to FROM vms ORDER BY name",
      err, errlen);
  if (!st)
    return -1;
  while (sqlite3_step(st) == SQLITE_ROW) {
    struct vm_entry e = { 0 };
    const char *v;
    if ((v = (const char *)sqlite3_column_text(st, 0)))
      snprintf(e.spec.name, sizeof e.spec.name, "%s", v);
    if ((v = (const char *)sqlite3_column_text(st, 1)))
      snprintf(e.spec.driver, sizeof e.spec.driver, "%s", v);
    json_t *d = json_loads((const char *)sqlite3_column_text(st, 2), 0, NULL);
    size_t i;
    json_t *x;
    json_array_foreach(d, i, x) {
      if (e.spec.ndisks < VM_MAX_DISKS && json_is_string(x))
        snprintf(e.spec.disks[e.spec.ndisks++], sizeof e.spec.disks[0], "%s",
                 json_string_value(x));
    }
    json_decref(d);
    if ((v = (const char *)sqlite3_column_text(st, 3)))
      snprintf(e.spec.workload, sizeof e.spec.workload, "%s", v);
    if ((v = (const char *)sqlite3_column_text(st, 4)))
      snprintf(e.state, sizeof e.state, "%s", v);
    e.pid = (pid_t)sqlite3_column_int64(st, 5);
    if ((v = (const char *)sqlite3_column_text(st, 6)))
      snprintf(e.moved_to, sizeof e.moved_to, "%s", v);
    if (!name_is_valid(e.spec.name) || !driver_for(e.spec.driver)) {
      log_error(NULL, "vm: skipping a row with a bad name or driver ('%s')", e.spec.name);
      continue;
    }
    if (add_entry(m, &e) < 0) {
      sqlite3_finalize(st);
      set_err(err, errlen, "out of memory");
      return -1;
    }
  }
  sqlite3_finalize(st);
  return 0;
}

/* Adoption: is every VM recorded with a process still running it? */
static void adopt_all(struct vm_manager *m)
{
  for (size_t i = 0; i < m->nvms; i++) {
    struct vm_entry *e = &m->vms[i];
    if (strcmp(e->state, "running") != 0 && strcmp(e->state, "paused") != 0)
      continue;
    struct runtime_buf b;
    runtime_fill(m, e, &b);
    const struct vm_driver_ops *ops = driver_for(e->spec.driver);
    if (e->pid && ops->alive(&b.rt, e->pid)) {
      json_t *st = NULL;
      char err[256];
      if (ops->status(&b.rt, &st, err, sizeof err) == 0) {
        const char *s = json_string_value(json_object_get(st, "state"));
        if (s && (strcmp(s, "running") == 0 || strcmp(s, "paused") == 0))
          set_state(m, e, s, e->pid);
        log_info(NULL, "VM '%s' adopted (pid %d, %s)", e->spec.name, (int)e->pid, e->state);
        json_decref(st);
        continue;
      }
      log_warn(NULL, "VM '%s' (pid %d) does not answer: %s", e->spec.name, (int)e->pid, err);
      continue;       /* alive but mute: keep the pid, the watcher will tell */
    }
    log_warn(NULL, "VM '%s' was %s but its process is gone: recorded stopped", e->spec.name,
             e->state);
    set_state(m, e, "stopped", 0);
  }
}

static void *watcher_main(void *arg)
{
  struct vm_manager *m = arg;
  pthread_mutex_lock(&m->lock);
  while (!m->stopping) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_nsec += WATCH_INTERVAL_MS * 1000000L;
    ts.tv_sec += ts.tv_nsec / 1000000000L;
    ts.tv_nsec %= 1000000000L;
    pthread_cond_timedwait(&m->wake, &m->lock, &ts);
    for (size_t i = 0; i < m->nvms && !m->stopping; i++) {
      struct vm_entry *e = &m->vms[i];
      if (!e->pid || e->busy)
        continue;
      int status = 0;
      bool gone = false;
      if (e->child) {
        pid_t w = waitpid(e->pid, &status, WNOHANG);
        gone = w == e->pid || (w < 0 && errno == ECHILD);
      } else {
        gone = kill(e->pid, 0) < 0 && errno == ESRCH;
      }
      if (!gone)
        continue;
      if (e->child && WIFSIGNALED(status))
        log_warn(NULL, "VM '%s' (pid %d) was killed by signal %d", e->spec.name, (int)e->pid,
                 WTERMSIG(status));
      else if (e->child && WIFEXITED(status) && WEXITSTATUS(status) != 0)
        log_warn(NULL, "VM '%s' (pid %d) exited with status %d", e->spec.name, (int)e->pid,
                 WEXITSTATUS(status));
      else
        log_info(NULL, "VM '%s' (pid %d) exited", e->spec.name, (int)e->pid);
      if (strcmp(e->state, "migrated") == 0)
        e->pid = 0;
      else
        set_state(m, e, "stopped", 0);
    }
  }
  pthread_mutex_unlock(&m->lock);
  return NULL;
}

struct vm_manager *vm_manager_open(const char *data_dir, struct db *db, struct registry *reg,
                                   struct nbd_listener *nbd, const struct vm_manager_options *o,
                                   char *err, size_t errlen)
{
  struct vm_manager *m = calloc(1, sizeof *m);
  if (!m) {
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  pthread_mutex_init(&m->lock, NULL);
  pthread_cond_init(&m->idle, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&m->wake, &ca);
  pthread_condattr_destroy(&ca);
  m->db = db;
  m->reg = reg;
  m->nbd = nbd;
  m->data_dir = strdup(data_dir);
  m->simvm = strdup(o->simvm_path ? o->simvm_path : "ferry-simvm");
  char path[PATH_MAX];
  snprintf(path, sizeof path, "%s/vms", data_dir);
  mkdir(path, 0750);
  snprintf(path, sizeof path, "%s/run", data_dir);
  mkdir(path, 0750);
  if (db_migrate(db, "vm", schema, (int)ARRAY_SIZE(schema), err, errlen) < 0 ||
      load(m, err, errlen) < 0) {
    vm_manager_close(m);
    return NULL;
  }
  adopt_all(m);
  if (pthread_create(&m->watcher, NULL, watcher_main, m) != 0) {
    set_err(err, errlen, "cannot start the VM watcher thread");
    vm_manager_close(m);
    return NULL;
  }
  m->watcher_started = true;
  log_info(NULL, "vm: %zu VM(s); sim program %s", m->nvms, m->simvm);
  return m;
}

void vm_manager_close(struct vm_manager *m)
{
  if (!m)
    return;
  if (m->watcher_started) {
    pthread_mutex_lock(&m->lock);
    m->stopping = true;
    pthread_cond_broadcast(&m->wake);
    pthread_mutex_unlock(&m->lock);
    pthread_join(m->watcher, NULL);
  }
  free(m->vms);
  free(m->data_dir);
  free(m->simvm);
  pthread_cond_destroy(&m->wake);
  pthread_cond_destroy(&m->idle);
  pthread_mutex_destroy(&m->lock);
  free(m);
}

/* ---- checks ---- */

static int check_spec(struct vm_manager *m, const struct vm_spec *s, char *err, size_t errlen)
{
  if (!name_is_valid(s->name)) {
    set_err(err, errlen, "invalid VM name '%.80s': 1-64 characters of A-Z a-z 0-9 . _ -, "
            "not starting with '.' or '-'", s->name);
    return -EINVAL;
  }
  const struct vm_driver_ops *ops = driver_for(s->driver);
  if (!ops) {
    set_err(err, errlen, "unknown driver '%.40s' (sim)", s->driver);
    return -EINVAL;
  }
  if (s->ndisks == 0) {
    set_err(err, errlen, "a VM needs at least one disk");
    return -EINVAL;
  }
  for (unsigned i = 0; i < s->ndisks; i++) {
    for (unsigned j = 0; j < i; j++)
      if (strcmp(s->disks[i], s->disks[j]) == 0) {
        set_err(err, errlen, "disk '%s' is given twice", s->disks[i]);
        return -EINVAL;
      }
    struct disk *d = registry_get(m->reg, s->disks[i]);
    if (!d) {
      set_err(err, errlen, "disk '%s' does not exist", s->disks[i]);
      return -ENOENT;
    }
    disk_unref(d);
  }
  return ops->validate(s->workload, err, errlen);
}

/* __fn: m->lock held.  Entry for name, or NULL with -ENOENT in *r. */
static struct vm_entry *lookup(struct vm_manager *m, const char *name, int *r, char *err,
                               size_t errlen)
{
  struct vm_entry *e = name ? find(m, name) : NULL;
  if (!e) {
    set_err(err, errlen, "VM '%.80s' does not exist", name ? name : "");
    *r = -ENOENT;
  }
  return e;
}

/* __fn: m->lock held.  Waits until e is not busy, then marks it busy.
 * Entries can move (realloc) while we wait, so it is looked up again. */
static struct vm_entry *acquire(struct vm_manager *m, const char *name)
{
  struct vm_entry *e;
  while ((e = find(m, name)) && e->busy)
    pthread_cond_wait(&m->idle, &m->lock);
  if (e)
    e->busy = true;
  return e;
}

static void release_busy(struct vm_manager *m, const char *name)
{
  struct vm_entry *e = find(m, name);
  if (e)
    e->busy = false;
  pthread_cond_broadcast(&m->idle);
}

static int refuse_claimed(const struct vm_entry *e, char *err, size_t errlen)
{
  if (e->claim[0]) {
    set_err(err, errlen, "VM '%s' is being migrated (migration %s)", e->spec.name, e->claim);
    return -EBUSY;
  }
  if (strcmp(e->state, "migrated") == 0) {
    set_err(err, errlen, "VM '%s' was migrated to site '%s'; it no longer runs here",
            e->spec.name, e->moved_to);
    return -EBUSY;
  }
  return 0;
}

/* ---- public ---- */

int vm_create(struct vm_manager *m, const struct vm_spec *spec, char *err, size_t errlen)
{
  int r = check_spec(m, spec, err, errlen);
  if (r < 0)
    return r;
  pthread_mutex_lock(&m->lock);
  if (find(m, spec->name)) {
    set_err(err, errlen, "VM '%s' already exists", spec->name);
    r = -EEXIST;
    goto out;
  }
  /* A disk belongs to one VM. */
  for (size_t i = 0; i < m->nvms; i++)
    for (unsigned a = 0; a < m->vms[i].spec.ndisks; a++)
      for (unsigned b = 0; b < spec->ndisks; b++)
        if (strcmp(m->vms[i].spec.disks[a], spec->disks[b]) == 0 &&
            strcmp(m->vms[i].state, "migrated") != 0) {
          set_err(err, errlen, "disk '%s' already belongs to VM '%s'", spec->disks[b],
                  m->vms[i].spec.name);
          r = -EBUSY;
          goto out;
        }
  char dir[PATH_MAX];
  snprintf(dir, sizeof dir, "%s/vms/%s", m->data_dir, spec->name);
  if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
    set_err(err, errlen, "cannot create %s: %s", dir, strerror(errno));
    r = -EIO;
    goto out;
  }
  char ctl[PATH_MAX];
  snprintf(ctl, sizeof ctl, "%s/run/%s.ctl", m->data_dir, spec->name);
  if (strlen(ctl) >= 108) {
    set_err(err, errlen, "the control socket path %s is longer than 107 bytes: use a "
            "shorter --data-dir or VM name", ctl);
    r = -EINVAL;
    goto out;
  }
  if ((r = db_insert(m, spec, "stopped", err, errlen)) < 0)
    goto out;
  struct vm_entry e = { .spec = *spec };
  snprintf(e.state, sizeof e.state, "stopped");
  if (add_entry(m, &e) < 0) {
    set_err(err, errlen, "out of memory");
    r = -ENOMEM;
    goto out;
  }
  log_info(NULL, "VM '%s' created (driver %s, %u disk(s))", spec->name, spec->driver,
           spec->ndisks);
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}

int vm_remove(struct vm_manager *m, const char *name, bool force, char *err, size_t errlen)
{
  pthread_mutex_lock(&m->lock);
  int r = 0;
  struct vm_entry *e = lookup(m, name, &r, err, errlen);
  if (!e)
    goto out;
  if (e->claim[0]) {
    r = refuse_claimed(e, err, errlen);
    goto out;
  }
  if (e->pid && !force) {
    set_err(err, errlen, "VM '%s' is %s; stop it first (or --force)", name, e->state);
    r = -EBUSY;
    goto out;
  }
  e = acquire(m, name);
  struct runtime_buf b;
  runtime_fill(m, e, &b);
  pthread_mutex_unlock(&m->lock);
  if (b.rt.pid)
    driver_for(b.spec.driver)->stop(&b.rt, err, errlen);
  pthread_mutex_lock(&m->lock);
  sqlite3_stmt *st = db_prepare(m->db, "DELETE FROM vms WHERE name = ?1", err, errlen);
  if (st) {
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    r = db_step_done(m->db, st, "delete the VM", err, errlen);
    sqlite3_finalize(st);
  } else {
    r = -EIO;
  }
  if (r == 0) {
    unlink(b.state);
    unlink(b.control);
    unlink(b.log);
    rmdir(b.dir);
    e = find(m, name);
    size_t pos = (size_t)(e - m->vms);
    memmove(&m->vms[pos], &m->vms[pos + 1], (m->nvms - pos - 1) * sizeof *m->vms);
    m->nvms--;
    pthread_cond_broadcast(&m->idle);
    log_info(NULL, "VM '%s' removed", name);
  } else {
    release_busy(m, name);
  }
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}

/* The common shape of start/stop/pause/resume: checks under the lock, the
 * driver call outside it, the new state recorded after. */
enum op { OP_START, OP_STOP, OP_PAUSE, OP_RESUME };

static int do_op(struct vm_manager *m, const char *name, enum op op, bool by_migration,
                 char *err, size_t errlen)
{
  pthread_mutex_lock(&m->lock);
  int r = 0;
  struct vm_entry *e = lookup(m, name, &r, err, errlen);
  if (!e)
    goto out;
  if (!by_migration && (r = refuse_claimed(e, err, errlen)) < 0)
    goto out;
  e = acquire(m, name);
  bool running = strcmp(e->state, "running") == 0, paused = strcmp(e->state, "paused") == 0;
  const char *want = NULL;
  switch (op) {
  case OP_START:
    if (running || paused) {
      set_err(err, errlen, "VM '%s' is already %s", name, e->state);
      r = -EBUSY;
    }
    want = "running";
    break;
  case OP_STOP:
    if (!running && !paused) {
      set_err(err, errlen, "VM '%s' is not running", name);
      r = -EBUSY;
    }
    want = "stopped";
    break;
  case OP_PAUSE:
    if (!running && !paused) {
      set_err(err, errlen, "VM '%s' is not running", name);
      r = -EBUSY;
    }
    want = "paused";
    break;
  case OP_RESUME:
    if (!running && !paused) {
      set_err(err, errlen, "VM '%s' is not running", name);
      r = -EBUSY;
    }
    want = "running";
    break;
  }
  if (r < 0) {
    release_busy(m, name);
    goto out;
  }
  struct runtime_buf b;
  runtime_fill(m, e, &b);
  const struct vm_driver_ops *ops = driver_for(b.spec.driver);
  pthread_mutex_unlock(&m->lock);
  switch (op) {
  case OP_START: r = ops->start(&b.rt, false, err, errlen); break;
  case OP_STOP: r = ops->stop(&b.rt, err, errlen); break;
  case OP_PAUSE: r = ops->pause(&b.rt, err, errlen); break;
  case OP_RESUME: r = ops->resume(&b.rt, err, errlen); break;
  }
  pthread_mutex_lock(&m->lock);
  e = find(m, name);
  if (e && r == 0) {
    pid_t pid = op == OP_STOP ? 0 : b.rt.pid;
    if (op == OP_START)
      e->child = true;
    set_state(m, e, want, pid);
    log_info(NULL, "VM '%s' %s%s", name, want, op == OP_START ? "" : "");
  }
  release_busy(m, name);
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}

int vm_start(struct vm_manager *m, const char *name, char *err, size_t errlen)
{
  return do_op(m, name, OP_START, false, err, errlen);
}
int vm_stop(struct vm_manager *m, const char *name, char *err, size_t errlen)
{
  return do_op(m, name, OP_STOP, false, err, errlen);
}
int vm_pause(struct vm_manager *m, const char *name, char *err, size_t errlen)
{
  return do_op(m, name, OP_PAUSE, false, err, errlen);
}
int vm_resume(struct vm_manager *m, const char *name, char *err, size_t errlen)
{
  return do_op(m, name, OP_RESUME, false, err, errlen);
}
int vm_migration_pause(struct vm_manager *m, const char *name, char *err, size_t errlen)
{
  return do_op(m, name, OP_PAUSE, true, err, errlen);
}
int vm_migration_resume(struct vm_manager *m, const char *name, char *err, size_t errlen)
{
  return do_op(m, name, OP_RESUME, true, err, errlen);
}

int vm_verify(struct vm_manager *m, const char *name, json_t **report, char *err, size_t errlen)
{
  pthread_mutex_lock(&m->lock);
  int r = 0;
  struct vm_entry *e = lookup(m, name, &r, err, errlen);
  if (!e || (r = refuse_claimed(e, err, errlen)) < 0)
    goto out;
  e = acquire(m, name);
  struct runtime_buf b;
  runtime_fill(m, e, &b);
  pthread_mutex_unlock(&m->lock);
  r = driver_for(b.spec.driver)->verify(&b.rt, report, err, errlen);
  pthread_mutex_lock(&m->lock);
  release_busy(m, name);
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}

int vm_set_workload(struct vm_manager *m, const char *name, const char *workload, char *err,
                    size_t errlen)
{
  pthread_mutex_lock(&m->lock);
  int r = 0;
  struct vm_entry *e = lookup(m, name, &r, err, errlen);
  if (!e)
    goto out;
  const struct vm_driver_ops *ops = driver_for(e->spec.driver);
  if ((r = ops->validate(workload, err, errlen)) < 0)
    goto out;
  if (strlen(workload) >= sizeof e->spec.workload) {
    set_err(err, errlen, "workload spec is too long");
    r = -EINVAL;
    goto out;
  }
  e = acquire(m, name);
  struct runtime_buf b;
  runtime_fill(m, e, &b);
  pthread_mutex_unlock(&m->lock);
  r = ops->set_workload(&b.rt, workload, err, errlen);
  pthread_mutex_lock(&m->lock);
  e = find(m, name);
  if (e && r == 0) {
    snprintf(e->spec.workload, sizeof e->spec.workload, "%s", workload);
    set_state(m, e, e->state, e->pid);
  }
  release_busy(m, name);
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}

static json_t *entry_json(struct vm_manager *m, const struct vm_entry *e, bool live)
{
  json_t *j = json_pack("{s:s, s:s, s:o, s:s, s:s, s:I}", "name", e->spec.name, "driver",
                        e->spec.driver, "disks", disks_array(&e->spec), "workload",
                        e->spec.workload, "state", e->state, "pid", (json_int_t)e->pid);
  json_object_set_new(j, "migration", e->claim[0] ? json_string(e->claim) : json_null());
  json_object_set_new(j, "moved_to", e->moved_to[0] ? json_string(e->moved_to) : json_null());
  if (live && e->pid && !e->busy) {
    struct runtime_buf b;
    runtime_fill(m, e, &b);
    json_t *st = NULL;
    char err[256];
    if (driver_for(e->spec.driver)->status(&b.rt, &st, err, sizeof err) == 0)
      json_object_set_new(j, "runtime", st);
    else
      json_object_set_new(j, "runtime_error", json_string(err));
  }
  return j;
}

json_t *vm_json(struct vm_manager *m, const char *name, char *err, size_t errlen)
{
  pthread_mutex_lock(&m->lock);
  int r;
  struct vm_entry *e = lookup(m, name, &r, err, errlen);
  struct vm_entry copy;
  if (e)
    copy = *e;
  pthread_mutex_unlock(&m->lock);
  /* The status request goes to the VM without the lock held. */
  return e ? entry_json(m, &copy, true) : NULL;
}

json_t *vm_list_json(struct vm_manager *m)
{
  json_t *arr = json_array();
  pthread_mutex_lock(&m->lock);
  for (size_t i = 0; i < m->nvms; i++)
    json_array_append_new(arr, entry_json(m, &m->vms[i], false));
  pthread_mutex_unlock(&m->lock);
  return json_pack("{s:o}", "vms", arr);
}

int vm_get_spec(struct vm_manager *m, const char *name, struct vm_spec *out, char *err,
                size_t errlen)
{
  pthread_mutex_lock(&m->lock);
  int r = 0;
  struct vm_entry *e = lookup(m, name, &r, err, errlen);
  if (e)
    *out = e->spec;
  pthread_mutex_unlock(&m->lock);
  return r;
}

int vm_state(struct vm_manager *m, const char *name, char *buf, size_t len)
{
  pthread_mutex_lock(&m->lock);
  struct vm_entry *e = find(m, name);
  snprintf(buf, len, "%s", e ? e->state : "");
  pthread_mutex_unlock(&m->lock);
  return e ? 0 : -ENOENT;
}

int vm_claim(struct vm_manager *m, const char *name, const char *migration_id, char *err,
             size_t errlen)
{
  pthread_mutex_lock(&m->lock);
  int r = 0;
  struct vm_entry *e = lookup(m, name, &r, err, errlen);
  if (!e)
    goto out;
  if (e->claim[0] && strcmp(e->claim, migration_id) == 0)
    goto out;                                   /* a resumed migration claims again */
  if ((r = refuse_claimed(e, err, errlen)) < 0)
    goto out;
  snprintf(e->claim, sizeof e->claim, "%s", migration_id);
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}

void vm_release(struct vm_manager *m, const char *name, const char *migration_id)
{
  pthread_mutex_lock(&m->lock);
  struct vm_entry *e = find(m, name);
  if (e && strcmp(e->claim, migration_id) == 0)
    e->claim[0] = '\0';
  pthread_mutex_unlock(&m->lock);
}

int vm_export_state(struct vm_manager *m, const char *name, void **buf, size_t *len, char *err,
                    size_t errlen)
{
  pthread_mutex_lock(&m->lock);
  int r = 0;
  struct vm_entry *e = lookup(m, name, &r, err, errlen);
  if (!e)
    goto out_unlock;
  e = acquire(m, name);
  struct runtime_buf b;
  runtime_fill(m, e, &b);
  pthread_mutex_unlock(&m->lock);
  const struct vm_driver_ops *ops = driver_for(b.spec.driver);
  if (b.rt.pid && (r = ops->save_state(&b.rt, err, errlen)) < 0)
    goto out;
  FILE *f = fopen(b.state, "rb");
  if (!f) {
    set_err(err, errlen, "cannot read the state of VM '%s' (%s): %s", name, b.state,
            strerror(errno));
    r = -EIO;
    goto out;
  }
  fseeko(f, 0, SEEK_END);
  off_t size = ftello(f);
  rewind(f);
  *buf = malloc(size > 0 ? (size_t)size : 1);
  if (!*buf || fread(*buf, 1, (size_t)size, f) != (size_t)size) {
    set_err(err, errlen, "cannot read the state of VM '%s': %s", name, strerror(errno));
    free(*buf);
    *buf = NULL;
    r = -EIO;
  } else {
    *len = (size_t)size;
  }
  fclose(f);
out:
  pthread_mutex_lock(&m->lock);
  release_busy(m, name);
out_unlock:
  pthread_mutex_unlock(&m->lock);
  return r;
}

int vm_import_and_start(struct vm_manager *m, const struct vm_spec *spec, const void *state,
                        size_t len, const char *migration_id, char *err, size_t errlen)
{
  int r = check_spec(m, spec, err, errlen);
  if (r < 0)
    return r;
  pthread_mutex_lock(&m->lock);
  struct vm_entry *e = find(m, spec->name);
  if (e && strcmp(e->claim, migration_id) != 0 && strcmp(e->state, "migrated") != 0) {
    set_err(err, errlen, "a VM named '%s' already exists at this site", spec->name);
    pthread_mutex_unlock(&m->lock);
    return -EEXIST;
  }
  if (!e) {
    pthread_mutex_unlock(&m->lock);
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/vms/%s", m->data_dir, spec->name);
    if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
      set_err(err, errlen, "cannot create %s: %s", dir, strerror(errno));
      return -EIO;
    }
    pthread_mutex_lock(&m->lock);
    if ((r = db_insert(m, spec, "stopped", err, errlen)) < 0) {
      pthread_mutex_unlock(&m->lock);
      return r;
    }
    struct vm_entry ne = { .spec = *spec };
    snprintf(ne.state, sizeof ne.state, "stopped");
    snprintf(ne.claim, sizeof ne.claim, "%s", migration_id);
    if (add_entry(m, &ne) < 0) {
      pthread_mutex_unlock(&m->lock);
      set_err(err, errlen, "out of memory");
      return -ENOMEM;
    }
  } else {
    /* A VM that was migrated away from here earlier comes back. */
    snprintf(e->claim, sizeof e->claim, "%s", migration_id);
    e->moved_to[0] = '\0';
    if (strcmp(e->state, "migrated") == 0)
      set_state(m, e, "stopped", 0);
  }
  e = acquire(m, spec->name);
  struct runtime_buf b;
  runtime_fill(m, e, &b);
  bool already = e->pid && strcmp(e->state, "stopped") != 0;
  pthread_mutex_unlock(&m->lock);

  const struct vm_driver_ops *ops = driver_for(spec->driver);
  if (!already) {
    /* The state file is written before the process starts from it. */
    r = write_file_atomic(b.state, state, len, 0640, err, errlen) < 0 ? -EIO : 0;
    if (r == 0)
      r = ops->start(&b.rt, true, err, errlen);
  }
  if (r == 0)
    r = ops->resume(&b.rt, err, errlen);

  pthread_mutex_lock(&m->lock);
  e = find(m, spec->name);
  if (e) {
    if (r == 0) {
      if (!already)
        e->child = true;
      set_state(m, e, "running", b.rt.pid);
    } else if (b.rt.pid && !already) {
      set_state(m, e, "paused", b.rt.pid);
      e->child = true;
    }
  }
  release_busy(m, spec->name);
  pthread_mutex_unlock(&m->lock);
  if (r == 0)
    log_info(NULL, "VM '%s' arrived (migration %s) and runs here", spec->name, migration_id);
  return r;
}

int vm_mark_migrated(struct vm_manager *m, const char *name, const char *to, char *err,
                     size_t errlen)
{
  pthread_mutex_lock(&m->lock);
  int r = 0;
  struct vm_entry *e = lookup(m, name, &r, err, errlen);
  if (!e)
    goto out;
  e = acquire(m, name);
  struct runtime_buf b;
  runtime_fill(m, e, &b);
  pthread_mutex_unlock(&m->lock);
  /* Its state now lives at the destination; the paused process here ends. */
  if (b.rt.pid)
    r = driver_for(b.spec.driver)->stop(&b.rt, err, errlen);
  pthread_mutex_lock(&m->lock);
  e = find(m, name);
  if (e) {
    snprintf(e->moved_to, sizeof e->moved_to, "%s", to);
    set_state(m, e, "migrated", 0);
  }
  release_busy(m, name);
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}
