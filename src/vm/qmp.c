/* qmp: synchronous QMP client (see qmp.h).
 *
 * QMP is one JSON object per line in each direction.  Input is buffered in
 * q->buf; a message is taken once its newline has arrived, so a reply split
 * over many reads, or several messages in one read, are both fine.  Only
 * complete lines are parsed, and a line that would outgrow QMP_MAX_LINE ends
 * the connection with -EPROTO before it is buffered any further. */
#include "vm/qmp.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/util.h"

struct qmp {
  int fd;
  char *buf;                         /* input not yet taken as messages */
  size_t len, cap;
  bool broken;                       /* a timeout, EOF or protocol error happened */
  char version[32];                  /* "7.2.22" */
  int vmajor, vminor, vmicro;
  unsigned timeout_ms;
  uint64_t next_id;
  char errclass[64];                 /* class of the last error reply */
  struct qmp_event ev[QMP_MAX_EVENTS]; /* ring: oldest at ev_head */
  size_t ev_head, ev_count;
  uint64_t dropped;
};

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

static int ms_left(uint64_t deadline)
{
  uint64_t now = now_ns();
  return now >= deadline ? 0 : (int)MIN((deadline - now) / 1000000 + 1, (uint64_t)INT32_MAX);
}

static int fail(struct qmp *q, int r)
{
  q->broken = true;
  return r;
}

/* ---- events ---- */

static void queue_event(struct qmp *q, json_t *msg)
{
  if (q->ev_count == QMP_MAX_EVENTS) {
    /* Full: the oldest goes, so what is queued is always the latest. */
    qmp_event_clear(&q->ev[q->ev_head]);
    q->ev_head = (q->ev_head + 1) % QMP_MAX_EVENTS;
    q->ev_count--;
    q->dropped++;
  }
  struct qmp_event *e = &q->ev[(q->ev_head + q->ev_count) % QMP_MAX_EVENTS];
  memset(e, 0, sizeof *e);
  snprintf(e->name, sizeof e->name, "%s", json_string_value(json_object_get(msg, "event")));
  json_t *ts = json_object_get(msg, "timestamp");
  json_int_t s = json_integer_value(json_object_get(ts, "seconds"));
  json_int_t us = json_integer_value(json_object_get(ts, "microseconds"));
  if (s > 0 && us >= 0)
    e->ts_ns = (uint64_t)s * 1000000000ull + (uint64_t)us * 1000ull;
  json_t *data = json_object_get(msg, "data");
  e->data = data ? json_incref(data) : NULL;
  q->ev_count++;
}

bool qmp_next_event(struct qmp *q, struct qmp_event *ev)
{
  if (!q->ev_count)
    return false;
  *ev = q->ev[q->ev_head];
  memset(&q->ev[q->ev_head], 0, sizeof q->ev[0]);
  q->ev_head = (q->ev_head + 1) % QMP_MAX_EVENTS;
  q->ev_count--;
  return true;
}

/* Takes the oldest queued event called name out of the ring. */
static bool take_event(struct qmp *q, const char *name, struct qmp_event *ev)
{
  for (size_t i = 0; i < q->ev_count; i++) {
    size_t at = (q->ev_head + i) % QMP_MAX_EVENTS;
    if (strcmp(q->ev[at].name, name) != 0)
      continue;
    *ev = q->ev[at];
    /* Close the gap: everything after it moves one place towards the head. */
    for (size_t k = i; k + 1 < q->ev_count; k++)
      q->ev[(q->ev_head + k) % QMP_MAX_EVENTS] = q->ev[(q->ev_head + k + 1) % QMP_MAX_EVENTS];
    memset(&q->ev[(q->ev_head + q->ev_count - 1) % QMP_MAX_EVENTS], 0, sizeof q->ev[0]);
    q->ev_count--;
    return true;
  }
  return false;
}

void qmp_event_clear(struct qmp_event *ev)
{
  if (!ev)
    return;
  json_decref(ev->data);
  ev->data = NULL;
}

uint64_t qmp_events_dropped(const struct qmp *q) { return q->dropped; }
bool qmp_broken(const struct qmp *q) { return q->broken; }

/* ---- input ---- */

/* Takes one complete line out of the buffer as a JSON object.  1 with *msg,
 * 0 when no complete line is buffered, <0 on a line that is not an object. */
static int take_line(struct qmp *q, json_t **msg, char *err, size_t errlen)
{
  for (;;) {
    char *nl = q->len ? memchr(q->buf, '\n', q->len) : NULL;
    if (!nl)
      return 0;
    size_t n = (size_t)(nl - q->buf);
    size_t start = 0;
    while (start < n && (q->buf[start] == ' ' || q->buf[start] == '\r' || q->buf[start] == '\t'))
      start++;
    json_t *j = NULL;
    json_error_t je;
    bool blank = start == n || (n - start == 1 && q->buf[n - 1] == '\r');
    if (!blank)
      j = json_loadb(q->buf + start, n - start, 0, &je);
    memmove(q->buf, nl + 1, q->len - n - 1);
    q->len -= n + 1;
    if (blank)
      continue;
    if (!json_is_object(j)) {
      json_decref(j);
      set_err(err, errlen, "QMP: QEMU sent something that is not a JSON object%s%s",
              j ? "" : ": ", j ? "" : je.text);
      return fail(q, -EPROTO);
    }
    *msg = j;
    return 1;
  }
}

/* Reads once from the socket, waiting up to wait_ms (0: do not wait).
 * 1 read something, 0 nothing there (or timeout), <0 error. */
static int fill(struct qmp *q, int wait_ms, char *err, size_t errlen)
{
  struct pollfd p = { .fd = q->fd, .events = POLLIN };
  int pr;
  do
    pr = poll(&p, 1, wait_ms);
  while (pr < 0 && errno == EINTR);
  if (pr < 0) {
    set_err(err, errlen, "QMP: poll: %s", strerror(errno));
    return fail(q, -errno);
  }
  if (pr == 0)
    return 0;
  if (q->len + 1 >= q->cap) {
    if (q->cap >= QMP_MAX_LINE) {
      set_err(err, errlen, "QMP: QEMU sent a message longer than %u bytes", QMP_MAX_LINE);
      return fail(q, -EPROTO);
    }
    size_t cap = q->cap ? MIN(q->cap * 2, (size_t)QMP_MAX_LINE) : 8192;
    char *nb = realloc(q->buf, cap);
    if (!nb) {
      set_err(err, errlen, "out of memory");
      return fail(q, -ENOMEM);
    }
    q->buf = nb;
    q->cap = cap;
  }
  ssize_t n;
  do
    n = read(q->fd, q->buf + q->len, q->cap - q->len - 1);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    set_err(err, errlen, "QMP: read: %s", strerror(errno));
    return fail(q, errno == ECONNRESET ? -EPIPE : -EIO);
  }
  if (n == 0) {
    set_err(err, errlen, "QMP: QEMU closed the connection");
    return fail(q, -EPIPE);
  }
  q->len += (size_t)n;
  return 1;
}

/* Next message that is not an event (events are queued on the way), waiting
 * until deadline.  1 with *msg; <0 error (-ETIMEDOUT). */
static int next_message(struct qmp *q, uint64_t deadline, json_t **msg, char *err, size_t errlen)
{
  for (;;) {
    json_t *j = NULL;
    int r = take_line(q, &j, err, errlen);
    if (r < 0)
      return r;
    if (r == 1) {
      if (json_is_string(json_object_get(j, "event"))) {
        queue_event(q, j);
        json_decref(j);
        continue;
      }
      *msg = j;
      return 1;
    }
    int left = ms_left(deadline);
    if (!left) {
      set_err(err, errlen, "QMP: no answer from QEMU within %u ms", q->timeout_ms);
      return fail(q, -ETIMEDOUT);
    }
    if ((r = fill(q, left, err, errlen)) < 0)
      return r;
  }
}

int qmp_poll_events(struct qmp *q, char *err, size_t errlen)
{
  if (q->broken) {
    set_err(err, errlen, "QMP: the connection to QEMU has failed");
    return -EPIPE;
  }
  for (;;) {
    json_t *j = NULL;
    int r = take_line(q, &j, err, errlen);
    if (r < 0)
      return r;
    if (r == 1) {
      /* A reply here belongs to no one (a command that timed out): dropped. */
      if (json_is_string(json_object_get(j, "event")))
        queue_event(q, j);
      json_decref(j);
      continue;
    }
    if ((r = fill(q, 0, err, errlen)) <= 0)
      return r;
  }
}

int qmp_wait_event(struct qmp *q, const char *name, unsigned timeout_ms, struct qmp_event *ev,
                   char *err, size_t errlen)
{
  memset(ev, 0, sizeof *ev);
  if (take_event(q, name, ev))
    return 0;
  if (q->broken) {
    set_err(err, errlen, "QMP: the connection to QEMU has failed");
    return -EPIPE;
  }
  uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000;
  for (;;) {
    int r = qmp_poll_events(q, err, errlen);
    if (r < 0)
      return r;
    if (take_event(q, name, ev))
      return 0;
    int left = ms_left(deadline);
    if (!left) {
      set_err(err, errlen, "QMP: no %s event within %u ms", name, timeout_ms);
      return -ETIMEDOUT;
    }
    if ((r = fill(q, left, err, errlen)) < 0)
      return r;
  }
}

/* ---- output ---- */

static int send_json(struct qmp *q, json_t *msg, char *err, size_t errlen)
{
  char *text = json_dumps(msg, JSON_COMPACT), *line = NULL;
  if (!text || asprintf(&line, "%s\n", text) < 0) {
    free(text);
    set_err(err, errlen, "out of memory");
    return -ENOMEM;
  }
  free(text);
  size_t len = strlen(line), off = 0;
  int r = 0;
  while (off < len) {
    /* MSG_NOSIGNAL: a QEMU that went away is an error here, not SIGPIPE. */
    ssize_t w = send(q->fd, line + off, len - off, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR)
      continue;
    if (w < 0) {
      set_err(err, errlen, "QMP: cannot send to QEMU: %s", strerror(errno));
      r = fail(q, -EPIPE);
      break;
    }
    off += (size_t)w;
  }
  free(line);
  return r;
}

void qmp_set_timeout(struct qmp *q, unsigned timeout_ms) { q->timeout_ms = timeout_ms; }
const char *qmp_error_class(const struct qmp *q) { return q->errclass; }
const char *qmp_version(const struct qmp *q) { return q->version; }

void qmp_version_numbers(const struct qmp *q, int *major, int *minor, int *micro)
{
  *major = q->vmajor;
  *minor = q->vminor;
  *micro = q->vmicro;
}

int qmp_execute(struct qmp *q, const char *cmd, json_t *args, json_t **ret, char *err,
                size_t errlen)
{
  if (ret)
    *ret = NULL;
  q->errclass[0] = '\0';
  if (q->broken) {
    set_err(err, errlen, "QMP: the connection to QEMU has failed");
    return -EPIPE;
  }
  char id[32];
  snprintf(id, sizeof id, "ferry-%llu", (unsigned long long)++q->next_id);
  json_t *msg = json_pack("{s:s, s:s}", "execute", cmd, "id", id);
  if (args)
    json_object_set(msg, "arguments", args);
  int r = send_json(q, msg, err, errlen);
  json_decref(msg);
  if (r < 0)
    return r;
  uint64_t deadline = now_ns() + (uint64_t)q->timeout_ms * 1000000;
  for (;;) {
    json_t *reply = NULL;
    if ((r = next_message(q, deadline, &reply, err, errlen)) < 0) {
      if (r == -ETIMEDOUT)
        set_err(err, errlen, "QMP: QEMU did not answer '%s' within %u ms", cmd, q->timeout_ms);
      return r;
    }
    const char *rid = json_string_value(json_object_get(reply, "id"));
    json_t *e = json_object_get(reply, "error");
    /* A reply with another id is stale; one with no id is QEMU's answer to
     * input it could not parse, which can only be ours. */
    if ((rid && strcmp(rid, id) != 0) || (!rid && !e)) {
      json_decref(reply);
      continue;
    }
    if (e) {
      const char *desc = json_string_value(json_object_get(e, "desc"));
      const char *cls = json_string_value(json_object_get(e, "class"));
      snprintf(q->errclass, sizeof q->errclass, "%s", cls ? cls : "");
      set_err(err, errlen, "%s", desc ? desc : "QEMU refused the command");
      json_decref(reply);
      return -EREMOTEIO;
    }
    json_t *rv = json_object_get(reply, "return");
    if (!rv) {
      json_decref(reply);
      set_err(err, errlen, "QMP: QEMU's reply to '%s' has neither \"return\" nor \"error\"", cmd);
      return fail(q, -EPROTO);
    }
    if (ret)
      *ret = json_incref(rv);
    json_decref(reply);
    return 0;
  }
}

/* ---- connection ---- */

struct qmp *qmp_connect(const char *path, unsigned timeout_ms, char *err, size_t errlen)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  if (strlen(path) >= sizeof sa.sun_path) {
    set_err(err, errlen, "QMP socket path %s is longer than %zu bytes", path,
            sizeof sa.sun_path - 1);
    return NULL;
  }
  strcpy(sa.sun_path, path);
  uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000;
  int fd = -1;
  for (;;) {
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      set_err(err, errlen, "socket: %s", strerror(errno));
      return NULL;
    }
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
      break;
    int e = errno;
    close(fd);
    fd = -1;
    /* QEMU may not have bound its socket yet. */
    if ((e != ENOENT && e != ECONNREFUSED && e != EAGAIN) || !ms_left(deadline)) {
      set_err(err, errlen, "cannot connect to QMP socket %s: %s", path, strerror(e));
      return NULL;
    }
    usleep(20 * 1000);
  }
  struct qmp *q = calloc(1, sizeof *q);
  if (!q) {
    close(fd);
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  q->fd = fd;
  q->timeout_ms = timeout_ms ? timeout_ms : QMP_DEFAULT_TIMEOUT_MS;
  json_t *greeting = NULL;
  char why[256];
  if (next_message(q, deadline, &greeting, why, sizeof why) < 0) {
    /* QEMU serves one QMP client at a time: a second one waits unanswered. */
    set_err(err, errlen, "no QMP greeting on %s (%s%s)", path, why,
            q->broken && strstr(why, "no answer") ? "; is another client connected?" : "");
    qmp_close(q);
    return NULL;
  }
  json_t *ver = json_object_get(json_object_get(json_object_get(greeting, "QMP"), "version"),
                                "qemu");
  if (!json_is_object(ver)) {
    json_decref(greeting);
    set_err(err, errlen, "%s does not speak QMP (its greeting has no QMP version)", path);
    qmp_close(q);
    return NULL;
  }
  q->vmajor = (int)json_integer_value(json_object_get(ver, "major"));
  q->vminor = (int)json_integer_value(json_object_get(ver, "minor"));
  q->vmicro = (int)json_integer_value(json_object_get(ver, "micro"));
  snprintf(q->version, sizeof q->version, "%d.%d.%d", q->vmajor, q->vminor, q->vmicro);
  json_decref(greeting);
  int r = qmp_execute(q, "qmp_capabilities", NULL, NULL, why, sizeof why);
  if (r < 0) {
    set_err(err, errlen, "QMP capabilities negotiation on %s failed: %s", path, why);
    qmp_close(q);
    return NULL;
  }
  q->timeout_ms = QMP_DEFAULT_TIMEOUT_MS;
  return q;
}

void qmp_close(struct qmp *q)
{
  if (!q)
    return;
  struct qmp_event ev;
  while (qmp_next_event(q, &ev))
    qmp_event_clear(&ev);
  if (q->fd >= 0)
    close(q->fd);
  free(q->buf);
  free(q);
}
