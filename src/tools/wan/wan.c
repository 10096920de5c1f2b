/* wan: ferry-wan's entry point, a userspace WAN emulator for tests and
 * benchmarks (docs/wan.md).
 *
 *   ferry-wan --listen HOST:PORT --connect HOST:PORT [--control ADDR] ...
 *   ferry-wan ctl ADDR COMMAND...
 *
 * The first form runs the proxy: flags -> listener, target, control socket
 * (proxy.c, control.c) -> --ready-file (atomically: temp file + rename) ->
 * "ready" -> event loop until `quit` or SIGTERM/SIGINT/SIGHUP -> the ready
 * file and a unix control socket are removed -> exit 0.  The stop signals
 * are blocked before anything else and read from a signalfd on the loop, so
 * no handler ever runs; SIGPIPE is ignored (a peer that goes away is an
 * error on its socket).
 *
 * The second form is the control client: one command, one reply printed,
 * exit 0 on "ok", 1 on "error: ..." or no answer, 2 on bad usage.
 *
 * Exit status of the proxy: 0 after a clean stop, 1 if it could not start,
 * 2 on bad flags. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "tools/wan/wan.h"

#define CTL_TIMEOUT_MS 10000

struct options {
  struct wan_config cfg;
  const char *ready_file;
  enum log_level log_level;
};

static void usage(FILE *f)
{
  fprintf(f,
    "Usage: ferry-wan --listen HOST:PORT --connect HOST:PORT [OPTION]...\n"
    "       ferry-wan ctl unix:PATH|HOST:PORT COMMAND...\n"
    "A userspace WAN emulator for tests and benchmarks: forwards every TCP\n"
    "connection made to --listen to --connect, adding delay and a bandwidth cap,\n"
    "and stalls, cuts or corrupts the traffic on command.\n"
    "\n"
    "  --listen HOST:PORT      where clients connect; port 0 picks a free port\n"
    "  --connect HOST:PORT     where each connection is forwarded\n"
    "  --control unix:PATH|HOST:PORT\n"
    "                          control channel (TCP only on loopback; port 0 picks\n"
    "                          a free port) [none]\n"
    "  --delay DURATION        one-way delay added in EACH direction (the round trip\n"
    "                          grows by twice this): 0, 250us, 10ms, 1.5s [0]\n"
    "  --rate RATE             bandwidth cap per direction, shared by all connections;\n"
    "                          0 = unlimited [0].  BITS per second with decimal units:\n"
    "                          100mbit, 1gbit, 512kbit, 2000bit, or a plain number\n"
    "                          (1000000 = 1 Mbit/s).  BYTES per second with binary\n"
    "                          units: 12.5M, 64K, 1GiB/s, 100B (1M = 1048576 bytes/s).\n"
    "  --ready-file FILE       once listening, write {\"pid\",\"listen\",\"control\"} to\n"
    "                          FILE (atomically); removed on a clean exit\n"
    "  --log-level LEVEL       error, warn, info or debug [info]\n"
    "  -h, --help              this help\n"
    "  -V, --version           version\n"
    "\n"
    "Control commands (one per line, one reply line each, \"ok ...\" or \"error: ...\"):\n"
    "  delay DURATION, rate RATE, stall, unstall, cut [DURATION], restore,\n"
    "  flip N [up|down|both], stats, help, quit.  Up is listen side -> connect side.\n"
    "\n"
    "Exit status: 0 after quit, SIGTERM or SIGINT; 1 if ferry-wan could not start;\n"
    "2 on bad options.  ctl: 0 on an \"ok\" reply, 1 on an error or no reply.\n");
}

static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void usage_error(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "ferry-wan: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\nTry 'ferry-wan --help'.\n");
  va_end(ap);
  exit(2);
}

static bool addr_is_loopback(const struct sockaddr *sa)
{
  if (sa->sa_family == AF_INET)
    return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
  if (sa->sa_family == AF_INET6) {
    const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
    return IN6_IS_ADDR_LOOPBACK(a) ||
           (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
  }
  return false;
}

/* The control channel has no authentication: it may listen on loopback only. */
static void check_control(const char *spec)
{
  if (strncmp(spec, "unix:", 5) == 0) {
    if (!spec[5])
      usage_error("bad --control '%s': unix: needs a socket path", spec);
    return;
  }
  char host[256];
  uint16_t port;
  if (parse_host_port(spec, host, sizeof host, &port) < 0)
    usage_error("bad --control address '%s': expected unix:PATH or HOST:PORT", spec);
  struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
  struct addrinfo *ai;
  int gai = getaddrinfo(host, NULL, &hints, &ai);
  if (gai)
    usage_error("bad --control host '%s': %s", host, gai_strerror(gai));
  bool loopback = true;
  for (struct addrinfo *p = ai; p; p = p->ai_next)
    loopback = loopback && addr_is_loopback(p->ai_addr);
  freeaddrinfo(ai);
  if (!loopback)
    usage_error("bad --control address '%s': TCP control listens on loopback only "
                "(127.0.0.1, ::1, localhost) since it has no authentication", spec);
}

static void parse_args(int argc, char **argv, struct options *o)
{
  enum { OPT_LISTEN = 256, OPT_CONNECT, OPT_CONTROL, OPT_DELAY, OPT_RATE, OPT_READY,
         OPT_LOG_LEVEL };
  static const struct option longopts[] = {
    { "listen", required_argument, NULL, OPT_LISTEN },
    { "connect", required_argument, NULL, OPT_CONNECT },
    { "control", required_argument, NULL, OPT_CONTROL },
    { "delay", required_argument, NULL, OPT_DELAY },
    { "rate", required_argument, NULL, OPT_RATE },
    { "ready-file", required_argument, NULL, OPT_READY },
    { "log-level", required_argument, NULL, OPT_LOG_LEVEL },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { NULL, 0, NULL, 0 },
  };
  *o = (struct options){ .log_level = LOG_INFO };
  opterr = 0;   /* our own messages */
  int c;
  while ((c = getopt_long(argc, argv, ":hV", longopts, NULL)) != -1) {
    char host[256];
    uint16_t port;
    int r;
    switch (c) {
    case OPT_LISTEN:
      if (parse_host_port(optarg, host, sizeof host, &port) < 0)
        usage_error("bad --listen address '%s': expected HOST:PORT or [V6]:PORT", optarg);
      o->cfg.listen = optarg;
      break;
    case OPT_CONNECT:
      if (parse_host_port(optarg, host, sizeof host, &port) < 0 || port == 0)
        usage_error("bad --connect address '%s': expected HOST:PORT or [V6]:PORT "
                    "with a port other than 0", optarg);
      o->cfg.connect = optarg;
      break;
    case OPT_CONTROL:
      check_control(optarg);
      o->cfg.control = optarg;
      break;
    case OPT_DELAY:
      r = wan_parse_duration(optarg, WAN_DELAY_MAX_NS, &o->cfg.delay_ns);
      if (r < 0)
        usage_error("bad --delay '%s': %s", optarg,
                    r == -ERANGE ? "at most 60s"
                                 : "expected a duration such as 10ms, 1.5s or 0 "
                                   "(units ns, us, ms, s, min)");
      break;
    case OPT_RATE:
      r = wan_parse_rate(optarg, &o->cfg.rate_bps);
      if (r < 0)
        usage_error("bad --rate '%s': %s", optarg,
                    r == -ERANGE ? "out of range (8bit to 10tbit, or 0 for unlimited)"
                                 : "expected bits/s (100mbit, 1gbit, 5000000) or "
                                   "bytes/s with a byte unit (12.5M, 64KiB/s)");
      break;
    case OPT_READY:
      if (!optarg[0])
        usage_error("--ready-file needs a file name");
      o->ready_file = optarg;
      break;
    case OPT_LOG_LEVEL:
      if (log_parse_level(optarg, &o->log_level) < 0)
        usage_error("bad --log-level '%s': expected error, warn, info or debug", optarg);
      break;
    case 'h':
      usage(stdout);
      exit(0);
    case 'V':
      printf("ferry-wan %s\n", FERRY_VERSION);
      exit(0);
    case ':':
      usage_error("option '%s' needs an argument", argv[optind - 1]);
      break;
    default:
      usage_error("unknown option '%s'", argv[optind - 1]);
    }
  }
  if (optind < argc)
    usage_error("unexpected argument '%s'", argv[optind]);
  if (!o->cfg.listen)
    usage_error("--listen HOST:PORT is required");
  if (!o->cfg.connect)
    usage_error("--connect HOST:PORT is required");
}

/* Appends s to buf as a JSON string (quoted, escaped). */
static void json_string(char *buf, size_t len, const char *s)
{
  size_t n = strlen(buf);
  if (n + 1 < len)
    buf[n++] = '"';
  for (; *s && n + 8 < len; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\')
      n += (size_t)snprintf(buf + n, len - n, "\\%c", ch);
    else if (ch < 0x20)
      n += (size_t)snprintf(buf + n, len - n, "\\u%04x", ch);
    else
      buf[n++] = (char)ch;
  }
  if (n + 1 < len)
    buf[n++] = '"';
  buf[n] = '\0';
}

/* Writes the ready file by temp file + fsync + rename, so a reader sees no
 * file or the whole of it. */
static int write_ready_file(const char *path, const char *listen, const char *control,
                            char *err, size_t errlen)
{
  char text[8192];
  snprintf(text, sizeof text, "{\"pid\":%d,\"listen\":", (int)getpid());
  json_string(text, sizeof text, listen);
  size_t n = strlen(text);
  snprintf(text + n, sizeof text - n, ",\"control\":");
  if (control) {
    json_string(text, sizeof text, control);
  } else {
    n = strlen(text);
    snprintf(text + n, sizeof text - n, "null");
  }
  n = strlen(text);
  snprintf(text + n, sizeof text - n, "}\n");

  return write_file_atomic(path, text, strlen(text), 0644, err, errlen);
}

/* --- ferry-wan ctl ------------------------------------------------------- */

static int ctl_connect(const char *addr)
{
  if (strncmp(addr, "unix:", 5) == 0) {
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (!addr[5] || strlen(addr + 5) >= sizeof sa.sun_path) {
      fprintf(stderr, "ferry-wan ctl: bad control socket path '%s'\n", addr + 5);
      return -1;
    }
    strcpy(sa.sun_path, addr + 5);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
      fprintf(stderr, "ferry-wan ctl: cannot connect to %s: %s\n", addr, strerror(errno));
      if (fd >= 0)
        close(fd);
      return -1;
    }
    return fd;
  }
  char host[256], portstr[8];
  uint16_t port;
  if (parse_host_port(addr, host, sizeof host, &port) < 0) {
    fprintf(stderr, "ferry-wan ctl: bad address '%s': expected unix:PATH or HOST:PORT\n", addr);
    return -1;
  }
  snprintf(portstr, sizeof portstr, "%u", port);
  struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                            .ai_flags = AI_NUMERICSERV };
  struct addrinfo *ai;
  int gai = getaddrinfo(host, portstr, &hints, &ai);
  if (gai) {
    fprintf(stderr, "ferry-wan ctl: cannot resolve '%s': %s\n", host, gai_strerror(gai));
    return -1;
  }
  int fd = -1, e = 0;
  for (struct addrinfo *p = ai; p && fd < 0; p = p->ai_next) {
    fd = socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol);
    if (fd >= 0 && connect(fd, p->ai_addr, p->ai_addrlen) < 0) {
      e = errno;
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(ai);
  if (fd < 0)
    fprintf(stderr, "ferry-wan ctl: cannot connect to %s: %s\n", addr, strerror(e));
  return fd;
}

static int ctl_main(int argc, char **argv)
{
  if (argc >= 3 && (strcmp(argv[2], "-h") == 0 || strcmp(argv[2], "--help") == 0)) {
    printf("Usage: ferry-wan ctl unix:PATH|HOST:PORT COMMAND...\n"
           "Sends one control command to a running ferry-wan and prints its reply\n"
           "(\"ok ...\" on stdout, \"error: ...\" on stderr).  Exit status: 0 on ok,\n"
           "1 on an error reply or no reply, 2 on bad usage.  'help' lists commands.\n");
    return 0;
  }
  if (argc < 4) {
    fprintf(stderr, "ferry-wan ctl: usage: ferry-wan ctl unix:PATH|HOST:PORT COMMAND...\n");
    return 2;
  }
  char line[WAN_CTL_LINE_MAX + 2] = "";
  size_t n = 0;
  for (int i = 3; i < argc; i++) {
    size_t al = strlen(argv[i]);
    if (strchr(argv[i], '\n') || n + al + 2 > WAN_CTL_LINE_MAX + 1) {
      fprintf(stderr, "ferry-wan ctl: the command must be one line of at most %d bytes\n",
              WAN_CTL_LINE_MAX);
      return 2;
    }
    if (i > 3)
      line[n++] = ' ';
    memcpy(line + n, argv[i], al);
    n += al;
  }
  line[n++] = '\n';

  int fd = ctl_connect(argv[2]);
  if (fd < 0)
    return 1;
  if (write_full(fd, line, n) < 0) {
    fprintf(stderr, "ferry-wan ctl: send to %s: %s\n", argv[2], strerror(errno));
    close(fd);
    return 1;
  }
  char reply[WAN_REPLY_MAX + 1];
  size_t got = 0;
  while (got < WAN_REPLY_MAX && !memchr(reply, '\n', got)) {
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    int p = poll(&pfd, 1, CTL_TIMEOUT_MS);
    if (p == 0) {
      fprintf(stderr, "ferry-wan ctl: no reply from %s within %d s\n", argv[2],
              CTL_TIMEOUT_MS / 1000);
      close(fd);
      return 1;
    }
    if (p < 0 && errno == EINTR)
      continue;
    ssize_t r = p < 0 ? -1 : read(fd, reply + got, WAN_REPLY_MAX - got);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    got += (size_t)r;
  }
  close(fd);
  char *nl = memchr(reply, '\n', got);
  if (!nl) {
    fprintf(stderr, "ferry-wan ctl: %s closed the connection without a reply\n", argv[2]);
    return 1;
  }
  *nl = '\0';
  if (strncmp(reply, "ok", 2) == 0 && (reply[2] == '\0' || reply[2] == ' ')) {
    printf("%s\n", reply);
    return 0;
  }
  fprintf(stderr, "%s\n", reply);
  return 1;
}

/* --- the proxy ----------------------------------------------------------- */

int main(int argc, char **argv)
{
  if (argc >= 2 && strcmp(argv[1], "ctl") == 0)
    return ctl_main(argc, argv);

  struct options o;
  parse_args(argc, argv, &o);
  log_init("ferry-wan");
  log_set_level(o.log_level);

  /* Before anything else: the loop reads these from a signalfd. */
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGHUP);
  sigprocmask(SIG_BLOCK, &stop, NULL);
  signal(SIGPIPE, SIG_IGN);

  char err[1024];
  struct wan *w = wan_create(&o.cfg, err, sizeof err);
  if (!w) {
    log_error(NULL, "%s", err);
    return 1;
  }
  if (o.ready_file && write_ready_file(o.ready_file, wan_listen_address(w),
                                       wan_control_address(w), err, sizeof err) < 0) {
    log_error(NULL, "%s", err);
    wan_destroy(w);
    return 1;
  }
  char delay[32], rate[32];
  wan_format_duration(o.cfg.delay_ns, delay, sizeof delay);
  wan_format_rate(o.cfg.rate_bps, rate, sizeof rate);
  log_info(NULL, "ready: listening on %s, forwarding to %s, control %s, delay %s, rate %s",
           wan_listen_address(w), o.cfg.connect,
           wan_control_address(w) ? wan_control_address(w) : "none", delay, rate);

  int r = wan_run(w);
  wan_destroy(w);
  if (o.ready_file && unlink(o.ready_file) < 0 && errno != ENOENT)
    log_warn(NULL, "cannot remove %s: %s", o.ready_file, strerror(errno));
  log_info(NULL, "stopped");
  return r < 0 ? 1 : 0;
}
