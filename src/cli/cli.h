/* cli: the `ferry` command line, a client of ferryd's REST API (docs/cli.md).
 *
 *   main.c      global options (--api, -o anywhere in argv), dispatch, the
 *               HTTP call (libcurl) and how its outcome maps to exit codes
 *   disk_cmd.c  `ferry disk ...` subcommands
 *   output.c    tables and the `disk show` report
 *
 * Exit codes: 0 ok, 1 the daemon refused (its error printed as
 * "ferry: CODE: MESSAGE"), 2 usage error, 3 daemon unreachable.  Arguments
 * are checked here before anything is sent, so a typo is a usage error (2),
 * never a request the daemon must refuse. */
#ifndef FERRY_CLI_H
#define FERRY_CLI_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#ifndef FERRY_VERSION
#define FERRY_VERSION "0.1.0"
#endif

#define DEFAULT_API_URL "http://127.0.0.1:7450"

enum cli_exit {
  EXIT_OK = 0,
  EXIT_REFUSED = 1,      /* the daemon answered with an error */
  EXIT_USAGE = 2,        /* bad command line */
  EXIT_UNREACHABLE = 3,  /* no answer from the daemon */
};

struct cli {
  char *api;             /* base URL, no trailing slash */
  bool json;             /* -o json: print the API's answer as is */
  bool quiet;            /* cli_call prints nothing (best-effort calls) */
};

/* One API request.  body (may be NULL) is sent as JSON.  On success returns
 * EXIT_OK with the parsed answer in *out (caller decrefs); in json mode the
 * raw answer has already been printed.  Otherwise prints the error (once)
 * and returns EXIT_REFUSED or EXIT_UNREACHABLE. */
int cli_call(const struct cli *c, const char *method, const char *path, json_t *body,
             json_t **out);

/* Prints "ferry CMD: MESSAGE" and a hint to CMD --help; returns EXIT_USAGE. */
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

int cmd_disk(struct cli *c, int argc, char **argv);
int cmd_site(struct cli *c, int argc, char **argv);
int cmd_vm(struct cli *c, int argc, char **argv);
int cmd_network(struct cli *c, int argc, char **argv);      /* host_cmd.c */
int cmd_hypervisor(struct cli *c, int argc, char **argv);   /* host_cmd.c */
int cmd_migrate(struct cli *c, int argc, char **argv);
int cmd_migration(struct cli *c, int argc, char **argv);
int cmd_commit(struct cli *c, int argc, char **argv);         /* migrate_cmd.c */
int cmd_migrate_back(struct cli *c, int argc, char **argv);   /* migrate_cmd.c */
int cmd_snapshot(struct cli *c, int argc, char **argv);       /* migrate_cmd.c */

/* --- args.c: parsing shared by the subcommands --- */

struct opt_spec {
  const char *name;       /* long option, without "--" */
  bool has_arg;
  const char **value;     /* has_arg: where the value goes (the last one given) */
  bool *flag;             /* !has_arg: set to true */
  const char **multi;     /* has_arg and repeatable: values appended here ... */
  unsigned *nmulti;       /* ... counted here, at most max_multi */
  unsigned max_multi;
};

enum { PARSE_GO = 0, PARSE_HELP = -1 };

/* Parses argv (argv[0] is the subcommand): options (getopt_long, --help
 * everywhere) and between min and max positionals into pos.  Returns
 * PARSE_GO, PARSE_HELP (usage printed: exit 0) or EXIT_USAGE (error printed). */
int parse_args(const char *cmd, const char *usage_text, int argc, char **argv,
               const struct opt_spec *spec, unsigned nspec, const char **pos, int min, int max,
               int *npos);
/* Disk/VM/site names; EXIT_OK or EXIT_USAGE (printed). */
int check_name(const char *cmd, const char *name);
int size_arg(const char *cmd, const char *opt, const char *s, uint64_t *out);
int uint_arg(const char *cmd, const char *opt, const char *s, uint64_t max, uint64_t *out);
/* Runs one request and, in table mode, hands the answer to show. */
int call_and_show(struct cli *c, const char *method, const char *path, json_t *body,
                  void (*show)(const json_t *answer));

/* --- output.c --- */

/* JSON accessors that tolerate a missing member (0, 0.0, false or "-"). */
uint64_t j_u64(const json_t *obj, const char *key);
double j_dbl(const json_t *obj, const char *key);
bool j_bool(const json_t *obj, const char *key);
const char *j_str(const json_t *obj, const char *key);

/* "10 GiB" into buf (format_size) */
const char *fmt_bytes(uint64_t bytes, char *buf, size_t len);
/* "48 KiB/s" */
const char *fmt_rate(double bps, char *buf, size_t len);

/* A text table: columns sized to their widest cell, numbers right-aligned. */
struct table;
struct table *table_new(unsigned ncols, const char *const *headers);
void table_align_right(struct table *t, unsigned col);
/* Adds a row of ncols cells (copied). */
void table_add(struct table *t, const char *const *cells);
void table_print(const struct table *t, FILE *f, const char *indent);
void table_free(struct table *t);

void print_disk_list(const json_t *answer);
void print_disk_show(const json_t *disk);
void print_dirty(const json_t *dirty, bool swapped);
void print_heat(const json_t *heat);
void print_trace(const json_t *trace);
void print_regions(const json_t *regions, const char *indent);

#endif
