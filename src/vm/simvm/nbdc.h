/* nbdc: the one way ferry-simvm opens a synchronous libnbd connection (the
 * IO thread's asynchronous reconnects are in io.c), so every tool reports a
 * connection failure the same way. */
#ifndef FERRY_SIMVM_NBDC_H
#define FERRY_SIMVM_NBDC_H

#include <libnbd.h>
#include <stddef.h>
#include <stdint.h>

/* Connects to uri and returns the handle with the export size in *size, or
 * NULL with "disk NAME: cannot connect to URI: why" in err. */
struct nbd_handle *sim_nbd_open(const char *disk, const char *uri, uint64_t *size, char *err,
                                size_t errlen);

#endif
