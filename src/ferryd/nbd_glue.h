/* nbd_glue: ferryd's NBD front: listens on a unix socket or TCP address,
 * runs one thread per client connection (nbd_serve_connection), and maps the
 * NBD server's export ops onto the disk registry.  It keeps the list of live
 * connections per disk so a forced `disk rm` and SIGTERM can end them. */
#ifndef FERRY_NBD_GLUE_H
#define FERRY_NBD_GLUE_H

#include <stddef.h>

struct registry;
struct nbd_listener;

/* spec is "unix:PATH" or "HOST:PORT" (port 0 picks a free port).  workers is
 * the number of helper threads per connection. */
struct nbd_listener *nbd_listener_start(struct registry *reg, const char *spec,
                                        unsigned workers, char *err, size_t errlen);
/* NBD URI of an export: "nbd+unix:///NAME?socket=PATH" or "nbd://HOST:PORT/NAME". */
void nbd_listener_uri(const struct nbd_listener *l, const char *export_name,
                      char *buf, size_t len);
/* Where it listens, as given back to people: "unix:PATH" or "HOST:PORT". */
const char *nbd_listener_address(const struct nbd_listener *l);
/* Ends every connection to the named export (they finish requests in flight)
 * and waits until they are gone. */
void nbd_listener_disconnect_export(struct nbd_listener *l, const char *name);
/* Stops accepting, drains and ends every connection, waits, frees. */
void nbd_listener_stop(struct nbd_listener *l);

#endif
