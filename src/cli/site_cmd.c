/* site_cmd: `ferry site ...`: this site's identity on the site link and its
 * pairing with peers (docs/cli.md).
 *
 * Pairing is explicit and, by default, two-way: `ferry site pair URL` reads
 * both sites' identities through their APIs (so the operator must reach both)
 * and records each in the other's peers, printing both fingerprints so they
 * can be checked against what the other site's operator sees.  A one-way
 * pairing from a fingerprint given out of band is `ferry site pair --name N
 * --link HOST:PORT --fingerprint sha256:...`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/util.h"

static void print_site(const json_t *s)
{
  if (!j_bool(s, "initialised")) {
    printf("site: not initialised (run: ferry site init [--name NAME])\n");
    return;
  }
  printf("site:        %s\n", j_str(s, "name"));
  printf("fingerprint: %s\n", j_str(s, "fingerprint"));
  const char *link = json_string_value(json_object_get(s, "link"));
  printf("link:        %s\n", link ? link : "(not listening)");
}

static const char usage_init[] =
  "Usage: ferry site init [--name NAME]\n"
  "Gives this site its identity on the site link: a key pair and a self-signed\n"
  "certificate in ferryd's data directory (made once; the command only shows it\n"
  "afterwards).  The site link starts listening then.  NAME defaults to the host\n"
  "name; it is in the certificate, so it cannot change later.\n";

static int site_init_cmd(struct cli *c, int argc, char **argv)
{
  const char *name = NULL, *pos[1];
  const struct opt_spec spec[] = { { "name", true, &name, NULL, NULL, NULL, 0 } };
  int npos, r = parse_args("site init", usage_init, argc, argv, spec, ARRAY_SIZE(spec), pos, 0,
                           0, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if (name && (r = check_name("site init", name)))
    return r;
  json_t *body = name ? json_pack("{s:s}", "name", name) : json_object();
  json_t *answer;
  r = cli_call(c, "POST", "/v1/site/init", body, &answer);
  json_decref(body);
  if (r == EXIT_OK && !c->json) {
    printf("%s\n", j_bool(answer, "created") ? "site identity created" : "site already initialised");
    print_site(answer);
  }
  json_decref(answer);
  return r;
}

static const char usage_show[] =
  "Usage: ferry site show\n"
  "This site's name, certificate fingerprint and site link address.\n";

static int site_show(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  int npos, r = parse_args("site show", usage_show, argc, argv, NULL, 0, pos, 0, 0, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  json_t *answer;
  r = cli_call(c, "GET", "/v1/site", NULL, &answer);
  if (r == EXIT_OK && !c->json)
    print_site(answer);
  json_decref(answer);
  return r;
}

static int add_peer(struct cli *c, const char *name, const char *api, const char *link,
                    const char *fp)
{
  json_t *body = json_pack("{s:s, s:s, s:s, s:s}", "name", name, "api_url", api, "link", link,
                           "fingerprint", fp);
  json_t *answer = NULL;
  int r = cli_call(c, "POST", "/v1/peers", body, &answer);
  json_decref(body);
  json_decref(answer);
  return r;
}

static const char usage_pair[] =
  "Usage: ferry site pair PEER_API_URL [--link HOST:PORT] [--peer-link HOST:PORT]\n"
  "       ferry site pair --name NAME --link HOST:PORT --fingerprint sha256:HEX\n"
  "                       [--peer-api URL]\n"
  "Pairs this site (--api) with a peer so that each trusts the other's\n"
  "certificate on the site link; an unpaired peer is refused.\n"
  "With PEER_API_URL both sites are asked for their identity through their APIs\n"
  "and each is recorded at the other (two-way); both fingerprints are printed:\n"
  "compare them with what `ferry site show` says at each site.\n"
  "  --link HOST:PORT       where this site dials the peer's link [the address\n"
  "                         the peer advertises]\n"
  "  --peer-link HOST:PORT  where the peer dials this site's link [the address\n"
  "                         this site advertises]\n"
  "The second form records one peer here only, from a fingerprint obtained out\n"
  "of band (pair the other way at the peer as well).\n";

/* An advertised 0.0.0.0 / [::] listener is reached at the API's host. */
static void reachable_link(const char *link, const char *api, char *out, size_t len)
{
  const char *port = strrchr(link, ':');
  bool wildcard = strncmp(link, "0.0.0.0:", 8) == 0 || strncmp(link, "[::]:", 5) == 0;
  if (!wildcard || !port) {
    snprintf(out, len, "%s", link);
    return;
  }
  const char *h = strstr(api, "://");
  h = h ? h + 3 : api;
  size_t hl = strcspn(h, "/");
  const char *colon = memchr(h, ':', hl);
  if (h[0] == '[')
    colon = memchr(h, ']', hl) ? memchr(h, ']', hl) + 1 : NULL;
  size_t host_len = colon ? (size_t)(colon - h) : hl;
  snprintf(out, len, "%.*s%s", (int)host_len, h, port);
}

static int site_pair(struct cli *c, int argc, char **argv)
{
  const char *link = NULL, *peer_link = NULL, *name = NULL, *fp = NULL, *peer_api = NULL;
  const char *pos[1];
  const struct opt_spec spec[] = {
    { "link", true, &link, NULL, NULL, NULL, 0 },
    { "peer-link", true, &peer_link, NULL, NULL, NULL, 0 },
    { "name", true, &name, NULL, NULL, NULL, 0 },
    { "fingerprint", true, &fp, NULL, NULL, NULL, 0 },
    { "peer-api", true, &peer_api, NULL, NULL, NULL, 0 },
  };
  int npos, r = parse_args("site pair", usage_pair, argc, argv, spec, ARRAY_SIZE(spec), pos, 0,
                           1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  char host[256];
  uint16_t port;
  if (link && (parse_host_port(link, host, sizeof host, &port) < 0 || port == 0))
    return cli_usage_error("site pair", "bad --link '%s': expected HOST:PORT", link);
  if (peer_link && (parse_host_port(peer_link, host, sizeof host, &port) < 0 || port == 0))
    return cli_usage_error("site pair", "bad --peer-link '%s': expected HOST:PORT", peer_link);

  if (npos == 0) {
    /* One-way, out of band. */
    if (!name || !link || !fp)
      return cli_usage_error("site pair", "give PEER_API_URL, or --name, --link and "
                             "--fingerprint");
    if ((r = check_name("site pair", name)))
      return r;
    r = add_peer(c, name, peer_api ? peer_api : "http://unknown", link, fp);
    if (r == EXIT_OK && !c->json)
      printf("paired (one way): this site trusts '%s' (%s) at %s\n", name, fp, link);
    return r;
  }
  if (name || fp)
    return cli_usage_error("site pair", "--name and --fingerprint go without PEER_API_URL");

  const char *url = pos[0];
  struct cli peer = *c;
  peer.json = false;
  if (strstr(url, "://"))
    peer.api = strdup(url);
  else if (asprintf(&peer.api, "http://%s", url) < 0)
    peer.api = NULL;
  if (!peer.api)
    return EXIT_USAGE;
  size_t n = strlen(peer.api);
  while (n > 0 && peer.api[n - 1] == '/')
    peer.api[--n] = '\0';
  struct cli self = *c;
  self.json = false;

  json_t *mine = NULL, *theirs = NULL;
  if ((r = cli_call(&self, "GET", "/v1/site", NULL, &mine)) ||
      (r = cli_call(&peer, "GET", "/v1/site", NULL, &theirs)))
    goto out;
  if (!j_bool(mine, "initialised") || !j_bool(theirs, "initialised")) {
    fprintf(stderr, "ferry: %s has no site identity yet: run `ferry --api %s site init` first\n",
            !j_bool(mine, "initialised") ? "this site" : "the peer",
            !j_bool(mine, "initialised") ? c->api : peer.api);
    r = EXIT_REFUSED;
    goto out;
  }
  const char *my_link = json_string_value(json_object_get(mine, "link"));
  const char *their_link = json_string_value(json_object_get(theirs, "link"));
  if ((!link && !their_link) || (!peer_link && !my_link)) {
    fprintf(stderr, "ferry: %s site link is not listening (ferryd --link); give --%s\n",
            !link && !their_link ? "the peer's" : "this site's",
            !link && !their_link ? "link" : "peer-link");
    r = EXIT_REFUSED;
    goto out;
  }
  char dial_peer[256], dial_me[256];
  reachable_link(link ? link : their_link, peer.api, dial_peer, sizeof dial_peer);
  reachable_link(peer_link ? peer_link : my_link, c->api, dial_me, sizeof dial_me);
  if ((r = add_peer(&self, j_str(theirs, "name"), peer.api, dial_peer,
                    j_str(theirs, "fingerprint"))))
    goto out;
  if ((r = add_peer(&peer, j_str(mine, "name"), c->api, dial_me, j_str(mine, "fingerprint")))) {
    fprintf(stderr, "ferry: paired one way only: this site trusts '%s', but '%s' could not "
            "record this site; retry, or undo with 'ferry site unpair %s'\n",
            j_str(theirs, "name"), j_str(theirs, "name"), j_str(theirs, "name"));
    goto out;
  }
  if (c->json) {
    json_t *j = json_pack("{s:{s:s, s:s, s:s}, s:{s:s, s:s, s:s}}", "site", "name",
                          j_str(mine, "name"), "fingerprint", j_str(mine, "fingerprint"), "link",
                          dial_me, "peer", "name", j_str(theirs, "name"), "fingerprint",
                          j_str(theirs, "fingerprint"), "link", dial_peer);
    char *t = json_dumps(j, JSON_COMPACT);
    printf("%s\n", t ? t : "{}");
    free(t);
    json_decref(j);
  } else {
    printf("paired '%s' <-> '%s'\n", j_str(mine, "name"), j_str(theirs, "name"));
    printf("  %-12s %s  (peers dial %s)\n", j_str(mine, "name"), j_str(mine, "fingerprint"),
           dial_me);
    printf("  %-12s %s  (dialled at %s)\n", j_str(theirs, "name"), j_str(theirs, "fingerprint"),
           dial_peer);
  }
out:
  json_decref(mine);
  json_decref(theirs);
  free(peer.api);
  return r;
}

static void print_peers(const json_t *answer)
{
  const json_t *peers = json_object_get(answer, "peers");
  static const char *const h[] = { "NAME", "LINK", "API", "FINGERPRINT", "PAIRED" };
  struct table *t = table_new(5, h);
  size_t i;
  const json_t *p;
  json_array_foreach(peers, i, p) {
    const char *cells[] = { j_str(p, "name"), j_str(p, "link"), j_str(p, "api_url"),
                            j_str(p, "fingerprint"), j_str(p, "paired_at") };
    table_add(t, cells);
  }
  if (json_array_size(peers) == 0)
    printf("no peers (pair one: ferry site pair PEER_API_URL)\n");
  else
    table_print(t, stdout, "");
  table_free(t);
}

static const char usage_peers[] =
  "Usage: ferry site peers\nThe sites this one is paired with.\n";

static int site_peers(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  int npos, r = parse_args("site peers", usage_peers, argc, argv, NULL, 0, pos, 0, 0, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  return call_and_show(c, "GET", "/v1/peers", NULL, print_peers);
}

static const char usage_unpair[] =
  "Usage: ferry site unpair NAME\nForgets a peer here: its certificate is no longer "
  "trusted.\n";

static int site_unpair(struct cli *c, int argc, char **argv)
{
  const char *pos[1];
  int npos, r = parse_args("site unpair", usage_unpair, argc, argv, NULL, 0, pos, 1, 1, &npos);
  if (r)
    return r == PARSE_HELP ? EXIT_OK : r;
  if ((r = check_name("site unpair", pos[0])))
    return r;
  char path[128];
  snprintf(path, sizeof path, "/v1/peers/%s", pos[0]);
  json_t *answer;
  r = cli_call(c, "DELETE", path, NULL, &answer);
  if (r == EXIT_OK && !c->json)
    printf("unpaired '%s'\n", pos[0]);
  json_decref(answer);
  return r;
}

static const char usage_site[] =
  "Usage: ferry site SUBCOMMAND ...\n"
  "  init [--name NAME]          give this site its identity (key + certificate)\n"
  "  show                        name, fingerprint, link address\n"
  "  pair PEER_API_URL           pair with a peer, both ways\n"
  "  peers                       the paired peers\n"
  "  unpair NAME                 forget a peer\n"
  "'ferry site SUBCOMMAND --help' tells more.\n";

int cmd_site(struct cli *c, int argc, char **argv)
{
  static const struct {
    const char *name;
    int (*fn)(struct cli *, int, char **);
  } subs[] = { { "init", site_init_cmd }, { "show", site_show }, { "pair", site_pair },
               { "peers", site_peers }, { "unpair", site_unpair } };
  if (argc < 2) {
    fprintf(stderr, "%s", usage_site);
    return EXIT_USAGE;
  }
  if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
      strcmp(argv[1], "help") == 0) {
    printf("%s", usage_site);
    return EXIT_OK;
  }
  for (size_t i = 0; i < ARRAY_SIZE(subs); i++)
    if (strcmp(argv[1], subs[i].name) == 0)
      return subs[i].fn(c, argc - 1, argv + 1);
  return cli_usage_error("site", "unknown subcommand '%s'", argv[1]);
}
