/* migrate_cmd: `ferry migrate VM ...` and `ferry migration ...` (docs/cli.md).
 *
 * --wait (and `migration wait`) polls the migration once a second and shows
 * its progress: on a terminal as a bar redrawn in place, otherwise as a line
 * every few seconds and on every change of phase, so a log of it reads well.
 * Interrupting the wait leaves the migration running. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "replicate/migration.h"
#include "common/util.h"

#define BAR_WIDTH 30

static bool terminal_state(const char *s)
{
  return strcmp(s, "completed") == 0 || strcmp(s, "cancelled") == 0 || strcmp(s, "failed") == 0 ||
         strcmp(s, "committed") == 0 || strcmp(s, "returned") == 0 ||
         strcmp(s, "recovered") == 0;
}

static bool good_end(const char *s)
{
  return strcmp(s, "completed") == 0 || strcmp(s, "committed") == 0 ||
         strcmp(s, "returned") == 0 || strcmp(s, "recovered") == 0;
}

static bool is_warm(const json_t *m) { return strcmp(j_str(m, "mode"), "warm") == 0; }

/* "20m", "30s", "500ms", "1h", or plain milliseconds; false when not one. */
static bool parse_duration_ms(const char *s, uint64_t *out)
{
  char *end;
  double v = strtod(s, &end);
  if (end == s || v < 0)
    return false;
  double mul = !*end || strcmp(end, "ms") == 0 ? 1 : strcmp(end, "s") == 0 ? 1000
             : strcmp(end, "m") == 0 ? 60000 : strcmp(end, "h") == 0 ? 3600000 : -1;
  if (mul < 0)
    return false;
  *out = (uint64_t)(v * mul + 0.5);
  return true;
}

/* A warm migration's figures in two lines. */
static void warm_lines(const json_t *m, char *l2, char *l3, size_t len)
{
  const json_t *w = json_object_get(m, "warm");
  char in[32], out[32], unf[32], age[48] = "none yet";
  fmt_bytes(j_u64(w, "wan_in_bytes"), in, sizeof in);
  fmt_bytes(j_u64(w, "wan_out_bytes"), out, sizeof out);
  fmt_bytes(j_u64(w, "unflushed_bytes"), unf, sizeof unf);
  if (j_u64(w, "last_point"))
    snprintf(age, sizeof age, "#%llu, %.0fs ago", (unsigned long long)j_u64(w, "last_point"),
             j_dbl(w, "last_point_age_s"));
  snprintf(l2, len, "  hydrated %.1f%% | hit ratio %.3f | miss p50/p90/p99 %.1f/%.1f/%.1f ms | "
           "WAN in %s out %s", j_dbl(w, "hydrated_pct"), j_dbl(w, "hit_ratio"),
           j_dbl(w, "miss_p50_ms"), j_dbl(w, "miss_p90_ms"), j_dbl(w, "miss_p99_ms"), in, out);
  snprintf(l3, len, "  RPO point %s | unflushed %s | link %s%s%s", age, unf,
           j_str(json_object_get(m, "progress"), "link"),
           json_is_true(json_object_get(w, "degraded")) ? " | DEGRADED: " : "",
           json_is_true(json_object_get(w, "degraded")) ? j_str(w, "degraded_reason") : "");
}

static const char *trend_word(double bps)
{
  if (bps > 1024)
    return "growing";
  if (bps < -1024)
    return "shrinking";
  return "steady";
}

static void fmt_eta(double s, char *buf, size_t len)
{
  if (s < 0)
    snprintf(buf, len, "-");
  else if (s < 60)
    snprintf(buf, len, "%.0fs", s);
  else if (s < 3600)
    snprintf(buf, len, "%.0fm%02.0fs", s / 60 - 0.5, s - 60 * (double)(long)(s / 60));
  else
    snprintf(buf, len, "%.1fh", s / 3600);
}

/* The progress in three lines (no newline after the last). */
static void progress_lines(const json_t *m, char *l1, char *l2, char *l3, size_t len)
{
  const json_t *p = json_object_get(m, "progress");
  uint64_t total = j_u64(p, "bytes_total"), left = j_u64(p, "bytes_left");
  double frac = total ? (double)(total - MIN(left, total)) / (double)total : 1.0;
  const char *phase = j_str(p, "phase");
  if (strcmp(j_str(m, "state"), "completed") == 0)
    frac = 1.0;
  char bar[BAR_WIDTH + 1];
  int fill = (int)(frac * BAR_WIDTH + 0.5);
  for (int i = 0; i < BAR_WIDTH; i++)
    bar[i] = i < fill ? '#' : '.';
  bar[BAR_WIDTH] = '\0';
  snprintf(l1, len, "%s %s -> %s [%s] %3.0f%%  %s (%s)", j_str(m, "id"), j_str(m, "vm"),
           j_str(m, "peer"), bar, frac * 100, j_str(m, "state"), phase);
  char b_left[32], b_total[32], b_back[32], b_link[32], b_vm[32], b_eta[32], b_bp[32];
  fmt_bytes(left, b_left, sizeof b_left);
  fmt_bytes(total, b_total, sizeof b_total);
  fmt_bytes(j_u64(p, "backlog_bytes"), b_back, sizeof b_back);
  fmt_rate(j_dbl(p, "link_bps"), b_link, sizeof b_link);
  fmt_rate(j_dbl(p, "vm_write_bps"), b_vm, sizeof b_vm);
  fmt_eta(j_dbl(p, "eta_s"), b_eta, sizeof b_eta);
  int n = snprintf(l2, len, "  left %s of %s | backlog %s (%s) | link %s | VM writes %s | ETA %s",
                   b_left, b_total, b_back, trend_word(j_dbl(p, "backlog_trend_bps")), b_link,
                   b_vm, b_eta);
  if (j_u64(p, "backpressure_bps") && n > 0 && (size_t)n < len)
    snprintf(l2 + n, len - (size_t)n, " | VM throttled to %s",
             fmt_rate((double)j_u64(p, "backpressure_bps"), b_bp, sizeof b_bp));
  if (is_warm(m)) {
    const char *st = j_str(m, "state");
    bool running = strcmp(st, "warm") == 0 || strcmp(st, "committing") == 0 ||
                   strcmp(st, "returning") == 0;
    snprintf(l1, len, "%s %s -> %s  %s (%s)%s", j_str(m, "id"), j_str(m, "vm"), j_str(m, "peer"),
             st, phase, running ? "  the VM runs at the destination" : "");
    warm_lines(m, l2, l3, len);
    return;
  }
  const char *link = j_str(p, "link");
  const char *lerr = j_str(p, "link_error");
  if (strcmp(link, "up") != 0 && lerr[0] && strcmp(lerr, "-") != 0)
    snprintf(l3, len, "  %s (link %s: %s)", j_str(p, "verdict"), link, lerr);
  else
    snprintf(l3, len, "  %s", j_str(p, "verdict"));
}

static void print_summary(const json_t *m)
{
  const json_t *p = json_object_get(m, "progress");
  const json_t *b = json_object_get(p, "bytes"), *cnt = json_object_get(p, "counters"),
               *cut = json_object_get(p, "cutover");
  char w[32], d[32], z[32], r[32], f[32];
  const char *state = j_str(m, "state");
  printf("migration %s of VM %s to site %s: %s\n", j_str(m, "id"), j_str(m, "vm"),
         j_str(m, "peer"), state);
  const char *err = json_string_value(json_object_get(m, "error"));
  if (err)
    printf("  %s\n", err);
  const json_t *params = json_object_get(m, "params");
  if (is_warm(m)) {
    const json_t *wm = json_object_get(m, "warm");
    const json_t *wp = json_object_get(params, "warm");
    char a[32], q[32], lb[32], wb[32];
    if (strcmp(j_str(m, "role"), "source") == 0)
      printf("  time to running at the destination: %llu ms (VM paused %llu ms)\n",
             (unsigned long long)j_u64(wm, "time_to_running_ms"),
             (unsigned long long)j_u64(wm, "pause_ms"));
    printf("  cache:        %.1f%% hydrated, %s used of %s quota, %llu evictions, hit ratio %.4f "
           "(%llu hits, %llu misses)\n", j_dbl(wm, "hydrated_pct"),
           fmt_bytes(j_u64(wm, "local_bytes"), lb, sizeof lb),
           fmt_bytes(j_u64(wm, "quota_bytes"), q, sizeof q),
           (unsigned long long)j_u64(wm, "evictions"), j_dbl(wm, "hit_ratio"),
           (unsigned long long)j_u64(wm, "read_hits"), (unsigned long long)j_u64(wm, "read_misses"));
    printf("  write-back:   every %llu s; %llu points applied at the source, last #%llu; %s "
           "shipped back; %s not yet\n", (unsigned long long)j_u64(wp, "rpo_s"),
           (unsigned long long)j_u64(wm, "points"), (unsigned long long)j_u64(wm, "last_point"),
           fmt_bytes(j_u64(wm, "wb_bytes"), wb, sizeof wb),
           fmt_bytes(j_u64(wm, "unflushed_bytes"), a, sizeof a));
    return;
  }
  bool qemu = strcmp(j_str(json_object_get(params, "vm"), "driver"), "qemu") == 0;
  bool cold = strcmp(j_str(m, "mode"), "cold") == 0;
  if (strcmp(state, "completed") == 0 && cold)
    printf("  downtime:     the VM was powered down for the copy (cold)\n");
  else if (strcmp(state, "completed") == 0)
    printf("  downtime:     %llu ms (%s; budget %llu ms)\n",
           (unsigned long long)j_u64(cut, "downtime_ms"),
           qemu ? "QEMU's STOP to RESUME" : "pause to resume",
           (unsigned long long)j_u64(params, "max_downtime_ms"));
  const json_t *ram = json_object_get(p, "ram");
  if (qemu && !cold && j_u64(ram, "sent")) {
    char rb[32];
    printf("  RAM:          %s by QEMU's migration through the site link\n",
           fmt_bytes(j_u64(ram, "sent"), rb, sizeof rb));
  }
  printf("  on the wire:  %s; data %s, zero ranges %s, sent again %s\n",
         fmt_bytes(j_u64(b, "wire_sent"), w, sizeof w), fmt_bytes(j_u64(b, "data_sent"), d, sizeof d),
         fmt_bytes(j_u64(b, "zero_ranges"), z, sizeof z), fmt_bytes(j_u64(b, "resent"), r, sizeof r));
  printf("  foreground:   %s re-sent for writes made during the copy\n",
         fmt_bytes(j_u64(b, "foreground_data"), f, sizeof f));
  printf("  verified:     %llu regions equal at the destination (%llu at cutover), %llu "
         "repaired\n", (unsigned long long)j_u64(cnt, "verified_regions"),
         (unsigned long long)j_u64(cut, "verified_regions"),
         (unsigned long long)j_u64(cnt, "verify_repairs"));
  printf("  faults:       %llu reconnects, %llu restarts, %llu NACKs, %llu cutover attempt(s)\n",
         (unsigned long long)j_u64(cnt, "reconnects"), (unsigned long long)j_u64(cnt, "restarts"),
         (unsigned long long)j_u64(cnt, "nacks"),
         (unsigned long long)j_u64(cnt, "cutover_attempts"));
}

/* Polls until the migration ends; EXIT_OK when it completed.  With -o json
 * nothing is drawn: the final document is printed. */
static int wait_for(struct cli *c, const char *id, bool until_warm)
{
  char path[96];
  snprintf(path, sizeof path, "/v1/migrations/%s", id);
  bool tty = isatty(1);
  struct cli q = *c;
  q.json = false;
  char last_phase[64] = "", l1[512], l2[512], l3[512];
  time_t last_print = 0;
  bool drawn = false;
  unsigned failures = 0;
  for (;;) {
    json_t *m = NULL;
    int r = cli_call(&q, "GET", path, NULL, &m);
    if (r != EXIT_OK) {
      json_decref(m);
      if (r == EXIT_UNREACHABLE && ++failures < 30) {   /* ferryd restarting: wait */
        sleep(1);
        continue;
      }
      return r;
    }
    failures = 0;
    progress_lines(m, l1, l2, l3, sizeof l1);
    const char *state = j_str(m, "state");
    const char *phase = j_str(json_object_get(m, "progress"), "phase");
    /* A warm migration's start is done once the VM runs at the destination. */
    bool running_warm = until_warm && strcmp(state, "warm") == 0;
    bool done = terminal_state(state) || running_warm;
    if (c->json) {
      if (done) {
        char *t = json_dumps(m, JSON_COMPACT);
        printf("%s\n", t ? t : "{}");
        free(t);
        bool ok = good_end(state) || running_warm;
        json_decref(m);
        return ok ? EXIT_OK : EXIT_REFUSED;
      }
    } else if (tty) {
      if (drawn)
        printf("\033[2F");
      printf("\r%s\033[K\n%s\033[K\n%s\033[K", l1, l2, l3);
      fflush(stdout);
      drawn = true;
    } else if (done || strcmp(phase, last_phase) != 0 || time(NULL) - last_print >= 5) {
      printf("%s\n%s\n%s\n", l1, l2, l3);
      fflush(stdout);
      last_print = time(NULL);
    }
    snprintf(last_phase, sizeof last_phase, "%s", phase);
    if (done) {
      if (tty)
        printf("\n");
      print_summary(m);
      bool ok = good_end(state) || running_warm;
      json_decref(m);
      return ok ? EXIT_OK : EXIT_REFUSED;
    }
    json_decref(m);
    sleep(1);
  }
}

static const char usage_migrate[] =
  "Usage: ferry migrate VM --to SITE [--mode live|warm|cold] [--max-downtime DURATION]\n"
  "                     [--rate-limit RATE] [--verify incremental|full]\n"
  "                     [--map-network SRC=DST]... [--preflight] [--wait]\n"
  "                     warm: [--rpo DURATION] [--cache-size SIZE] [--prefetch hot|none]\n"
  "                           [--hydrate-rate RATE] [--degraded-after DURATION]\n"
  "Moves a VM and its disks to a paired site.  First a pre-flight checks, at both\n"
  "sites, everything that could make it fail (the hypervisor at the destination\n"
  "and its version, machine type, CPU model, memory, disk space, names, networks);\n"
  "a failed check stops it before anything changes, and the list is printed.\n"
  "live: the VM keeps running: background copy of its disks, foreground copy of\n"
  "what it writes meanwhile, then a cutover that pauses it, drains the last\n"
  "writes, checks that the destination equals the source, moves its state (qemu:\n"
  "its RAM, by QEMU's migration through the site link) and resumes it there.\n"
  "warm (sim VMs): compute moves first: a restore point of the disks is taken\n"
  "here (kept until 'ferry snapshot rm'), the VM runs at the destination within\n"
  "seconds whatever the size of its disks, served by a cloud cache that fetches\n"
  "what it lacks over the site link (hot regions first, the rest in the\n"
  "background); its writes come back here every RPO interval as consistent\n"
  "points.  End it with 'ferry commit VM' or 'ferry migrate-back VM'.\n"
  "cold: the VM is powered down, its disks copied and checked, and it boots at\n"
  "the destination.\n"
  "  --to SITE             the peer's name or API URL (see 'ferry site peers')\n"
  "  --mode MODE           live, warm or cold [live]\n"
  "  --max-downtime D      the pause the cutover may take, e.g. 500ms, 2s [500ms];\n"
  "                        the cutover waits until the backlog fits in it, and write\n"
  "                        backpressure slows the VM if it would never fit\n"
  "  --rate-limit RATE     cap on replication reads, e.g. 50M (per second), to\n"
  "                        protect the VM's IO; change it later with\n"
  "                        'ferry migration set ID --rate-limit RATE' [none]\n"
  "  --verify MODE         incremental: a sweep checks every region while the VM runs,\n"
  "                        the pause re-checks what changed since; full: the pause\n"
  "                        checks every region (longer downtime) [incremental]\n"
  "  --map-network S=D     the VM's NICs on network S here join network D at the\n"
  "                        destination (repeatable); unmapped networks keep their name\n"
  "                        and must exist there\n"
  "  --rpo D               warm: write-back interval, e.g. 20m, 30s [20m]\n"
  "  --cache-size SIZE     warm: local cache space per disk, e.g. 10G; smaller than\n"
  "                        the disk works (clean regions are evicted) [15% of the\n"
  "                        disk, at least 3 GiB, at most the disk]\n"
  "  --prefetch P          warm: hot = the hottest regions (source heat map) are\n"
  "                        fetched first; none [hot]\n"
  "  --hydrate-rate RATE   warm: background hydration cap, 0 = none [64M]\n"
  "  --degraded-after D    warm: link down or a read stuck this long = degraded [5m]\n"
  "  --preflight           run the checks only, print them, start nothing\n"
  "  --wait                show progress until the migration ends (warm: until the\n"
  "                        VM runs at the destination); exit 0 when it completed,\n"
  "                        1 when it failed or was cancelled\n"
  "Prints the migration id; follow it with 'ferry migration show ID'.\n";

static void print_checks(const json_t *answer)
{
  size_t i;
  const json_t *x;
  json_array_foreach(json_object_get(answer, "preflight"), i, x)
    printf("  %-4s %-28s %s\n", json_is_true(json_object_get(x, "ok")) ? "ok" : "FAIL",
           j_str(x, "check"), j_str(x, "detail"));
}

int cmd_migrate(struct cli *c, int argc, char **argv)
{
  const char *to = NULL, *mode = NULL, *downtime = NULL, *rate = NULL, *verify = NULL, *pos[1];
  const char *rpo = NULL, *csize = NULL, *prefetch = NULL, *hrate = NULL, *dafter = NULL;
  const char *maps[NETWORK_MAP_MAX];
  unsigned nmaps = 0;
  bool wait = false, preflight = false;
  const struct opt_spec spec[] = {
    { "to", true, &to, NULL, NULL, NULL, 0 },
    { "mode", true, &mode, NULL, NULL, NULL, 0 },
    { "max-downtime", true, &downtime, NULL, NULL, NULL, 0 },
    { "rate-limit", true, &rate, NULL, NULL, NULL, 0 },
    { "verify", true, &verify, NULL, NULL, NULL, 0 },
    { "map-network", true, NULL, NULL, maps, &nmaps, NETWORK_MAP_MAX },
    { "preflight", false, NULL, &preflight, NULL, NULL, 0 },
    { "wait", false, NULL, &wait, NULL, NULL, 0 },
    { "rpo", true, &rpo, NULL, NULL, NULL, 0 },
    { "cache-size", true, &csize, NULL, NULL, NULL, 0 },
    { "prefetch", true, &prefetch, NULL, NULL, NULL, 0 },
    { "hydrate-rate", true, &hrate, NULL, NULL, NULL, 0 },
    { "degraded-after", true, &dafter, NULL, NULL, NULL, 0 },
  };
  int npos, r = parse_args("migrate", usage_migrate, argc, argv, spec, ARRAY_SIZE(spec), pos, 1,
                           1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("migrate", pos[0])))
    return r;
  if (!to || !to[0])
    return cli_usage_error("migrate", "missing --to SITE");
  if (mode && strcmp(mode, "live") != 0 && strcmp(mode, "cold") != 0 &&
      strcmp(mode, "warm") != 0)
    return cli_usage_error("migrate", "unknown --mode '%s' (live, warm, cold)", mode);
  bool warm = mode && strcmp(mode, "warm") == 0;
  if (!warm && (rpo || csize || prefetch || hrate || dafter))
    return cli_usage_error("migrate", "--rpo, --cache-size, --prefetch, --hydrate-rate and "
                           "--degraded-after go with --mode warm");
  uint64_t rpo_ms = 0, da_ms = 0, cs = 0, hr = 0;
  if (rpo && (!parse_duration_ms(rpo, &rpo_ms) || rpo_ms < 1000))
    return cli_usage_error("migrate", "bad --rpo '%s': expected a duration of at least 1s, "
                           "e.g. 20m, 30s", rpo);
  if (dafter && (!parse_duration_ms(dafter, &da_ms) || da_ms < 1000))
    return cli_usage_error("migrate", "bad --degraded-after '%s': expected e.g. 5m", dafter);
  if (csize && (parse_size(csize, &cs) < 0 || cs == 0))
    return cli_usage_error("migrate", "bad --cache-size '%s': expected a size such as 10G",
                           csize);
  if (hrate && parse_rate(hrate, &hr) < 0)
    return cli_usage_error("migrate", "bad --hydrate-rate '%s': expected a rate such as 64M "
                           "or 0", hrate);
  if (prefetch && strcmp(prefetch, "hot") != 0 && strcmp(prefetch, "none") != 0)
    return cli_usage_error("migrate", "bad --prefetch '%s': hot or none", prefetch);
  if (verify && strcmp(verify, "full") != 0 && strcmp(verify, "incremental") != 0)
    return cli_usage_error("migrate", "bad --verify '%s': incremental or full", verify);
  uint64_t rl = 0;
  if (rate && parse_rate(rate, &rl) < 0)
    return cli_usage_error("migrate", "bad --rate-limit '%s': expected a rate such as 50M",
                           rate);
  if (downtime) {
    char *end;
    double v = strtod(downtime, &end);
    if (end == downtime || v <= 0 ||
        (*end && strcmp(end, "ms") != 0 && strcmp(end, "s") != 0 && strcmp(end, "m") != 0))
      return cli_usage_error("migrate", "bad --max-downtime '%s': expected e.g. 500ms, 2s",
                             downtime);
  }
  json_t *netmap = json_object();
  for (unsigned i = 0; i < nmaps; i++) {
    const char *eq = strchr(maps[i], '=');
    char src[65];
    if (!eq || eq == maps[i] || (size_t)(eq - maps[i]) >= sizeof src || !name_is_valid(eq + 1)) {
      json_decref(netmap);
      return cli_usage_error("migrate", "bad --map-network '%s': expected SRC=DST network "
                             "names", maps[i]);
    }
    snprintf(src, sizeof src, "%.*s", (int)(eq - maps[i]), maps[i]);
    if (!name_is_valid(src) || json_object_get(netmap, src)) {
      json_decref(netmap);
      return cli_usage_error("migrate", "bad --map-network '%s': %s", maps[i],
                             name_is_valid(src) ? "network mapped twice" : "bad network name");
    }
    json_object_set_new(netmap, src, json_string(eq + 1));
  }
  json_t *body = json_pack("{s:s, s:s, s:s}", "vm", pos[0], "to", to, "mode", mode ? mode : "live");
  if (nmaps)
    json_object_set(body, "networks", netmap);
  json_decref(netmap);
  if (preflight)
    json_object_set_new(body, "preflight_only", json_true());
  if (downtime) {
    char *end;
    double v = strtod(downtime, &end);
    double ms = strcmp(end, "s") == 0 ? v * 1000 : strcmp(end, "m") == 0 ? v * 60000 : v;
    json_object_set_new(body, "max_downtime", json_integer((json_int_t)(ms + 0.5)));
  }
  if (rate)
    json_object_set_new(body, "rate_limit", json_integer((json_int_t)rl));
  if (verify)
    json_object_set_new(body, "verify", json_string(verify));
  if (rpo)
    json_object_set_new(body, "rpo", json_integer((json_int_t)rpo_ms));
  if (dafter)
    json_object_set_new(body, "degraded_after", json_integer((json_int_t)da_ms));
  if (csize)
    json_object_set_new(body, "cache_size", json_integer((json_int_t)cs));
  if (hrate)
    json_object_set_new(body, "hydrate_rate", json_integer((json_int_t)hr));
  if (prefetch)
    json_object_set_new(body, "prefetch", json_string(prefetch));
  struct cli q = *c;
  if (wait)
    q.json = false;        /* with --wait -o json, only the final document is printed */
  json_t *answer;
  r = cli_call(&q, "POST", "/v1/migrations", body, &answer);
  json_decref(body);
  if (r != EXIT_OK)
    return r;
  if (preflight) {
    if (!c->json) {
      printf("pre-flight for VM %s to site %s: every check passed\n", pos[0], to);
      print_checks(answer);
    }
    json_decref(answer);
    return EXIT_OK;
  }
  char id[32];
  snprintf(id, sizeof id, "%s", j_str(answer, "id"));
  if (!c->json && warm) {
    const json_t *wp = json_object_get(json_object_get(answer, "params"), "warm");
    char q0[32];
    printf("migration %s started: VM %s to site %s (warm, RPO %llu s, cache %s per disk, "
           "prefetch %s)\n", id, pos[0], j_str(answer, "peer"),
           (unsigned long long)j_u64(wp, "rpo_s"),
           fmt_bytes((uint64_t)json_integer_value(json_array_get(json_object_get(wp, "quota"), 0)),
                     q0, sizeof q0), j_str(wp, "prefetch"));
  } else if (!c->json) {
    printf("migration %s started: VM %s to site %s (%s, max downtime %llu ms)\n", id, pos[0],
           j_str(answer, "peer"), j_str(answer, "mode"),
           (unsigned long long)j_u64(json_object_get(answer, "params"), "max_downtime_ms"));
  }
  json_decref(answer);
  return wait ? wait_for(c, id, true) : EXIT_OK;
}

/* ---- ferry migration ... ---- */

static void print_list(const json_t *answer)
{
  const json_t *ms = json_object_get(answer, "migrations");
  static const char *const h[] = { "ID", "ROLE", "VM", "PEER", "STATE", "PHASE", "LEFT",
                                   "DOWNTIME", "CREATED" };
  struct table *t = table_new(9, h);
  size_t i;
  const json_t *m;
  json_array_foreach(ms, i, m) {
    const json_t *p = json_object_get(m, "progress");
    char left[32], dt[32] = "-";
    fmt_bytes(j_u64(p, "bytes_left"), left, sizeof left);
    if (strcmp(j_str(m, "state"), "completed") == 0 || is_warm(m))
      snprintf(dt, sizeof dt, "%llu ms",
               (unsigned long long)j_u64(json_object_get(p, "cutover"), "downtime_ms"));
    const char *cells[] = { j_str(m, "id"), j_str(m, "role"), j_str(m, "vm"), j_str(m, "peer"),
                            j_str(m, "state"), j_str(p, "phase"), left, dt,
                            j_str(m, "created_at") };
    table_add(t, cells);
  }
  if (json_array_size(ms) == 0)
    printf("no migrations\n");
  else
    table_print(t, stdout, "");
  table_free(t);
}

static void print_show(const json_t *m)
{
  char l1[512], l2[512], l3[512];
  progress_lines(m, l1, l2, l3, sizeof l1);
  printf("%s\n%s\n%s\n", l1, l2, l3);
  print_summary(m);
}

static int check_id(const char *cmd, const char *id)
{
  bool ok = strncmp(id, "m-", 2) == 0 && strlen(id) == 14 && strspn(id + 2, "0123456789abcdef") == 12;
  return ok ? EXIT_OK : cli_usage_error(cmd, "'%s' is not a migration id (m-<12 hex>)", id);
}

static int mig_with_id(struct cli *c, int argc, char **argv, const char *cmd, const char *usage,
                       const char *method, const char *action, void (*show)(const json_t *))
{
  const char *pos[1];
  int npos, r = parse_args(cmd, usage, argc, argv, NULL, 0, pos, 1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_id(cmd, pos[0])))
    return r;
  char path[128];
  snprintf(path, sizeof path, "/v1/migrations/%s%s", pos[0], action ? action : "");
  return call_and_show(c, method, path, NULL, show);
}

static int mig_list(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  int npos, r = parse_args("migration list", "Usage: ferry migration list\nThe migrations "
                           "of this site, as source and as destination.\n", argc, argv, NULL, 0,
                           pos, 0, 0, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  return call_and_show(c, "GET", "/v1/migrations", NULL, print_list);
}

static int mig_show(struct cli *c, int argc, char **argv)
{
  return mig_with_id(c, argc, argv, "migration show",
                     "Usage: ferry migration show ID\nProgress and figures of one migration.\n",
                     "GET", NULL, print_show);
}

static int mig_cancel(struct cli *c, int argc, char **argv)
{
  return mig_with_id(c, argc, argv, "migration cancel",
                     "Usage: ferry migration cancel ID\n"
                     "At the source: stops the migration; the VM keeps running here and what\n"
                     "the destination built is removed.  Refused after the point of no return\n"
                     "(the VM runs, or is being started, at the destination).  At the\n"
                     "destination: removes an incoming migration the source no longer drives.\n",
                     "POST", "/cancel", print_summary);
}

static int mig_wait(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  int npos, r = parse_args("migration wait", "Usage: ferry migration wait ID\nShows progress "
                           "until the migration ends (exit 0 when it completed).\n", argc, argv,
                           NULL, 0, pos, 1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_id("migration wait", pos[0])))
    return r;
  return wait_for(c, pos[0], false);
}

static int mig_set(struct cli *c, int argc, char **argv)
{
  const char *rate = NULL, *pos[1];
  const struct opt_spec spec[] = { { "rate-limit", true, &rate, NULL, NULL, NULL, 0 } };
  int npos, r = parse_args("migration set",
                           "Usage: ferry migration set ID --rate-limit RATE\n"
                           "Changes the cap on replication reads while the migration runs\n"
                           "(replication backpressure), e.g. 20M per second; 0 = none.\n",
                           argc, argv, spec, ARRAY_SIZE(spec), pos, 1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_id("migration set", pos[0])))
    return r;
  uint64_t rl;
  if (!rate)
    return cli_usage_error("migration set", "missing --rate-limit RATE");
  if (parse_rate(rate, &rl) < 0)
    return cli_usage_error("migration set", "bad --rate-limit '%s'", rate);
  char path[128];
  snprintf(path, sizeof path, "/v1/migrations/%s", pos[0]);
  json_t *body = json_pack("{s:I}", "rate_limit", (json_int_t)rl);
  json_t *answer;
  r = cli_call(c, "PUT", path, body, &answer);
  json_decref(body);
  if (r == EXIT_OK && !c->json) {
    char b[32];
    printf("migration %s: replication rate limit %s\n", pos[0],
           rl ? fmt_rate((double)rl, b, sizeof b) : "off");
  }
  json_decref(answer);
  return r;
}

/* ---- warm: commit, migrate-back, rpo-now; snapshots ---- */

static int warm_cmd(struct cli *c, int argc, char **argv, const char *cmd, const char *usage,
                    const char *action, bool back)
{
  const char *pos[1];
  bool last_rpo = false, yes = false;
  const struct opt_spec spec[] = {
    { "last-rpo", false, NULL, &last_rpo, NULL, NULL, 0 },
    { "yes", false, NULL, &yes, NULL, NULL, 0 },
  };
  int npos, r = parse_args(cmd, usage, argc, argv, spec, back ? ARRAY_SIZE(spec) : 0, pos, 1, 1,
                           &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if (!name_is_valid(pos[0]))
    return cli_usage_error(cmd, "'%s' is neither a VM name nor a migration id", pos[0]);
  if (last_rpo && !yes)
    return cli_usage_error(cmd, "--last-rpo starts the VM here from the last RPO point: what "
                           "was written at the destination after it is lost; add --yes");
  char path[160];
  snprintf(path, sizeof path, "/v1/migrations/%s/%s", pos[0], action);
  json_t *body = json_object();
  if (last_rpo)
    json_object_set_new(body, "last_rpo", json_true());
  if (!c->json && strcmp(action, "migrate-back") == 0 && !last_rpo)
    printf("%s: pausing the VM at the destination, shipping its last writes back...\n",
           pos[0]);
  json_t *answer;
  r = cli_call(c, "POST", path, body, &answer);
  json_decref(body);
  if (r == EXIT_OK && !c->json && json_object_get(answer, "id"))
    print_show(answer);
  json_decref(answer);
  return r;
}

static int cmd_commit_fn(struct cli *c, int argc, char **argv)
{
  return warm_cmd(c, argc, argv, "commit",
                  "Usage: ferry commit VM|ID\n"
                  "Ends a warm migration at its source: once the destination's cache holds\n"
                  "every region, the destination becomes the only copy of the VM's disks and\n"
                  "write-back stops.  The disks here go back to the migrate-time restore\n"
                  "point and are kept, fenced, as it (ferry snapshot rm VM releases them).\n"
                  "Refused while hydration is not complete.\n", "commit", false);
}

static int cmd_back_fn(struct cli *c, int argc, char **argv)
{
  return warm_cmd(c, argc, argv, "migrate-back",
                  "Usage: ferry migrate-back VM|ID [--last-rpo --yes]\n"
                  "Try Before Commit, at the source: the VM pauses at the destination, every\n"
                  "write it made there comes back here, and it resumes here; the source's\n"
                  "disks then equal the destination's at the pause, and the cloud cache is\n"
                  "released.\n"
                  "  --last-rpo   the destination is unreachable (degraded): start the VM here\n"
                  "               from the last RPO point applied; writes made at the\n"
                  "               destination after it are LOST, by design; the VM there must\n"
                  "               not run on (stop it at that site).  Needs --yes.\n",
                  "migrate-back", true);
}

int cmd_commit(struct cli *c, int argc, char **argv) { return cmd_commit_fn(c, argc, argv); }
int cmd_migrate_back(struct cli *c, int argc, char **argv) { return cmd_back_fn(c, argc, argv); }

static int mig_rpo_now(struct cli *c, int argc, char **argv)
{
  return warm_cmd(c, argc, argv, "migration rpo-now",
                  "Usage: ferry migration rpo-now VM|ID\n"
                  "A warm migration's write-back point now, instead of at the next RPO tick.\n",
                  "rpo-now", false);
}

static void print_snapshots(const json_t *answer)
{
  const json_t *ss = json_object_get(answer, "snapshots");
  static const char *const h[] = { "VM", "MIGRATION", "TO", "KIND", "BYTES", "CREATED" };
  struct table *t = table_new(6, h);
  size_t i;
  const json_t *x;
  json_array_foreach(ss, i, x) {
    char b[32];
    fmt_bytes(j_u64(x, "bytes"), b, sizeof b);
    const char *cells[] = { j_str(x, "vm"), j_str(x, "migration"), j_str(x, "peer"),
                            j_str(x, "kind"), b, j_str(x, "created_at") };
    table_add(t, cells);
  }
  if (json_array_size(ss) == 0)
    printf("no restore points\n");
  else
    table_print(t, stdout, "");
  table_free(t);
}

static const char usage_snapshot[] =
  "Usage: ferry snapshot SUBCOMMAND ...\n"
  "Restore points taken at the source when a warm migration starts.\n"
  "  list                 the restore points of this site\n"
  "  rm VM                drop VM's restore point (after commit: its kept disks too)\n"
  "  restore VM --yes     roll VM's disks and state back to the restore point; data\n"
  "                       written since is LOST, by design; the VM must be stopped\n"
  "                       here and no warm migration of it going on\n";

int cmd_snapshot(struct cli *c, int argc, char **argv)
{
  if (argc < 2) {
    fprintf(stderr, "%s", usage_snapshot);
    return EXIT_USAGE;
  }
  const char *sub = argv[1];
  if (strcmp(sub, "--help") == 0 || strcmp(sub, "-h") == 0 || strcmp(sub, "help") == 0) {
    printf("%s", usage_snapshot);
    return EXIT_OK;
  }
  const char *pos[1];
  bool yes = false;
  const struct opt_spec spec[] = { { "yes", false, NULL, &yes, NULL, NULL, 0 } };
  int npos, r;
  if (strcmp(sub, "list") == 0 || strcmp(sub, "ls") == 0) {
    r = parse_args("snapshot list", usage_snapshot, argc - 1, argv + 1, NULL, 0, pos, 0, 0, &npos);
    if (r)
      return r == PARSE_HELP ? EXIT_OK : r;
    return call_and_show(c, "GET", "/v1/snapshots", NULL, print_snapshots);
  }
  bool restore = strcmp(sub, "restore") == 0;
  if (!restore && strcmp(sub, "rm") != 0)
    return cli_usage_error("snapshot", "unknown subcommand '%s'", sub);
  r = parse_args(restore ? "snapshot restore" : "snapshot rm", usage_snapshot, argc - 1,
                 argv + 1, restore ? spec : NULL, restore ? 1 : 0, pos, 1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name(restore ? "snapshot restore" : "snapshot rm", pos[0])))
    return r;
  if (restore && !yes)
    return cli_usage_error("snapshot restore", "this rolls VM '%s' back to its restore point "
                           "and everything written since is lost; add --yes", pos[0]);
  char path[160];
  snprintf(path, sizeof path, "/v1/snapshots/%s%s", pos[0], restore ? "/restore" : "");
  json_t *answer;
  r = cli_call(c, restore ? "POST" : "DELETE", path, NULL, &answer);
  if (r == EXIT_OK && !c->json)
    printf(restore ? "VM %s rolled back to its restore point (data written since is gone); "
                     "start it with 'ferry vm start %s'\n"
                   : "restore point of VM %s removed%.0s\n", pos[0], pos[0]);
  json_decref(answer);
  return r;
}

static const char usage_migration[] =
  "Usage: ferry migration SUBCOMMAND ...\n"
  "  list                        migrations of this site (source and destination)\n"
  "  show ID                     progress and figures\n"
  "  wait ID                     progress until it ends\n"
  "  set ID --rate-limit RATE    change the replication cap\n"
  "  cancel ID                   stop it; the VM stays at the source\n"
  "  rpo-now VM|ID               warm: a write-back point now\n"
  "Start one with 'ferry migrate VM --to SITE'.\n";

int cmd_migration(struct cli *c, int argc, char **argv)
{
  static const struct {
    const char *name;
    int (*fn)(struct cli *, int, char **);
  } subs[] = { { "list", mig_list }, { "ls", mig_list }, { "show", mig_show },
               { "cancel", mig_cancel }, { "wait", mig_wait }, { "set", mig_set },
               { "rpo-now", mig_rpo_now } };
  if (argc < 2) {
    fprintf(stderr, "%s", usage_migration);
    return EXIT_USAGE;
  }
  if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
      strcmp(argv[1], "help") == 0) {
    printf("%s", usage_migration);
    return EXIT_OK;
  }
  for (size_t i = 0; i < ARRAY_SIZE(subs); i++)
    if (strcmp(argv[1], subs[i].name) == 0)
      return subs[i].fn(c, argc - 1, argv + 1);
  return cli_usage_error("migration", "unknown subcommand '%s'", argv[1]);
}
