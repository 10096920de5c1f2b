/* preflight: the checks before a migration (preflight.c has the story).
 * Internal to src/replicate. */
#ifndef FERRY_PREFLIGHT_H
#define FERRY_PREFLIGHT_H

#include <jansson.h>
#include <stdint.h>

#include "replicate/migration.h"

struct migrations;
struct migrations_shared;
struct link_conn;
struct site_peer;
struct vm_spec;

/* Renames the spec's NIC networks by map; a mapping for a network no NIC
 * uses is an error (a typo would otherwise pass unnoticed). */
int preflight_apply_network_map(struct vm_spec *spec, const struct network_map *map, char *err,
                                size_t errlen);
/* Runs every check for moving spec (before mapping) to peer in mode.  *out:
 * the list (new reference, always set).  0 all passed; -EPERM with every
 * failure named in err. */
int preflight_run(const struct migrations_shared *sh, const struct site_peer *peer,
                  const char *mode, const struct vm_spec *spec, const struct network_map *map,
                  json_t **out, char *err, size_t errlen);
/* Answers a QUERY connection (first frame payload q); closes conn. */
void preflight_serve_dest(struct migrations *ms, struct link_conn *conn, const void *q,
                          uint32_t qlen);

#endif
