/* site: who this ferryd is on the site link, and which peers it trusts.
 *
 * A site's identity is a key pair and a self-signed certificate in
 * DATA_DIR/site/ (link.h), made by `ferry site init` (POST /v1/site/init):
 * until then the site link is off.  Its name is the certificate's CN.
 *
 * Peers are paired explicitly (`ferry site pair`): a row per peer with its
 * name, the API URL it was paired through, the link address this site dials
 * to reach it, and the SHA-256 fingerprint of its certificate.  The link
 * trusts exactly these fingerprints, in both directions (site_trust is the
 * listener's trust callback; a client checks the server's fingerprint against
 * the peer row it dials).
 *
 * Table (module "site" in ferry.db, common/db.h):
 *   peers(name TEXT PRIMARY KEY, api_url TEXT, link TEXT, fingerprint TEXT UNIQUE,
 *         paired_at TEXT)
 *
 * Thread model: every function is thread-safe. */
#ifndef FERRY_SITE_H
#define FERRY_SITE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "link/link.h"

struct db;
struct site;

/* Loads the identity if there is one (the link stays off otherwise) and
 * opens the peers table.  Returns NULL with err. */
struct site *site_open(const char *data_dir, struct db *db, char *err, size_t errlen);
void site_close(struct site *s);

/* Creates the identity if absent.  name NULL: keep the existing one, or the
 * host name for a new one.  An existing identity with another name is
 * refused (-EEXIST): the name is in the certificate peers have pinned.
 * *created tells whether it was made now.  0 or -errno with err. */
int site_init(struct site *s, const char *name, bool *created, char *err, size_t errlen);
bool site_has_identity(struct site *s);
/* The identity (valid until site_close), NULL before site_init. */
struct link_identity *site_identity(struct site *s);
/* Copies the site name ("" before init). */
void site_name(struct site *s, char *buf, size_t len);

/* The link address peers should dial, as this site knows it (the bound
 * listener, or --link-advertise); "" while the link is off. */
void site_set_link_address(struct site *s, const char *addr);
void site_link_address(struct site *s, char *buf, size_t len);

struct site_peer {
  char name[65];
  char api_url[256];
  char link[256];                          /* HOST:PORT this site dials */
  char fingerprint[LINK_FINGERPRINT_LEN];
  char paired_at[32];
};

/* Adds or replaces the peer called p->name (a fingerprint paired to another
 * name is refused: -EEXIST).  Every field is validated (-EINVAL). */
int site_peer_add(struct site *s, const struct site_peer *p, char *err, size_t errlen);
int site_peer_remove(struct site *s, const char *name, char *err, size_t errlen);
/* Looks a peer up by name or by API URL (trailing '/' ignored).  0, or
 * -ENOENT with err. */
int site_peer_find(struct site *s, const char *name_or_url, struct site_peer *out, char *err,
                   size_t errlen);
/* {"peers":[...]} */
json_t *site_peers_json(struct site *s);
json_t *site_peer_json(const struct site_peer *p);

/* link_trust_fn: true when fingerprint is a paired peer's (name copied). */
bool site_trust(void *site, const char *fingerprint, char *name, size_t namelen);

#endif
