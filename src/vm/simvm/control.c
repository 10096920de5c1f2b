/* control: see control.h for the protocol and docs/simvm.md for the
 * commands. */
#include "vm/simvm/control.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "vm/simvm/verify.h"

#define MAX_TIMEOUT_MS (24L * 3600 * 1000)
#define CLIENT_REPLY_MAX (16 * 1024 * 1024)   /* ctl: longest reply read */

/* ---- socket ---- */

int ctl_listen(struct ctl_server *srv, const char *path, char *err, size_t errlen)
{
  memset(srv, 0, sizeof *srv);
  srv->listen_fd = -1;
  srv->stop_pipe[0] = srv->stop_pipe[1] = -1;
  srv->path = path;
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  if (!*path || strlen(path) >= sizeof sa.sun_path) {
    snprintf(err, errlen, "control socket path '%s' is empty or longer than %zu bytes", path,
             sizeof sa.sun_path - 1);
    return -1;
  }
  memcpy(sa.sun_path, path, strlen(path) + 1);
  struct stat sb;
  if (lstat(path, &sb) == 0) {
    if (!S_ISSOCK(sb.st_mode)) {
      snprintf(err, errlen, "control socket %s: exists and is not a socket (not replaced)", path);
      return -1;
    }
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe < 0) {
      snprintf(err, errlen, "socket: %s", strerror(errno));
      return -1;
    }
    int live = connect(probe, (struct sockaddr *)&sa, sizeof sa) == 0;
    int e = errno;
    close(probe);
    if (live) {
      snprintf(err, errlen, "control socket %s: another process is listening on it", path);
      return -1;
    }
    if (e != ECONNREFUSED && e != ENOENT) {
      snprintf(err, errlen, "control socket %s: %s", path, strerror(e));
      return -1;
    }
    if (unlink(path) < 0 && errno != ENOENT) {
      snprintf(err, errlen, "control socket %s: removing the stale socket: %s", path,
               strerror(errno));
      return -1;
    }
    log_info(NULL, "replaced stale control socket %s", path);
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    snprintf(err, errlen, "socket: %s", strerror(errno));
    return -1;
  }
  mode_t old = umask(0177);   /* the socket is born 0600: no window with wider access */
  int rc = bind(fd, (struct sockaddr *)&sa, sizeof sa);
  int e = errno;
  umask(old);
  if (rc < 0) {
    snprintf(err, errlen, "control socket %s: bind: %s", path, strerror(e));
    close(fd);
    return -1;
  }
  if (chmod(path, 0600) < 0 || listen(fd, 64) < 0 || stat(path, &sb) < 0) {
    snprintf(err, errlen, "control socket %s: %s", sa.sun_path, strerror(errno));
    close(fd);
    unlink(path);
    return -1;
  }
  srv->dev = sb.st_dev;
  srv->ino = sb.st_ino;
  srv->listen_fd = fd;
  return 0;
}

/* ---- replies ---- */

static json_t *reply_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static json_t *reply_error(const char *fmt, ...)
{
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  return json_pack("{s:b, s:s}", "ok", 0, "error", msg);
}

static json_t *reply_ok(void)
{
  return json_pack("{s:b}", "ok", 1);
}

static void set_state_fields(struct vm *vm, json_t *o)
{
  pthread_mutex_lock(&vm->lock);
  json_object_set_new(o, "state", json_string(vm_run_state_name(vm->run_state)));
  pthread_mutex_unlock(&vm->lock);
}

/* ---- commands ---- */

static double rate(uint64_t now, uint64_t then, uint64_t dt_ns)
{
  return dt_ns ? (double)(now - then) * 1e9 / dt_ns : 0;
}

static json_t *latency_json(const struct histogram *h)
{
  return json_pack("{s:I, s:f, s:f}", "count", (json_int_t)histogram_count(h),
                   "p50", histogram_percentile(h, 0.50) / 1e3,
                   "p99", histogram_percentile(h, 0.99) / 1e3);
}

static json_t *cmd_status(struct vm *vm, json_t *req, char *err, size_t errlen)
{
  (void)req;
  (void)err;
  (void)errlen;
  json_t *o = reply_ok();
  char id[24];
  snprintf(id, sizeof id, "%016" PRIx64, vm->st.vm_id);
  pthread_mutex_lock(&vm->lock);
  json_object_set_new(o, "state", json_string(vm_run_state_name(vm->run_state)));
  json_object_set_new(o, "verifying", json_boolean(vm->verifying));
  json_object_set_new(o, "workload", json_string(vm->wl_text));
  pthread_mutex_unlock(&vm->lock);
  json_object_set_new(o, "name", json_string(vm->st.name));
  json_object_set_new(o, "vm_id", json_string(id));
  json_object_set_new(o, "pid", json_integer(getpid()));
  json_object_set_new(o, "state_file", json_string(vm->state_path));
  uint64_t now = now_ns();
  json_object_set_new(o, "uptime_s", json_real((now - vm->started_ns) / 1e9));

  json_t *disks = json_array();
  for (unsigned i = 0; i < vm->ndisks; i++) {
    const struct vm_disk *d = &vm->disk[i];
    json_array_append_new(disks, json_pack("{s:s, s:s, s:I, s:I, s:I, s:b}",
                                           "name", d->st->name, "uri", d->uri,
                                           "size", (json_int_t)d->st->size,
                                           "blocks", (json_int_t)d->st->nblocks,
                                           "written_blocks",
                                           (json_int_t)atomic_load(&d->written_blocks),
                                           "connected", atomic_load(&d->up)));
  }
  json_object_set_new(o, "disks", disks);

  uint64_t c[SIM_COUNTERS];
  json_t *counters = json_object();
  for (int i = 0; i < SIM_COUNTERS; i++) {
    c[i] = atomic_load(&vm->counters[i]);
    json_object_set_new(counters, sim_counter_names[i], json_integer((json_int_t)c[i]));
  }
  json_object_set_new(counters, "inflight", json_integer(atomic_load(&vm->inflight)));
  json_object_set_new(counters, "io_stalled", json_boolean(atomic_load(&vm->stalled)));
  json_object_set_new(o, "counters", counters);

  /* Rates: now against the oldest sample of the ring (about 1 s ago). */
  struct histogram *hw = malloc(sizeof *hw), *hr = malloc(sizeof *hr);
  double riops = 0, wiops = 0, rbps = 0, wbps = 0;
  pthread_mutex_lock(&vm->stats_lock);
  if (vm->ring_n > 0) {
    unsigned oldest = (vm->ring_pos + VM_STATS_RING - vm->ring_n) % VM_STATS_RING;
    const struct vm_sample *s = &vm->ring[oldest];
    uint64_t dt = now - s->t;
    riops = rate(c[SIM_C_READS], s->reads, dt);
    wiops = rate(c[SIM_C_WRITES], s->writes, dt);
    rbps = rate(c[SIM_C_BYTES_READ], s->bytes_read, dt);
    wbps = rate(c[SIM_C_BYTES_WRITTEN], s->bytes_written, dt);
  }
  if (hw && hr) {
    histogram_diff(hw, &vm->wlat, &vm->wlat_old);
    histogram_diff(hr, &vm->rlat, &vm->rlat_old);
  }
  pthread_mutex_unlock(&vm->stats_lock);
  json_object_set_new(o, "iops", json_real(riops + wiops));
  json_object_set_new(o, "read_iops", json_real(riops));
  json_object_set_new(o, "write_iops", json_real(wiops));
  json_object_set_new(o, "read_bps", json_real(rbps));
  json_object_set_new(o, "write_bps", json_real(wbps));
  json_object_set_new(o, "write_mbps", json_real(wbps / 1e6));
  if (hw && hr) {
    json_object_set_new(o, "write_latency_us", latency_json(hw));
    json_object_set_new(o, "read_latency_us", latency_json(hr));
  }
  free(hw);
  free(hr);
  return o;
}

static json_t *cmd_pause(struct vm *vm, json_t *req, char *err, size_t errlen)
{
  long timeout = -1;
  json_t *t = json_object_get(req, "timeout_ms");
  if (t) {
    if (!json_is_integer(t) || json_integer_value(t) < 0 ||
        json_integer_value(t) > MAX_TIMEOUT_MS) {
      snprintf(err, errlen, "'timeout_ms' must be an integer from 0 to %ld", MAX_TIMEOUT_MS);
      return NULL;
    }
    timeout = (long)json_integer_value(t);
  }
  if (vm_pause(vm, timeout, err, errlen) < 0)
    return NULL;
  json_t *o = reply_ok();
  set_state_fields(vm, o);
  json_object_set_new(o, "saved", json_string(vm->state_path));
  return o;
}

static json_t *cmd_resume(struct vm *vm, json_t *req, char *err, size_t errlen)
{
  (void)req;
  (void)err;
  (void)errlen;
  vm_resume(vm);
  json_t *o = reply_ok();
  set_state_fields(vm, o);
  return o;
}

static json_t *cmd_save(struct vm *vm, json_t *req, char *err, size_t errlen)
{
  (void)req;
  unsigned uncertain = 0;
  if (vm_save(vm, &uncertain, err, errlen) < 0)
    return NULL;
  json_t *o = reply_ok();
  json_object_set_new(o, "saved", json_string(vm->state_path));
  json_object_set_new(o, "uncertain_blocks", json_integer(uncertain));
  return o;
}

static json_t *cmd_stop(struct vm *vm, json_t *req, char *err, size_t errlen)
{
  (void)req;
  if (vm_stop(vm, err, errlen) < 0)
    return NULL;
  json_t *o = reply_ok();
  set_state_fields(vm, o);
  json_object_set_new(o, "saved", json_string(vm->state_path));
  return o;
}

static json_t *cmd_set_workload(struct vm *vm, json_t *req, char *err, size_t errlen)
{
  json_t *w = json_object_get(req, "workload");
  if (!json_is_string(w)) {
    snprintf(err, errlen, "set_workload needs \"workload\": a spec string such as "
             "\"write=70,bs=4k,iops=500\"");
    return NULL;
  }
  struct workload wl;
  if (workload_parse(json_string_value(w), &wl, err, errlen) < 0)
    return NULL;
  if (vm_set_workload(vm, &wl, err, errlen) < 0)
    return NULL;
  json_t *o = reply_ok();
  char text[SIM_WL_SPEC_MAX];
  workload_format(&wl, text, sizeof text);
  json_object_set_new(o, "workload", json_string(text));
  return o;
}

static json_t *cmd_verify(struct vm *vm, json_t *req, char *err, size_t errlen)
{
  (void)req;
  struct verify_report *r = malloc(sizeof *r);
  if (!r) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  if (vm_verify(vm, r, err, errlen) < 0) {
    free(r);
    return NULL;
  }
  json_t *o = reply_ok();
  json_object_set_new(o, "report", verify_report_json(&vm->st, r));
  set_state_fields(vm, o);
  free(r);
  return o;
}

static const char *const no_keys[] = { NULL };
static const char *const pause_keys[] = { "timeout_ms", NULL };
static const char *const workload_keys[] = { "workload", NULL };

static const struct ctl_cmd {
  const char *name;
  const char *const *keys;       /* allowed besides "cmd" and "id" */
  bool op;                       /* serialised with the other ops (vm_op_begin) */
  json_t *(*fn)(struct vm *vm, json_t *req, char *err, size_t errlen);
} commands[] = {
  { "status", no_keys, false, cmd_status },
  { "pause", pause_keys, true, cmd_pause },
  { "resume", no_keys, true, cmd_resume },
  { "save", no_keys, true, cmd_save },
  { "stop", no_keys, false, cmd_stop },          /* takes the op lock itself */
  { "set_workload", workload_keys, true, cmd_set_workload },
  { "verify", no_keys, true, cmd_verify },
};

#define COMMAND_NAMES "status, pause, resume, save, stop, set_workload, verify"

json_t *ctl_execute(struct vm *vm, const char *line, size_t len, int *exit_code)
{
  *exit_code = -1;
  json_error_t jerr;
  json_t *req = json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr);
  if (!req)
    return reply_error("invalid JSON at column %d: %s", jerr.column, jerr.text);
  json_t *id = json_incref(json_object_get(req, "id"));
  json_t *reply = NULL;
  const struct ctl_cmd *cmd = NULL;
  json_t *name = json_object_get(req, "cmd");
  if (!json_is_object(req)) {
    reply = reply_error("a request is a JSON object such as {\"cmd\":\"status\"}");
    goto out;
  }
  if (!json_is_string(name)) {
    reply = reply_error("the request has no \"cmd\" string (commands: " COMMAND_NAMES ")");
    goto out;
  }
  for (size_t i = 0; i < ARRAY_SIZE(commands); i++)
    if (strcmp(json_string_value(name), commands[i].name) == 0)
      cmd = &commands[i];
  if (!cmd) {
    reply = reply_error("unknown command '%.64s' (commands: " COMMAND_NAMES ")",
                        json_string_value(name));
    goto out;
  }
  const char *key;
  json_t *val;
  json_object_foreach(req, key, val) {
    bool known = strcmp(key, "cmd") == 0 || strcmp(key, "id") == 0;
    for (const char *const *k = cmd->keys; !known && *k; k++)
      known = strcmp(key, *k) == 0;
    if (!known) {
      reply = reply_error("%s: unknown field '%.64s'", cmd->name, key);
      goto out;
    }
  }
  char err[1024] = "";
  if (cmd->op && vm_op_begin(vm, err, sizeof err) < 0) {
    reply = reply_error("%s: %s", cmd->name, err);
    goto out;
  }
  reply = cmd->fn(vm, req, err, sizeof err);
  if (cmd->op)
    vm_op_end(vm);
  if (cmd->fn == cmd_stop) {
    if (reply)
      *exit_code = 0;
    else if (errno == EINTR)
      *exit_code = 1;   /* forced: saved what was acknowledged, must go */
  }
  if (!reply)
    reply = reply_error("%s: %s", cmd->name, err[0] ? err : "failed");
out:
  if (id)
    json_object_set_new(reply, "id", id);
  json_decref(req);
  return reply;
}

/* ---- connections ---- */

static int send_reply(int fd, json_t *reply)
{
  char *s = json_dumps(reply, JSON_COMPACT);
  if (!s)
    return -1;
  size_t n = strlen(s);
  int rc = 0;
  /* MSG_NOSIGNAL: a client gone away is an error here, not our death. */
  for (size_t off = 0; off < n + 1;) {
    const char *p = off < n ? s + off : "\n";
    size_t len = off < n ? n - off : 1;
    ssize_t w = send(fd, p, len, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0) {
      rc = -1;
      break;
    }
    off += (size_t)w;
  }
  free(s);
  return rc;
}

static void *client_main(void *arg)
{
  struct ctl_client *c = arg;
  struct vm *vm = c->srv->vm;
  char *buf = malloc(CTL_LINE_MAX + 1);
  size_t len = 0;
  int exit_code = -1;
  while (buf && exit_code < 0) {
    ssize_t n = recv(c->fd, buf + len, CTL_LINE_MAX + 1 - len, 0);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    len += (size_t)n;
    size_t start = 0;
    for (size_t i = len - (size_t)n; i < len && exit_code < 0; i++) {
      if (buf[i] != '\n')
        continue;
      size_t ll = i - start;
      if (ll > 0 && buf[start + ll - 1] == '\r')
        ll--;
      if (ll > 0) {
        json_t *reply = ctl_execute(vm, buf + start, ll, &exit_code);
        int rc = send_reply(c->fd, reply);
        json_decref(reply);
        if (rc < 0 && exit_code < 0)
          goto done;
      }
      start = i + 1;
    }
    memmove(buf, buf + start, len - start);
    len -= start;
    if (len > CTL_LINE_MAX) {
      json_t *reply = reply_error("request line longer than %d bytes: closing the connection",
                                  CTL_LINE_MAX);
      send_reply(c->fd, reply);
      json_decref(reply);
      break;
    }
  }
done:
  free(buf);
  if (exit_code >= 0)
    vm_request_exit(vm, exit_code);   /* after the stop reply went out */
  shutdown(c->fd, SHUT_RDWR);
  pthread_mutex_lock(&c->srv->lock);
  c->finished = true;
  pthread_mutex_unlock(&c->srv->lock);
  return NULL;
}

/* Joins finished client threads; srv->lock held. */
static void reap(struct ctl_server *srv)
{
  for (int i = 0; i < CTL_MAX_CLIENTS; i++) {
    struct ctl_client *c = &srv->clients[i];
    if (c->used && c->finished) {
      pthread_join(c->thread, NULL);
      close(c->fd);
      c->used = false;
    }
  }
}

static void *accept_main(void *arg)
{
  struct ctl_server *srv = arg;
  for (;;) {
    struct pollfd pfd[2] = { { .fd = srv->listen_fd, .events = POLLIN },
                             { .fd = srv->stop_pipe[0], .events = POLLIN } };
    if (poll(pfd, 2, -1) < 0) {
      if (errno == EINTR)
        continue;
      log_error(NULL, "control: poll: %s", strerror(errno));
      break;
    }
    if (pfd[1].revents)
      break;
    if (!pfd[0].revents)
      continue;
    int fd = accept4(srv->listen_fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) {
        log_warn(NULL, "control: accept: %s", strerror(errno));
        usleep(10000);   /* EMFILE and friends: do not spin */
      }
      continue;
    }
    pthread_mutex_lock(&srv->lock);
    reap(srv);
    struct ctl_client *c = NULL;
    for (int i = 0; i < CTL_MAX_CLIENTS && !c; i++)
      if (!srv->clients[i].used)
        c = &srv->clients[i];
    if (c) {
      *c = (struct ctl_client){ .fd = fd, .used = true, .srv = srv };
      if (pthread_create(&c->thread, NULL, client_main, c) != 0) {
        c->used = false;
        c = NULL;
      }
    }
    pthread_mutex_unlock(&srv->lock);
    if (!c) {
      json_t *reply = reply_error("too many control connections (at most %d)", CTL_MAX_CLIENTS);
      send_reply(fd, reply);
      json_decref(reply);
      close(fd);
    }
  }
  return NULL;
}

int ctl_start(struct ctl_server *srv, struct vm *vm, char *err, size_t errlen)
{
  srv->vm = vm;
  pthread_mutex_init(&srv->lock, NULL);
  if (pipe2(srv->stop_pipe, O_CLOEXEC) < 0) {
    snprintf(err, errlen, "pipe: %s", strerror(errno));
    return -1;
  }
  int e = pthread_create(&srv->thread, NULL, accept_main, srv);
  if (e) {
    snprintf(err, errlen, "pthread_create: %s", strerror(e));
    return -1;
  }
  srv->started = true;
  return 0;
}

void ctl_stop(struct ctl_server *srv)
{
  if (srv->started) {
    ssize_t w = write(srv->stop_pipe[1], "x", 1);
    (void)w;
    pthread_join(srv->thread, NULL);
    srv->started = false;
    pthread_mutex_lock(&srv->lock);
    for (int i = 0; i < CTL_MAX_CLIENTS; i++)
      if (srv->clients[i].used)
        shutdown(srv->clients[i].fd, SHUT_RDWR);   /* wakes its recv() */
    pthread_mutex_unlock(&srv->lock);
    for (int i = 0; i < CTL_MAX_CLIENTS; i++) {
      struct ctl_client *c = &srv->clients[i];
      if (c->used) {
        pthread_join(c->thread, NULL);
        close(c->fd);
        c->used = false;
      }
    }
    pthread_mutex_destroy(&srv->lock);
  }
  for (int i = 0; i < 2; i++)
    if (srv->stop_pipe[i] >= 0)
      close(srv->stop_pipe[i]);
  srv->stop_pipe[0] = srv->stop_pipe[1] = -1;
  if (srv->listen_fd >= 0) {
    close(srv->listen_fd);
    srv->listen_fd = -1;
    struct stat sb;
    /* Only our socket: a successor may have bound the path since. */
    if (stat(srv->path, &sb) == 0 && sb.st_dev == srv->dev && sb.st_ino == srv->ino)
      unlink(srv->path);
  }
}

/* ---- the `ctl` command ---- */

int ctl_client_main(const char *sock, const char *cmd, const char *args)
{
  json_t *req;
  if (args) {
    json_error_t jerr;
    req = json_loads(args, JSON_REJECT_DUPLICATES, &jerr);
    if (!req || !json_is_object(req)) {
      fprintf(stderr, "ferry-simvm ctl: JSON-ARGS must be a JSON object%s%s\n",
              req ? "" : ": ", req ? "" : jerr.text);
      json_decref(req);
      return 2;
    }
    if (json_object_get(req, "cmd")) {
      fprintf(stderr, "ferry-simvm ctl: JSON-ARGS must not contain \"cmd\"\n");
      json_decref(req);
      return 2;
    }
  } else {
    req = json_object();
  }
  json_object_set_new(req, "cmd", json_string(cmd));
  char *line = json_dumps(req, JSON_COMPACT);
  json_decref(req);
  if (!line) {
    fprintf(stderr, "ferry-simvm ctl: out of memory\n");
    return 1;
  }
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  if (strlen(sock) >= sizeof sa.sun_path) {
    fprintf(stderr, "ferry-simvm ctl: socket path too long\n");
    free(line);
    return 2;
  }
  memcpy(sa.sun_path, sock, strlen(sock) + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    fprintf(stderr, "ferry-simvm ctl: cannot connect to %s: %s\n", sock, strerror(errno));
    if (fd >= 0)
      close(fd);
    free(line);
    return 1;
  }
  size_t n = strlen(line);
  line[n] = '\n';   /* json_dumps left room: the NUL */
  int rc = write_full(fd, line, n + 1);
  free(line);
  if (rc < 0) {
    fprintf(stderr, "ferry-simvm ctl: send: %s\n", strerror(errno));
    close(fd);
    return 1;
  }
  size_t cap = 4096, len = 0;
  char *buf = malloc(cap);
  while (buf) {
    if (len == cap) {
      if (cap >= CLIENT_REPLY_MAX)
        break;
      char *nb = realloc(buf, cap * 2);
      if (!nb)
        break;
      buf = nb;
      cap *= 2;
    }
    ssize_t r = recv(fd, buf + len, cap - len, 0);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    len += (size_t)r;
    if (memchr(buf + len - r, '\n', (size_t)r))
      break;
  }
  close(fd);
  char *nl = buf ? memchr(buf, '\n', len) : NULL;
  if (!nl) {
    fprintf(stderr, "ferry-simvm ctl: no reply from %s\n", sock);
    free(buf);
    return 1;
  }
  size_t ll = (size_t)(nl - buf);
  printf("%.*s\n", (int)ll, buf);
  json_t *reply = json_loadb(buf, ll, 0, NULL);
  free(buf);
  json_t *ok = json_object_get(reply, "ok");
  int status = json_is_true(ok) ? 0 : 1;
  json_decref(reply);
  return status;
}
