/* disk_api: ferryd's /v1 REST API (docs/api.md) over the disk registry and
 * the NBD listener.  Handlers run on the HTTP server's threads and only use
 * thread-safe registry, disk and listener functions. */
#ifndef FERRY_DISK_API_H
#define FERRY_DISK_API_H

#include <stddef.h>

struct registry;
struct nbd_listener;
struct disk_api;

/* Serves the API on host_port ("HOST:PORT", port 0 picks one).  reg and nbd
 * must outlive the API.  Returns NULL with a message in err. */
struct disk_api *disk_api_start(const char *host_port, struct registry *reg,
                                struct nbd_listener *nbd, char *err, size_t errlen);
/* "http://HOST:PORT" with the port actually bound. */
const char *disk_api_url(const struct disk_api *a);
/* Stops accepting, lets requests in flight finish, frees. */
void disk_api_stop(struct disk_api *a);

#endif
