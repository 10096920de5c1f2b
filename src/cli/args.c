/* args: the argument helpers every `ferry` subcommand shares (see cli.h). */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/util.h"

int parse_args(const char *cmd, const char *usage_text, int argc, char **argv,
               const struct opt_spec *spec, unsigned nspec, const char **pos, int min, int max,
               int *npos)
{
  struct option longopts[16];
  unsigned n = 0;
  for (; n < nspec && n < ARRAY_SIZE(longopts) - 2; n++)
    longopts[n] = (struct option){ spec[n].name, spec[n].has_arg ? required_argument
                                                                 : no_argument, NULL, 256 + (int)n };
  longopts[n++] = (struct option){ "help", no_argument, NULL, 'h' };
  longopts[n] = (struct option){ NULL, 0, NULL, 0 };
  bool seen[16] = { false };

  optind = 0;   /* GNU: re-initialise for this argv */
  opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
    if (c == 'h') {
      printf("%s", usage_text);
      return PARSE_HELP;
    }
    if (c == ':')
      return cli_usage_error(cmd, "option '%s' needs an argument", argv[optind - 1]);
    if (c == '?')
      return cli_usage_error(cmd, "unknown option '%s'", argv[optind - 1]);
    unsigned i = (unsigned)c - 256;
    if (spec[i].multi) {
      if (*spec[i].nmulti >= spec[i].max_multi)
        return cli_usage_error(cmd, "option '--%s' given more than %u times", spec[i].name,
                               spec[i].max_multi);
      spec[i].multi[(*spec[i].nmulti)++] = optarg;
      continue;
    }
    if (seen[i])
      return cli_usage_error(cmd, "option '--%s' given twice", spec[i].name);
    seen[i] = true;
    if (spec[i].has_arg)
      *spec[i].value = optarg;
    else
      *spec[i].flag = true;
  }
  int k = 0;
  for (int i = optind; i < argc; i++) {
    if (k == max)
      return cli_usage_error(cmd, "unexpected argument '%s'", argv[i]);
    pos[k++] = argv[i];
  }
  if (k < min)
    return cli_usage_error(cmd, "missing NAME");
  *npos = k;
  return PARSE_GO;
}

int check_name(const char *cmd, const char *name)
{
  if (name_is_valid(name))
    return EXIT_OK;
  return cli_usage_error(cmd, "invalid name '%s': 1-64 characters of A-Z a-z 0-9 . _ -, "
                         "not starting with '.' or '-'", name);
}

int size_arg(const char *cmd, const char *opt, const char *s, uint64_t *out)
{
  if (parse_size(s, out) == 0 && *out <= (uint64_t)INT64_MAX)
    return EXIT_OK;
  if (errno == ERANGE || *out > (uint64_t)INT64_MAX)
    return cli_usage_error(cmd, "%s '%s' is too large", opt, s);
  return cli_usage_error(cmd, "bad %s '%s': expected bytes or a size such as 64K, 10G", opt, s);
}

int uint_arg(const char *cmd, const char *opt, const char *s, uint64_t max, uint64_t *out)
{
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (s[0] < '0' || s[0] > '9' || errno || *end || v > max)
    return cli_usage_error(cmd, "bad %s '%s': expected a number from 0 to %llu", opt, s,
                           (unsigned long long)max);
  *out = v;
  return EXIT_OK;
}

/* Runs one request and, in table mode, hands the answer to show. */
int call_and_show(struct cli *c, const char *method, const char *path, json_t *body,
                         void (*show)(const json_t *answer))
{
  json_t *answer;
  int ret = cli_call(c, method, path, body, &answer);
  if (ret == EXIT_OK && !c->json && show)
    show(answer);
  json_decref(answer);
  return ret;
}

