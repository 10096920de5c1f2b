/* ferry-simvm: the simulated VM of ferry's `sim` hypervisor driver (see
 * docs/simvm.md).  This file is the command line: run, verify, fill, ctl.
 *
 * run: load (or with --create make) the state, connect every disk and check
 * it against the state, bind the control socket, start the IO thread, then
 * wait: for a `stop` (done by the control thread, which then asks main to
 * exit) or for SIGTERM/SIGINT/SIGHUP (main stops the VM itself: drain, save).
 * A second signal stops without waiting for IO in flight: the writes still
 * in flight are saved as uncertain and the exit status is 1.
 *
 * Signals are blocked before any thread starts and taken by one thread with
 * sigwait(), so no handler runs inside libnbd or jansson.  SIGPIPE is
 * ignored: a peer that went away is an error on its socket.
 *
 * Exit status: 0 clean, 1 runtime failure (or `verify` found problems),
 * 2 usage. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "vm/simvm/control.h"
#include "vm/simvm/fill.h"
#include "vm/simvm/nbdc.h"
#include "vm/simvm/state.h"
#include "vm/simvm/verify.h"
#include "vm/simvm/vm.h"

#define EXIT_USAGE 2

static const char usage_text[] =
  "Usage:\n"
  "  ferry-simvm run --state FILE --control SOCK --disk NAME=NBD_URI [--disk ...]\n"
  "                  [--workload SPEC] [--create] [--paused] [--name VMNAME]\n"
  "  ferry-simvm verify --state FILE --disk NAME=NBD_URI [--disk ...]\n"
  "  ferry-simvm fill --state FILE --disk NAME=NBD_URI [--disk ...] [--create]\n"
  "                   [--percent P]\n"
  "  ferry-simvm ctl SOCK COMMAND [JSON-ARGS]\n"
  "\n"
  "The simulated VM of ferry: does the IO of a VM against its NBD disks with\n"
  "self-checking 4 KiB blocks, keeps a table of the last acknowledged write of\n"
  "every block (its \"RAM\", the state file), and proves with verify that no\n"
  "acknowledged write was lost.\n"
  "\n"
  "  --state FILE       the VM state (created by run/fill --create if absent)\n"
  "  --control SOCK     unix socket for JSON-line control requests (mode 0600)\n"
  "  --disk NAME=URI    a disk and its NBD URI, e.g.\n"
  "                     vda=nbd+unix:///vda?socket=/data/nbd.sock (1 to 16 disks)\n"
  "  --workload SPEC    write=70,bs=4k,iops=500,zipf=0.9,qd=4,disks=all (the\n"
  "                     defaults); also rate=20M instead of iops, seed=N;\n"
  "                     iops=0 or rate=0: as fast as qd allows\n"
  "  --create           make a new VM if the state file does not exist\n"
  "  --paused           start paused (no IO until the resume command)\n"
  "  --name VMNAME      a name for the VM (shown by status)\n"
  "  --percent P        fill: percent of each disk to write, 0-100 [100]\n"
  "  --log-level LEVEL  error, warn, info or debug [info]\n"
  "\n"
  "Control commands (ctl): status, pause [{\"timeout_ms\":N}], resume, save, stop,\n"
  "set_workload {\"workload\":\"SPEC\"}, verify.  SIGTERM: as stop.\n"
  "Exit status: 0 ok, 1 failure (verify: problems found), 2 usage.\n";

static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void usage_error(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "ferry-simvm: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\nTry 'ferry-simvm --help'.\n");
  va_end(ap);
  exit(EXIT_USAGE);
}

struct disk_arg {
  char name[SIM_NAME_MAX + 1];
  const char *uri;
};

struct options {
  const char *state, *control, *workload, *name, *percent;
  bool create, paused;
  unsigned ndisks;
  struct disk_arg disks[SIM_MAX_DISKS];
  enum log_level log_level;
};

static void parse_disk(struct options *o, const char *arg)
{
  const char *eq = strchr(arg, '=');
  if (!eq || eq == arg || !eq[1])
    usage_error("--disk '%s': want NAME=NBD_URI", arg);
  size_t n = (size_t)(eq - arg);
  if (n > SIM_NAME_MAX)
    usage_error("--disk: name longer than %d characters", SIM_NAME_MAX);
  if (o->ndisks == SIM_MAX_DISKS)
    usage_error("at most %d disks", SIM_MAX_DISKS);
  struct disk_arg *d = &o->disks[o->ndisks];
  memcpy(d->name, arg, n);
  d->name[n] = '\0';
  if (!name_is_valid(d->name))
    usage_error("--disk: '%s' is not a valid disk name (1-64 of A-Z a-z 0-9 . _ -)", d->name);
  for (unsigned i = 0; i < o->ndisks; i++)
    if (strcmp(o->disks[i].name, d->name) == 0)
      usage_error("--disk: disk '%s' given twice", d->name);
  d->uri = eq + 1;
  if (strncmp(d->uri, "nbd", 3) != 0 || !strstr(d->uri, "://"))
    usage_error("--disk %s: '%s' is not an NBD URI (nbd://HOST:PORT/NAME or "
                "nbd+unix:///NAME?socket=PATH)", d->name, d->uri);
  o->ndisks++;
}

/* Parses the options of a subcommand; allowed says which are accepted. */
static void parse_options(int argc, char **argv, const char *cmd, const char *allowed,
                          struct options *o)
{
  enum { O_STATE = 256, O_CONTROL, O_DISK, O_WORKLOAD, O_CREATE, O_PAUSED, O_NAME, O_PERCENT,
         O_LOG_LEVEL };
  static const struct option longopts[] = {
    { "state", required_argument, NULL, O_STATE },
    { "control", required_argument, NULL, O_CONTROL },
    { "disk", required_argument, NULL, O_DISK },
    { "workload", required_argument, NULL, O_WORKLOAD },
    { "create", no_argument, NULL, O_CREATE },
    { "paused", no_argument, NULL, O_PAUSED },
    { "name", required_argument, NULL, O_NAME },
    { "percent", required_argument, NULL, O_PERCENT },
    { "log-level", required_argument, NULL, O_LOG_LEVEL },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  *o = (struct options){ .log_level = LOG_INFO };
  optind = 1;
  opterr = 0;
  int c, idx;
  while ((c = getopt_long(argc, argv, ":h", longopts, &idx)) != -1) {
    if (c == 'h') {
      fputs(usage_text, stdout);
      exit(0);
    }
    if (c == ':')
      usage_error("%s: option '%s' needs an argument", cmd, argv[optind - 1]);
    if (c == '?')
      usage_error("%s: unknown option '%s'", cmd, argv[optind - 1]);
    const char *name = longopts[c - 256].name;
    if (!strstr(allowed, name))
      usage_error("%s: option '--%s' does not apply", cmd, name);
    const char **once = NULL;
    switch (c) {
    case O_STATE: once = &o->state; break;
    case O_CONTROL: once = &o->control; break;
    case O_WORKLOAD: once = &o->workload; break;
    case O_NAME: once = &o->name; break;
    case O_PERCENT: once = &o->percent; break;
    case O_DISK: parse_disk(o, optarg); break;
    case O_CREATE: o->create = true; break;
    case O_PAUSED: o->paused = true; break;
    case O_LOG_LEVEL:
      if (log_parse_level(optarg, &o->log_level) < 0)
        usage_error("--log-level: '%s' is not error, warn, info or debug", optarg);
      break;
    }
    if (once) {
      if (*once)
        usage_error("%s: option '--%s' given twice", cmd, name);
      if (!optarg[0])
        usage_error("%s: option '--%s' needs a value", cmd, name);
      *once = optarg;
    }
  }
  if (optind < argc)
    usage_error("%s: unexpected argument '%s'", cmd, argv[optind]);
  if (!o->state)
    usage_error("%s: --state FILE is required", cmd);
  if (o->ndisks == 0)
    usage_error("%s: at least one --disk NAME=NBD_URI is required", cmd);
  if (o->name && !name_is_valid(o->name))
    usage_error("--name: '%s' is not a valid name (1-64 of A-Z a-z 0-9 . _ -)", o->name);
  log_set_level(o->log_level);
}

static bool file_exists(const char *path)
{
  struct stat sb;
  return stat(path, &sb) == 0 || errno != ENOENT;
}

/* Connects every --disk; returns the handles (in --disk order) and sizes. */
static int connect_disks(const struct options *o, struct nbd_handle **h, uint64_t *sizes)
{
  char err[512];
  for (unsigned i = 0; i < o->ndisks; i++) {
    h[i] = sim_nbd_open(o->disks[i].name, o->disks[i].uri, &sizes[i], err, sizeof err);
    if (!h[i]) {
      log_error(NULL, "%s", err);
      for (unsigned k = 0; k < i; k++)
        nbd_close(h[k]);
      return -1;
    }
  }
  return 0;
}

/* Loads the state, or with create makes one for the --disks (sizes from
 * the servers).  Then orders handles and URIs as the state's disks and
 * checks names and sizes.  *created says which happened. */
static int open_state(const struct options *o, struct sim_state *st, struct nbd_handle **h,
                      const uint64_t *sizes, const char **uris, bool *created)
{
  char err[1024];
  *created = false;
  if (!file_exists(o->state)) {
    if (!o->create) {
      log_error(NULL, "state file %s does not exist (--create makes a new VM)", o->state);
      return -1;
    }
    const char *names[SIM_MAX_DISKS];
    for (unsigned i = 0; i < o->ndisks; i++)
      names[i] = o->disks[i].name;
    if (sim_state_create(st, o->ndisks, names, sizes, err, sizeof err) < 0) {
      log_error(NULL, "%s", err);
      return -1;
    }
    *created = true;
  } else if (sim_state_load(o->state, st, err, sizeof err) < 0) {
    log_error(NULL, "%s; refusing to run on it", err);
    return -1;
  }
  if (st->ndisks != o->ndisks) {
    log_error(NULL, "state file %s has %u disks, --disk gives %u", o->state, st->ndisks,
              o->ndisks);
    sim_state_free(st);
    return -1;
  }
  struct nbd_handle *ordered[SIM_MAX_DISKS];
  for (unsigned i = 0; i < st->ndisks; i++) {
    int k = -1;
    for (unsigned j = 0; j < o->ndisks; j++)
      if (strcmp(o->disks[j].name, st->disks[i].name) == 0)
        k = (int)j;
    if (k < 0) {
      log_error(NULL, "state file %s has disk '%s', which no --disk names", o->state,
                st->disks[i].name);
      sim_state_free(st);
      return -1;
    }
    if (sizes[k] != st->disks[i].size) {
      log_error(st->disks[i].name, "the NBD export is %" PRIu64 " bytes, the state file says "
                "%" PRIu64 ": not the disk this VM wrote", sizes[k], st->disks[i].size);
      sim_state_free(st);
      return -1;
    }
    ordered[i] = h[k];
    uris[i] = o->disks[k].uri;
  }
  memcpy(h, ordered, sizeof(ordered[0]) * st->ndisks);
  return 0;
}

static void close_all(struct nbd_handle **h, unsigned n)
{
  for (unsigned i = 0; i < n; i++)
    if (h[i]) {
      nbd_shutdown(h[i], 0);
      nbd_close(h[i]);
      h[i] = NULL;
    }
}

/* ---- run ---- */

static void *signal_main(void *arg)
{
  struct vm *vm = arg;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  sigaddset(&set, SIGUSR1);
  for (;;) {
    int sig;
    if (sigwait(&set, &sig) != 0)
      continue;
    if (sig == SIGUSR1)   /* main: we are done */
      return NULL;
    pthread_mutex_lock(&vm->lock);
    if (!vm->stop_signal) {
      vm->stop_signal = true;
      log_info(NULL, "%s: stopping (waiting for IO in flight; a second signal does not wait)",
               strsignal(sig));
    } else if (!vm->force) {
      vm->force = true;
      log_warn(NULL, "%s again: stopping without waiting for IO in flight", strsignal(sig));
    }
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
  }
}

static int cmd_run(int argc, char **argv)
{
  struct options o;
  parse_options(argc, argv, "run",
                "state control disk workload create paused name log-level", &o);
  if (!o.control)
    usage_error("run: --control SOCK is required");
  struct workload wl;
  char err[1024];
  if (o.workload && workload_parse(o.workload, &wl, err, sizeof err) < 0)
    usage_error("--workload: %s", err);

  struct nbd_handle *h[SIM_MAX_DISKS] = { NULL };
  uint64_t sizes[SIM_MAX_DISKS];
  const char *uris[SIM_MAX_DISKS];
  if (connect_disks(&o, h, sizes) < 0)
    return 1;
  struct sim_state st;
  bool created;
  if (open_state(&o, &st, h, sizes, uris, &created) < 0) {
    close_all(h, o.ndisks);
    return 1;
  }
  if (o.name)
    snprintf(st.name, sizeof st.name, "%s", o.name);
  if (!o.workload && workload_parse(st.workload, &wl, err, sizeof err) < 0) {
    log_error(NULL, "%s", err);   /* cannot happen: load checked it */
    sim_state_free(&st);
    close_all(h, o.ndisks);
    return 1;
  }
  /* The rng goes on from the state unless this start names a seed (or the
   * VM is new). */
  if (created || (o.workload && wl.has_seed)) {
    uint64_t seed = wl.seed;
    if (!wl.has_seed && sim_random_u64(&seed) < 0)
      seed = st.vm_id ^ now_ns();
    struct rng r;
    rng_seed(&r, seed);
    memcpy(st.rng, r.s, sizeof st.rng);
  }

  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  sigaddset(&set, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  signal(SIGPIPE, SIG_IGN);

  static struct vm vm;   /* large (histograms); lives as long as the process */
  if (vm_init(&vm, &st, o.state, uris, h, &wl, err, sizeof err) < 0) {
    log_error(NULL, "%s", err);
    sim_state_free(&st);
    vm_destroy(&vm);
    return 1;
  }
  /* The file exists (and names the workload) before anyone may ask for it. */
  if (vm_save(&vm, NULL, err, sizeof err) < 0) {
    log_error(NULL, "%s", err);
    vm_destroy(&vm);
    return 1;
  }
  struct ctl_server srv;
  if (ctl_listen(&srv, o.control, err, sizeof err) < 0) {
    log_error(NULL, "%s", err);
    vm_destroy(&vm);
    return 1;
  }
  pthread_t sig_thread;
  if (vm_io_start(&vm, !o.paused, err, sizeof err) < 0 ||
      pthread_create(&sig_thread, NULL, signal_main, &vm) != 0) {
    log_error(NULL, "cannot start: %s", err);
    vm_io_stop(&vm);
    ctl_stop(&srv);
    vm_destroy(&vm);
    return 1;
  }
  if (ctl_start(&srv, &vm, err, sizeof err) < 0) {
    log_error(NULL, "%s", err);
    pthread_kill(sig_thread, SIGUSR1);
    pthread_join(sig_thread, NULL);
    vm_io_stop(&vm);
    ctl_stop(&srv);
    vm_destroy(&vm);
    return 1;
  }
  log_info(NULL, "ready: vm %s%sid %016" PRIx64 ", %s VM, %u disk(s), %s, control %s, state %s",
           vm.st.name, vm.st.name[0] ? " " : "", vm.st.vm_id, created ? "new" : "loaded",
           vm.ndisks, o.paused ? "paused" : "running", o.control, o.state);
  log_info(NULL, "workload %s", vm.wl_text);

  /* Until a stop is done: a control `stop` sets exit_now itself; on a
   * signal main stops the VM, unless a control stop is under way (then it
   * waits for that one, and takes over if it failed and left the VM alive). */
  for (;;) {
    pthread_mutex_lock(&vm.lock);
    while (!vm.exit_now && !vm.stop_signal)
      pthread_cond_wait(&vm.cond, &vm.lock);
    bool done = vm.exit_now;
    pthread_mutex_unlock(&vm.lock);
    if (done)
      break;
    if (vm_stop(&vm, err, sizeof err) == 0) {
      vm_request_exit(&vm, 0);
    } else if (errno == EALREADY) {
      pthread_mutex_lock(&vm.lock);
      while (!vm.exit_now && vm.run_state == VM_STOPPING)
        pthread_cond_wait(&vm.cond, &vm.lock);
      pthread_mutex_unlock(&vm.lock);
    } else {
      log_error(NULL, "stop: %s", err);
      vm_request_exit(&vm, 1);
    }
  }
  pthread_mutex_lock(&vm.lock);
  int rc = vm.exit_code;
  pthread_mutex_unlock(&vm.lock);
  pthread_mutex_lock(&vm.lock);
  vm.exiting = true;
  pthread_cond_broadcast(&vm.cond);
  pthread_mutex_unlock(&vm.lock);
  ctl_stop(&srv);
  vm_io_stop(&vm);
  pthread_kill(sig_thread, SIGUSR1);
  pthread_join(sig_thread, NULL);
  vm_destroy(&vm);
  log_info(NULL, "exit %d", rc);
  return rc;
}

/* ---- verify, fill ---- */

static int cmd_verify(int argc, char **argv)
{
  struct options o;
  parse_options(argc, argv, "verify", "state disk log-level", &o);
  struct nbd_handle *h[SIM_MAX_DISKS] = { NULL };
  uint64_t sizes[SIM_MAX_DISKS];
  const char *uris[SIM_MAX_DISKS];
  if (connect_disks(&o, h, sizes) < 0)
    return 1;
  struct sim_state st;
  bool created;
  if (open_state(&o, &st, h, sizes, uris, &created) < 0) {
    close_all(h, o.ndisks);
    return 1;
  }
  close_all(h, st.ndisks);   /* verify opens its own */
  char err[1024];
  struct verify_report *r = malloc(sizeof *r);
  if (!r || sim_verify(&st, uris, r, err, sizeof err) < 0) {
    log_error(NULL, "verify: %s", r ? err : "out of memory");
    free(r);
    sim_state_free(&st);
    return 1;
  }
  json_t *js = verify_report_json(&st, r);
  char *s = js ? json_dumps(js, JSON_COMPACT) : NULL;
  if (s)
    printf("%s\n", s);
  free(s);
  json_decref(js);
  int rc = r->ok ? 0 : 1;
  if (!r->ok)
    log_error(NULL, "verify: problems found (see the report)");
  free(r);
  sim_state_free(&st);
  return rc;
}

static int cmd_fill(int argc, char **argv)
{
  struct options o;
  parse_options(argc, argv, "fill", "state disk create percent log-level", &o);
  double percent = 100;
  if (o.percent) {
    char *end;
    errno = 0;
    percent = strtod(o.percent, &end);
    if (errno || *end || end == o.percent || strspn(o.percent, "0123456789.") != strlen(o.percent) ||
        percent < 0 || percent > 100)
      usage_error("fill: --percent '%s': want a number from 0 to 100", o.percent);
  }
  struct nbd_handle *h[SIM_MAX_DISKS] = { NULL };
  uint64_t sizes[SIM_MAX_DISKS];
  const char *uris[SIM_MAX_DISKS];
  if (connect_disks(&o, h, sizes) < 0)
    return 1;
  struct sim_state st;
  bool created;
  if (open_state(&o, &st, h, sizes, uris, &created) < 0) {
    close_all(h, o.ndisks);
    return 1;
  }
  close_all(h, st.ndisks);
  if (created) {
    struct rng r;
    uint64_t seed;
    if (sim_random_u64(&seed) < 0)
      seed = st.vm_id;
    rng_seed(&r, seed);
    memcpy(st.rng, r.s, sizeof st.rng);
  }
  char err[1024];
  int rc = sim_fill(&st, uris, percent, err, sizeof err) < 0 ? 1 : 0;
  if (rc)
    log_error(NULL, "fill: %s", err);
  char serr[1024];
  if (sim_state_save(o.state, &st, serr, sizeof serr) < 0) {
    log_error(NULL, "%s", serr);
    rc = 1;
  }
  sim_state_free(&st);
  return rc;
}

int main(int argc, char **argv)
{
  log_init("ferry-simvm");
  if (argc < 2)
    usage_error("missing command (run, verify, fill or ctl)");
  const char *cmd = argv[1];
  if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0) {
    fputs(usage_text, stdout);
    return 0;
  }
  if (strcmp(cmd, "run") == 0)
    return cmd_run(argc - 1, argv + 1);
  if (strcmp(cmd, "verify") == 0)
    return cmd_verify(argc - 1, argv + 1);
  if (strcmp(cmd, "fill") == 0)
    return cmd_fill(argc - 1, argv + 1);
  if (strcmp(cmd, "ctl") == 0) {
    if (argc < 4 || argc > 5)
      usage_error("usage: ferry-simvm ctl SOCK COMMAND [JSON-ARGS]");
    return ctl_client_main(argv[2], argv[3], argc == 5 ? argv[4] : NULL);
  }
  usage_error("unknown command '%s' (run, verify, fill or ctl)", cmd);
}
