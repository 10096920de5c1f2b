/* sim: the `sim` hypervisor driver, a client of ferry-simvm (docs/simvm.md).
 *
 * The VM process is ferry-simvm, started in its own session (setsid) with
 * its output appended to the console log, so it outlives ferryd.  It is
 * driven over its control socket: one JSON request per line, one JSON reply
 * per line.  Each request opens its own connection, which keeps the driver
 * stateless and lets a restarted ferryd talk to a VM an earlier one started.
 *
 * Liveness: a pid is only taken for the VM if /proc/PID/cmdline is
 * ferry-simvm with this VM's control socket, so a recycled pid is never
 * signalled. */
#include "vm/driver.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "vm/simvm/workload.h"

#define START_TIMEOUT_MS   15000
#define REQUEST_TIMEOUT_MS 10000
#define PAUSE_TIMEOUT_MS   120000     /* a paused VM drains IO that may wait on a link */
#define VERIFY_TIMEOUT_MS  (30 * 60 * 1000)
#define STOP_TIMEOUT_MS    15000
#define MAX_REPLY          (1024 * 1024)

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

/* One request on a new connection to the control socket. */
static int ctl_request(const struct vm_runtime *rt, json_t *req, json_t **reply,
                       unsigned timeout_ms, char *err, size_t errlen)
{
  *reply = NULL;
  const char *name = rt->spec->name;
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  if (strlen(rt->control_path) >= sizeof sa.sun_path) {
    set_err(err, errlen, "control socket path %s is too long", rt->control_path);
    return -ENAMETOOLONG;
  }
  strcpy(sa.sun_path, rt->control_path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    set_err(err, errlen, "socket: %s", strerror(errno));
    return -errno;
  }
  char *line = json_dumps(req, JSON_COMPACT);
  char *buf = NULL;
  int ret;
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    ret = -errno;
    set_err(err, errlen, "VM '%s' does not answer on %s: %s", name, rt->control_path,
            strerror(errno));
    goto out;
  }
  if (!line || write_full(fd, line, strlen(line)) < 0 || write_full(fd, "\n", 1) < 0) {
    ret = -EIO;
    set_err(err, errlen, "VM '%s': cannot send a request: %s", name, strerror(errno));
    goto out;
  }
  size_t len = 0, cap = 4096;
  buf = malloc(cap);
  uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000;
  for (;;) {
    struct pollfd p = { .fd = fd, .events = POLLIN };
    int left = ms_left(deadline);
    int pr = left ? poll(&p, 1, left) : 0;
    if (pr < 0 && errno == EINTR)
      continue;
    if (pr <= 0) {
      ret = -ETIMEDOUT;
      set_err(err, errlen, "VM '%s' did not answer within %u s", name, timeout_ms / 1000);
      goto out;
    }
    if (len + 1 >= cap) {
      if (cap >= MAX_REPLY) {
        ret = -EPROTO;
        set_err(err, errlen, "VM '%s': reply longer than %d bytes", name, MAX_REPLY);
        goto out;
      }
      cap *= 2;
      char *nb = realloc(buf, cap);
      if (!nb) {
        ret = -ENOMEM;
        set_err(err, errlen, "out of memory");
        goto out;
      }
      buf = nb;
    }
    ssize_t n = read(fd, buf + len, cap - len - 1);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      ret = -EPIPE;
      set_err(err, errlen, "VM '%s' closed its control connection without a reply", name);
      goto out;
    }
    len += (size_t)n;
    if (memchr(buf, '\n', len))
      break;
  }
  buf[len] = '\0';
  json_error_t je;
  json_t *j = json_loadb(buf, strcspn(buf, "\n"), 0, &je);
  if (!json_is_object(j)) {
    json_decref(j);
    ret = -EPROTO;
    set_err(err, errlen, "VM '%s': bad reply: %s", name, je.text);
    goto out;
  }
  if (!json_is_true(json_object_get(j, "ok"))) {
    const char *e = json_string_value(json_object_get(j, "error"));
    set_err(err, errlen, "VM '%s': %s", name, e ? e : "request refused");
    json_decref(j);
    ret = -EIO;
    goto out;
  }
  *reply = j;
  ret = 0;
out:
  free(line);
  free(buf);
  close(fd);
  return ret;
}

static int ctl_simple(const struct vm_runtime *rt, const char *cmd, unsigned timeout_ms,
                      json_t **reply, char *err, size_t errlen)
{
  json_t *req = json_pack("{s:s}", "cmd", cmd);
  json_t *r = NULL;
  int ret = ctl_request(rt, req, &r, timeout_ms, err, errlen);
  json_decref(req);
  if (reply)
    *reply = r;
  else
    json_decref(r);
  return ret;
}

/* ---- workload ---- */

static int sim_validate(const char *w, char *err, size_t errlen)
{
  if (!w || !*w)
    return 0;
  /* The same parser ferry-simvm runs, so a spec it would refuse at start is
   * refused here, before anything is stored. */
  struct workload wl;
  workload_default(&wl);
  char why[256];
  if (workload_parse(w, &wl, why, sizeof why) < 0) {
    set_err(err, errlen, "bad workload: %s", why);
    return -EINVAL;
  }
  return 0;
}

/* ---- process ---- */

static bool sim_alive(struct vm_runtime *rt, pid_t pid)
{
  if (pid <= 0 || kill(pid, 0) < 0)
    return false;
  char path[64], buf[4096];
  snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return false;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0)
    return false;
  buf[n] = '\0';
  /* argv is NUL-separated: look for the program and our control path. */
  bool prog = strstr(buf, "ferry-simvm") != NULL;
  bool ours = false;
  for (ssize_t i = 0; i < n; i += (ssize_t)strlen(buf + i) + 1)
    if (strcmp(buf + i, rt->control_path) == 0)
      ours = true;
  return prog && ours;
}

/* The last lines of the console log, for error messages. */
static void log_tail(const char *path, char *out, size_t len)
{
  out[0] = '\0';
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return;
  off_t size = lseek(fd, 0, SEEK_END);
  off_t from = size > 400 ? size - 400 : 0;
  char buf[401];
  ssize_t n = pread(fd, buf, sizeof buf - 1, from);
  close(fd);
  if (n <= 0)
    return;
  buf[n] = '\0';
  char *p = buf;
  if (from > 0 && (p = strchr(buf, '\n')))
    p++;
  else
    p = buf;
  for (char *q = p; *q; q++)
    if (*q == '\n')
      *q = ' ';
  snprintf(out, len, "%s", p);
}

static int sim_start(struct vm_runtime *rt, bool paused, char *err, size_t errlen)
{
  const struct vm_spec *s = rt->spec;
  const char *argv[16 + 2 * VM_MAX_DISKS];
  char diskargs[VM_MAX_DISKS][512];
  unsigned n = 0;
  argv[n++] = rt->program;
  argv[n++] = "run";
  argv[n++] = "--name";
  argv[n++] = s->name;
  argv[n++] = "--state";
  argv[n++] = rt->state_path;
  argv[n++] = "--control";
  argv[n++] = rt->control_path;
  for (unsigned i = 0; i < s->ndisks; i++) {
    snprintf(diskargs[i], sizeof diskargs[i], "%s=%s", s->disks[i], rt->disk_uris[i]);
    argv[n++] = "--disk";
    argv[n++] = diskargs[i];
  }
  if (s->workload[0]) {
    argv[n++] = "--workload";
    argv[n++] = s->workload;
  }
  if (access(rt->state_path, F_OK) != 0)
    argv[n++] = "--create";
  if (paused)
    argv[n++] = "--paused";
  argv[n] = NULL;

  if (access(rt->program, X_OK) != 0) {
    set_err(err, errlen, "cannot run %s: %s (ferryd --simvm PATH)", rt->program,
            strerror(errno));
    return -EIO;
  }
  int logfd = open(rt->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  if (logfd < 0) {
    set_err(err, errlen, "cannot open %s: %s", rt->log_path, strerror(errno));
    return -errno;
  }
  pid_t pid = vm_spawn(rt->program, (char *const *)argv, logfd, err, errlen);
  if (pid < 0) {
    close(logfd);
    return (int)pid;
  }
  close(logfd);
  rt->pid = pid;

  /* Ready when the control socket answers. */
  uint64_t deadline = now_ns() + (uint64_t)START_TIMEOUT_MS * 1000000;
  char cerr[256] = "";
  for (;;) {
    int status;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      char tail[420];
      log_tail(rt->log_path, tail, sizeof tail);
      set_err(err, errlen, "VM '%s' exited at start (%s %d): %s", s->name,
              WIFEXITED(status) ? "status" : "signal",
              WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status), tail);
      rt->pid = 0;
      return -EIO;
    }
    json_t *r = NULL;
    if (ctl_simple(rt, "status", 2000, &r, cerr, sizeof cerr) == 0) {
      json_decref(r);
      return 0;
    }
    if (!ms_left(deadline))
      break;
    usleep(50 * 1000);
  }
  kill(pid, SIGKILL);
  waitpid(pid, NULL, 0);
  rt->pid = 0;
  set_err(err, errlen, "VM '%s' did not answer within %d s of its start: %s", s->name,
          START_TIMEOUT_MS / 1000, cerr);
  return -ETIMEDOUT;
}

/* Waits for pid to go (reaps it if it is our child). */
static bool wait_gone(pid_t pid, unsigned timeout_ms)
{
  uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000;
  for (;;) {
    pid_t w = waitpid(pid, NULL, WNOHANG);
    if (w == pid || (w < 0 && errno == ECHILD && kill(pid, 0) < 0))
      return true;
    if (!ms_left(deadline))
      return false;
    usleep(20 * 1000);
  }
}

static int sim_stop(struct vm_runtime *rt, char *err, size_t errlen)
{
  if (!rt->pid || !sim_alive(rt, rt->pid))
    return 0;
  char cerr[256];
  int r = ctl_simple(rt, "stop", PAUSE_TIMEOUT_MS, NULL, cerr, sizeof cerr);
  if (r == 0 && wait_gone(rt->pid, STOP_TIMEOUT_MS))
    return 0;
  log_warn(NULL, "VM '%s' did not stop in an orderly way (%s); killing pid %d", rt->spec->name,
           r ? cerr : "still running", (int)rt->pid);
  kill(rt->pid, SIGKILL);
  if (!wait_gone(rt->pid, STOP_TIMEOUT_MS)) {
    set_err(err, errlen, "VM '%s' (pid %d) does not exit", rt->spec->name, (int)rt->pid);
    return -EIO;
  }
  return 0;
}

static int sim_pause(struct vm_runtime *rt, char *err, size_t errlen)
{
  return ctl_simple(rt, "pause", PAUSE_TIMEOUT_MS, NULL, err, errlen);
}

static int sim_resume(struct vm_runtime *rt, char *err, size_t errlen)
{
  return ctl_simple(rt, "resume", REQUEST_TIMEOUT_MS, NULL, err, errlen);
}

static int sim_status(struct vm_runtime *rt, json_t **out, char *err, size_t errlen)
{
  json_t *r = NULL;
  int ret = ctl_simple(rt, "status", REQUEST_TIMEOUT_MS, &r, err, errlen);
  if (ret == 0) {
    json_object_del(r, "ok");
    *out = r;
  }
  return ret;
}

static int sim_save_state(struct vm_runtime *rt, char *err, size_t errlen)
{
  return ctl_simple(rt, "save", REQUEST_TIMEOUT_MS, NULL, err, errlen);
}

static int sim_set_workload(struct vm_runtime *rt, const char *workload, char *err,
                            size_t errlen)
{
  if (!rt->pid)
    return 0;       /* taken at the next start */
  json_t *req = json_pack("{s:s, s:s}", "cmd", "set_workload", "workload", workload);
  json_t *r = NULL;
  int ret = ctl_request(rt, req, &r, REQUEST_TIMEOUT_MS, err, errlen);
  json_decref(req);
  json_decref(r);
  return ret;
}

/* Offline verify: ferry-simvm verify, its JSON report on stdout. */
static int verify_offline(struct vm_runtime *rt, json_t **report, char *err, size_t errlen)
{
  const struct vm_spec *s = rt->spec;
  if (access(rt->state_path, F_OK) != 0) {
    set_err(err, errlen, "VM '%s' has never run: nothing to verify", s->name);
    return -EBUSY;
  }
  const char *argv[8 + 2 * VM_MAX_DISKS];
  char diskargs[VM_MAX_DISKS][512];
  unsigned n = 0;
  argv[n++] = rt->program;
  argv[n++] = "verify";
  argv[n++] = "--state";
  argv[n++] = rt->state_path;
  for (unsigned i = 0; i < s->ndisks; i++) {
    snprintf(diskargs[i], sizeof diskargs[i], "%s=%s", s->disks[i], rt->disk_uris[i]);
    argv[n++] = "--disk";
    argv[n++] = diskargs[i];
  }
  argv[n] = NULL;
  int out[2];
  if (pipe2(out, O_CLOEXEC) < 0) {
    set_err(err, errlen, "pipe: %s", strerror(errno));
    return -errno;
  }
  int logfd = open(rt->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  pid_t pid = fork();
  if (pid == 0) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    dup2(out[1], 1);
    if (logfd >= 0)
      dup2(logfd, 2);
    execv(rt->program, (char *const *)argv);
    _exit(127);
  }
  close(out[1]);
  if (logfd >= 0)
    close(logfd);
  if (pid < 0) {
    close(out[0]);
    set_err(err, errlen, "fork: %s", strerror(errno));
    return -EIO;
  }
  char *buf = NULL;
  size_t len = 0, cap = 0;
  for (;;) {
    if (len + 4096 > cap) {
      cap = cap ? cap * 2 : 16384;
      if (cap > MAX_REPLY * 4)
        break;
      buf = realloc(buf, cap);
    }
    ssize_t r = read(out[0], buf + len, cap - len - 1);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    len += (size_t)r;
  }
  close(out[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  json_error_t je;
  json_t *j = buf ? json_loadb(buf, len, 0, &je) : NULL;
  free(buf);
  if (!json_is_object(j)) {
    json_decref(j);
    char tail[420];
    log_tail(rt->log_path, tail, sizeof tail);
    set_err(err, errlen, "VM '%s': offline verify failed (exit %d): %s", s->name,
            WIFEXITED(status) ? WEXITSTATUS(status) : -1, tail);
    return -EIO;
  }
  json_object_del(j, "ok_reply");
  *report = j;
  return 0;
}

static int sim_verify(struct vm_runtime *rt, json_t **report, char *err, size_t errlen)
{
  if (rt->pid && sim_alive(rt, rt->pid)) {
    json_t *r = NULL;
    int ret = ctl_simple(rt, "verify", VERIFY_TIMEOUT_MS, &r, err, errlen);
    if (ret == 0) {
      /* The reply's "ok" says the request worked; the report's verdict is
       * its own "ok" when ferry-simvm sends one under "report". */
      json_t *inner = json_object_get(r, "report");
      if (json_is_object(inner)) {
        *report = json_incref(inner);
        json_decref(r);
      } else {
        *report = r;
      }
    }
    return ret;
  }
  return verify_offline(rt, report, err, errlen);
}

const struct vm_driver_ops vm_driver_sim = {
  .name = "sim",
  .control_ext = "ctl",
  .has_state_file = true,
  .validate = sim_validate,
  .start = sim_start,
  .stop = sim_stop,
  .pause = sim_pause,
  .resume = sim_resume,
  .status = sim_status,
  .verify = sim_verify,
  .set_workload = sim_set_workload,
  .save_state = sim_save_state,
  .alive = sim_alive,
};
