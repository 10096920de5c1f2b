/* net: see net.h. */
#include "common/net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/util.h"

int net_listen_tcp(const char *host_port, int sock_flags, const char *what, int backlog,
                   int *family, uint16_t *port, char *err, size_t errlen)
{
  char host[256];
  uint16_t want;
  if (parse_host_port(host_port, host, sizeof host, &want) < 0) {
    snprintf(err, errlen, "bad %s address '%s': expected HOST:PORT or [V6]:PORT", what,
             host_port);
    return -1;
  }
  struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                            .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
  struct addrinfo *ai;
  char portstr[8];
  snprintf(portstr, sizeof portstr, "%u", want);
  int gai = getaddrinfo(host, portstr, &hints, &ai);
  if (gai) {
    snprintf(err, errlen, "cannot resolve %s address '%s': %s", what, host, gai_strerror(gai));
    return -1;
  }
  int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | sock_flags, ai->ai_protocol);
  if (fd < 0) {
    snprintf(err, errlen, "cannot listen on %s: socket: %s", host_port, strerror(errno));
    freeaddrinfo(ai);
    return -1;
  }
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, backlog) < 0) {
    snprintf(err, errlen, "cannot listen on %s %s: %s", what, host_port, strerror(errno));
    close(fd);
    freeaddrinfo(ai);
    return -1;
  }
  *family = ai->ai_family;
  freeaddrinfo(ai);
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  getsockname(fd, (struct sockaddr *)&ss, &sl);
  *port = ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
                                        : ((struct sockaddr_in6 *)&ss)->sin6_port);
  return fd;
}
