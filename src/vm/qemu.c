/* qemu: the `qemu` hypervisor driver: a VM is a QEMU process driven over
 * QMP (qmp.h), its disks served by ferryd over NBD, its RAM moved by QEMU's
 * own live migration (docs/qemu.md).
 *
 * Process: QEMU is started in its own session (setsid), so it outlives
 * ferryd, with -nodefaults -no-user-config -display none, the machine and
 * accelerator (KVM only when probe.c found it usable, else TCG with a WARN),
 * its QMP socket DATA_DIR/run/NAME.qmp, the serial console appended to
 * DATA_DIR/vms/NAME/console.log, QEMU's own messages to qemu.log beside it,
 * each disk an NBD export of ferryd (export name = disk name) and each NIC
 * on its site network.  Ready is when QMP answers.
 *
 * Connection: QEMU serves one QMP client at a time, and events (STOP,
 * RESUME) reach only a connected one, so the driver keeps one connection per
 * VM for as long as the process lives, in a `struct qvm` found by the QMP
 * socket path (the vm_runtime the manager passes is rebuilt per call).  A
 * qvm is reference counted: each op holds it (and its mutex) while it talks
 * to QEMU, never while it waits for a process to exit; the manager's
 * release() drops the connection (and the qvm) of a process it no longer
 * tracks.  After a
 * ferryd restart the next op connects again (adoption).
 *
 * Liveness: a pid is this VM's QEMU only if its /proc/PID/cmdline has this
 * VM's -qmp argument, so a recycled pid is never signalled.
 *
 * Thread model: qvms' list under qvms_lock; each qvm's connection and
 * event-derived times under its own mutex. */
#include "vm/driver.h"

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

#include "common/log.h"
#include "common/util.h"
#include "vm/qmp.h"

#define START_TIMEOUT_MS   30000
#define CONNECT_TIMEOUT_MS 5000
#define QUIT_TIMEOUT_MS    10000
#define KILL_TIMEOUT_MS    10000
#define CANCEL_TIMEOUT_MS  10000
#define DEFAULT_STOP_TIMEOUT_MS 30000
/* QEMU's default RAM migration cap is 32 MiB/s; ferry's site link paces
 * the stream itself, so QEMU's own cap is lifted. */
#define MIGRATE_MAX_BANDWIDTH (1ull << 40)
#define MAX_ARGS 160

static void set_err(char *err, size_t errlen, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

static int ms_left(uint64_t deadline)
{
  uint64_t now = now_ns();
  return now >= deadline ? 0 : (int)MIN((deadline - now) / 1000000 + 1, (uint64_t)INT32_MAX);
}

/* ---- per-VM connection state ---- */

struct qvm {
  struct qvm *next;
  char path[108];                /* the QMP socket: the key */
  unsigned refs;                 /* ops holding it */
  bool released;                 /* the manager dropped the process: free at the last put */
  pthread_mutex_t lock;          /* guards what follows; held while talking to QEMU */
  struct qmp *q;
  pid_t q_pid;                   /* the process q talks to */
  uint64_t stop_ns, resume_ns;   /* last STOP / RESUME event seen on q (realtime ns) */
  bool migrating;                /* a migration out was started: watch for its STOP */
  uint64_t mig_stop_ns;          /* the first STOP since then */
  char shutdown[96];             /* reason of the last SHUTDOWN event */
};

static pthread_mutex_t qvms_lock = PTHREAD_MUTEX_INITIALIZER;
static struct qvm *qvms;

static void qvm_free(struct qvm *v)
{
  qmp_close(v->q);
  pthread_mutex_destroy(&v->lock);
  free(v);
}

/* Finds or makes the qvm of rt and returns it held and locked. */
static struct qvm *qvm_get(const struct vm_runtime *rt)
{
  pthread_mutex_lock(&qvms_lock);
  struct qvm *v;
  for (v = qvms; v; v = v->next)
    if (strcmp(v->path, rt->control_path) == 0)
      break;
  if (!v && (v = calloc(1, sizeof *v))) {
    snprintf(v->path, sizeof v->path, "%s", rt->control_path);
    pthread_mutex_init(&v->lock, NULL);
    v->next = qvms;
    qvms = v;
  }
  if (v) {
    v->refs++;
    v->released = false;
  }
  pthread_mutex_unlock(&qvms_lock);
  if (v)
    pthread_mutex_lock(&v->lock);
  return v;
}

static void qvm_unlink(struct qvm *v)
{
  for (struct qvm **p = &qvms; *p; p = &(*p)->next)
    if (*p == v) {
      *p = v->next;
      return;
    }
}

/* Unlocks and lets go of v; the last holder of a released qvm frees it. */
static void qvm_put(struct qvm *v)
{
  pthread_mutex_unlock(&v->lock);
  pthread_mutex_lock(&qvms_lock);
  if (--v->refs == 0 && v->released) {
    qvm_unlink(v);
    qvm_free(v);
  }
  pthread_mutex_unlock(&qvms_lock);
}

static void qvm_disconnect(struct qvm *v)
{
  qmp_close(v->q);
  v->q = NULL;
  v->q_pid = 0;
}

/* Takes the queued events into v's times. */
static void qvm_take_events(struct qvm *v)
{
  struct qmp_event ev;
  while (v->q && qmp_next_event(v->q, &ev)) {
    if (strcmp(ev.name, "STOP") == 0) {
      v->stop_ns = ev.ts_ns;
      if (v->migrating && !v->mig_stop_ns)
        v->mig_stop_ns = ev.ts_ns ? ev.ts_ns : realtime_ns();
    } else if (strcmp(ev.name, "RESUME") == 0) {
      v->resume_ns = ev.ts_ns ? ev.ts_ns : realtime_ns();
    } else if (strcmp(ev.name, "SHUTDOWN") == 0) {
      const char *r = json_string_value(json_object_get(ev.data, "reason"));
      snprintf(v->shutdown, sizeof v->shutdown, "%s", r ? r : "shutdown");
    }
    qmp_event_clear(&ev);
  }
}

/* __fn: v->lock held.  A working connection to rt's process. */
static int qvm_connect(struct qvm *v, const struct vm_runtime *rt, char *err, size_t errlen)
{
  if (v->q && !qmp_broken(v->q) && v->q_pid == rt->pid)
    return 0;
  qvm_disconnect(v);
  char why[512];
  v->q = qmp_connect(rt->control_path, CONNECT_TIMEOUT_MS, why, sizeof why);
  if (!v->q) {
    set_err(err, errlen, "VM '%s' (pid %d) does not answer on QMP: %s", rt->spec->name,
            (int)rt->pid, why);
    return -EIO;
  }
  v->q_pid = rt->pid;
  return 0;
}

/* __fn: v->lock held.  One QMP command on v (connecting first if needed);
 * the events that came with it are taken in. */
static int qvm_cmd(struct qvm *v, const struct vm_runtime *rt, const char *cmd, json_t *args,
                   json_t **ret, char *err, size_t errlen)
{
  if (ret)
    *ret = NULL;
  int r = qvm_connect(v, rt, err, errlen);
  if (r < 0)
    return r;
  char why[512];
  r = qmp_execute(v->q, cmd, args, ret, why, sizeof why);
  qvm_take_events(v);
  if (r == -EREMOTEIO) {
    set_err(err, errlen, "VM '%s': QEMU refused %s: %s", rt->spec->name, cmd, why);
    return -EIO;
  }
  if (r < 0) {
    set_err(err, errlen, "VM '%s': %s: %s", rt->spec->name, cmd, why);
    qvm_disconnect(v);     /* unusable now; the next op connects again */
    return r == -ENOMEM ? r : -EIO;
  }
  return 0;
}

/* __fn: v->lock held.  Reads the events QEMU sent meanwhile. */
static void qvm_poll(struct qvm *v)
{
  char why[256];
  if (v->q && qmp_poll_events(v->q, why, sizeof why) < 0) {
    qvm_take_events(v);
    qvm_disconnect(v);
    return;
  }
  qvm_take_events(v);
}

static void qemu_release(struct vm_runtime *rt)
{
  pthread_mutex_lock(&qvms_lock);
  for (struct qvm *v = qvms; v; v = v->next) {
    if (strcmp(v->path, rt->control_path) != 0)
      continue;
    v->released = true;
    if (v->refs == 0) {
      qvm_unlink(v);
      qvm_free(v);
    }
    break;
  }
  pthread_mutex_unlock(&qvms_lock);
}

/* ---- the command line ---- */

struct args {
  char *v[MAX_ARGS + 1];
  unsigned n;
  bool oom;
};

static void arg(struct args *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void arg(struct args *a, const char *fmt, ...)
{
  if (a->n >= MAX_ARGS) {
    a->oom = true;
    return;
  }
  va_list ap;
  va_start(ap, fmt);
  char *s = NULL;
  if (vasprintf(&s, fmt, ap) < 0)
    s = NULL;
  va_end(ap);
  if (!s)
    a->oom = true;
  else
    a->v[a->n++] = s;
}

static void args_free(struct args *a)
{
  for (unsigned i = 0; i < a->n; i++)
    free(a->v[i]);
  a->n = 0;
}

/* QEMU's option syntax splits at commas; a comma in a value is doubled. */
static void opt_escape(const char *in, char *out, size_t len)
{
  size_t o = 0;
  for (; *in && o + 2 < len; in++) {
    out[o++] = *in;
    if (*in == ',')
      out[o++] = ',';
  }
  out[o] = '\0';
}

/* The -qmp argument, also what alive() looks for in /proc/PID/cmdline. */
static void qmp_arg(const struct vm_runtime *rt, char *out, size_t len)
{
  char esc[256];
  opt_escape(rt->control_path, esc, sizeof esc);
  snprintf(out, len, "unix:%s,server=on,wait=off", esc);
}

static void file_in_dir(const struct vm_runtime *rt, const char *name, char *out, size_t len)
{
  snprintf(out, len, "%s/%s", rt->dir, name);
}

/* An NBD URI as ferryd's listener makes them (nbd_listener_uri) as a
 * -blockdev JSON "server" plus export name. */
static int nbd_uri_blockdev(const char *uri, const char *node, json_t **out, char *err,
                            size_t errlen)
{
  json_t *server = NULL;
  const char *export = NULL;
  size_t exlen = 0;
  if (strncmp(uri, "nbd+unix:///", 12) == 0) {
    const char *q = strstr(uri, "?socket=");
    if (!q) {
      set_err(err, errlen, "NBD URI %s has no socket", uri);
      return -EINVAL;
    }
    export = uri + 12;
    exlen = (size_t)(q - export);
    server = json_pack("{s:s, s:s}", "type", "unix", "path", q + 8);
  } else if (strncmp(uri, "nbd://", 6) == 0) {
    const char *h = uri + 6, *slash = strchr(h, '/');
    if (!slash) {
      set_err(err, errlen, "NBD URI %s has no export name", uri);
      return -EINVAL;
    }
    const char *colon = NULL;
    char host[256];
    if (*h == '[') {
      const char *rb = memchr(h, ']', (size_t)(slash - h));
      if (!rb || rb[1] != ':') {
        set_err(err, errlen, "bad NBD URI %s", uri);
        return -EINVAL;
      }
      snprintf(host, sizeof host, "%.*s", (int)(rb - h - 1), h + 1);
      colon = rb + 1;
    } else {
      colon = memchr(h, ':', (size_t)(slash - h));
      if (!colon) {
        set_err(err, errlen, "bad NBD URI %s (no port)", uri);
        return -EINVAL;
      }
      snprintf(host, sizeof host, "%.*s", (int)(colon - h), h);
    }
    char port[16];
    snprintf(port, sizeof port, "%.*s", (int)MIN((size_t)(slash - colon - 1), sizeof port - 1),
             colon + 1);
    server = json_pack("{s:s, s:s, s:s}", "type", "inet", "host", host, "port", port);
    export = slash + 1;
    exlen = strlen(export);
  } else {
    set_err(err, errlen, "NBD URI %s is not nbd+unix:// or nbd://", uri);
    return -EINVAL;
  }
  /* reconnect-delay: while ferryd restarts, the guest's IO waits instead of
   * failing (ferryd comes back on the same socket). */
  json_t *file = json_pack("{s:s, s:o, s:s#, s:i}", "driver", "nbd", "server", server, "export",
                           export, (int)exlen, "reconnect-delay", 300);
  *out = json_pack("{s:s, s:s, s:{s:b}, s:o}", "driver", "raw", "node-name", node, "cache",
                   "direct", true, "file", file);
  return *out ? 0 : -ENOMEM;
}

struct launch {
  bool paused;
  const char *incoming;          /* "defer" for -incoming defer, else NULL */
};

static int build_args(const struct vm_runtime *rt, const char *program,
                      const struct vm_kvm_status *kvm, const struct launch *l, struct args *a,
                      char *err, size_t errlen)
{
  const struct vm_spec *s = rt->spec;
  char esc[PATH_MAX * 2], path[PATH_MAX], qarg[400];
  const char *accel = kvm->usable ? "kvm" : "tcg";
  const char *cpu = s->cpu_model[0] ? s->cpu_model : kvm->usable ? "host" : "qemu64";
  if (strcmp(cpu, "host") == 0 && !kvm->usable) {
    set_err(err, errlen, "VM '%s': CPU model 'host' needs KVM, which is unusable here (%s): "
            "choose a model such as qemu64 (--cpu-model)", s->name, kvm->why);
    return -EINVAL;
  }
  arg(a, "%s", program);
  arg(a, "-name");
  arg(a, "%s", s->name);
  arg(a, "-nodefaults");
  arg(a, "-no-user-config");
  arg(a, "-display");
  arg(a, "none");
  arg(a, "-machine");
  arg(a, "%s,accel=%s", s->machine[0] ? s->machine : "q35", accel);
  arg(a, "-cpu");
  arg(a, "%s", cpu);
  arg(a, "-m");
  arg(a, "%lluM", (unsigned long long)((s->memory_bytes ? s->memory_bytes : 1ull << 30) >> 20));
  arg(a, "-smp");
  arg(a, "%u", s->cpus ? s->cpus : 1);
  qmp_arg(rt, qarg, sizeof qarg);
  arg(a, "-qmp");
  arg(a, "%s", qarg);
  opt_escape(rt->log_path, esc, sizeof esc);
  arg(a, "-chardev");
  arg(a, "file,id=serial0,path=%s,append=on", esc);
  arg(a, "-serial");
  arg(a, "chardev:serial0");
  file_in_dir(rt, "qemu.pid", path, sizeof path);
  arg(a, "-pidfile");
  arg(a, "%s", path);
  for (unsigned i = 0; i < s->ndisks; i++) {
    char node[16];
    snprintf(node, sizeof node, "drive%u", i);
    json_t *bd = NULL;
    int r = nbd_uri_blockdev(rt->disk_uris[i], node, &bd, err, errlen);
    if (r < 0)
      return r;
    char *text = json_dumps(bd, JSON_COMPACT);
    json_decref(bd);
    if (!text)
      return -ENOMEM;
    arg(a, "-blockdev");
    arg(a, "%s", text);
    free(text);
    arg(a, "-device");
    arg(a, "virtio-blk-pci,drive=%s,id=disk%u,bootindex=%u", node, i, i + 1);
  }
  for (unsigned i = 0; i < s->nnics; i++) {
    const struct vm_netdev *n = &rt->netdevs[i];
    arg(a, "-netdev");
    if (strcmp(n->type, "bridge") == 0)
      arg(a, "bridge,id=net%u,br=%s", i, n->bridge);
    else
      arg(a, "user,id=net%u", i);
    arg(a, "-device");
    arg(a, "%s,netdev=net%u,mac=%s,id=nic%u", s->nics[i].model[0] ? s->nics[i].model
                                                                   : "virtio-net-pci",
        i, s->nics[i].mac, i);
  }
  if (s->kernel[0]) {
    arg(a, "-kernel");
    arg(a, "%s", s->kernel);
    if (s->initrd[0]) {
      arg(a, "-initrd");
      arg(a, "%s", s->initrd);
    }
    if (s->append[0]) {
      arg(a, "-append");
      arg(a, "%s", s->append);
    }
  }
  if (l->paused && !l->incoming)
    arg(a, "-S");
  if (l->incoming) {
    arg(a, "-incoming");
    arg(a, "%s", l->incoming);
  }
  if (a->oom) {
    set_err(err, errlen, "out of memory (or too many QEMU arguments)");
    return -ENOMEM;
  }
  a->v[a->n] = NULL;
  return 0;
}

/* ---- process ---- */

#define CMDLINE_MAX 65536

/* The NUL-separated argv of pid, malloc'ed (NUL-terminated); its length in
 * *n.  NULL if pid is gone or unreadable. */
static char *read_cmdline(pid_t pid, ssize_t *n)
{
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return NULL;
  char *buf = malloc(CMDLINE_MAX);
  *n = buf ? read(fd, buf, CMDLINE_MAX - 1) : -1;
  close(fd);
  if (*n <= 0) {
    free(buf);
    return NULL;
  }
  buf[*n] = '\0';
  return buf;
}

/* The argument after opt in pid's command line ("" if none). */
static void cmdline_value(pid_t pid, const char *opt, char *out, size_t len)
{
  out[0] = '\0';
  ssize_t n;
  char *buf = read_cmdline(pid, &n);
  for (ssize_t i = 0; buf && i < n; i += (ssize_t)strlen(buf + i) + 1) {
    ssize_t next = i + (ssize_t)strlen(buf + i) + 1;
    if (strcmp(buf + i, opt) == 0 && next < n) {
      snprintf(out, len, "%s", buf + next);
      break;
    }
  }
  free(buf);
}

static bool qemu_alive(struct vm_runtime *rt, pid_t pid)
{
  if (pid <= 0 || kill(pid, 0) < 0)
    return false;
  ssize_t n;
  char *buf = read_cmdline(pid, &n);
  char want[400];
  qmp_arg(rt, want, sizeof want);
  bool ours = false;
  for (ssize_t i = 0; buf && i < n && !ours; i += (ssize_t)strlen(buf + i) + 1)
    ours = strcmp(buf + i, want) == 0;
  free(buf);
  return ours;
}

/* Waits for pid to go (reaps it if it is our child). */
static bool wait_gone(pid_t pid, unsigned timeout_ms, int *status)
{
  uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000;
  for (;;) {
    pid_t w = waitpid(pid, status, WNOHANG);
    if (w == pid || (w < 0 && errno == ECHILD && vm_pid_gone(pid)))
      return true;
    if (!ms_left(deadline))
      return false;
    usleep(10 * 1000);
  }
}

static void qemu_log_path(const struct vm_runtime *rt, char *out, size_t len)
{
  file_in_dir(rt, "qemu.log", out, len);
}

static int spawn(struct vm_runtime *rt, const struct launch *l, char *err, size_t errlen)
{
  const struct vm_spec *s = rt->spec;
  char program[PATH_MAX];
  if (vm_find_program(rt->program, program, sizeof program) < 0) {
    set_err(err, errlen, "QEMU program '%s' not found (ferryd --qemu PATH)", rt->program);
    return -EIO;
  }
  struct vm_kvm_status kvm;
  vm_kvm_check(false, &kvm);
  struct args a = { .n = 0 };
  int r = build_args(rt, program, &kvm, l, &a, err, errlen);
  if (r < 0) {
    args_free(&a);
    return r;
  }
  char qlog[PATH_MAX];
  qemu_log_path(rt, qlog, sizeof qlog);
  int logfd = open(qlog, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  if (logfd < 0) {
    set_err(err, errlen, "cannot open %s: %s", qlog, strerror(errno));
    args_free(&a);
    return -EIO;
  }
  /* The command line goes first into qemu.log: what ran is on record. */
  dprintf(logfd, "---- ferryd starts QEMU:");
  for (unsigned i = 0; i < a.n; i++)
    dprintf(logfd, " %s", a.v[i]);
  dprintf(logfd, "\n");
  unlink(rt->control_path);          /* a stale socket of a QEMU that died */
  pid_t pid = vm_spawn(program, a.v, logfd, err, errlen);
  if (pid < 0) {
    close(logfd);
    args_free(&a);
    return (int)pid;
  }
  close(logfd);
  args_free(&a);
  rt->pid = pid;
  if (!kvm.usable)
    log_warn(NULL, "VM '%s': KVM unusable (%s): using TCG, expect slow guests", s->name, kvm.why);

  /* Ready when QMP answers. */
  struct qvm *v = qvm_get(rt);
  if (!v) {
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    rt->pid = 0;
    set_err(err, errlen, "out of memory");
    return -ENOMEM;
  }
  qvm_disconnect(v);
  v->stop_ns = v->resume_ns = v->mig_stop_ns = 0;
  v->migrating = false;
  v->shutdown[0] = '\0';
  uint64_t deadline = now_ns() + (uint64_t)START_TIMEOUT_MS * 1000000;
  char why[512] = "";
  for (;;) {
    int status;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      char tail[480];
      vm_log_tail(qlog, tail, sizeof tail);
      set_err(err, errlen, "QEMU of VM '%s' exited at start (%s %d): %s", s->name,
              WIFEXITED(status) ? "status" : "signal",
              WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status), tail);
      rt->pid = 0;
      qvm_put(v);
      return -EIO;
    }
    if ((v->q = qmp_connect(rt->control_path, 200, why, sizeof why))) {
      v->q_pid = pid;
      break;
    }
    if (!ms_left(deadline)) {
      kill(pid, SIGKILL);
      waitpid(pid, NULL, 0);
      rt->pid = 0;
      set_err(err, errlen, "QEMU of VM '%s' did not answer on QMP within %d s: %s", s->name,
              START_TIMEOUT_MS / 1000, why);
      qvm_put(v);
      return -ETIMEDOUT;
    }
    usleep(20 * 1000);
  }
  qvm_put(v);
  log_info(NULL, "VM '%s': QEMU pid %d (%s, %s)", s->name, (int)pid, kvm.usable ? "kvm" : "tcg",
           l->incoming ? "incoming" : l->paused ? "paused" : "running");
  return 0;
}

static int qemu_start(struct vm_runtime *rt, bool paused, char *err, size_t errlen)
{
  struct launch l = { .paused = paused };
  return spawn(rt, &l, err, errlen);
}

static const char *run_state(const char *qemu_status)
{
  if (strcmp(qemu_status, "running") == 0)
    return "running";
  if (strcmp(qemu_status, "paused") == 0 || strcmp(qemu_status, "prelaunch") == 0)
    return "paused";
  return qemu_status;
}

/* __fn: v->lock held.  QEMU's run state ("running", "paused", ...). */
static int query_status(struct qvm *v, struct vm_runtime *rt, char *out, size_t len, char *err,
                        size_t errlen)
{
  json_t *ret = NULL;
  int r = qvm_cmd(v, rt, "query-status", NULL, &ret, err, errlen);
  if (r == 0) {
    const char *st = json_string_value(json_object_get(ret, "status"));
    snprintf(out, len, "%s", st ? st : "?");
  }
  json_decref(ret);
  return r;
}

/* Asks QEMU to quit, then waits; SIGKILL if it will not.  v is not held. */
static int quit_and_wait(struct vm_runtime *rt, char *err, size_t errlen)
{
  const char *name = rt->spec->name;
  struct qvm *v = qvm_get(rt);
  char why[512] = "";
  int r = v ? qvm_cmd(v, rt, "quit", NULL, NULL, why, sizeof why) : -ENOMEM;
  if (v)
    qvm_put(v);
  int status = 0;
  if (r == 0 && wait_gone(rt->pid, QUIT_TIMEOUT_MS, &status))
    return 0;
  if (!qemu_alive(rt, rt->pid) && wait_gone(rt->pid, 100, &status))
    return 0;
  log_warn(NULL, "VM '%s': QEMU (pid %d) did not quit (%s); killing it", name, (int)rt->pid,
           r ? why : "still running");
  kill(rt->pid, SIGKILL);
  if (!wait_gone(rt->pid, KILL_TIMEOUT_MS, &status)) {
    set_err(err, errlen, "QEMU of VM '%s' (pid %d) does not exit", name, (int)rt->pid);
    return -EIO;
  }
  return 0;
}

static int qemu_stop(struct vm_runtime *rt, char *err, size_t errlen)
{
  if (!rt->pid || !qemu_alive(rt, rt->pid))
    return 0;
  const char *name = rt->spec->name;
  unsigned timeout = rt->stop_timeout_ms ? rt->stop_timeout_ms : DEFAULT_STOP_TIMEOUT_MS;
  struct qvm *v = qvm_get(rt);
  if (!v)
    return quit_and_wait(rt, err, errlen);
  char st[32] = "", why[512] = "";
  int r = query_status(v, rt, st, sizeof st, why, sizeof why);
  bool powerdown = false;
  if (r == 0 && (strcmp(st, "running") == 0 || strcmp(st, "paused") == 0)) {
    /* A paused guest cannot act on the power button: it runs again first. */
    if (strcmp(st, "paused") == 0)
      r = qvm_cmd(v, rt, "cont", NULL, NULL, why, sizeof why);
    if (r == 0)
      r = qvm_cmd(v, rt, "system_powerdown", NULL, NULL, why, sizeof why);
    powerdown = r == 0;
  }
  qvm_put(v);
  int status = 0;
  if (powerdown) {
    if (wait_gone(rt->pid, timeout, &status)) {
      log_info(NULL, "VM '%s': the guest powered down", name);
      return 0;
    }
    log_warn(NULL, "VM '%s': the guest did not power down within %u ms; quitting QEMU", name,
             timeout);
  } else {
    log_info(NULL, "VM '%s': QEMU is %s%s%s: quitting it without a guest powerdown", name,
             st[0] ? st : "not answering", r ? ": " : "", r ? why : "");
  }
  return quit_and_wait(rt, err, errlen);
}

static int qemu_quit(struct vm_runtime *rt, char *err, size_t errlen)
{
  if (!rt->pid || !qemu_alive(rt, rt->pid))
    return 0;
  return quit_and_wait(rt, err, errlen);
}

/* One command, no reply kept. */
static int simple(struct vm_runtime *rt, const char *cmd, json_t *args, char *err, size_t errlen)
{
  struct qvm *v = qvm_get(rt);
  if (!v) {
    set_err(err, errlen, "out of memory");
    return -ENOMEM;
  }
  int r = qvm_cmd(v, rt, cmd, args, NULL, err, errlen);
  qvm_put(v);
  return r;
}

static int qemu_pause(struct vm_runtime *rt, char *err, size_t errlen)
{
  /* `stop` returns with the vCPUs stopped and the block layer drained. */
  return simple(rt, "stop", NULL, err, errlen);
}

static int qemu_resume(struct vm_runtime *rt, char *err, size_t errlen)
{
  return simple(rt, "cont", NULL, err, errlen);
}

static int qemu_status(struct vm_runtime *rt, json_t **out, char *err, size_t errlen)
{
  struct qvm *v = qvm_get(rt);
  if (!v) {
    set_err(err, errlen, "out of memory");
    return -ENOMEM;
  }
  char st[32];
  int r = query_status(v, rt, st, sizeof st, err, errlen);
  json_t *kvm = NULL;
  if (r == 0)
    qvm_cmd(v, rt, "query-kvm", NULL, &kvm, err, errlen);
  const char *version = v->q ? qmp_version(v->q) : "";
  if (r == 0) {
    char machine[64], cpu[64];
    cmdline_value(rt->pid, "-machine", machine, sizeof machine);
    cmdline_value(rt->pid, "-cpu", cpu, sizeof cpu);
    char *comma = strchr(machine, ',');
    if (comma)
      *comma = '\0';
    *out = json_pack("{s:s, s:s, s:I, s:s, s:s, s:s, s:s, s:s}", "state", run_state(st),
                     "qemu_status", st, "pid", (json_int_t)rt->pid, "accel",
                     json_is_true(json_object_get(kvm, "enabled")) ? "kvm" : "tcg",
                     "machine", machine, "cpu_model", cpu, "qemu_version", version, "qmp",
                     rt->control_path);
  }
  json_decref(kvm);
  qvm_put(v);
  return r;
}

static int qemu_validate(const char *workload, char *err, size_t errlen)
{
  if (workload && workload[0]) {
    set_err(err, errlen, "a qemu VM has no workload: its guest does its own IO");
    return -EINVAL;
  }
  return 0;
}

static int qemu_verify(struct vm_runtime *rt, json_t **report, char *err, size_t errlen)
{
  set_err(err, errlen, "the qemu driver cannot check a guest's data; use the guest's own check");
  return -EOPNOTSUPP;
}

static int qemu_set_workload(struct vm_runtime *rt, const char *workload, char *err,
                             size_t errlen)
{
  return qemu_validate(workload, err, errlen);
}

static int qemu_save_state(struct vm_runtime *rt, char *err, size_t errlen)
{
  return 0;      /* nothing to save: RAM moves by QEMU's migration */
}

/* ---- live migration ---- */

static bool migration_running(const char *st)
{
  static const char *const active[] = { "setup", "active", "pre-switchover", "device",
                                        "postcopy-active", "postcopy-paused",
                                        "postcopy-recover", "cancelling", "wait-unplug",
                                        "colo", NULL };
  for (const char *const *a = active; *a; a++)
    if (strcmp(st, *a) == 0)
      return true;
  return false;
}

/* __fn: v->lock held.  query-migrate's status ("none" before any). */
static int migrate_state(struct qvm *v, struct vm_runtime *rt, json_t **ret, char *st,
                         size_t len, char *err, size_t errlen)
{
  json_t *r = NULL;
  int e = qvm_cmd(v, rt, "query-migrate", NULL, &r, err, errlen);
  if (e == 0) {
    const char *s = json_string_value(json_object_get(r, "status"));
    snprintf(st, len, "%s", s ? s : "none");
  }
  if (ret)
    *ret = r;
  else
    json_decref(r);
  return e;
}

static int set_capabilities(struct qvm *v, struct vm_runtime *rt, bool source, char *err,
                            size_t errlen)
{
  json_t *caps = json_pack("[{s:s, s:b}]", "capability", "events", "state", true);
  if (source)
    json_array_append_new(caps, json_pack("{s:s, s:b}", "capability", "pause-before-switchover",
                                          "state", true));
  json_t *args = json_pack("{s:o}", "capabilities", caps);
  int r = qvm_cmd(v, rt, "migrate-set-capabilities", args, NULL, err, errlen);
  json_decref(args);
  return r;
}

static int qemu_migrate_out_start(struct vm_runtime *rt, const char *uri, char *err,
                                  size_t errlen)
{
  struct qvm *v = qvm_get(rt);
  if (!v) {
    set_err(err, errlen, "out of memory");
    return -ENOMEM;
  }
  char st[32];
  int r = migrate_state(v, rt, NULL, st, sizeof st, err, errlen);
  if (r == 0 && migration_running(st)) {
    set_err(err, errlen, "VM '%s': a QEMU migration is already %s", rt->spec->name, st);
    r = -EBUSY;
  }
  if (r == 0)
    r = set_capabilities(v, rt, true, err, errlen);
  if (r == 0) {
    json_t *p = json_pack("{s:I}", "max-bandwidth", (json_int_t)MIGRATE_MAX_BANDWIDTH);
    r = qvm_cmd(v, rt, "migrate-set-parameters", p, NULL, err, errlen);
    json_decref(p);
  }
  if (r == 0) {
    /* A STOP from before (an operator's pause) is not the cutover's. */
    qvm_poll(v);
    v->migrating = true;
    v->mig_stop_ns = 0;
    json_t *args = json_pack("{s:s}", "uri", uri);
    r = qvm_cmd(v, rt, "migrate", args, NULL, err, errlen);
    json_decref(args);
    if (r < 0)
      v->migrating = false;
  }
  qvm_put(v);
  if (r == 0)
    log_info(NULL, "VM '%s': QEMU migrates its RAM to %s", rt->spec->name, uri);
  return r;
}

static int qemu_migrate_out_status(struct vm_runtime *rt, json_t **info, char *err,
                                   size_t errlen)
{
  struct qvm *v = qvm_get(rt);
  if (!v) {
    set_err(err, errlen, "out of memory");
    return -ENOMEM;
  }
  json_t *ret = NULL;
  char st[32];
  int r = migrate_state(v, rt, &ret, st, sizeof st, err, errlen);
  if (r == 0) {
    qvm_poll(v);
    json_t *j = json_pack("{s:s, s:I}", "status", st, "stopped_at_ns",
                          (json_int_t)(v->migrating ? v->mig_stop_ns : 0));
    json_t *ram = json_object_get(ret, "ram");
    if (json_is_object(ram)) {
      json_t *o = json_object();
      static const char *const keys[] = { "transferred", "remaining", "total" };
      for (size_t i = 0; i < ARRAY_SIZE(keys); i++) {
        json_t *x = json_object_get(ram, keys[i]);
        if (json_is_integer(x))
          json_object_set(o, keys[i], x);
      }
      json_object_set_new(j, "ram", o);
    }
    const char *e = json_string_value(json_object_get(ret, "error-desc"));
    if (e)
      json_object_set_new(j, "error", json_string(e));
    *info = j;
  }
  json_decref(ret);
  qvm_put(v);
  return r;
}

static int qemu_migrate_out_continue(struct vm_runtime *rt, char *err, size_t errlen)
{
  json_t *args = json_pack("{s:s}", "state", "pre-switchover");
  int r = simple(rt, "migrate-continue", args, err, errlen);
  json_decref(args);
  return r;
}

static int qemu_migrate_out_cancel(struct vm_runtime *rt, char *err, size_t errlen)
{
  const char *name = rt->spec->name;
  struct qvm *v = qvm_get(rt);
  if (!v) {
    set_err(err, errlen, "out of memory");
    return -ENOMEM;
  }
  char st[32];
  int r = migrate_state(v, rt, NULL, st, sizeof st, err, errlen);
  if (r == 0 && strcmp(st, "completed") == 0) {
    set_err(err, errlen, "VM '%s': QEMU's migration has completed: the guest runs at the "
            "destination", name);
    r = -EBUSY;
  }
  if (r == 0 && migration_running(st)) {
    r = qvm_cmd(v, rt, "migrate_cancel", NULL, NULL, err, errlen);
    uint64_t deadline = now_ns() + (uint64_t)CANCEL_TIMEOUT_MS * 1000000;
    while (r == 0 && (r = migrate_state(v, rt, NULL, st, sizeof st, err, errlen)) == 0 &&
           migration_running(st) && ms_left(deadline)) {
      pthread_mutex_unlock(&v->lock);
      usleep(10 * 1000);
      pthread_mutex_lock(&v->lock);
    }
    if (r == 0 && migration_running(st)) {
      set_err(err, errlen, "VM '%s': QEMU's migration is still %s %d s after migrate_cancel",
              name, st, CANCEL_TIMEOUT_MS / 1000);
      r = -ETIMEDOUT;
    }
    if (r == 0 && strcmp(st, "completed") == 0) {
      set_err(err, errlen, "VM '%s': QEMU's migration completed before the cancel took: the "
              "guest runs at the destination", name);
      r = -EBUSY;
    }
  }
  if (r == 0) {
    v->migrating = false;
    /* QEMU 7.2 restarts a guest that ran before the migration when it is
     * cancelled (or fails); make sure of it. */
    char rs[32];
    r = query_status(v, rt, rs, sizeof rs, err, errlen);
    if (r == 0 && rt->was_running && strcmp(rs, "running") != 0) {
      log_info(NULL, "VM '%s': QEMU is %s after migrate_cancel: cont", name, rs);
      r = qvm_cmd(v, rt, "cont", NULL, NULL, err, errlen);
    }
  }
  qvm_put(v);
  if (r == 0)
    log_info(NULL, "VM '%s': QEMU's migration cancelled (%s); the guest stays here", name, st);
  return r;
}

static int qemu_start_incoming(struct vm_runtime *rt, const char *uri, char *err, size_t errlen)
{
  struct launch l = { .incoming = "defer" };
  int r = spawn(rt, &l, err, errlen);
  if (r < 0)
    return r;
  struct qvm *v = qvm_get(rt);
  if (!v) {
    r = -ENOMEM;
    set_err(err, errlen, "out of memory");
  } else {
    r = set_capabilities(v, rt, false, err, errlen);
    if (r == 0) {
      json_t *args = json_pack("{s:s}", "uri", uri);
      r = qvm_cmd(v, rt, "migrate-incoming", args, NULL, err, errlen);
      json_decref(args);
    }
    qvm_put(v);
  }
  if (r < 0) {
    kill(rt->pid, SIGKILL);
    int status;
    wait_gone(rt->pid, KILL_TIMEOUT_MS, &status);
    rt->pid = 0;
    return r;
  }
  log_info(NULL, "VM '%s': QEMU waits for its RAM on %s", rt->spec->name, uri);
  return 0;
}

static int qemu_incoming_status(struct vm_runtime *rt, json_t **info, char *err, size_t errlen)
{
  if (!rt->pid || !qemu_alive(rt, rt->pid)) {
    char qlog[PATH_MAX], tail[480];
    qemu_log_path(rt, qlog, sizeof qlog);
    vm_log_tail(qlog, tail, sizeof tail);
    *info = json_pack("{s:s, s:b, s:I, s:b, s:s}", "status", "none", "running", false,
                      "resumed_at_ns", (json_int_t)0, "exited", true, "exit_reason",
                      tail[0] ? tail : "QEMU is not running");
    return 0;
  }
  struct qvm *v = qvm_get(rt);
  if (!v) {
    set_err(err, errlen, "out of memory");
    return -ENOMEM;
  }
  char st[32], rs[32];
  int r = migrate_state(v, rt, NULL, st, sizeof st, err, errlen);
  if (r == 0)
    r = query_status(v, rt, rs, sizeof rs, err, errlen);
  if (r == 0) {
    qvm_poll(v);
    bool running = strcmp(rs, "running") == 0;
    *info = json_pack("{s:s, s:b, s:I, s:b, s:s}", "status", st, "running", running,
                      "resumed_at_ns", (json_int_t)v->resume_ns, "exited", false,
                      "qemu_status", rs);
  }
  qvm_put(v);
  return r;
}

const struct vm_driver_ops vm_driver_qemu = {
  .name = "qemu",
  .control_ext = "qmp",
  .has_state_file = false,
  .validate = qemu_validate,
  .start = qemu_start,
  .stop = qemu_stop,
  .pause = qemu_pause,
  .resume = qemu_resume,
  .status = qemu_status,
  .verify = qemu_verify,
  .set_workload = qemu_set_workload,
  .save_state = qemu_save_state,
  .alive = qemu_alive,
  .quit = qemu_quit,
  .migrate_out_start = qemu_migrate_out_start,
  .migrate_out_status = qemu_migrate_out_status,
  .migrate_out_continue = qemu_migrate_out_continue,
  .migrate_out_cancel = qemu_migrate_out_cancel,
  .start_incoming = qemu_start_incoming,
  .incoming_status = qemu_incoming_status,
  .release = qemu_release,
};
