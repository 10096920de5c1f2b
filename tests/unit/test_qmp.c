/* test_qmp: the QMP client (src/vm/qmp.c) against a real QEMU
 * (qemu-system-x86_64 -machine none: no guest, only its monitor) and against
 * fake peers that misbehave: a greeting that is not QMP, a silent peer, a
 * line without end, garbage, an event flood.  Each must give a clear error
 * and bounded memory.  Exits 77 (skip) when QEMU is not installed. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/util.h"
#include "vm/qmp.h"

#include "check.h"

static char dir[64];

/* ---- a real QEMU ---- */

static pid_t start_qemu(const char *sock)
{
  char arg[256];
  snprintf(arg, sizeof arg, "unix:%s,server=on,wait=off", sock);
  pid_t pid = fork();
  if (pid == 0) {
    int devnull = open("/dev/null", O_RDWR);
    dup2(devnull, 0);
    dup2(devnull, 1);
    execlp("qemu-system-x86_64", "qemu-system-x86_64", "-machine", "none", "-nodefaults",
           "-display", "none", "-no-user-config", "-qmp", arg, (char *)NULL);
    _exit(127);
  }
  return pid;
}

static void test_real_qemu(void)
{
  char sock[128], err[512];
  snprintf(sock, sizeof sock, "%s/q.qmp", dir);
  pid_t pid = start_qemu(sock);
  CHECK(pid > 0);
  struct qmp *q = qmp_connect(sock, 15000, err, sizeof err);
  if (!q) {
    fprintf(stderr, "qmp_connect: %s\n", err);
    failures++;
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return;
  }
  int maj, min, mic;
  qmp_version_numbers(q, &maj, &min, &mic);
  CHECK(maj >= 2);
  char want[32];
  snprintf(want, sizeof want, "%d.%d.%d", maj, min, mic);
  CHECK(strcmp(qmp_version(q), want) == 0);
  printf("QEMU %s\n", qmp_version(q));

  /* query-version agrees with the greeting. */
  json_t *ret = NULL;
  CHECK(qmp_execute(q, "query-version", NULL, &ret, err, sizeof err) == 0);
  CHECK(json_integer_value(json_object_get(json_object_get(ret, "qemu"), "major")) == maj);
  CHECK(json_integer_value(json_object_get(json_object_get(ret, "qemu"), "minor")) == min);
  json_decref(ret);

  /* query-machines: an array with "none" in it (and q35 on x86). */
  CHECK(qmp_execute(q, "query-machines", NULL, &ret, err, sizeof err) == 0);
  CHECK(json_is_array(ret) && json_array_size(ret) > 1);
  bool none = false, q35 = false;
  size_t i;
  json_t *m;
  json_array_foreach(ret, i, m) {
    const char *n = json_string_value(json_object_get(m, "name"));
    const char *a = json_string_value(json_object_get(m, "alias"));
    none |= n && strcmp(n, "none") == 0;
    q35 |= a && strcmp(a, "q35") == 0;
  }
  CHECK(none && q35);
  json_decref(ret);

  /* Errors carry QEMU's desc and class; the connection goes on. */
  int r = qmp_execute(q, "no-such-command", NULL, &ret, err, sizeof err);
  CHECK(r == -EREMOTEIO && ret == NULL);
  CHECK(strstr(err, "no-such-command") != NULL);
  CHECK(strcmp(qmp_error_class(q), "CommandNotFound") == 0);
  json_t *bad = json_pack("{s:i}", "bogus", 1);
  r = qmp_execute(q, "query-status", bad, &ret, err, sizeof err);
  json_decref(bad);
  CHECK(r == -EREMOTEIO);
  CHECK(strstr(err, "bogus") != NULL);
  CHECK(strcmp(qmp_error_class(q), "GenericError") == 0);
  CHECK(!qmp_broken(q));

  /* Events: stop and cont, queued with QEMU's realtime stamp. */
  uint64_t before = realtime_ns();
  CHECK(qmp_execute(q, "stop", NULL, NULL, err, sizeof err) == 0);
  CHECK(qmp_execute(q, "cont", NULL, NULL, err, sizeof err) == 0);
  struct qmp_event ev;
  CHECK(qmp_wait_event(q, "RESUME", 5000, &ev, err, sizeof err) == 0);
  CHECK(strcmp(ev.name, "RESUME") == 0);
  CHECK(ev.ts_ns + 1000000000ull > before && ev.ts_ns < realtime_ns() + 1000000000ull);
  uint64_t resumed = ev.ts_ns;
  qmp_event_clear(&ev);
  /* STOP came first and is still queued. */
  CHECK(qmp_next_event(q, &ev));
  CHECK(strcmp(ev.name, "STOP") == 0 && ev.ts_ns <= resumed && ev.ts_ns > 0);
  qmp_event_clear(&ev);
  CHECK(!qmp_next_event(q, &ev));
  uint64_t t0 = now_ns();
  CHECK(qmp_wait_event(q, "NEVER", 200, &ev, err, sizeof err) == -ETIMEDOUT);
  CHECK(now_ns() - t0 < 2000000000ull);
  CHECK(qmp_poll_events(q, err, sizeof err) == 0);

  /* quit is answered, then QEMU is gone and the client says so. */
  CHECK(qmp_execute(q, "quit", NULL, NULL, err, sizeof err) == 0);
  int status;
  CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
  r = qmp_execute(q, "query-status", NULL, &ret, err, sizeof err);
  CHECK(r == -EPIPE);
  CHECK(qmp_broken(q));
  qmp_close(q);

  /* Nothing listens any more. */
  t0 = now_ns();
  CHECK(qmp_connect(sock, 300, err, sizeof err) == NULL);
  CHECK(strstr(err, sock) != NULL);
  CHECK(now_ns() - t0 < 3000000000ull);
}

/* ---- fake peers ---- */

enum fake { F_NOT_QMP, F_SILENT, F_ENDLESS, F_GARBAGE, F_FLOOD, F_NO_RETURN };

struct fake_peer {
  int lfd;
  enum fake kind;
};

static void say(int fd, const char *s) { (void)!write(fd, s, strlen(s)); }

static const char greeting[] =
  "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 3, \"minor\": 1, \"major\": 9}, "
  "\"package\": \"\"}, \"capabilities\": []}}\r\n";

/* Reads one line (a command) and returns its id. */
static void read_cmd(int fd, char *id, size_t len)
{
  char buf[4096];
  size_t n = 0;
  while (n < sizeof buf - 1) {
    ssize_t r = read(fd, buf + n, 1);
    if (r <= 0 || buf[n] == '\n')
      break;
    n++;
  }
  buf[n] = '\0';
  json_t *j = json_loads(buf, 0, NULL);
  snprintf(id, len, "%s", json_string_value(json_object_get(j, "id")) ?: "");
  json_decref(j);
}

static void *fake_main(void *arg)
{
  struct fake_peer *p = arg;
  int fd = accept(p->lfd, NULL, NULL);
  if (fd < 0)
    return NULL;
  char id[64], line[256];
  switch (p->kind) {
  case F_NOT_QMP:
    say(fd, "{\"hello\": \"I am not QEMU\"}\n");
    break;
  case F_SILENT:
    usleep(800 * 1000);
    break;
  case F_ENDLESS: {
    say(fd, greeting);
    read_cmd(fd, id, sizeof id);
    snprintf(line, sizeof line, "{\"return\": {}, \"id\": \"%s\"}\n", id);
    say(fd, line);
    read_cmd(fd, id, sizeof id);
    char *big = malloc(1 << 20);
    memset(big, 'x', 1 << 20);
    say(fd, "{\"return\": \"");
    for (int i = 0; i < 6; i++)
      if (write(fd, big, 1 << 20) < 0)
        break;
    free(big);
    break;
  }
  case F_GARBAGE:
    say(fd, greeting);
    read_cmd(fd, id, sizeof id);
    snprintf(line, sizeof line, "{\"return\": {}, \"id\": \"%s\"}\n", id);
    say(fd, line);
    read_cmd(fd, id, sizeof id);
    say(fd, "\n\r\n[1, 2, 3]\n");
    break;
  case F_FLOOD: {
    say(fd, greeting);
    read_cmd(fd, id, sizeof id);
    snprintf(line, sizeof line, "{\"return\": {}, \"id\": \"%s\"}\n", id);
    say(fd, line);
    read_cmd(fd, id, sizeof id);
    for (int i = 0; i < 1000; i++) {
      snprintf(line, sizeof line, "{\"event\": \"TICK\", \"data\": {\"n\": %d}, \"timestamp\": "
               "{\"seconds\": 1700000000, \"microseconds\": %d}}\n", i, i);
      say(fd, line);
    }
    /* A stale reply (other id), then ours split over two writes. */
    say(fd, "{\"return\": {\"stale\": true}, \"id\": \"ferry-999\"}\n");
    snprintf(line, sizeof line, "{\"return\": {\"ok\": 1}, \"id\": \"%s\"}\n", id);
    (void)!write(fd, line, 5);
    usleep(20 * 1000);
    say(fd, line + 5);
    break;
  }
  case F_NO_RETURN:
    say(fd, greeting);
    read_cmd(fd, id, sizeof id);
    snprintf(line, sizeof line, "{\"return\": {}, \"id\": \"%s\"}\n", id);
    say(fd, line);
    read_cmd(fd, id, sizeof id);
    snprintf(line, sizeof line, "{\"id\": \"%s\"}\n", id);
    say(fd, line);
    break;
  }
  usleep(300 * 1000);
  close(fd);
  return NULL;
}

static struct qmp *fake_connect(enum fake kind, unsigned timeout_ms, pthread_t *th,
                                struct fake_peer *p, char *err, size_t errlen)
{
  char path[100];
  snprintf(path, sizeof path, "%.80s/fake.sock", dir);
  unlink(path);
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
  p->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (bind(p->lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(p->lfd, 1) < 0) {
    perror("fake peer");
    exit(1);
  }
  p->kind = kind;
  pthread_create(th, NULL, fake_main, p);
  return qmp_connect(path, timeout_ms, err, errlen);
}

static void fake_done(pthread_t th, struct fake_peer *p)
{
  pthread_join(th, NULL);
  close(p->lfd);
}

static void test_fakes(void)
{
  char err[512];
  pthread_t th;
  struct fake_peer p;

  struct qmp *q = fake_connect(F_NOT_QMP, 2000, &th, &p, err, sizeof err);
  CHECK(q == NULL && strstr(err, "does not speak QMP"));
  fake_done(th, &p);

  uint64_t t0 = now_ns();
  q = fake_connect(F_SILENT, 300, &th, &p, err, sizeof err);
  CHECK(q == NULL && strstr(err, "no QMP greeting"));
  CHECK(now_ns() - t0 < 2000000000ull);
  fake_done(th, &p);

  q = fake_connect(F_ENDLESS, 2000, &th, &p, err, sizeof err);
  CHECK(q != NULL);
  if (q) {
    CHECK(strcmp(qmp_version(q), "9.1.3") == 0);
    int r = qmp_execute(q, "query-status", NULL, NULL, err, sizeof err);
    CHECK(r == -EPROTO && strstr(err, "longer than"));
    CHECK(qmp_broken(q));
    CHECK(qmp_execute(q, "query-status", NULL, NULL, err, sizeof err) == -EPIPE);
    qmp_close(q);
  }
  fake_done(th, &p);

  q = fake_connect(F_GARBAGE, 2000, &th, &p, err, sizeof err);
  CHECK(q != NULL);
  if (q) {
    int r = qmp_execute(q, "query-status", NULL, NULL, err, sizeof err);
    CHECK(r == -EPROTO && strstr(err, "not a JSON object"));
    qmp_close(q);
  }
  fake_done(th, &p);

  q = fake_connect(F_FLOOD, 2000, &th, &p, err, sizeof err);
  CHECK(q != NULL);
  if (q) {
    json_t *ret = NULL;
    CHECK(qmp_execute(q, "query-status", NULL, &ret, err, sizeof err) == 0);
    CHECK(json_integer_value(json_object_get(ret, "ok")) == 1);
    json_decref(ret);
    /* Bounded: the newest QMP_MAX_EVENTS are kept, the rest counted. */
    CHECK(qmp_events_dropped(q) == 1000 - QMP_MAX_EVENTS);
    struct qmp_event ev;
    unsigned n = 0;
    int first = -1;
    while (qmp_next_event(q, &ev)) {
      if (first < 0)
        first = (int)json_integer_value(json_object_get(ev.data, "n"));
      CHECK(ev.ts_ns == 1700000000ull * 1000000000ull +
                        (uint64_t)json_integer_value(json_object_get(ev.data, "n")) * 1000);
      qmp_event_clear(&ev);
      n++;
    }
    CHECK(n == QMP_MAX_EVENTS && first == 1000 - QMP_MAX_EVENTS);
    qmp_close(q);
  }
  fake_done(th, &p);

  q = fake_connect(F_NO_RETURN, 2000, &th, &p, err, sizeof err);
  CHECK(q != NULL);
  if (q) {
    CHECK(qmp_execute(q, "query-status", NULL, NULL, err, sizeof err) == -EPROTO);
    CHECK(strstr(err, "neither") != NULL);
    qmp_close(q);
  }
  fake_done(th, &p);

  /* A path too long for a unix socket is refused up front. */
  char longp[200];
  memset(longp, 'a', sizeof longp - 1);
  longp[0] = '/';
  longp[sizeof longp - 1] = '\0';
  CHECK(qmp_connect(longp, 100, err, sizeof err) == NULL && strstr(err, "longer than"));
}

int main(void)
{
  signal(SIGPIPE, SIG_IGN);
  snprintf(dir, sizeof dir, "/tmp/ferry-qmp-XXXXXX");
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 1;
  }
  test_fakes();
  if (system("command -v qemu-system-x86_64 >/dev/null 2>&1") != 0) {
    fprintf(stderr, "qemu-system-x86_64 is not installed (scripts/setup.sh): skipping the real "
            "QEMU part\n");
    rmdir(dir);
    return failures ? 1 : 77;
  }
  test_real_qemu();
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  (void)!system(cmd);
  if (failures)
    fprintf(stderr, "%d check(s) failed\n", failures);
  return failures ? 1 : 0;
}
