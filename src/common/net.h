/* net: listening sockets shared by every server in ferry (NBD, REST API, and
 * the site link to come). */
#ifndef FERRY_NET_H
#define FERRY_NET_H

#include <stddef.h>
#include <stdint.h>

/* Binds and listens on "HOST:PORT" or "[V6]:PORT" (port 0 picks a free one).
 * sock_flags are extra socket(2) type flags (SOCK_NONBLOCK); SOCK_CLOEXEC and
 * SO_REUSEADDR are always set.  what names the service in error messages
 * ("NBD", "API").  On success returns the fd and fills family and port (the
 * port actually bound); on failure returns -1 with a message in err. */
int net_listen_tcp(const char *host_port, int sock_flags, const char *what, int backlog,
                   int *family, uint16_t *port, char *err, size_t errlen);

#endif
