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
 * Adoption at start: a VM recorded running, paused or incoming whose pid is
 * still its driver's live process is taken as it is; otherwise it is
 * recorded stopped (and a WARN says so: a VM that died while ferryd was
 * away).  A VM being imported by a live migration keeps that migration's
 * claim across a restart (column `incoming`), so only that migration can
 * finish or discard it.
 *
 * Migration hooks (vm_migrate_out_*, vm_import_incoming, ...) are thin: the
 * checks and the record here, the QEMU work in the driver's optional ops
 * (driver.h); a driver without them answers -EOPNOTSUPP.
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
#include "vm/network.h"

#define WATCH_INTERVAL_MS 500

struct vm_entry {
  struct vm_spec spec;
  char state[16];                  /* stopped | running | paused | migrated */
  char moved_to[65];               /* site, when migrated */
  pid_t pid;                       /* 0: no process */
  bool child;                      /* started by this ferryd: reap with waitpid */
  char claim[48];                  /* migration id holding the VM, "" when none */
  char incoming[48];               /* id of the migration importing it (persisted), or "" */
  char exit_note[96];              /* how its last process ended, as the watcher saw it */
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
  char *qemu;                      /* the QEMU program (a name on $PATH or a path) */
  unsigned qemu_stop_timeout_ms;
  pthread_mutex_t probe_lock;      /* guards probe_qemu; held while probing */
  json_t *probe_qemu;              /* cached vm_probe_qemu(), NULL until asked */
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
  /* v2: the qemu driver's settings, and the import a live migration holds. */
  "ALTER TABLE vms ADD COLUMN config TEXT NOT NULL DEFAULT '{}';"
  " ALTER TABLE vms ADD COLUMN incoming TEXT",
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
  if (strcmp(name, "qemu") == 0)
    return &vm_driver_qemu;
  return NULL;
}

/* ---- runtime facts for the driver ---- */

struct runtime_buf {
  struct vm_runtime rt;
  struct vm_spec spec;
  char dir[PATH_MAX], state[PATH_MAX], control[PATH_MAX], log[PATH_MAX];
  char uris[VM_MAX_DISKS][512];
  const char *uri_ptrs[VM_MAX_DISKS];
  struct vm_netdev nets[VM_MAX_NICS];
};

/* The control socket of a VM: DATA_DIR/run/NAME.ctl (sim) or .qmp (qemu). */
static void control_path(struct vm_manager *m, const struct vm_spec *s, char *out, size_t len)
{
  const struct vm_driver_ops *ops = driver_for(s->driver);
  fmt_into(out, len, "%s/run/%s.%s", m->data_dir, s->name, ops ? ops->control_ext : "ctl");
}

/* __fn: m->lock held (the networks are read from the table). */
static void runtime_fill(struct vm_manager *m, const struct vm_entry *e, struct runtime_buf *b)
{
  b->spec = e->spec;
  snprintf(b->dir, sizeof b->dir, "%s/vms/%s", m->data_dir, e->spec.name);
  fmt_into(b->state, sizeof b->state, "%s/state.%s", b->dir, e->spec.driver);
  control_path(m, &e->spec, b->control, sizeof b->control);
  fmt_into(b->log, sizeof b->log, "%s/console.log", b->dir);
  for (unsigned i = 0; i < e->spec.ndisks; i++) {
    nbd_listener_uri(m->nbd, e->spec.disks[i], b->uris[i], sizeof b->uris[i]);
    b->uri_ptrs[i] = b->uris[i];
  }
  /* A NIC whose network went missing (only possible in a damaged table)
   * gets user networking rather than no network. */
  for (unsigned i = 0; i < e->spec.nnics && i < VM_MAX_NICS; i++)
    if (net_get(m->db, e->spec.nics[i].network, &b->nets[i]) < 0)
      b->nets[i] = (struct vm_netdev){ .type = "user" };
  bool qemu = strcmp(e->spec.driver, "qemu") == 0;
  b->rt = (struct vm_runtime){
    .spec = &b->spec, .dir = b->dir, .state_path = b->state, .control_path = b->control,
    .log_path = b->log, .disk_uris = b->uri_ptrs, .netdevs = b->nets,
    .program = qemu ? m->qemu : m->simvm, .stop_timeout_ms = m->qemu_stop_timeout_ms,
    .was_running = strcmp(e->state, "running") == 0, .pid = e->pid,
  };
}

/* The driver forgets e's process (it ended or is no longer ours to watch). */
static void release_process(struct vm_manager *m, const struct vm_entry *e)
{
  const struct vm_driver_ops *ops = driver_for(e->spec.driver);
  if (!ops || !ops->release)
    return;
  struct vm_runtime rt = { .spec = &e->spec };
  char ctl[PATH_MAX];
  control_path(m, &e->spec, ctl, sizeof ctl);
  rt.control_path = ctl;
  ops->release(&rt);
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
/* The qemu settings of a spec ({} for sim): the config column, and the
 * VM document's "config". */
static json_t *config_json(const struct vm_spec *s)
{
  json_t *j = vm_spec_to_json(s);
  static const char *const common[] = { "name", "driver", "disks", "workload" };
  for (size_t i = 0; i < ARRAY_SIZE(common); i++)
    json_object_del(j, common[i]);
  return j;
}

static char *config_text(const struct vm_spec *s)
{
  json_t *j = config_json(s);
  char *t = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
  json_decref(j);
  return t;
}

static int db_store_state(struct vm_manager *m, const struct vm_entry *e, char *err,
                          size_t errlen)
{
  char *config = config_text(&e->spec);
  sqlite3_stmt *st = config ? db_prepare(m->db,
      "UPDATE vms SET state = ?1, pid = ?2, moved_to = ?3, workload = ?4, config = ?6,"
      " incoming = ?7, updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE name = ?5",
      err, errlen) : NULL;
  if (!st) {
    free(config);
    return -EIO;
  }
  sqlite3_bind_text(st, 6, config, -1, SQLITE_STATIC);
  if (e->incoming[0])
    sqlite3_bind_text(st, 7, e->incoming, -1, SQLITE_STATIC);
  else
    sqlite3_bind_null(st, 7);
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
  free(config);
  return r;
}

static void set_state(struct vm_manager *m, struct vm_entry *e, const char *state, pid_t pid)
{
  /* state may be e->state itself (a re-store): copied first, never
   * snprintf'ed onto itself. */
  char s[sizeof e->state];
  snprintf(s, sizeof s, "%s", state);
  memcpy(e->state, s, sizeof s);
  e->pid = pid;
  if (!pid)
    e->child = false;
  char err[256];
  if (db_store_state(m, e, err, sizeof err) < 0)
    log_error(NULL, "VM '%s': %s", e->spec.name, err);
}

static int db_insert(struct vm_manager *m, const struct vm_spec *s, const char *state,
                     const char *incoming, char *err, size_t errlen)
{
  json_t *d = disks_array(s);
  char *disks = json_dumps(d, JSON_COMPACT);
  json_decref(d);
  char *config = config_text(s);
  sqlite3_stmt *st = db_prepare(m->db,
      "INSERT INTO vms (name, driver, disks, workload, state, pid, created_at, updated_at,"
      " config, incoming)"
      " VALUES (?1, ?2, ?3, ?4, ?5, 0, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'),"
      " strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), ?6, ?7)", err, errlen);
  int r = -EIO;
  if (st && disks && config) {
    sqlite3_bind_text(st, 6, config, -1, SQLITE_STATIC);
    if (incoming && incoming[0])
      sqlite3_bind_text(st, 7, incoming, -1, SQLITE_STATIC);
    else
      sqlite3_bind_null(st, 7);
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
  free(config);
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

/* The stored qemu settings into spec (checked as a spec from a peer is). */
static void load_config(struct vm_spec *spec, const char *config)
{
  json_t *j = vm_spec_to_json(spec);
  json_t *c = config ? json_loads(config, 0, NULL) : NULL;
  if (json_is_object(c))
    json_object_update(j, c);
  char err[256];
  struct vm_spec full;
  if (vm_spec_from_json(j, &full, err, sizeof err) == 0) {
    *spec = full;
  } else {
    log_error(NULL, "VM '%s': its stored settings are not valid (%s): using the defaults",
              spec->name, err);
    vm_spec_fill_defaults(spec);
  }
  json_decref(c);
  json_decref(j);
}

static int load(struct vm_manager *m, char *err, size_t errlen)
{
  sqlite3_stmt *st = db_prepare(m->db,
      "SELECT name, driver, disks, workload, state, pid, moved_to, config, incoming FROM vms"
      " ORDER BY name",
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
    if ((v = (const char *)sqlite3_column_text(st, 8)) && v[0]) {
      snprintf(e.incoming, sizeof e.incoming, "%s", v);
      snprintf(e.claim, sizeof e.claim, "%s", v);      /* held across the restart */
    }
    load_config(&e.spec, (const char *)sqlite3_column_text(st, 7));
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
    bool incoming = strcmp(e->state, "incoming") == 0;
    if (strcmp(e->state, "running") != 0 && strcmp(e->state, "paused") != 0 && !incoming)
      continue;
    struct runtime_buf b;
    runtime_fill(m, e, &b);
    const struct vm_driver_ops *ops = driver_for(e->spec.driver);
    if (e->pid && ops->alive(&b.rt, e->pid)) {
      json_t *st = NULL;
      char err[512];
      if (ops->status(&b.rt, &st, err, sizeof err) == 0) {
        const char *s = json_string_value(json_object_get(st, "state"));
        /* An import stays "incoming" until its guest runs (vm_incoming_status). */
        if (!incoming && s && (strcmp(s, "running") == 0 || strcmp(s, "paused") == 0))
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
    snprintf(e->exit_note, sizeof e->exit_note, "its process ended while ferryd was away");
    set_state(m, e, "stopped", 0);
  }
}

bool vm_pid_gone(pid_t pid)
{
  if (kill(pid, 0) < 0)
    return errno == ESRCH;
  char path[64], buf[256];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return true;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0)
    return true;
  buf[n] = '\0';
  const char *rp = strrchr(buf, ')');       /* "PID (COMM) STATE ..." */
  return rp && rp[1] == ' ' && (rp[2] == 'Z' || rp[2] == 'X');
}

pid_t vm_spawn(const char *program, char *const argv[], int logfd, char *err, size_t errlen)
{
  pid_t pid = fork();
  if (pid < 0) {
    int e = errno;
    set_err(err, errlen, "fork: %s", strerror(e));
    return -e;
  }
  if (pid == 0) {
    /* Child: own session (survives ferryd), default signals, no inherited mask. */
    setsid();
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0)
      dup2(devnull, 0);
    dup2(logfd, 1);
    dup2(logfd, 2);
    execv(program, argv);
    dprintf(2, "cannot exec %s: %s\n", program, strerror(errno));
    _exit(127);
  }
  return pid;
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
        gone = vm_pid_gone(e->pid);
      }
      if (!gone)
        continue;
      if (e->child && WIFSIGNALED(status)) {
        log_warn(NULL, "VM '%s' (pid %d) was killed by signal %d", e->spec.name, (int)e->pid,
                 WTERMSIG(status));
        snprintf(e->exit_note, sizeof e->exit_note, "killed by signal %d", WTERMSIG(status));
      } else if (e->child && WIFEXITED(status) && WEXITSTATUS(status) != 0) {
        log_warn(NULL, "VM '%s' (pid %d) exited with status %d", e->spec.name, (int)e->pid,
                 WEXITSTATUS(status));
        snprintf(e->exit_note, sizeof e->exit_note, "exit status %d", WEXITSTATUS(status));
      } else {
        log_info(NULL, "VM '%s' (pid %d) exited", e->spec.name, (int)e->pid);
        snprintf(e->exit_note, sizeof e->exit_note, "exited");
      }
      release_process(m, e);
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
  m->qemu = strdup(o->qemu_path && o->qemu_path[0] ? o->qemu_path : "qemu-system-x86_64");
  m->qemu_stop_timeout_ms = o->qemu_stop_timeout_ms ? o->qemu_stop_timeout_ms : 30000;
  pthread_mutex_init(&m->probe_lock, NULL);
  char path[PATH_MAX];
  snprintf(path, sizeof path, "%s/vms", data_dir);
  mkdir(path, 0750);
  snprintf(path, sizeof path, "%s/run", data_dir);
  mkdir(path, 0750);
  if (db_migrate(db, "vm", schema, (int)ARRAY_SIZE(schema), err, errlen) < 0 ||
      net_table_open(db, err, errlen) < 0 || load(m, err, errlen) < 0) {
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
  log_info(NULL, "vm: %zu VM(s); sim program %s, qemu program %s", m->nvms, m->simvm, m->qemu);
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
  /* The processes run on; only our connections to them end. */
  for (size_t i = 0; i < m->nvms; i++)
    if (m->vms[i].pid)
      release_process(m, &m->vms[i]);
  json_decref(m->probe_qemu);
  pthread_mutex_destroy(&m->probe_lock);
  free(m->vms);
  free(m->data_dir);
  free(m->simvm);
  free(m->qemu);
  pthread_cond_destroy(&m->wake);
  pthread_cond_destroy(&m->idle);
  pthread_mutex_destroy(&m->lock);
  free(m);
}

/* ---- checks ---- */

/* Checks a spec from anyone (API, peer site, migration engine) and gives
 * back its normal form in *out: the defaults filled in, every field held to
 * what vm_spec_from_json accepts, the disks and boot files present here.
 * Networks are checked under the lock (check_networks). */
static int check_spec(struct vm_manager *m, const struct vm_spec *in, struct vm_spec *out,
                      char *err, size_t errlen)
{
  if (!name_is_valid(in->name)) {
    set_err(err, errlen, "invalid VM name '%.80s': 1-64 characters of A-Z a-z 0-9 . _ -, "
            "not starting with '.' or '-'", in->name);
    return -EINVAL;
  }
  const struct vm_driver_ops *ops = driver_for(in->driver);
  if (!ops) {
    set_err(err, errlen, "unknown driver '%.40s' (sim, qemu)", in->driver);
    return -EINVAL;
  }
  if (in->ndisks == 0) {
    set_err(err, errlen, "a VM needs at least one disk");
    return -EINVAL;
  }
  /* The one parser decides: a spec built in C passes the same checks as
   * one that came as JSON. */
  struct vm_spec s = *in;
  vm_spec_fill_defaults(&s);
  json_t *j = vm_spec_to_json(&s);
  int r = vm_spec_from_json(j, out, err, errlen);
  json_decref(j);
  if (r < 0)
    return r;
  for (unsigned i = 0; i < out->ndisks; i++) {
    struct disk *d = registry_get(m->reg, out->disks[i]);
    if (!d) {
      set_err(err, errlen, "disk '%s' does not exist", out->disks[i]);
      return -ENOENT;
    }
    disk_unref(d);
  }
  const char *files[] = { out->kernel, out->initrd };
  const char *what[] = { "kernel", "initrd" };
  for (int i = 0; i < 2; i++) {
    struct stat st;
    if (files[i][0] && (stat(files[i], &st) < 0 || !S_ISREG(st.st_mode) ||
                        access(files[i], R_OK) < 0)) {
      set_err(err, errlen, "%s %s is not a readable file on this host%s%s", what[i], files[i],
              errno ? ": " : "", errno ? strerror(errno) : "");
      return -EINVAL;
    }
  }
  char ctl[PATH_MAX];
  control_path(m, out, ctl, sizeof ctl);
  if (strlen(ctl) >= 108) {
    set_err(err, errlen, "the control socket path %s is longer than 107 bytes: use a "
            "shorter --data-dir or VM name", ctl);
    return -EINVAL;
  }
  if (ops->check_spec && (r = ops->check_spec(out, err, errlen)) < 0)
    return r;
  return ops->validate(out->workload, err, errlen);
}

/* __fn: m->lock held.  Every NIC's network exists. */
static int check_networks(struct vm_manager *m, const struct vm_spec *s, char *err,
                          size_t errlen)
{
  for (unsigned i = 0; i < s->nnics; i++) {
    struct vm_netdev n;
    if (net_get(m->db, s->nics[i].network, &n) < 0) {
      set_err(err, errlen, "NIC %u: network '%s' does not exist (ferry network add)", i,
              s->nics[i].network);
      return -ENOENT;
    }
  }
  return 0;
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

int vm_create(struct vm_manager *m, const struct vm_spec *given, char *err, size_t errlen)
{
  struct vm_spec norm, *spec = &norm;
  int r = check_spec(m, given, &norm, err, errlen);
  if (r < 0)
    return r;
  pthread_mutex_lock(&m->lock);
  if ((r = check_networks(m, spec, err, errlen)) < 0)
    goto out;
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
  fmt_into(dir, sizeof dir, "%s/vms/%s", m->data_dir, spec->name);
  if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
    set_err(err, errlen, "cannot create %s: %s", dir, strerror(errno));
    r = -EIO;
    goto out;
  }
  if ((r = db_insert(m, spec, "stopped", NULL, err, errlen)) < 0)
    goto out;
  struct vm_entry e = { .spec = *spec };
  snprintf(e.state, sizeof e.state, "stopped");
  if (add_entry(m, &e) < 0) {
    set_err(err, errlen, "out of memory");
    r = -ENOMEM;
    goto out;
  }
  log_info(NULL, "VM '%s' created (driver %s, %u disk(s), %u NIC(s))", spec->name, spec->driver,
           spec->ndisks, spec->nnics);
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}

static int delete_entry(struct vm_manager *m, const char *name, const struct runtime_buf *b,
                        char *err, size_t errlen);

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
  r = delete_entry(m, name, &b, err, errlen);
  if (r < 0)
    release_busy(m, name);
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}

/* __fn: m->lock held, the entry busy (acquire).  Deletes the row, the VM's
 * files and the entry. */
static int delete_entry(struct vm_manager *m, const char *name, const struct runtime_buf *b,
                        char *err, size_t errlen)
{
  int r;
  sqlite3_stmt *st = db_prepare(m->db, "DELETE FROM vms WHERE name = ?1", err, errlen);
  if (st) {
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    r = db_step_done(m->db, st, "delete the VM", err, errlen);
    sqlite3_finalize(st);
  } else {
    r = -EIO;
  }
  if (r == 0) {
    static const char *const extra[] = { "qemu.log", "qemu.pid" };
    unlink(b->state);
    unlink(b->control);
    unlink(b->log);
    for (size_t i = 0; i < ARRAY_SIZE(extra); i++) {
      char p[PATH_MAX];
      if (fmt_into(p, sizeof p, "%s/%s", b->dir, extra[i]) == 0)
        unlink(p);
    }
    rmdir(b->dir);
    struct vm_entry *e = find(m, name);
    release_process(m, e);
    size_t pos = (size_t)(e - m->vms);
    memmove(&m->vms[pos], &m->vms[pos + 1], (m->nvms - pos - 1) * sizeof *m->vms);
    m->nvms--;
    pthread_cond_broadcast(&m->idle);
    log_info(NULL, "VM '%s' removed", name);
  }
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
  if (e && r < 0 && op == OP_START)
    release_process(m, e);           /* no process: nothing to stay connected to */
  if (e && r == 0) {
    pid_t pid = op == OP_STOP ? 0 : b.rt.pid;
    if (op == OP_START) {
      e->child = true;
      e->exit_note[0] = '\0';
    }
    if (op == OP_STOP)
      release_process(m, e);
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
int vm_migration_stop(struct vm_manager *m, const char *name, char *err, size_t errlen)
{
  return do_op(m, name, OP_STOP, true, err, errlen);
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
  json_t *j = json_pack("{s:s, s:s, s:o, s:s, s:o, s:s, s:I}", "name", e->spec.name, "driver",
                        e->spec.driver, "disks", disks_array(&e->spec), "workload",
                        e->spec.workload, "config", config_json(&e->spec), "state", e->state,
                        "pid", (json_int_t)e->pid);
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
  if (e && strcmp(e->claim, migration_id) == 0) {
    e->claim[0] = '\0';
    if (strcmp(e->incoming, migration_id) == 0) {
      e->incoming[0] = '\0';
      set_state(m, e, e->state, e->pid);
    }
  }
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
  if (!driver_for(e->spec.driver)->has_state_file) {
    set_err(err, errlen, "VM '%s' (driver %s) has no state file: its RAM moves by QEMU's "
            "migration (vm_migrate_out_start)", name, e->spec.driver);
    r = -EOPNOTSUPP;
    goto out_unlock;
  }
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

int vm_import_and_start(struct vm_manager *m, const struct vm_spec *given, const void *state,
                        size_t len, const char *migration_id, char *err, size_t errlen)
{
  struct vm_spec norm, *spec = &norm;
  int r = check_spec(m, given, &norm, err, errlen);
  if (r < 0)
    return r;
  /* A driver without a state file (qemu) boots from its disks: a cold
   * migration's arrival.  A live one arrives by vm_import_incoming. */
  bool state_file = driver_for(spec->driver)->has_state_file;
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
    fmt_into(dir, sizeof dir, "%s/vms/%s", m->data_dir, spec->name);
    if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
      set_err(err, errlen, "cannot create %s: %s", dir, strerror(errno));
      return -EIO;
    }
    pthread_mutex_lock(&m->lock);
    if ((r = db_insert(m, spec, "stopped", NULL, err, errlen)) < 0) {
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
    r = state_file && write_file_atomic(b.state, state, len, 0640, err, errlen) < 0 ? -EIO : 0;
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
  /* Its state now lives at the destination; the paused process here ends,
   * without a guest shutdown where the driver can (the guest runs on there). */
  const struct vm_driver_ops *ops = driver_for(b.spec.driver);
  if (b.rt.pid)
    r = ops->quit ? ops->quit(&b.rt, err, errlen) : ops->stop(&b.rt, err, errlen);
  pthread_mutex_lock(&m->lock);
  e = find(m, name);
  if (e) {
    snprintf(e->moved_to, sizeof e->moved_to, "%s", to);
    release_process(m, e);
    set_state(m, e, "migrated", 0);
  }
  release_busy(m, name);
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}

int vm_restore_state(struct vm_manager *m, const char *name, const void *state, size_t len,
                     char *err, size_t errlen)
{
  pthread_mutex_lock(&m->lock);
  int r = 0;
  struct vm_entry *e = lookup(m, name, &r, err, errlen);
  if (!e)
    goto out;
  if (e->claim[0]) {
    set_err(err, errlen, "VM '%s' is being migrated (migration %s)", name, e->claim);
    r = -EBUSY;
    goto out;
  }
  if (strcmp(e->state, "stopped") != 0 && strcmp(e->state, "migrated") != 0) {
    set_err(err, errlen, "VM '%s' is %s here: stop it first (ferry vm stop %s)", name, e->state,
            name);
    r = -EBUSY;
    goto out;
  }
  e = acquire(m, name);
  struct runtime_buf b;
  runtime_fill(m, e, &b);
  bool state_file = driver_for(b.spec.driver)->has_state_file;
  pthread_mutex_unlock(&m->lock);
  r = state_file && write_file_atomic(b.state, state, len, 0640, err, errlen) < 0 ? -EIO : 0;
  pthread_mutex_lock(&m->lock);
  e = find(m, name);
  if (e && r == 0) {
    e->moved_to[0] = '\0';
    set_state(m, e, "stopped", 0);
  }
  release_busy(m, name);
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}

/* ---- hypervisors ---- */

int vm_hypervisor_probe(struct vm_manager *m, const char *driver, bool refresh, json_t **out,
                        char *err, size_t errlen)
{
  *out = NULL;
  if (driver && strcmp(driver, "sim") == 0) {
    char path[PATH_MAX];
    bool present = vm_find_program(m->simvm, path, sizeof path) == 0;
    *out = json_pack("{s:s, s:b, s:s}", "driver", "sim", "present", present, "program", path);
    if (!present)
      json_object_set_new(*out, "why", json_string("the ferry-simvm program is not there "
                                                   "(ferryd --simvm PATH)"));
    return 0;
  }
  if (!driver || strcmp(driver, "qemu") != 0) {
    set_err(err, errlen, "unknown driver '%.40s' (sim, qemu)", driver ? driver : "");
    return -EINVAL;
  }
  /* Its own lock: a probe starts QEMU, which takes a moment. */
  pthread_mutex_lock(&m->probe_lock);
  if (!m->probe_qemu || refresh) {
    if (refresh) {
      struct vm_kvm_status k;
      vm_kvm_check(true, &k);
    }
    char run[PATH_MAX];
    snprintf(run, sizeof run, "%s/run", m->data_dir);
    json_decref(m->probe_qemu);
    m->probe_qemu = vm_probe_qemu(m->qemu, run);
    log_info(NULL, "hypervisor qemu: %s %s, accel %s",
             json_string_value(json_object_get(m->probe_qemu, "program")),
             json_is_true(json_object_get(m->probe_qemu, "present"))
               ? json_string_value(json_object_get(m->probe_qemu, "version"))
               : json_string_value(json_object_get(m->probe_qemu, "why")),
             json_string_value(json_object_get(m->probe_qemu, "accel")));
  }
  *out = json_deep_copy(m->probe_qemu);
  pthread_mutex_unlock(&m->probe_lock);
  if (!*out) {
    set_err(err, errlen, "out of memory");
    return -ENOMEM;
  }
  return 0;
}

/* ---- networks ---- */

/* __fn: m->lock held.  The VMs (not migrated away) with a NIC on network. */
static json_t *network_users(struct vm_manager *m, const char *network)
{
  json_t *users = json_array();
  for (size_t i = 0; i < m->nvms; i++) {
    const struct vm_entry *e = &m->vms[i];
    if (strcmp(e->state, "migrated") == 0)
      continue;
    for (unsigned k = 0; k < e->spec.nnics; k++)
      if (strcmp(e->spec.nics[k].network, network) == 0) {
        json_array_append_new(users, json_string(e->spec.name));
        break;
      }
  }
  return users;
}

int vm_network_add(struct vm_manager *m, const char *name, const char *type, const char *bridge,
                   char *err, size_t errlen)
{
  int r = net_check(name, type, bridge, err, errlen);
  if (r < 0)
    return r;
  pthread_mutex_lock(&m->lock);
  r = net_insert(m->db, name, type, bridge, err, errlen);
  pthread_mutex_unlock(&m->lock);
  if (r == 0)
    log_info(NULL, "network '%s' added (%s%s%s)", name, type, bridge && bridge[0] ? ", bridge " : "",
             bridge && bridge[0] ? bridge : "");
  return r;
}

int vm_network_remove(struct vm_manager *m, const char *name, char *err, size_t errlen)
{
  if (!name_is_valid(name)) {
    set_err(err, errlen, "invalid network name '%.80s'", name ? name : "");
    return -EINVAL;
  }
  pthread_mutex_lock(&m->lock);
  json_t *users = network_users(m, name);
  int r;
  if (json_array_size(users)) {
    char list[512] = "";
    size_t i, pos = 0;
    json_t *x;
    json_array_foreach(users, i, x)
      if (pos < sizeof list)
        pos += (size_t)snprintf(list + pos, sizeof list - pos, "%s'%s'", i ? ", " : "",
                                json_string_value(x));
    set_err(err, errlen, "network '%s' is used by VM%s %s: remove %s NICs first", name,
            json_array_size(users) > 1 ? "s" : "", list,
            json_array_size(users) > 1 ? "their" : "its");
    r = -EBUSY;
  } else {
    r = net_delete(m->db, name, err, errlen);
  }
  pthread_mutex_unlock(&m->lock);
  json_decref(users);
  if (r == 0)
    log_info(NULL, "network '%s' removed", name);
  return r;
}

json_t *vm_network_list_json(struct vm_manager *m)
{
  pthread_mutex_lock(&m->lock);
  json_t *arr = net_list(m->db);
  size_t i;
  json_t *n;
  json_array_foreach(arr, i, n)
    json_object_set_new(n, "used_by",
                        network_users(m, json_string_value(json_object_get(n, "name"))));
  pthread_mutex_unlock(&m->lock);
  return json_pack("{s:o}", "networks", arr);
}

json_t *vm_network_json(struct vm_manager *m, const char *name, char *err, size_t errlen)
{
  json_t *all = vm_network_list_json(m), *found = NULL;
  size_t i;
  json_t *n;
  json_array_foreach(json_object_get(all, "networks"), i, n)
    if (strcmp(json_string_value(json_object_get(n, "name")), name) == 0)
      found = json_incref(n);
  json_decref(all);
  if (!found)
    set_err(err, errlen, "network '%.80s' does not exist", name);
  return found;
}

bool vm_network_exists(struct vm_manager *m, const char *name)
{
  struct vm_netdev n;
  pthread_mutex_lock(&m->lock);
  bool ok = name_is_valid(name) && net_get(m->db, name, &n) == 0;
  pthread_mutex_unlock(&m->lock);
  return ok;
}

/* ---- live migration hooks ---- */

enum hook { H_OUT_START, H_OUT_STATUS, H_OUT_CONTINUE, H_OUT_CANCEL };

/* The source hooks share one shape: the VM must run (or be paused) here
 * and have a driver that migrates RAM; the op runs outside the lock. */
static int source_hook(struct vm_manager *m, const char *name, enum hook h, const char *uri,
                       json_t **info, char *err, size_t errlen)
{
  pthread_mutex_lock(&m->lock);
  int r = 0;
  struct vm_entry *e = lookup(m, name, &r, err, errlen);
  if (!e)
    goto out;
  const struct vm_driver_ops *ops = driver_for(e->spec.driver);
  if (!ops->migrate_out_start) {
    set_err(err, errlen, "VM '%s' (driver %s) has no live RAM migration", name, e->spec.driver);
    r = -EOPNOTSUPP;
    goto out;
  }
  if (!e->pid || (strcmp(e->state, "running") != 0 && strcmp(e->state, "paused") != 0)) {
    set_err(err, errlen, "VM '%s' is %s: its RAM can only move while it runs", name, e->state);
    r = -EBUSY;
    goto out;
  }
  e = acquire(m, name);
  struct runtime_buf b;
  runtime_fill(m, e, &b);
  pthread_mutex_unlock(&m->lock);
  switch (h) {
  case H_OUT_START: r = ops->migrate_out_start(&b.rt, uri, err, errlen); break;
  case H_OUT_STATUS: r = ops->migrate_out_status(&b.rt, info, err, errlen); break;
  case H_OUT_CONTINUE: r = ops->migrate_out_continue(&b.rt, err, errlen); break;
  case H_OUT_CANCEL: r = ops->migrate_out_cancel(&b.rt, err, errlen); break;
  }
  pthread_mutex_lock(&m->lock);
  release_busy(m, name);
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}

int vm_migrate_out_start(struct vm_manager *m, const char *name, const char *uri, char *err,
                         size_t errlen)
{
  if (!uri || !uri[0] || strlen(uri) > 512) {
    set_err(err, errlen, "a migration URI such as unix:/path/to/socket is needed");
    return -EINVAL;
  }
  return source_hook(m, name, H_OUT_START, uri, NULL, err, errlen);
}

int vm_migrate_out_status(struct vm_manager *m, const char *name, json_t **info, char *err,
                          size_t errlen)
{
  *info = NULL;
  return source_hook(m, name, H_OUT_STATUS, NULL, info, err, errlen);
}

int vm_migrate_out_continue(struct vm_manager *m, const char *name, char *err, size_t errlen)
{
  return source_hook(m, name, H_OUT_CONTINUE, NULL, NULL, err, errlen);
}

int vm_migrate_out_cancel(struct vm_manager *m, const char *name, char *err, size_t errlen)
{
  return source_hook(m, name, H_OUT_CANCEL, NULL, NULL, err, errlen);
}

int vm_import_incoming(struct vm_manager *m, const struct vm_spec *given, const char *migration_id,
                       const char *incoming_uri, char *err, size_t errlen)
{
  if (!migration_id || !migration_id[0] || strlen(migration_id) >= sizeof m->vms[0].claim) {
    set_err(err, errlen, "a migration id is needed");
    return -EINVAL;
  }
  if (!incoming_uri || !incoming_uri[0] || strlen(incoming_uri) > 512) {
    set_err(err, errlen, "an incoming migration URI such as unix:/path/to/socket is needed");
    return -EINVAL;
  }
  struct vm_spec norm, *spec = &norm;
  int r = check_spec(m, given, &norm, err, errlen);
  if (r < 0)
    return r;
  const struct vm_driver_ops *ops = driver_for(spec->driver);
  if (!ops->start_incoming) {
    set_err(err, errlen, "VM '%s' (driver %s) cannot receive a live RAM migration", spec->name,
            spec->driver);
    return -EOPNOTSUPP;
  }
  char dir[PATH_MAX];
  fmt_into(dir, sizeof dir, "%s/vms/%s", m->data_dir, spec->name);
  if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
    set_err(err, errlen, "cannot create %s: %s", dir, strerror(errno));
    return -EIO;
  }
  pthread_mutex_lock(&m->lock);
  if ((r = check_networks(m, spec, err, errlen)) < 0)
    goto out;
  struct vm_entry *e = find(m, spec->name);
  if (e && (strcmp(e->claim, migration_id) == 0 || strcmp(e->incoming, migration_id) == 0)) {
    e = acquire(m, spec->name);
    struct runtime_buf b;
    runtime_fill(m, e, &b);
    bool done = e->pid && ops->alive(&b.rt, e->pid) &&
                (strcmp(e->state, "incoming") == 0 || strcmp(e->state, "running") == 0);
    release_busy(m, spec->name);
    if (done) {
      r = 0;                      /* already done: the same migration asks again */
      goto out;
    }
  } else if (e && strcmp(e->state, "migrated") != 0) {
    if (e->claim[0]) {
      set_err(err, errlen, "VM '%s' is held by migration %s", spec->name, e->claim);
      r = -EBUSY;
    } else {
      set_err(err, errlen, "a VM named '%s' already exists at this site", spec->name);
      r = -EEXIST;
    }
    goto out;
  }
  if (!e) {
    if ((r = db_insert(m, spec, "incoming", migration_id, err, errlen)) < 0)
      goto out;
    struct vm_entry ne = { .spec = *spec };
    snprintf(ne.state, sizeof ne.state, "incoming");
    snprintf(ne.claim, sizeof ne.claim, "%s", migration_id);
    snprintf(ne.incoming, sizeof ne.incoming, "%s", migration_id);
    if (add_entry(m, &ne) < 0) {
      set_err(err, errlen, "out of memory");
      r = -ENOMEM;
      goto out;
    }
  } else {
    /* A retry of this migration, or a VM that left this site earlier comes
     * back: the spec is the one that arrives. */
    e = acquire(m, spec->name);
    e->spec = *spec;
    snprintf(e->claim, sizeof e->claim, "%s", migration_id);
    snprintf(e->incoming, sizeof e->incoming, "%s", migration_id);
    e->moved_to[0] = '\0';
    set_state(m, e, "incoming", 0);
    release_busy(m, spec->name);
  }
  e = acquire(m, spec->name);
  e->exit_note[0] = '\0';
  struct runtime_buf b;
  runtime_fill(m, e, &b);
  b.rt.pid = 0;
  pthread_mutex_unlock(&m->lock);
  r = ops->start_incoming(&b.rt, incoming_uri, err, errlen);
  pthread_mutex_lock(&m->lock);
  e = find(m, spec->name);
  if (e) {
    if (r == 0) {
      e->child = true;
      set_state(m, e, "incoming", b.rt.pid);
      log_info(NULL, "VM '%s' incoming (migration %s): QEMU pid %d waits for its RAM",
               spec->name, migration_id, (int)b.rt.pid);
    } else {
      release_process(m, e);
      set_state(m, e, "stopped", 0);     /* the record and claim stay: retry or discard */
    }
  }
  release_busy(m, spec->name);
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}

int vm_incoming_status(struct vm_manager *m, const char *name, json_t **info, char *err,
                       size_t errlen)
{
  *info = NULL;
  pthread_mutex_lock(&m->lock);
  int r = 0;
  struct vm_entry *e = lookup(m, name, &r, err, errlen);
  if (!e)
    goto out;
  const struct vm_driver_ops *ops = driver_for(e->spec.driver);
  if (!ops->incoming_status) {
    set_err(err, errlen, "VM '%s' (driver %s) cannot receive a live RAM migration", name,
            e->spec.driver);
    r = -EOPNOTSUPP;
    goto out;
  }
  e = acquire(m, name);
  struct runtime_buf b;
  runtime_fill(m, e, &b);
  pthread_mutex_unlock(&m->lock);
  r = ops->incoming_status(&b.rt, info, err, errlen);
  pthread_mutex_lock(&m->lock);
  e = find(m, name);
  if (e && r == 0) {
    if (json_is_true(json_object_get(*info, "exited")) && e->exit_note[0])
      json_object_set_new(*info, "exit_status", json_string(e->exit_note));
    if (json_is_true(json_object_get(*info, "running")) && strcmp(e->state, "running") != 0) {
      set_state(m, e, "running", b.rt.pid);
      log_info(NULL, "VM '%s' arrived (migration %s) and runs here", name, e->claim);
    }
  }
  release_busy(m, name);
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}

int vm_discard_incoming(struct vm_manager *m, const char *name, const char *migration_id,
                        char *err, size_t errlen)
{
  pthread_mutex_lock(&m->lock);
  int r = 0;
  struct vm_entry *e = lookup(m, name, &r, err, errlen);
  if (!e)
    goto out;
  if (!migration_id || (strcmp(e->claim, migration_id) != 0 &&
                        strcmp(e->incoming, migration_id) != 0)) {
    set_err(err, errlen, "VM '%s' was not brought here by migration %s", name,
            migration_id ? migration_id : "(none)");
    r = -EBUSY;
    goto out;
  }
  if (strcmp(e->state, "running") == 0 || strcmp(e->state, "paused") == 0) {
    set_err(err, errlen, "VM '%s' already ran here after its migration: this site holds its "
            "only copy, it is not discarded", name);
    r = -EBUSY;
    goto out;
  }
  e = acquire(m, name);
  struct runtime_buf b;
  runtime_fill(m, e, &b);
  const struct vm_driver_ops *ops = driver_for(b.spec.driver);
  pthread_mutex_unlock(&m->lock);
  /* Its guest may have started since anyone last asked: then it stays. */
  json_t *info = NULL;
  char e2[256];
  bool ran = ops->incoming_status && b.rt.pid &&
             ops->incoming_status(&b.rt, &info, e2, sizeof e2) == 0 &&
             json_is_true(json_object_get(info, "running"));
  json_decref(info);
  if (ran) {
    pthread_mutex_lock(&m->lock);
    if ((e = find(m, name)))
      set_state(m, e, "running", b.rt.pid);
    set_err(err, errlen, "VM '%s' runs here since its migration: it is not discarded", name);
    r = -EBUSY;
    release_busy(m, name);
    goto out;
  }
  if (b.rt.pid && ops->alive(&b.rt, b.rt.pid)) {
    kill(b.rt.pid, SIGKILL);
    uint64_t deadline = now_ns() + 10000000000ull;
    for (;;) {
      pid_t w = waitpid(b.rt.pid, NULL, WNOHANG);
      if (w == b.rt.pid || (w < 0 && errno == ECHILD && vm_pid_gone(b.rt.pid)))
        break;
      if (now_ns() > deadline) {
        log_warn(NULL, "VM '%s': QEMU pid %d does not die", name, (int)b.rt.pid);
        break;
      }
      usleep(10 * 1000);
    }
  }
  pthread_mutex_lock(&m->lock);
  r = delete_entry(m, name, &b, err, errlen);
  if (r < 0) {
    if ((e = find(m, name)))
      set_state(m, e, "stopped", 0);
    release_busy(m, name);
  } else {
    log_info(NULL, "VM '%s' discarded (migration %s)", name, migration_id);
  }
out:
  pthread_mutex_unlock(&m->lock);
  return r;
}
