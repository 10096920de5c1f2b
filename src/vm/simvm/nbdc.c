/* nbdc: see nbdc.h. */
#include "vm/simvm/nbdc.h"

#include <stdio.h>

struct nbd_handle *sim_nbd_open(const char *disk, const char *uri, uint64_t *size, char *err,
                                size_t errlen)
{
  struct nbd_handle *h = nbd_create();
  if (!h) {
    snprintf(err, errlen, "disk %s: %s", disk, nbd_get_error());
    return NULL;
  }
  if (nbd_connect_uri(h, uri) < 0) {
    snprintf(err, errlen, "disk %s: cannot connect to %s: %s", disk, uri, nbd_get_error());
    nbd_close(h);
    return NULL;
  }
  int64_t s = nbd_get_size(h);
  if (s < 0) {
    snprintf(err, errlen, "disk %s: %s: cannot get the size: %s", disk, uri, nbd_get_error());
    nbd_close(h);
    return NULL;
  }
  *size = (uint64_t)s;
  return h;
}
