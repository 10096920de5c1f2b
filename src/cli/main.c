/* cli main: global options, dispatch and the one HTTP call path of `ferry`
 * (see cli.h).
 *
 * Global options may stand anywhere in argv (before "--"): they are taken
 * out first, then the rest is a command with its own options.  Every request
 * goes through cli_call(), which alone decides what is printed for a failed
 * request and with which exit code. */
#include <curl/curl.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/util.h"

#define MAX_ANSWER (256u * 1024 * 1024)   /* refuse to buffer more than this */

static void usage(FILE *f)
{
  fprintf(f,
    "Usage: ferry [--api URL] [-o table|json] COMMAND ...\n"
    "The ferry command line: the disks, VMs and migrations of a ferryd site.\n"
    "\n"
    "Commands:\n"
    "  disk create NAME --size SIZE [--cbt-granularity SIZE]\n"
    "                              make a sparse raw image in the data dir\n"
    "  disk add NAME --image PATH [--cbt-granularity SIZE]\n"
    "                              serve an existing raw file or block device\n"
    "  disk list                   all disks\n"
    "  disk show NAME              one disk in detail\n"
    "  disk rm NAME [--force]      remove (refused while clients are connected\n"
    "                              unless --force)\n"
    "  disk dirty NAME [--swap]    the dirty map; --swap takes it and starts clean\n"
    "  disk heat NAME [--top N]    hottest regions\n"
    "  disk trace NAME [--max N]   recent sampled IOs\n"
    "  disk limit NAME --write RATE  write rate limit, e.g. 50M (per second); 0 = off\n"
    "  site init [--name NAME]     give this site its site-link identity\n"
    "  site show | peers           identity, paired peers\n"
    "  site pair PEER_API_URL [--link HOST:PORT] [--peer-link HOST:PORT]\n"
    "                              pair with another site (both ways)\n"
    "  site pair --name N --link HOST:PORT --fingerprint sha256:HEX\n"
    "                              pair one way from a fingerprint given out of band\n"
    "  site unpair NAME            forget a peer\n"
    "  vm create NAME --disk DISK [--disk DISK...] [--driver sim] [--workload SPEC]\n"
    "  vm create NAME --driver qemu --disk DISK [--memory 1G] [--cpus N] [--nic ...]\n"
    "                              define a VM (ferry vm create --help)\n"
    "  vm list | show | start | pause | resume | stop | verify | rm NAME\n"
    "  vm workload NAME SPEC       change a VM's workload\n"
    "  network add NAME --type user|bridge [--bridge BR] | list | show | rm NAME\n"
    "                              the networks VM NICs attach to\n"
    "  hypervisor show qemu|sim [--refresh] | list\n"
    "                              what this host offers: QEMU, machines, CPU models, KVM\n"
    "  migrate VM --to SITE [--mode live|warm|cold] [--max-downtime 500ms] [--rate-limit RATE]\n"
    "          [--verify incremental|full] [--map-network SRC=DST]... [--preflight] [--wait]\n"
    "          warm: [--rpo 20m] [--cache-size SIZE] [--prefetch hot|none] [--hydrate-rate R]\n"
    "                              migrate a VM to a paired site (pre-flight checks first)\n"
    "  migration list | show ID | wait ID | set ID --rate-limit RATE | cancel ID | rpo-now VM\n"
    "  commit VM                   warm: the destination becomes the only copy\n"
    "  migrate-back VM [--last-rpo --yes]\n"
    "                              warm: the VM comes back with every write (Try Before Commit)\n"
    "  snapshot list | rm VM | restore VM --yes\n"
    "                              restore points taken when a warm migration starts\n"
    "  status                      daemon health\n"
    "  version                     versions of ferry and ferryd\n"
    "\n"
    "Options (anywhere on the line):\n"
    "  --api URL        ferryd's API [$FERRY_API, else " DEFAULT_API_URL "]\n"
    "  -o, --output FMT table (default) or json (the API's answer as is)\n"
    "  -h, --help       this help; 'ferry COMMAND --help' for a command\n"
    "\n"
    "Sizes and rates take binary units: 4096, 64K, 10G, 50M (per second).\n"
    "Exit status: 0 ok, 1 the daemon refused, 2 usage error, 3 daemon unreachable.\n");
}

int cli_usage_error(const char *cmd, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "ferry%s%s: ", cmd ? " " : "", cmd ? cmd : "");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\nTry 'ferry%s%s --help'.\n", cmd ? " " : "", cmd ? cmd : "");
  va_end(ap);
  return EXIT_USAGE;
}

/* ---- HTTP ---- */

struct buffer {
  char *data;
  size_t len;
  bool too_big;
};

static size_t on_data(char *p, size_t size, size_t n, void *opaque)
{
  struct buffer *b = opaque;
  size_t add = size * n;
  if (b->len + add > MAX_ANSWER) {
    b->too_big = true;
    return 0;   /* makes curl fail the transfer */
  }
  char *d = realloc(b->data, b->len + add + 1);
  if (!d)
    return 0;
  memcpy(d + b->len, p, add);
  b->data = d;
  b->len += add;
  d[b->len] = '\0';
  return add;
}

/* Prints a daemon's error answer as "ferry: CODE: MESSAGE". */
static void print_refusal(long status, const json_t *answer, const char *raw)
{
  const json_t *e = json_object_get(answer, "error");
  const char *code = json_string_value(json_object_get(e, "code"));
  const char *msg = json_string_value(json_object_get(e, "message"));
  if (code && msg) {
    fprintf(stderr, "ferry: %s: %s\n", code, msg);
    /* A refused migration says which checks failed, and which passed. */
    const json_t *checks = json_object_get(answer, "preflight");
    size_t i;
    const json_t *x;
    json_array_foreach(checks, i, x)
      fprintf(stderr, "  %-4s %-28s %s\n",
              json_is_true(json_object_get(x, "ok")) ? "ok" : "FAIL",
              json_string_value(json_object_get(x, "check")),
              json_string_value(json_object_get(x, "detail")));
  } else {
    /* Not ferryd's error shape: something else answers at that URL. */
    int n = raw ? (int)strcspn(raw, "\r\n") : 0;
    fprintf(stderr, "ferry: HTTP %ld%s%.*s\n", status, n ? ": " : "", MIN(n, 200), raw ? raw : "");
  }
}

int cli_call(const struct cli *c, const char *method, const char *path, json_t *body,
             json_t **out)
{
  /* One place decides whether failures are told: quiet calls are silent. */
  FILE *errf = c->quiet ? NULL : stderr;
#define SAY(...) do { if (errf) fprintf(errf, __VA_ARGS__); } while (0)
  *out = NULL;
  CURL *h = curl_easy_init();
  if (!h) {
    SAY("ferry: cannot initialise libcurl\n");
    return EXIT_UNREACHABLE;
  }
  char *url = NULL, *payload = NULL;
  struct curl_slist *headers = NULL;
  struct buffer b = { 0 };
  char errbuf[CURL_ERROR_SIZE] = "";
  int ret = EXIT_REFUSED;

  if (asprintf(&url, "%s%s", c->api, path) < 0) {
    SAY("ferry: out of memory\n");
    goto out;
  }
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 5L);
  /* A forced rm waits for clients to finish their requests: be patient. */
  curl_easy_setopt(h, CURLOPT_TIMEOUT, 300L);
  curl_easy_setopt(h, CURLOPT_USERAGENT, "ferry/" FERRY_VERSION);
  /* ferryd is local: a proxy from the environment must not sit in between. */
  curl_easy_setopt(h, CURLOPT_NOPROXY, "localhost,127.0.0.1,::1");
  headers = curl_slist_append(headers, "Accept: application/json");
  headers = curl_slist_append(headers, "Expect:");
  if (body) {
    payload = json_dumps(body, JSON_COMPACT);
    if (!payload) {
      SAY("ferry: out of memory\n");
      goto out;
    }
    headers = curl_slist_append(headers, "Content-Type: application/json");
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, payload);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(payload));
  }
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);

  CURLcode rc = curl_easy_perform(h);
  if (rc != CURLE_OK) {
    if (b.too_big) {
      SAY("ferry: the answer from %s is over %u MiB; refusing it\n", c->api,
              MAX_ANSWER >> 20);
      ret = EXIT_REFUSED;
    } else {
      SAY("ferry: cannot reach ferryd at %s: %s\n", c->api,
              errbuf[0] ? errbuf : curl_easy_strerror(rc));
      ret = EXIT_UNREACHABLE;
    }
    goto out;
  }
  long status = 0;
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
  json_error_t jerr;
  json_t *answer = b.len ? json_loadb(b.data, b.len, 0, &jerr) : NULL;
  if (c->json && !c->quiet && b.len) {
    fwrite(b.data, 1, b.len, stdout);
    if (b.data[b.len - 1] != '\n')
      putchar('\n');
  }
  if (status >= 400) {
    if (errf)
      print_refusal(status, answer, b.data);
    json_decref(answer);
    ret = EXIT_REFUSED;
    goto out;
  }
  if (!answer) {
    SAY("ferry: the answer from %s (HTTP %ld) is not JSON\n", c->api, status);
    ret = EXIT_REFUSED;
    goto out;
  }
  *out = answer;
  ret = EXIT_OK;
out:
  curl_slist_free_all(headers);
  curl_easy_cleanup(h);
  free(b.data);
  free(payload);
  free(url);
  return ret;
#undef SAY
}

/* ---- commands that are not about one disk ---- */

static int cmd_status(struct cli *c, int argc, char **argv)
{
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      printf("Usage: ferry status\nShows whether ferryd answers, its version, pid, NBD "
             "address, number of disks, site name and site link address.\n");
      return EXIT_OK;
    }
    return cli_usage_error("status", "unexpected argument '%s'", argv[i]);
  }
  json_t *h;
  int ret = cli_call(c, "GET", "/v1/health", NULL, &h);
  if (ret || c->json) {
    json_decref(h);
    return ret;
  }
  printf("ferryd:  %s\n", j_str(h, "status"));
  printf("api:     %s\n", c->api);
  printf("version: %s\n", j_str(h, "version"));
  printf("pid:     %llu\n", (unsigned long long)j_u64(h, "pid"));
  printf("nbd:     %s\n", j_str(h, "nbd"));
  printf("disks:   %llu\n", (unsigned long long)j_u64(h, "disks"));
  printf("site:    %s\n", j_str(h, "site"));
  printf("link:    %s\n", j_str(h, "link"));
  json_decref(h);
  return EXIT_OK;
}

static int cmd_version(struct cli *c, int argc, char **argv)
{
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      printf("Usage: ferry version\nPrints the version of ferry, and of ferryd when it "
             "answers.\n");
      return EXIT_OK;
    }
    return cli_usage_error("version", "unexpected argument '%s'", argv[i]);
  }
  if (c->json) {
    printf("{\"version\":\"%s\"}\n", FERRY_VERSION);
    return EXIT_OK;
  }
  printf("ferry %s\n", FERRY_VERSION);
  /* The daemon's version is a courtesy: its absence is not an error here. */
  struct cli quiet = *c;
  quiet.quiet = true;
  json_t *h = NULL;
  int ret = cli_call(&quiet, "GET", "/v1/health", NULL, &h);
  if (ret == EXIT_OK)
    printf("ferryd %s at %s\n", j_str(h, "version"), c->api);
  else
    printf("ferryd: no answer at %s\n", c->api);
  json_decref(h);
  return EXIT_OK;
}

/* ---- global options ---- */

/* Takes --api/-o out of argv (anywhere before "--"); returns the new argc,
 * or -1 after printing a usage error. */
static int take_global_options(struct cli *c, int argc, char **argv)
{
  const char *api = NULL, *output = NULL;
  int out = 1;
  bool rest = false;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char **slot = NULL;
    const char *val = NULL;
    const char *opt = a;
    if (rest) {
      argv[out++] = argv[i];
      continue;
    }
    if (strcmp(a, "--") == 0) {
      rest = true;
      argv[out++] = argv[i];
      continue;
    }
    if (strcmp(a, "--api") == 0) {
      slot = &api;
    } else if (strncmp(a, "--api=", 6) == 0) {
      slot = &api;
      val = a + 6;
      opt = "--api";
    } else if (strcmp(a, "-o") == 0 || strcmp(a, "--output") == 0) {
      slot = &output;
    } else if (strncmp(a, "--output=", 9) == 0) {
      slot = &output;
      val = a + 9;
      opt = "--output";
    } else if (strncmp(a, "-o", 2) == 0) {
      slot = &output;
      val = a + 2;
      opt = "-o";
    }
    if (!slot) {
      argv[out++] = argv[i];
      continue;
    }
    if (!val) {
      if (i + 1 >= argc) {
        cli_usage_error(NULL, "option '%s' needs an argument", opt);
        return -1;
      }
      val = argv[++i];
    }
    *slot = val;
  }
  argv[out] = NULL;

  if (output) {
    if (strcmp(output, "json") == 0) {
      c->json = true;
    } else if (strcmp(output, "table") != 0) {
      cli_usage_error(NULL, "bad output format '%s': expected table or json", output);
      return -1;
    }
  }
  if (!api) {
    api = getenv("FERRY_API");
    if (api && !api[0])
      api = NULL;
  }
  if (!api)
    api = DEFAULT_API_URL;
  if (!api[0] || strchr(api, ' ') || strchr(api, '?') || strchr(api, '#')) {
    cli_usage_error(NULL, "bad API URL '%s'", api);
    return -1;
  }
  /* "127.0.0.1:7450" means http://127.0.0.1:7450 */
  if (strstr(api, "://")) {
    if (strncmp(api, "http://", 7) != 0 && strncmp(api, "https://", 8) != 0) {
      cli_usage_error(NULL, "bad API URL '%s': expected http://HOST:PORT", api);
      return -1;
    }
    c->api = strdup(api);
  } else if (asprintf(&c->api, "http://%s", api) < 0) {
    c->api = NULL;
  }
  if (!c->api) {
    fprintf(stderr, "ferry: out of memory\n");
    return -1;
  }
  size_t n = strlen(c->api);
  while (n > 0 && c->api[n - 1] == '/')
    c->api[--n] = '\0';
  return out;
}

int main(int argc, char **argv)
{
  struct cli c = { 0 };
  argc = take_global_options(&c, argc, argv);
  if (argc < 0)
    return EXIT_USAGE;
  if (argc < 2) {
    usage(stderr);
    free(c.api);
    return EXIT_USAGE;
  }
  const char *cmd = argv[1];
  if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
    usage(stdout);
    free(c.api);
    return EXIT_OK;
  }
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
    fprintf(stderr, "ferry: cannot initialise libcurl\n");
    free(c.api);
    return EXIT_UNREACHABLE;
  }
  int ret;
  if (strcmp(cmd, "disk") == 0)
    ret = cmd_disk(&c, argc - 1, argv + 1);
  else if (strcmp(cmd, "site") == 0)
    ret = cmd_site(&c, argc - 1, argv + 1);
  else if (strcmp(cmd, "vm") == 0)
    ret = cmd_vm(&c, argc - 1, argv + 1);
  else if (strcmp(cmd, "network") == 0 || strcmp(cmd, "networks") == 0)
    ret = cmd_network(&c, argc - 1, argv + 1);
  else if (strcmp(cmd, "hypervisor") == 0 || strcmp(cmd, "hypervisors") == 0)
    ret = cmd_hypervisor(&c, argc - 1, argv + 1);
  else if (strcmp(cmd, "migrate") == 0)
    ret = cmd_migrate(&c, argc - 1, argv + 1);
  else if (strcmp(cmd, "migration") == 0 || strcmp(cmd, "migrations") == 0)
    ret = cmd_migration(&c, argc - 1, argv + 1);
  else if (strcmp(cmd, "commit") == 0)
    ret = cmd_commit(&c, argc - 1, argv + 1);
  else if (strcmp(cmd, "migrate-back") == 0)
    ret = cmd_migrate_back(&c, argc - 1, argv + 1);
  else if (strcmp(cmd, "snapshot") == 0 || strcmp(cmd, "snapshots") == 0)
    ret = cmd_snapshot(&c, argc - 1, argv + 1);
  else if (strcmp(cmd, "status") == 0)
    ret = cmd_status(&c, argc - 1, argv + 1);
  else if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0)
    ret = cmd_version(&c, argc - 1, argv + 1);
  else if (cmd[0] == '-')
    ret = cli_usage_error(NULL, "unknown option '%s'", cmd);
  else
    ret = cli_usage_error(NULL, "unknown command '%s'", cmd);
  curl_global_cleanup();
  free(c.api);
  return ret;
}
