/* mem_export: an NBD export ops table backed by memory, for the NBD unit test
 * and the fuzzer: the protocol code runs for real with no disk behind it.
 * Export "mem" (and "mem2") of MEM_EXPORT_SIZE bytes; a dirty bit per 64 KiB
 * set by writes, reported through the second meta context. */
#ifndef FERRY_MEM_EXPORT_H
#define FERRY_MEM_EXPORT_H

#include "nbd/server.h"

#define MEM_EXPORT_SIZE (4u * 1024 * 1024)
#define MEM_EXPORT_GRAN (64u * 1024)

extern const struct nbd_exports mem_exports;
/* Resets content and dirty bits to zero. */
void mem_export_reset(void);
/* Direct access to the bytes, for checks. */
unsigned char *mem_export_data(void);

#endif
