/* link_int: what the files of src/link share with each other and nobody
 * else (identity.c, conn.c, listener.c).  Naming: link_* in link.h are
 * public; the link_* below are internal to the library. */
#ifndef FERRY_LINK_INT_H
#define FERRY_LINK_INT_H

#include <stdbool.h>
#include <stddef.h>

#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "link/link.h"

/* identity.c */
/* "sha256:<hex>" of the DER certificate; 0 or -1 (OpenSSL failure). */
int link_fingerprint_of_x509(X509 *x, char out[LINK_FINGERPRINT_LEN]);
/* The TLS context of the identity for one role; owned by id. */
SSL_CTX *link_identity_ssl_ctx(const struct link_identity *id, bool server);

/* conn.c */
/* A TLS context with ferry's policy (TLS 1.3 only, peer certificate
 * required, trust by fingerprint) for cert and key.  NULL with err. */
SSL_CTX *link_tls_ctx_new(X509 *cert, EVP_PKEY *key, bool server, char *err, size_t errlen);
/* link_accept in two steps, so the listener can register the connection
 * (and shut it down on stop) before the handshake starts.  new: takes fd
 * (closed on failure); handshake: 0 or -errno with err, conn still to be
 * closed by the caller. */
struct link_conn *link_conn_server_new(struct link_identity *id, int fd, link_trust_fn trust,
                                       void *opaque, char *err, size_t errlen);
int link_conn_server_handshake(struct link_conn *c, unsigned timeout_ms, char *err,
                               size_t errlen);
/* The name the trust function gave the peer ("" if none). */
const char *link_conn_peer_name(const struct link_conn *c);

/* The listener's bookkeeping inside each connection; only listener.c
 * touches it, under its lock. */
struct link_conn_node {
  struct link_listener *owner;      /* NULL: not (or no longer) listed */
  struct link_conn *prev, *next;
};
struct link_conn_node *link_conn_node(struct link_conn *c);

/* listener.c: link_conn_close calls it first, so a listener never shuts
 * down a connection already freed. */
void link_listener_forget(struct link_conn *c);

#endif
