/* tunnel: a QEMU migration stream carried over the site link (tunnel.c has
 * the story).  Internal to src/replicate. */
#ifndef FERRY_TUNNEL_H
#define FERRY_TUNNEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct migration;
struct migrations;
struct link_conn;
struct tunnel;

/* Source: listens on sock_path for the source QEMU's `migrate unix:PATH`;
 * once QEMU connects, dials the migration's peer and pumps.  NULL with err. */
struct tunnel *tunnel_source_open(struct migration *m, const char *sock_path, char *err,
                                  size_t errlen);
/* True (with the reason) once the tunnel failed. */
bool tunnel_failed(struct tunnel *t, char *err, size_t errlen);
/* True once the pump ended (both ends closed, or a failure). */
bool tunnel_done(struct tunnel *t);
uint64_t tunnel_bytes_out(struct tunnel *t);      /* stream bytes sent so far */
uint64_t tunnel_wire_bytes(struct tunnel *t);     /* after compression, once done */
/* Stops the pump (if still running), removes the socket, frees. */
void tunnel_close(struct tunnel *t);

/* Destination: the unix socket the incoming QEMU of a migration listens on. */
void tunnel_incoming_path(const char *data_dir, const char *migration_id, char *buf,
                          size_t len);
/* Serves a link connection whose first frame was TUNNEL_OPEN (payload open);
 * closes conn. */
void tunnel_serve_dest(struct migrations *ms, struct link_conn *conn, const void *open,
                       uint32_t openlen);

#endif
