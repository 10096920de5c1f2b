/* disk_cmd: `ferry disk SUBCOMMAND ...` (see cli.h and docs/cli.md).
 *
 * Each subcommand is a row of a table: its usage text and a function.  All
 * of them parse with one helper (parse_args: getopt_long, options and
 * positionals in any order, --help everywhere), check every argument
 * locally (names, sizes, rates, numbers) and only then send one request. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "common/util.h"
#include "disk/heat.h"   /* HEAT_MAX_REGIONS, HEAT_TRACE_SIZE: the API's bounds */

/* ---- subcommands ---- */

static void show_created(const json_t *d)
{
  char size[32];
  printf("disk %s: %s, image %s%s\n", j_str(d, "name"), fmt_bytes(j_u64(d, "size"), size,
         sizeof size), j_str(d, "image"), j_bool(d, "block_device") ? " (block device)" : "");
  printf("nbd: %s\n", j_str(d, "nbd_uri"));
}

static const char usage_create[] =
  "Usage: ferry disk create NAME --size SIZE [--cbt-granularity SIZE]\n"
  "Creates a sparse raw image of SIZE bytes (e.g. 10G; a multiple of 512) in\n"
  "ferryd's data directory and serves it over NBD as export NAME.  The image\n"
  "belongs to ferry: 'ferry disk rm' deletes it.\n"
  "  --size SIZE              image size, binary units (64K, 10G, 2T)\n"
  "  --cbt-granularity SIZE   bytes per dirty-map bit, a power of two from 4K\n"
  "                           to 1G [64K]\n";

static int disk_create(struct cli *c, int argc, char **argv)
{
  const char *size_s = NULL, *gran_s = NULL, *pos[1];
  const struct opt_spec spec[] = {
    { .name = "size", .has_arg = true, .value = &size_s },
    { .name = "cbt-granularity", .has_arg = true, .value = &gran_s },
  };
  int npos, r = parse_args("disk create", usage_create, argc, argv, spec, ARRAY_SIZE(spec),
                           pos, 1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("disk create", pos[0])))
    return r;
  if (!size_s)
    return cli_usage_error("disk create", "missing --size SIZE");
  uint64_t size, gran = 0;
  if ((r = size_arg("disk create", "--size", size_s, &size)) ||
      (gran_s && (r = size_arg("disk create", "--cbt-granularity", gran_s, &gran))))
    return r;
  json_t *body = json_pack("{s:s, s:I}", "name", pos[0], "size", (json_int_t)size);
  if (gran_s)
    json_object_set_new(body, "cbt_granularity", json_integer((json_int_t)gran));
  r = call_and_show(c, "POST", "/v1/disks", body, show_created);
  json_decref(body);
  return r;
}

static const char usage_add[] =
  "Usage: ferry disk add NAME --image PATH [--cbt-granularity SIZE]\n"
  "Serves an existing raw image file or block device over NBD as export NAME.\n"
  "The image stays where it is; 'ferry disk rm' leaves it in place.  A relative\n"
  "PATH is taken from the current directory.\n"
  "  --image PATH             raw image file or block device\n"
  "  --cbt-granularity SIZE   bytes per dirty-map bit, a power of two from 4K\n"
  "                           to 1G [64K]\n";

static int disk_add(struct cli *c, int argc, char **argv)
{
  const char *image = NULL, *gran_s = NULL, *pos[1];
  const struct opt_spec spec[] = {
    { .name = "image", .has_arg = true, .value = &image },
    { .name = "cbt-granularity", .has_arg = true, .value = &gran_s },
  };
  int npos, r = parse_args("disk add", usage_add, argc, argv, spec, ARRAY_SIZE(spec), pos, 1, 1,
                           &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("disk add", pos[0])))
    return r;
  if (!image || !image[0])
    return cli_usage_error("disk add", "missing --image PATH");
  uint64_t gran = 0;
  if (gran_s && (r = size_arg("disk add", "--cbt-granularity", gran_s, &gran)))
    return r;
  /* ferryd has another cwd: send an absolute path. */
  char abs[PATH_MAX * 2];
  if (image[0] != '/') {
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) {
      fprintf(stderr, "ferry: getcwd: %s\n", strerror(errno));
      return EXIT_USAGE;
    }
    snprintf(abs, sizeof abs, "%s/%s", cwd, image);
    image = abs;
  }
  json_t *body = json_pack("{s:s, s:s}", "name", pos[0], "image", image);
  if (gran_s)
    json_object_set_new(body, "cbt_granularity", json_integer((json_int_t)gran));
  r = call_and_show(c, "POST", "/v1/disks", body, show_created);
  json_decref(body);
  return r;
}

static const char usage_list[] =
  "Usage: ferry disk list\n"
  "Lists every disk: NAME SIZE ALLOCATED DIRTY CLIENTS IOPS(r/w) NBD-URI.\n"
  "IOPS are over the last second.\n";

static int disk_list(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  int npos, r = parse_args("disk list", usage_list, argc, argv, NULL, 0, pos, 0, 0, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  return call_and_show(c, "GET", "/v1/disks", NULL, print_disk_list);
}

static const char usage_show[] =
  "Usage: ferry disk show NAME\n"
  "Shows one disk: size, image, allocated and dirty bytes, CBT state, clients,\n"
  "IOPS, throughput, latency percentiles, write limit and hottest regions.\n";

static int disk_show(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  int npos, r = parse_args("disk show", usage_show, argc, argv, NULL, 0, pos, 1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("disk show", pos[0])))
    return r;
  char path[128];
  snprintf(path, sizeof path, "/v1/disks/%s", pos[0]);
  return call_and_show(c, "GET", path, NULL, print_disk_show);
}

static const char usage_rm[] =
  "Usage: ferry disk rm NAME [--force]\n"
  "Stops serving a disk and forgets it, with its dirty map.  An image that\n"
  "'ferry disk create' made is deleted; an added image is left in place.\n"
  "Refused while NBD clients are connected, unless --force.\n"
  "  --force   disconnect the clients first (they finish requests in flight)\n";

static int disk_rm(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  bool force = false;
  const struct opt_spec spec[] = { { .name = "force", .flag = &force } };
  int npos, r = parse_args("disk rm", usage_rm, argc, argv, spec, ARRAY_SIZE(spec), pos, 1, 1,
                           &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("disk rm", pos[0])))
    return r;
  char path[128];
  snprintf(path, sizeof path, "/v1/disks/%s%s", pos[0], force ? "?force=true" : "");
  json_t *answer;
  r = cli_call(c, "DELETE", path, NULL, &answer);
  if (r == EXIT_OK && !c->json)
    printf("removed disk %s; image %s\n", j_str(answer, "removed"),
           j_bool(answer, "image_deleted") ? "deleted" : "left in place");
  json_decref(answer);
  return r;
}

static const char usage_dirty[] =
  "Usage: ferry disk dirty NAME [--swap]\n"
  "Shows the dirty map (regions written since the map was last taken) as\n"
  "extents.\n"
  "  --swap   take the map: show it and start a clean one (generation + 1)\n";

static void show_dirty(const json_t *a) { print_dirty(a, false); }
static void show_swapped(const json_t *a) { print_dirty(a, true); }

static int disk_dirty(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  bool swap = false;
  const struct opt_spec spec[] = { { .name = "swap", .flag = &swap } };
  int npos, r = parse_args("disk dirty", usage_dirty, argc, argv, spec, ARRAY_SIZE(spec), pos,
                           1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("disk dirty", pos[0])))
    return r;
  char path[128];
  snprintf(path, sizeof path, "/v1/disks/%s/dirty%s", pos[0], swap ? "/swap" : "");
  return call_and_show(c, swap ? "POST" : "GET", path, NULL, swap ? show_swapped : show_dirty);
}

static const char usage_heat[] =
  "Usage: ferry disk heat NAME [--top N]\n"
  "Shows the hottest regions of a disk: IO counts since it was opened and\n"
  "heat (IO counts decayed with a 5 minute half-life).\n"
  "  --top N   how many regions [10]\n";

static int disk_heat(struct cli *c, int argc, char **argv)
{
  const char *pos[1], *top_s = NULL;
  const struct opt_spec spec[] = { { .name = "top", .has_arg = true, .value = &top_s } };
  int npos, r = parse_args("disk heat", usage_heat, argc, argv, spec, ARRAY_SIZE(spec), pos, 1,
                           1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("disk heat", pos[0])))
    return r;
  uint64_t top = 10;
  if (top_s && (r = uint_arg("disk heat", "--top", top_s, HEAT_MAX_REGIONS, &top)))
    return r;
  char path[160];
  snprintf(path, sizeof path, "/v1/disks/%s/heat?top=%llu", pos[0], (unsigned long long)top);
  return call_and_show(c, "GET", path, NULL, print_heat);
}

static const char usage_trace[] =
  "Usage: ferry disk trace NAME [--max N]\n"
  "Shows recent sampled IOs of a disk, oldest first.\n"
  "  --max N   at most N entries [256]\n";

static int disk_trace(struct cli *c, int argc, char **argv)
{
  const char *pos[1], *max_s = NULL;
  const struct opt_spec spec[] = { { .name = "max", .has_arg = true, .value = &max_s } };
  int npos, r = parse_args("disk trace", usage_trace, argc, argv, spec, ARRAY_SIZE(spec), pos,
                           1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("disk trace", pos[0])))
    return r;
  uint64_t max = 256;
  if (max_s && (r = uint_arg("disk trace", "--max", max_s, HEAT_TRACE_SIZE, &max)))
    return r;
  char path[160];
  snprintf(path, sizeof path, "/v1/disks/%s/trace?max=%llu", pos[0], (unsigned long long)max);
  return call_and_show(c, "GET", path, NULL, print_trace);
}

static const char usage_limit[] =
  "Usage: ferry disk limit NAME --write RATE\n"
  "Limits the rate of a disk's writes (write backpressure); kept across ferryd\n"
  "restarts.\n"
  "  --write RATE   bytes per second, e.g. 50M or 50M/s; 0 = no limit\n";

static int disk_limit(struct cli *c, int argc, char **argv)
{
  const char *pos[1], *rate_s = NULL;
  const struct opt_spec spec[] = { { .name = "write", .has_arg = true, .value = &rate_s } };
  int npos, r = parse_args("disk limit", usage_limit, argc, argv, spec, ARRAY_SIZE(spec), pos,
                           1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("disk limit", pos[0])))
    return r;
  if (!rate_s)
    return cli_usage_error("disk limit", "missing --write RATE");
  uint64_t rate;
  if (parse_rate(rate_s, &rate) < 0 || rate > (uint64_t)INT64_MAX)
    return cli_usage_error("disk limit", "bad --write '%s': expected bytes per second such as "
                           "50M or 50M/s, or 0 for no limit", rate_s);
  char path[128];
  snprintf(path, sizeof path, "/v1/disks/%s/write-limit", pos[0]);
  json_t *body = json_pack("{s:I}", "bytes_per_sec", (json_int_t)rate);
  json_t *answer;
  r = cli_call(c, "PUT", path, body, &answer);
  json_decref(body);
  if (r == EXIT_OK && !c->json) {
    uint64_t bps = j_u64(answer, "write_limit_bps");
    char buf[32];
    if (bps)
      printf("disk %s: writes limited to %s\n", j_str(answer, "name"),
             fmt_rate((double)bps, buf, sizeof buf));
    else
      printf("disk %s: no write limit\n", j_str(answer, "name"));
  }
  json_decref(answer);
  return r;
}

/* ---- dispatch ---- */

static const struct {
  const char *name;
  int (*fn)(struct cli *c, int argc, char **argv);
} subcommands[] = {
  { "create", disk_create }, { "add", disk_add }, { "list", disk_list },
  { "ls", disk_list }, { "show", disk_show }, { "rm", disk_rm }, { "dirty", disk_dirty },
  { "heat", disk_heat }, { "trace", disk_trace }, { "limit", disk_limit },
};

static const char usage_disk[] =
  "Usage: ferry disk SUBCOMMAND ...\n"
  "  create NAME --size SIZE [--cbt-granularity SIZE]\n"
  "                            make a sparse raw image in the data dir\n"
  "  add NAME --image PATH [--cbt-granularity SIZE]\n"
  "                            serve an existing raw file or block device\n"
  "  list                      all disks: NAME SIZE ALLOCATED DIRTY CLIENTS\n"
  "                            IOPS(r/w) NBD-URI\n"
  "  show NAME                 one disk in detail\n"
  "  rm NAME [--force]         remove (refused while clients are connected\n"
  "                            unless --force)\n"
  "  dirty NAME [--swap]       the dirty map as extents; --swap takes it\n"
  "  heat NAME [--top N]       hottest regions\n"
  "  trace NAME [--max N]      recent sampled IOs\n"
  "  limit NAME --write RATE   write rate limit, e.g. 50M (per second); 0 = off\n"
  "'ferry disk SUBCOMMAND --help' tells more.\n";

int cmd_disk(struct cli *c, int argc, char **argv)
{
  if (argc < 2) {
    fprintf(stderr, "%s", usage_disk);
    return EXIT_USAGE;
  }
  const char *sub = argv[1];
  if (strcmp(sub, "--help") == 0 || strcmp(sub, "-h") == 0 || strcmp(sub, "help") == 0) {
    printf("%s", usage_disk);
    return EXIT_OK;
  }
  for (size_t i = 0; i < ARRAY_SIZE(subcommands); i++)
    if (strcmp(sub, subcommands[i].name) == 0)
      return subcommands[i].fn(c, argc - 1, argv + 1);
  return cli_usage_error("disk", "unknown subcommand '%s'", sub);
}
