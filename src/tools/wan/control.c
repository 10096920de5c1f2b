/* control: ferry-wan's control channel (protocol in docs/wan.md).
 *
 * DESIGN
 * A listener on a unix socket or a loopback TCP port, on the proxy's event
 * loop.  A client sends text lines; each complete line is one command and
 * gets exactly one reply line, "ok ..." or "error: ...", in order.  A command
 * that is refused changes nothing.
 *
 * Bad input is bounded: a line longer than WAN_CTL_LINE_MAX, or one holding
 * bytes that are not printable ASCII (tab allowed, a trailing CR ignored),
 * gets one error reply and the client is disconnected: once the reply is
 * sent we shut down our side and discard input until the client's EOF (at
 * most DRAIN_MAX, then the socket is closed anyway), so the reply is not
 * lost to a reset caused by unread input.
 * A client that does not read its replies is not read either once they
 * fill OUT_MAX (its own backpressure); at most MAX_CLIENTS are connected
 * at once.  None of this touches the forwarded connections.
 *
 * Out of file descriptors: the control channel is how an operator frees
 * them (`cut`), so it keeps a spare fd (/dev/null) and gives it up to accept
 * one client under EMFILE.  Without a spare the listener is unwatched (no
 * level-triggered spin) until wan_control_resume(): a control client or a
 * forwarded connection has gone, so fds are free again.
 *
 * Lifetime: a client has one fd, so it is freed inside its own event (no
 * other event of the batch can name it). */
#include "tools/wan/wan.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/log.h"
#include "common/net.h"
#include "common/util.h"

#define MAX_CLIENTS 32
#define OUT_MAX     (64 * 1024)
#define DRAIN_MAX   (64 * 1024)   /* input discarded after bad input, then reset */

struct ctl_client {
  struct wan_handler h;              /* first: the loop hands us &h */
  struct wan_control *ctl;
  int fd;
  uint32_t events;
  char in[WAN_CTL_LINE_MAX + 2];     /* a line, its "\n", and a NUL */
  size_t in_len;
  char out[OUT_MAX];                 /* replies not yet sent */
  size_t out_len;
  bool closing;                      /* no more input: close once out is sent */
  bool draining;                     /* bad input: send out, then discard input */
  bool shut_wr;                      /* ... and out was sent: shut down */
  size_t discarded;
  struct ctl_client *prev, *next;
};

struct wan_control {
  struct wan *w;
  struct wan_handler h;
  int fd;
  uint32_t events;
  int spare_fd;                      /* /dev/null, given up to accept under EMFILE */
  bool paused;                       /* out of fds: listener unwatched */
  char addr[sizeof ((struct sockaddr_un *)0)->sun_path + 300];
  char unix_path[sizeof ((struct sockaddr_un *)0)->sun_path];   /* "" for TCP */
  struct ctl_client *clients;
  unsigned nclients;
};

/* --- commands ------------------------------------------------------------ */

#define HELP "commands: delay DURATION | rate RATE | stall | unstall | cut [DURATION] | " \
             "restore | flip N [up|down|both] | stats | help | quit"

static void reply(char *out, size_t len, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static void reply(char *out, size_t len, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(out, len, fmt, ap);
  va_end(ap);
}

void wan_control_execute(struct wan *w, char *line, char *out, size_t len)
{
  char *argv[4];
  int argc = 0;
  char *save = NULL;
  for (char *t = strtok_r(line, " \t", &save); t; t = strtok_r(NULL, " \t", &save)) {
    if (argc == (int)ARRAY_SIZE(argv)) {
      reply(out, len, "error: too many words (try 'help')");
      return;
    }
    argv[argc++] = t;
  }
  if (argc == 0) {
    reply(out, len, "error: empty command (try 'help')");
    return;
  }
  const char *cmd = argv[0];
  char buf[64];

  if (strcmp(cmd, "delay") == 0) {
    uint64_t ns;
    if (argc != 2) {
      reply(out, len, "error: usage: delay DURATION (such as 10ms, 1.5s or 0)");
      return;
    }
    int r = wan_parse_duration(argv[1], WAN_DELAY_MAX_NS, &ns);
    if (r < 0) {
      reply(out, len, "error: bad delay '%.64s': %s", argv[1],
            r == -ERANGE ? "at most 60s" : "expected a duration such as 10ms, 1.5s or 0");
      return;
    }
    wan_set_delay(w, ns);
    wan_format_duration(ns, buf, sizeof buf);
    log_info(NULL, "control: delay %s", buf);
    reply(out, len, "ok delay %s", buf);
  } else if (strcmp(cmd, "rate") == 0) {
    uint64_t bps;
    if (argc != 2) {
      reply(out, len, "error: usage: rate RATE (such as 100mbit, 1gbit, 12.5M or 0)");
      return;
    }
    int r = wan_parse_rate(argv[1], &bps);
    if (r < 0) {
      reply(out, len, "error: bad rate '%.64s': %s", argv[1],
            r == -ERANGE ? "out of range (8bit to 10tbit, or 0 for unlimited)"
                         : "expected bits/s (100mbit, 1gbit, 5000000) or bytes/s (12.5M), "
                           "or 0 for unlimited");
      return;
    }
    wan_set_rate(w, bps);
    wan_format_rate(bps, buf, sizeof buf);
    log_info(NULL, "control: rate %s", buf);
    reply(out, len, "ok rate %s", buf);
  } else if (strcmp(cmd, "stall") == 0 || strcmp(cmd, "unstall") == 0 ||
             strcmp(cmd, "restore") == 0 || strcmp(cmd, "stats") == 0 ||
             strcmp(cmd, "help") == 0 || strcmp(cmd, "quit") == 0) {
    if (argc != 1) {
      reply(out, len, "error: '%s' takes no argument", cmd);
      return;
    }
    if (strcmp(cmd, "stall") == 0) {
      wan_set_stall(w, true);
      log_info(NULL, "control: stall");
      reply(out, len, "ok stalled");
    } else if (strcmp(cmd, "unstall") == 0) {
      wan_set_stall(w, false);
      log_info(NULL, "control: unstall");
      reply(out, len, "ok unstalled");
    } else if (strcmp(cmd, "restore") == 0) {
      wan_restore(w);
      log_info(NULL, "control: restore");
      reply(out, len, "ok restored");
    } else if (strcmp(cmd, "stats") == 0) {
      size_t n = snprintf(out, len, "ok ");
      if (n < len)
        wan_stats_json(w, out + n, len - n);
    } else if (strcmp(cmd, "help") == 0) {
      reply(out, len, "ok " HELP);
    } else {
      log_info(NULL, "control: quit");
      wan_quit(w);
      reply(out, len, "ok bye");
    }
  } else if (strcmp(cmd, "cut") == 0) {
    uint64_t ns = 0;
    if (argc > 2) {
      reply(out, len, "error: usage: cut [DURATION]");
      return;
    }
    if (argc == 2) {
      int r = wan_parse_duration(argv[1], WAN_CUT_MAX_NS, &ns);
      if (r < 0 || ns == 0) {
        reply(out, len, "error: bad cut duration '%.64s': expected a duration such as "
              "500ms or 2s (more than 0, at most 24h)", argv[1]);
        return;
      }
    }
    unsigned n = wan_cut(w, ns);
    if (ns) {
      wan_format_duration(ns, buf, sizeof buf);
      log_info(NULL, "control: cut %s: reset %u connections", buf, n);
      reply(out, len, "ok cut %u connections, restoring in %s", n, buf);
    } else {
      log_info(NULL, "control: cut: reset %u connections", n);
      reply(out, len, "ok cut %u connections", n);
    }
  } else if (strcmp(cmd, "flip") == 0) {
    if (argc < 2 || argc > 3) {
      reply(out, len, "error: usage: flip N [up|down|both]");
      return;
    }
    char *end;
    errno = 0;
    unsigned long long n = strtoull(argv[1], &end, 10);
    if (errno || end == argv[1] || *end || argv[1][0] == '-' || n == 0 || n > WAN_FLIP_MAX) {
      reply(out, len, "error: bad flip count '%.64s': expected 1 to %llu", argv[1],
            (unsigned long long)WAN_FLIP_MAX);
      return;
    }
    const char *dir = argc == 3 ? argv[2] : "up";
    bool up = strcmp(dir, "up") == 0, down = strcmp(dir, "down") == 0;
    if (strcmp(dir, "both") == 0)
      up = down = true;
    if (!up && !down) {
      reply(out, len, "error: bad flip direction '%.64s': expected up, down or both", dir);
      return;
    }
    wan_flip(w, up, down, n);
    log_info(NULL, "control: flip %llu %s", n, dir);
    reply(out, len, "ok flip %llu %s", n, dir);
  } else {
    reply(out, len, "error: unknown command '%.64s' (try 'help')", cmd);
  }
}

/* --- clients ------------------------------------------------------------- */

void wan_control_resume(struct wan_control *ctl)
{
  if (ctl->spare_fd < 0)
    ctl->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (ctl->paused && wan_watch(ctl->w, ctl->fd, &ctl->h, EPOLLIN, &ctl->events) == 0)
    ctl->paused = false;
}

static void client_free(struct ctl_client *cl)
{
  struct wan_control *ctl = cl->ctl;
  wan_watch(ctl->w, cl->fd, &cl->h, 0, &cl->events);
  close(cl->fd);
  if (cl->prev)
    cl->prev->next = cl->next;
  else
    ctl->clients = cl->next;
  if (cl->next)
    cl->next->prev = cl->prev;
  ctl->nclients--;
  free(cl);
  wan_control_resume(ctl);
}

/* Queues a reply line (the caller made sure it fits). */
static void client_queue(struct ctl_client *cl, const char *line)
{
  size_t n = MIN(strlen(line), WAN_REPLY_MAX - 1);
  memcpy(cl->out + cl->out_len, line, n);
  cl->out[cl->out_len + n] = '\n';
  cl->out_len += n + 1;
}

/* Sends what it can; false if the client is gone. */
static bool client_flush(struct ctl_client *cl)
{
  while (cl->out_len) {
    ssize_t r = send(cl->fd, cl->out, cl->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0)
      return errno == EAGAIN || errno == EINTR;
    memmove(cl->out, cl->out + r, cl->out_len - (size_t)r);
    cl->out_len -= (size_t)r;
  }
  return true;
}

static bool line_is_text(const char *s, size_t n)
{
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if ((c < 0x20 && c != '\t') || c >= 0x7f)
      return false;
  }
  return true;
}

/* Runs the complete lines in cl->in while a reply still fits in cl->out
 * (the rest wait for the client to read: it is its own backpressure). */
static void client_lines(struct ctl_client *cl)
{
  while (!cl->draining && cl->out_len + WAN_REPLY_MAX <= OUT_MAX) {
    char *nl = memchr(cl->in, '\n', cl->in_len);
    if (!nl) {
      if (cl->in_len > WAN_CTL_LINE_MAX) {
        client_queue(cl, "error: line too long (at most 1024 bytes); disconnecting");
        cl->draining = true;
      }
      return;
    }
    size_t n = (size_t)(nl - cl->in);
    size_t used = n + 1;
    if (n && cl->in[n - 1] == '\r')
      n--;
    if (!line_is_text(cl->in, n)) {
      client_queue(cl, "error: control commands are lines of text; disconnecting");
      cl->draining = true;
      return;
    }
    cl->in[n] = '\0';
    char out[WAN_REPLY_MAX];
    wan_control_execute(cl->ctl->w, cl->in, out, sizeof out);
    client_queue(cl, out);
    memmove(cl->in, cl->in + used, cl->in_len - used);
    cl->in_len -= used;
  }
}

/* Reads input (or, when draining, discards it); false when the client must go. */
static bool client_read(struct ctl_client *cl)
{
  if (cl->draining) {
    char junk[4096];
    ssize_t r = recv(cl->fd, junk, sizeof junk, MSG_DONTWAIT);
    if (r < 0)
      return errno == EAGAIN || errno == EINTR;
    cl->discarded += (size_t)r;
    return r > 0 && cl->discarded <= DRAIN_MAX;
  }
  if (cl->closing || cl->in_len > WAN_CTL_LINE_MAX)
    return true;
  ssize_t r = recv(cl->fd, cl->in + cl->in_len, WAN_CTL_LINE_MAX + 1 - cl->in_len,
                   MSG_DONTWAIT);
  if (r < 0)
    return errno == EAGAIN || errno == EINTR;
  if (r == 0)
    cl->closing = true;      /* answer what came, then close */
  cl->in_len += (size_t)r;
  return true;
}

static void client_event(struct wan *w, struct wan_handler *hd, uint32_t events)
{
  struct ctl_client *cl = container_of(hd, struct ctl_client, h);
  if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !client_read(cl)) {
    client_free(cl);
    return;
  }
  size_t before;
  do {                       /* lines that waited for room in out go now */
    before = cl->out_len + cl->in_len;
    client_lines(cl);
    if (!client_flush(cl)) {
      client_free(cl);
      return;
    }
  } while (cl->out_len == 0 && cl->out_len + cl->in_len != before && !cl->draining);
  uint32_t want = EPOLLIN;
  if (cl->out_len) {
    want = EPOLLOUT;         /* no more input until it reads its replies */
  } else if (cl->draining) {
    if (!cl->shut_wr)
      shutdown(cl->fd, SHUT_WR);   /* the error reply is out: our side is done */
    cl->shut_wr = true;
  } else if (cl->closing) {
    client_free(cl);
    return;
  }
  if (wan_watch(w, cl->fd, &cl->h, want, &cl->events) < 0)
    client_free(cl);
}

static void listen_event(struct wan *w, struct wan_handler *hd, uint32_t events)
{
  struct wan_control *ctl = container_of(hd, struct wan_control, h);
  for (;;) {
    int fd = accept4(ctl->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EINTR)
        return;
      if (errno == EMFILE || errno == ENFILE) {
        if (ctl->spare_fd >= 0) {        /* one more client, on the spare's slot */
          close(ctl->spare_fd);
          ctl->spare_fd = -1;
          continue;
        }
        log_warn(NULL, "control accept: %s: paused until fds are freed", strerror(errno));
        ctl->paused = wan_watch(w, ctl->fd, &ctl->h, 0, &ctl->events) == 0;
        return;
      }
      if (errno == ENOBUFS || errno == ENOMEM) {
        log_warn(NULL, "control accept: %s", strerror(errno));
        return;
      }
      continue;
    }
    if (ctl->nclients >= MAX_CLIENTS) {
      static const char msg[] = "error: too many control clients\n";
      ssize_t r = send(fd, msg, sizeof msg - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
      (void)r;
      close(fd);
      continue;
    }
    struct ctl_client *cl = calloc(1, sizeof *cl);
    if (!cl) {
      close(fd);
      continue;
    }
    cl->h.fn = client_event;
    cl->ctl = ctl;
    cl->fd = fd;
    if (wan_watch(w, fd, &cl->h, EPOLLIN, &cl->events) < 0) {
      close(fd);
      free(cl);
      continue;
    }
    cl->next = ctl->clients;
    if (ctl->clients)
      ctl->clients->prev = cl;
    ctl->clients = cl;
    ctl->nclients++;
  }
}

/* --- listener ------------------------------------------------------------ */

static int listen_unix(struct wan_control *ctl, const char *path, char *err, size_t errlen)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  if (strlen(path) >= sizeof sa.sun_path) {
    snprintf(err, errlen, "control socket path is too long (at most %zu bytes): %s",
             sizeof sa.sun_path - 1, path);
    return -1;
  }
  strcpy(sa.sun_path, path);
  /* A socket left behind by a killed run is in the way; anything else is not ours. */
  struct stat st;
  if (lstat(path, &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      snprintf(err, errlen, "control path %s exists and is not a socket", path);
      return -1;
    }
    unlink(path);
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 16) < 0) {
    snprintf(err, errlen, "cannot listen on control socket %s: %s", path, strerror(errno));
    if (fd >= 0)
      close(fd);
    return -1;
  }
  snprintf(ctl->unix_path, sizeof ctl->unix_path, "%s", path);
  return fd;
}

struct wan_control *wan_control_start(struct wan *w, const char *spec, char *err,
                                      size_t errlen)
{
  struct wan_control *ctl = calloc(1, sizeof *ctl);
  if (!ctl) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  ctl->w = w;
  ctl->h.fn = listen_event;
  ctl->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (strncmp(spec, "unix:", 5) == 0) {
    char path[sizeof ctl->unix_path + 8];
    const char *p = spec + 5;
    if (p[0] != '/') {       /* the address handed out must not depend on our cwd */
      char cwd[4096];
      if (!getcwd(cwd, sizeof cwd) ||
          snprintf(path, sizeof path, "%s/%s", cwd, p) >= (int)sizeof path) {
        snprintf(err, errlen, "control socket path is too long: %s", p);
        free(ctl);
        return NULL;
      }
      p = path;
    }
    ctl->fd = listen_unix(ctl, p, err, errlen);
    snprintf(ctl->addr, sizeof ctl->addr, "unix:%s", ctl->unix_path);
  } else {
    int family;
    uint16_t port;
    ctl->fd = net_listen_tcp(spec, SOCK_NONBLOCK, "control", 16, &family, &port, err, errlen);
    if (ctl->fd >= 0) {
      struct sockaddr_storage ss;
      socklen_t sl = sizeof ss;
      char host[NI_MAXHOST], serv[NI_MAXSERV];
      if (getsockname(ctl->fd, (struct sockaddr *)&ss, &sl) < 0 ||
          getnameinfo((struct sockaddr *)&ss, sl, host, sizeof host, serv, sizeof serv,
                      NI_NUMERICHOST | NI_NUMERICSERV) != 0)
        snprintf(ctl->addr, sizeof ctl->addr, "?");
      else
        snprintf(ctl->addr, sizeof ctl->addr, family == AF_INET6 ? "[%s]:%s" : "%s:%s",
                 host, serv);
    }
  }
  if (ctl->fd < 0) {
    if (ctl->spare_fd >= 0)
      close(ctl->spare_fd);
    free(ctl);
    return NULL;
  }
  if (wan_watch(w, ctl->fd, &ctl->h, EPOLLIN, &ctl->events) < 0) {
    snprintf(err, errlen, "cannot watch the control socket");
    close(ctl->fd);
    if (ctl->spare_fd >= 0)
      close(ctl->spare_fd);
    if (ctl->unix_path[0])
      unlink(ctl->unix_path);
    free(ctl);
    return NULL;
  }
  return ctl;
}

void wan_control_stop(struct wan_control *ctl)
{
  while (ctl->clients) {
    client_flush(ctl->clients);      /* a "quit" reply goes out before we do */
    client_free(ctl->clients);
  }
  wan_watch(ctl->w, ctl->fd, &ctl->h, 0, &ctl->events);
  close(ctl->fd);
  if (ctl->spare_fd >= 0)
    close(ctl->spare_fd);
  if (ctl->unix_path[0] && unlink(ctl->unix_path) < 0 && errno != ENOENT)
    log_warn(NULL, "cannot remove %s: %s", ctl->unix_path, strerror(errno));
  free(ctl);
}

const char *wan_control_addr(const struct wan_control *ctl)
{
  return ctl->addr;
}
