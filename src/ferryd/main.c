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
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/api.h"
#include "api/http.h"
#include "common/db.h"
#include "common/log.h"
#include "common/util.h"
#include "disk/registry.h"
#include "ferryd/nbd_glue.h"
#include "link/link.h"
#include "replicate/migration.h"
#include "site/site.h"
#include "vm/vm.h"

#define DEFAULT_DATA_DIR "./ferry-data"
#define DEFAULT_API "127.0.0.1:7450"
#define DEFAULT_LINK "127.0.0.1:7451"
#define LINK_HANDSHAKE_MS 10000
#define DEFAULT_WORKERS 4
#define MAX_WORKERS 256

struct options {
  const char *data_dir;
  const char *api;
  const char *nbd;            /* NULL: unix:DATA_DIR/nbd.sock */
  const char *link;           /* site link listener, NULL: off */
  const char *link_advertise; /* what peers dial, NULL: the bound address */
  const char *simvm;          /* the sim VM program, NULL: beside ferryd */
  const char *qemu;           /* the QEMU program, NULL: qemu-system-x86_64 on $PATH */
  unsigned qemu_stop_ms;      /* how long a qemu guest may take to power down */
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
    "  --link HOST:PORT        site link listener (TLS, for migrations); port 0 picks\n"
    "                          a free port; it listens once the site has an identity\n"
    "                          (`ferry site init`) [" DEFAULT_LINK "]\n"
    "  --link-advertise HOST:PORT\n"
    "                          the link address peers should dial, when it is not the\n"
    "                          one bound (NAT, a WAN proxy, 0.0.0.0) [the bound one]\n"
    "  --no-link               no site link listener: this site cannot receive\n"
    "                          migrations (it can still send them)\n"
    "  --simvm PATH            the simulated VM program [ferry-simvm beside ferryd]\n"
    "  --qemu PATH             the QEMU program of qemu VMs [qemu-system-x86_64 on\n"
    "                          $PATH]\n"
    "  --qemu-stop-timeout D   how long `vm stop` waits for a qemu guest to power\n"
    "                          down before it quits QEMU: 500ms, 30s, 2m [30s]\n"
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
    "When ready, ferryd writes DIR/ferryd.json ({\"pid\", \"api\", \"nbd\", \"link\"})\n"
    "and logs \"ready\".  VMs it starts run on when ferryd stops, and are adopted\n"
    "again by the next ferryd; migrations in progress resume.\n"
    "SIGTERM, SIGINT or SIGHUP: stop accepting, finish requests in\n"
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
         OPT_NO_HEAT, OPT_LINK, OPT_LINK_ADVERTISE, OPT_NO_LINK, OPT_SIMVM, OPT_QEMU,
         OPT_QEMU_STOP };
  static const struct option longopts[] = {
    { "data-dir", required_argument, NULL, OPT_DATA_DIR },
    { "api", required_argument, NULL, OPT_API },
    { "nbd", required_argument, NULL, OPT_NBD },
    { "workers", required_argument, NULL, OPT_WORKERS },
    { "log-level", required_argument, NULL, OPT_LOG_LEVEL },
    { "no-cbt", no_argument, NULL, OPT_NO_CBT },
    { "no-heat", no_argument, NULL, OPT_NO_HEAT },
    { "link", required_argument, NULL, OPT_LINK },
    { "link-advertise", required_argument, NULL, OPT_LINK_ADVERTISE },
    { "no-link", no_argument, NULL, OPT_NO_LINK },
    { "simvm", required_argument, NULL, OPT_SIMVM },
    { "qemu", required_argument, NULL, OPT_QEMU },
    { "qemu-stop-timeout", required_argument, NULL, OPT_QEMU_STOP },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { NULL, 0, NULL, 0 },
  };
  *o = (struct options){ .data_dir = DEFAULT_DATA_DIR, .api = DEFAULT_API,
                         .workers = DEFAULT_WORKERS, .log_level = LOG_INFO,
                         .cbt = true, .heat = true, .link = DEFAULT_LINK,
                         .qemu_stop_ms = 30000 };
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
    case OPT_LINK:
    case OPT_LINK_ADVERTISE: {
      char host[256];
      uint16_t port;
      if (parse_host_port(optarg, host, sizeof host, &port) < 0 ||
          (c == OPT_LINK_ADVERTISE && port == 0))
        usage_error("bad --%s address '%s': expected HOST:PORT or [IPV6]:PORT",
                    c == OPT_LINK ? "link" : "link-advertise", optarg);
      if (c == OPT_LINK)
        o->link = optarg;
      else
        o->link_advertise = optarg;
      break;
    }
    case OPT_NO_LINK:
      o->link = NULL;
      break;
    case OPT_SIMVM:
      if (!optarg[0])
        usage_error("--simvm needs a program path");
      o->simvm = optarg;
      break;
    case OPT_QEMU:
      if (!optarg[0])
        usage_error("--qemu needs a program path");
      o->qemu = optarg;
      break;
    case OPT_QEMU_STOP: {
      char *end;
      errno = 0;
      double v = strtod(optarg, &end);
      double mul = strcmp(end, "ms") == 0 ? 1 : strcmp(end, "s") == 0 || !*end ? 1000
                   : strcmp(end, "m") == 0 ? 60000 : 0;
      if (errno || end == optarg || mul == 0 || v <= 0 || v * mul > 3600e3 || v * mul < 1)
        usage_error("bad --qemu-stop-timeout '%s': expected a duration such as 500ms, 30s, 2m "
                    "(up to 1 h)", optarg);
      o->qemu_stop_ms = (unsigned)(v * mul + 0.5);
      break;
    }
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
                            const char *link_addr, char *err, size_t errlen)
{
  json_t *doc = json_pack("{s:I, s:s, s:s}", "pid", (json_int_t)getpid(), "api", api_url,
                          "nbd", nbd_addr);
  json_object_set_new(doc, "link", link_addr && link_addr[0] ? json_string(link_addr)
                                                             : json_null());
  char *text = doc ? json_dumps(doc, JSON_INDENT(2)) : NULL;
  json_decref(doc);
  char *path = NULL, *full = NULL;
  int ret = -1;
  if (!text || asprintf(&path, "%s/ferryd.json", dir) < 0 || asprintf(&full, "%s\n", text) < 0)
    snprintf(err, errlen, "out of memory");
  else
    ret = write_file_atomic(path, full, strlen(full), 0644, err, errlen);
  free(text);
  free(full);
  free(path);
  return ret;
}

/* What main() starts, for the callbacks that need it. */
struct daemon {
  const struct options *opt;
  const char *data_dir;
  struct registry *reg;
  struct db *db;
  struct site *site;
  struct nbd_listener *nbd;
  struct vm_manager *vms;
  struct migrations *mig;
  struct api api;
  bool api_started;
  pthread_mutex_t lock;       /* guards link, stopping */
  struct link_listener *link;
  bool stopping;
};

/* The sim VM program: --simvm, else ferry-simvm beside this executable,
 * else whatever PATH finds at start time. */
static void find_simvm(const char *given, char *out, size_t len)
{
  if (given) {
    snprintf(out, len, "%s", given);
    return;
  }
  char self[PATH_MAX - 16];
  ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  if (n > 0) {
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (slash) {
      *slash = '\0';
      snprintf(out, len, "%s/ferry-simvm", self);
      if (access(out, X_OK) == 0)
        return;
    }
  }
  const char *path = getenv("PATH");
  char *copy = strdup(path ? path : "/usr/local/bin:/usr/bin:/bin"), *save = NULL;
  for (char *d = strtok_r(copy, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
    snprintf(out, len, "%s/ferry-simvm", d);
    if (access(out, X_OK) == 0) {
      free(copy);
      return;
    }
  }
  free(copy);
  snprintf(out, len, "ferry-simvm");
}

static int publish(struct daemon *dm, char *err, size_t errlen)
{
  char link[256];
  site_link_address(dm->site, link, sizeof link);
  return write_state_file(dm->data_dir, api_url(&dm->api), nbd_listener_address(dm->nbd), link,
                          err, errlen);
}

/* Starts the site link listener (once the site has an identity). */
static int start_link(struct daemon *dm, char *err, size_t errlen)
{
  if (!dm->opt->link)
    return 0;
  pthread_mutex_lock(&dm->lock);
  int r = 0;
  if (!dm->link && !dm->stopping) {
    dm->link = link_listener_start(site_identity(dm->site), dm->opt->link, site_trust, dm->site,
                                   migrations_serve_conn, dm->mig, LINK_HANDSHAKE_MS, err,
                                   errlen);
    if (!dm->link) {
      r = -1;
    } else {
      const char *addr = dm->opt->link_advertise ? dm->opt->link_advertise
                                                 : link_listener_address(dm->link);
      site_set_link_address(dm->site, addr);
      log_info(NULL, "site link listening on %s%s%s", link_listener_address(dm->link),
               dm->opt->link_advertise ? ", advertised as " : "",
               dm->opt->link_advertise ? dm->opt->link_advertise : "");
    }
  }
  pthread_mutex_unlock(&dm->lock);
  return r;
}

static int on_site_init(void *opaque, char *err, size_t errlen)
{
  struct daemon *dm = opaque;
  if (start_link(dm, err, errlen) < 0)
    return -1;
  return dm->api_started ? publish(dm, err, errlen) : 0;
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
  const char *corrupt = getenv("FERRY_TEST_CORRUPT_FRAMES");
  if (corrupt && atoi(corrupt) > 0) {
    link_test_corrupt_every((unsigned)atoi(corrupt));
    log_warn(NULL, "TEST MODE: every %d-th link frame sent gets a bit flipped", atoi(corrupt));
  }
  char simvm[PATH_MAX];
  find_simvm(o.simvm, simvm, sizeof simvm);

  struct daemon dm = { .opt = &o, .data_dir = data_dir, .lock = PTHREAD_MUTEX_INITIALIZER };
  struct registry_options ropt = { .cbt_enabled = o.cbt, .heat_enabled = o.heat };
  int rc = 1;
  if (!(dm.reg = registry_open(data_dir, &ropt, err, sizeof err)) ||
      !(dm.db = db_open(data_dir, err, sizeof err)) ||
      !(dm.site = site_open(data_dir, dm.db, err, sizeof err)) ||
      !(dm.nbd = nbd_listener_start(dm.reg, nbd_spec, o.workers, err, sizeof err))) {
    log_error(NULL, "%s", err);
    goto out;
  }
  struct vm_manager_options vopt = { .simvm_path = simvm, .qemu_path = o.qemu,
                                     .qemu_stop_timeout_ms = o.qemu_stop_ms };
  if (!(dm.vms = vm_manager_open(data_dir, dm.db, dm.reg, dm.nbd, &vopt, err, sizeof err))) {
    log_error(NULL, "%s", err);
    goto out;
  }
  struct migration_deps mdeps = { .data_dir = data_dir, .db = dm.db, .reg = dm.reg,
                                  .site = dm.site, .vms = dm.vms };
  if (!(dm.mig = migrations_open(&mdeps, err, sizeof err))) {
    log_error(NULL, "%s", err);
    goto out;
  }
  if (site_has_identity(dm.site) && start_link(&dm, err, sizeof err) < 0) {
    log_error(NULL, "%s", err);
    goto out;
  }
  migrations_resume_all(dm.mig);
  dm.api = (struct api){ .reg = dm.reg, .nbd = dm.nbd, .site = dm.site, .vms = dm.vms,
                         .migrations = dm.mig, .on_site_init = on_site_init,
                         .on_site_init_opaque = &dm };
  if (api_start(&dm.api, o.api, err, sizeof err) < 0) {
    log_error(NULL, "%s", err);
    goto out;
  }
  dm.api_started = true;
  if (publish(&dm, err, sizeof err) < 0) {
    log_error(NULL, "%s", err);
    goto out;
  }
  char link[256];
  site_link_address(dm.site, link, sizeof link);
  log_info(NULL, "ready: api %s, nbd %s, link %s", api_url(&dm.api), nbd_listener_address(dm.nbd),
           link[0] ? link : o.link ? "(after `ferry site init`)" : "off");

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
  rc = 0;

out:
  /* Backwards: no API request during the drain; destination sessions end;
   * source migrations persist and stop; VM processes run on; NBD clients are
   * answered and let go; disks and maps are synced. */
  if (dm.api_started)
    api_stop(&dm.api);
  pthread_mutex_lock(&dm.lock);
  struct link_listener *ll = dm.link;
  dm.link = NULL;
  dm.stopping = true;
  pthread_mutex_unlock(&dm.lock);
  if (ll)
    link_listener_stop(ll);
  migrations_close(dm.mig);
  vm_manager_close(dm.vms);
  if (dm.nbd)
    nbd_listener_stop(dm.nbd);
  registry_close(dm.reg);
  site_close(dm.site);
  db_close(dm.db);

  if (rc == 0) {
    char state[PATH_MAX + 16];
    snprintf(state, sizeof state, "%s/ferryd.json", data_dir);
    if (unlink(state) < 0 && errno != ENOENT)
      log_warn(NULL, "cannot remove %s: %s", state, strerror(errno));
    else
      fsync_parent_dir(state);
    log_info(NULL, "stopped");
  }
  return rc;
}
