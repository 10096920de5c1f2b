/* ferryd: the site daemon's entry point (flags in docs/cli.md).
 *
 * Start-up order: flags -> data directory -> registry (opens every disk) ->
 * NBD listener -> REST API -> DATA_DIR/ferryd.json (atomically) -> "ready".
 * Shut-down (SIGTERM/SIGINT) runs it backwards: the API stops first so no
 * request changes the registry while the NBD listener drains its clients
 * (requests in flight are finished and answered), then the registry syncs
 * and closes every disk and dirty map, then ferryd.json goes.  ferryd.json
 * exists only while the daemon serves, so a tool that finds it can use it.
 *
 * Signals: SIGTERM, SIGINT and SIGHUP are blocked before any thread starts
 * (threads inherit the mask) and taken with sigwait() in the main thread, so
 * no handler ever runs inside library code.  SIGHUP (the terminal went away)
 * stops the daemon like SIGTERM rather than killing it unsynced.  SIGPIPE is ignored: a client
 * that goes away is an error on its socket, not the death of the daemon.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/disk_api.h"
#include "api/http.h"
#include "common/log.h"
#include "common/util.h"
#include "disk/registry.h"
#include "ferryd/nbd_glue.h"

#define DEFAULT_DATA_DIR "./ferry-data"
#define DEFAULT_API "127.0.0.1:7450"
#define DEFAULT_WORKERS 4
#define MAX_WORKERS 256

struct options {
  const char *data_dir;
  const char *api;
  const char *nbd;            /* NULL: unix:DATA_DIR/nbd.sock */
  unsigned workers;
  enum log_level log_level;
  bool cbt, heat;
};

static void usage(FILE *f)
{
  fprintf(f,
    "Usage: ferryd [OPTION]...\n"
    "The ferry site daemon: serves VM disks over NBD and a REST API to manage them.\n"
    "\n"
    "  --data-dir DIR          registry (ferry.db), created images (disks/) and dirty\n"
    "                          maps (cbt/); created if absent [" DEFAULT_DATA_DIR "]\n"
    "  --api HOST:PORT         REST API address; port 0 picks a free port\n"
    "                          [" DEFAULT_API "]\n"
    "  --nbd unix:PATH|HOST:PORT\n"
    "                          NBD listener; port 0 picks a free port\n"
    "                          [unix:DIR/nbd.sock]\n"
    "  --workers N             helper threads per NBD connection for requests that\n"
    "                          may block, 0-%d [%d]\n"
    "  --log-level LEVEL       error, warn, info or debug [info]\n"
    "  --no-cbt                no changed-block tracking (benchmarks only: disks served\n"
    "                          this way cannot be replicated incrementally; their maps\n"
    "                          are marked all dirty when tracking comes back)\n"
    "  --no-heat               no heat, statistics or trace (benchmarks only)\n"
    "  -h, --help              this help\n"
    "  -V, --version           version\n"
    "\n"
    "When ready, ferryd writes DIR/ferryd.json ({\"pid\", \"api\", \"nbd\"}) and logs\n"
    "\"ready\".  SIGTERM, SIGINT or SIGHUP: stop accepting, finish requests in\n"
    "flight, sync every disk and dirty map, remove ferryd.json, exit 0.\n"
    "Exit status: 0 after a clean stop, 1 if ferryd could not start, 2 on bad\n"
    "options.\n",
    MAX_WORKERS, DEFAULT_WORKERS);
}

static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void usage_error(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "ferryd: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\nTry 'ferryd --help'.\n");
  va_end(ap);
  exit(2);
}

static void parse_args(int argc, char **argv, struct options *o)
{
  enum { OPT_DATA_DIR = 256, OPT_API, OPT_NBD, OPT_WORKERS, OPT_LOG_LEVEL, OPT_NO_CBT,
         OPT_NO_HEAT };
  static const struct option longopts[] = {
    { "data-dir", required_argument, NULL, OPT_DATA_DIR },
    { "api", required_argument, NULL, OPT_API },
    { "nbd", required_argument, NULL, OPT_NBD },
    { "workers", required_argument, NULL, OPT_WORKERS },
    { "log-level", required_argument, NULL, OPT_LOG_LEVEL },
    { "no-cbt", no_argument, NULL, OPT_NO_CBT },
    { "no-heat", no_argument, NULL, OPT_NO_HEAT },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { NULL, 0, NULL, 0 },
  };
  *o = (struct options){ .data_dir = DEFAULT_DATA_DIR, .api = DEFAULT_API,
                         .workers = DEFAULT_WORKERS, .log_level = LOG_INFO,
                         .cbt = true, .heat = true };
  opterr = 0;   /* our own messages */
  int c;
  while ((c = getopt_long(argc, argv, ":hV", longopts, NULL)) != -1) {
    switch (c) {
    case OPT_DATA_DIR:
      if (!optarg[0])
        usage_error("--data-dir needs a directory");
      o->data_dir = optarg;
      break;
    case OPT_API: {
      char host[256];
      uint16_t port;
      if (parse_host_port(optarg, host, sizeof host, &port) < 0)
        usage_error("bad --api address '%s': expected HOST:PORT or [IPV6]:PORT", optarg);
      o->api = optarg;
      break;
    }
    case OPT_NBD:
      if (strncmp(optarg, "unix:", 5) == 0) {
        if (!optarg[5])
          usage_error("bad --nbd '%s': unix: needs a socket path", optarg);
      } else {
        char host[256];
        uint16_t port;
        if (parse_host_port(optarg, host, sizeof host, &port) < 0)
          usage_error("bad --nbd address '%s': expected unix:PATH or HOST:PORT", optarg);
      }
      o->nbd = optarg;
      break;
    case OPT_WORKERS: {
      char *end;
      errno = 0;
      long n = strtol(optarg, &end, 10);
      if (errno || end == optarg || *end || n < 0 || n > MAX_WORKERS)
        usage_error("bad --workers '%s': expected a number from 0 to %d", optarg, MAX_WORKERS);
      o->workers = (unsigned)n;
      break;
    }
    case OPT_LOG_LEVEL:
      if (log_parse_level(optarg, &o->log_level) < 0)
        usage_error("bad --log-level '%s': expected error, warn, info or debug", optarg);
      break;
    case OPT_NO_CBT:
      o->cbt = false;
      break;
    case OPT_NO_HEAT:
      o->heat = false;
      break;
    case 'h':
      usage(stdout);
      exit(0);
    case 'V':
      printf("ferryd %s\n", FERRY_VERSION);
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
}

/* mkdir -p; returns 0 or -1 with a message. */
static int make_dirs(const char *path, char *err, size_t errlen)
{
  char buf[PATH_MAX];
  if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) {
    snprintf(err, errlen, "data directory path is too long");
    return -1;
  }
  for (char *p = buf + 1;; p++) {
    if (*p == '/' || *p == '\0') {
      char saved = *p;
      *p = '\0';
      if (mkdir(buf, 0750) < 0 && errno != EEXIST) {
        snprintf(err, errlen, "cannot create data directory %.512s: %s", buf, strerror(errno));
        return -1;
      }
      *p = saved;
      if (!saved)
        break;
    }
  }
  struct stat st;
  if (stat(path, &st) < 0 || !S_ISDIR(st.st_mode)) {
    snprintf(err, errlen, "data directory %.512s is not a directory", path);
    return -1;
  }
  return 0;
}

/* Writes DIR/ferryd.json by temp file + fsync + rename + dir fsync, so a
 * reader sees the old file, no file or the whole new one. */
static int write_state_file(const char *dir, const char *api_url, const char *nbd_addr,
                            char *err, size_t errlen)
{
  json_t *doc = json_pack("{s:I, s:s, s:s}", "pid", (json_int_t)getpid(), "api", api_url,
                          "nbd", nbd_addr);
  char *text = doc ? json_dumps(doc, JSON_INDENT(2)) : NULL;
  json_decref(doc);
  char *tmp = NULL, *path = NULL;
  int ret = -1, fd = -1;
  if (!text || asprintf(&tmp, "%s/.ferryd.json.tmp", dir) < 0 ||
      asprintf(&path, "%s/ferryd.json", dir) < 0) {
    snprintf(err, errlen, "out of memory");
    goto out;
  }
  fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0 || write_full(fd, text, strlen(text)) < 0 || write_full(fd, "\n", 1) < 0 ||
      fsync(fd) < 0) {
    snprintf(err, errlen, "cannot write %s: %s", tmp, strerror(errno));
    goto out;
  }
  close(fd);
  fd = -1;
  if (rename(tmp, path) < 0 || fsync_parent_dir(path) < 0) {
    snprintf(err, errlen, "cannot write %s: %s", path, strerror(errno));
    goto out;
  }
  ret = 0;
out:
  if (fd >= 0)
    close(fd);
  if (ret < 0 && tmp)
    unlink(tmp);
  free(text);
  free(tmp);
  free(path);
  return ret;
}

int main(int argc, char **argv)
{
  struct options o;
  parse_args(argc, argv, &o);
  log_init("ferryd");
  log_set_level(o.log_level);

  /* Before any thread exists: every thread inherits this mask. */
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
  signal(SIGPIPE, SIG_IGN);

  char err[1024];
  if (make_dirs(o.data_dir, err, sizeof err) < 0) {
    log_error(NULL, "%s", err);
    return 1;
  }
  char data_dir[PATH_MAX];
  if (!realpath(o.data_dir, data_dir)) {
    log_error(NULL, "data directory %s: %s", o.data_dir, strerror(errno));
    return 1;
  }

  /* The NBD address as given to people must not depend on our cwd. */
  char nbd_spec[2 * PATH_MAX + 16];
  if (!o.nbd) {
    snprintf(nbd_spec, sizeof nbd_spec, "unix:%s/nbd.sock", data_dir);
  } else if (strncmp(o.nbd, "unix:", 5) == 0 && o.nbd[5] != '/') {
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) {
      log_error(NULL, "getcwd: %s", strerror(errno));
      return 1;
    }
    snprintf(nbd_spec, sizeof nbd_spec, "unix:%s/%s", cwd, o.nbd + 5);
  } else {
    snprintf(nbd_spec, sizeof nbd_spec, "%s", o.nbd);
  }

  log_info(NULL, "ferryd %s starting: data dir %s%s%s", FERRY_VERSION, data_dir,
           o.cbt ? "" : ", CBT OFF", o.heat ? "" : ", heat OFF");
  struct registry_options ropt = { .cbt_enabled = o.cbt, .heat_enabled = o.heat };
  struct registry *reg = registry_open(data_dir, &ropt, err, sizeof err);
  if (!reg) {
    log_error(NULL, "%s", err);
    return 1;
  }
  struct nbd_listener *nbd = nbd_listener_start(reg, nbd_spec, o.workers, err, sizeof err);
  if (!nbd) {
    log_error(NULL, "%s", err);
    registry_close(reg);
    return 1;
  }
  struct disk_api *api = disk_api_start(o.api, reg, nbd, err, sizeof err);
  if (!api) {
    log_error(NULL, "%s", err);
    nbd_listener_stop(nbd);
    registry_close(reg);
    return 1;
  }
  if (write_state_file(data_dir, disk_api_url(api), nbd_listener_address(nbd), err,
                       sizeof err) < 0) {
    log_error(NULL, "%s", err);
    disk_api_stop(api);
    nbd_listener_stop(nbd);
    registry_close(reg);
    return 1;
  }
  log_info(NULL, "ready: api %s, nbd %s", disk_api_url(api), nbd_listener_address(nbd));

  int sig = 0;
  for (;;) {
    int e = sigwait(&stop_signals, &sig);
    if (e == 0)
      break;
    if (e != EINTR) {
      log_error(NULL, "sigwait: %s", strerror(e));
      break;
    }
  }
  log_info(NULL, "%s: shutting down", sig ? strsignal(sig) : "stop");

  disk_api_stop(api);
  nbd_listener_stop(nbd);
  registry_close(reg);

  char state[PATH_MAX + 16];
  snprintf(state, sizeof state, "%s/ferryd.json", data_dir);
  if (unlink(state) < 0 && errno != ENOENT)
    log_warn(NULL, "cannot remove %s: %s", state, strerror(errno));
  else
    fsync_parent_dir(state);
  log_info(NULL, "stopped");
  return 0;
}
